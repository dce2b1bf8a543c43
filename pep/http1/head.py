"""Finding one message head in a buffer, and having llhttp check it as its bytes arrive.

The end of a head is found here (`find` of CRLF CRLF, resumed where the last search stopped), and llhttp
(httptools) is fed only the bytes up to it: never a body, never the next message. That keeps llhttp to what it
is good at, checking the syntax of a head in C, while framing, pipelining and what may follow a head stay
decided by the readers, where llhttp's own choices would be wrong for the PEP: it reads an Upgrade request's
body as the upgraded protocol, cannot be told a response answers HEAD, and parses every pipelined message it is
given at once.

llhttp calls no Python code: it only checks. Once it has accepted a whole head, its field lines are split
(`SPLIT_LINES`, in C when compiled) and handed to a FieldSink, whose reader subclass notes the fields it acts on.

The first line is checked by the reader (`check_line`) before llhttp sees any of it, so that a version or
method error is classified from the whole line, whatever the reads; after that, every error is raised at the
byte that causes it, so the outcome does not depend on how the bytes were cut into reads.

A head that is whole in the buffer at the first look (nearly every one) is read in `scan` itself: the same
steps as `_partial` in the same order, with no state kept between reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import httptools

from pep.http1.errors import ProtocolError
from pep.http1.events import Fields
from pep.http1.fields import BOUNDS, SPLIT_LINES, check_line_sizes
from pep.http1.limits import Limits

Parser = httptools.HttpRequestParser | httptools.HttpResponseParser
T = TypeVar("T")


class FieldSink:
    """The fields of one head (names as sent, values without the whitespace around them), handed over by `note`
    once llhttp has accepted the head. A reader subclasses it to note the fields it acts on in the same pass.

    It is also llhttp's protocol object, with every callback None: httptools looks each one up when a parser is
    made (a missing attribute costs an AttributeError apiece), and with `on_header` None, llhttp calls into
    Python once per field no more."""

    __slots__ = ("fields", "wanted")

    on_header = None
    on_message_begin = None
    on_url = None
    on_status = None
    on_headers_complete = None
    on_body = None
    on_message_complete = None
    on_chunk_header = None
    on_chunk_complete = None

    def __init__(self, wanted: tuple[bytes, ...] = ()) -> None:
        self.fields: Fields = []
        self.wanted = wanted  # the names (lower case) of the fields the reader acts on

    def note(self, fields: Fields, picked: Fields) -> None:
        """The head's fields, once llhttp has accepted all of it, and those named in `wanted` (lower case), as
        (that name, value)."""
        self.fields = fields


class HeadScanner(Generic[T]):
    """The head at the start of a buffer: None until it is complete, then what `check_line` made of its first
    line, the head deleted from the buffer and its fields in `sink` (checked: at most `max_field_bytes` per line).
    """

    __slots__ = (
        "_check_line",
        "_fed",
        "_last",
        "_limits",
        "_line",
        "_line_end",
        "_new_parser",
        "_parser",
        "_searched",
        "_server",
        "_spare",
        "sink",
    )

    def __init__(
        self,
        limits: Limits,
        new_parser: type[Parser],
        check_line: Callable[[bytes], T],
        server: bool,
        sink: FieldSink,
    ) -> None:
        self._limits = limits
        self._new_parser = new_parser
        self._check_line = check_line
        self._server = server  # status hints: what a server answers (400, 414, 431, 501), or 502 on a client
        self.sink = sink
        self._parser: Parser | None = None
        self._line: T | None = None
        self._line_end = -1  # the end of the first line, after its CRLF, once found
        self._fed = 0  # bytes of the head llhttp has seen
        self._searched = 0  # where to resume looking for CRLF CRLF
        self._last: Parser | None = None  # the parser of the last whole head, until the next scan
        self._spare: Parser | None = None  # a parser back at the start of a message (`recycle`)

    def scan(self, buf: bytearray) -> T | None:
        """The usual case, a whole head in the buffer at the first look, is read here: what `_partial` would do
        with it, in the same order (so the same error for the same bytes), without keeping any state between
        reads. The sink is empty here: its reader takes (and clears) what it noted with each head."""
        limits = self._limits
        if self._line_end >= 0:
            return self._partial(buf)
        max_line = limits.max_line_bytes
        found = BOUNDS(buf, limits.max_head_bytes, max_line)
        if found is None:
            return self._partial(buf)
        end, lf = found
        if lf < 0:  # the first LF is further (the head's own end is in the buffer: more than max_line bytes)
            raise ProtocolError(f"first line over {max_line} bytes", self._status(414))
        if lf == 0 or buf[lf - 1] != 0x0D:
            raise ProtocolError("a line ends in LF without CR", self._status(400))
        line = self._check_line(bytes(buf[: lf - 1]))
        parser = self._spare
        if parser is None:
            parser = self._new_parser(self.sink)
        else:
            self._spare = None
        self._last = None
        try:
            parser.feed_data(buf[: end + 4])
        except httptools.HttpParserUpgrade:
            pass  # CONNECT or Upgrade: only ever at the end of the head, which is all llhttp is given
        except httptools.HttpParserInvalidMethodError as exc:
            raise ProtocolError(f"method not implemented: {exc}", self._status(501)) from None
        except httptools.HttpParserError as http_parser_error:
            raise ProtocolError(f"malformed head: {http_parser_error}", self._status(400)) from None
        else:
            self._last = parser
        if end - lf - 1 > limits.max_field_bytes:  # only a block longer than the bound can hold a longer line
            self._check_line_sizes(bytes(buf[lf + 1 : end]))
        fields, picked = SPLIT_LINES(buf, lf + 1, end, self.sink.wanted)
        self.sink.note(fields, picked)
        del buf[: end + 4]
        return line

    def recycle(self) -> None:
        """The last head was a whole message (no body follows it) that keeps the connection: its parser, which
        llhttp has brought back to the start of a message, checks the next head (a parser is a third of the
        cost of checking a short head). Only when llhttp also expects another message."""
        parser = self._last
        self._last = None
        if parser is not None and parser.should_keep_alive():
            self._spare = parser

    def _partial(self, buf: bytearray) -> T | None:
        self._spare = self._last = None
        limits = self._limits
        line_end = self._line_end
        if line_end < 0:
            lf = buf.find(b"\n", 0, limits.max_line_bytes + 2)
            if lf < 0:
                if len(buf) > limits.max_line_bytes + 1:
                    raise ProtocolError(f"first line over {limits.max_line_bytes} bytes", self._status(414))
                return None
            if lf == 0 or buf[lf - 1] != 0x0D:
                raise ProtocolError("a line ends in LF without CR", self._status(400))
            self._line = self._check_line(bytes(buf[: lf - 1]))
            self._line_end = self._searched = line_end = lf + 1
            self._parser = self._new_parser(self.sink)
            self._fed = 0
        # A head without fields ends right after its first line's CRLF: search from there.
        end = buf.find(b"\r\n\r\n", max(line_end - 2, self._searched - 3), limits.max_head_bytes)
        upto = end + 4 if end >= 0 else min(len(buf), limits.max_head_bytes)
        if upto > self._fed:
            parser = self._parser
            assert parser is not None
            try:
                parser.feed_data(buf[self._fed : upto])
            except httptools.HttpParserUpgrade:
                pass  # as in scan
            except httptools.HttpParserInvalidMethodError as exc:
                raise ProtocolError(f"method not implemented: {exc}", self._status(501)) from None
            except httptools.HttpParserError as http_parser_error:
                raise ProtocolError(f"malformed head: {http_parser_error}", self._status(400)) from None
            self._fed = upto
        if end < 0:
            if len(buf) >= limits.max_head_bytes:
                raise ProtocolError(f"head over {limits.max_head_bytes} bytes", self._status(431))
            self._searched = len(buf)
            return None
        line = self._line
        assert line is not None
        if end - line_end > limits.max_field_bytes:
            self._check_line_sizes(bytes(buf[line_end:end]))
        fields, picked = SPLIT_LINES(buf, line_end, end, self.sink.wanted)
        self.sink.note(fields, picked)
        del buf[: end + 4]
        self._parser = self._line = None
        self._line_end = -1
        return line

    def _check_line_sizes(self, block: bytes) -> None:
        """No field line over `max_field_bytes` (its own status: 431 from a server's reader, else 502)."""
        check_line_sizes(block, self._limits, self._status(431))

    def _status(self, server_status: int) -> int:
        return server_status if self._server else 502
