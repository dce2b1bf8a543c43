"""Attacks on the transport from a raw socket: what one caller can make the listener hold, and for how long;
and, against a running PEP, that the upstream reads only decided requests and no caller reads another's answer.

A client that pipelines requests and never reads the answers, one that stops reading the last answer of a
connection, and one that stops reading a streamed answer: each is held to the listener's high-water marks and
cut off at a deadline, so that it cannot take the memory, the connections or the upstream connections of the
others. Sizes are asserted, never times (a deadline is only shrunk so that the test ends soon).
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pep.transport import ClientGone, Exchange, Listener, ListenerOptions, serve
from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.policy_pdp import PolicyPdp
from tests.support.raw_client import RawClient
from tests.support.raw_upstream import Action, RawUpstream, Seen, ok

HIGH = ListenerOptions().read_high_water
WRITE_HIGH = ListenerOptions().write_high_water
ONE_READ = 262144  # the most a transport reads at once (uvloop and asyncio alike)
ANSWER = b"a" * 4096
GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
PATIENCE_S = 5.0  # the longest a connection may take to be cut off once its deadline (shrunk) has passed


def deaf_socket(port: int) -> socket.socket:
    """A client that reads nothing: a small receive buffer, so that its answers pile up on the listener's side."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def flood(sock: socket.socket, data: bytes) -> int:
    """Send `data` again and again until the listener stops taking it (nothing sent for 0.3 s); bytes sent."""
    sent = stalled = 0
    while sent < 1 << 30:
        try:
            sent += sock.send(data[sent % len(data) :])
            stalled = 0
        except BlockingIOError:
            stalled += 1
            if stalled > 30:
                return sent
            await asyncio.sleep(0.01)
    raise AssertionError("the listener took a GiB of requests from a client that reads nothing")


async def gone(listener: Listener) -> bool:
    """Whether the listener's one connection, once there, closes within PATIENCE_S."""
    seen = False
    for _ in range(int(PATIENCE_S / 0.05)):
        seen = seen or bool(listener.connections)
        if seen and not listener.connections:
            return True
        await asyncio.sleep(0.05)
    return False


async def answer_small(exchange: Exchange) -> None:
    exchange.response.send(200, [], ANSWER)


async def test_a_client_that_pipelines_and_never_reads_is_held_to_the_high_water_marks(
    listeners: list[Listener],
) -> None:
    """Each answer is ~150 times its request: without a bound on what waits to be sent, a few KiB of requests
    would make the listener hold MiB of answers (and read on into its buffer after each one)."""
    listener = await serve("127.0.0.1", 0, answer_small)
    listeners.append(listener)
    sock = deaf_socket(listener.address[1])
    try:
        sent = await flood(sock, GET * 1000)
        (conn,) = listener.connections
        assert conn.transport is not None
        assert conn.reader.buffered <= HIGH + ONE_READ
        assert conn.transport.get_write_buffer_size() <= WRITE_HIGH + len(ANSWER) + 200
        # The client reads at last: its requests are answered, in order (the first thousand are read).
        assert sent > 1000 * len(GET)
        one = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
        expected = 1000 * len(one)
        received = bytearray()
        loop = asyncio.get_running_loop()
        while len(received) < expected:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), PATIENCE_S)
            assert data, f"closed after {len(received)} of {expected} bytes"
            received += data
        assert received[:expected] == one * 1000
    finally:
        sock.close()


async def test_a_client_that_stops_reading_is_cut_off_at_the_idle_deadline(listeners: list[Listener]) -> None:
    """Answers it has not taken are dropped: a close would wait for them for as long as it reads nothing."""
    listener = await serve("127.0.0.1", 0, answer_small, options=ListenerOptions(idle_s=0.2, linger_s=0.2))
    listeners.append(listener)
    sock = deaf_socket(listener.address[1])
    try:
        await flood(sock, GET * 1000)
        assert await gone(listener)
    finally:
        sock.close()


