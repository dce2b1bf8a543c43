"""Builds the runtime from a config and runs the two listeners: the proxy and the admin endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pep import transport
from pep.admin import admin_app, serve_admin
from pep.approvals.flow import Approvals
from pep.breaker import Breaker, State
from pep.config import Address, Config, ConfigError, PdpConfig, load
from pep.credentials import CredentialSource
from pep.credentials_oauth import OAuthCredentialSource
from pep.decision_log import DecisionLog
from pep.engine import Engine
from pep.identity.keys import FileKeys, KeysError, KeySource
from pep.identity.spiffe import ListenerTls
from pep.identity.subject import build_identity
from pep.metrics import Metrics
from pep.pdp import Pdp
from pep.pdp.authzen import AuthzenPdp
from pep.pdp.cedar import CedarLoadError, CedarPdp, policy_files
from pep.pdp.mapping import CompiledMapping
from pep.pdp.opa import OpaPdp
from pep.pdp.reachability import Reachability
from pep.pdp.transport import HttpTransport, tls_context
from pep.preflight import credential_warning, file_problems
from pep.protocols import body as request_body
from pep.proxy import Proxy, Runtime
from pep.routing import RouteTable
from pep.seal import Sealer, SealKeyError
from pep.secret_file import FileSecret, Stamp, file_stamp
from pep.stderr import say
from pep.upstream import Upstream

if TYPE_CHECKING:
    from aiohttp import web

    from pep.otel import Tracing

# Header phase and idle keep-alive limit on the agent-facing listener. Read when a server starts, so tests can
# shrink it.
KEEPALIVE_S = 75.0


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


def _state_of(breaker: Breaker) -> Callable[[], State]:
    return lambda: breaker.state


def watched_files(cfg: Config) -> tuple[str, ...]:
    """The files whose change means a reload: the config file, and the Cedar policies (a file, or a directory and
    its `.cedar` files) and entities it names. Everything else a config names is re-read by its own user."""
    files = [cfg.source]
    pdp = cfg.pdp
    if pdp.kind == "cedar" and pdp.policies is not None:
        files.append(pdp.policies)  # a directory's own stamp changes when a file is added, removed or renamed
        if os.path.isdir(pdp.policies):
            files.extend(str(f) for f in policy_files(Path(pdp.policies)))
        if pdp.entities is not None:
            files.append(pdp.entities)
    files.extend(cfg.seal_key_files)  # a key rotated in is used without a restart
    return tuple(files)


def _pdp_identity(cfg: Config) -> tuple[object, ...]:
    """What the PDP client is built from: equal means a reload keeps the engine (and its breaker state)."""
    return (cfg.pdp, tuple((r.name, r.mapping) for r in cfg.routes if r.mapping is not None))


# Keys a running process cannot change: they are bound sockets, processes, or open files.
_RESTART_ONLY = ("listen", "admin_listen", "workers", "max_connections", "decision_log", "tracing")


class ReloadError(Exception):
    """A new config that cannot be used; the message says why (the last good config stays in force)."""


class Server:
    """The proxy and admin listeners with everything they share. `start()` binds; `stop()` releases all.

    `adjust` is applied to every config read from the file (a worker's shared port and private admin port)."""

    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.monotonic,
        reuse_port: bool = False,
        adjust: Callable[[Config], Config] | None = None,
        span_exporter: Any = None,
        process_key: bytes | None = None,
    ) -> None:
        self.config = config
        # Seals tokens when the config names no seal_key_files: a worker's comes from its supervisor, so that every
        # worker opens what another sealed; a lone process makes its own.
        self._process_key = process_key or secrets.token_bytes(32)
        self.reuse_port = reuse_port  # a worker: `listen` is shared with the other workers (SO_REUSEPORT)
        self.clock = clock
        self._adjust = adjust or (lambda c: c)
        self.shutting_down = False
        self.metrics = Metrics(tuple(r.name for r in config.routes))
        self.decision_log = DecisionLog(config.decision_log, self.metrics)
        self._admin: web.BaseRunner | None = None  # the admin listener (aiohttp: off the request path)
        self._listener: transport.Listener | None = None
        self.proxy_address: Address | None = None
        self.admin_address: Address | None = None
        self.proxy: Proxy | None = None
        self._upstream: Upstream | None = None
        self.listener_tls: ListenerTls | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._reload_lock = asyncio.Lock()
        self._retired: list[Runtime] = []  # replaced runtimes whose clients close once their requests are done
        self._span_exporter = span_exporter  # tests: an in-memory exporter instead of the configured one
        self.tracing: Tracing | None = None
        self._credential_said: dict[str, str | None] = {}  # route name -> the credential problem last said
        self.reachability = Reachability(self._pdp_config, say, self.metrics.pdp_reachable.set)

    def _pdp_config(self) -> PdpConfig:
        """The PDP config in force (the probe follows reloads)."""
        return self.proxy.runtime.config.pdp if self.proxy is not None else self.config.pdp

    @property
    def runtime(self) -> Runtime | None:
        return self.proxy.runtime if self.proxy is not None else None

    @property
    def engine(self) -> Engine | None:
        return self.proxy.runtime.engine if self.proxy is not None else None

    @property
    def credentials(self) -> dict[str, CredentialSource]:
        return self.proxy.runtime.credentials if self.proxy is not None else {}

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        await self.decision_log.start()
        loop = asyncio.get_running_loop()
        self.metrics.event_loop_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
        self._upstream = Upstream(self.metrics)
        self.proxy = proxy = Proxy(await self._build(cfg, None), self._upstream, self.decision_log, self.metrics)
        self.metrics.approvals_circuit_state.set_function(
            lambda: int(a.ciba.breaker.state) if (a := proxy.runtime.approvals) is not None else 0
        )
        self.metrics.approvals_held.set_function(lambda: a.held if (a := proxy.runtime.approvals) is not None else 0)
        if cfg.tracing is not None:
            from pep.otel import Tracing  # only with tracing on: no OpenTelemetry import otherwise

            proxy.spans = self.tracing = Tracing(cfg.tracing, self._span_exporter)

        reachability = self.reachability
        admin = admin_app(
            self.metrics,
            lambda: proxy.runtime.engine.circuit,
            lambda: self.shutting_down,
            lambda: not reachability.reached,
        )
        self.listener_tls = proxy.listener_tls = ListenerTls(cfg.identity.mtls) if cfg.identity.mtls else None
        tls = self.listener_tls.listener if self.listener_tls is not None else None
        # Every request, CONNECT and odd targets included, reaches the one handler and gets a decision; what
        # cannot be read as HTTP/1.1 is answered by the listener (`protocol_error`).
        options = transport.ListenerOptions(
            idle_s=KEEPALIVE_S,
            head_s=KEEPALIVE_S,
            body_chunk_s=request_body.BODY_READ_TIMEOUT_S,
            max_connections=cfg.max_connections,
        )
        self._listener = await transport.serve(
            cfg.listen.host,
            cfg.listen.port,
            proxy.handle,
            ssl=tls,
            reuse_port=self.reuse_port,
            options=options,
            on_protocol_error=proxy.protocol_error,
            on_refused=self.metrics.listener_refused.inc,
        )
        listener = self._listener
        self.metrics.listener_connections.set_function(lambda: len(listener.connections))
        self.proxy_address = Address(*self._listener.address)
        self._admin, bound = await serve_admin(admin, cfg.admin_listen.host, cfg.admin_listen.port)
        self.admin_address = Address(*bound)
        # Known before start() returns (at most PROBE_TIMEOUT_S): a PDP that is not there is said at once.
        await reachability.probe()
        self._spawn(reachability.run())
        self._check_credentials()
        self._spawn(self._watch_files(self._stamps()))  # stamped now: a change from here on is seen

    async def _build(self, cfg: Config, old: Runtime | None) -> Runtime:
        """The runtime for `cfg`, reusing what `old` already has for equal config (the engine with its breaker,
        the identity key source, credential sources). Raises ReloadError, closing whatever it opened."""
        same_pdp = old is not None and _pdp_identity(old.config) == _pdp_identity(cfg)
        same_identity = old is not None and old.config.identity == cfg.identity
        # The parts that hold nothing open first, so that nothing can fail after the policies are swapped.
        try:
            sealer = Sealer.from_files(cfg.seal_key_files) if cfg.seal_key_files else Sealer([self._process_key])
        except SealKeyError as exc:
            raise ReloadError(f"seal_key_files: {exc}") from None
        token_header = cfg.identity.jwt.header if cfg.identity.jwt is not None else None
        routes = RouteTable(cfg.routes, token_header, cfg.identity.agent_header)
        previous = old.credentials if old is not None else {}
        credentials = {}
        for route in cfg.routes:
            if route.credential is None or route.credential.jit is not None:
                continue
            source = previous.get(route.name)
            credentials[route.name] = (
                source if source and source.config == route.credential else CredentialSource(route.credential)
            )
        engine = None
        keys = None
        approvals = _approvals(cfg, old, self.metrics)
        jit: dict[str, OAuthCredentialSource] = {}
        try:
            jit = self._jit_sources(cfg, old)
            engine = (
                old.engine
                if old is not None and same_pdp
                else Engine(build_pdp(cfg), cfg.pdp, self.metrics, self.clock)
            )
            if old is not None and same_identity:
                identifier, keys = old.identifier, old.keys
            else:
                fetches = self.metrics.jwks_fetches
                identifier, keys = build_identity(cfg, lambda ok: fetches[ok].inc())
                if keys is not None:
                    await keys.start()
            # In-process policies are re-read on every reload that keeps the engine, last: this changes the engine
            # in force, so nothing after it may fail and leave the old config running with the new policies.
            if old is not None and engine is old.engine and (problem := engine.pdp.reload()):
                raise ReloadError(problem)
        except (KeysError, CedarLoadError, OSError, ssl.SSLError, ValueError) as exc:
            await self._discard(old, engine, keys, jit, approvals)
            raise ReloadError(str(exc)) from None
        except BaseException:
            await self._discard(old, engine, keys, jit, approvals)
            raise
        self.metrics.bind_routes(tuple(r.name for r in cfg.routes))
        for name, jit_source in jit.items():
            self.metrics.bind_credential_circuit(name, _state_of(jit_source.breaker))
        return Runtime(cfg, routes, engine, identifier, credentials, sealer, keys, jit, approvals)

    def _jit_sources(self, cfg: Config, old: Runtime | None) -> dict[str, OAuthCredentialSource]:
        """A token endpoint client per route with a just-in-time credential; a reload keeps the source (its
        cached tokens and its breaker) of a route whose credential is unchanged. Raises OSError or
        ssl.SSLError for unusable TLS files, having closed nothing it did not create (the caller does)."""
        previous = old.jit if old is not None else {}
        fetches = self.metrics.credential_fetches
        made: dict[str, OAuthCredentialSource] = {}
        for route in cfg.routes:
            credential = route.credential
            if credential is None or credential.jit is None:
                continue
            source = previous.get(route.name)
            if source is None or source.route_config != credential:
                try:
                    source = OAuthCredentialSource.for_route(
                        credential, self.metrics.credential_transitions(route.name), lambda r: fetches[r].inc()
                    )
                except BaseException:
                    for name, made_source in made.items():
                        if previous.get(name) is not made_source:
                            self._spawn(made_source.close())
                    raise
            made[route.name] = source
        return made

    async def _discard(
        self,
        old: Runtime | None,
        engine: Engine | None,
        keys: KeySource | None,
        jit: dict[str, OAuthCredentialSource] | None = None,
        approvals: Approvals | None = None,
    ) -> None:
        """Close what a failed build created (never what it reused from `old`)."""
        if approvals is not None and (old is None or approvals is not old.approvals):
            await approvals.close()
        kept = set(map(id, old.jit.values())) if old is not None else set()
        for source in (jit or {}).values():
            if id(source) not in kept:
                await source.close()
        if engine is not None and (old is None or engine is not old.engine):
            await engine.pdp.close()
            if old is not None:
                self.metrics.bind_engine(old.engine)  # the gauges follow the engine in force
        if keys is not None and (old is None or keys is not old.keys):
            await keys.close()

    def reload(self) -> None:
        """SIGHUP: re-read the files the config names now (credentials, JWKS file, mTLS certificates), then
        re-read the config itself and reopen the decision log file, in the background."""
        runtime = self.runtime
        if runtime is not None:
            for source in runtime.credentials.values():
                source.refresh()
            if isinstance(runtime.keys, FileKeys):
                runtime.keys.refresh()
        if self.listener_tls is not None:
            self.listener_tls.refresh()
        self._spawn(self._reopen_log())
        self._spawn(self.reload_config())

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reopen_log(self) -> None:
        problem = await self.decision_log.reopen()
        if problem is not None:
            say(f"failclosed-pep: {problem}")

    async def reload_config(self, cause: str = "") -> bool:
        """Read the config file (and the files it names) again and swap it in whole, or keep the last good one
        and say why. `cause` says what changed (for the stderr line).

        Requests in flight finish on the config they started with. Counted in pep_config_reloads_total."""
        why = f" ({cause})" if cause else ""
        async with self._reload_lock:
            try:
                await self._swap()
            except ReloadError as exc:
                self.metrics.config_reloads["error"].inc()
                message = f"config reload failed{why}, keeping the last good config: {exc}"
                say(f"failclosed-pep: {message}")
                return False
            self.metrics.config_reloads["success"].inc()
            say(f"failclosed-pep: config reloaded{why}")
            self._check_credentials()
            self.reachability.wake()  # the PDP may have moved
            return True

    def _check_credentials(self) -> None:
        """Say on stderr when a route's credential goes missing (its requests are denied from then on) and when
        it is back: once per change, not per request. Checked at start, after a reload and once a second."""
        runtime = self.runtime
        if runtime is None:
            return
        cfg = runtime.config
        said = self._credential_said
        for name in [n for n in said if n not in runtime.credentials]:
            del said[name]
        for index, route in enumerate(cfg.routes):
            source = runtime.credentials.get(route.name)
            if source is None:
                continue
            problem = source.problem()
            before = said.get(route.name)
            if problem == before:
                continue
            said[route.name] = problem
            if problem is not None:
                say(f"failclosed-pep: warning: {credential_warning(cfg, index, problem)}")
            else:
                where = f"{cfg.source}: routes[{index}].credential"
                say(f"failclosed-pep: {where}: route {route.name} has its credential again")

    async def _swap(self) -> None:
        proxy = self.proxy
        if proxy is None or self.shutting_down:
            raise ReloadError("the server is not running")
        try:
            cfg = self._adjust(load(self.config.source))
        except ConfigError as exc:
            raise ReloadError("; ".join(exc.problems)) from None
        problems = file_problems(cfg)
        if problems:
            raise ReloadError("; ".join(problems))
        changed = [k for k in _RESTART_ONLY if getattr(cfg, k) != getattr(self.config, k)]
        if cfg.identity.mtls != self.config.identity.mtls:
            changed.append("identity.mtls")
        if changed:
            raise ReloadError(f"{', '.join(changed)} cannot change without a restart")
        old = proxy.runtime
        new = await self._build(cfg, old)
        proxy.runtime = new  # one assignment: the next request sees all of the new config
        self.config = cfg
        if closed := proxy.tunnels.revoke(new.routes):
            say(f"failclosed-pep: closed {closed} tunnel(s) whose route the reload removed or changed")
        dropped_jit = any(source is not new.jit.get(name) for name, source in old.jit.items())
        if (
            new.engine is not old.engine
            or new.keys is not old.keys
            or dropped_jit
            or new.approvals is not old.approvals
        ):
            self._retired.append(old)
            # No request still deciding under the old engine outlives its deadline (plus the retries in it).
            # Nor a credential fetch: closing a token endpoint client ends the fetches on it.
            jit_ms = max((s.cfg.timeout_s * 1000 for s in old.jit.values()), default=0.0)
            self._spawn(self._retire(old, new, (old.config.pdp.timeout_ms + jit_ms) / 1000 + 1.0))

    async def _retire(self, old: Runtime, new: Runtime, after: float) -> None:
        await asyncio.sleep(after)
        await self._close_runtime(old, keep=new)
        with contextlib.suppress(ValueError):
            self._retired.remove(old)

    @staticmethod
    async def _close_runtime(runtime: Runtime, keep: Runtime | None = None) -> None:
        if keep is None or runtime.engine is not keep.engine:
            await runtime.engine.pdp.close()
        if runtime.keys is not None and (keep is None or runtime.keys is not keep.keys):
            await runtime.keys.close()
        for name, source in runtime.jit.items():
            if keep is None or keep.jit.get(name) is not source:
                await source.close()
        if runtime.approvals is not None and (keep is None or runtime.approvals is not keep.approvals):
            await runtime.approvals.close()

    def _stamps(self) -> dict[str, Stamp | None]:
        return {path: file_stamp(path) for path in watched_files(self.config)}

    async def _watch_files(self, stamps: dict[str, Stamp | None]) -> None:
        """Reload when the config file or the Cedar policies it names change (a ConfigMap update swaps a
        symlink); checked once a second. A policy file that is half-written or broken is refused like a bad
        config: the last good policies stay, and the reason is said and counted."""
        while True:
            await asyncio.sleep(CONFIG_CHECK_S)
            self._check_credentials()
            now = self._stamps()
            if now == stamps or now.get(self.config.source) is None:  # no change, or the config is being swapped
                continue
            changed = [path for path in now.keys() | stamps.keys() if now.get(path) != stamps.get(path)]
            stamps = now
            await self.reload_config(", ".join(sorted(changed)) + " changed")
            if watched_files(self.config) != tuple(stamps):  # the new config names other files: watch those
                stamps = self._stamps()

    async def stop(self) -> None:
        self.shutting_down = True
        for task in list(self._tasks):
            task.cancel()
        # Proxy first, admin last: while the proxy drains its in-flight requests (up to shutdown_grace_ms),
        # /readyz still answers 503 `shutting_down` instead of the admin port already refusing connections.
        if self._listener is not None:
            await self._listener.close(self.config.shutdown_grace_ms / 1000)
            self._listener = None
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        if self._upstream is not None:
            await self._upstream.close()
        if self.proxy is not None:
            await self._close_runtime(self.proxy.runtime)
        for old in self._retired:
            await self._close_runtime(old, keep=self.runtime)
        self._retired.clear()
        if self.tracing is not None:
            self.tracing.shutdown()  # exports what is buffered
        await self.decision_log.close()


