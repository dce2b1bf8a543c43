"""Serving a test server on 127.0.0.1: one way to start and stop, for every test double."""

from __future__ import annotations

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
