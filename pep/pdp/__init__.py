"""Policy decision points: each kind turns a `pep/v1` document into a `Verdict` or a `Failure`.

A PDP module never raises for a bad answer: every answer is classified, so the engine alone decides what
a classification means for the request and for the circuit breaker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

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
    """No usable answer. `outcome` is the `pep_pdp_request_duration_seconds` label."""

    reason: Reason
    outcome: str  # "error" | "unreachable" | "timeout"
    retryable: bool
    detail: str


ALLOWED = Verdict(True, Reason.ALLOWED)
DENIED = Verdict(False, Reason.POLICY_DENIED)
UNDEFINED = Verdict(False, Reason.PDP_UNDEFINED)


class Pdp(Protocol):
    """One PDP kind. `ask` makes exactly one attempt; deadlines and retries belong to the engine.

    `remote` is False for in-process engines: nothing can be unreachable, so the engine gives them no breaker.
    """

    remote: bool

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure: ...

    async def close(self) -> None: ...
