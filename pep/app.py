"""Builds the runtime from a config and runs the two listeners: the proxy and the admin endpoints."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable

from aiohttp import web

from pep.admin import admin_app
from pep.config import Address, Config
from pep.decision_log import DecisionLog
from pep.engine import Engine
from pep.metrics import Metrics
from pep.pdp.opa import OpaPdp
from pep.pdp.transport import HttpTransport
from pep.proxy import Proxy
from pep.routing import RouteTable
from pep.upstream import Upstream

# Header phase and idle keep-alive limit on the agent-facing listener (aiohttp's AppRunner default is 3630 s).
KEEPALIVE_S = 75.0


def bound_address(site: web.TCPSite) -> tuple[str, int]:
    """The address a started site listens on (port 0 in the config means the OS chose it)."""
    sockets = getattr(site._server, "sockets", None) or ()
    if not sockets:
        raise RuntimeError("the listener has no socket")
    host, port = sockets[0].getsockname()[:2]
    return str(host), int(port)


class Server:
    """The proxy and admin listeners with everything they share. `start()` binds; `stop()` releases all."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.shutting_down = False
        self.metrics = Metrics(tuple(r.name for r in config.routes))
        self.decision_log = DecisionLog(config.decision_log, self.metrics)
        self._runners: list[web.BaseRunner] = []
        self.proxy_address: Address | None = None
        self.admin_address: Address | None = None
        self.engine: Engine | None = None
        self._upstream: Upstream | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        await self.decision_log.start()
        transport = HttpTransport(cfg.pdp.max_response_bytes, cfg.pdp.max_in_flight)
        self.engine = engine = Engine(OpaPdp(cfg.pdp.url, transport), cfg.pdp, self.metrics, self.clock)
        self._upstream = Upstream(self.metrics)
        proxy = Proxy(cfg, RouteTable(cfg.routes), engine, self._upstream, self.decision_log, self.metrics)

        # The low-level server has no router: every request, CONNECT and odd targets included, reaches the
        # one handler and gets a decision.
        proxy_server = web.Server(
            proxy.handle,
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=KEEPALIVE_S,
            auto_decompress=False,  # bodies are forwarded as sent, encoding and all
        )
        admin = admin_app(self.metrics, lambda: engine.circuit, lambda: self.shutting_down)
        self.proxy_address = await self._bind(web.ServerRunner(proxy_server), cfg.listen)
        self.admin_address = await self._bind(
            web.AppRunner(admin, access_log=None, keepalive_timeout=KEEPALIVE_S), cfg.admin_listen
        )

    async def _bind(self, runner: web.BaseRunner, address: Address) -> Address:
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, address.host, address.port, backlog=1024)
        await site.start()
        host, port = bound_address(site)
        return Address(host, port)

    async def stop(self) -> None:
        self.shutting_down = True
        # Proxy first, admin last: while the proxy drains its in-flight requests, /readyz still answers
        # 503 `shutting_down` instead of the admin port already refusing connections.
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._upstream is not None:
            await self._upstream.close()
        if self.engine is not None:
            await self.engine.pdp.close()
        await self.decision_log.close()


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"failclosed-pep: proxy on {server.proxy_address}, admin on {server.admin_address}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await server.stop()
