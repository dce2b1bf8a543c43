"""Model answers are decided before the agent sees them: every tool an answer calls, and the model that answered.

For an allowed model call whose answers can call tools (chat completions, completions, responses, runs), the
2xx answer is read with `protocols.model_answer`: whole for JSON (any content type: the openai SDK parses any
body it expects JSON from), event by event for `text/event-stream`. Each tool it calls is asked about as
`model.tool_call`, and an answering model that is neither the decided one nor a dated version of it as
`model.answer`, with the request's document; each name once per answer, every such decision in the decision
log. With a required decision log (`required: true`) an allow here is committed like the request's own allow
(and like `filter_tools_list`'s): what it lets through reaches the agent only once its line is written, else
the answer is stopped as `audit_unavailable`; denials stay best-effort. A refusal replaces a JSON answer with
the OpenAI-style 403; in a stream, the events before the refused one have been relayed, an `error` event
follows, and the stream ends. An answer that cannot be read (encoded, not
UTF-8, not JSON) is never relayed: a 502, or mid-stream an `error` event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import orjson

from pep import attributes
from pep.decision import Allow, Reason
from pep.decision_log import DecisionLog, unaudited
from pep.engine import Check, Engine, Outcome
from pep.protocols import media
from pep.protocols.model_answer import AnswerError, EventReader, Findings, read_json, same_model
from pep.protocols.openai import ANSWER, TOOL_CALL
from pep.responses import MESSAGES, Reply, deny_openai
from pep.routing import Route

log: Final = logging.getLogger("pep.answers")
_UNREADABLE: Final = "upstream_unreadable"


def error_event(code: str, message: str) -> bytes:
    """An SSE event the openai SDK raises on (`APIError`): its data has an `error` object."""
    error = {"message": message, "type": "permission_denied", "code": code, "param": None}
    return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": error}) + b"\n\n"


class ModelAnswers:
    """The answer check of one allowed model call (`upstream.AnswerCheck`)."""

    def __init__(
        self,
        engine: Engine,
        decision_log: DecisionLog,
        log_budget: Callable[[Outcome], float],
        unreadable: Callable[[], None],
        route: Route,
        document: dict[str, Any],
        allow: Allow,
        decide_tools: bool,
        trace_id: str | None = None,
    ) -> None:
        self._engine = engine
        self._log = decision_log
        self._log_budget = log_budget  # seconds a required log may take to write an allow's line
        self._count_unreadable = unreadable
        self._route = route
        self._document = document
        self._facts: dict[str, Any] = document["model"]
        self._allow = allow
        self._decide_tools = decide_tools
        self._trace_id = trace_id
        self._allowed: set[tuple[str, str]] = set()  # (action, name) allowed earlier in this answer
        self._reader = EventReader()
        self.refused: Reason | str | None = None  # why the answer was stopped, for tests and logs

    def mode(self, status: int, content_types: list[str], encodings: list[str], located: bool) -> str:
        # The openai SDK raises for any status but 2xx (httpx's raise_for_status): nothing else is read.
        return media.answer_mode(status, content_types, encodings, self._note_unreadable)

    async def whole(self, body: bytes, content_type: str) -> bytes | Reply | None:
        try:
            found = read_json(body)
        except AnswerError as exc:
            self._note_unreadable(str(exc))
            return None  # the forwarder answers 502 and counts it
        reason = await self._decide(found)
        if reason is not None:
            return deny_openai(reason, self._allow.request_id)
        return body

    async def gate(self, chunk: bytes | None) -> tuple[bytes, bool]:
        problem: AnswerError | None = None
        try:
            events = self._reader.feed(chunk) if chunk is not None else self._reader.finish()
        except AnswerError as exc:
            events, problem = exc.before, exc
        out: list[bytes] = []
        for event in events:
            reason = await self._decide(event.findings)
            if reason is not None:
                out.append(error_event(reason.value, MESSAGES[reason]))
                return b"".join(out), True
            out.append(event.raw)
        if problem is not None:
            return self._unreadable(str(problem), b"".join(out))
        return b"".join(out), False

    def _unreadable(self, why: str, before: bytes) -> tuple[bytes, bool]:
        self._note_unreadable(why)
        self._count_unreadable()
        message = "The model's answer could not be read to be decided."
        return before + error_event(_UNREADABLE, message), True

    def _note_unreadable(self, why: str) -> None:
        """Not a decision (no PDP was asked): a warning, and the upstream failure count `unreadable`."""
        self.refused = _UNREADABLE
        log.warning("request %s: the model answer could not be read: %s", self._allow.request_id, why)

    async def _decide(self, found: Findings) -> Reason | None:
        """None when every tool and model of `found` is allowed, else the first reason against one."""
        asks: list[tuple[str, str]] = []
        if self._decide_tools:
            asks += [(TOOL_CALL, t) for t in found.tools]
        decided = self._facts.get("name")
        asks += [(ANSWER, m) for m in found.models if not same_model(decided, m)]
        asks = [a for a in asks if a not in self._allowed]
        if not asks:
            return None
        docs = [self._doc(action, name) for action, name in asks]
        route = self._route
        check = Check(
            docs[0],
            self._allow.request_id,
            route.name,
            "POST",
            self._allow.upstream_url,
            route.obligation_forbidden,
            more=tuple(docs[1:]),
        )
        outcome = await self._engine.decide(check)
        decision = outcome.decision
        overall = Reason.ALLOWED if isinstance(decision, Allow) else decision.reason
        reasons = outcome.reasons or (overall,) * len(asks)
        items = [
            {"tool" if action == TOOL_CALL else "model": name, "reason": r.value}
            for (action, name), r in zip(asks, reasons, strict=False)
        ]
        entry = self._entry(items, decision.decision_id, overall, outcome)
        if overall is Reason.ALLOWED and self._log.required:
            # What this allow lets through reaches the agent only once its line is written, like any allow.
            problem = await self._log.commit(entry, self._log_budget(outcome))
            if problem is not None:
                self._log.record(unaudited(entry, problem))
                overall = Reason.AUDIT_UNAVAILABLE
        else:
            self._log.record(entry)
        if overall is not Reason.ALLOWED:
            self.refused = overall
            return overall
        self._allowed.update(asks)
        return None

    def _doc(self, action: str, name: str) -> dict[str, Any]:
        key = "tool" if action == TOOL_CALL else "answered"
        return {**self._document, "model": {**self._facts, "action": action, key: name}}

    def _entry(self, items: list[dict[str, str]], decision_id: str, reason: Reason, outcome: Any) -> dict[str, Any]:
        document = self._document
        entry: dict[str, Any] = {
            "time": attributes.rfc3339_now(),
            "request_id": self._allow.request_id,
            "decision_id": decision_id,
            "route": self._route.name,
            "method": "POST",
            "path": document["request"]["path"],
            "subject": document["subject"],
            "mcp_method": None,
            "mcp_name": None,
            "decision": "allow" if reason is Reason.ALLOWED else "deny",
            "reason": reason.value,
            "pdp_ms": outcome.pdp_ms,
            "attempts": outcome.attempts,
            "circuit": self._engine.circuit.name.lower(),
            "trace_id": self._trace_id,
            "model": self._facts.get("name"),
            "endpoint": self._facts.get("endpoint"),
            "answer": items,
        }
        if outcome.note:
            entry["detail"] = outcome.note
        return entry
