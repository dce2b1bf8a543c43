"""The CIBA client against the real OpenID Provider (oidc-provider): the person approves, declines, never answers;
the OP is stopped, frozen, slow, failing or nonsensical; and only an ID token for the named approver, signed by
the OP's key, counts as an approval."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from pep.approvals.ciba import Approved, CibaClient, CibaConfig, NotApproved, Pending, Started
from pep.approvals.message import binding_message
from pep.breaker import State
from pep.decision import Reason
from pep.oauth.client_auth import ClientAuthConfig
from pep.oauth.endpoint import Endpoint
from tests.support.jwt_keys import ec_key, jwks
from tests.support.loopback import LoopbackServer
from tests.support.op import OpenIdProvider


def client_auth(op: OpenIdProvider, client_id: str = "pep") -> ClientAuthConfig:
    client = op.clients[client_id]
    return ClientAuthConfig(
        client_id=client_id,
        method=client.auth_method,
        secret_file=str(client.secret_file) if client.secret_file else None,
        key_file=str(client.key_file) if client.key_file else None,
    )


def config(op: OpenIdProvider, **changes: object) -> CibaConfig:
    base: dict[str, object] = {
        "issuer": op.issuer,
        "backchannel_endpoint": op.backchannel_endpoint,
        "token_endpoint": op.token_endpoint,
        "jwks_uri": op.jwks_uri,
        "client": client_auth(op),
        "timeout_s": 0.5,
        "min_interval_s": 0.05,
        "breaker": (3, 30.0, 1),
    }
    base.update(changes)
    return CibaConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint(None)
    yield ep
    await ep.close()


def ciba(op: OpenIdProvider, endpoint: Endpoint, **changes: object) -> CibaClient:
    return CibaClient(config(op, **changes), endpoint, slow_down_s=0.3)


async def started(client: CibaClient, approver: str = "alice") -> Started:
    begun = await client.start(approver, binding_message("3F2A9C", "crm", "POST", "Refund over 100"), 60)
    assert isinstance(begun, Started), begun
    return begun


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds


async def approve_when_asked(op: OpenIdProvider, count: int = 1) -> None:
    seen = await op.wait_ciba(count)
    await op.approve(seen["auth_req_id"])


async def test_the_approver_approves_and_the_id_token_proves_it(op: OpenIdProvider, endpoint: Endpoint) -> None:
    client = ciba(op, endpoint)
    begun = await started(client)
    assert begun.interval_s == 0.05  # the OP said 0: the floor applies
    seen = await op.wait_ciba()
    assert seen["binding_message"] == "Refund over 100 #3F2A9C"
    assert seen["login_hint"] == "alice"
    assert seen["requested_expiry"] == "60"
    approver = asyncio.create_task(approve_when_asked(op))
    result = await client.wait(begun, "alice", deadline(5))
    await approver
    assert isinstance(result, Approved), result
    assert result.approver == "alice"
    assert abs(result.approved_at - time.time()) < 30
    again = await client.poll(begun.auth_req_id, "alice", 0.05)  # redeemed once: the OP refuses a second time
    assert again == NotApproved(Reason.APPROVAL_INVALID, "the auth_req_id is unknown to the OP or already redeemed")
    assert client.breaker.state is State.CLOSED


async def test_every_client_authentication_method_works(op: OpenIdProvider, endpoint: Endpoint) -> None:
    for client_id in ("pep-post", "pep-jwt"):
        client = ciba(op, endpoint, client=client_auth(op, client_id))
        begun = await started(client)
        await op.approve(begun.auth_req_id)
        assert isinstance(await client.poll(begun.auth_req_id, "alice", 0.05), Approved), client_id


async def test_the_approver_declines(op: OpenIdProvider, endpoint: Endpoint) -> None:
    client = ciba(op, endpoint)
    begun = await started(client)
    await op.deny(begun.auth_req_id)
    result = await client.wait(begun, "alice", deadline(5))
    assert isinstance(result, NotApproved)
    assert result.reason is Reason.APPROVAL_DENIED


async def test_nobody_answers_in_time(op: OpenIdProvider, endpoint: Endpoint) -> None:
    client = ciba(op, endpoint)
    begun = await started(client)
    t0 = time.monotonic()
    result = await client.wait(begun, "alice", deadline(0.5))
    assert isinstance(result, NotApproved)
    assert result.reason is Reason.APPROVAL_TIMEOUT
    assert time.monotonic() - t0 < 1.5
    stats = await op.stats()
    assert stats["grants"]["urn:openid:params:grant-type:ciba"] >= 3  # it polled meanwhile, at the interval
    await op.expire(begun.auth_req_id)  # the OP's own expiry: expired_token
    expired = await client.poll(begun.auth_req_id, "alice", 0.05)
    assert isinstance(expired, NotApproved)
    assert expired.reason is Reason.APPROVAL_TIMEOUT
    assert client.breaker.state is State.CLOSED  # pending and expired answers are the OP working


async def test_an_id_token_for_someone_else_is_not_an_approval(op: OpenIdProvider, endpoint: Endpoint) -> None:
    # The PDP named "alice@example.com"; the OP resolves it to account alice, whose sub is "alice": with
    # approver_claim sub the names differ, so this is no proof that alice@example.com approved.
    by_sub = ciba(op, endpoint)
    begun = await started(by_sub, "alice@example.com")
    await op.approve(begun.auth_req_id)
    result = await by_sub.poll(begun.auth_req_id, "alice@example.com", 0.05)
    assert isinstance(result, NotApproved)
    assert result.reason is Reason.APPROVAL_UNAVAILABLE
    assert "sub is not the approver" in result.detail
    by_email = ciba(op, endpoint, approver_claim="email", scope="openid email")
    begun = await started(by_email, "alice@example.com")
    await op.approve(begun.auth_req_id)
    assert isinstance(await by_email.poll(begun.auth_req_id, "alice@example.com", 0.05), Approved)


async def test_an_id_token_that_does_not_verify_is_not_an_approval(
    op: OpenIdProvider, endpoint: Endpoint, tmp_path: Path
) -> None:
    other_keys = LoopbackServer()
    app = web.Application()
    other = jwks(ec_key("op-1"))  # the same kid, another key

    async def serve_keys(_request: web.Request) -> web.Response:
        return web.json_response(other)

    app.router.add_get("/jwks", serve_keys)
    await other_keys.serve(web.AppRunner(app))
    try:
        for changes in ({"jwks_uri": f"http://127.0.0.1:{other_keys.port}/jwks"}, {"issuer": "http://issuer.test"}):
            client = ciba(op, endpoint, **changes)
            begun = await started(client)
            await op.approve(begun.auth_req_id)
            result = await client.poll(begun.auth_req_id, "alice", 0.05)
            assert isinstance(result, NotApproved), changes
            assert result.reason is Reason.APPROVAL_UNAVAILABLE
            assert "does not verify" in result.detail
    finally:
        await other_keys.stop()


async def test_unknown_approver_and_slow_down(op: OpenIdProvider, endpoint: Endpoint) -> None:
    client = ciba(op, endpoint)
    unknown = await client.start("mallory", "x #AAAAAA", 60)
    assert unknown == NotApproved(Reason.APPROVAL_UNAVAILABLE, "backchannel request refused: unknown_user_id")
    begun = await started(client)
    await op.fault("oauth_error", error="slow_down", path="/token", count=1)
    slowed = await client.poll(begun.auth_req_id, "alice", 0.05)
    assert isinstance(slowed, Pending)
    assert slowed.interval_s == pytest.approx(0.35)
    assert await client.poll(begun.auth_req_id, "alice", 0.35) == Pending(0.35)


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ({"mode": "status", "status": 503}, "error: status 503"),
        ({"mode": "status", "status": 302}, "error: status 302"),
        ({"mode": "malformed"}, "malformed"),
        ({"mode": "malformed", "body": '{"auth_req_id": 5, "expires_in": 60}'}, "auth_req_id"),
        ({"mode": "close"}, "unreachable"),
        ({"mode": "delay", "delay_ms": 2000}, "timeout"),
    ],
)
async def test_a_failing_op_is_approval_unavailable(
    op: OpenIdProvider, endpoint: Endpoint, fault: dict[str, object], kind: str
) -> None:
    client = ciba(op, endpoint)
    await op.fault(path="/backchannel", count=1, **fault)  # type: ignore[arg-type]
    t0 = time.monotonic()
    result = await client.start("alice", "x #AAAAAA", 60)
    assert isinstance(result, NotApproved)
    assert result.reason is Reason.APPROVAL_UNAVAILABLE
    assert kind in result.detail
    assert time.monotonic() - t0 < 1.5  # the client's own deadline (0.5 s), not the OP's
    assert client.breaker.failures == 1


async def test_a_failing_token_endpoint_is_approval_unavailable(op: OpenIdProvider, endpoint: Endpoint) -> None:
    client = ciba(op, endpoint)
    begun = await started(client)
    await op.approve(begun.auth_req_id)
    await op.fault("malformed", path="/token", count=1)
    result = await client.poll(begun.auth_req_id, "alice", 0.05)
    assert isinstance(result, NotApproved)
    assert result.reason is Reason.APPROVAL_UNAVAILABLE


async def test_a_stopped_op_opens_the_circuit(op: OpenIdProvider, endpoint: Endpoint) -> None:
    client = ciba(op, endpoint)
    await op.stop()
    for _ in range(3):
        result = await client.start("alice", "x #AAAAAA", 60)
        assert isinstance(result, NotApproved)
        assert "unreachable" in result.detail
    assert client.breaker.state is State.OPEN
    await op.restart()  # up again, but the circuit stays open until open_s has passed
    refused = await client.start("alice", "x #AAAAAA", 60)
    assert refused == NotApproved(Reason.APPROVAL_UNAVAILABLE, "the OP's circuit is open")
    assert await op.ciba_requests() == []


async def test_a_frozen_op_costs_the_deadline_and_no_more(op: OpenIdProvider, endpoint: Endpoint) -> None:
    client = ciba(op, endpoint)
    begun = await started(client)
    op.freeze()
    try:
        t0 = time.monotonic()
        result = await client.wait(begun, "alice", deadline(5))
        assert isinstance(result, NotApproved)
        assert result.reason is Reason.APPROVAL_UNAVAILABLE
        assert "timeout" in result.detail
        assert time.monotonic() - t0 < 1.5
        t0 = time.monotonic()
        assert isinstance(await client.start("alice", "x #AAAAAA", 60), NotApproved)
        assert time.monotonic() - t0 < 1.0
    finally:
        op.resume()


async def test_a_short_budget_is_not_held_against_the_op(op: OpenIdProvider, endpoint: Endpoint) -> None:
    client = ciba(op, endpoint)
    await op.fault("delay", delay_ms=500, path="/backchannel")
    for _ in range(5):
        result = await client.start("alice", "x #AAAAAA", 60, budget_s=0.05)  # the caller's deadline, not the OP
        assert result == NotApproved(Reason.APPROVAL_TIMEOUT, "the time the request may wait ran out")
    assert client.breaker.failures == 0
    assert client.breaker.state is State.CLOSED


class Monotonic:
    """Monotonic time plus an offset the test bumps: the OP's `open_s` is skipped at once."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def state(client: CibaClient) -> State:
    """The OP's circuit now (a call, so that each look is read anew)."""
    return client.breaker.state