async def test_a_client_that_does_not_read_its_last_answer_is_cut_off_after_the_linger(
    listeners: list[Listener],
) -> None:
    async def answer_large(exchange: Exchange) -> None:
        exchange.response.send(200, [], b"l" * (16 << 20))

    listener = await serve("127.0.0.1", 0, answer_large, options=ListenerOptions(linger_s=0.2))
    listeners.append(listener)
    sock = deaf_socket(listener.address[1])
    try:
        sock.send(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert await gone(listener)
    finally:
        sock.close()


async def test_a_client_that_stops_reading_a_stream_ends_its_handler(listeners: list[Listener]) -> None:
    """The handler's write fails after `send_s` (the upstream answer it relays is then closed), instead of
    waiting for ever with the upstream connection it holds."""
    ended: list[BaseException] = []

    async def stream(exchange: Exchange) -> None:
        exchange.response.start(200, [])
        try:
            while True:
                await exchange.response.write(b"s" * 65536)
                await asyncio.sleep(0)  # as a relay waits for the upstream between writes
        except ClientGone as exc:
            ended.append(exc)

    listener = await serve("127.0.0.1", 0, stream, options=ListenerOptions(send_s=0.2))
    listeners.append(listener)
    sock = deaf_socket(listener.address[1])
    try:
        sock.send(GET)
        assert await gone(listener)
        assert len(ended) == 1
    finally:
        sock.close()


# --- the PEP: nothing reaches the upstream undecided, and no caller reads another's answer -------------------------
#
# Each case writes raw bytes to a running PEP (in process, on uvloop as `pep run`), whose PDP allows every path but
# those with `/deny` in them, in front of an upstream that records what it reads (h11, an independent reader) and
# answers as the case's target says: the requests it sees, and the answers the caller gets, must be exactly the
# decided ones.

SMUGGLED = b"GET /tools/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
SECRET = b"SMUGGLED"
# An answer the upstream sends where none was asked for: if a later caller ever read it, answers were desynced.
STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(SECRET), SECRET)
OCTETS = b"Content-Type: application/octet-stream\r\n"


class PathPdp(PolicyPdp):
    def decide(self, doc: dict[str, Any]) -> Any:
        return "/deny" not in doc["request"]["path"]


def misbehave(seen: Seen) -> Action:
    """The upstream's answer: by the target, a well-formed one, or one with bytes nobody asked for after it."""
    target = seen.target
    if target == b"/tools/two-answers":
        return Action(ok(b"first").data + STRAY)
    if target == b"/tools/head-body":  # a HEAD answered with a body
        return Action(STRAY)
    if target == b"/tools/no-content-body":
        return Action(b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n%s" % (len(SECRET), SECRET))
    if target == b"/tools/not-modified-body":
        return Action(b"HTTP/1.1 304 Not Modified\r\nContent-Length: %d\r\n\r\n%s" % (len(SECRET), SECRET))
    if target == b"/tools/switch":
        return Action(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + STRAY)
    if target == b"/tools/length-and-chunked":
        return Action(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n%s\r\n0\r\n\r\n" % SECRET
        )
    if target == b"/tools/continue-then-answer":
        return Action(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"answered").data)
    return ok(b"answer:" + target)


@dataclass
class Wire:
    send: bytes  # written at once
    statuses: list[int]  # the answers, in order
    forwarded: list[tuple[bytes, bytes, bytes]]  # what the upstream reads: (method, target, body), in order
    later: bytes = b""  # written once the first answer is in; the connection must then close, unread


