"""The OpenID Provider of the approval and credential tests does what those tests rely on, spoken to with httpx.

CIBA poll mode: a request the person approves gives an ID token for that person, once; one they decline says
`access_denied`; one nobody answers expires and says `expired_token`, not `invalid_grant`; the answer carries the
configured `interval`. Client credentials with resource indicators (each client authentication method), and the
registered RFC 8693 token exchange (narrowed scopes, `act`, refusals of what is wider or untrusted). The injected
faults, a stop and a freeze look to a client like the outages they stand for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.support.op import OpenIdProvider, running_op

CIBA = "urn:openid:params:grant-type:ciba"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


@pytest.fixture
async def op(tmp_path: Path) -> AsyncIterator[OpenIdProvider]:
    async for running in running_op(tmp_path / "op"):
        yield running


def basic(op: OpenIdProvider, client_id: str = "pep") -> httpx.BasicAuth:
    secret = op.clients[client_id].secret
    assert secret is not None
    return httpx.BasicAuth(client_id, secret)


async def post(op: OpenIdProvider, url: str, data: dict[str, Any], client_id: str = "pep") -> httpx.Response:
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        return await client.post(url, data=data, auth=basic(op, client_id))


async def backchannel(op: OpenIdProvider, **extra: str) -> dict[str, Any]:
    data = {"scope": "openid", "login_hint": "alice", "binding_message": "Approve POST crm #3F2A", **extra}
    resp = await post(op, op.backchannel_endpoint, data)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def poll(op: OpenIdProvider, auth_req_id: str) -> httpx.Response:
    return await post(op, op.token_endpoint, {"grant_type": CIBA, "auth_req_id": auth_req_id})


def error_of(resp: httpx.Response) -> tuple[int, str | None]:
    """The status and the OAuth `error` of an answer."""
    return resp.status_code, resp.json().get("error")


def verified(op: OpenIdProvider, token: str, audience: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, op.signing_key.private.public_key(), algorithms=["ES256"], audience=audience, issuer=op.issuer
    )
    return claims


async def test_an_approved_ciba_request_gives_an_id_token_for_the_approver_once(op: OpenIdProvider) -> None:
    started = await backchannel(op, requested_expiry="60")
    assert (started["interval"], started["expires_in"]) == (1, 60)
    auth_req_id = started["auth_req_id"]
    pending = await poll(op, auth_req_id)
    assert error_of(pending) == (400, "authorization_pending")
    seen = await op.wait_ciba()
    assert (seen["auth_req_id"], seen["account"]) == (auth_req_id, "alice")
    assert seen["binding_message"] == "Approve POST crm #3F2A"
    await op.approve(auth_req_id)
    granted = await poll(op, auth_req_id)
    assert granted.status_code == 200, granted.text
    assert verified(op, granted.json()["id_token"], "pep")["sub"] == "alice"
    again = await poll(op, auth_req_id)  # a grant's tokens are issued once
    assert error_of(again) == (400, "invalid_grant")


async def test_the_email_claim_names_the_approver_when_asked_for(op: OpenIdProvider) -> None:
    started = await backchannel(op, scope="openid email", login_hint="bob@example.com")
    await op.approve(started["auth_req_id"])
    granted = await poll(op, started["auth_req_id"])
    claims = verified(op, granted.json()["id_token"], "pep")
    assert (claims["sub"], claims["email"]) == ("bob", "bob@example.com")


async def test_a_declined_ciba_request_says_access_denied(op: OpenIdProvider) -> None:
    started = await backchannel(op)
    await op.deny(started["auth_req_id"])
    denied = await poll(op, started["auth_req_id"])
    assert error_of(denied) == (400, "access_denied")


async def test_an_unanswered_ciba_request_expires_and_says_expired_token(op: OpenIdProvider) -> None:
    started = await backchannel(op, requested_expiry="1")
    assert started["expires_in"] == 1
    await asyncio.sleep(1.2)  # nobody answered: the store still knows the request, so the OP can say why
    expired = await poll(op, started["auth_req_id"])
    assert error_of(expired) == (400, "expired_token")
    second = await backchannel(op)
    await op.expire(second["auth_req_id"])  # the same, without waiting
    assert (await poll(op, second["auth_req_id"])).json()["error"] == "expired_token"


async def test_an_unknown_approver_and_the_interval_setting(op: OpenIdProvider) -> None:
    unknown = await post(op, op.backchannel_endpoint, {"scope": "openid", "login_hint": "mallory"})
    assert error_of(unknown) == (400, "unknown_user_id")
    await op.set_interval(3)
    assert (await backchannel(op))["interval"] == 3


async def test_client_credentials_with_a_resource_and_each_client_authentication(op: OpenIdProvider) -> None:
    data = {"grant_type": "client_credentials", "resource": "https://crm.example/api", "scope": "crm.read"}
    basic_answer = await post(op, op.token_endpoint, data)
    assert basic_answer.status_code == 200, basic_answer.text
    claims = verified(op, basic_answer.json()["access_token"], "crm")
    assert (claims["scope"], claims["client_id"]) == ("crm.read", "pep")
    post_client = op.clients["pep-post"]
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        by_post = await client.post(
            op.token_endpoint, data={**data, "client_id": "pep-post", "client_secret": post_client.secret}
        )
        assert by_post.status_code == 200, by_post.text
        key = op.clients["pep-jwt"].key
        assert key is not None
        now = int(time.time())
        assertion = key.sign(
            {"iss": "pep-jwt", "sub": "pep-jwt", "aud": op.issuer, "iat": now, "exp": now + 60, "jti": f"j{now}"}
        )
        by_jwt = await client.post(
            op.token_endpoint,
            data={
                **data,
                "client_id": "pep-jwt",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            },
        )
        assert by_jwt.status_code == 200, by_jwt.text
        wrong = await client.post(op.token_endpoint, data=data, auth=httpx.BasicAuth("pep", "not-the-secret"))
        assert error_of(wrong) == (401, "invalid_client")
    other = await post(op, op.token_endpoint, {**data, "resource": "https://elsewhere.example/api"})
    assert error_of(other) == (400, "invalid_target")


async def test_token_exchange_narrows_names_the_actor_and_refuses_what_is_wider(op: OpenIdProvider) -> None:
    subject = op.subject_token("alice", act={"sub": "agent-7"})
    base = {"grant_type": EXCHANGE, "subject_token": subject, "subject_token_type": JWT_TYPE, "audience": "crm"}
    narrowed = await post(op, op.token_endpoint, {**base, "scope": "crm.read"})
    assert narrowed.status_code == 200, narrowed.text
    body = narrowed.json()
    assert (body["scope"], body["token_type"], body["expires_in"]) == ("crm.read", "Bearer", 300)
    claims = verified(op, body["access_token"], "crm")
    assert (claims["sub"], claims["scope"]) == ("alice", "crm.read")
    assert claims["act"] == {"sub": "pep", "act": {"sub": "agent-7"}}
    by_resource_data = {k: v for k, v in base.items() if k != "audience"}
    by_resource = await post(op, op.token_endpoint, {**by_resource_data, "resource": "https://mail.example/api"})
    assert by_resource.status_code == 200
    assert verified(op, by_resource.json()["access_token"], "mail")["sub"] == "alice"
    wider = await post(op, op.token_endpoint, {**base, "scope": "crm.read crm.admin"})
    assert error_of(wider) == (400, "invalid_scope")
    untrusted = await post(op, op.token_endpoint, {**base, "subject_token": op.foreign_token("alice")})
    assert error_of(untrusted) == (400, "invalid_grant")
    expired = await post(op, op.token_endpoint, {**base, "subject_token": op.subject_token("alice", ttl=-10)})
    assert error_of(expired) == (400, "invalid_grant")
    unknown = await post(op, op.token_endpoint, {**base, "audience": "payroll"})
    assert error_of(unknown) == (400, "invalid_target")
    stats = await op.stats()
    assert stats["grants"][EXCHANGE] == 6


async def test_injected_faults_look_like_the_outages_they_stand_for(op: OpenIdProvider) -> None:
    data = {"grant_type": "client_credentials", "resource": "https://crm.example/api", "scope": "crm.read"}
    await op.fault("status", status=503, path="/token", count=1)
    assert (await post(op, op.token_endpoint, data)).status_code == 503
    assert (await post(op, op.token_endpoint, data)).status_code == 200  # count: 1
    await op.fault("malformed", path="/token", count=1)
    malformed = await post(op, op.token_endpoint, data)
    assert malformed.status_code == 200
    with pytest.raises(ValueError, match=r"Expecting|Unterminated"):
        malformed.json()
    await op.fault("oauth_error", error="slow_down", path="/token", count=1)
    assert (await post(op, op.token_endpoint, data)).json() == {"error": "slow_down"}
    await op.fault("close", path="/token", count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        await post(op, op.token_endpoint, data)
    await op.fault("delay", delay_ms=3000, path="/token", count=1)
    async with httpx.AsyncClient(timeout=0.3, trust_env=False) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(op.token_endpoint, data=data, auth=basic(op))


async def test_a_frozen_op_accepts_and_never_answers_and_a_stopped_one_refuses(op: OpenIdProvider) -> None:
    data = {"grant_type": "client_credentials", "resource": "https://crm.example/api", "scope": "crm.read"}
    op.freeze()
    try:
        async with httpx.AsyncClient(timeout=0.3, trust_env=False) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(op.token_endpoint, data=data, auth=basic(op))
    finally:
        op.resume()
    assert (await post(op, op.token_endpoint, data)).status_code == 200
    await op.stop()
    with pytest.raises(httpx.ConnectError):
        await post(op, op.token_endpoint, data)
    await op.restart()
    assert (await post(op, op.token_endpoint, data)).status_code == 200
