"""What goes wrong, as types: the peer broke HTTP/1.1 (the connection is done), or this side misused a reader.

Errors carry a status hint and a reason string, so a transport answers and logs them without matching messages.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something HTTP/1.1 (or a rule of this core) does not allow: the connection cannot be trusted
    with another message. `status_hint` is the answer a server owes the peer (400, 414, 431, 501, 505); a client
    reading a response gets 502, for the answer the PEP itself then gives."""

    def __init__(self, reason: str, status_hint: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_hint = status_hint


class BodyTooLarge(ProtocolError):
    """A body is longer than the reader was told to accept: reported as soon as it is known, never read on."""


class LocalProtocolError(Exception):
    """This side asked for something its state or HTTP/1.1 does not allow (a bug in the caller, not the peer)."""
