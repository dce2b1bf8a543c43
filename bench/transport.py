"""The transports alone, as a trivial proxy: what pep/transport costs per request before any PEP logic.

Not a test and not part of `make bench`: `python -m bench.transport` (after `make bench-deps bench-venv`).

Each target is a proxy process pinned to core 0 in front of the benchmark's nginx stubs (bench/targets.py),
with wrk -t1 -c16 on core 1, interleaved and repeated; CPU time is the proxy's own (utime + stime):
- `transport`: pep/transport's listener and pool; each request is forwarded (hop-by-hop fields dropped, Host
  set) and the answer sent back in one write;
- `transport_pdp`: the same, after asking the PDP stub over the pool (a small JSON POST whose answer is read
  and checked), which is the shape of the PEP's hot path: two upstream exchanges per request;
- `transport_client_pdp`: the same with the PEP's own PDP client (pep.pdp.transport, what `pep run` asks OPA
  with: its headers, request id, answer size limit and content-coding checks) instead of a bare pool request;
- `floor_pdp`: the least a Python proxy can do for the same two exchanges (bench/floor.py: uvloop protocols
  and httptools callbacks, no coroutine per request, no checks at all), the floor under any Python design;
  `floor_task_pdp` the same with a task per request awaiting each answer under a timer;
- `aiohttp`, `aiohttp_pdp`: the same two with aiohttp's server and client (what `pep run` uses today);
- `envoy`: Envoy as a plain router, and `envoy_authz` with the ext_authz filter of `make bench`.

The PEP's own checks (routing, policy input, decision log, metrics) are absent from every target: the point is
the transport's share of the per-request budget. Results go to bench/results/transport.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
from pathlib import Path

import yaml

from bench import measure, procs, targets
from bench.procs import LOOPBACK, BenchError, Proc
from bench.targets import GET, MCP, OPA_BODY, OPA_PATH, Stubs, Workload

ROOT = Path(__file__).resolve().parent.parent
KINDS = (
    "transport",
    "transport_pdp",
    "transport_client_pdp",
    "floor_pdp",
    "floor_task_pdp",
    "aiohttp",
    "aiohttp_pdp",
    "envoy",
    "envoy_authz",
)
_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
    | {b"content-length", b"host"}
)
_HOP_STR = frozenset(h.decode() for h in _HOP)


# --- the proxies under test (run in their own process: `python -m bench.transport serve ...`) -------------------


async def _transport_proxy(
    port: int, upstream_port: int, pdp_port: int | None, stop: asyncio.Event, pep_client: bool = False
) -> None:
    from pep.http1 import Framing
    from pep.pdp.transport import HttpTransport, RawAnswer
    from pep.transport import Exchange, Origin, Pool, serve

    pool = Pool(max_per_origin=64)
    upstream = Origin("http", LOOPBACK, upstream_port)
    pdp = Origin("http", LOOPBACK, pdp_port) if pdp_port is not None else None
    host = f"{LOOPBACK}:{upstream_port}".encode()
    pdp_fields = [(b"Host", f"{LOOPBACK}:{pdp_port}".encode()), (b"Content-Type", b"application/json")]
    allow = OPA_BODY.encode()
    client = HttpTransport(65536, 64) if pep_client else None
    pdp_url = f"http://{LOOPBACK}:{pdp_port}{OPA_PATH}"
    asked = 0

    async def handler(exchange: Exchange) -> None:
        nonlocal asked
        head = exchange.head
        fields = [(n, v) for n, v in head.headers if n.lower() not in _HOP]
        fields.append((b"Host", host))
        body = await exchange.body.read_all(1 << 20, 10.0) if head.framing is not Framing.NONE else None
        if client is not None:
            ask = b'{"input":{"method":"%s","path":"%s"}}' % (head.method, head.target)
            asked += 1
            said = await client.post(
                pdp_url, ask, {"Content-Type": "application/json", "X-Request-ID": f"{asked:032x}"}
            )
            if not isinstance(said, RawAnswer) or said.status != 200 or said.body != allow:
                exchange.response.send(403, [], b"denied")
                return
        elif pdp is not None:
            ask = b'{"input":{"method":"%s","path":"%s"}}' % (head.method, head.target)
            answer = await pool.request(pdp, b"POST", OPA_PATH.encode(), pdp_fields, ask, read_s=0.25)
            if answer.status != 200 or await answer.read_all(65536) != allow:
                exchange.response.send(403, [], b"denied")
                return
        response = await pool.request(upstream, head.method, head.target, fields, body, read_s=30.0)
        data = await response.read_all(1 << 24)
        out = [(n, v) for n, v in response.fields if n.lower() not in _HOP]
        exchange.response.send(response.status, out, data, response.reason)

    listener = await serve(LOOPBACK, port, handler)
    await stop.wait()
    await listener.close(1.0)
    await pool.close()
    if client is not None:
        await client.close()


async def _aiohttp_proxy(port: int, upstream_port: int, pdp_port: int | None, stop: asyncio.Event) -> None:
    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=30),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
    )
    base = f"http://{LOOPBACK}:{upstream_port}"
    pdp_url = f"http://{LOOPBACK}:{pdp_port}{OPA_PATH}"

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_STR]
        body = await request.read() if request.body_exists else None
        if pdp_port is not None:
            ask = json.dumps({"input": {"method": request.method, "path": request.raw_path}})
            async with session.post(pdp_url, data=ask, headers={"Content-Type": "application/json"}) as answer:
                if answer.status != 200 or await answer.text() != OPA_BODY:
                    return web.Response(status=403, body=b"denied")
        async with session.request(request.method, base + request.raw_path, headers=headers, data=body) as up:
            data = await up.read()
            out = [(k, v) for k, v in up.headers.items() if k.lower() not in _HOP_STR]
            return web.Response(status=up.status, reason=up.reason, headers=out, body=data)

    runner = web.ServerRunner(web.Server(handler, access_log=None, auto_decompress=False))
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, port, backlog=1024).start()
    await stop.wait()
    await runner.cleanup()
    await session.close()


def serve_main(args: argparse.Namespace) -> int:
    import uvloop

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        pdp = args.pdp if args.kind.endswith("_pdp") else None
        if args.kind.startswith("floor"):
            from bench.floor import Floor

            tasks = args.kind == "floor_task_pdp"
            await Floor(LOOPBACK, args.upstream, args.pdp, OPA_PATH, OPA_BODY.encode(), tasks).serve(args.port, stop)
        elif args.kind.startswith("transport"):
            await _transport_proxy(args.port, args.upstream, pdp, stop, args.kind == "transport_client_pdp")
        else:
            await _aiohttp_proxy(args.port, args.upstream, pdp, stop)

    uvloop.run(run())
    return 0


# --- the run ------------------------------------------------------------------------------------------------------


def _start(kind: str, stubs: Stubs, work: Path, envoy_bin: Path) -> tuple[Proc, int]:
    port, admin = procs.free_port(), procs.free_port()
    run_dir = work / f"{kind}-{port}"
    run_dir.mkdir(parents=True)
    if kind.startswith("envoy"):
        config = targets.envoy_config(stubs, port, admin)
        if kind == "envoy":  # a plain router: the ext_authz filter removed
            listener = config["static_resources"]["listeners"][0]  # type: ignore[index]
            hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
            hcm["http_filters"] = [f for f in hcm["http_filters"] if "ext_authz" not in f["name"]]
        path = run_dir / "envoy.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [str(envoy_bin), "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"]
    else:
        argv = [sys.executable, "-m", "bench.transport", "serve", kind, "--port", str(port)]
        argv += ["--upstream", str(stubs.upstream_port), "--pdp", str(stubs.pdp_port)]
    proc = procs.start(kind, procs.pinned(targets.PROXY_CORES, argv), run_dir / "output.log")
    procs.wait_listening(proc, port)
    return proc, port


def run_main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out_dir = Path(args.out_dir)
    work = out_dir / "work-transport"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    envoy_bin = targets.envoy_binary(Path(args.envoy_venv))
    kinds = [k for k in KINDS if k in args.kinds.split(",")]
    workloads = [GET, MCP]
    scripts = {w.name: measure.wrk_script(w, work) for w in workloads}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {w.name: {k: [] for k in kinds} for w in workloads}
    stubs = targets.start_stubs(work)
    try:
        for rep in range(args.repetitions):
            for workload in workloads:
                for kind in kinds:
                    run = _measure(kind, workload, stubs, work, envoy_bin, scripts[workload.name], args)
                    runs[workload.name][kind].append(run)
                    print(
                        f"bench: [{rep + 1}/{args.repetitions}] {workload.name}/{kind}: {run['rps']:,.0f} req/s, "
                        f"{run['cpu_us']:.1f} CPU us/req",
                        file=sys.stderr,
                        flush=True,
                    )
        if args.profile:
            for workload in workloads:
                _profile(workload, stubs, work, envoy_bin, scripts[workload.name], args)
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        stubs.proc.stop()
    result = {"settings": vars(args), "runs": runs, "median": _medians(runs)}
    (out_dir / "transport.json").write_text(json.dumps(result, indent=2))
    table = _table(result["median"])
    (out_dir / "transport.md").write_text(table)
    print(table)
    return 0


def _measure(
    kind: str, workload: Workload, stubs: Stubs, work: Path, envoy_bin: Path, script: Path, args: argparse.Namespace
) -> dict[str, float]:
    proc, port = _start(kind, stubs, work, envoy_bin)
    try:
        measure.wrk(port, workload, script, 16, args.warmup)
        before = procs.tree_cpu_seconds(proc.pid)
        closed = measure.wrk(port, workload, script, 16, args.seconds)
        cpu_s = procs.cpu_delta(before, procs.tree_cpu_seconds(proc.pid))
        single = measure.wrk(port, workload, script, 1, max(1, args.seconds // 2))
        if not proc.alive():
            raise BenchError(f"{kind} exited during the run:\n{proc.log_tail()}")
        return {
            "rps": closed["rps"],
            "cpu_us": cpu_s * 1e6 / closed["requests"],
            "p50_us": closed["p50_us"],
            "p99_us": closed["p99_us"],
            "c1_p50_us": single["p50_us"],
        }
    finally:
        proc.stop()


def _profile(
    workload: Workload, stubs: Stubs, work: Path, envoy_bin: Path, script: Path, args: argparse.Namespace
) -> None:
    from bench.profile import profile
    from bench.targets import Running

    for kind in ("transport_pdp",):
        proc, port = _start(kind, stubs, work, envoy_bin)
        try:
            pyspy = Path(args.envoy_venv) / "bin" / "py-spy"
            found = profile(Running(targets.PEP, port, proc), workload, script, pyspy, args.profile, work)
            print(f"profile {workload.name}/{kind}: {json.dumps(found, indent=1)}")
        finally:
            proc.stop()


def _medians(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, dict[str, dict[str, float]]]:
    return {
        w: {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in kinds.items() if rs}
        for w, kinds in runs.items()
    }


def _table(median: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| workload | target | req/s c16 | CPU µs/req | req/s per CPU-s | p50 / p99 c16 ms | p50 c1 ms "
        "| vs Envoy req/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, kinds in median.items():
        for kind, m in kinds.items():
            peer = kinds.get("envoy_authz" if kind.endswith("_pdp") else "envoy")
            ratio = f"{m['rps'] / peer['rps']:.2f}x" if peer and not kind.startswith("envoy") else "-"
            lines.append(
                f"| {workload} | {kind} | {m['rps']:,.0f} | {m['cpu_us']:.1f} | {1e6 / m['cpu_us']:,.0f} | "
                f"{m['p50_us'] / 1000:.3f} / {m['p99_us'] / 1000:.3f} | {m['c1_p50_us'] / 1000:.3f} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def instructions_main(args: argparse.Namespace) -> int:
    """Instructions per proxied request under callgrind (bench/callgrind.py), each kind once per repetition."""
    from bench.callgrind import instructions

    out_dir = Path(args.out_dir)
    work = out_dir / "work-callgrind"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    workloads = [w for w in (GET, MCP) if w.name in args.workloads.split(",")]
    kinds = [k for k in args.kinds.split(",") if (k in KINDS or k == "pep") and not k.startswith("envoy")]
    stubs = targets.start_stubs(work)
    try:
        for rep in range(args.repetitions):
            for workload in workloads:
                script = measure.wrk_script(workload, work)
                for kind in kinds:
                    port = procs.free_port()
                    name = f"{kind}-{workload.name}-{rep}"
                    if kind == "pep":  # the whole PEP, as `make bench` runs it (OPA on the PDP stub, no log)
                        config = targets.pep_config(targets.PEP, stubs, port, procs.free_port(), work)
                        # Under valgrind an ask can outlast the 250 ms deadline: a request denied then never
                        # reaches the upstream, and would be counted as instructions without a request.
                        config["pdp"] = {**config["pdp"], "timeout_ms": 10_000}  # type: ignore[dict-item]
                        config_path = work / f"{name}.yaml"
                        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
                        argv = [sys.executable, "-m", "pep", "run", "--config", str(config_path)]
                    else:
                        argv = [sys.executable, "-m", "bench.transport", "serve", kind, "--port", str(port)]
                        argv += ["--upstream", str(stubs.upstream_port), "--pdp", str(stubs.pdp_port)]
                    got = instructions(name, argv, port, stubs, workload, script, work, args.seconds)
                    per = 2 if kind.endswith("_pdp") or kind == "pep" else 1  # nginx requests per proxied request
                    proxied = got["requests"] / per
                    print(
                        f"callgrind: [{rep + 1}/{args.repetitions}] {workload.name}/{kind}: "
                        f"{got['instructions'] / proxied:,.0f} instructions per request ({proxied:,.0f} requests)",
                        flush=True,
                    )
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        stubs.proc.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run one proxy under test (started by `run`)")
    serve.add_argument("kind", choices=[k for k in KINDS if not k.startswith("envoy")])
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--upstream", type=int, required=True)
    serve.add_argument("--pdp", type=int, required=True)
    count = sub.add_parser("instructions", help="instructions per request under callgrind (repeatable)")
    count.add_argument("--kinds", default="transport,transport_pdp")
    count.add_argument("--workloads", default="get,mcp_2k")
    count.add_argument("--repetitions", type=int, default=1)
    count.add_argument("--seconds", type=float, default=15.0)
    count.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    run = sub.add_parser("run", help="measure every target (the default)")
    for p in (parser, run):
        p.add_argument("--kinds", default=",".join(KINDS))
        p.add_argument("--repetitions", type=int, default=3)
        p.add_argument("--seconds", type=int, default=5)
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--profile", type=int, default=0, help="seconds of py-spy per workload on transport_pdp")
        p.add_argument("--envoy-venv", default=str(ROOT / ".venv-bench"))
        p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_main(args)
    if args.command == "instructions":
        return instructions_main(args)
    return run_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
