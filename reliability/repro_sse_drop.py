"""Reproduces a miscount found by the reliability run: a client dropping a relayed stream counted as an upstream
failure (`pep_upstream_failures_total{kind="reset"}`). See docs/reliability.md, Findings.

    .venv/bin/python -m reliability.repro_sse_drop [--drops 200]

One `pep run` (the fault PEP's config, the fault PDP allowing) in front of the recording upstream streaming an
event stream without pauses; the client reads three events of each stream and resets its connection. Exit 1 when
any of the drops was counted as an upstream failure, 0 when none was.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
from pathlib import Path

import aiohttp

from reliability.stack import PepProcess, TimedFaultPdp, TrackingUpstream, fault_pep_config
from tests.support.cerbos import free_port
from tests.support.observe import metric


async def repro(drops: int, out: Path) -> float:
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # the upstream double's failed writes
    upstream = TrackingUpstream()
    await upstream.start()
    pdp = TimedFaultPdp()
    await pdp.start()
    deadend = f"http://127.0.0.1:{free_port()}"
    pep = await PepProcess.start("fault", fault_pep_config(pdp.url, upstream.url, deadend, out / "d.jsonl"), out)
    try:
        for i in range(drops):
            reader, writer = await asyncio.open_connection("127.0.0.1", pep.proxy_port)
            writer.write(
                f"GET /faults/sse?n=400&gap_ms=0 HTTP/1.1\r\nHost: x\r\nX-Request-ID: drop-{i}\r\n\r\n".encode()
            )
            await reader.readuntil(b"\r\n\r\n")
            seen = b""
            while seen.count(b"\n\n") < 3:
                seen += await reader.read(4096)
            writer.transport.abort()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as session, session.get(f"{pep.admin_url}/metrics") as resp:
            text = await resp.text()
        return metric(text, "pep_upstream_failures_total", route="faults", kind="reset")
    finally:
        await pep.stop()
        await pdp.stop()
        await upstream.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--drops", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pep-sse-drop-") as tmp:
        counted = asyncio.run(repro(args.drops, Path(tmp)))
    print(
        f"{args.drops} streams dropped by the client; "
        f'pep_upstream_failures_total{{route="faults",kind="reset"}} = {counted:g} (want 0)'
    )
    return 1 if counted else 0


if __name__ == "__main__":
    raise SystemExit(main())
