"""Policy decision points: each kind turns a `pep/v1` document into a `Verdict` or a `Failure`.

A PDP module never raises for a bad answer: every answer is classified, so the engine alone decides what
a classification means for the request and for the circuit breaker.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from pep.decision import Reason


@dataclass(frozen=True, slots=True)
class Verdict:
    """A well-formed answer: allow, policy deny, or undefined. The breaker counts all three as successes."""

    allow: bool
    reason: Reason
    headers: tuple[tuple[str, str], ...] = ()
    note: str | None = None  # the PDP's own explanation, for the decision log


@dataclass(frozen=True, slots=True)
class Failure:
    """No usable answer. `outcome` is the `pep_pdp_request_duration_seconds` label ("unsent": the PDP was not
    asked, nothing is observed)."""

    reason: Reason
    outcome: str  # "error" | "unreachable" | "timeout" | "unsent"
    retryable: bool
    detail: str


ALLOWED = Verdict(True, Reason.ALLOWED)
DENIED = Verdict(False, Reason.POLICY_DENIED)
UNDEFINED = Verdict(False, Reason.PDP_UNDEFINED)
# The breaker no longer admitted the call when it was about to go out (see `admitted`).
NOT_ADMITTED = Failure(Reason.CIRCUIT_OPEN, "unsent", False, "the circuit opened before the call went out")

# The failures that are the PDP's own (DESIGN: timeouts, transport errors, error statuses, malformed answers).
# Any other failure (the request could not be built, not admitted) says nothing about the PDP.
PDP_FAILURES = frozenset({Reason.PDP_TIMEOUT, Reason.PDP_UNREACHABLE, Reason.PDP_ERROR_STATUS, Reason.PDP_MALFORMED})

# Set by the engine for each decision that has a breaker: a remote PDP calls `admitted()` right before a call's
# first byte, with nothing awaited in between, and makes no call when it says no. A permit is only valid for an
# immediate call; this is where a call that waited (for a connection, a discovery) learns that the circuit
# opened meanwhile.
GATE: ContextVar[Callable[[], bool] | None] = ContextVar("pep_pdp_gate", default=None)


def admitted() -> bool:
    """Whether a call may go out now (always, without a breaker)."""
    gate = GATE.get()
    return gate is None or gate()


def encode(value: Any) -> bytes | Failure:
    """The JSON body of a decision request, or the denial of this request alone when its data cannot be carried
    (a lone surrogate from a header that is not UTF-8, an integer beyond 64 bits, a key that is not a string):
    `request_ambiguous`, before anything is sent, so the breaker is not told."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        return Failure(Reason.REQUEST_AMBIGUOUS, "unsent", False, f"the policy input cannot be sent: {exc}")


class Pdp(Protocol):
    """One PDP kind. `ask` makes exactly one attempt; deadlines and retries belong to the engine.

    `remote` is False for in-process engines: nothing can be unreachable, so the engine gives them no breaker.
    """

    remote: bool

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure: ...

    async def close(self) -> None: ...
