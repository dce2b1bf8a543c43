"""Seed situation "a workload requests a short-lived credential, but the broker is down", end to end.

A running PEP (the in-process Server, real sockets) in front of a resource server that accepts only tokens the
real OpenID Provider (oidc-provider, tests/support/op.py) issued: it fetches the OP's JWKS and checks the
signature, audience and scope. The caller's verified token is exchanged (RFC 8693) after the PDP's allow,
narrowed by the PDP's obligation; a client-credentials route needs no caller token. Every outage of the token
endpoint (stopped, frozen, slow, 5xx, malformed) is `credential_unavailable` with nothing forwarded, and no
token, the caller's or an issued one, reaches the decision log, the metrics or the agent's answer.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict

from pep.config import load
from pep.explain import Request, explain
from tests.conftest import PepStarter, RunningPep
from tests.support.fault_pdp import FaultPdp, Mode
from tests.support.jwt_keys import write_jwks
from tests.support.observe import metric
from tests.support.op import SUBJECT_ISSUER, OpenIdProvider, running_op
from tests.support.process import cedar_config, ensure_stopped, read_line, start_pep
from tests.support.token_upstream import TokenCheckingUpstream

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ALLOW = Mode(body=b'{"result":true}')
READ_ONLY = Mode(body=b'{"result":{"allow":true,"credential":{"scopes":["crm.read"]}}}')
WIDER = Mode(body=b'{"result":{"allow":true,"credential":{"scopes":["crm.read","crm.admin"]}}}')


@pytest.fixture
async def op(tmp_path: Path) -> AsyncIterator[OpenIdProvider]:
    async for running in running_op(tmp_path / "op"):
        yield running


@pytest.fixture
async def crm(op: OpenIdProvider) -> AsyncIterator[TokenCheckingUpstream]:
    up = TokenCheckingUpstream(jwks_uri=op.jwks_uri, issuer=op.issuer, audience="crm", scope="crm.read")
    await up.start()
    yield up
    await up.stop()


def with_jit(op: OpenIdProvider, crm: TokenCheckingUpstream, tmp_path: Path, **changes: Any) -> Callable[..., None]:
    """identity.jwt trusting the issuer of the callers' tokens (as the OP's token exchange does), and two routes
    to the resource server: /crm exchanges the caller's token, /reports uses the PEP's own (client credentials)."""
    jwks = write_jwks(tmp_path / "callers.jwks.json", op.subject_key)
    client = op.clients["pep"]
    common = {
        "token_endpoint": op.token_endpoint,
        "client_id": "pep",
        "client_secret_file": str(client.secret_file),
        "timeout_ms": 500,
        "breaker": {"failure_threshold": 3, "open_ms": 30000},
        **changes,
    }

    def mutate(raw: dict[str, Any]) -> None:
        raw["identity"]["jwt"] = {"issuers": [SUBJECT_ISSUER], "audiences": ["failclosed-pep"], "jwks_file": str(jwks)}
        exchange = {"kind": "token_exchange", "audience": "crm", "scopes": ["crm.read", "crm.write"], **common}
        own = {"kind": "client_credentials", "resource": "https://crm.example/api", "scopes": ["crm.read"], **common}
        raw["routes"] += [
            {
                "name": "crm",
                "match": {"path_prefix": "/crm"},
                "upstream": crm.url,
                "require_identity": True,
                "credential": exchange,
            },
            {"name": "reports", "match": {"path_prefix": "/reports"}, "upstream": crm.url, "credential": own},
        ]

    return mutate


async def call(pep: RunningPep, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(pep.url + path, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def exchanges(op: OpenIdProvider, grant: str = EXCHANGE) -> int:
    count: int = (await op.stats())["grants"].get(grant, 0)
    return count


async def scrape(pep: RunningPep) -> str:
    async with aiohttp.ClientSession() as s, s.get(pep.admin_url + "/metrics") as r:
        return await r.text()


def issued(crm: TokenCheckingUpstream) -> list[str]:
    return [s.headers["authorization"].removeprefix("Bearer ") for s in crm.seen if "authorization" in s.headers]


async def test_the_upstream_sees_only_a_fresh_exchanged_token_narrowed_by_the_pdp(
    make_pep: PepStarter, tmp_path: Path, fault_pdp: FaultPdp, op: OpenIdProvider, crm: TokenCheckingUpstream
) -> None:
    pep = await make_pep(with_jit(op, crm, tmp_path))
    caller = op.subject_token("alice", act={"sub": "agent-7"})
    fault_pdp.set(READ_ONLY)
    status, _, body = await call(pep, "/crm/tickets", caller)
    assert status == 200, body
    [seen] = crm.seen
    assert seen.claims is not None, seen.problem
    assert (seen.claims["sub"], seen.claims["aud"], seen.claims["scope"]) == ("alice", "crm", "crm.read")
    assert seen.claims["act"] == {"sub": "pep", "act": {"sub": "agent-7"}}  # the PEP acting for the agent
    assert all(caller not in v for v in seen.headers.values())  # the caller's own token never goes upstream
    document = fault_pdp.requests[-1].body["input"]
    assert caller not in str(document)
    assert document["subject"]["id"] == "alice"

    fault_pdp.set(ALLOW)  # no narrowing: the route's maximum
    assert (await call(pep, "/crm/tickets", caller))[0] == 200
    assert crm.seen[-1].claims is not None
    assert crm.seen[-1].claims["scope"] == "crm.read crm.write"

    fault_pdp.set(WIDER)  # never wider than the route's maximum: nothing is fetched, nothing forwarded
    status, headers, body = await call(pep, "/crm/tickets", caller)
    assert (status, headers["x-pep-reason"]) == (403, "obligation_unsupported")
    assert len(crm.seen) == 2
    assert await exchanges(op) == 2

    fault_pdp.set("deny")  # a denial fetches nothing
    assert (await call(pep, "/crm/tickets", caller))[0] == 403
    assert (len(crm.seen), await exchanges(op)) == (2, 2)
    reasons = [e["reason"] for e in await pep.log_entries()]
    assert reasons == ["allowed", "allowed", "obligation_unsupported", "policy_denied"]


async def test_client_credentials_need_no_caller_token(
    make_pep: PepStarter, tmp_path: Path, fault_pdp: FaultPdp, op: OpenIdProvider, crm: TokenCheckingUpstream
) -> None:
    pep = await make_pep(with_jit(op, crm, tmp_path))
    status, _, body = await call(pep, "/reports/q1")
    assert status == 200, body
    [seen] = crm.seen
    assert seen.claims is not None, seen.problem
    assert (seen.claims["client_id"], seen.claims["aud"], seen.claims["scope"]) == ("pep", "crm", "crm.read")
    assert "sub" not in seen.claims or seen.claims["sub"] == "pep"
    assert await exchanges(op, "client_credentials") == 1
    # A token exchange route still needs the caller's verified token (require_identity): 401, nobody asked.
    status, _, _ = await call(pep, "/crm/x")
    assert status == 401
    assert (len(crm.seen), await exchanges(op)) == (1, 0)


async def test_a_token_is_reused_only_for_the_same_subject_audience_and_scopes_until_expiry_minus_the_margin(
    make_pep: PepStarter, tmp_path: Path, fault_pdp: FaultPdp, op: OpenIdProvider, crm: TokenCheckingUpstream
) -> None:
    pep = await make_pep(with_jit(op, crm, tmp_path))
    alice, bob = op.subject_token("alice"), op.subject_token("bob")
    fault_pdp.set(READ_ONLY)
    for token in (alice, alice, bob, alice):
        assert (await call(pep, "/crm/x", token))[0] == 200
    fault_pdp.set(ALLOW)  # other scopes: another token
    assert (await call(pep, "/crm/x", alice))[0] == 200
    tokens = issued(crm)
    assert tokens[0] == tokens[1] == tokens[3]
    assert len({tokens[0], tokens[2], tokens[4]}) == 3
    assert [s.claims["sub"] for s in crm.seen if s.claims] == ["alice", "alice", "bob", "alice", "alice"]
    assert await exchanges(op) == 3

    # A route whose tokens live 2 s, kept until 1 s before: reused, then fetched again, never used stale.
    short = TokenCheckingUpstream(jwks_uri=op.jwks_uri, issuer=op.issuer, audience="short", scope="short.read")
    await short.start()
    try:
        short_pep = await make_pep(
            with_jit(op, short, tmp_path, expiry_margin_ms=1000, audience="short", scopes=["short.read"])
        )
        fault_pdp.set(ALLOW)
        assert (await call(short_pep, "/crm/x", alice))[0] == 200
        assert (await call(short_pep, "/crm/x", alice))[0] == 200
        await asyncio.sleep(1.1)
        assert (await call(short_pep, "/crm/x", alice))[0] == 200
        first, again, later = issued(short)
        assert first == again != later
        assert await exchanges(op) == 5
        await asyncio.sleep(1.1)
        await op.stop()  # expired, and the broker is down: no stale token, no other credential
        status, headers, _ = await call(short_pep, "/crm/x", alice)
        assert (status, headers["x-pep-reason"]) == (403, "credential_unavailable")
        assert len(short.seen) == 3
    finally:
        await short.stop()


# An outage of the broker, and what the decision log's detail says about it.
OUTAGES = {
    "stopped": "token endpoint: unreachable",
    "frozen": "token endpoint: timeout",
    "slow": "token endpoint: timeout",
    "status_503": "token endpoint: error: status 503",
    "status_500_oauth_body": "token endpoint: error: status 500",
    "malformed": "token endpoint: malformed",
    "no_access_token": "the token answer has no usable access_token",
}


async def outage(op: OpenIdProvider, kind: str) -> None:
    if kind == "stopped":
        await op.stop()
    elif kind == "frozen":
        op.freeze()
    elif kind == "slow":
        await op.fault("delay", delay_ms=5000, path="/token")
    elif kind == "status_503":
        await op.fault("status", status=503, path="/token")
    elif kind == "status_500_oauth_body":
        await op.fault("status", status=500, body='{"error":"server_error"}', path="/token")
    elif kind == "malformed":
        await op.fault("malformed", path="/token")
    elif kind == "no_access_token":
        await op.fault("malformed", body='{"token_type":"Bearer","expires_in":300}', path="/token")


@pytest.mark.parametrize("kind", OUTAGES)
async def test_a_broker_outage_is_credential_unavailable_and_nothing_is_forwarded(
    make_pep: PepStarter,
    tmp_path: Path,
    fault_pdp: FaultPdp,
    op: OpenIdProvider,
    crm: TokenCheckingUpstream,
    kind: str,
) -> None:
    pep = await make_pep(with_jit(op, crm, tmp_path))
    caller = op.subject_token("alice")
    fault_pdp.set(READ_ONLY)
    await outage(op, kind)
    try:
        t0 = time.monotonic()
        for path, token in (("/crm/x", caller), ("/reports/x", None)):
            status, headers, body = await call(pep, path, token)
            assert (status, headers["x-pep-reason"]) == (403, "credential_unavailable"), body
            assert caller not in body.decode()
        assert time.monotonic() - t0 < 4.0  # bounded by timeout_ms (500 ms) per fetch, not the broker's 5 s
    finally:
        if op.frozen:
            op.resume()
    assert crm.seen == []  # allowed by the PDP, and still nothing forwarded without the credential
    entries = await pep.log_entries()
    assert [(e["route"], e["decision"], e["reason"]) for e in entries] == [
        ("crm", "deny", "credential_unavailable"),
        ("reports", "deny", "credential_unavailable"),
    ]
    assert all(OUTAGES[kind] in e["detail"] for e in entries)
    log = pep.log_path.read_text()
    assert caller not in log
    metrics = await scrape(pep)
    assert caller not in metrics
    assert metric(metrics, "pep_credential_fetches_total", result="error") == 2
    assert metric(metrics, "pep_decisions_total", route="crm", decision="deny", reason="credential_unavailable") == 1


async def test_the_breaker_opens_asks_nobody_while_open_and_shows_in_the_metrics(
    make_pep: PepStarter, tmp_path: Path, fault_pdp: FaultPdp, op: OpenIdProvider, crm: TokenCheckingUpstream
) -> None:
    pep = await make_pep(with_jit(op, crm, tmp_path))
    await op.fault("status", status=503, path="/token")
    for _ in range(3):
        assert (await call(pep, "/reports/x"))[1]["x-pep-reason"] == "credential_unavailable"
    await op.fault("none")
    before = (await op.stats())["paths"].get("/token", 0)
    status, headers, _ = await call(pep, "/reports/x")
    assert (status, headers["x-pep-reason"]) == (403, "credential_unavailable")
    assert (await op.stats())["paths"].get("/token", 0) == before  # open: the broker is not asked
    assert crm.seen == []
    entries = await pep.log_entries()
    assert entries[-1]["detail"] == "the token endpoint's circuit is open"
    metrics = await scrape(pep)
    assert metric(metrics, "pep_credential_circuit_state", route="reports") == 2
    assert metric(metrics, "pep_credential_circuit_state", route="crm") == 0  # each route has its own
    assert metric(metrics, "pep_credential_circuit_transitions_total", route="reports", to="open") == 1


async def test_tokens_never_reach_the_log_the_metrics_or_the_agent(
    make_pep: PepStarter, tmp_path: Path, fault_pdp: FaultPdp, op: OpenIdProvider, crm: TokenCheckingUpstream
) -> None:
    pep = await make_pep(with_jit(op, crm, tmp_path))
    caller = op.subject_token("alice")
    answers = []
    fault_pdp.set(READ_ONLY)
    answers.append(await call(pep, "/crm/x", caller))
    answers.append(await call(pep, "/reports/x"))
    fault_pdp.set(WIDER)
    answers.append(await call(pep, "/crm/x", caller))
    await op.fault("oauth_error", error="invalid_grant", path="/token")
    fault_pdp.set(READ_ONLY)
    answers.append(await call(pep, "/crm/x", op.subject_token("alice", jti="fresh")))
    assert [a[0] for a in answers] == [200, 200, 403, 403]
    secrets = [caller, *issued(crm)]
    assert len(secrets) == 3
    texts = [pep.log_path.read_text(), await scrape(pep)]
    texts += [str(headers) + body.decode() for _, headers, body in answers]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    entries = await pep.log_entries()
    assert entries[-1]["detail"] == "token endpoint refused: invalid_grant"


def narrow_route(source: Path) -> None:
    """The config file with the crm route's maximum narrowed to crm.read: another credential."""
    raw = yaml.safe_load(source.read_text())
    raw["routes"][1]["credential"]["scopes"] = ["crm.read"]
    source.write_text(yaml.safe_dump(raw))


