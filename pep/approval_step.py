"""The approval step of the request path: what a PDP's `approval_required` becomes on a route with `approval`.

`pep run` calls `settle` right after the PDP's decision; `pep explain` calls `describe` (it asks nobody).

- A retry carrying a ticket (`x-pep-approval-ticket`) was decided like any request first: only when the PDP still
  answers `approval_required`, naming the approver who approved the ticket, is the ticket redeemed
  (pep/approvals/flow.py `redeem`). One ticket header, no more.
- Otherwise the approver the PDP named is asked through CIBA: in `hold` mode the request waits (at most `hold_ms`
  and the route's `timeout_ms`), in `ticket` mode the agent is answered at once with a sealed ticket.
- An approval granted is not an allow: the PDP is asked again with `approval: {approver, approved_at, id}` in the
  policy input (every document of a batch), and only that allow forwards. Asked for approval a second time, the
  request is denied `policy_denied`: there is never a second round.

The approval binds the exact request (route, method, upstream URL, the bytes an allow forwards, the caller): the
admission read the body whole for that. On MCP routes the body is bound as the JSON-RPC message(s) it parsed to,
without their `id`s (keys sorted): every SDK numbers each attempt anew, so a retry of the same call carries other
bytes for the same action. The parse is strict (one reading of the bytes), so nothing else can differ. A reply to
a server request keeps its id, the server's (the PEP's token opened): it says which question is answered.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from pep.admission import Admission
from pep.approvals.binding import ApprovalPending, RequestBinding, bind
from pep.approvals.ciba import NotApproved
from pep.approvals.flow import ApprovalResult, Approvals, Awaiting, Granted
from pep.decision import Deny, Reason
from pep.engine import Engine, Outcome
from pep.pdp import ApprovalAsk

# MCP 2026-07-28 sends the client's capabilities with every request (`params._meta`): only there can the PEP know,
# per request, that the client handles URL elicitations (-32042). Session protocols declare them once, in an
# `initialize` the PEP keeps no state about: those clients get -32001 with the ticket in `data`.
CLIENT_CAPABILITIES: Final = "io.modelcontextprotocol/clientCapabilities"
_AGAIN: Final = "the policy asked for an approval again after one was granted"


@dataclass(frozen=True, slots=True)
class Step:
    """The decision to act on, and what the denial and the decision log say about the approval."""

    outcome: Outcome
    pending: ApprovalPending | None = None  # ticket mode: what the agent retries with
    log: dict[str, Any] | None = None  # the decision log's `approval` (never the ticket)


def wanted(outcome: Outcome, admission: Admission | None) -> bool:
    """The PDP asked for an approval on a route that has one configured."""
    decision = outcome.decision
    return (
        admission is not None
        and admission.route.config.approval is not None
        and outcome.approval is not None
        and isinstance(decision, Deny)
        and decision.reason is Reason.APPROVAL_REQUIRED
    )


async def settle(
    approvals: Approvals | None, engine: Engine, admission: Admission, outcome: Outcome, tickets: Sequence[str]
) -> Step:
    """The approval flow for a `wanted` outcome (module docstring). `tickets`: the request's ticket headers."""
    mode, ask = admission.route.config.approval, outcome.approval
    assert mode is not None
    assert ask is not None
    assert isinstance(outcome.decision, Deny)
    if approvals is None:  # not configured (config refuses this): nobody can be asked
        return _refused(outcome, NotApproved(Reason.APPROVAL_UNAVAILABLE, "no approvals section"))
    check = admission.check
    binding = binding_of(admission)
    now, timeout = time.monotonic(), admission.route.config.timeout_ms / 1000
    result: ApprovalResult
    if tickets:
        # Two tickets on one request are not a retry of one approval: redeemed as an unreadable ticket (counted).
        result = await approvals.redeem(tickets[0] if len(tickets) == 1 else "", binding, ask, now + timeout)
    else:
        wait = min(mode.hold_ms / 1000, timeout) if mode.mode == "hold" else timeout
        result = await approvals.request(binding, ask, mode, check.method, now + wait)
    if isinstance(result, Awaiting):
        pending = result.pending
        return Step(outcome, pending, {"id": pending.approval_id, "code": pending.code, "result": "pending"})
    if isinstance(result, NotApproved):
        return _refused(outcome, result)
    assert isinstance(result, Granted)
    granted = result.approval.document()
    again = check.with_documents(
        {**check.document, "approval": granted}, tuple({**doc, "approval": granted} for doc in check.more)
    )
    second = admission.settle(await engine.decide(again))
    # Both asks count, and the decision started with the first.
    second = Outcome(
        second.decision,
        outcome.attempts + second.attempts,
        second.pdp_ms,
        second.note,
        second.reasons,
        second.approval,
        outcome.started,
    )
    decision = second.decision
    if isinstance(decision, Deny) and decision.reason is Reason.APPROVAL_REQUIRED:
        deny = Deny(Reason.POLICY_DENIED, decision.decision_id, _AGAIN)
        second = Outcome(deny, second.attempts, second.pdp_ms, _AGAIN, second.reasons, None, second.started)
    return Step(second, None, {**granted, "result": "granted"})


def binding_of(admission: Admission) -> RequestBinding:
    """What the approval is for (module docstring)."""
    check = admission.check
    body, value = check.body, admission.inspected.value
    if admission.route.config.protocol == "mcp" and body is not None and value is not None:
        messages = value if isinstance(value, list) else [value]
        unnumbered = [_unnumbered(m) for m in messages]
        body = orjson.dumps(unnumbered, option=orjson.OPT_SORT_KEYS)
    return bind(admission.route.name, check.method, admission.upstream_url, body, admission.subject)


def _unnumbered(message: Any) -> Any:
    """A request or notification without its `id` (the client's own number, new on every attempt). A reply keeps
    it: there the id is the server request it answers (opened from the PEP's token, the same on every attempt),
    and an `accept` to one elicitation must not pass for an `accept` to another."""
    if isinstance(message, dict) and "method" in message:
        return {k: v for k, v in message.items() if k != "id"}
    return message


def _refused(outcome: Outcome, result: NotApproved) -> Step:
    assert isinstance(outcome.decision, Deny)
    deny = Deny(result.reason, outcome.decision.decision_id, result.detail)
    refused = outcome.overruled(deny, result.detail)
    return Step(refused, None, {"result": result.reason.value.removeprefix("approval_")})


def url_elicitation(admission: Admission) -> bool:
    """The MCP request declared, in its own `_meta`, that its client handles URL elicitations (see above)."""
    value = admission.inspected.value
    first = value[0] if isinstance(value, list) and value else value
    params = first.get("params") if isinstance(first, Mapping) else None
    meta = params.get("_meta") if isinstance(params, Mapping) else None
    capabilities = meta.get(CLIENT_CAPABILITIES) if isinstance(meta, Mapping) else None
    elicitation = capabilities.get("elicitation") if isinstance(capabilities, Mapping) else None
    return isinstance(elicitation, Mapping) and isinstance(elicitation.get("url"), Mapping)


def describe(admission: Admission, ask: ApprovalAsk) -> dict[str, Any]:
    """`pep explain`: who would be asked and how the request would wait; nobody is asked."""
    mode = admission.route.config.approval
    binding = binding_of(admission)
    out: dict[str, Any] = {"approver": ask.approver, "message": ask.message, "code": binding.code}
    if mode is None:
        out["mode"] = None  # the route has no `approval`: the request is denied approval_required, no ticket
    else:
        out["mode"] = mode.mode
        if mode.mode == "hold":
            out["hold_ms"] = min(mode.hold_ms, admission.route.config.timeout_ms)
    return out
