"""What an approval is for, the ticket that carries it between an agent's attempts, and how often it may be used.

**The binding** is a SHA-256 digest over exactly what the person approves: the route, the method, the upstream URL
the request would be forwarded to, the SHA-256 of the exact body bytes that would be forwarded (or "no body",
which differs from an empty one), and the caller. The caller is a list of tagged facts (a token's `sub` with its
`iss` when the subject's claims carry it), so an identity of one kind never equals an identity of another: a
verified token's `sub` "bob" (`token-sub`) is not the agent header "bob" (`header-agent`), and an agent named by a
verified token (`token-agent`) is not one named by a header.

**The ticket** (`approval_required` in ticket mode) is sealed (`pep.seal`, purpose `approval`): it holds the
binding digest, the approval id, the approver, the CIBA `auth_req_id` and the expiry, and opens only in a process
holding the ticket key. A ticket presented with any other request or by any other caller opens but does not
match the binding: `approval_invalid`.

**Single use.** Sealing alone cannot make anything usable once: a sealed ticket is a value, and values can be
presented twice, to two workers, or after a restart. What holds:
- Across workers and restarts: the approval is the OP's CIBA grant, and redeeming `auth_req_id` at the OP's token
  endpoint is single-use at the OP (oidc-provider marks the request consumed and refuses a second redemption with
  `invalid_grant`, revoking what the first issued). The PEP redeems it before asking the PDP again, so of two
  retries carrying one ticket (in one process or two, before or after a restart) at most one gets the approval.
- Per process: a replay cache (`UsedApprovals`) refuses an approval id it has seen redeemed, without asking the OP
  again; it is bounded and forgets entries once their tickets have expired.
- Always: the ticket expires (the CIBA request's own expiry, capped by the config), and it only matches its own
  request and caller.
So an approval is used by the first retry that redeems it, whatever the PDP then answers: if the PDP is down at
that moment the request is denied and the person must approve again.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from pep.seal import Sealer, TicketProblem

PURPOSE = "approval"
TICKET_HEADER = "x-pep-approval-ticket"  # where a retry presents its ticket; never forwarded, never policy input
_BINDING_VERSION = "pep-approval-binding/1"
_MAX_TEXT = 512  # the longest approver or id a ticket carries


def body_digest(body: bytes | None) -> str | None:
    """SHA-256 (hex) of the exact bytes forwarded; None for a request without a body."""
    return None if body is None else hashlib.sha256(body).hexdigest()


def subject_facts(subject: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The caller as tagged facts, from the `pep/v1` subject.

    A verified token is present when `subject.id` is a string: then `agent` came from that token (its `act.sub`,
    `azp` or `client_id`), otherwise from the agent header. `workload` is the mTLS peer's SPIFFE ID or the
    configured one; either way it is the same for this caller on every attempt. Of the token's claims only `iss` is
    bound: others may change between two tokens of one caller (a refreshed token)."""
    facts: list[tuple[str, str]] = []
    sub = subject.get("id")
    verified = isinstance(sub, str) and bool(sub)
    if verified:
        # A `sub` is unique only per issuer: bound with the issuer where the subject carries it (`iss` listed in
        # `identity.jwt.claims`, as the README asks of configs with several issuers).
        claims = subject.get("claims")
        issuer = claims.get("iss") if isinstance(claims, Mapping) else None
        if isinstance(issuer, str) and issuer:
            facts.append(("token-iss", issuer))
        facts.append(("token-sub", str(sub)))
    agent = subject.get("agent")
    if isinstance(agent, str) and agent:
        facts.append(("token-agent" if verified else "header-agent", agent))
    workload = subject.get("workload")
    if isinstance(workload, str) and workload:
        facts.append(("workload", workload))
    return tuple(facts)


@dataclass(frozen=True, slots=True)
class RequestBinding:
    """One exact request by one caller; `digest` is what a ticket carries."""

    route: str
    method: str
    upstream_url: str
    body_sha256: str | None
    subject: tuple[tuple[str, str], ...]

    @property
    def digest(self) -> str:
        canonical = orjson.dumps(
            [
                _BINDING_VERSION,
                self.route,
                self.method,
                self.upstream_url,
                self.body_sha256,
                [list(fact) for fact in self.subject],
            ]
        )
        return hashlib.sha256(canonical).hexdigest()

    @property
    def code(self) -> str:
        """Six hex characters of the digest: shown to the approver and in the agent's denial, so a person can tell
        which request a prompt is about."""
        return self.digest[:6].upper()


def bind(route: str, method: str, upstream_url: str, body: bytes | None, subject: Mapping[str, Any]) -> RequestBinding:
    return RequestBinding(route, method, upstream_url, body_digest(body), subject_facts(subject))


