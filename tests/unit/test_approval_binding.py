"""An approval binds one exact request by one caller; a ticket is useless for anything else, and used once here."""

from __future__ import annotations

from typing import Any

import pytest

from pep.approvals.binding import (
    ApprovalTicket,
    GrantedApproval,
    RequestBinding,
    TicketRefusal,
    UsedApprovals,
    bind,
    body_digest,
    open_ticket,
    subject_facts,
)
from pep.seal import Sealer

NOW = 1_800_000_000.0
KEY = bytes(range(32))

TOKEN_BOB = {"workload": "spiffe://t/agent", "agent": "agent-7", "id": "bob", "claims": {}}
HEADER_BOB = {"workload": "spiffe://t/agent", "agent": "bob", "id": None, "claims": None}


def base(**changes: Any) -> RequestBinding:
    args: dict[str, Any] = {
        "route": "crm",
        "method": "POST",
        "upstream_url": "http://127.0.0.1:9000/api/refunds",
        "body": b'{"amount": 500}',
        "subject": TOKEN_BOB,
    }
    args.update(changes)
    return bind(**args)


@pytest.mark.parametrize(
    "changes",
    [
        {"route": "crm2"},
        {"method": "PUT"},
        {"upstream_url": "http://127.0.0.1:9000/api/refunds?x=1"},
        {"upstream_url": "http://127.0.0.1:9000/api/refunds/"},
        {"body": b'{"amount": 5000}'},
        {"body": b'{"amount":500}'},  # the exact bytes, not what they mean
        {"body": b""},
        {"body": None},
        {"subject": {**TOKEN_BOB, "id": "alice"}},
        {"subject": {**TOKEN_BOB, "agent": "agent-8"}},
        {"subject": {**TOKEN_BOB, "workload": "spiffe://t/other"}},
        {"subject": HEADER_BOB},
        {"subject": {**TOKEN_BOB, "claims": {"iss": "https://other.example"}}},
    ],
)
def test_any_difference_in_request_or_caller_changes_the_digest(changes: dict[str, Any]) -> None:
    assert base(**changes).digest != base().digest


def test_the_digest_is_stable_and_the_code_is_its_head() -> None:
    assert base().digest == base().digest
    assert len(base().digest) == 64
    assert base().code == base().digest[:6].upper()


def test_no_body_and_an_empty_body_differ() -> None:
    assert body_digest(None) is None
    assert body_digest(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_verified_and_unverified_identities_never_collide() -> None:
    token_sub = subject_facts({"id": "bob", "agent": None, "workload": None})
    header_agent = subject_facts({"id": None, "agent": "bob", "workload": None})
    token_agent = subject_facts({"id": "x", "agent": "bob", "workload": None})
    assert token_sub == (("token-sub", "bob"),)
    assert header_agent == (("header-agent", "bob"),)
    assert ("token-agent", "bob") in token_agent
    anonymous = subject_facts({"workload": None, "agent": None})
    assert anonymous == ()
    digests = {
        bind("r", "GET", "http://u/", None, s).digest
        for s in (
            {"id": "bob"},
            {"agent": "bob"},
            {"workload": "bob"},
            {"id": "x", "agent": "bob"},
            {},
        )
    }
    assert len(digests) == 5


def ticket_for(binding: RequestBinding, expires_at: float = NOW + 60) -> ApprovalTicket:
    return ApprovalTicket(binding.digest, "a" * 32, "alice", "rid-1", NOW, expires_at)


def test_a_ticket_opens_only_for_its_own_request_and_caller() -> None:
    sealer = Sealer([KEY], clock=lambda: NOW)
    ticket = ticket_for(base())
    text = ticket.seal(sealer)
    assert open_ticket(sealer, text, base()) == ticket
    assert open_ticket(sealer, text, base(body=b'{"amount": 5000}')) == TicketRefusal("other_request")
    assert open_ticket(sealer, text, base(subject=HEADER_BOB)) == TicketRefusal("other_request")
    assert open_ticket(sealer, text, base(upstream_url="http://127.0.0.1:9000/api/other")) == TicketRefusal(
        "other_request"
    )


def test_expired_forged_and_foreign_tickets_are_refused() -> None:
    sealer = Sealer([KEY], clock=lambda: NOW)
    expired = ticket_for(base(), expires_at=NOW - 1).seal(sealer)
    assert open_ticket(sealer, expired, base()) == TicketRefusal("expired")
    text = ticket_for(base()).seal(sealer)
    assert open_ticket(sealer, text[:-2] + ("A" if text[-2] != "A" else "B") + text[-1], base()) == TicketRefusal(
        "forged"
    )
    other_key = Sealer([bytes(32)], clock=lambda: NOW)
    assert open_ticket(other_key, text, base()) == TicketRefusal("unknown_key")
    another_purpose = sealer.seal("credential", {"b": base().digest}, NOW + 60)
    assert open_ticket(sealer, another_purpose, base()) == TicketRefusal("forged")
    not_a_ticket = sealer.seal("approval", {"b": base().digest}, NOW + 60)  # sealed, but missing its fields
    assert open_ticket(sealer, not_a_ticket, base()) == TicketRefusal("forged")
    assert open_ticket(sealer, "garbage", base()) == TicketRefusal("malformed")


def test_used_approvals_are_refused_until_they_expire() -> None:
    now = [NOW]
    used = UsedApprovals(clock=lambda: now[0])
    assert used.use("a1", NOW + 10)
    assert not used.use("a1", NOW + 10)
    assert used.seen("a1")
    now[0] = NOW + 10
    assert not used.seen("a1")  # its ticket has expired: nothing can present it any more


def test_the_replay_cache_is_bounded_and_drops_what_expires_first() -> None:
    now = [NOW]
    used = UsedApprovals(limit=3, clock=lambda: now[0])
    assert used.use("soon", NOW + 1)
    assert used.use("late", NOW + 100)
    assert used.use("later", NOW + 200)
    assert used.use("fourth", NOW + 300)  # full: the one closest to expiry goes
    assert len(used) == 3
    assert not used.seen("soon")
    assert used.seen("late")
    now[0] = NOW + 150
    assert used.use("fifth", NOW + 400)  # expired ones are dropped first
    assert used.seen("later")
    assert used.seen("fourth")


def test_the_granted_approval_as_policy_input() -> None:
    granted = GrantedApproval("a" * 32, "alice", NOW)
    assert granted.document() == {"approver": "alice", "approved_at": "2027-01-15T08:00:00Z", "id": "a" * 32}


def test_a_sub_is_bound_with_its_issuer_when_the_subject_carries_it() -> None:
    """A `sub` is unique only per issuer (the README's advice: list `iss` in `identity.jwt.claims`): bob of one
    issuer does not redeem bob of another's approval."""
    one = {**TOKEN_BOB, "claims": {"iss": "https://a.example", "dept": "x"}}
    other = {**TOKEN_BOB, "claims": {"iss": "https://b.example", "dept": "x"}}
    assert ("token-iss", "https://a.example") in subject_facts(one)
    assert base(subject=one).digest != base(subject=other).digest
    # Only the issuer: other claims may change between two tokens of one caller (a refreshed token).
    assert base(subject=one).digest == base(subject={**one, "claims": {"iss": "https://a.example"}}).digest
    assert subject_facts({"id": None, "agent": "bob", "claims": {"iss": "x"}}) == (("header-agent", "bob"),)
