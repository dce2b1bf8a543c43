"""Identifiers: request and decision ids, and the caller's request id when it is acceptable."""

from __future__ import annotations

import os
import re

_PRINTABLE_ID = re.compile(r"[\x21-\x7e]{1,200}\Z")


def new_id() -> str:
    """128 random bits as 32 hex characters."""
    return os.urandom(16).hex()


def request_id(caller_value: str | None) -> str:
    """The caller's `x-request-id` when it is 1-200 printable ASCII characters, otherwise a new id."""
    if caller_value is not None and _PRINTABLE_ID.match(caller_value):
        return caller_value
    return new_id()
