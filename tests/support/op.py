"""A real OpenID Provider (oidc-provider, tests/support/op/op.mjs) as a child process on a free loopback port.

`make op` (a dependency of `make test`) installs oidc-provider pinned by tests/support/op/package-lock.json; this
helper installs nothing and says what to run when it is missing. Everything the OP trusts is made here per test:
its signing key, three clients (one per client authentication method, secrets and keys in files), the accounts
`login_hint` resolves, the resource servers with the scopes each client may have, and a subject-token issuer whose
tokens the test mints (`subject_token`). The test plays the approver through the OP's control endpoints
(`approve`, `deny`, `expire`), injects faults (`fault`), and stops (SIGTERM) or freezes (SIGSTOP) it by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization

from pep.seal import new_key_text
from tests.support.child import ChildProcess
from tests.support.jwt_keys import SigningKey, ec_key

OP_DIR = Path(__file__).resolve().parent / "op"
SCRIPT = OP_DIR / "op.mjs"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_S = 5.0

SUBJECT_ISSUER = "https://agents.issuer.test"
# login_hint -> account id (the ID token's `sub`); each account's `email` claim is ID@example.com.
ACCOUNTS = {"alice": "alice", "alice@example.com": "alice", "bob": "bob", "bob@example.com": "bob"}
# Resource servers: indicator -> audience, scopes, token lifetime (s).
RESOURCES: dict[str, dict[str, Any]] = {
    "https://crm.example/api": {"audience": "crm", "scope": "crm.read crm.write crm.admin", "ttl": 300},
    "https://mail.example/api": {"audience": "mail", "scope": "mail.send", "ttl": 300},
    "https://short.example/api": {"audience": "short", "scope": "short.read", "ttl": 2},
}
# What every test client may ask for: crm.read and crm.write (not crm.admin), mail.send, short.read.
CLIENT_RESOURCES = {
    "https://crm.example/api": "crm.read crm.write",
    "https://mail.example/api": "mail.send",
    "https://short.example/api": "short.read",
}
GRANT_TYPES = [
    "urn:openid:params:grant-type:ciba",
    "client_credentials",
    "urn:ietf:params:oauth:grant-type:token-exchange",
]
SCOPES = ["crm.read", "crm.write", "crm.admin", "mail.send", "short.read"]


class OpUnavailable(RuntimeError):
    """Node or the pinned oidc-provider is missing: `make op` installs it."""


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise OpUnavailable("node is not on PATH; the OpenID Provider of the tests runs on Node.js (make op)")
    if not (OP_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        raise OpUnavailable(f"oidc-provider is not installed in {OP_DIR}/node_modules; run `make op`")
    return node


@dataclass(frozen=True)
class Client:
    """A client of the OP: its id, the authentication method, and the files the PEP reads its credentials from."""

    client_id: str
    auth_method: str
    secret: str | None = None
    secret_file: Path | None = None
    key: SigningKey | None = None
    key_file: Path | None = None  # PEM private key (private_key_jwt)


class OpenIdProvider(ChildProcess):
    """One oidc-provider process. URLs, clients, control helpers; stopped by its own PID."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.signing_key = ec_key("op-1")
        self.subject_key = ec_key("agents-1")
        self.clients: dict[str, Client] = {}
        self.port = 0
        self.issuer = ""
        super().__init__()
        self._log = work / "op.log"
        self._setup = work / "op-setup.json"
        self._make_clients()

    # ---- setup -------------------------------------------------------------------------------------------------
    def _make_clients(self) -> None:
        for client_id, method in (
            ("pep", "client_secret_basic"),
            ("pep-post", "client_secret_post"),
            ("pep-jwt", "private_key_jwt"),
        ):
            if method == "private_key_jwt":
                key = ec_key(f"{client_id}-key")
                key_file = self.work / f"{client_id}.key.pem"
                key_file.write_bytes(
                    key.private.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                key_file.chmod(0o600)
                self.clients[client_id] = Client(client_id, method, key=key, key_file=key_file)
            else:
                secret = secrets.token_urlsafe(32)
                secret_file = self.work / f"{client_id}.secret"
                secret_file.write_text(secret + "\n")
                secret_file.chmod(0o600)
                self.clients[client_id] = Client(client_id, method, secret, secret_file)

    def _client_metadata(self, client: Client) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "client_id": client.client_id,
            "grant_types": GRANT_TYPES,
            "response_types": [],
            "redirect_uris": [],
            "token_endpoint_auth_method": client.auth_method,
            "backchannel_token_delivery_mode": "poll",
            "id_token_signed_response_alg": "ES256",  # the OP signs with one EC key
            "scope": " ".join(["openid", "email", *SCOPES]),
            "resources": CLIENT_RESOURCES,
        }
        if client.secret is not None:
            meta["client_secret"] = client.secret
        if client.key is not None:
            meta["jwks"] = {"keys": [client.key.public_jwk()]}
            meta["token_endpoint_auth_signing_alg"] = "ES256"
        return meta

    def _write_setup(self, port: int) -> None:
        setup = {
            "port": port,
            "signing_key": self.signing_key.private_jwk(),
            "clients": [self._client_metadata(c) for c in self.clients.values()],
            "accounts": ACCOUNTS,
            "resources": RESOURCES,
            "scopes": SCOPES,
            "subject_issuers": {SUBJECT_ISSUER: {"keys": [self.subject_key.public_jwk()]}},
            "ciba_interval": 1,
        }
        self._setup.write_text(json.dumps(setup))

    # ---- URLs --------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/token"

    @property
    def backchannel_endpoint(self) -> str:
        return f"{self.url}/backchannel"

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/jwks"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- life cycle --------------------------------------------------------------------------------------------
    async def start(self, port: int = 0) -> None:
        """Start on `port` (0: a free one, printed by the script) and wait until discovery answers."""
        node = node_binary()
        assert not self.running, "already running"
        self._write_setup(port)
        with self._log.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                node,
                str(SCRIPT),
                str(self._setup),
                stdin=subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=OP_DIR,
            )
        self.frozen = False
        try:
            assert self._proc.stdout is not None
            async with asyncio.timeout(START_TIMEOUT_S):
                line = await self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the OP exited during start-up: {self.log_tail()}")
            started = json.loads(line)
            self.port, self.issuer = int(started["port"]), str(started["issuer"])
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def restart(self) -> None:
        """Stop and start again on the same port (a new process: the OP's state is gone)."""
        port = self.port
        await self.stop()
        await self.start(port)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            while time.monotonic() < deadline:
                if not self.running:
                    raise RuntimeError(f"the OP exited during start-up: {self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.url}/.well-known/openid-configuration") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.02)
        raise RuntimeError(f"the OP was not ready within {START_TIMEOUT_S} s: {self.log_tail()}")

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self._log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    async def stop(self) -> None:
        """SIGTERM (with SIGCONT, so a frozen OP can act on it), wait for the PID; SIGKILL after a bound."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            self._signal(signal.SIGTERM)
            if self.frozen:
                self.resume()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        self._proc = None
        self.frozen = False

    # ---- control endpoints -------------------------------------------------------------------------------------
    async def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        timeout = aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, f"{self.url}/_test/{path}", json=body) as resp,
        ):
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"OP control {method} {path}: {resp.status} {data}")
            return data

    async def ciba_requests(self) -> list[dict[str, Any]]:
        """The backchannel requests the OP accepted, oldest first."""
        found: list[dict[str, Any]] = await self._control("GET", "ciba")
        return found

    async def wait_ciba(self, count: int = 1, seconds: float = 5.0) -> dict[str, Any]:
        """The `count`-th backchannel request, once it has arrived (within `seconds`)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            seen = await self.ciba_requests()
            if len(seen) >= count:
                return seen[count - 1]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no backchannel request #{count} arrived within {seconds} s")

    async def approve(self, auth_req_id: str) -> None:
        await self._control("POST", f"ciba/{auth_req_id}/approve")

    async def deny(self, auth_req_id: str) -> None:
        await self._control("POST", f"ciba/{auth_req_id}/deny")

    async def expire(self, auth_req_id: str) -> None:
        await self._control("POST", f"ciba/{auth_req_id}/expire")

    async def fault(self, mode: str, **how: Any) -> None:
        """Misbehave on OP routes: status (`status`, `body`), malformed (`body`), delay (`delay_ms`), close,
        oauth_error (`error`); `path` limits it to one route, `count` to that many requests; `none` ends it."""
        await self._control("POST", "fault", {"mode": mode, **how})

    async def set_interval(self, seconds: int) -> None:
        await self._control("POST", "config", {"ciba_interval": seconds})

    async def stats(self) -> dict[str, Any]:
        """Requests per path, and token requests per grant type."""
        found: dict[str, Any] = await self._control("GET", "stats")
        return found

    # ---- tokens the test controls ------------------------------------------------------------------------------
    def subject_token(self, sub: str, ttl: int = 300, **extra: Any) -> str:
        """A caller's token from the issuer the OP's token exchange trusts (signed by the test's key)."""
        now = int(time.time())
        claims = {"iss": SUBJECT_ISSUER, "sub": sub, "aud": "failclosed-pep", "iat": now, "exp": now + ttl, **extra}
        return self.subject_key.sign(claims)

    def foreign_token(self, sub: str) -> str:
        """A well-formed token from an issuer the OP does not trust."""
        now = int(time.time())
        claims = {"iss": "https://untrusted.test", "sub": sub, "aud": "failclosed-pep", "iat": now, "exp": now + 60}
        return ec_key("untrusted").sign(claims)


