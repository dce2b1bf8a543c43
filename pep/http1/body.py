"""Body framing: chunked and until-close bodies, read from the front of a reader's buffer (a Content-Length
body, the usual one, is read by the readers themselves, without an object per message).

Each reader returns the next Data or EndOfMessage, or None when it needs more bytes; consumed bytes are deleted
from the buffer (`del buf[:n]` on a bytearray moves its start, it does not copy). Chunked bodies are read here,
not by llhttp: llhttp would also read on into the next pipelined message, and its position inside the bytes it
was given is not exposed, so the end of a chunked body would be unknown.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from typing import Final

from pep.http1.errors import BodyTooLarge, ProtocolError
from pep.http1.events import Data, EndOfMessage
from pep.http1.fields import parse_fields
from pep.http1.limits import Limits

_HEX: Final = b"0123456789abcdefABCDEF"
# Fields the readers act on in a head: in a trailer section they are refused, since a later reader that merged
# them into the head (RFC 9110 6.5.1 forbids it, some do) would frame or route the message differently.
_HEAD_ONLY: Final = frozenset({b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade", b"expect"})
_MAX_SIZE_DIGITS: Final = 16  # up to 2**64 - 1, llhttp's bound
# RFC 9112 7.1.1 chunk extensions after the size: `;name` or `;name=token` or `;name="quoted"`, whitespace
# around `;` and `=` (BWS). Checked although nobody reads them: they are where parsers have disagreed before.
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED: Final = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_EXTENSIONS: Final = re.compile(
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)


class BodyReader(ABC):
    """One body's framing; `limit` is the most body bytes the reader may hand out (None: no limit)."""

    __slots__ = ("_limit", "_read", "_server")

    def __init__(self, limit: int | None, server: bool) -> None:
        self._limit = limit
        self._read = 0
        self._server = server

    @abstractmethod
    def read(self, buf: bytearray, eof: bool) -> Data | EndOfMessage | None:
        """The next event of this body from the front of `buf`, or None until more bytes (or the end) come."""

    def _data(self, buf: bytearray, n: int) -> Data:
        """The next `n` bytes of the buffer, or as many as the limit still allows: the bytes within the limit are
        handed out whatever the reads, and BodyTooLarge comes once a byte past it has arrived."""
        if self._limit is not None and self._read + n > self._limit:
            n = self._limit - self._read
            if not n:
                raise BodyTooLarge(f"body over {self._limit} bytes", 413 if self._server else 502)
        self._read += n
        if n == len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        return Data(data)

    def _error(self, reason: str) -> ProtocolError:
        return ProtocolError(reason, 400 if self._server else 502)


class CloseBody(BodyReader):
    """A response body that ends when the server closes the connection."""

    __slots__ = ()

    def read(self, buf: bytearray, eof: bool) -> Data | EndOfMessage | None:
        if buf:
            return self._data(buf, len(buf))
        return EndOfMessage([]) if eof else None


class ChunkState(enum.Enum):
    SIZE = "size"  # expecting a chunk-size line
    DATA = "data"  # inside a chunk's data
    DATA_END = "data_end"  # expecting the CRLF after a chunk's data
    TRAILERS = "trailers"  # after the last chunk: trailer fields, then an empty line


_SIZE: Final = ChunkState.SIZE
_DATA: Final = ChunkState.DATA
_DATA_END: Final = ChunkState.DATA_END
_TRAILERS: Final = ChunkState.TRAILERS


class ChunkedBody(BodyReader):
    __slots__ = ("_limits", "_remaining", "_state")

    def __init__(self, limits: Limits, limit: int | None, server: bool) -> None:
        super().__init__(limit, server)
        self._limits = limits
        self._state = _SIZE
        self._remaining = 0

    def read(self, buf: bytearray, eof: bool) -> Data | EndOfMessage | None:
        while True:
            state = self._state
            if state is _DATA:
                if not buf:
                    break
                data = self._data(buf, min(self._remaining, len(buf)))
                self._remaining -= len(data.data)
                if not self._remaining:
                    self._state = _DATA_END
                return data
            if state is _SIZE:
                if not self._size_line(buf):
                    break
            elif state is _DATA_END:
                if (buf and buf[0] != 0x0D) or (len(buf) > 1 and buf[1] != 0x0A):
                    raise self._error("chunk data not followed by CRLF")
                if len(buf) < 2:
                    break
                del buf[:2]
                self._state = _SIZE
            else:
                return self._trailers(buf, eof)
        if eof:
            raise self._error("the connection closed inside a chunked body")
        return None

    def _size_line(self, buf: bytearray) -> bool:
        limit = self._limits.max_chunk_line_bytes
        lf = buf.find(b"\n", 0, limit + 2)
        if lf < 0:
            if len(buf) > limit + 1:
                raise self._error(f"chunk-size line over {limit} bytes")
            return False
        if lf == 0 or buf[lf - 1] != 0x0D:
            raise self._error("a chunk-size line ends in LF without CR")
        line = bytes(buf[: lf - 1])
        del buf[: lf + 1]
        size, semicolon, extensions = line.partition(b";")
        # No whitespace between the size and `;` (BWS allows it; h11 and llhttp refuse it, so this does too).
        if not size or len(size) > _MAX_SIZE_DIGITS or size.translate(None, _HEX):
            raise self._error("malformed chunk size")
        if semicolon and not _EXTENSIONS.fullmatch(semicolon + extensions):
            raise self._error("malformed chunk extension")
        self._remaining = int(size, 16)
        self._state = _DATA if self._remaining else _TRAILERS
        return True

    def _trailers(self, buf: bytearray, eof: bool) -> EndOfMessage | None:
        if buf[:2] == b"\r\n":
            del buf[:2]
            return EndOfMessage([])
        limit = self._limits.max_head_bytes
        end = buf.find(b"\r\n\r\n", 0, limit)
        if end < 0:  # checked once whole, so that the error does not depend on the reads
            if len(buf) >= limit:
                raise self._error(f"trailer section over {limit} bytes")
            if eof:
                raise self._error("the connection closed inside the trailer section")
            return None
        try:
            trailers = parse_fields(bytes(buf[:end]), self._limits, "trailer")
        except ProtocolError as exc:
            raise self._error(exc.reason) from None
        for name, _ in trailers:
            if name.lower() in _HEAD_ONLY:
                raise self._error(f"{name.decode()} in the trailer section")
        del buf[: end + 4]
        return EndOfMessage(trailers)