def new_approval_id() -> str:
    """Unguessable: the id names one approval in logs and in the policy input."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class ApprovalTicket:
    """A pending approval, sealed into the ticket an agent presents on retry."""

    binding: str  # RequestBinding.digest
    approval_id: str
    approver: str
    auth_req_id: str
    issued_at: float  # seconds since the epoch
    expires_at: float

    def seal(self, sealer: Sealer) -> str:
        data = {
            "b": self.binding,
            "id": self.approval_id,
            "approver": self.approver,
            "rid": self.auth_req_id,
            "iat": self.issued_at,
        }
        return sealer.seal(PURPOSE, data, self.expires_at)


@dataclass(frozen=True, slots=True)
class TicketRefusal:
    """Why a presented ticket is not usable for this request: always `approval_invalid` to the caller."""

    problem: str  # a TicketProblem value, or "other_request", "used"


def open_ticket(sealer: Sealer, text: str, binding: RequestBinding) -> ApprovalTicket | TicketRefusal:
    """The ticket, if it opens, has not expired, and was issued for exactly this request and caller."""
    opened = sealer.open(PURPOSE, text)
    if isinstance(opened, TicketProblem):
        return TicketRefusal(opened.value)
    data = opened.data
    fields = (data.get("b"), data.get("id"), data.get("approver"), data.get("rid"))
    iat = data.get("iat")
    if not all(isinstance(f, str) and 0 < len(f) <= _MAX_TEXT for f in fields) or not isinstance(iat, int | float):
        return TicketRefusal(TicketProblem.FORGED.value)  # sealed by this key, but not as an approval ticket
    digest, approval_id, approver, auth_req_id = (str(f) for f in fields)
    if not hmac.compare_digest(digest, binding.digest):
        return TicketRefusal("other_request")
    return ApprovalTicket(digest, approval_id, approver, auth_req_id, float(iat), opened.expires_at)


class UsedApprovals:
    """Approval ids redeemed by this process, kept until their tickets expire (at most `limit` of them).

    Per process only (see the module docstring): the OP's single-use redemption is what holds across workers and
    restarts. When full, the entry closest to expiry is dropped first; a dropped entry is still refused by the OP."""

    def __init__(self, limit: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._limit = limit
        self._clock = clock
        self._used: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._used)

    def seen(self, approval_id: str) -> bool:
        expires = self._used.get(approval_id)
        return expires is not None and expires > self._clock()

    def use(self, approval_id: str, expires_at: float) -> bool:
        """Record a redemption; False when this process already redeemed this approval."""
        if self.seen(approval_id):
            return False
        self._prune()
        self._used[approval_id] = expires_at
        return True

    def _prune(self) -> None:
        """Entries come only from redeemed approvals (a person approved each), so a linear pass is cheap enough."""
        if len(self._used) < self._limit:
            return
        now = self._clock()
        for key in [k for k, exp in self._used.items() if exp <= now]:
            del self._used[key]
        while len(self._used) >= self._limit:
            soonest = min(self._used, key=self._used.__getitem__)
            del self._used[soonest]


@dataclass(frozen=True, slots=True)
class GrantedApproval:
    """An approval the OP confirmed for the approver: what goes into the policy input as `approval`."""

    approval_id: str
    approver: str
    approved_at: float  # seconds since the epoch

    def document(self) -> dict[str, str]:
        """`approval: {approver, approved_at, id}` for the `pep/v1` document (AuthZEN: `context.approval`)."""
        when = datetime.fromtimestamp(self.approved_at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return {"approver": self.approver, "approved_at": when, "id": self.approval_id}


@dataclass(frozen=True, slots=True)
class ApprovalPending:
    """What an agent needs to retry a request that waits for a person (`approval_required`, ticket mode)."""

    ticket: str  # sealed (pep.seal): opaque to the agent, presented in `x-pep-approval-ticket` on the retry
    approval_id: str
    code: str  # the request's binding code, also shown to the approver
    retry_after_ms: int  # the OP's polling interval: retrying sooner only gets the same answer
    expires_at: float  # seconds since the epoch: after this the ticket is `approval_invalid`
    elicitation_url: str | None = None  # approvals.elicitation_url for this approval (MCP -32042), if configured

    def fields(self) -> dict[str, Any]:
        when = datetime.fromtimestamp(self.expires_at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return {
            "ticket": self.ticket,
            "id": self.approval_id,
            "code": self.code,
            "retry_after_ms": self.retry_after_ms,
            "expires_at": when,
        }

    @property
    def retry_after_s(self) -> str:
        return str(max(1, math.ceil(self.retry_after_ms / 1000)))
