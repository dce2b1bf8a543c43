"""An approval from the PDP's "approval required" to a granted approval, for the request path to drive.

Two entry points, one per moment an approval can be asked for:
- `request`: the PDP just answered `approval_required` for this exact request. In `hold` mode the request waits
  (at most its deadline) while the person is asked; in `ticket` mode the person is asked and the agent is told at
  once, with a sealed ticket to retry with.
- `redeem`: the agent retries with a ticket. The ticket must open, be unexpired, unused here, bound to this
  exact request and caller, and approved by the approver the PDP names for the retry (the policy input holds
  more than the binding, headers for one, so the retry can need someone else); then the OP is polled once, if
  a poll is due (at most one per interval, however often the agent retries): still pending (the same ticket
  again), or approved (the approval is redeemed, single-use at the OP), or declined, expired, unavailable.

**One prompt per request.** In `ticket` mode a request that already waits for a person gets its pending ticket
back, without a new prompt, until the person's answer is read or the ticket is about to expire (identical
requests arriving together share one prompt): an agent that drops its ticket and sends the same call again (an
SDK retry loop, or one hoping a tired approver taps "approve" on the tenth prompt) cannot flood the approver's
device or the OP. Remembered per process, at most `MAX_PENDING` requests (the least recently asked about are
forgotten first).

**One caller, a few prompts.** Varying the request (another amount) makes a new prompt each time: a caller (the
binding's caller facts) may have at most `max_pending_per_caller` approvals waiting for a person in this process,
held requests and tickets whose answer has not been read and that have not expired. One more is refused
`approval_unavailable` at once, without asking the OP; other callers are not affected.

`Granted` is not an allow: the request path must ask the PDP again with `approval: granted.approval.document()`
in the policy input, and forward only on that allow (an `approval_required` the second time is a denial, never
another round). Nothing here forwards anything or mints anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pep.approvals.binding import (
    ApprovalPending,
    ApprovalTicket,
    GrantedApproval,
    RequestBinding,
    TicketRefusal,
    UsedApprovals,
    new_approval_id,
    open_ticket,
)
from pep.approvals.ciba import Approved, CibaClient, NotApproved, Pending, Started, ciba_config
from pep.approvals.message import binding_message
from pep.config import ApprovalsConfig, RouteApproval
from pep.decision import Reason
from pep.oauth.endpoint import Endpoint
from pep.pdp import ApprovalAsk
from pep.pdp.transport import tls_context
from pep.seal import Sealer

_RESULT_OF = {
    Reason.APPROVAL_DENIED: "denied",
    Reason.APPROVAL_TIMEOUT: "timeout",
    Reason.APPROVAL_UNAVAILABLE: "unavailable",
    Reason.APPROVAL_INVALID: "invalid",
}
Caller = tuple[tuple[str, str], ...]  # RequestBinding.subject
MAX_PENDING = 10_000  # ticket mode: requests waiting for a person this process remembers (module docstring)
_RETRY_ROOM_S = 1.0  # a pending ticket expiring sooner is not handed out again: the retry could not use it


@dataclass(frozen=True, slots=True)
class Granted:
    approval: GrantedApproval


@dataclass(frozen=True, slots=True)
class Awaiting:
    """Ticket mode: deny `approval_required` now, with what the agent needs to retry."""

    pending: ApprovalPending


ApprovalResult = Granted | Awaiting | NotApproved


class Approvals:
    """The approval engine of one config: the CIBA client, the ticket sealer and this process's used approvals."""

    def __init__(
        self,
        cfg: ApprovalsConfig,
        ciba: CibaClient,
        sealer: Sealer | None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.ciba = ciba
        self._sealer = sealer
        self._clock = clock
        self._monotonic = monotonic
        self._used = UsedApprovals(clock=clock)
        # (binding digest, approver) -> the pending ticket handed out for it (module docstring)
        self._pending: OrderedDict[tuple[str, str], ApprovalPending] = OrderedDict()
        # caller facts -> the keys of its pending tickets, and how many of its requests are held now
        self._tickets_of: dict[Caller, set[tuple[str, str]]] = {}
        self._owner: dict[tuple[str, str], Caller] = {}  # a pending ticket's caller
        # approval id -> when its next poll is due (monotonic) and the interval then (ticket retries)
        self._polls: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._held_of: dict[Caller, int] = {}
        self._starting: dict[tuple[str, str], asyncio.Task[ApprovalResult]] = {}  # prompts being sent now
        self._on_result = on_result or (lambda _result: None)
        self.held = 0  # hold mode: requests waiting for a person now (at most cfg.max_held)

    @classmethod
    def from_config(cls, cfg: ApprovalsConfig, on_result: Callable[[str], None] | None = None) -> Approvals:
        """Everything from the config: TLS, the pooled endpoint, the sealer (files read now: SealKeyError)."""
        tls = tls_context(cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file) if cfg.tls is not None else None
        ciba = CibaClient(ciba_config(cfg), Endpoint(tls))
        sealer = Sealer.from_files(cfg.ticket_key_files) if cfg.ticket_key_files else None
        return cls(cfg, ciba, sealer, on_result=on_result)

    async def close(self) -> None:
        await self.ciba.close()

    def _count(self, result: ApprovalResult | Started) -> None:
        if isinstance(result, Granted):
            self._on_result("granted")
        elif isinstance(result, NotApproved):
            self._on_result(_RESULT_OF.get(result.reason, "unavailable"))
        elif isinstance(result, Started):
            self._on_result("requested")

    async def request(
        self,
        binding: RequestBinding,
        ask: ApprovalAsk,
        mode: RouteApproval,
        method: str,
        deadline: float,
    ) -> ApprovalResult:
        """Ask the approver the PDP named about this exact request. `deadline` is on the monotonic clock: the
        request's own, already shortened to `hold_ms` by the caller in hold mode."""
        if mode.mode != "hold":
            return await self._ticket(binding, ask, mode, method, deadline)
        if self.held >= self.cfg.max_held:
            # Each held request keeps a connection and a poll loop open: past the bound it is refused, so a flood
            # of approval-required calls cannot hold the process (or the OP) hostage.
            result = NotApproved(Reason.APPROVAL_UNAVAILABLE, f"approvals.max_held ({self.cfg.max_held}) are waiting")
            self._count(result)
            return result
        caller = binding.subject
        refused = self._caller_full(caller)
        if refused is not None:
            return refused
        self.held += 1
        self._held_of[caller] = self._held_of.get(caller, 0) + 1
        try:
            return await self._request(binding, ask, mode, method, deadline)
        finally:
            self.held -= 1
            left = self._held_of[caller] - 1
            if left:
                self._held_of[caller] = left
            else:
                del self._held_of[caller]

    def _caller_full(self, caller: Caller) -> NotApproved | None:
        """Refused when this caller already has `max_pending_per_caller` approvals waiting (module docstring)."""
        keys = self._tickets_of.get(caller, set())
        now = self._clock()
        for key in [k for k in keys if (known := self._pending.get(k)) is None or known.expires_at <= now]:
            self._forget(key)
        waiting = len(self._tickets_of.get(caller, ())) + self._held_of.get(caller, 0)
        limit = self.cfg.max_pending_per_caller
        if waiting < limit:
            return None
        result = NotApproved(Reason.APPROVAL_UNAVAILABLE, f"approvals.max_pending_per_caller ({limit}) are waiting")
        self._count(result)
        return result

    async def _ticket(
        self,
        binding: RequestBinding,
        ask: ApprovalAsk,
        mode: RouteApproval,
        method: str,
        deadline: float,
    ) -> ApprovalResult:
        """Ticket mode: the pending ticket of this request and approver, else one prompt shared by every request
        that asks while it is being sent (module docstring)."""
        key = (binding.digest, ask.approver)
        known = self._pending_for(key, self._clock())
        if known is not None:
            return Awaiting(known)
        task = self._starting.get(key)
        if task is None:
            refused = self._caller_full(binding.subject)
            if refused is not None:
                return refused
            task = asyncio.get_running_loop().create_task(self._request(binding, ask, mode, method, deadline))
            self._starting[key] = task
            task.add_done_callback(lambda _t: self._starting.pop(key, None))
        # Shielded: a caller who goes away does not cancel the prompt the others wait on.
        return await asyncio.shield(task)

    async def _request(
        self,
        binding: RequestBinding,
        ask: ApprovalAsk,
        mode: RouteApproval,
        method: str,
        deadline: float,
    ) -> ApprovalResult:
        now = self._clock()
        expiry = self.cfg.requested_expiry_ms / 1000
        if ask.expires_at is not None:
            expiry = min(expiry, ask.expires_at - now)
        if mode.mode == "hold":
            expiry = min(expiry, deadline - self._monotonic())
        if expiry < 1:
            result: ApprovalResult = NotApproved(Reason.APPROVAL_TIMEOUT, "no time is left to ask the approver")
            self._count(result)
            return result
        if mode.mode == "ticket" and self._sealer is None:
            result = NotApproved(Reason.APPROVAL_UNAVAILABLE, "ticket mode without ticket keys")
            self._count(result)
            return result
        text = binding_message(binding.code, binding.route, method, ask.message, self.cfg.binding_message_max)
        started = await self.ciba.start(ask.approver, text, math.floor(expiry), deadline - self._monotonic())
        if isinstance(started, NotApproved):
            self._count(started)
            return started
        self._count(started)
        # The OP's expiry is its own word: what was asked for (the config's, the PDP's, the hold's) bounds it, so
        # an OP that ignores `requested_expiry` cannot make a ticket, or a hold's last poll, outlive it.
        started = dataclasses.replace(started, expires_at=min(started.expires_at, now + expiry))
        approval_id = new_approval_id()
        if mode.mode == "hold":
            waited = await self.ciba.wait(started, ask.approver, deadline)
            final: ApprovalResult = (
                Granted(GrantedApproval(approval_id, waited.approver, waited.approved_at))
                if isinstance(waited, Approved)
                else waited
            )
            self._count(final)
            return final
        assert self._sealer is not None
        ticket = ApprovalTicket(binding.digest, approval_id, ask.approver, started.auth_req_id, now, started.expires_at)
        pending = self._pending_of(ticket.seal(self._sealer), ticket, binding, started.interval_s)
        key = (binding.digest, ask.approver)
        self._pending[key] = pending
        self._tickets_of.setdefault(binding.subject, set()).add(key)
        self._owner[key] = binding.subject
        while len(self._pending) > MAX_PENDING:
            self._forget(next(iter(self._pending)))
        return Awaiting(pending)

    def _schedule(self, approval_id: str, due: float, interval_s: float) -> None:
        self._polls[approval_id] = (due, interval_s)
        self._polls.move_to_end(approval_id)
        while len(self._polls) > MAX_PENDING:
            self._polls.popitem(last=False)

    def _forget(self, key: tuple[str, str]) -> None:
        """No longer pending: answered, expired, or the oldest past MAX_PENDING."""
        self._pending.pop(key, None)
        caller = self._owner.pop(key, None)
        keys = self._tickets_of.get(caller, set()) if caller is not None else set()
        keys.discard(key)
        if caller is not None and not keys:
            self._tickets_of.pop(caller, None)

    def _pending_for(self, key: tuple[str, str], now: float) -> ApprovalPending | None:
        """The ticket already handed out for this request and approver, while a retry can still use it."""
        known = self._pending.get(key)
        if known is None:
            return None
        if known.expires_at - now < _RETRY_ROOM_S:
            self._forget(key)
            return None
        self._pending.move_to_end(key)
        return known

    def _answered(self, ticket: ApprovalTicket) -> None:
        """The person's answer to this ticket was read (or it can no longer be had): a new request asks again."""
        key = (ticket.binding, ticket.approver)
        known = self._pending.get(key)
        if known is not None and known.approval_id == ticket.approval_id:
            self._forget(key)

    def _pending_of(
        self, text: str, ticket: ApprovalTicket, binding: RequestBinding, interval_s: float
    ) -> ApprovalPending:
        url = self.cfg.elicitation_url
        return ApprovalPending(
            ticket=text,
            approval_id=ticket.approval_id,
            code=binding.code,
            retry_after_ms=max(1, round(interval_s * 1000)),
            expires_at=ticket.expires_at,
            elicitation_url=url.replace("{id}", ticket.approval_id) if url is not None else None,
        )

    async def redeem(self, text: str, binding: RequestBinding, ask: ApprovalAsk, deadline: float) -> ApprovalResult:
        """A retry presenting a ticket; `ask` is the PDP's answer to the retry. `deadline` is the request's own
        (monotonic clock)."""
        result = await self._redeem(text, binding, ask, deadline)
        if not isinstance(result, Awaiting):
            self._count(result)
        return result

    async def _redeem(self, text: str, binding: RequestBinding, ask: ApprovalAsk, deadline: float) -> ApprovalResult:
        if self._sealer is None:
            return NotApproved(Reason.APPROVAL_INVALID, "tickets are not accepted here (no ticket keys)")
        ticket = open_ticket(self._sealer, text, binding)
        if isinstance(ticket, TicketRefusal):
            return NotApproved(Reason.APPROVAL_INVALID, f"ticket: {ticket.problem}")
        if self._used.seen(ticket.approval_id):
            return NotApproved(Reason.APPROVAL_INVALID, "ticket: already used")
        # Checked before the OP is asked, so the approval is not spent on a request it was not given for.
        if ticket.approver != ask.approver:
            return NotApproved(Reason.APPROVAL_INVALID, "ticket: the policy names another approver for this request")
        if ask.expires_at is not None and ask.expires_at <= self._clock():
            return NotApproved(Reason.APPROVAL_TIMEOUT, "the PDP's expires_at has passed")
        # CIBA's client waits the interval between polls (slow_down adds to it), however often the agent retries:
        # a retry before the next poll is due gets the same ticket back, and the OP is not asked.
        now = self._monotonic()
        due, interval = self._polls.get(ticket.approval_id, (now, self.cfg.min_poll_interval_ms / 1000))
        if now < due:
            return Awaiting(self._pending_of(text, ticket, binding, due - now))
        self._schedule(ticket.approval_id, now + interval, interval)  # (a concurrent retry waits for this poll)
        polled = await self.ciba.poll(ticket.auth_req_id, ticket.approver, interval, deadline - self._monotonic())
        if isinstance(polled, Pending):
            self._schedule(ticket.approval_id, self._monotonic() + polled.interval_s, polled.interval_s)
            return Awaiting(self._pending_of(text, ticket, binding, polled.interval_s))
        self._polls.pop(ticket.approval_id, None)
        if not (isinstance(polled, NotApproved) and polled.reason is Reason.APPROVAL_UNAVAILABLE):
            self._answered(ticket)  # approved, declined, expired or unknown to the OP: no longer pending
        if isinstance(polled, NotApproved):
            return polled
        if not self._used.use(ticket.approval_id, ticket.expires_at):
            return NotApproved(Reason.APPROVAL_INVALID, "ticket: already used")
        return Granted(GrantedApproval(ticket.approval_id, polled.approver, polled.approved_at))
