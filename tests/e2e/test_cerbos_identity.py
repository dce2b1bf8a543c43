"""A verified token claim decides, end to end through the real Cerbos PDP (issue 6).

The PEP verifies the caller's JWT (`identity.jwt`, keys from a JWKS file, `claims: [department]`) and the AuthZEN
subject carries the allow-listed claims in `properties.claims`, which Cerbos shows to policies as
`request.principal.attr.claims`. The policy (tests/e2e/policies/cerbos/identity/refund.yaml, served on its own)
lets only an agent whose token says department "support" call the `refund` tool.

- support token: allowed, forwarded once;
- sales token, or a token without the claim: 403 policy_denied from Cerbos, nothing forwarded;
- no token on the `require_identity` route: 401 identity_missing, Cerbos never asked;
- a forged token (another key, same `kid`) or an expired one: 401 identity_invalid, Cerbos never asked.

Names from different sources are never one principal (issue 13): a Cerbos principal policy for "alice"
(alice.yaml, the `audit` tool) and a rule on `request.principal.id == "alice"` for any role (`export`) allow a
token whose `sub` is alice, and never a caller without a token that sends `x-agent-id: alice`.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import PepStarter, RunningPep
from tests.e2e.conftest import tool_route
from tests.support.cerbos import REPO, CerbosServer
from tests.support.observe import metric
from tests.support.spiffe_pki import JwtAuthority
from tests.support.upstream import RecordingUpstream

POLICIES = REPO / "tests" / "e2e" / "policies" / "cerbos" / "identity"
ISSUER = "https://issuer.test"
AUDIENCE = "failclosed-pep"


def test_the_refund_policy_passes_its_cerbos_test_suite(cerbos_binary: Path) -> None:
    """`cerbos compile` compiles the policy and runs refund_test.yaml beside it."""
    done = subprocess.run(
        [str(cerbos_binary), "compile", str(POLICIES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout


@pytest.fixture
def cerbos_policies() -> Path:
    """This module's policy (tests/e2e/conftest.py's `cerbos` serves it)."""
    return POLICIES


@pytest.fixture
def authority(tmp_path: Path) -> JwtAuthority:
    return JwtAuthority(tmp_path / "jwks.json", ISSUER, AUDIENCE)


def identity_config(pdp_url: str, upstream_url: str, log_path: Path, authority: JwtAuthority) -> dict[str, Any]:
    return {
        "version": 1,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "identity": {
            "workload": "spiffe://test/agent",
            "agent_header": "x-agent-id",
            "jwt": authority.jwt_config(claims=["department"]),
        },
        "pdp": {"kind": "authzen", "url": pdp_url, "timeout_ms": 2000, "retries": 1},
        "decision_log": {"sink": "file", "path": str(log_path)},
        "routes": [
            {**tool_route("refund", upstream_url), "require_identity": True},
            tool_route("audit", upstream_url),  # a token is optional here
            tool_route("export", upstream_url),
        ],
    }


@pytest.fixture
async def pep(
    tmp_path: Path, cerbos: CerbosServer, upstream: RecordingUpstream, authority: JwtAuthority
) -> AsyncIterator[RunningPep]:
    starter = PepStarter(
        tmp_path, lambda log: identity_config(cerbos.url, upstream.url, log, authority), "cerbos-identity.yaml"
    )
    running: RunningPep = await starter()
    try:
        yield running
    finally:
        await starter.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def refund(
    client: aiohttp.ClientSession,
    pep: RunningPep,
    token: str | None,
    rid: str,
    tool: str = "refund",
    agent: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    headers = {"x-request-id": rid}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if agent is not None:
        headers["x-agent-id"] = agent
    async with client.post(pep.url + f"/tools/{tool}", headers=headers, data=b'{"order":"42"}') as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def entry_for(pep: RunningPep, rid: str) -> dict[str, Any]:
    entries = [e for e in await pep.log_entries() if e["request_id"] == rid]
    assert len(entries) == 1, entries
    return entries[0]


async def pdp_requests(client: aiohttp.ClientSession, pep: RunningPep) -> float:
    async with client.get(pep.admin_url + "/metrics") as r:
        return metric(await r.text(), "pep_pdp_request_duration_seconds_count")


async def test_a_support_token_may_refund(
    pep: RunningPep, authority: JwtAuthority, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    token = authority.mint("user-1", azp="support-bot", department="support")
    status, _, body = await refund(client, pep, token, "support")
    assert status == 200, body
    [seen] = upstream.seen
    assert (seen.method, seen.target, seen.body) == ("POST", "/tools/refund", b'{"order":"42"}')
    assert "authorization" not in seen.headers
    entry = await entry_for(pep, "support")
    assert (entry["decision"], entry["reason"], entry["attempts"]) == ("allow", "allowed", 1)
    assert entry["subject"]["id"] == "user-1"
    assert entry["subject"]["claims"] == {"department": "support"}
    assert token not in pep.log_path.read_text()
    assert await pdp_requests(client, pep) >= 1  # the metric the refusals below are checked with does count


@pytest.mark.parametrize(
    "claims", [{"department": "sales"}, {}, {"department": "Support"}], ids=["sales", "no-claim", "other-case"]
)
async def test_any_other_department_is_denied_by_the_policy(
    pep: RunningPep,
    authority: JwtAuthority,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    claims: dict[str, Any],
) -> None:
    token = authority.mint("user-2", azp="sales-bot", **claims)
    status, headers, body = await refund(client, pep, token, "other")
    assert status == 403, body
    assert headers["x-pep-reason"] == "policy_denied"
    assert "www-authenticate" not in headers  # the caller is known; the policy says no
    assert orjson.loads(body)["error"]["reason"] == "policy_denied"
    assert upstream.seen == []
    entry = await entry_for(pep, "other")
    assert (entry["decision"], entry["reason"], entry["attempts"]) == ("deny", "policy_denied", 1)
    assert entry["subject"]["claims"] == claims


@pytest.mark.parametrize("case", ["missing", "forged", "expired"])
async def test_no_valid_token_is_refused_before_cerbos_is_asked(
    pep: RunningPep,
    authority: JwtAuthority,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    case: str,
) -> None:
    tokens = {
        "missing": None,
        # Claims the right department, signed by a key the JWKS does not hold (same kid): still no refund.
        "forged": authority.forger().mint("user-1", department="support"),
        "expired": authority.mint("user-1", department="support", exp=1_000_000_000, iat=999_999_000, nbf=999_999_000),
    }
    status, headers, body = await refund(client, pep, tokens[case], case)
    reason = "identity_missing" if case == "missing" else "identity_invalid"
    assert status == 401, body
    assert headers["x-pep-reason"] == reason
    assert headers["www-authenticate"].startswith('Bearer realm="failclosed-pep"')
    assert ('error="invalid_token"' in headers["www-authenticate"]) is (case != "missing")
    assert upstream.seen == []
    entry = await entry_for(pep, case)
    assert (entry["decision"], entry["reason"], entry["attempts"]) == ("deny", reason, 0)
    assert await pdp_requests(client, pep) == 0


@pytest.mark.parametrize("tool", ["audit", "export"])
async def test_only_a_token_for_alice_gets_what_alice_gets(
    pep: RunningPep,
    authority: JwtAuthority,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    tool: str,
) -> None:
    # The name alone, unverified: decided by Cerbos (asked, attempts 1), and not as alice.
    status, headers, body = await refund(client, pep, None, "header", tool, agent="alice")
    assert status == 403, body
    assert headers["x-pep-reason"] == "policy_denied"
    assert upstream.seen == []
    entry = await entry_for(pep, "header")
    assert (entry["decision"], entry["reason"], entry["attempts"]) == ("deny", "policy_denied", 1)
    assert entry["subject"]["id"] is None
    assert entry["subject"]["agent"] is None  # never where a verified agent would be
    assert entry["subject"]["unverified_agent"] == "alice"

    status, _, body = await refund(client, pep, authority.mint("alice"), "token", tool)
    assert status == 200, body
    assert len(upstream.seen) == 1
    entry = await entry_for(pep, "token")
    assert (entry["subject"]["id"], entry["subject"]["unverified_agent"]) == ("alice", None)

    # Next to another user's token the header is not read at all.
    status, headers, _ = await refund(client, pep, authority.mint("bob"), "bob", tool, agent="alice")
    assert (status, headers["x-pep-reason"]) == (403, "policy_denied")
    assert len(upstream.seen) == 1
