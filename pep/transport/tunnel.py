"""CONNECT tunnels: bytes spliced both ways between two connections, never inspected.

Each side is a Pipe, an asyncio protocol that writes what it receives straight to the other side's transport
(no task, no queue per chunk). Backpressure goes both ways: when one side's write buffer passes its high-water
mark, the other side stops being read until it drains. The tunnel ends as a whole when either side closes, or
when nothing moved either way for `idle_s` (today's pep/tunnel.py semantics); both connections are then closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import cast

from pep.transport.errors import ConnectFailed, ConnectTimeout


class _Splice:
    """What both pipes of one tunnel share: when a byte last moved, and the end."""

    __slots__ = ("done", "last")

    def __init__(self, done: asyncio.Future[None], now: float) -> None:
        self.done = done
        self.last = now

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Pipe(asyncio.Protocol):
    """One side of a tunnel. Bytes that arrive before the splice starts are held (reading pauses past the
    high-water mark) and go first."""

    __slots__ = ("_early", "_early_size", "_high", "_loop", "_on_lost", "_peer", "_read_paused", "_splice", "transport")

    def __init__(self, transport: asyncio.Transport | None, high_water: int, on_lost: Callable[[], None] | None = None):
        self.transport = transport
        self._high = high_water
        self._on_lost = on_lost
        self._peer: Pipe | None = None
        self._splice: _Splice | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._read_paused = False
        self._loop = asyncio.get_running_loop()

    def take_over(self, early: bytes, paused: bool) -> None:
        """Become the protocol of an existing connection (a switched CONNECT), holding `early`."""
        transport = self.transport
        assert transport is not None
        transport.set_protocol(self)
        if early:
            self._early.append(early)
            self._early_size = len(early)
        self._read_paused = paused
        if not paused and self._early_size > self._high:
            self._pause()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self._peer
        if peer is None:
            self._early.append(data)
            self._early_size += len(data)
            if self._early_size > self._high:
                self._pause()
            return
        splice = self._splice
        assert splice is not None
        assert peer.transport is not None
        splice.last = self._loop.time()
        peer.transport.write(data)

    def eof_received(self) -> bool | None:
        if self._splice is not None:
            self._splice.finish()
        return None  # the transport closes: the tunnel ends as a whole

    def connection_lost(self, exc: Exception | None) -> None:
        if self._splice is not None:
            self._splice.finish()
        peer = self._peer
        if peer is not None:
            peer._resume()
        if self._on_lost is not None:
            self._on_lost()

    def pause_writing(self) -> None:
        if self._peer is not None:
            self._peer._pause()  # this side is not taking bytes fast enough: stop reading the other

    def resume_writing(self) -> None:
        if self._peer is not None:
            self._peer._resume()

    # the splice
    def _pause(self) -> None:
        if not self._read_paused and self.transport is not None and not self.transport.is_closing():
            self._read_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._read_paused and self.transport is not None and not self.transport.is_closing():
            self._read_paused = False
            self.transport.resume_reading()

    def _join(self, peer: Pipe, splice: _Splice) -> None:
        self._peer = peer
        self._splice = splice
        early, self._early, self._early_size = self._early, [], 0
        if early and peer.transport is not None:
            peer.transport.write(b"".join(early))
        self._resume()

    def close(self, abort: bool = False) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
            else:
                transport.close()  # what is buffered is sent first


async def connect(
    host: str, port: int, connect_s: float, high_water: int = 262144, tls: ssl.SSLContext | None = None
) -> Pipe:
    """A connection to the tunnel's far end. Raises ConnectFailed or ConnectTimeout (nothing was sent)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_s):
            _, pipe = await loop.create_connection(
                lambda: Pipe(None, high_water), host, port, ssl=tls, server_hostname=host if tls else None
            )
    except TimeoutError:
        raise ConnectTimeout(f"no connection to {host}:{port} within {connect_s:g} s") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectFailed(f"{host}:{port}: {exc}") from None
    return pipe


async def splice(client: Pipe, upstream: Pipe, idle_s: float) -> None:
    """Move bytes both ways until either side closes or nothing moved for `idle_s`; then close both (abort them
    if the caller is cancelled)."""
    loop = asyncio.get_running_loop()
    state = _Splice(loop.create_future(), loop.time())
    client._join(upstream, state)
    upstream._join(client, state)
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal timer
        due = state.last + idle_s
        if loop.time() >= due:
            state.finish()
        else:
            timer = loop.call_at(due, check)

    timer = loop.call_at(state.last + idle_s, check)
    aborted = True
    try:
        await state.done
        aborted = False
    finally:
        timer.cancel()
        for pipe in (client, upstream):
            with contextlib.suppress(Exception):
                pipe.close(aborted)
