"""The outbox: a connection's writes are held until the loop has run the callbacks ready now, then handed to the
transport in one call, in order; large writes go at once; a close sends or drops what is held, as its caller says.
On real sockets (uvloop and asyncio's loop) and on a transport that records its calls."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from typing import Any

import pytest
import uvloop

from pep.transport.outbox import SEND_AT, Outbox


class Recording:
    """A transport that records what it is handed, and can be closing or fail."""

    def __init__(self, fails: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False
        self.fails = fails

    def write(self, data: bytes) -> None:
        if self.fails:
            raise RuntimeError("cannot write")
        self.calls.append(("write", data))

    def abort(self) -> None:
        self.calls.append(("abort", None))

    def writelines(self, chunks: list[bytes]) -> None:
        self.calls.append(("writelines", list(chunks)))

    def is_closing(self) -> bool:
        return self.closing


def outbox_of(transport: Recording) -> Outbox:
    return Outbox(asyncio.get_running_loop(), transport)  # type: ignore[arg-type]


async def test_writes_of_one_pass_are_handed_over_together_after_it_in_order() -> None:
    transport = Recording()
    outbox = outbox_of(transport)
    outbox.write(b"HTTP/1.1 200 OK\r\n\r\n")
    outbox.write(b"")  # nothing to send
    outbox.write(b"body")
    assert transport.calls == []
    assert outbox.held == 23
    await asyncio.sleep(0)
    assert transport.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\nbody")]  # one call; small: joined
    assert outbox.held == 0
    outbox.write(b"next")  # a later pass: its own call
    await asyncio.sleep(0)
    assert transport.calls[1:] == [("write", b"next")]


async def test_a_large_write_goes_at_once_after_what_is_held() -> None:
    transport = Recording()
    outbox = outbox_of(transport)
    big = b"x" * SEND_AT
    outbox.write(big)
    assert transport.calls == [("write", big)]  # nothing held: straight to the transport
    outbox.write(b"head")
    outbox.write(big)
    assert transport.calls[1:] == [("writelines", [b"head", big])]  # held bytes first, in the same call
    await asyncio.sleep(0)
    assert len(transport.calls) == 2  # the pass's flush finds nothing left


async def test_small_writes_that_add_up_are_sent_when_they_reach_the_limit() -> None:
    transport = Recording()
    outbox = outbox_of(transport)
    chunk = b"y" * (SEND_AT // 4)
    for _ in range(3):
        outbox.write(chunk)
    assert transport.calls == []
    outbox.write(chunk)
    assert transport.calls == [("writelines", [chunk] * 4)]


async def test_flush_sends_now_and_drop_forgets() -> None:
    transport = Recording()
    outbox = outbox_of(transport)
    outbox.write(b"answer")
    outbox.flush()  # before a close: what was written goes first
    assert transport.calls == [("write", b"answer")]
    outbox.write(b"request")
    outbox.drop()  # an aborted exchange: nothing more is sent
    await asyncio.sleep(0)
    assert transport.calls == [("write", b"answer")]
    assert outbox.held == 0


async def test_every_connection_of_a_pass_is_flushed_even_if_one_fails() -> None:
    broken, first, second = Recording(fails=True), Recording(), Recording()
    outboxes = [outbox_of(t) for t in (first, broken, second)]
    for i, outbox in enumerate(outboxes):
        outbox.write(b"%d" % i)
    await asyncio.sleep(0)
    assert first.calls == [("write", b"0")]
    assert second.calls == [("write", b"2")]
    assert broken.calls == [("abort", None)]
    assert outboxes[1].held == 0


def test_a_loop_that_is_gone_is_not_kept_alive_by_its_outboxes() -> None:
    for make in (uvloop.new_event_loop, asyncio.new_event_loop):
        loop = make()
        Outbox(loop, Recording())  # type: ignore[arg-type]
        ref = weakref.ref(loop)
        loop.close()
        del loop
        gc.collect()
        assert ref() is None  # (each uvloop loop holds a 256 KiB read buffer: a test suite makes thousands)


async def test_a_closing_transport_is_handed_nothing() -> None:
    transport = Recording()
    outbox = outbox_of(transport)
    outbox.write(b"late")
    transport.closing = True  # the peer went away before the pass ended
    await asyncio.sleep(0)
    assert transport.calls == []


async def test_on_a_real_socket_the_bytes_arrive_after_the_pass_in_one_read() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    try:
        outbox = Outbox(loop, transport)
        outbox.write(b"one ")
        outbox.write(b"two")
        with pytest.raises(BlockingIOError):
            theirs.recv(100)  # held: not on the socket yet
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # (from 3.12, asyncio's loop sends a writelines from its writer callback)
        assert theirs.recv(100) == b"one two"
    finally:
        transport.close()
        theirs.close()
