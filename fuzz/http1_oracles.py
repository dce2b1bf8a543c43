"""What must hold for any bytes given to the sans-IO HTTP/1.1 core (pep/http1): checked by the atheris harness
fuzz/fuzz_http1_core.py and the hypothesis properties tests/unit/test_fuzz_http1_core.py.

- Nothing but a ProtocolError leaves a reader (a LocalProtocolError there is the reader's own bug), and every
  error carries a status hint a server (400, 413, 414, 431, 501, 505) or a client (502) would use.
- The outcome does not depend on how the bytes were cut into reads: the same events, the same error.
- Every message a reader hands out, h11 (an independent parser, pure Python) reads the same way from the same
  bytes: the same request line or status, the same fields, body and trailer fields, and the same end, so that no
  byte can be a body to one of them and a message to the other. A head is compared as soon as it is handed out,
  a body as far as it was read. The core refuses more than h11 (the PEP's stricter rules); the converse is a bug.
  Where the core is knowingly more lenient than h11, the bytes are adjusted before h11 reads them: the empty
  lines RFC 9112 2.2 lets a server skip before a request line.
- A body limit is reported only for a body that h11 also reads as longer than the limit.

No atheris here: the unit suite imports this module from the project's main virtualenv.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from fuzz.oracles import require
from pep.http1 import (
    NEED_DATA,
    PAUSED,
    BodyTooLarge,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Fields,
    InformationalResponse,
    Limits,
    ProtocolError,
    Request,
    RequestReader,
    Response,
    ResponseReader,
)

Norm = tuple[tuple[bytes, bytes], ...]
SERVER_STATUSES = frozenset({400, 413, 414, 431, 501, 505})
H11_BUFFER = 1 << 20  # h11 refuses heads over 16 KiB by default; the core's own limits are what is tested here


def norm(fields: Fields | Sequence[tuple[bytes, bytes]]) -> Norm:
    """Names lower-cased; Transfer-Encoding's value too (h11 does, and its one accepted value is case-blind)."""
    out = [(bytes(name).lower(), bytes(value)) for name, value in fields]
    return tuple((name, value.lower() if name == b"transfer-encoding" else value) for name, value in out)


@dataclass(frozen=True, slots=True)
class Message:
    """One message as a reader handed it out. `head`: (method, target, version) of a request, or (status,
    version) of a response; `fields` with lower-cased names."""

    head: tuple[object, ...]
    fields: Norm
    body: bytes
    trailers: Norm
    complete: bool
    keep_alive: bool | None = None


@dataclass(frozen=True, slots=True)
class Reading:
    """Everything a reader handed out for some bytes, and how it stopped: `end` is "need_data", "paused" (a
    response read to its end), "must_close" (a request that was the connection's last), "closed" (the peer
    closed between messages), "switched" (a tunnel) or "error" (then `error` is (type, status hint, reason))."""

    interim: tuple[tuple[int, Norm], ...]
    messages: tuple[Message, ...]
    end: str
    error: tuple[str, int, str] | None = None
    tunnel: bytes = b""  # after a switch: the bytes that followed the head


class _Collector:
    def __init__(self) -> None:
        self.interim: list[tuple[int, Norm]] = []
        self.messages: list[Message] = []
        self.head: tuple[object, ...] | None = None
        self.fields: Norm = ()
        self.keep_alive: bool | None = None
        self.body: list[bytes] = []

    def start(self, head: tuple[object, ...], fields: Fields, keep_alive: bool) -> None:
        self.head, self.fields, self.keep_alive, self.body = head, norm(fields), keep_alive, []

    def end(self, trailers: Norm, complete: bool) -> None:
        if self.head is not None:
            body = b"".join(self.body)
            self.messages.append(Message(self.head, self.fields, body, trailers, complete, self.keep_alive))
        self.head = None

    def reading(self, end: str, error: ProtocolError | None = None, tunnel: bytes = b"") -> Reading:
        self.end((), False)  # a message still being read
        summary = None if error is None else (type(error).__name__, error.status_hint, error.reason)
        return Reading(tuple(self.interim), tuple(self.messages), end, summary, tunnel)


def read_requests(
    chunks: Sequence[bytes],
    eof: bool,
    limits: Limits | None = None,
    max_body: int | None = None,
    take: bool = False,
) -> Reading:
    """Requests as the listener would read them: each answered at once (start_next) until one is the last.
    `take`: each body is taken whole when `take_body` can, as a transport does (the reading must not change)."""
    reader = RequestReader(limits or Limits(), max_body)
    out = _Collector()

    def drain() -> str | None:
        while True:
            if take and (body := reader.take_body()) is not None:
                out.body.append(body)
                out.end((), True)
                continue
            event = reader.next_event()
            if event is NEED_DATA:
                return None
            if event is PAUSED:
                if not reader.start_next():
                    return "must_close"
            elif isinstance(event, Request):
                out.start((event.method, event.target, event.version), event.headers, event.keep_alive)
            elif isinstance(event, Data):
                out.body.append(event.data)
            elif isinstance(event, EndOfMessage):
                out.end(norm(event.trailers), True)
            elif isinstance(event, ConnectionClosed):
                return "closed"

    try:
        for chunk in chunks:
            reader.receive_data(chunk)
            if end := drain():
                return out.reading(end)
        if eof:
            reader.receive_eof()
            if end := drain():
                return out.reading(end)
    except ProtocolError as exc:
        return out.reading("error", exc)
    return out.reading("need_data")


