"""Operator messages on stderr, one line per write.

With `workers`, several processes share one stderr pipe. print() hands the text and its newline to the stream
separately, so two workers' lines could merge into one; a single write of the whole line (under PIPE_BUF) cannot.
"""

from __future__ import annotations

import sys


def say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