WIRE: dict[str, Wire] = {
    # A denied request's body is read (or the connection closed) as that body, never as a request of its own.
    "denied-length-body-holding-a-request": Wire(
        b"POST /tools/deny HTTP/1.1\r\nHost: h\r\n%sContent-Length: %d\r\n\r\n%s" % (OCTETS, len(SMUGGLED), SMUGGLED)
        + b"GET /tools/after HTTP/1.1\r\nHost: h\r\n\r\n",
        [403, 200],
        [(b"GET", b"/tools/after", b"")],
    ),
    "denied-chunked-body-holding-a-request": Wire(
        b"POST /tools/deny HTTP/1.1\r\nHost: h\r\n%sTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        b"GET /tools/after HTTP/1.1\r\nHost: h\r\n\r\n" % (OCTETS, len(SMUGGLED), SMUGGLED),
        [403, 200],
        [(b"GET", b"/tools/after", b"")],
    ),
    "denied-before-its-body-arrives": Wire(
        b"POST /tools/deny HTTP/1.1\r\nHost: h\r\n%sContent-Length: %d\r\n\r\n" % (OCTETS, len(SMUGGLED)),
        [403],
        [],
        later=SMUGGLED,
    ),
    "denied-expect-continue-then-the-body-anyway": Wire(
        b"POST /tools/deny HTTP/1.1\r\nHost: h\r\n%sExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
        % (OCTETS, len(SMUGGLED)),
        [403],
        [],
        later=SMUGGLED,
    ),
    # A pipelined request is decided on its own, after the one before is answered; a streamed body is re-framed.
    "pipelined-behind-a-streamed-chunked-body": Wire(
        b"POST /tools/up HTTP/1.1\r\nHost: h\r\n%sTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
        b"GET /tools/deny HTTP/1.1\r\nHost: h\r\n\r\nGET /tools/third HTTP/1.1\r\nHost: h\r\n\r\n" % OCTETS,
        [200, 403, 200],
        [(b"POST", b"/tools/up", b"hello"), (b"GET", b"/tools/third", b"")],
    ),
    # A body on a method whose body an upstream may not read (RFC 9110 9.3.1, 9.3.2, 9.3.8): read as the next
    # request there, it would run undecided (a CL.0 desync).
    "get-with-a-body": Wire(
        b"GET /tools/x HTTP/1.1\r\nHost: h\r\n%sContent-Length: %d\r\n\r\n%s" % (OCTETS, len(SMUGGLED), SMUGGLED),
        [403],
        [],
    ),
    "head-with-a-chunked-body": Wire(
        b"HEAD /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(SMUGGLED), SMUGGLED),
        [403],
        [],
    ),
    "trace-with-a-body": Wire(
        b"TRACE /tools/x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED),
        [403],
        [],
    ),
    "get-with-an-empty-body": Wire(
        b"GET /tools/x HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", [200], [(b"GET", b"/tools/x", b"")]
    ),
    # A field spelled with `_` for `-` is the same variable to a CGI-style upstream (Rack, WSGI, PHP): another
    # spelling of one the PEP sets, drops or refuses would override or join the PEP's own there.
    "forwarded-for-spelled-with-underscores": Wire(
        b"GET /tools/x HTTP/1.1\r\nHost: h\r\nX_Forwarded_For: 10.0.0.1\r\n\r\n", [403], []
    ),
    "method-override-spelled-with-underscores": Wire(
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\n%sX_HTTP_Method_Override: DELETE\r\nContent-Length: 0\r\n\r\n" % OCTETS,
        [403],
        [],
    ),
    "transfer-encoding-spelled-with-underscores": Wire(
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\n%sTransfer_Encoding: chunked\r\nContent-Length: 1\r\n\r\nx" % OCTETS,
        [403],
        [],
    ),
    "agent-header-spelled-with-underscores": Wire(
        b"GET /tools/x HTTP/1.1\r\nHost: h\r\nX-Agent-Id: alice\r\nX_Agent_Id: admin\r\n\r\n", [403], []
    ),
    "other-field-with-underscores": Wire(
        b"GET /tools/x HTTP/1.1\r\nHost: h\r\nX_Custom: 1\r\n\r\n", [200], [(b"GET", b"/tools/x", b"")]
    ),
    # Upgrade and CONNECT on a route that is no tunnel: never switched, the bytes after them never relayed raw.
    "websocket-upgrade": Wire(
        b"GET /tools/ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" + SMUGGLED,
        [200, 200],
        [(b"GET", b"/tools/ws", b""), (b"GET", b"/tools/smuggled", b"")],
    ),
    "connect-to-the-upstream": Wire(
        b"CONNECT 127.0.0.1:{up} HTTP/1.1\r\nHost: 127.0.0.1:{up}\r\n\r\n" + SMUGGLED, [403], []
    ),
}


