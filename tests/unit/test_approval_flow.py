"""pep.approvals.flow against an OP that answers as it likes (a stand-in CIBA client): what the PEP hands out
stays within the config, whatever the OP says."""

from __future__ import annotations

import secrets
from typing import Any

from pep.approvals.binding import bind
from pep.approvals.ciba import Started
from pep.approvals.flow import Approvals, Awaiting
from pep.config import ApprovalsConfig, OAuthClientConfig, RouteApproval
from pep.pdp import ApprovalAsk
from pep.seal import Sealer

NOW = 1_800_000_000.0


class LongLivedOp:
    """An OP that ignores `requested_expiry` and keeps every request open for a day."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def start(self, _approver: str, _text: str, requested_expiry_s: int, _budget: float) -> Started:
        self.asked.append(requested_expiry_s)
        return Started(secrets.token_hex(8), NOW + 86400, 1.0)


def engine(op: Any, requested_expiry_ms: int = 60000) -> Approvals:
    cfg = ApprovalsConfig(
        issuer="https://op.test",
        backchannel_authentication_endpoint="https://op.test/bc",
        token_endpoint="https://op.test/token",
        jwks_uri="https://op.test/jwks",
        client=OAuthClientConfig("pep", "client_secret_basic", "/nonexistent"),
        requested_expiry_ms=requested_expiry_ms,
    )
    return Approvals(cfg, op, Sealer([secrets.token_bytes(32)], clock=lambda: NOW), clock=lambda: NOW)


async def test_a_ticket_lives_no_longer_than_asked_whatever_the_op_answers() -> None:
    op = LongLivedOp()
    binding = bind("refunds", "POST", "http://up/refunds", b"{}", {"agent": "bot"})
    found = await engine(op).request(binding, ApprovalAsk("alice"), RouteApproval("ticket"), "POST", 1e12)
    assert isinstance(found, Awaiting)
    assert op.asked == [60]
    assert found.pending.expires_at == NOW + 60  # not the OP's day
    # The PDP's expires_at shortens it further.
    shorter = await engine(LongLivedOp()).request(
        binding, ApprovalAsk("alice", None, NOW + 30), RouteApproval("ticket"), "POST", 1e12
    )
    assert isinstance(shorter, Awaiting)
    assert shorter.pending.expires_at == NOW + 30
