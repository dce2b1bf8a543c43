"""`workers: N`: N proxy processes on one port (SO_REUSEPORT), under a supervisor that serves the admin port.

Python runs one request at a time per process, so a second core needs a second process. Each worker is a full
`pep run` (its own PDP client, circuit breaker, bulkhead and upstream pool) that binds `listen` with
SO_REUSEPORT, so the kernel spreads connections over the workers, and an admin listener of its own on a
loopback port it reports to the supervisor. The supervisor:
- holds a bound (not listening) SO_REUSEPORT socket on `listen`, so `listen: …:0` resolves to one port that
  every worker, and every restarted worker, shares;
- serves `admin_listen`: `/metrics` is every worker's scrape with a `worker` label added (counters and
  histograms stay exact per worker; sum them across `worker`), `/readyz` is ready only when every worker is,
  `/healthz` answers while the supervisor runs;
- forwards SIGHUP, and on SIGTERM/SIGINT stops the workers and waits for them;
- restarts a worker that dies (after a second), counting `pep_worker_restarts_total`.

The breaker is per worker: each opens on its own failures, so during an outage every worker trips after its own
`failure_threshold` failures. Written here rather than taken from gunicorn: the proxy is a low-level aiohttp
server with its own admin listener, and what is needed (spawn, report a port, merge scrapes) is small.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from pep import __version__
from pep.admin import KEEPALIVE_S, bound_address
from pep.config import Address, Config
from pep.stderr import say

RESTART_DELAY_S = 1.0
START_TIMEOUT_S = 30.0
STOP_MARGIN_S = 10.0  # past twice the workers' drain (aiohttp waits up to the grace, then again for cancellation)
SCRAPE_TIMEOUT_S = 2.0


def reserve(address: Address) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket: fixes the port (port 0 resolves once) for every worker."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address.host, address.port))
    return sock


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    admin_port: int | None = None


class _Scraped(Collector):
    """The families of one scrape of every worker, each sample labelled with its worker."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge(scrapes: list[tuple[int, str]]) -> list[Metric]:
    """One family per metric name, samples from every worker with `worker="i"` added."""
    merged: dict[str, Metric] = {}
    for index, text in scrapes:
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):
                continue  # per-process creation times: meaningless once merged
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # per-process creation times: meaningless once merged
                labels = {**sample.labels, "worker": str(index)}
                into.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
    return list(merged.values())