def read_response(
    chunks: Sequence[bytes],
    eof: bool,
    method: bytes,
    limits: Limits | None = None,
    max_body: int | None = None,
    take: bool = False,
) -> Reading:
    """The answer to one request with `method`, as the PDP or upstream client would read it. `take`: the body is
    taken whole when `take_body` can, as the pool does (the reading must not change)."""
    reader = ResponseReader(limits or Limits(), max_body)
    reader.start(method)
    out = _Collector()

    def drain() -> str | None:
        while True:
            if take and (body := reader.take_body()) is not None:
                out.body.append(body)
                out.end((), True)
                continue
            event = reader.next_event()
            if event is NEED_DATA:
                return None
            if event is PAUSED:
                return "switched" if out.head is not None else None
            if isinstance(event, InformationalResponse):
                out.interim.append((event.status, norm(event.headers)))
            elif isinstance(event, Response):
                out.start((event.status, event.version), event.headers, event.keep_alive)
            elif isinstance(event, Data):
                out.body.append(event.data)
            elif isinstance(event, EndOfMessage):
                out.end(norm(event.trailers), True)
            elif isinstance(event, ConnectionClosed):
                return "closed"

    try:
        for i, chunk in enumerate(chunks):
            reader.receive_data(chunk)
            if drain() == "switched":
                return out.reading("switched", tunnel=reader.trailing_data() + b"".join(chunks[i + 1 :]))
        if eof:
            reader.receive_eof()
            if end := drain():
                return out.reading(end)
    except ProtocolError as exc:
        return out.reading("error", exc)
    return out.reading("paused" if out.messages and out.messages[-1].complete else "need_data")


def cut(data: bytes, reads: int) -> list[bytes]:
    """The bytes in `reads` reads of about equal size."""
    step = max(1, -(-len(data) // max(1, reads)))
    return [data[i : i + step] for i in range(0, len(data), step)] or [b""]


def splits(data: bytes) -> list[list[bytes]]:
    """Every way of cutting the bytes into two reads, and one byte per read."""
    return [[data[:i], data[i:]] for i in range(1, len(data))] + [[data[i : i + 1] for i in range(len(data))]]


# --- h11's reading of the same bytes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class H11Message:
    head: tuple[object, ...]
    fields: Norm
    body: bytes
    trailers: Norm
    complete: bool
    keep_alive: bool | None  # after a complete HTTP/1.1 message: whether h11 would read another
    trailing: bytes = b""  # the bytes after a complete message


def _h11_message(conn: object) -> tuple[list[tuple[int, Norm]], H11Message | None, str | None]:
    import h11

    assert isinstance(conn, h11.Connection)
    interim: list[tuple[int, Norm]] = []
    head: tuple[object, ...] | None = None
    fields: Norm = ()
    body: list[bytes] = []
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.InformationalResponse):
                interim.append((event.status_code, norm(event.headers)))
            elif isinstance(event, h11.Request):
                head, fields = (
                    (bytes(event.method), bytes(event.target), bytes(event.http_version)),
                    norm(event.headers),
                )
            elif isinstance(event, h11.Response):
                head, fields = (event.status_code, bytes(event.http_version)), norm(event.headers)
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                state = conn.their_state
                keep_alive = None if state not in (h11.DONE, h11.MUST_CLOSE) else state is h11.DONE
                trailing = conn.trailing_data[0]
                trailers = norm(event.headers)
                return interim, H11Message(head, fields, b"".join(body), trailers, True, keep_alive, trailing), None
            else:  # NEED_DATA, PAUSED (a switch), ConnectionClosed
                message = None if head is None else H11Message(head, fields, b"".join(body), (), False, None)
                return interim, message, None
    except h11.RemoteProtocolError as exc:
        message = None if head is None else H11Message(head, fields, b"".join(body), (), False, None)
        return interim, message, str(exc) or "error"


def h11_requests(data: bytes, eof: bool, count: int) -> list[H11Message | str]:
    """The first `count` requests h11 reads from the bytes, each on a fresh connection from where the one before
    ended (so that h11's own keep-alive rules do not stop it), or the error h11 stops at."""
    import h11

    found: list[H11Message | str] = []
    rest = data
    while len(found) < count:
        while rest[:2] == b"\r\n":  # RFC 9112 2.2, which the core follows and h11 does not
            rest = rest[2:]
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=H11_BUFFER)
        conn.receive_data(rest)
        if eof:
            conn.receive_data(b"")
        _, message, error = _h11_message(conn)
        if message is not None:
            found.append(message)
        if error is not None:
            found.append(error)
        if message is None or not message.complete:
            break
        rest = message.trailing
    return found