async def running_op(work: Path) -> AsyncIterator[OpenIdProvider]:
    """Start an OP in `work`, yield it, stop it (for fixtures: `async for op in running_op(tmp_path)`)."""
    work.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    op = OpenIdProvider(work)
    await op.start()
    try:
        yield op
    finally:
        await op.stop()


def ticket_key(tmp_path: Path) -> Path:
    """The approval tickets' sealing key in `tmp_path`, made on first use (owner-only, as a key file must be)."""
    key = tmp_path / "ticket.key"
    if not key.exists():
        key.write_text(new_key_text())
        key.chmod(0o600)
    return key


def approvals_section(op: OpenIdProvider, tmp_path: Path, **more: Any) -> dict[str, Any]:
    """The config's `approvals` section for this OP and its `pep` client (short timeouts, ticket key in
    `tmp_path`), with `more` on top."""
    return {
        "issuer": op.issuer,
        "backchannel_authentication_endpoint": op.backchannel_endpoint,
        "token_endpoint": op.token_endpoint,
        "jwks_uri": op.jwks_uri,
        "client_id": "pep",
        "client_auth": "client_secret_basic",  # the default, named
        "client_secret_file": str(op.clients["pep"].secret_file),
        "timeout_ms": 500,
        "min_poll_interval_ms": 50,
        "ticket_key_files": [str(ticket_key(tmp_path))],
        **more,
    }
