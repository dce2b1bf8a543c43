"""The request handler: integrity checks, route, decide, record, then forward an Allow or answer a Deny.

It moves bytes and calls the pure parts; it decides nothing itself. Anything that goes wrong before a decision
is a `Deny(internal_error)`: the only path to the upstream goes through `Upstream.forward(…, Allow, …)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, web

from pep import attributes, tunnel
from pep.admission import Admission, Refusal, RequestFacts, admit, target_path
from pep.answers import ModelAnswers
from pep.config import Config
from pep.credentials import CredentialSource
from pep.decision import Allow, Deny, Reason
from pep.decision_log import DecisionLog, unaudited
from pep.engine import Engine, Outcome
from pep.identity import Refusal as IdentityRefusal
from pep.identity.keys import KeySource
from pep.identity.spiffe import ListenerTls
from pep.identity.subject import Identifier
from pep.ids import new_id, request_id
from pep.mcp_answers import AnswerContext, McpAnswers
from pep.metrics import UNMATCHED, Metrics
from pep.protocols import NO_ID, Inspected, Message, Refused, openai
from pep.protocols.body import BODY_DEADLINE, read_body
from pep.protocols.mcp_answer import LISTS, Stream
from pep.responses import deny, deny_mcp, deny_openai
from pep.routing import Route, RouteTable
from pep.seal import Sealer
from pep.trace import CURRENT as CURRENT_TRACE
from pep.trace import Spans, Trace, from_headers
from pep.upstream import Upstream

log = logging.getLogger("pep.proxy")
_HTTP_1 = (HttpVersion11, HttpVersion10)


def _early(reason: Reason, detail: str) -> Outcome:
    """A denial reached before the PDP was asked."""
    return Outcome(Deny(reason, new_id(), detail), 0, None, detail)


class _Case:
    """One request on its way to its decision: the admission's two injected steps (identity, body read) and
    what the handler learns for the log and the answer."""

    __slots__ = (
        "admission",
        "challenge",
        "drop_session",
        "identity_tls",
        "outcome",
        "request",
        "route",
        "rt",
        "trace",
    )

    def __init__(self, rt: Runtime, trace: Trace, request: web.BaseRequest, identity_tls: ListenerTls | None) -> None:
        self.rt = rt  # the config this request is decided and logged under
        self.trace = trace
        self.request = request
        self.identity_tls = identity_tls  # the mTLS listener's contexts (identity.mtls)
        self.outcome: Outcome | None = None
        self.route: Route | None = None
        self.admission: Admission | None = None
        self.challenge: str | None = None  # WWW-Authenticate for identity_missing/identity_invalid (401)
        self.drop_session = False  # the connection's client certificate no longer passes: abort after the answer

    def peercert(self) -> dict[str, Any] | IdentityRefusal | None:
        """The verified client certificate of the request's connection (mTLS listener), when asked."""
        listener = self.identity_tls
        if listener is None:
            return None
        transport = self.request.transport
        conn = transport.get_extra_info("ssl_object") if transport is not None else None
        return listener.peer(conn) if isinstance(conn, ssl.SSLObject) else None

    async def identify(self, route: Route) -> dict[str, Any] | IdentityRefusal:
        """The admission's identity step: the verified subject, or why there is none."""
        return await self.rt.identifier.subject(self.request.headers, self.peercert, route.config.require_identity)

    async def read_body(self, limit: int) -> bytes | Refused:
        """The admission's body step: the body is needed for the decision, so the caller may send it now."""
        request = self.request
        if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await read_body(request, limit)

    def span_attributes(self) -> dict[str, Any]:
        """What the request's span records (tracing on only)."""
        outcome = self.outcome
        decision = outcome.decision if outcome is not None else None
        return {
            "pep.route": self.route.name if self.route is not None else UNMATCHED,
            "pep.decision": None if decision is None else ("allow" if isinstance(decision, Allow) else "deny"),
            "pep.reason": None if decision is None else decision_reason(decision).value,
            "pep.pdp.attempts": outcome.attempts if outcome is not None else None,
            "pep.pdp.ms": outcome.pdp_ms if outcome is not None else None,
        }