async def test_a_reload_keeps_the_cached_token_and_a_changed_credential_starts_afresh(
    make_pep: PepStarter, tmp_path: Path, fault_pdp: FaultPdp, op: OpenIdProvider, crm: TokenCheckingUpstream
) -> None:
    pep = await make_pep(with_jit(op, crm, tmp_path))
    caller = op.subject_token("alice")
    fault_pdp.set(READ_ONLY)
    assert (await call(pep, "/crm/x", caller))[0] == 200
    assert await pep.server.reload_config()
    assert (await call(pep, "/crm/x", caller))[0] == 200
    assert await exchanges(op) == 1
    narrow_route(Path(pep.server.config.source))
    assert await pep.server.reload_config()
    assert (await call(pep, "/crm/x", caller))[0] == 200
    assert await exchanges(op) == 2
    assert [s.claims["scope"] for s in crm.seen if s.claims] == ["crm.read"] * 3


async def test_explain_shows_the_credential_a_request_would_get_without_fetching(
    make_pep: PepStarter, tmp_path: Path, fault_pdp: FaultPdp, op: OpenIdProvider, crm: TokenCheckingUpstream
) -> None:
    pep = await make_pep(with_jit(op, crm, tmp_path))
    config = load(pep.server.config.source)
    caller = op.subject_token("alice")
    headers: Any = {"Host": "pep", "authorization": f"Bearer {caller}"}
    request = Request("GET", "/crm/x", CIMultiDict(headers), None)
    fault_pdp.set(READ_ONLY)
    report = await explain(config, request)
    assert (report["decision"], report["credential"]) == (
        "allow",
        {"kind": "token_exchange", "audience": "crm", "scopes": ["crm.read"]},
    )
    fault_pdp.set(WIDER)
    report = await explain(config, request)
    assert (report["decision"], report["reason"]) == ("deny", "obligation_unsupported")
    assert "credential" not in report
    assert caller not in str(report)
    assert await exchanges(op) == 0
    assert crm.seen == []