async def half_open(op: OpenIdProvider, endpoint: Endpoint) -> tuple[CibaClient, Monotonic]:
    """A client whose circuit a real outage opened, and whose `open_s` is over: the next exchange is the probe."""
    clock = Monotonic()
    client = CibaClient(config(op, breaker=(1, 30.0, 1)), endpoint, monotonic=clock, slow_down_s=0.3)
    await op.stop()
    assert isinstance(await client.start("alice", "x #AAAAAA", 60), NotApproved)
    assert state(client) is State.OPEN
    await op.restart()
    clock.offset += 30.0
    assert state(client) is State.HALF_OPEN
    return client, clock


async def test_a_probe_whose_caller_goes_away_leaves_the_circuit_half_open(
    op: OpenIdProvider, endpoint: Endpoint
) -> None:
    """It counted as the OP's failure: a caller who took the probe and went away, once per `open_s`, kept
    approvals `approval_unavailable` for everyone although the OP was up. The probe's place goes to the next."""
    client, _ = await half_open(op, endpoint)
    await op.fault("delay", delay_ms=2000, path="/backchannel", count=1)
    probe = asyncio.get_running_loop().create_task(client.start("alice", "x #AAAAAA", 60))
    await asyncio.sleep(0.1)  # the request is out; the OP has not answered
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert state(client) is State.HALF_OPEN
    assert isinstance(await client.start("alice", "x #AAAAAA", 60), Started)  # the next request probes
    assert state(client) is State.CLOSED


async def test_a_probe_cut_short_by_its_callers_budget_leaves_the_circuit_half_open(
    op: OpenIdProvider, endpoint: Endpoint
) -> None:
    client, _ = await half_open(op, endpoint)
    await op.fault("delay", delay_ms=500, path="/backchannel", count=1)
    result = await client.start("alice", "x #AAAAAA", 60, budget_s=0.05)
    assert result == NotApproved(Reason.APPROVAL_TIMEOUT, "the time the request may wait ran out")
    assert state(client) is State.HALF_OPEN
    assert isinstance(await client.start("alice", "x #AAAAAA", 60), Started)
    assert state(client) is State.CLOSED