def decision_reason(decision: Allow | Deny) -> Reason:
    return Reason.ALLOWED if isinstance(decision, Allow) else decision.reason


def _denial(route: Route | None, inspected: Inspected | None, reason: Reason, rid: str) -> web.Response:
    protocol = route.config.protocol if route is not None else "http"
    if protocol == "mcp" and route is not None:
        return deny_mcp(reason, rid, inspected, route.config.deny_status)
    if protocol == "openai":
        return deny_openai(reason, rid)
    return deny(reason, rid)


@dataclass(frozen=True, slots=True)
class Runtime:
    """What one config decides about requests: swapped whole by a reload, so a request never mixes two."""

    config: Config
    routes: RouteTable
    engine: Engine
    identifier: Identifier
    credentials: dict[str, CredentialSource]
    sealer: Sealer  # the tokens relayed in place of MCP server ids (pep/protocols/mcp_tokens.py)
    keys: KeySource | None = None  # identity.jwt's key source, started and closed with the runtime

    @property
    def include_arguments(self) -> bool:
        return self.config.decision_log.include_arguments


class Proxy:
    """The catch-all handler of the agent-facing listener."""

    def __init__(self, runtime: Runtime, upstream: Upstream, decision_log: DecisionLog, metrics: Metrics) -> None:
        self.runtime = runtime  # replaced whole by a reload; each request keeps the one it started with
        self.spans: Spans | None = None  # OpenTelemetry spans, when the config has `tracing`
        self.listener_tls: ListenerTls | None = None  # the mTLS listener's contexts, when identity.mtls is set
        self._upstream = upstream
        self._log = decision_log
        self._metrics = metrics
        self.in_flight = 0
        metrics.requests_in_flight.set_function(lambda: self.in_flight)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.in_flight += 1
        trace = from_headers(request.headers)
        spans = self.spans
        if spans is not None:
            spans.start(trace, request.method)
        token = CURRENT_TRACE.set(trace)  # read by the PDP client and the forwarder (same task)
        response: web.StreamResponse | None = None
        case = _Case(self.runtime, trace, request, self.listener_tls)
        try:
            response = await self._handle(request, case)
            return response
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug outside the decision itself (logging, metrics): still a denial, never a bare 500.
            log.exception("internal error while handling a request")
            response = deny(Reason.INTERNAL_ERROR, request_id(request.headers.get("X-Request-ID")))
            return response
        finally:
            CURRENT_TRACE.reset(token)
            self.in_flight -= 1
            if spans is not None:
                spans.finish(trace, case.span_attributes(), response.status if response is not None else None)

    async def _handle(self, request: web.BaseRequest, case: _Case) -> web.StreamResponse:
        started = time.perf_counter()
        rid = request_id(request.headers.get("X-Request-ID"))
        status = 403
        try:
            if request.version not in _HTTP_1:
                status = 505
                outcome = _early(Reason.REQUEST_AMBIGUOUS, f"HTTP version {request.version}")
            else:
                outcome = await self._decide(request, rid, case)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("internal error while deciding request %s", rid)
            outcome = _early(Reason.INTERNAL_ERROR, f"{type(exc).__name__}")
        route = case.route

        decision = outcome.decision
        route_name = route.name if route is not None else UNMATCHED
        entry = self._entry(request, rid, route_name, case, outcome)
        if isinstance(decision, Allow) and self._log.required:
            # Every way upstream (forward, tunnel, batch, forward-proxy) is below: none starts before this returns.
            problem = await self._log.commit(entry, _log_budget(case.rt, outcome))
            if problem is not None:
                decision = Deny(Reason.AUDIT_UNAVAILABLE, decision.decision_id, problem)
                self._log.record(unaudited(entry, problem))
        else:
            self._log.record(entry)
        case.outcome = outcome if decision is outcome.decision else dataclasses.replace(outcome, decision=decision)
        metrics = self._metrics
        reason = Reason.ALLOWED if isinstance(decision, Allow) else decision.reason
        metrics.decisions[route_name, reason].inc()
        metrics.decision_duration[route_name].observe(time.perf_counter() - started)
        if isinstance(decision, Allow) and route is not None and request.method == "CONNECT":
            return await tunnel.splice(request, decision, route)
        if isinstance(decision, Allow) and route is not None:
            admission = case.admission
            assert admission is not None
            answers = self._model_answers(case, admission, decision) or self._mcp_answers(case, admission, decision)
            return await self._upstream.forward(
                request, decision, route, admission.credential, answers, admission.replaced
            )
        assert isinstance(decision, Deny)
        if status == 505:
            response = deny(decision.reason, rid, status)
            response.force_close()
            return response
        response = _denial(route, case.admission.inspected if case.admission else None, decision.reason, rid)
        if case.challenge is not None:
            response.set_status(401)
            response.headers["WWW-Authenticate"] = case.challenge
        if decision.detail == BODY_DEADLINE or request.method == "CONNECT":
            response.force_close()  # the rest of the body is not waited for: say so
        transport = request.transport
        if case.drop_session and transport is not None:
            # Answered, then aborted: without a TLS close_notify OpenSSL drops the session from its cache, so the
            # client's next connection makes a full handshake instead of resuming what no longer passes.
            response.force_close()
            with contextlib.suppress(ConnectionError):  # a client already gone gets no answer; still aborted
                await response.prepare(request)
                await response.write_eof()
            transport.abort()
        return response

    async def _decide(self, request: web.BaseRequest, rid: str, case: _Case) -> Outcome:
        """The admission pipeline (pep/admission.py), then the PDP through the engine."""
        facts = RequestFacts(
            request.method,
            request.raw_path,
            request.headers,
            request.scheme,
            request.content_length,
            request.body_exists,
            rid,
        )
        found = await admit(facts, case.rt, case.identify, case.read_body)
        case.route = found.route
        if isinstance(found, Refusal):
            case.challenge = found.challenge
            case.drop_session = found.drop_session
            return _early(found.reason, found.detail)
        case.admission = found
        return found.settle(await case.rt.engine.decide(found.check))

    def _model_answers(self, case: _Case, admission: Admission, allow: Allow) -> ModelAnswers | None:
        """For an allowed model call whose answers can call tools: the check its answer must pass."""
        first = admission.inspected.messages[0]
        if first.key != "model" or first.facts["endpoint"] not in openai.ANSWERING_KINDS:
            return None
        route = admission.route
        rt = case.rt
        return ModelAnswers(
            rt.engine,
            self._log,
            lambda outcome: _log_budget(rt, outcome),
            self._metrics.upstream_failures[route.name, "unreadable"].inc,
            route,
            admission.document,
            allow,
            route.config.decide_answer_tool_calls,
            case.trace.trace_id,
        )

    def _mcp_answers(self, case: _Case, admission: Admission, allow: Allow) -> McpAnswers | None:
        """For an allowed MCP POST or GET: the check its answer must pass, message by message."""
        route = admission.route
        config = route.config
        tokens = admission.tokens
        if config.protocol != "mcp" or tokens is None:
            return None
        inspected = admission.inspected
        resume = admission.resume
        method = admission.check.method
        if method == "POST" and inspected.messages:
            pending = [
                (m.rpc_id, m.facts["method"])
                for m in inspected.messages
                if m.rpc_id is not NO_ID and m.facts.get("method") != "mcp/response"
            ]
            stream = Stream(pending)
            version = inspected.messages[0].facts.get("protocol_version")
        elif method == "GET":
            if resume is not None and resume.pending is not None:
                stream = Stream(list(resume.pending))
            else:
                stream = Stream([], get=True)
            version = resume.version if resume is not None else case.request.headers.get("MCP-Protocol-Version")
        else:
            return None
        filters = {"tools/list"} if config.filter_tools_list else set()
        if config.filter_prompts_list:
            filters.add("prompts/list")
        if config.filter_resources_list:
            filters.update(("resources/list", "resources/templates/list"))
        assert filters <= LISTS.keys()
        context = AnswerContext(
            engine=lambda: self.runtime.engine,
            log=self._log,
            log_budget=lambda outcome: _log_budget(self.runtime, outcome),
            count_unreadable=self._metrics.upstream_failures[route.name, "unreadable"].inc,
            route=route,
            document=admission.document,
            allow=allow,
            tokens=tokens,
            filters=frozenset(filters),
            version=version,
            trace_id=case.trace.trace_id,
        )
        return McpAnswers(context, stream, inspected if method == "POST" else None)

    @staticmethod
    def _message_entry(message: Message, reason: Reason, include_arguments: bool) -> dict[str, Any]:
        facts = message.facts
        entry = {"mcp_method": facts["method"], "mcp_name": facts["name"], "reason": reason.value}
        if facts.get("replies_to") is not None:
            entry["replies_to"] = facts["replies_to"]
        if include_arguments:
            entry["arguments"] = facts["arguments"]
        return entry

    def _entry(
        self,
        request: web.BaseRequest,
        rid: str,
        route_name: str,
        case: _Case,
        outcome: Outcome,
    ) -> dict[str, Any]:
        admission = case.admission
        document = admission.document if admission is not None else None
        decision = outcome.decision
        allow = isinstance(decision, Allow)
        rt = case.rt
        if outcome.started is not None:  # when the engine took the decision up (pdp_ms counts from then)
            when = attributes.rfc3339(outcome.started)
        else:
            when = document["request"]["time"] if document else attributes.rfc3339_now()
        subject = document["subject"] if document else rt.identifier.unverified(case.peercert)
        entry: dict[str, Any] = {
            "time": when,
            "request_id": rid,
            "decision_id": decision.decision_id,
            "route": route_name,
            "method": request.method,
            "path": document["request"]["path"] if document else target_path(request.method, request.raw_path),
            "subject": subject,
            "mcp_method": None,
            "mcp_name": None,
            "decision": "allow" if allow else "deny",
            "reason": Reason.ALLOWED.value if allow else decision.reason.value,  # type: ignore[union-attr]
            "pdp_ms": outcome.pdp_ms,
            "attempts": outcome.attempts,
            "circuit": rt.engine.circuit.name.lower(),
            "trace_id": case.trace.trace_id,
        }
        messages = admission.inspected.messages if admission is not None else ()
        if messages and messages[0].key == "mcp":
            first = messages[0].facts
            entry["mcp_method"] = first["method"]
            entry["mcp_name"] = first["name"]
            if first.get("replies_to") is not None:
                entry["replies_to"] = first["replies_to"]
            if rt.include_arguments:
                entry["arguments"] = first["arguments"]
            if len(messages) > 1:
                reasons = outcome.reasons or (decision_reason(decision),) * len(messages)
                entry["messages"] = [
                    self._message_entry(m, r, rt.include_arguments) for m, r in zip(messages, reasons, strict=False)
                ]
        elif messages and messages[0].key == "model":
            entry["model"] = messages[0].facts["name"]
            entry["endpoint"] = messages[0].facts["endpoint"]
        if outcome.note:
            entry["detail"] = outcome.note
        return entry


def _log_budget(rt: Runtime, outcome: Outcome) -> float:
    """What is left of the decision deadline (`pdp.timeout_ms`) after the PDP answered: a required log must have
    written the allow's line within it."""
    return (rt.config.pdp.timeout_ms - (outcome.pdp_ms or 0.0)) / 1000
