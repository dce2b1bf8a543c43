"""What the request reader and the response reader share: the bytes received, the checked transition, and the
reading of a body once its head has set the framing.

A Content-Length body is read here rather than by a BodyReader (`_remaining`, `_read`): it is the usual one, and
an object per message was a tenth of a reader's cost. Chunked and until-close bodies go through `_body`. Each
reader has its own state enum; this class is given the two states a body moves between as instance attributes
(a slot is as cheap to read as the module constant each reader used before), and its status hints as class
attributes (read on errors only).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar

from pep.http1.body import BodyReader
from pep.http1.errors import BodyTooLarge, LocalProtocolError, ProtocolError
from pep.http1.events import NEED_DATA, Data, EndOfMessage, Signal

S = TypeVar("S", bound=enum.Enum)


class MessageReader(Generic[S]):
    """The shared part of a reader whose state type is S: its subclass reads heads and sets `_remaining` (a
    Content-Length body's bytes still to come, 0 for none) or `_body` (with `_remaining` -1) before BODY."""

    __slots__ = ("_body", "_body_state", "_done_state", "_eof", "_max_body", "_read", "_remaining", "_state", "buf")

    _NEXT: ClassVar[Mapping[Any, frozenset[enum.Enum]]]  # the transitions `_move` allows, by state
    _TOO_LARGE_HINT: ClassVar[int]  # status hint of a Content-Length over max_body_bytes
    _CUT_SHORT_HINT: ClassVar[int]  # status hint of a connection closed inside a Content-Length body

    def __init__(self, state: S, body_state: S, done_state: S, max_body_bytes: int | None) -> None:
        self._state = state
        self._body_state = body_state
        self._done_state = done_state
        self._max_body = max_body_bytes
        self.buf = bytearray()  # received, not yet handed out: a transport reads its size (`len`), nothing more
        self._eof = False
        self._body: BodyReader | None = None  # a chunked or until-close body; None for the others
        self._remaining = -1  # a Content-Length body's bytes still to come; -1 for the others and between bodies
        self._read = 0  # body bytes handed out

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out (a transport stops reading above its own bound; on a hot path it
        takes `len(buf)` itself, a C call instead of a property's frame)."""
        return len(self.buf)

    def receive_eof(self) -> None:
        self._eof = True

    def _move(self, state: S) -> None:
        """A checked transition, for the rare ones (the usual ones are assigned where the state was just tested,
        each to a target the table allows, as the comment beside it says)."""
        if state not in self._NEXT[self._state]:
            raise LocalProtocolError(f"no transition from {self._state.name} to {state.name}")
        self._state = state

    def take_body(self) -> bytes | None:
        """The rest of the body at once, if it is framed by Content-Length (or absent) and all here: what the
        Data events and EndOfMessage (without trailers) would give, in the same state after. None otherwise, and
        nothing read: go on with `next_event` (which also raises what there is to raise)."""
        if self._state is not self._body_state:
            return None
        remaining = self._remaining
        if remaining < 0:
            return None
        data = b""
        if remaining:
            limit = self._max_body
            buf = self.buf
            if (limit is not None and remaining > limit - self._read) or len(buf) < remaining:
                return None
            if len(buf) == remaining:
                data = bytes(buf)
                buf.clear()
            else:
                data = bytes(buf[:remaining])
                del buf[:remaining]
            self._read += remaining
        self._remaining = -1
        self._state = self._done_state  # BODY -> DONE
        return data

    def _read_body(self) -> Data | EndOfMessage | Signal:
        remaining = self._remaining
        if remaining < 0:  # chunked or until close
            body = self._body
            assert body is not None
            event = body.read(self.buf, self._eof)
            if event is None:
                return NEED_DATA
            if type(event) is EndOfMessage:
                self._body = None
                self._state = self._done_state  # BODY -> DONE
            return event
        if not remaining:
            self._remaining = -1
            self._state = self._done_state  # BODY -> DONE
            return EndOfMessage([])
        limit = self._max_body
        if limit is not None and remaining > limit - self._read:  # known before any byte
            raise BodyTooLarge(f"Content-Length over {limit} bytes", self._TOO_LARGE_HINT)
        buf = self.buf
        size = len(buf)
        if not size:
            if self._eof:
                raise ProtocolError("the connection closed before the end of the body", self._CUT_SHORT_HINT)
            return NEED_DATA
        if size <= remaining:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:remaining])
            del buf[:remaining]
            size = remaining
        self._remaining = remaining - size
        self._read += size
        return Data(data)