def h11_response(data: bytes, eof: bool, method: bytes) -> tuple[list[tuple[int, Norm]], H11Message | None, str | None]:
    import h11

    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=H11_BUFFER)
    target = b"h:1" if method == b"CONNECT" else b"/"
    conn.send(h11.Request(method=method, target=target, headers=[(b"Host", b"h")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    return _h11_message(conn)


# --- the checks ------------------------------------------------------------------------------------------------


def _same_body(ours: Message, theirs: H11Message, data: bytes) -> None:
    if ours.complete:
        require(theirs.complete, "a message the core completes, h11 completes", data, ours, theirs)
        require(ours.body == theirs.body, "the same body", data, ours.body, theirs.body)
        require(ours.trailers == theirs.trailers, "the same trailer fields", data, ours.trailers, theirs.trailers)
    else:
        require(theirs.body.startswith(ours.body), "a partial body is a prefix of h11's", data, ours, theirs)


def _longer_than(theirs: H11Message, max_body: int) -> bool:
    """Whether h11 read (or the message announced) a body longer than `max_body`."""
    length = next((int(value) for name, value in theirs.fields if name == b"content-length"), 0)
    return len(theirs.body) > max_body or length > max_body


def _check_bodies(data: bytes, reading: Reading, theirs: Sequence[H11Message], max_body: int | None) -> None:
    """Each body as h11 reads it; a BodyTooLarge only for the body being read, and only when h11 reads (or the
    head announces) it longer than the limit; never a body byte past the limit."""
    too_large = reading.error is not None and reading.error[0] == BodyTooLarge.__name__
    for i, (ours, message) in enumerate(zip(reading.messages, theirs, strict=True)):
        require(max_body is None or len(ours.body) <= max_body, "no body byte past the limit", data, ours)
        if too_large and i == len(reading.messages) - 1:
            require(not ours.complete, "BodyTooLarge for the body being read", data, reading)
            require(max_body is not None, "BodyTooLarge only with a limit", data, reading)
            assert max_body is not None
            require(_longer_than(message, max_body), "BodyTooLarge only for a longer body", data, message)
        else:
            _same_body(ours, message, data)


def check_same_for_any_cut(whole: Reading, other: Reading, data: bytes, chunks: Sequence[bytes]) -> None:
    require(whole == other, "the same reading however the bytes are cut", data, [len(c) for c in chunks], whole, other)


def check_requests(data: bytes, eof: bool, reading: Reading, max_body: int | None = None) -> None:
    if reading.error is not None:
        require(reading.error[1] in SERVER_STATUSES, "a server status hint", data, reading.error)
        require(bool(reading.error[2]), "a reason", data, reading.error)
    found = h11_requests(data, eof, len(reading.messages))
    theirs: list[H11Message] = []
    for ours, message in itertools.zip_longest(reading.messages, found[: len(reading.messages)]):
        require(isinstance(message, H11Message), "h11 reads every request the core hands out", data, ours, found)
        assert isinstance(message, H11Message)
        require(ours.head == message.head, "the same request line", data, ours.head, message.head)
        require(ours.fields == message.fields, "the same fields", data, ours.fields, message.fields)
        upgrade = any(name == b"upgrade" for name, _ in ours.fields)
        if ours.complete and ours.head[2] == b"1.1" and message.keep_alive is not None and not upgrade:
            require(ours.keep_alive == message.keep_alive, "the same keep-alive", data, ours, message)
        theirs.append(message)
    _check_bodies(data, reading, theirs, max_body)


def check_response(data: bytes, eof: bool, method: bytes, reading: Reading, max_body: int | None = None) -> None:
    if reading.error is not None:
        require(reading.error[1] == 502, "a client's status hint is 502", data, reading.error)
        require(bool(reading.error[2]), "a reason", data, reading.error)
    interim, theirs, error = h11_response(data, eof, method)
    require(len(reading.messages) <= 1, "one answer per request", data, reading)
    require(list(reading.interim) == interim[: len(reading.interim)], "the 1xx answers h11 reads", data, interim)
    if not reading.messages:
        return
    (ours,) = reading.messages
    require(theirs is not None, "h11 reads the answer the core hands out", data, ours, error)
    assert theirs is not None
    require(list(reading.interim) == interim, "the same 1xx answers", data, reading.interim, interim)
    require(ours.head == theirs.head, "the same status line", data, ours.head, theirs.head)
    require(ours.fields == theirs.fields, "the same fields", data, ours.fields, theirs.fields)
    _check_bodies(data, reading, [theirs], max_body)
    if ours.complete:
        after = reading.error is not None and reading.error[2] == "bytes after the answer"
        require(after == bool(theirs.trailing), "bytes after the answer are an error", data, reading, theirs)
