"""pep/fdlimit.py: the soft descriptor limit follows max_connections, within the hard limit (in a child process,
so the test runner's own limit is left alone)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import resource, sys
from pep.fdlimit import HEADROOM, raise_limit
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
warning = raise_limit(int(sys.argv[3]))
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], warning is not None)
"""


def _run(soft: int, hard: int, max_connections: int) -> tuple[int, bool]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(soft), str(hard), str(max_connections)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), out[1] == "True"


def test_the_soft_limit_is_raised_to_what_max_connections_needs() -> None:
    assert _run(256, 8192, 4096) == (4096 + 1024, False)


def test_never_above_the_hard_limit_and_a_warning_when_short() -> None:
    assert _run(256, 2048, 4096) == (2048, True)


def test_a_larger_limit_is_left_as_it_is() -> None:
    assert _run(8000, 8192, 100) == (8000, False)
