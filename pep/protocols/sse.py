"""Server-Sent Events, read without IO: bytes in, events out, fields parsed as the WHATWG EventSource algorithm.

One reader for every answer the PEP decides event by event (MCP streams, model answer streams), so an event a
client would act on is never missed by one path and seen by another:
- lines end in CRLF, LF or a lone CR (a CR at a chunk's end waits for the next chunk's LF); one leading
  byte-order mark is skipped;
- a blank line ends an event; a line starting with `:` is a comment; `field: value` loses one space after the
  colon; a line without a colon is a field with an empty value; `data` lines are joined with LF; an `id` holding
  NUL is ignored; `retry` counts only when it is all ASCII digits; other fields are ignored;
- every event is returned, also one without data (a priming event carries only an `id`, and the MCP SDKs read
  it; one of comments only is relayed as it came), where the WHATWG algorithm dispatches only events with data:
  the PEP sees every event some client acts on;
- the stream must be UTF-8 (the only encoding the SDKs and browsers read it in when no charset says otherwise):
  a line that is not valid UTF-8 is an error, since a client would decode it into something else.

`finish()` returns the last event when the stream ends without a blank line (some clients act on it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

MAX_EVENT: Final = 8 * 1048576  # the largest single event read; a larger one cannot be decided
_LINE_END: Final = re.compile(rb"[\r\n]")
_BOM: Final = b"\xef\xbb\xbf"


class SseError(ValueError):
    """The stream cannot be read; `before` holds the events read whole before the problem (they may be relayed)."""

    def __init__(self, message: str, before: list[SseEvent] | None = None) -> None:
        super().__init__(message)
        self.before = before or []


@dataclass(frozen=True, slots=True)
class SseEvent:
    lines: tuple[bytes, ...]  # the event's lines as received, without line ends (comments included)
    data: bytes | None  # the `data` lines joined with LF; None when the event has no `data` line
    event: str  # the event type: `message` unless an `event` field names another
    id: str | None  # the `id` field, when the event has a valid one
    retry: int | None

    @property
    def raw(self) -> bytes:
        """The event as relayed: its lines joined with LF, ending in a blank line."""
        return b"\n".join(self.lines) + b"\n\n"


def encode(
    data: bytes | None, *, event: str | None = None, event_id: str | None = None, others: tuple[bytes, ...] = ()
) -> bytes:
    """One event: `others` (lines kept as received, e.g. comments and `retry`), then `event`, `id` and the data
    (one `data` line per line of it)."""
    lines = list(others)
    if event is not None:
        lines.append(b"event: " + event.encode())
    if event_id is not None:
        lines.append(b"id: " + event_id.encode())
    if data is not None:
        lines += [b"data: " + line for line in data.split(b"\n")]
    return b"\n".join(lines) + b"\n\n"


def field(line: bytes) -> tuple[bytes, bytes]:
    """(name, value) of a field line; a comment has the name b""."""
    if line.startswith(b":"):
        return b"", line[1:]
    name, colon, value = line.partition(b":")
    if not colon:
        return line, b""
    return name, value[1:] if value.startswith(b" ") else value


class SseReader:
    """Splits a stream into events: `feed` each chunk as it arrives, then `finish` at the end of the stream."""

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self._max_event = max_event
        self._line = bytearray()
        self._lines: list[bytes] = []
        self._size = 0
        self._skip_lf = False
        self._started = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if not self._started:
            if len(self._line) + len(chunk) < len(_BOM) and _BOM.startswith(bytes(self._line) + chunk):
                self._line += chunk  # maybe the start of a byte-order mark: wait for more
                return []
            chunk = (bytes(self._line) + chunk).removeprefix(_BOM)
            self._line.clear()
            self._started = True
        events: list[SseEvent] = []
        start = 0
        for end in _LINE_END.finditer(chunk):
            at = end.start()
            byte = chunk[at]
            if self._skip_lf and at == start and byte == 10:
                self._skip_lf = False
                start = at + 1
                continue
            self._line += chunk[start:at]
            self._skip_lf = byte == 13
            start = at + 1
            try:
                event = self._end_line()
            except SseError as exc:
                raise SseError(str(exc), events) from None
            if event is not None:
                events.append(event)
        if start < len(chunk):
            self._skip_lf = False
            self._line += chunk[start:]
        if self._size + len(self._line) > self._max_event:
            raise SseError("an event larger than the inspector reads", events)
        return events

    def finish(self) -> list[SseEvent]:
        if self._line:
            self._add(bytes(self._line))
            self._line.clear()
        if not self._lines:
            return []
        return [self._event()]

    def _add(self, line: bytes) -> None:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise SseError("a stream line that is not valid UTF-8") from None
        self._lines.append(line)
        self._size += len(line) + 1

    def _end_line(self) -> SseEvent | None:
        line = bytes(self._line)
        self._line.clear()
        if line:
            self._add(line)
            return None
        if not self._lines:
            return None  # blank lines between events
        return self._event()

    def _event(self) -> SseEvent:
        lines = tuple(self._lines)
        self._lines = []
        self._size = 0
        data: list[bytes] = []
        kind = b""
        event_id: bytes | None = None
        retry: int | None = None
        for line in lines:
            name, value = field(line)
            if name == b"data":
                data.append(value)
            elif name == b"event":
                kind = value
            elif name == b"id" and b"\0" not in value:
                event_id = value
            elif name == b"retry" and value.isdigit():
                retry = int(value)
        return SseEvent(
            lines,
            b"\n".join(data) if data else None,
            kind.decode() or "message",
            event_id.decode() if event_id is not None else None,
            retry,
        )
