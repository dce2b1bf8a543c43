"""The approval flow the request path drives, against the real OpenID Provider: hold mode waits for the person;
ticket mode hands the agent a sealed ticket that works once, for the same request and caller only, in another
process too (the same key file), and never after it expired or was declined."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pep.approvals.binding import RequestBinding, bind
from pep.approvals.ciba import NotApproved
from pep.approvals.flow import Approvals, Awaiting, Granted
from pep.config import ApprovalsConfig, BreakerConfig, OAuthClientConfig, RouteApproval
from pep.decision import Reason
from pep.pdp import ApprovalAsk
from tests.support.op import OpenIdProvider, ticket_key

SUBJECT = {"workload": "spiffe://t/agent", "agent": "agent-7", "id": "bob", "claims": {}}
ASK = ApprovalAsk("alice", "Refund over 100")
HOLD = RouteApproval("hold", 5000)
TICKET = RouteApproval("ticket")


def approvals_config(op: OpenIdProvider, tmp_path: Path, **changes: object) -> ApprovalsConfig:
    key = ticket_key(tmp_path)
    client = op.clients["pep"]
    base: dict[str, object] = {
        "issuer": op.issuer,
        "backchannel_authentication_endpoint": op.backchannel_endpoint,
        "token_endpoint": op.token_endpoint,
        "jwks_uri": op.jwks_uri,
        "client": OAuthClientConfig("pep", "client_secret_basic", str(client.secret_file)),
        "timeout_ms": 500,
        "min_poll_interval_ms": 50,
        "ticket_key_files": (str(key),),
        "elicitation_url": "https://approvals.example/pending/{id}",
        "breaker": BreakerConfig(3, 30000, 1),
    }
    base.update(changes)
    return ApprovalsConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
async def engine(op: OpenIdProvider, tmp_path: Path) -> AsyncIterator[tuple[Approvals, list[str]]]:
    counted: list[str] = []
    flow = Approvals.from_config(approvals_config(op, tmp_path), on_result=counted.append)
    yield flow, counted
    await flow.close()


def request(body: bytes = b'{"amount": 500}', subject: dict[str, object] | None = None) -> RequestBinding:
    return bind("refunds", "POST", "http://127.0.0.1:9001/refunds", body, subject or SUBJECT)


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


async def test_hold_mode_waits_for_the_person(op: OpenIdProvider, engine: tuple[Approvals, list[str]]) -> None:
    flow, counted = engine
    waiting = asyncio.create_task(flow.request(request(), ASK, HOLD, "POST", soon()))
    seen = await op.wait_ciba()
    assert seen["binding_message"] == f"Refund over 100 #{request().code}"
    assert int(seen["requested_expiry"]) <= 5  # never longer than the request may wait
    await op.approve(seen["auth_req_id"])
    result = await waiting
    assert isinstance(result, Granted)
    assert result.approval.approver == "alice"
    assert set(result.approval.document()) == {"approver", "approved_at", "id"}
    assert counted == ["requested", "granted"]


async def test_hold_mode_declined_and_unanswered(op: OpenIdProvider, engine: tuple[Approvals, list[str]]) -> None:
    flow, counted = engine
    waiting = asyncio.create_task(flow.request(request(), ASK, HOLD, "POST", soon()))
    await op.deny((await op.wait_ciba())["auth_req_id"])
    declined = await waiting
    assert isinstance(declined, NotApproved)
    assert declined.reason is Reason.APPROVAL_DENIED
    unanswered = await flow.request(request(), ASK, HOLD, "POST", soon(1.3))
    assert isinstance(unanswered, NotApproved)
    assert unanswered.reason is Reason.APPROVAL_TIMEOUT
    lapsed = await flow.request(request(), ApprovalAsk("alice", None, time.time() - 1), HOLD, "POST", soon())
    assert lapsed == NotApproved(Reason.APPROVAL_TIMEOUT, "no time is left to ask the approver")
    assert counted == ["requested", "denied", "requested", "timeout", "timeout"]


async def test_ticket_mode_works_once_for_the_same_request_and_caller(
    op: OpenIdProvider, engine: tuple[Approvals, list[str]], tmp_path: Path
) -> None:
    flow, counted = engine
    first = await flow.request(request(), ASK, TICKET, "POST", soon())
    assert isinstance(first, Awaiting)
    pending = first.pending
    assert pending.code == request().code
    assert pending.retry_after_ms == 50
    assert pending.elicitation_url == f"https://approvals.example/pending/{pending.approval_id}"
    still = await flow.redeem(pending.ticket, request(), ASK, soon())  # nobody has approved yet: the same answer
    assert isinstance(still, Awaiting)
    assert still.pending.ticket == pending.ticket
    for other in (request(b'{"amount": 5000}'), request(subject={**SUBJECT, "id": "mallory"})):
        refused = await flow.redeem(pending.ticket, other, ASK, soon())
        assert refused == NotApproved(Reason.APPROVAL_INVALID, "ticket: other_request")
    await op.approve((await op.wait_ciba())["auth_req_id"])
    # Another process with the same key file (another worker, or this one after a restart) redeems it.
    other_process = Approvals.from_config(approvals_config(op, tmp_path))
    try:
        granted = await other_process.redeem(pending.ticket, request(), ASK, soon())
        assert isinstance(granted, Granted)
        assert (granted.approval.approval_id, granted.approval.approver) == (pending.approval_id, "alice")
        again_there = await other_process.redeem(pending.ticket, request(), ASK, soon())
        assert again_there == NotApproved(Reason.APPROVAL_INVALID, "ticket: already used")
    finally:
        await other_process.close()
    # This process never saw the redemption: the OP's single-use redemption refuses it (once a poll is due).
    await asyncio.sleep(still.pending.retry_after_ms / 1000)
    again_here = await flow.redeem(pending.ticket, request(), ASK, soon())
    assert isinstance(again_here, NotApproved)
    assert again_here.reason is Reason.APPROVAL_INVALID
    assert counted == ["requested", "invalid", "invalid", "invalid"]


async def test_tickets_that_are_forged_expired_declined_or_keyless(
    op: OpenIdProvider, engine: tuple[Approvals, list[str]], tmp_path: Path
) -> None:
    flow, _ = engine
    first = await flow.request(request(), ASK, TICKET, "POST", soon())
    assert isinstance(first, Awaiting)
    ticket = first.pending.ticket
    forged = ticket[:-3] + ("AAA" if not ticket.endswith("AAA") else "BBB")
    assert await flow.redeem(forged, request(), ASK, soon()) == NotApproved(Reason.APPROVAL_INVALID, "ticket: forged")
    await op.deny((await op.wait_ciba())["auth_req_id"])
    declined = await flow.redeem(ticket, request(), ASK, soon())
    assert isinstance(declined, NotApproved)
    assert declined.reason is Reason.APPROVAL_DENIED
    rotated_away = tmp_path / "other"
    rotated_away.mkdir()
    stranger = Approvals.from_config(approvals_config(op, rotated_away))
    try:
        found = await stranger.redeem(ticket, request(), ASK, soon())
        assert found == NotApproved(Reason.APPROVAL_INVALID, "ticket: unknown_key")
    finally:
        await stranger.close()
    short = Approvals.from_config(approvals_config(op, tmp_path, requested_expiry_ms=1000))
    try:
        brief = await short.request(request(), ASK, TICKET, "POST", soon())
        assert isinstance(brief, Awaiting)
        await asyncio.sleep(1.1)
        expired = await short.redeem(brief.pending.ticket, request(), ASK, soon())
        assert expired == NotApproved(Reason.APPROVAL_INVALID, "ticket: expired")
    finally:
        await short.close()


async def test_an_op_outage_is_approval_unavailable_in_both_modes(
    op: OpenIdProvider, engine: tuple[Approvals, list[str]]
) -> None:
    flow, _ = engine
    first = await flow.request(request(), ASK, TICKET, "POST", soon())
    assert isinstance(first, Awaiting)
    await op.stop()
    for outcome in (
        await flow.request(request(), ASK, HOLD, "POST", soon()),
        await flow.request(request(b'{"amount": 501}'), ASK, TICKET, "POST", soon()),
        await flow.redeem(first.pending.ticket, request(), ASK, soon()),
    ):
        assert isinstance(outcome, NotApproved)
        assert outcome.reason is Reason.APPROVAL_UNAVAILABLE
    # The request that was asked about keeps its pending ticket: an outage is not the person's answer.
    assert await flow.request(request(), ASK, TICKET, "POST", soon()) == first


async def test_identical_requests_share_one_prompt_until_the_answer_is_read(
    op: OpenIdProvider, engine: tuple[Approvals, list[str]]
) -> None:
    flow, counted = engine
    together = await asyncio.gather(*(flow.request(request(), ASK, TICKET, "POST", soon()) for _ in range(5)))
    again = await flow.request(request(), ASK, TICKET, "POST", soon())
    assert all(isinstance(r, Awaiting) for r in together)
    assert {r.pending.ticket for r in (*together, again) if isinstance(r, Awaiting)} == {
        together[0].pending.ticket  # type: ignore[union-attr]
    }
    assert len(await op.ciba_requests()) == 1
    assert counted == ["requested"]
    # Another approver, or another request, is a prompt of its own.
    assert isinstance(await flow.request(request(), ApprovalAsk("bob"), TICKET, "POST", soon()), Awaiting)
    assert isinstance(await flow.request(request(b"{}"), ASK, TICKET, "POST", soon()), Awaiting)
    assert len(await op.ciba_requests()) == 3
    # Approved and redeemed: the same request later is asked about afresh.
    await op.approve((await op.wait_ciba())["auth_req_id"])
    assert isinstance(first := together[0], Awaiting)
    assert isinstance(await flow.redeem(first.pending.ticket, request(), ASK, soon()), Granted)
    fresh = await flow.request(request(), ASK, TICKET, "POST", soon())
    assert isinstance(fresh, Awaiting)
    assert fresh.pending.ticket != first.pending.ticket
    assert len(await op.ciba_requests()) == 4


async def test_a_ticket_is_redeemed_only_while_the_pdp_names_its_approver_and_stands_by_the_offer(
    op: OpenIdProvider, engine: tuple[Approvals, list[str]]
) -> None:
    flow, _ = engine
    first = await flow.request(request(), ASK, TICKET, "POST", soon())
    assert isinstance(first, Awaiting)
    await op.approve((await op.wait_ciba())["auth_req_id"])
    ticket = first.pending.ticket
    someone_else = await flow.redeem(ticket, request(), ApprovalAsk("bob", "Refund over 100"), soon())
    assert someone_else == NotApproved(
        Reason.APPROVAL_INVALID, "ticket: the policy names another approver for this request"
    )
    withdrawn = await flow.redeem(ticket, request(), ApprovalAsk("alice", None, time.time() - 1), soon())
    assert withdrawn == NotApproved(Reason.APPROVAL_TIMEOUT, "the PDP's expires_at has passed")
    # Neither spent the approval: the retry the PDP still offers it for redeems it.
    assert isinstance(await flow.redeem(ticket, request(), ASK, soon()), Granted)


async def test_a_caller_has_at_most_max_pending_per_caller_approvals_waiting_held_or_ticketed(
    op: OpenIdProvider, tmp_path: Path
) -> None:
    flow = Approvals.from_config(approvals_config(op, tmp_path, max_pending_per_caller=2))
    try:
        held = asyncio.create_task(flow.request(request(b"1"), ASK, HOLD, "POST", soon()))
        await op.wait_ciba()
        assert isinstance(await flow.request(request(b"2"), ASK, TICKET, "POST", soon()), Awaiting)
        full = NotApproved(Reason.APPROVAL_UNAVAILABLE, "approvals.max_pending_per_caller (2) are waiting")
        assert await flow.request(request(b"3"), ASK, TICKET, "POST", soon()) == full
        assert await flow.request(request(b"3"), ASK, HOLD, "POST", soon()) == full
        assert len(await op.ciba_requests()) == 2
        other: dict[str, object] = {**SUBJECT, "id": "carol"}
        assert isinstance(await flow.request(request(b"3", other), ASK, TICKET, "POST", soon()), Awaiting)
        # The held request answered: room for one more.
        await op.approve((await op.wait_ciba())["auth_req_id"])
        assert isinstance(await held, Granted)
        assert isinstance(await flow.request(request(b"3"), ASK, TICKET, "POST", soon()), Awaiting)
    finally:
        await flow.close()
