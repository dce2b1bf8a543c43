"""Memory allocated per proxied request: the PEP in-process under tracemalloc, driven by an aiohttp client.

Method (also written into the JSON as `method`). tracemalloc knows the bytes currently allocated and their peak,
not a running total of every allocation, so per request we measure the high-water mark above the live memory at
the start of a window: `reset_peak()` when the window opens, `peak - current_at_open` when it closes. Each byte
counted was allocated during the window and was live at the same moment as all the others, so the figure is a
lower bound of the bytes allocated per request (memory freed and reused inside the window is counted once). It is
deterministic enough to track from one commit to the next, which is what item 4 of issue 7 needs.

Windows, with requests sent one at a time over one keep-alive connection:
- `handler`: around the PEP's request handler (`pep.proxy.Proxy.handle`): routing, the input document, the PDP
  call, the upstream call and relaying the answer. The client is suspended awaiting the answer meanwhile; only
  response parsing it may run on the shared event loop while the handler finishes is inside this window.
- `end_to_end`: around the client's whole request (send, the PEP, read the answer), client included.
- `client_only`: the same window with the client talking to the upstream directly, no PEP: subtracted from
  `end_to_end` it estimates what the PEP adds, the listener's HTTP/1.1 parsing (pep/transport) included.
- `retained`: the growth of live memory over all requests (snapshot diff, client files excluded by filename
  under aiohttp/client*), divided by the number of requests: should be ~0; more is a leak.

Usage: python -m bench.alloc --config PEP.yaml --upstream-port P --requests N --out FILE.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.targets import WORKLOADS, Workload

_CLIENT_FILES = ("*/aiohttp/client*", "*/bench/alloc.py")


class HandlerWindows:
    """Wraps Proxy.handle (class level, before the server is built) to measure each call's window."""

    def __init__(self) -> None:
        self.active = False
        self.samples: list[int] = []

    def install(self) -> bool:
        try:
            from pep.proxy import Proxy
        except ImportError:
            return False
        original = getattr(Proxy, "handle", None)
        if original is None:
            return False
        windows = self

        async def handle(self: Any, request: Any) -> Any:
            if not windows.active:
                return await original(self, request)
            start = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            try:
                return await original(self, request)
            finally:
                windows.samples.append(tracemalloc.get_traced_memory()[1] - start)

        Proxy.handle = handle  # type: ignore[method-assign,assignment]
        return True


def _summary(samples: list[int]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[int(len(ordered) * 0.9) - 1] if len(ordered) >= 10 else ordered[-1],
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


async def _windows(send: Callable[[], Awaitable[None]], n: int) -> list[int]:
    samples: list[int] = []
    for _ in range(n):
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await send()
        samples.append(tracemalloc.get_traced_memory()[1] - start)
    return samples


def _sender(session: aiohttp.ClientSession, base: str, workload: Workload) -> Callable[[], Awaitable[None]]:
    url = base + workload.path
    headers = dict(workload.headers)
    body = workload.body or None

    async def send() -> None:
        async with session.request(workload.method, url, headers=headers, data=body) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"{workload.method} {url}: status {response.status} {response.headers!r}")

    return send


async def measure(config_path: str, upstream_port: int, n: int, warmup: int) -> dict[str, Any]:
    from pep.app import Server
    from pep.config import load

    windows = HandlerWindows()
    wrapped = windows.install()
    server = Server(load(config_path))
    await server.start()
    assert server.proxy_address is not None
    pep_base = f"http://{server.proxy_address}"
    direct_base = f"http://127.0.0.1:{upstream_port}"
    results: dict[str, Any] = {}
    try:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for workload in WORKLOADS.values():
                via_pep = _sender(session, pep_base, workload)
                direct = _sender(session, direct_base, workload)
                for _ in range(warmup):  # pools, caches, lazily built state: not per-request costs
                    await via_pep()
                    await direct()
                gc.collect()
                tracemalloc.start(1)
                try:
                    client_only = await _windows(direct, n)
                    gc.collect()
                    before = tracemalloc.take_snapshot()
                    end_to_end = await _windows(via_pep, n)
                    gc.collect()
                    after = tracemalloc.take_snapshot()
                    # A pass of its own: the handler's reset_peak() would cut the end-to-end windows short.
                    windows.samples.clear()
                    windows.active = True
                    for _ in range(n):
                        await via_pep()
                    windows.active = False
                finally:
                    tracemalloc.stop()
                keep = [tracemalloc.Filter(False, pattern) for pattern in _CLIENT_FILES]
                keep.append(tracemalloc.Filter(False, tracemalloc.__file__))
                growth = after.filter_traces(keep).compare_to(before.filter_traces(keep), "lineno")
                retained = sum(stat.size_diff for stat in growth)
                e2e = _summary(end_to_end)
                client = _summary(client_only)
                results[workload.name] = {
                    "requests": n,
                    "handler_bytes": _summary(windows.samples),
                    "end_to_end_bytes": e2e,
                    "client_only_bytes": client,
                    "pep_share_bytes_estimate": e2e["median"] - client["median"],
                    "retained_bytes_per_request": retained / n,
                    "top_retained": [
                        {"where": str(stat.traceback[0]), "bytes": stat.size_diff}
                        for stat in growth[:5]
                        if stat.size_diff > 0
                    ],
                }
    finally:
        await server.stop()
    return {"handler_window": wrapped, "method": (__doc__ or "").split("Usage:")[0].strip(), **results}


def main() -> None:
    parser = argparse.ArgumentParser(description="bytes allocated per proxied request (tracemalloc)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import uvloop

    # The event loop `pep run` uses.
    result = uvloop.run(measure(args.config, args.upstream_port, args.requests, args.warmup))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
