"""An open-loop HTTP/1.1 load generator that is safe from coordinated omission.

Request i is due at `start + i / rate`, whatever happened to earlier requests. Its latency is measured from that
intended time to the last byte of its response, so time a request spent waiting behind a slow one (for a free
connection, or because the generator was late) counts against the target, as in wrk2 or vegeta. Neither is
packaged for Debian 12, hence this small generator (stdlib only, one thread, non-blocking sockets).

Timing: `select()` takes a timeout in microseconds (epoll's is milliseconds), and the timer slack of the process is
set to 1 us, so sends leave within tens of microseconds of their due time; how late they left is reported
(`send_lag_us`), and it is part of every latency, as it must be. Connections are opened before the clock starts and
kept alive; when all are busy, due requests queue (still timed from their due time). Any answer that is not 2xx,
a closed connection or a request unanswered at the end is counted, and the caller fails the run on it.

Usage: python -m bench.openloop --port P --request FILE --rate R --duration S --out FILE.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import select
import socket
import time
from collections import deque
from pathlib import Path

PR_SET_TIMERSLACK = 29


class Connection:
    """One keep-alive connection with at most one request in flight, and an incremental response parser."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.due = 0.0  # the intended send time of the request in flight
        self.busy = False
        self.status = 0

    def send(self, request: bytes, due: float) -> None:
        self.due = due
        self.busy = True
        self.buf.clear()
        view = memoryview(request)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                select.select([], [self.sock], [], 1.0)
                continue
            view = view[sent:]

    def complete(self) -> bool:
        """Whether `buf` holds a whole response (Content-Length or chunked); sets `status`."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        self.status = int(head[0].split(" ", 2)[1])
        length: int | None = None
        chunked = False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        body_at = end + 4
        if chunked:
            return _chunked_end(buf, body_at) is not None
        if length is None:
            raise ValueError("a response without Content-Length or chunked encoding")
        return len(buf) >= body_at + length

    def close(self) -> None:
        self.sock.close()


def _chunked_end(buf: bytearray, pos: int) -> int | None:
    """The offset after a complete chunked body starting at `pos`, or None while incomplete."""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", eol)
            if eol + 2 <= len(buf) and buf[eol + 2 : eol + 4] == b"\r\n":
                return eol + 4
            return trailer_end + 4 if trailer_end >= 0 else None
        pos = eol + 2 + size + 2
        if pos > len(buf):
            return None


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


def run(
    host: str, port: int, request: bytes, rate: float, duration: float, connections: int, grace: float
) -> dict[str, object]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        slack_set = libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        slack_set = False
    pool = [Connection(host, port) for _ in range(connections)]
    by_fd = {c.sock.fileno(): c for c in pool}
    idle = list(pool)
    waiting: deque[float] = deque()
    total = int(rate * duration)
    interval = 1.0 / rate
    latencies: list[int] = []
    lags: list[int] = []
    non_2xx = 0
    closed = 0
    max_waiting = 0
    clock = time.perf_counter
    start = clock() + 0.05
    deadline = start + duration + grace
    issued = 0
    done = 0
    while done < total:
        now = clock()
        if now > deadline:
            break
        while issued < total and start + issued * interval <= now:
            waiting.append(start + issued * interval)
            issued += 1
        max_waiting = max(max_waiting, len(waiting))
        while waiting and idle:
            conn = idle.pop()
            due = waiting.popleft()
            lags.append(int((clock() - due) * 1e6))
            conn.send(request, due)
        busy = [c.sock for c in pool if c.busy]
        timeout = start + issued * interval - clock() if issued < total else 0.05
        readable, _, _ = select.select(busy, [], [], max(0.0, min(timeout, 0.05)))
        for sock in readable:
            conn = by_fd[sock.fileno()]
            try:
                data = sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                # The target closed the connection: the request failed. Replace the connection.
                closed += 1
                done += 1
                pool.remove(conn)
                del by_fd[sock.fileno()]
                conn.close()
                fresh = Connection(host, port)
                pool.append(fresh)
                by_fd[fresh.sock.fileno()] = fresh
                idle.append(fresh)
                continue
            conn.buf += data
            if conn.complete():
                latencies.append(int((clock() - conn.due) * 1e6))
                if not 200 <= conn.status < 300:
                    non_2xx += 1
                conn.busy = False
                idle.append(conn)
                done += 1
    elapsed = clock() - start
    unanswered = total - done
    for conn in pool:
        conn.close()
    latencies.sort()
    lags.sort()
    return {
        "rate": rate,
        "duration_s": duration,
        "connections": connections,
        "intended": total,
        "completed": len(latencies),
        "non_2xx": non_2xx,
        "closed": closed,
        "unanswered": unanswered,
        "elapsed_s": round(elapsed, 3),
        "achieved_rate": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        "max_queued": max_waiting,
        "timer_slack_1us": slack_set,
        "send_lag_us": {"p50": percentile(lags, 50), "p99": percentile(lags, 99), "max": lags[-1] if lags else 0},
        "latency_us": {
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "p99.9": percentile(latencies, 99.9),
            "max": latencies[-1] if latencies else 0,
        },
        "latencies_us": latencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--request", required=True, help="file with the raw HTTP/1.1 request")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds of sending")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to wait for the last answers")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = run(
        args.host, args.port, Path(args.request).read_bytes(), args.rate, args.duration, args.connections, args.grace
    )
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
