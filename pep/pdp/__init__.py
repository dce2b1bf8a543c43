"""Policy decision points: each kind turns a `pep/v1` document into a `Verdict` or a `Failure`.

A PDP module never raises for a bad answer: every answer is classified, so the engine alone decides what
a classification means for the request and for the circuit breaker.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import orjson
from mypy_extensions import mypyc_attr

from pep.decision import CredentialNarrowing, Reason


@dataclass(frozen=True, slots=True)
class ApprovalAsk:
    """The PDP's "allowed once this person approves" (`approval_required`): who approves, and what to tell them.

    `message` is the policy's text for the approver, never shown unfiltered (`pep.approvals.message`); `expires_at`
    (seconds since the epoch) is how long the PDP stands by the offer (AuthZEN `access_request.expires_at`)."""

    approver: str
    message: str | None = None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A well-formed answer: allow, policy deny, approval required, or undefined. The breaker counts them all as
    successes. `approval` is set exactly when `reason` is `approval_required` (never with an allow)."""

    allow: bool
    reason: Reason
    headers: tuple[tuple[str, str], ...] = ()
    note: str | None = None  # the PDP's own explanation, for the decision log
    approval: ApprovalAsk | None = None
    credential: CredentialNarrowing | None = None  # with an allow: the route's credential, narrowed


@dataclass(frozen=True, slots=True)
class Failure:
    """No usable answer. `outcome` is the `pep_pdp_request_duration_seconds` label ("unsent": the PDP was not
    asked, nothing is observed)."""

    reason: Reason
    outcome: str  # "error" | "unreachable" | "timeout" | "unsent"
    retryable: bool
    detail: str
    # The PDP answered in time and refused this request (a 4xx other than 408): the request's problem, which the
    # caller's data may have caused, so the breaker is not told (see `pep.pdp.answer.status_failure`).
    refused: bool = False


ALLOWED: Final = Verdict(True, Reason.ALLOWED)
DENIED: Final = Verdict(False, Reason.POLICY_DENIED)
UNDEFINED: Final = Verdict(False, Reason.PDP_UNDEFINED)
# The breaker no longer admitted the call when it was about to go out (see `admitted`).
UNSENT: Final = "unsent"  # a Failure's outcome when the PDP was not asked: never observed, never the breaker's
NOT_ADMITTED: Final = Failure(Reason.CIRCUIT_OPEN, UNSENT, False, "the circuit opened before the call went out")

# The failures that are the PDP's own (README, "Only the PDP's own failures count": timeouts, transport errors,
# error statuses, malformed answers).
# Any other failure (the request could not be built, not admitted) says nothing about the PDP.
PDP_FAILURES: Final = frozenset(
    {Reason.PDP_TIMEOUT, Reason.PDP_UNREACHABLE, Reason.PDP_ERROR_STATUS, Reason.PDP_MALFORMED}
)

# Set by the engine for each decision that has a breaker: a remote PDP calls `admitted()` right before a call's
# first byte, with nothing awaited in between, and makes no call when it says no. A permit is only valid for an
# immediate call; this is where a call that waited (for a connection, a discovery) learns that the circuit
# opened meanwhile.
GATE: Final[ContextVar[Callable[[], bool] | None]] = ContextVar("pep_pdp_gate", default=None)


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
        return Failure(Reason.REQUEST_AMBIGUOUS, UNSENT, False, f"the policy input cannot be sent: {exc}")


async def settled(result: Verdict | Failure) -> Verdict | Failure:
    """A result known at once, as the awaitable an `ask` returns (one that hands over another coroutine)."""
    return result


Ask = Callable[[dict[str, Any], str], Awaitable[Verdict | Failure]]

# The most PDP exchanges one decision about several documents keeps open at once (the engine may allow fewer).
BATCH_CONCURRENCY: Final = 16


@mypyc_attr(allow_interpreted_subclasses=True)  # PDPs of the tests, and explain's recording PDP, subclass it
class Pdp(abc.ABC):
    """One PDP kind: everything the engine and `pep explain` call on it. `ask` makes exactly one attempt;
    deadlines and retries belong to the engine.

    `remote` is False for in-process engines: nothing can be unreachable, so the engine gives them no breaker.
    """

    remote: bool

    @abc.abstractmethod
    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure: ...

    async def ask_many(
        self, documents: Sequence[dict[str, Any]], request_id: str, concurrency: int = BATCH_CONCURRENCY
    ) -> list[Verdict | Failure]:
        """One answer per document, in order (a JSON-RPC batch, a filtered tool list), with at most `concurrency`
        exchanges at a time. A PDP with a batch endpoint overrides this to ask once."""
        return await ask_each(self.ask, list(enumerate(documents)), request_id, concurrency)

    def reload(self) -> str | None:
        """Re-read what the PDP loaded from files at start (a config reload); why not, or None. A remote PDP
        has nothing to re-read."""
        return None

    @abc.abstractmethod
    async def close(self) -> None: ...


async def ask_each(
    ask: Ask, items: Sequence[tuple[int, dict[str, Any]]], request_id: str, concurrency: int
) -> list[Verdict | Failure]:
    """Each `(index, document)` asked on its own as `{request_id}-{index}`, at most `concurrency` at a time.

    A few workers take the documents in turn, so a batch never has more exchanges open than the engine counted
    for it, and the PDP pool is left to other requests. Each worker yields to the event loop after an answer: an
    in-process PDP (Cedar) never suspends, and a batch must not hold the loop for all its documents at once.
    """
    results: list[Verdict | Failure | None] = [None] * len(items)
    turns = iter(range(len(items)))

    async def worker() -> None:
        for position in turns:
            index, document = items[position]
            results[position] = await ask(document, f"{request_id}-{index}")
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as workers:
        for _ in range(max(1, min(concurrency, len(items)))):
            workers.create_task(worker())
    answers = [r for r in results if r is not None]
    assert len(answers) == len(items)
    return answers
