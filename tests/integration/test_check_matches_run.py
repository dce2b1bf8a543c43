"""`pep check` refuses everything `pep run` refuses at start, and warns about what would deny at once.

One table of conditions, each driving both as real child processes on the same config: `check`'s exit code and
`run`'s fate (refused at start, or listening) must agree. The one documented exception: `check` binds no socket,
so a `listen` port that is taken stops `run` only. Only processes started here are signalled, by their own PID.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.process import ensure_stopped, start_pep

EXIT_CONFIG = 2
START_S = 20.0

Raw = dict[str, Any]


@dataclass(frozen=True)
class Case:
    name: str
    change: Callable[[Raw, Path], None]
    refused: bool | None  # None: whatever run does (it depends on the user running the test), check must agree
    says: str = ""  # in both refusals (or in check's warning)


def _set(key: str, value: Callable[[Path], Any]) -> Callable[[Raw, Path], None]:
    def change(raw: Raw, tmp: Path) -> None:
        raw[key] = value(tmp)

    return change


def _log_in(path: Callable[[Path], Path]) -> Callable[[Raw, Path], None]:
    return _set("decision_log", lambda tmp: {"sink": "file", "path": str(path(tmp))})


def _read_only_dir(tmp: Path) -> Path:
    d = tmp / "read-only"
    d.mkdir()
    d.chmod(0o555)
    return d / "decisions.jsonl"


def _opa(**more: Any) -> Callable[[Path], Raw]:
    def build(tmp: Path) -> Raw:
        pdp: Raw = {"kind": "opa", "url": "http://127.0.0.1:9/v1/data/pep/authz"}
        for key, value in more.items():
            pdp[key] = value(tmp) if callable(value) else value
        return pdp

    return build


def _empty_file(tmp: Path) -> str:
    path = tmp / "empty-token"
    path.write_text("\n")
    return str(path)


def _broken_policy(raw: Raw, tmp: Path) -> None:
    Path(raw["pdp"]["policies"]).write_text("permit(principal, action, resource) when {")


def _identity(key: str, value: Raw) -> Callable[[Raw, Path], None]:
    def change(raw: Raw, _tmp: Path) -> None:
        raw["identity"] = {key: value}

    return change


def _credential(raw: Raw, tmp: Path) -> None:
    raw["routes"][0]["credential"] = {"header": "authorization", "value_file": str(tmp / "no-such-token")}


def _jit(raw: Raw, tmp: Path, secret: bool, **more: Any) -> None:
    """routes[0] gets a client-credentials token from a token endpoint (nothing listens there: only the files
    are checked at start); its client secret file exists when `secret`."""
    path = tmp / "as-secret"
    if secret:
        path.write_text("s3cret\n")
        path.chmod(0o600)
    raw["routes"][0]["credential"] = {
        "kind": "client_credentials",
        "token_endpoint": "http://127.0.0.1:9/token",
        "client_id": "pep",
        "client_secret_file": str(path),
        "resource": "https://tools.example/api",
        **more,
    }


CASES = [
    Case("a good config", lambda raw, tmp: None, False),
    Case("an unknown key", _set("surprise", lambda tmp: 1), True, "surprise: unknown key"),
    Case("a decision log in a missing directory", _log_in(lambda t: t / "nope" / "d.jsonl"), True, "does not exist"),
    Case("a decision log path that is a directory", _log_in(lambda t: t), True, "is a directory"),
    Case("a decision log in a read-only directory", _log_in(_read_only_dir), None, "decision_log.path"),
    Case("cedar policies that do not parse", _broken_policy, True, "pdp.policies"),
    Case("a missing PDP CA file", _set("pdp", _opa(tls={"ca_file": "/nonexistent/ca.pem"})), True, "pdp.tls"),
    Case("an empty PDP token file", _set("pdp", _opa(auth=lambda t: {"value_file": _empty_file(t)})), True, "pdp.auth"),
    Case(
        "a missing JWKS file",
        _identity("jwt", {"issuers": ["https://i.example"], "audiences": ["pep"], "jwks_file": "/nonexistent.json"}),
        True,
        "identity.jwt.jwks_file",
    ),
    Case(
        "missing mTLS files",
        _identity("mtls", {"ca_file": "/nonexistent/ca", "cert_file": "/nonexistent/c", "key_file": "/nonexistent/k"}),
        True,
        "identity.mtls.ca_file",
    ),
    Case("a missing route credential: starts, warns", _credential, False, "routes[0].credential.value_file"),
    Case("a just-in-time credential: starts, nothing to warn of", lambda r, t: _jit(r, t, secret=True), False),
    Case(
        "a just-in-time credential without its client secret",
        lambda r, t: _jit(r, t, secret=False),
        True,
        "routes[0].credential.client_secret_file",
    ),
    Case(
        "a just-in-time credential with a missing CA file",
        lambda r, t: _jit(r, t, secret=True, tls={"ca_file": "/nonexistent/ca.pem"}),
        True,
        "routes[0].credential.tls",
    ),
]


def base_config(tmp: Path) -> Raw:
    policy = tmp / "policy.cedar"
    policy.write_text("permit(principal, action, resource);")
    return {
        "version": 1,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "pdp": {"kind": "cedar", "policies": str(policy)},
        "decision_log": {"sink": "file", "path": str(tmp / "decisions.jsonl")},
        "routes": [{"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": "http://127.0.0.1:9"}],
    }


def write(tmp: Path, raw: Raw) -> Path:
    path = tmp / "pep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def check(config: Path) -> tuple[int, str, str]:
    proc = await start_pep("check", "-c", str(config), stdout=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(START_S):
            out, err = await proc.communicate()
    finally:
        await ensure_stopped(proc)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run(config: Path) -> tuple[int | None, str]:
    """`pep run`'s fate: (its exit code, stderr) when it stops at start, (None, stderr so far) once it listens."""
    proc = await start_pep("run", "-c", str(config))
    assert proc.stderr is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(START_S):
            while line := (await proc.stderr.readline()).decode(errors="replace"):
                said.append(line)
                if "proxy on" in line:
                    proc.terminate()
                    await proc.wait()
                    return None, "".join(said)
            return await proc.wait(), "".join(said)
    finally:
        await ensure_stopped(proc)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for d in tmp_path.iterdir():  # let pytest clean up a read-only directory
        if d.is_dir():
            d.chmod(0o755)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_check_refuses_what_run_refuses(workdir: Path, case: Case) -> None:
    raw = base_config(workdir)
    case.change(raw, workdir)
    config = write(workdir, raw)
    (code, out, err), (run_code, run_err) = await asyncio.gather(check(config), run(config))

    run_refused = run_code is not None
    assert (code == EXIT_CONFIG) is run_refused, (case.name, code, err, run_code, run_err)
    if case.refused is not None:
        assert run_refused is case.refused, run_err
    if run_refused:
        assert run_code == EXIT_CONFIG, run_err
        assert out == ""
        assert case.says in err
        assert case.says in run_err
        assert all(line.startswith(f"{config}: ") for line in err.splitlines()), err
        assert "proxy on" not in run_err
    else:
        assert (code, out) == (0, "ok\n"), err
    if case.says and case.refused is False:  # a warning: check says it, and so does run, before it listens
        assert f"warning: {config}: {case.says}" in err
        assert f"failclosed-pep: warning: {config}: {case.says}" in run_err


async def test_check_binds_no_socket_so_a_taken_port_stops_run_only(workdir: Path) -> None:
    """Documented: `pep check` may run where the config will not (CI, another machine): it never binds."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        raw = base_config(workdir)
        raw["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        config = write(workdir, raw)
        (code, out, _), (run_code, run_err) = await asyncio.gather(check(config), run(config))
    assert (code, out) == (0, "ok\n")
    assert run_code == 1
    assert "cannot listen" in run_err
    assert not (workdir / "decisions.jsonl").exists() or (workdir / "decisions.jsonl").stat().st_size == 0


async def test_check_creates_nothing(workdir: Path) -> None:
    raw = base_config(workdir)
    raw["decision_log"] = {"sink": "file", "path": str(workdir / "new.jsonl")}
    code, out, _ = await check(write(workdir, raw))
    assert (code, out) == (0, "ok\n")
    assert not (workdir / "new.jsonl").exists()
