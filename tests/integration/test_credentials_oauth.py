"""Just-in-time credentials against the real OpenID Provider (oidc-provider): token exchange and client credentials,
narrowed by the PDP but never widened, cached only for the same subject, audience and scopes until expiry minus a
margin, and `credential_unavailable` for every outage, with no fallback to any other token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from pep.breaker import State
from pep.credentials_oauth import Credential, CredentialRefusal, OAuthCredentialConfig, OAuthCredentialSource
from pep.decision import CredentialNarrowing, Reason
from pep.oauth.client_auth import ClientAuthConfig
from pep.oauth.endpoint import Endpoint
from tests.support.op import OpenIdProvider, running_op

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


@pytest.fixture
async def op(tmp_path: Path) -> AsyncIterator[OpenIdProvider]:
    async for running in running_op(tmp_path / "op"):
        yield running


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint(None)
    yield ep
    await ep.close()


def source(op: OpenIdProvider, endpoint: Endpoint, client_id: str = "pep", **changes: Any) -> OAuthCredentialSource:
    client = op.clients[client_id]
    base: dict[str, Any] = {
        "kind": "token_exchange",
        "token_endpoint": op.token_endpoint,
        "client": ClientAuthConfig(
            client_id,
            client.auth_method,
            secret_file=str(client.secret_file) if client.secret_file else None,
            key_file=str(client.key_file) if client.key_file else None,
        ),
        "audiences": ("crm",),
        "scopes": ("crm.read", "crm.write"),
        "timeout_s": 0.5,
        "expiry_margin_s": 1.0,
        "breaker": (3, 30.0, 1),
    }
    base.update(changes)
    return OAuthCredentialSource(OAuthCredentialConfig(**base), endpoint)


def claims(op: OpenIdProvider, credential: Credential | CredentialRefusal, audience: str) -> dict[str, Any]:
    assert isinstance(credential, Credential), credential
    assert credential.header == "authorization"
    token = credential.value.removeprefix("Bearer ")
    found: dict[str, Any] = jwt.decode(
        token, op.signing_key.private.public_key(), algorithms=["ES256"], audience=audience, issuer=op.issuer
    )
    return found


async def exchanges(op: OpenIdProvider, grant: str = EXCHANGE) -> int:
    count: int = (await op.stats())["grants"].get(grant, 0)
    return count


def refused(result: Credential | CredentialRefusal, reason: Reason = Reason.CREDENTIAL_UNAVAILABLE) -> str:
    assert isinstance(result, CredentialRefusal), result
    assert result.reason is reason
    return result.detail


async def test_token_exchange_for_the_caller_narrowed_by_the_pdp(op: OpenIdProvider, endpoint: Endpoint) -> None:
    jit = source(op, endpoint)
    caller = op.subject_token("alice", act={"sub": "agent-7"})
    full = await jit.obtain(caller, None, 2.0)
    assert claims(op, full, "crm")["scope"] == "crm.read crm.write"  # the route's maximum
    narrowed = await jit.obtain(caller, CredentialNarrowing(scopes=("crm.read",)), 2.0)
    found = claims(op, narrowed, "crm")
    assert (found["sub"], found["scope"]) == ("alice", "crm.read")
    assert found["act"] == {"sub": "pep", "act": {"sub": "agent-7"}}
    assert caller not in repr(narrowed)
    assert narrowed.value not in repr(narrowed)  # type: ignore[union-attr]


async def test_wider_than_the_route_is_refused_before_asking(op: OpenIdProvider, endpoint: Endpoint) -> None:
    jit = source(op, endpoint)
    caller = op.subject_token("alice")
    for narrowing in (
        CredentialNarrowing(scopes=("crm.read", "crm.admin")),
        CredentialNarrowing(scopes=()),
        CredentialNarrowing(audience="mail"),
    ):
        refused(await jit.obtain(caller, narrowing, 2.0), Reason.OBLIGATION_UNSUPPORTED)
    assert await exchanges(op) == 0


async def test_a_route_maximum_the_server_does_not_grant_is_unavailable(op: OpenIdProvider, endpoint: Endpoint) -> None:
    jit = source(op, endpoint, scopes=("crm.read", "crm.admin"))  # the OP never lets this client have crm.admin
    detail = refused(await jit.obtain(op.subject_token("alice"), None, 2.0))
    assert detail == "token endpoint refused: invalid_scope"
    untrusted = refused(await jit.obtain(op.foreign_token("alice"), None, 2.0))
    assert untrusted == "token endpoint refused: invalid_grant"
    assert jit.breaker.failures == 0  # the server works: it refused these requests
    refused(await jit.obtain(None, None, 2.0))  # no caller token: nothing to exchange, nobody asked
    assert await exchanges(op) == 2


async def test_a_token_is_reused_only_for_the_same_subject_audience_and_scopes(
    op: OpenIdProvider, endpoint: Endpoint
) -> None:
    jit = source(op, endpoint, audiences=("crm", "mail"), scopes=("crm.read", "crm.write", "mail.send"))
    alice = op.subject_token("alice")
    first = await jit.obtain(alice, CredentialNarrowing(scopes=("crm.read",)), 2.0)
    again = await jit.obtain(alice, CredentialNarrowing(scopes=("crm.read",)), 2.0)
    assert again == first
    assert await exchanges(op) == 1
    await jit.obtain(alice, CredentialNarrowing(scopes=("crm.write",)), 2.0)
    await jit.obtain(alice, CredentialNarrowing(audience="mail", scopes=("mail.send",)), 2.0)
    other = await jit.obtain(op.subject_token("bob"), CredentialNarrowing(scopes=("crm.read",)), 2.0)
    assert claims(op, other, "crm")["sub"] == "bob"
    await jit.obtain(op.subject_token("alice", jti="another"), CredentialNarrowing(scopes=("crm.read",)), 2.0)
    assert await exchanges(op) == 5  # another subject token, even for the same person, is another key


async def test_concurrent_requests_for_one_key_share_one_fetch(op: OpenIdProvider, endpoint: Endpoint) -> None:
    jit = source(op, endpoint)
    alice = op.subject_token("alice")
    results = await asyncio.gather(*(jit.obtain(alice, None, 2.0) for _ in range(8)))
    assert len({r.value for r in results if isinstance(r, Credential)}) == 1
    assert await exchanges(op) == 1


async def test_a_token_for_one_request_is_not_shared_by_requests_that_arrive_together(
    op: OpenIdProvider, endpoint: Endpoint
) -> None:
    """A token that expires within the margin is used for one request: concurrent requests each get their own,
    as they would one after another."""
    jit = source(op, endpoint, audiences=("short",), scopes=("short.read",), expiry_margin_s=5.0)
    alice = op.subject_token("alice")
    results = await asyncio.gather(*(jit.obtain(alice, None, 2.0) for _ in range(4)))
    assert all(isinstance(r, Credential) and r.expires_at is None for r in results), results
    assert len({r.value for r in results if isinstance(r, Credential)}) == 4
    assert await exchanges(op) == 4


async def test_a_token_is_kept_until_its_expiry_minus_the_margin_and_never_after(
    op: OpenIdProvider, endpoint: Endpoint
) -> None:
    jit = source(op, endpoint, audiences=("short",), scopes=("short.read",))  # 2 s tokens, 1 s margin
    alice = op.subject_token("alice")
    first = await jit.obtain(alice, None, 2.0)
    assert isinstance(first, Credential)
    assert first.expires_at is not None
    assert await jit.obtain(alice, None, 2.0) == first
    await asyncio.sleep(1.1)
    second = await jit.obtain(alice, None, 2.0)
    assert isinstance(second, Credential)
    assert second.value != first.value
    assert await exchanges(op) == 2
    await asyncio.sleep(1.1)
    await op.stop()  # expired, and the server is down: no stale token, no other credential
    refused(await jit.obtain(alice, None, 2.0))
    no_margin_room = source(op, endpoint, audiences=("short",), scopes=("short.read",), expiry_margin_s=5.0)
    await op.restart()
    once = await no_margin_room.obtain(alice, None, 2.0)
    assert isinstance(once, Credential)
    assert once.expires_at is None  # it expires within the margin: used once, never kept
    assert (await no_margin_room.obtain(alice, None, 2.0)) != once


async def test_client_credentials_with_a_resource_indicator(op: OpenIdProvider, endpoint: Endpoint) -> None:
    for client_id in ("pep", "pep-post", "pep-jwt"):
        jit = source(
            op,
            endpoint,
            client_id,
            kind="client_credentials",
            audiences=(),
            resources=("https://crm.example/api",),
            scopes=("crm.read",),
        )
        found = claims(op, await jit.obtain(None, None, 2.0), "crm")
        assert (found["client_id"], found["scope"]) == (client_id, "crm.read")
    assert await exchanges(op, "client_credentials") == 3


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        ({"mode": "status", "status": 503}, "token endpoint: error: status 503"),
        ({"mode": "status", "status": 500, "body": '{"error":"server_error"}'}, "token endpoint: error: status 500"),
        ({"mode": "malformed"}, "token endpoint: malformed"),
        ({"mode": "malformed", "body": '{"access_token":"a b","token_type":"Bearer"}'}, "no usable access_token"),
        ({"mode": "malformed", "body": '{"access_token":"t","token_type":"DPoP"}'}, "token_type is not Bearer"),
        (
            {"mode": "malformed", "body": '{"access_token":"t","token_type":"Bearer","scope":"crm.read crm.admin"}'},
            "the server granted scopes wider than asked",
        ),
        (
            {"mode": "malformed", "body": '{"access_token":"t","token_type":"Bearer","expires_in":"300"}'},
            "expires_in is not a positive integer",
        ),
        (
            {
                "mode": "malformed",
                "body": '{"access_token":"t","token_type":"Bearer","issued_token_type":'
                '"urn:ietf:params:oauth:token-type:refresh_token"}',
            },
            "issued something other than an access token",
        ),
        ({"mode": "close"}, "token endpoint: unreachable"),
        ({"mode": "delay", "delay_ms": 2000}, "token endpoint: timeout"),
    ],
)
async def test_every_failure_is_credential_unavailable_and_counts_against_the_server(
    op: OpenIdProvider, endpoint: Endpoint, fault: dict[str, Any], detail: str
) -> None:
    jit = source(op, endpoint)
    await op.fault(path="/token", count=1, **fault)
    t0 = time.monotonic()
    found = refused(await jit.obtain(op.subject_token("alice"), None, 5.0))
    assert detail in found
    assert time.monotonic() - t0 < 1.5  # timeout_s (0.5 s), not the server's 2 s
    assert jit.breaker.failures == 1


async def test_a_stopped_server_opens_the_circuit_and_a_frozen_one_costs_the_timeout(
    op: OpenIdProvider, endpoint: Endpoint
) -> None:
    jit = source(op, endpoint)
    alice = op.subject_token("alice")
    op.freeze()
    try:
        t0 = time.monotonic()
        assert "timeout" in refused(await jit.obtain(alice, None, 5.0))
        assert time.monotonic() - t0 < 1.5
        t0 = time.monotonic()
        assert "deadline passed" in refused(await jit.obtain(alice, CredentialNarrowing(scopes=("crm.read",)), 0.1))
        assert time.monotonic() - t0 < 0.5  # the request's own deadline, shorter than the fetch's
    finally:
        op.resume()
    await asyncio.sleep(0.6)  # the abandoned fetch ends at its own timeout
    await op.stop()
    for _ in range(3):
        assert "unreachable" in refused(await jit.obtain(alice, None, 5.0))
    assert jit.breaker.state is State.OPEN
    await op.restart()
    assert refused(await jit.obtain(alice, None, 5.0)) == "the token endpoint's circuit is open"
    assert await exchanges(op) == 0  # the restarted server was never asked


async def test_explain_describes_without_fetching(op: OpenIdProvider, endpoint: Endpoint) -> None:
    jit = source(op, endpoint)
    assert jit.describe(None) == {"kind": "token_exchange", "audience": "crm", "scopes": ["crm.read", "crm.write"]}
    assert jit.describe(CredentialNarrowing(scopes=("crm.read",)))["scopes"] == ["crm.read"]
    assert jit.describe(CredentialNarrowing(scopes=("crm.admin",)))["refused"] == "obligation_unsupported"
    assert jit.problem() is None
    assert await exchanges(op) == 0
