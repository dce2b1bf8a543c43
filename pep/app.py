"""Builds the runtime from a config and runs the two listeners: the proxy and the admin endpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable

from aiohttp import web

from pep.admin import admin_app
from pep.config import Address, Config
from pep.credentials import CredentialSource
from pep.decision_log import DecisionLog
from pep.engine import Engine
from pep.identity.keys import FileKeys, KeySource
from pep.identity.spiffe import ListenerTls
from pep.identity.subject import build_identity
from pep.metrics import Metrics
from pep.pdp import Pdp
from pep.pdp.authzen import AuthzenPdp
from pep.pdp.cedar import CedarPdp
from pep.pdp.mapping import CompiledMapping
from pep.pdp.opa import OpaPdp
from pep.pdp.transport import HttpTransport, tls_context
from pep.proxy import Proxy, Runtime
from pep.routing import RouteTable
from pep.secret_file import FileSecret
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


def build_pdp(cfg: Config) -> Pdp:
    """The PDP client for `pdp.kind`. Raises CedarLoadError or OSError/ssl.SSLError for unusable files."""
    pdp = cfg.pdp
    mappings = {r.name: CompiledMapping.compile(r.mapping) for r in cfg.routes if r.mapping is not None}
    if pdp.kind == "cedar":
        assert pdp.policies is not None
        return CedarPdp(pdp.policies, pdp.entities, mappings)
    tls = tls_context(pdp.tls.ca_file, pdp.tls.cert_file, pdp.tls.key_file) if pdp.tls is not None else None
    transport = HttpTransport(pdp.max_response_bytes, pdp.max_in_flight, tls)
    auth = FileSecret(pdp.auth.value_file, pdp.auth.format) if pdp.auth is not None else None
    if pdp.kind == "authzen":
        header = pdp.auth.header if pdp.auth is not None else "authorization"
        # Discovery gets the decision deadline as its own bound (callers stop waiting then anyway).
        return AuthzenPdp(pdp.url, transport, mappings, auth, header, discovery_timeout=pdp.timeout_ms / 1000)
    return OpaPdp(pdp.url, transport, auth, pdp.auth.header if pdp.auth is not None else "authorization")


class Server:
    """The proxy and admin listeners with everything they share. `start()` binds; `stop()` releases all."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic, reuse_port: bool = False) -> None:
        self.config = config
        self.reuse_port = reuse_port  # a worker: `listen` is shared with the other workers (SO_REUSEPORT)
        self.clock = clock
        self.shutting_down = False
        self.metrics = Metrics(tuple(r.name for r in config.routes))
        self.decision_log = DecisionLog(config.decision_log, self.metrics)
        self._runners: list[web.BaseRunner] = []
        self.proxy_address: Address | None = None
        self.admin_address: Address | None = None
        self.engine: Engine | None = None
        self._upstream: Upstream | None = None
        self.credentials: dict[str, CredentialSource] = {}
        self._reopen_task: asyncio.Task[None] | None = None
        self.keys: KeySource | None = None
        self.listener_tls: ListenerTls | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        await self.decision_log.start()
        self.engine = engine = Engine(build_pdp(cfg), cfg.pdp, self.metrics, self.clock)
        self._upstream = Upstream(self.metrics)
        self.credentials = {r.name: CredentialSource(r.credential) for r in cfg.routes if r.credential is not None}
        fetches = self.metrics.jwks_fetches
        identifier, self.keys = build_identity(cfg, lambda ok: fetches[ok].inc())
        if self.keys is not None:
            await self.keys.start()
        token_header = cfg.identity.jwt.header if cfg.identity.jwt is not None else None
        routes = RouteTable(cfg.routes, token_header)
        runtime = Runtime(cfg, routes, engine, identifier, self.credentials)
        self.proxy = proxy = Proxy(runtime, self._upstream, self.decision_log, self.metrics)

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
        self.listener_tls = ListenerTls(cfg.identity.mtls) if cfg.identity.mtls is not None else None
        tls = self.listener_tls.listener if self.listener_tls is not None else None
        self.proxy_address = await self._bind(web.ServerRunner(proxy_server), cfg.listen, tls, self.reuse_port)
        self.admin_address = await self._bind(
            web.AppRunner(admin, access_log=None, keepalive_timeout=KEEPALIVE_S), cfg.admin_listen
        )

    async def _bind(
        self, runner: web.BaseRunner, address: Address, tls: ssl.SSLContext | None = None, reuse_port: bool = False
    ) -> Address:
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(
            runner, address.host, address.port, backlog=1024, ssl_context=tls, reuse_port=reuse_port or None
        )
        await site.start()
        host, port = bound_address(site)
        return Address(host, port)

    def reload(self) -> None:
        """SIGHUP: re-read credential files, the JWKS file and the mTLS certificates, reopen the decision log
        file, re-read Cedar policies."""
        for source in self.credentials.values():
            source.refresh()
        if isinstance(self.keys, FileKeys):
            self.keys.refresh()
        if self.listener_tls is not None:
            self.listener_tls.refresh()
        self._reopen_task = asyncio.get_running_loop().create_task(self._reopen_log())
        self.reload_policies()

    async def _reopen_log(self) -> None:
        problem = await self.decision_log.reopen()
        if problem is not None:
            print(f"failclosed-pep: {problem}", file=sys.stderr, flush=True)

    def reload_policies(self) -> None:
        """Re-read in-process policies (Cedar). A failure keeps the policies in force."""
        reload = getattr(self.engine.pdp if self.engine else None, "reload", None)
        if reload is None:
            return
        problem = reload()
        self.metrics.config_reloads["error" if problem else "success"].inc()
        message = f"policy reload failed, keeping the last good policies: {problem}" if problem else "policies reloaded"
        print(f"failclosed-pep: {message}", file=sys.stderr, flush=True)

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
        if self.keys is not None:
            await self.keys.close()
        await self.decision_log.close()


async def serve(config: Config, worker: int | None = None, report_fd: int | None = None) -> None:
    """Run until SIGTERM or SIGINT. A worker (see pep/workers.py) shares `listen` and tells the supervisor the
    port of its private admin listener on `report_fd`."""
    server = Server(config, reuse_port=worker is not None)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    who = "failclosed-pep" if worker is None else f"failclosed-pep worker {worker}"
    print(f"{who}: proxy on {server.proxy_address}, admin on {server.admin_address}", file=sys.stderr, flush=True)
    if report_fd is not None and server.admin_address is not None:
        os.write(report_fd, f"{server.admin_address.port}\n".encode())
        os.close(report_fd)
    try:
        await stop.wait()
    finally:
        await server.stop()