def _approvals(cfg: Config, old: Runtime | None, metrics: Metrics) -> Approvals | None:
    """The approval engine: kept across a reload that leaves `approvals` as it was (its breaker, its replay
    cache and its held requests go on), else new (ticket key files read now: ReloadError)."""
    if cfg.approvals is None:
        return None
    if old is not None and old.approvals is not None and old.config.approvals == cfg.approvals:
        return old.approvals
    try:
        return Approvals.from_config(cfg.approvals, on_result=lambda result: metrics.approvals[result].inc())
    except SealKeyError as exc:
        raise ReloadError(f"approvals.ticket_key_files: {exc}") from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ReloadError(f"approvals.tls: {exc}") from None


CONFIG_CHECK_S = 1.0


async def _orphan_watch(parent: int, stop: asyncio.Event) -> None:
    """A worker stops when its supervisor is gone (even SIGKILLed, which forwards nothing): re-parented, its
    parent id changes. Checked once a second."""
    while os.getppid() == parent:  # noqa: ASYNC110 - nothing signals a parent's death; polling is the way
        await asyncio.sleep(1.0)
    say("failclosed-pep: the supervisor is gone; stopping this worker")
    stop.set()


def for_worker(config: Config, port: int) -> Config:
    """A worker's view of the config: the supervisor's shared port, and a private loopback admin port."""
    return dataclasses.replace(config, listen=Address(config.listen.host, port), admin_listen=Address("127.0.0.1", 0))