class Supervisor:
    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.workers = [Worker(i) for i in range(config.workers)]
        self.stopping = False
        self.port = 0
        self._registry = CollectorRegistry()
        self._restarts = Counter(
            "pep_worker_restarts_total", "Workers restarted after they died.", registry=self._registry
        )
        alive = Gauge("pep_workers", "Worker processes running.", registry=self._registry)
        alive.set_function(lambda: sum(1 for w in self.workers if w.process and w.process.returncode is None))
        Gauge("pep_build_info", "Build information.", ["version"], registry=self._registry).labels(__version__).set(1)
        self._session: aiohttp.ClientSession | None = None
        self._seal_key = secrets.token_bytes(32)  # one for all workers, restarted ones too

    async def spawn(self, worker: Worker) -> None:
        """Start one worker and wait until it reports its admin port (it then serves `listen`).

        The worker reads the supervisor's seal key from a pipe (never argv or the environment): without
        `seal_key_files`, a token one worker sealed (pep/protocols/mcp_tokens.py) opens in every other."""
        read_fd, write_fd = os.pipe()
        key_read, key_write = os.pipe()
        try:
            os.write(key_write, self._seal_key)
            os.close(key_write)
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pep",
                "run",
                "--config",
                self.config_path,
                "--worker",
                f"{worker.index}:{self.port}:{write_fd}:{key_read}",
                pass_fds=(write_fd, key_read),
            )
        finally:
            os.close(write_fd)
            os.close(key_read)
        loop = asyncio.get_running_loop()
        try:
            raw = await asyncio.wait_for(loop.run_in_executor(None, _read_line, read_fd), START_TIMEOUT_S)
        finally:
            os.close(read_fd)
        worker.admin_port = int(raw) if raw.isdigit() else None

    async def watch(self, worker: Worker) -> None:
        """Restart the worker whenever it dies, until the supervisor stops."""
        while not self.stopping:
            process = worker.process
            assert process is not None
            code = await process.wait()
            if self.stopping:
                return
            say(f"failclosed-pep: worker {worker.index} exited ({code}); restarting")
            await asyncio.sleep(RESTART_DELAY_S)
            if self.stopping:
                return
            self._restarts.inc()
            with contextlib.suppress(TimeoutError, ValueError, OSError):
                await self.spawn(worker)

    async def scrape(self, path: str) -> list[tuple[int, int, bytes]]:
        """(worker, status, body) of `path` on every worker's admin listener; status 0 when it did not answer."""
        assert self._session is not None

        async def one(worker: Worker) -> tuple[int, int, bytes]:
            if worker.admin_port is None or worker.process is None or worker.process.returncode is not None:
                return worker.index, 0, b""
            try:
                async with self._session.get(f"http://127.0.0.1:{worker.admin_port}{path}") as response:  # type: ignore[union-attr]
                    return worker.index, response.status, await response.read()
            except (aiohttp.ClientError, TimeoutError):
                return worker.index, 0, b""

        return list(await asyncio.gather(*(one(w) for w in self.workers)))

    def admin_app(self) -> web.Application:
        async def healthz(_request: web.Request) -> web.Response:
            return web.Response(body=b'{"ok":true}', content_type="application/json")

        async def readyz(_request: web.Request) -> web.Response:
            reasons: list[str] = ["shutting_down"] if self.stopping else []
            for index, status, body in await self.scrape("/readyz"):
                if status != 200:
                    try:
                        theirs = orjson.loads(body).get("reasons") or ["not_ready"]
                    except (orjson.JSONDecodeError, AttributeError):
                        theirs = ["unreachable"]
                    reasons.extend(f"worker {index}: {r}" for r in theirs)
            body = orjson.dumps({"ready": not reasons, "reasons": reasons})
            return web.Response(status=503 if reasons else 200, body=body, content_type="application/json")

        async def metrics(_request: web.Request) -> web.Response:
            scrapes = [(i, body.decode()) for i, status, body in await self.scrape("/metrics") if status == 200]
            registry = CollectorRegistry()
            registry.register(_Scraped(merge(scrapes)))
            text = generate_latest(registry) + generate_latest(self._registry)
            return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app

    async def run(self) -> int:
        placeholder = reserve(self.config.listen)
        self.port = placeholder.getsockname()[1]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        runner = web.AppRunner(self.admin_app(), access_log=None, keepalive_timeout=KEEPALIVE_S)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._signal(signal.SIGHUP))
        watchers: list[asyncio.Task[None]] = []
        try:
            for worker in self.workers:
                await self.spawn(worker)
                if worker.admin_port is None:
                    say(f"failclosed-pep: worker {worker.index} did not start")
                    return 1
            await runner.setup()
            admin = self.config.admin_listen
            site = web.TCPSite(runner, admin.host, admin.port)
            await site.start()
            host, port = bound_address(site)
            listen = Address(self.config.listen.host, self.port)
            say(f"failclosed-pep: {len(self.workers)} workers on {listen}, admin on {Address(host, port)}")
            watchers = [loop.create_task(self.watch(w)) for w in self.workers]
            await stop.wait()
            return 0
        finally:
            self.stopping = True
            await self._stop_workers()
            for task in watchers:
                task.cancel()
            await runner.cleanup()
            await self._session.close()
            placeholder.close()

    def _signal(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(sig)

    async def _stop_workers(self) -> None:
        self._signal(signal.SIGTERM)
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                await asyncio.wait_for(process.wait(), 2 * self.config.shutdown_grace_ms / 1000 + STOP_MARGIN_S)
            except TimeoutError:
                process.kill()
                await process.wait()


def _read_line(fd: int) -> str:
    """The first line a worker writes on its report pipe ('' if it exits first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", "replace").strip()
