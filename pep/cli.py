"""Command line: `pep run`, `pep check`, `pep explain`, `pep demo`."""

from __future__ import annotations

import argparse
import sys

from pep import __version__
from pep.config import ConfigError, load

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pep", description="failclosed-pep: a fail-closed policy proxy")
    parser.add_argument("--version", action="version", version=f"failclosed-pep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the proxy and its admin listener")
    run.add_argument("-c", "--config", required=True, help="config file (YAML)")
    run.add_argument("--worker", help=argparse.SUPPRESS)  # INDEX:PORT:FD:KEYFD, set by the `workers` supervisor
    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("-c", "--config", required=True, help="config file (YAML)")
    explain = sub.add_parser(
        "explain", help="print the policy input, the PDP's answer and the decision for one request (nothing is sent on)"
    )
    explain.add_argument("-c", "--config", required=True, help="config file (YAML)")
    explain.add_argument("-X", "--method", help="HTTP method (default: GET, or POST with --body)")
    explain.add_argument(
        "-H", "--header", action="append", default=[], metavar="K:V", help="a request header (repeatable)"
    )
    explain.add_argument("--body", metavar="FILE", help="the request body, read from FILE (- for stdin)")
    explain.add_argument(
        "--peer-spiffe-id", metavar="ID", help="the caller's SPIFFE ID, as a client certificate would present it (mTLS)"
    )
    explain.add_argument("url", metavar="URL", help="http://host/path?query as the agent would call it, or /path")
    demo = sub.add_parser("demo", help="run the quickstart: a tool API, a PDP and the PEP on loopback")
    demo.add_argument(
        "--pdp",
        choices=("cedar", "cerbos", "opa"),
        default="cedar",
        help="the PDP to decide with (default: the embedded Cedar PDP)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from pep.demo import main as demo_main

        return demo_main(args.pdp)
    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    from pep.preflight import startup_problems, startup_warnings

    # One gate for every command: `check` refuses exactly what `run` would refuse at start (sockets aside).
    problems = startup_problems(config)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        # What would start but deny at once; `run` says the same on stderr (and again whenever it changes).
        for warning in startup_warnings(config):
            print(f"warning: {warning}", file=sys.stderr)
        print("ok")
        return 0
    if args.command == "explain":
        from pep.explain import run as explain

        return explain(config, args.url, args.method, args.header, args.body, args.peer_spiffe_id)
    return _run(config, args.config, args.worker)


def _run(config: object, path: str, worker: str | None) -> int:
    import uvloop

    from pep.app import ReloadError, serve
    from pep.config import Config
    from pep.decision_log import DecisionLogError

    assert isinstance(config, Config)
    from pep.fdlimit import raise_limit

    short = raise_limit(config.max_connections)  # workers inherit it
    if short is not None and worker is None:
        print(f"warning: {config.source}: {short}", file=sys.stderr)
    try:
        if worker is not None:
            index, port, fd, key_fd = (int(part) for part in worker.split(":"))
            uvloop.run(serve(config, (index, port, fd, key_fd)))
        elif config.workers > 1:
            from pep.workers import Supervisor

            return uvloop.run(Supervisor(config, path).run())
        else:
            uvloop.run(serve(config))
    except (DecisionLogError, ReloadError) as exc:
        # Refused at start after the checks passed (a file changed in between): a config error all the same.
        print(f"{config.source}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"{config.source}: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0