async def test_pep_run_fetches_the_credential_and_denies_when_the_broker_is_stopped(
    tmp_path: Path, op: OpenIdProvider
) -> None:
    """The real command: `pep run` wires the token endpoint client at start (embedded Cedar, permit all). Tokens
    for `short` live 2 s and are kept until 1 s before: then the broker is down, and nothing is forwarded."""
    client = op.clients["pep-jwt"]  # private_key_jwt: the key from a file
    short = TokenCheckingUpstream(jwks_uri=op.jwks_uri, issuer=op.issuer, audience="short", scope="short.read")
    await short.start()
    route = {
        "name": "reports",
        "match": {"path_prefix": "/reports"},
        "upstream": short.url,
        "credential": {
            "kind": "client_credentials",
            "token_endpoint": op.token_endpoint,
            "client_id": "pep-jwt",
            "client_auth": "private_key_jwt",
            "client_key_file": str(client.key_file),
            "resource": "https://short.example/api",
            "scopes": ["short.read"],
            "timeout_ms": 500,
            "expiry_margin_ms": 1000,
        },
    }
    config = cedar_config(tmp_path, short.url, "permit(principal, action, resource);", routes=[route])
    proc = await start_pep("run", "-c", str(config))
    try:
        assert proc.stderr is not None
        line = await read_line(proc.stderr, "proxy on", 20)
        found = re.search(r"proxy on [^:]+:(\d+), admin on [^:]+:(\d+)", line)
        assert found is not None, line
        url = f"http://127.0.0.1:{found.group(1)}/reports/q"
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.get(url) as r:
                    assert r.status == 200, await r.text()
            assert [(x.claims or {}).get("client_id") for x in short.seen] == ["pep-jwt", "pep-jwt"]
            await op.stop()
            await asyncio.sleep(1.1)  # the cached token is now within its margin: never used again
            async with s.get(url) as r:
                assert (r.status, r.headers["x-pep-reason"]) == (403, "credential_unavailable")
                answer = await r.text()
            async with s.get(f"http://127.0.0.1:{found.group(2)}/metrics") as r:
                metrics = await r.text()
        assert len(short.seen) == 2
        first, again = issued(short)
        assert first == again  # one fetch, reused
        assert metric(metrics, "pep_credential_fetches_total", result="success") == 1
        assert metric(metrics, "pep_credential_fetches_total", result="error") == 1
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        await ensure_stopped(proc)
        await short.stop()
    for text in ((tmp_path / "decisions.jsonl").read_text(), metrics, answer):
        assert first not in text