@pytest.fixture
async def running() -> AsyncIterator[tuple[RunningPep, RawUpstream]]:
    pdp = PathPdp()
    await pdp.start()
    upstream = RawUpstream(misbehave)
    await upstream.start()
    with tempfile.TemporaryDirectory() as tmp:
        starter = PepStarter(
            Path(tmp), lambda log: base_config(pdp.url, f"http://127.0.0.1:{upstream.port}", log), "attacks.yaml"
        )
        try:
            yield await starter(), upstream
        finally:
            await starter.close()
            await upstream.stop()
            await pdp.stop()


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("case", list(WIRE.values()), ids=list(WIRE))
async def test_the_upstream_reads_only_decided_requests(case: Wire, running: tuple[RunningPep, RawUpstream]) -> None:
    pep, upstream = running
    client = await RawClient.open(pep.port)
    try:
        await client.send(case.send.replace(b"{up}", b"%d" % upstream.port))
        statuses: list[int] = []
        for i in range(len(case.statuses)):
            answer = await client.answer(no_body=case.send.startswith(b"HEAD"))
            assert answer is not None, f"closed after {statuses}"
            statuses.append(answer.status)
            if i == 0 and case.later:
                await client.send(case.later)
        assert statuses == case.statuses
        if case.later:
            assert await client.closed(0.5)  # nothing more: the later "request" was never read
    finally:
        client.close()
    await asyncio.sleep(0.05)  # time for a wrongly forwarded request to land
    assert [(s.method, s.target, s.body) for s in upstream.seen] == case.forwarded


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize(
    "first",
    [
        b"GET /tools/two-answers",
        b"HEAD /tools/head-body",
        b"GET /tools/no-content-body",
        b"GET /tools/not-modified-body",
        b"GET /tools/switch",
        b"GET /tools/length-and-chunked",
        b"GET /tools/continue-then-answer",
    ],
)
async def test_bytes_an_upstream_sends_unasked_never_answer_another_caller(
    first: bytes, running: tuple[RunningPep, RawUpstream]
) -> None:
    """The pool reuses a connection only after a clean, complete answer: a stray answer on it (two answers to one
    request, a body after a HEAD, 204 or 304 answer, after a 101 nobody asked for, a body framed two ways) would
    otherwise be the next caller's answer."""
    pep, _ = running
    one = await RawClient.open(pep.port)
    try:
        await one.send(first + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        assert await one.answer(no_body=first.startswith(b"HEAD")) is not None
    finally:
        one.close()
    for n in range(3):
        other = await RawClient.open(pep.port)
        try:
            await other.send(b"GET /tools/next-%d HTTP/1.1\r\nHost: h\r\n\r\n" % n)
            answer = await other.answer()
            assert answer is not None
            assert (answer.status, answer.body) == (200, b"answer:/tools/next-%d" % n)
        finally:
            other.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_body_cut_short_by_its_caller_never_shares_a_connection_with_the_next(
    running: tuple[RunningPep, RawUpstream],
) -> None:
    """The upstream has half a request on that connection: the next caller's request must not become its rest."""
    pep, upstream = running
    one = await RawClient.open(pep.port)
    await one.send(b"POST /tools/up HTTP/1.1\r\nHost: h\r\n%sContent-Length: 1000\r\n\r\n%s" % (OCTETS, b"x" * 10))
    for _ in range(100):
        if upstream.accepted:
            break
        await asyncio.sleep(0.01)
    one.close()
    other = await RawClient.open(pep.port)
    try:
        await other.send(
            b"POST /tools/next HTTP/1.1\r\nHost: h\r\n%sContent-Length: 990\r\n\r\n%s" % (OCTETS, b"y" * 990)
        )
        answer = await other.answer()
        assert answer is not None
        assert (answer.status, answer.body) == (200, b"answer:/tools/next")
    finally:
        other.close()
    assert [(s.connection, s.target, s.body) for s in upstream.seen] == [(2, b"/tools/next", b"y" * 990)]
