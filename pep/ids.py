"""Identifiers: request and decision ids, and the caller's request id when it is acceptable."""

from __future__ import annotations

import itertools
import os
import re
from typing import Final

_PRINTABLE_ID: Final = re.compile(r"[\x21-\x7e]{1,200}\Z")


# 64 random bits per process, then a counter: unique without a getrandom() syscall per id (ids are names for
# log lines, never secrets; each worker is its own process with its own prefix).
_PREFIX: Final = os.urandom(8).hex()
_COUNTER: Final = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_id() -> str:
    """32 hex characters: the process's random prefix and a counter (`to_bytes().hex()`: compiled, a third of
    the cost of a format spec, which goes through `str.format`)."""
    return _PREFIX + (next(_COUNTER) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big").hex()


def request_id(caller_value: str | None) -> str:
    """The caller's `x-request-id` when it is 1-200 printable ASCII characters, otherwise a new id."""
    if caller_value is not None and _PRINTABLE_ID.match(caller_value):
        return caller_value
    return new_id()
