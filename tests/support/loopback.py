"""Serving a test server on 127.0.0.1: one way to start and stop, for every test double."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from aiohttp import web

from pep.admin import bound_address


class LoopbackServer:
    """Holds an aiohttp runner bound to 127.0.0.1; `port` 0 until started picks a free port."""

    port: int = 0
    _runner: web.BaseRunner | None = None

    @property
    def url(self) -> str:
        """The server's origin (a subclass serving under a path overrides it)."""
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, runner: web.BaseRunner) -> None:
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = bound_address(site)[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port where every connection is refused while the context lasts: bound and never listening, so
    no other listener can take it. (A port bound and released, or a stopped server's, can be taken by a server
    of another test or process running beside this one, and a connection then succeeds.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port