async def serve(config: Config, worker: tuple[int, int, int, int] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain for up to `shutdown_grace_ms`. A worker (pep/workers.py),
    given as (index, shared port, report fd, seal key fd), shares `listen`, takes the supervisor's seal key and
    reports its admin port on the fd."""
    parent = os.getppid()  # before anything is awaited: the supervisor may be killed while this worker starts
    if worker is None:
        server = Server(config)
    else:
        port = worker[1]
        with os.fdopen(worker[3], "rb") as key_pipe:
            key = key_pipe.read(64)
        if len(key) != 32:
            raise RuntimeError("the supervisor's seal key did not arrive")
        adjust = lambda c: for_worker(c, port)  # noqa: E731
        server = Server(for_worker(config, port), reuse_port=True, adjust=adjust, process_key=key)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    who = "failclosed-pep" if worker is None else f"failclosed-pep worker {worker[0]}"
    say(f"{who}: proxy on {server.proxy_address}, admin on {server.admin_address}")
    if worker is not None and server.admin_address is not None:
        os.write(worker[2], f"{server.admin_address.port}\n".encode())
        os.close(worker[2])
        watch = loop.create_task(_orphan_watch(parent, stop))
    else:
        watch = None
    try:
        await stop.wait()
        grace = server.config.shutdown_grace_ms / 1000
        say(f"{who}: shutting down, draining requests for up to {grace:g} s")
    finally:
        if watch is not None:
            watch.cancel()
        await server.stop()
