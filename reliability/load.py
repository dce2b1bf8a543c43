"""The open-loop load: request `i` is due at `t0 + i / rate`, whatever happened to the earlier ones.

A process of its own (`python -m reliability.load ...`), so the harness's work (the upstream, the fault PDP,
sampling /proc) never delays a send. Each PEP gets a fixed pool of keep-alive connections, opened before the
clock starts and used in turn (FIFO, so none idles towards the PEP's keep-alive timeout); a connection that
ends (a dropped SSE stream, a cut response, `Connection: close`) is replaced at once, so the PEPs see the same
number of client connections all along and their file descriptors can be compared over time. When every
connection is busy a due request waits for one, and its latency still counts from its due time (no
coordinated omission).

Every request ends in exactly one outcome: `complete` (a whole HTTP answer), `truncated` (the status line and
part of the body, then the connection ended), `client_drop` (this client dropped an SSE stream on purpose),
`conn_error` (the connection failed before a status line) or `timeout` (no answer within ANSWER_TIMEOUT_S).
The harness explains or fails each one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from reliability.plan import KINDS, PEPS, SSE_DROP, SSE_DROP_AFTER, Kind, request_id, sequence, warm_id

ANSWER_TIMEOUT_S = 15.0  # far above anything the PEP should take (its longest deadline here is 0.3 s)
POOL_SIZE = 128  # connections per PEP
HEAD_LIMIT = 65536
_READ = 65536


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    uses: int = 0

    def abort(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()


@dataclass
class Pool:
    """A fixed number of keep-alive connections to one PEP."""

    port: int
    size: int
    idle: deque[Conn] = field(default_factory=deque)
    waiters: deque[asyncio.Future[Conn]] = field(default_factory=deque)
    opened: int = 0
    replaced: int = 0
    open_failures: int = 0
    max_waiting: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def connect(self) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=HEAD_LIMIT)
        self.opened += 1
        return Conn(reader, writer)

    async def fill(self) -> None:
        for conn in await asyncio.gather(*(self.connect() for _ in range(self.size))):
            self.idle.append(conn)

    async def acquire(self) -> Conn:
        if self.idle:
            return self.idle.popleft()
        waiter: asyncio.Future[Conn] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.max_waiting = max(self.max_waiting, len(self.waiters))
        return await waiter

    def release(self, conn: Conn) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def replace(self, conn: Conn) -> None:
        """`conn` is finished with: close it and put a new connection in its place."""
        conn.abort()
        self.replaced += 1
        task = asyncio.get_running_loop().create_task(self._reopen())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reopen(self) -> None:
        for _ in range(50):
            try:
                conn = await self.connect()
            except OSError:
                self.open_failures += 1
                await asyncio.sleep(0.1)
                continue
            self.release(conn)
            return

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        while self.idle:
            conn = self.idle.popleft()
            conn.writer.close()
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()


def raw_request(kind: Kind, i: int, rid: str, port: int) -> bytes:
    lines = [
        f"{kind.method} {kind.raw_target(i)} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"X-Request-ID: {rid}",
        "User-Agent: failclosed-pep-reliability",
    ]
    if kind.body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(kind.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (kind.body or b"")


class _Answer:
    __slots__ = ("body_bytes", "decision", "events", "headers", "keep_alive", "reason", "request_id", "status", "uerr")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.decision: str | None = None
        self.reason: str | None = None
        self.uerr: str | None = None
        self.request_id: str | None = None
        self.keep_alive = True
        self.body_bytes = 0
        self.events = 0


class ClientDrop(Exception):
    """This client dropped the stream on purpose."""


async def _read_head(reader: asyncio.StreamReader, answer: _Answer) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    answer.status = int(status)
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            answer.headers[name.strip().lower()] = value.strip()
    h = answer.headers
    answer.decision = h.get("x-pep-decision")
    answer.reason = h.get("x-pep-reason")
    answer.uerr = h.get("x-pep-upstream-error")
    answer.request_id = h.get("x-request-id")
    connection = h.get("connection", "").lower()
    answer.keep_alive = version == "HTTP/1.1" and "close" not in connection


async def _read_body(reader: asyncio.StreamReader, answer: _Answer, method: str, drop_after: int | None) -> None:
    """Reads (and counts, never keeps) the body. With `drop_after`, raises ClientDrop after that many events."""
    h = answer.headers
    if method == "HEAD" or answer.status in (204, 304) or 100 <= answer.status < 200:
        return
    sse = h.get("content-type", "").startswith("text/event-stream")

    def seen(data: bytes) -> None:
        answer.body_bytes += len(data)
        if sse:
            answer.events += data.count(b"\n\n")
            if drop_after is not None and answer.events >= drop_after:
                raise ClientDrop

    if "chunked" in h.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the empty line
                    pass
                return
            left = size
            while left:
                data = await reader.readexactly(min(left, _READ))
                left -= len(data)
                seen(data)
            await reader.readexactly(2)
    elif "content-length" in h:
        left = int(h["content-length"])
        while left:
            data = await reader.read(min(left, _READ))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            seen(data)
    else:
        answer.keep_alive = False
        while data := await reader.read(_READ):
            seen(data)


async def exchange(pool: Pool, kind: Kind, i: int, rid: str) -> dict[str, Any]:
    """Sends one request on a pooled connection and reads its answer; never raises. Times are monotonic."""
    result: dict[str, Any] = {"i": i, "kind": kind.name, "rid": rid}
    conn = await pool.acquire()
    result["sent"] = time.monotonic()
    result["reused"] = conn.uses > 0
    conn.uses += 1
    answer = _Answer()
    stage = "send"
    outcome = "complete"
    detail = ""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            conn.writer.write(raw_request(kind, i, rid, pool.port))
            await conn.writer.drain()
            stage = "head"
            await _read_head(conn.reader, answer)
            stage = "body"
            await _read_body(conn.reader, answer, kind.method, SSE_DROP_AFTER if kind.allowed == SSE_DROP else None)
    except ClientDrop:
        outcome = "client_drop"
    except TimeoutError:
        outcome, detail = "timeout", f"no complete answer within {ANSWER_TIMEOUT_S:g} s (stage {stage})"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        outcome = "truncated" if stage == "body" else "conn_error"
        detail = f"{stage}: {type(exc).__name__}: {exc}"[:200]
    result["done"] = time.monotonic()
    if outcome == "complete" and answer.keep_alive:
        pool.release(conn)
    else:
        pool.replace(conn)
    result.update(
        outcome=outcome,
        detail=detail,
        status=answer.status,
        decision=answer.decision,
        reason=answer.reason,
        uerr=answer.uerr,
        answer_rid=answer.request_id,
        bytes=answer.body_bytes,
        events=answer.events,
        content_length=answer.headers.get("content-length"),
    )
    return result


def _to_wall(results: list[dict[str, Any]], offset: float) -> None:
    for r in results:
        for key in ("due", "sent", "done"):
            if key in r:
                r[key] = round(r[key] + offset, 6)


async def warm(ports: dict[str, int]) -> list[dict[str, Any]]:
    """One request of each kind, one after the other, on one connection per PEP (ids `warm-<kind>`).
    Run by the harness before the load, so lazily created things exist before the baseline is taken."""
    pools = {pep: Pool(port, 1) for pep, port in ports.items()}
    for pool in pools.values():
        await pool.fill()
    results = []
    for kind in KINDS:
        results.append(await exchange(pools[kind.pep], kind, -1, warm_id(kind.name)))
    for pool in pools.values():
        await pool.close()
    _to_wall(results, time.time() - time.monotonic())
    return results


async def run(ports: dict[str, int], rate: float, duration: float, t0_wall: float, seed: int) -> dict[str, Any]:
    total = int(rate * duration)
    kinds = sequence(total, seed)
    pools = {pep: Pool(ports[pep], POOL_SIZE) for pep in PEPS}
    for pool in pools.values():
        await pool.fill()
    offset = time.time() - time.monotonic()  # monotonic -> wall clock (the decision log's clock)
    t0 = t0_wall - offset
    results: list[dict[str, Any]] = []
    tasks: set[asyncio.Task[None]] = set()
    lags: list[float] = []

    async def one(i: int, kind: Kind, due: float) -> None:
        r = await exchange(pools[kind.pep], kind, i, request_id(i))
        r["due"] = due
        r["pep"] = kind.pep
        results.append(r)

    started = time.monotonic()
    for i, kind in enumerate(kinds):
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.monotonic() - due)
        task = asyncio.create_task(one(i, kind, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sending_s = time.monotonic() - max(t0, started)
    if tasks:
        await asyncio.wait(tasks, timeout=ANSWER_TIMEOUT_S + 10)
    unanswered = len(tasks)
    for task in list(tasks):
        task.cancel()
    for pool in pools.values():
        await pool.close()
    _to_wall(results, offset)
    lags.sort()
    return {
        "intended": total,
        "sent": len(lags),
        "sending_s": round(sending_s, 3),
        "unfinished": unanswered,
        "send_lag_ms": {
            "p50": round(lags[len(lags) // 2] * 1000, 3) if lags else None,
            "p99": round(lags[int(len(lags) * 0.99)] * 1000, 3) if lags else None,
            "max": round(lags[-1] * 1000, 3) if lags else None,
        },
        "pools": {
            pep: {
                "size": p.size,
                "opened": p.opened,
                "replaced": p.replaced,
                "open_failures": p.open_failures,
                "max_waiting": p.max_waiting,
            }
            for pep, p in pools.items()
        },
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="open-loop load for the reliability run")
    parser.add_argument("--port", action="append", required=True, help="PEP=PORT, for each of: " + ", ".join(PEPS))
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--t0", type=float, required=True, help="wall-clock time (epoch seconds) of request 0")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ports = {}
    for item in args.port:
        pep, _, port = item.partition("=")
        ports[pep] = int(port)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        runner = asyncio.run
    summary = runner(run(ports, args.rate, args.duration, args.t0, args.seed))
    Path(args.out).write_bytes(orjson.dumps(summary))


if __name__ == "__main__":
    main()
