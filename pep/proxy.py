"""The request handler: decide, record, then forward an Allow or answer a Deny.

It moves bytes and calls the pure parts; it decides nothing itself: the admission pipeline (pep/admission.py)
turns the request into a Check or a refusal, the engine decides. Anything that goes wrong before a decision is a
`Deny(internal_error)`: the only path to the upstream goes through `Upstream.forward(…, Allow, …)`. The listener
(pep/transport) hands each request over as an `Exchange`; requests it cannot read as HTTP/1.1 never get here
(`protocol_error` answers them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pep import approval_step, attributes, tunnel
from pep.admission import Admission, Refusal, RequestFacts, admit, target_path
from pep.answers import ModelAnswers
from pep.approvals.binding import TICKET_HEADER, ApprovalPending
from pep.approvals.flow import Approvals
from pep.config import Config
from pep.credentials import CredentialSource
from pep.credentials_oauth import CredentialRefusal, OAuthCredentialSource
from pep.decision import Allow, Deny, Reason
from pep.decision_log import DecisionLog, unaudited
from pep.engine import Engine, Outcome
from pep.http1 import Framing, ProtocolError
from pep.identity import Refusal as IdentityRefusal
from pep.identity.keys import KeySource
from pep.identity.spiffe import ListenerTls
from pep.identity.subject import Identifier
from pep.ids import new_id, request_id
from pep.mcp_answers import AnswerContext, McpAnswers
from pep.metrics import UNMATCHED, Metrics
from pep.protocols import NO_ID, Message, Refused, openai
from pep.protocols.body import BODY_DEADLINE, read_body
from pep.protocols.mcp_answer import LISTS, Stream
from pep.responses import Reply, deny, deny_mcp, deny_openai, unreadable_request
from pep.routing import Route, RouteTable
from pep.seal import Sealer
from pep.trace import CURRENT as CURRENT_TRACE
from pep.trace import Spans, Trace, from_headers
from pep.transport import BodyState, ConnectionInfo, ErrorAnswer, Exchange, RequestLine
from pep.upstream import Upstream

log: Final = logging.getLogger("pep.proxy")
_NO_BODY: Final = Framing.NONE
_BODY_FAILED: Final = BodyState.FAILED


def _early(reason: Reason, detail: str) -> Outcome:
    """A denial reached before the PDP was asked."""
    return Outcome(Deny(reason, new_id(), detail), 0, None, detail)


def _peercert(info: ConnectionInfo, listener: ListenerTls | None) -> dict[str, Any] | IdentityRefusal | None:
    """The verified client certificate of a connection (mTLS listener), if it would still pass a handshake."""
    if listener is None or info.ssl_object is None:
        return None
    return listener.peer(info.ssl_object)


class _Case:
    """One request on its way to its decision: the admission's two injected steps (identity, body read) and
    what the handler learns for the log and the answer."""

    __slots__ = (
        "admission",
        "approval",
        "challenge",
        "drop_session",
        "exchange",
        "identity_tls",
        "method",
        "outcome",
        "route",
        "rt",
        "status",
        "trace",
    )

    def __init__(self, rt: Runtime, trace: Trace, exchange: Exchange, identity_tls: ListenerTls | None) -> None:
        self.rt = rt  # the config this request is decided and logged under
        self.trace = trace
        self.exchange = exchange
        self.method = exchange.method
        self.identity_tls = identity_tls  # the mTLS listener's contexts (identity.mtls)
        self.outcome: Outcome | None = None
        self.route: Route | None = None
        self.admission: Admission | None = None
        self.challenge: str | None = None  # WWW-Authenticate for identity_missing/identity_invalid (401)
        self.drop_session = False  # the connection's client certificate no longer passes: abort after the answer
        self.approval: approval_step.Step | None = None  # the approval step, when the PDP asked for one
        self.status: int | None = None  # the status answered (for the span)

    def peercert(self) -> dict[str, Any] | IdentityRefusal | None:
        """The verified client certificate of the request's connection (mTLS listener), when asked."""
        return _peercert(self.exchange.connection, self.identity_tls)

    def identify(self, route: Route) -> Awaitable[dict[str, Any] | IdentityRefusal]:
        """The admission's identity step: the verified subject, or why there is none (the identifier's own
        coroutine, awaited by the admission: no second coroutine level)."""
        return self.rt.identifier.subject(self.exchange.headers, self.peercert, route.config.require_identity)

    def read_body(self, limit: int) -> Awaitable[bytes | Refused]:
        """The admission's body step: the body is needed for the decision, so the caller may send it now (the
        admission awaits the read at once)."""
        exchange = self.exchange
        exchange.send_continue()
        return read_body(exchange.body, limit)

    def send(self, reply: Reply) -> None:
        self.status = reply.status
        self.exchange.response.send(reply.status, reply.fields(), reply.body)

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


def _denial(case: _Case, reason: Reason, rid: str) -> Reply:
    route, admission = case.route, case.admission
    inspected = admission.inspected if admission is not None else None
    pending: ApprovalPending | None = case.approval.pending if case.approval is not None else None
    protocol = route.config.protocol if route is not None else "http"
    if protocol == "mcp" and route is not None:
        elicit = pending is not None and admission is not None and approval_step.url_elicitation(admission)
        return deny_mcp(reason, rid, inspected, route.config.deny_status, pending, elicit)
    if protocol == "openai":
        return deny_openai(reason, rid, pending)
    return deny(reason, rid, approval=pending)


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
    jit: Mapping[str, OAuthCredentialSource] = field(default_factory=dict)  # routes' just-in-time credentials
    approvals: Approvals | None = None  # the `approvals` section's engine (CIBA client, ticket keys)

    @property
    def include_arguments(self) -> bool:
        return self.config.decision_log.include_arguments


class Proxy:
    """The handler of the agent-facing listener: every request, CONNECT and odd targets included."""

    def __init__(self, runtime: Runtime, upstream: Upstream, decision_log: DecisionLog, metrics: Metrics) -> None:
        self.runtime = runtime  # replaced whole by a reload; each request keeps the one it started with
        self.spans: Spans | None = None  # OpenTelemetry spans, when the config has `tracing`
        self.listener_tls: ListenerTls | None = None  # the mTLS listener's contexts, when identity.mtls is set
        self._upstream = upstream
        self._log = decision_log
        self._metrics = metrics
        self.in_flight = 0
        self.tunnels = tunnel.Tunnels(runtime.routes)  # CONNECT tunnels open now (a reload may close them)
        metrics.requests_in_flight.set_function(lambda: self.in_flight)
        # What an MCP answer check reads of the config in force when it decides (a GET stream outlives a reload):
        # the same two callables for every request.
        self._engine_now: Callable[[], Engine] = lambda: self.runtime.engine
        self._log_budget_now: Callable[[Outcome], float] = lambda outcome: _log_budget(self.runtime, outcome)

    async def handle(self, exchange: Exchange) -> None:
        """Decide, record, then forward or answer. One coroutine from the listener's task down to the engine and
        the forwarder: each level between them would be resumed on every wake-up of the PDP or upstream wait."""
        self.in_flight += 1
        headers = exchange.headers
        trace = from_headers(headers)
        spans = self.spans
        if spans is not None:
            spans.start(trace, exchange.method)
        token = CURRENT_TRACE.set(trace)  # read by the PDP client and the forwarder (same task)
        case = _Case(self.runtime, trace, exchange, self.listener_tls)
        try:
            started = time.perf_counter()
            caller_id = headers.get("X-Request-ID")
            rid = new_id() if caller_id is None else request_id(caller_id)  # (`request_id(None)` is a new id)
            body = exchange.body
            if not body.settle() and body.state is _BODY_FAILED:
                # What has arrived of the body already breaks HTTP/1.1: refused as the reader refuses a head, before
                # anything is decided (and nothing is logged: no request was read).
                try:
                    await body.read()
                except ProtocolError as protocol_error:
                    case.send(unreadable_request(protocol_error.status_hint, protocol_error.reason))
                    return
            try:
                # The admission pipeline (pep/admission.py), then the PDP through the engine.
                head = exchange.head
                facts = RequestFacts(
                    case.method,
                    exchange.target,
                    headers,
                    exchange.connection.scheme,
                    head.content_length,
                    head.framing is not _NO_BODY,
                    rid,
                )
                rt = case.rt
                found = await admit(facts, rt, case.identify, case.read_body)
                case.route = found.route
                if isinstance(found, Refusal):
                    case.challenge = found.challenge
                    case.drop_session = found.drop_session
                    outcome = _early(found.reason, found.detail)
                else:
                    case.admission = found
                    outcome = await rt.engine.decide(found.check)
                    if found.check.method == "CONNECT":
                        outcome = found.settle(outcome)
                    if outcome.approval is not None and approval_step.wanted(outcome, found):
                        # Only the allow of the PDP asked again after the approval goes on, to the credential and
                        # upstream.
                        tickets = headers.getall(TICKET_HEADER, ())
                        case.approval = await approval_step.settle(rt.approvals, rt.engine, found, outcome, tickets)
                        outcome = case.approval.outcome
                    if rt.jit:  # (a route of this config has a just-in-time credential)
                        outcome = await self._credential(case, found, outcome)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("internal error while deciding request %s", rid)
                outcome = _early(Reason.INTERNAL_ERROR, f"{type(exc).__name__}")
            route = case.route

            decision = outcome.decision
            route_name = route.name if route is not None else UNMATCHED
            decision_log = self._log
            if decision_log.enabled:  # (without a sink, no line is built: its time stamp and dict cost per request)
                entry = self._entry(case, rid, route_name, outcome)
                if isinstance(decision, Allow) and decision_log.required:
                    # Every way upstream (forward, tunnel, batch, forward-proxy) is below: none starts before this
                    # returns.
                    problem = await decision_log.commit(entry, _log_budget(case.rt, outcome))
                    if problem is not None:
                        decision = Deny(Reason.AUDIT_UNAVAILABLE, decision.decision_id, problem)
                        decision_log.record(unaudited(entry, problem))
                else:
                    decision_log.record(entry)
            case.outcome = (
                outcome if decision is outcome.decision else outcome.overruled(decision, outcome.note, outcome.reasons)
            )
            metrics = self._metrics
            reason = Reason.ALLOWED if isinstance(decision, Allow) else decision.reason
            metrics.decisions[route_name, reason].inc()
            metrics.decision_duration[route_name].observe(time.perf_counter() - started)
            admission = case.admission
            if isinstance(decision, Allow) and admission is not None:
                if case.method == "CONNECT":
                    case.status = await tunnel.splice(exchange, decision, admission.route, self.tunnels)
                    return
                if admission.credential is None and admission.route.config.credential is not None:
                    # Never upstream without the route's credential (a just-in-time one comes from `_credential`):
                    # an allow that skipped it is a bug, and still a denial.
                    log.error("request %s was allowed without its route's credential; denied", rid)
                    case.send(_denial(case, Reason.INTERNAL_ERROR, rid))
                    return
                # (A plain http route's answer is relayed as it is: neither check applies.)
                answers = (
                    None
                    if admission.route.config.protocol == "http"
                    else self._model_answers(case, admission, decision) or self._mcp_answers(case, admission, decision)
                )
                case.status = await self._upstream.forward(
                    exchange, decision, admission.route, admission.credential, answers, admission.replaced
                )
                return
            assert isinstance(decision, Deny)
            reply = _denial(case, decision.reason, rid)
            if case.challenge is not None:
                reply.status = 401
                reply.headers["www-authenticate"] = case.challenge
            response = exchange.response
            if decision.detail == BODY_DEADLINE or case.method == "CONNECT":
                response.close_after()  # the rest of the body is not waited for: say so
            if case.drop_session:
                # Answered, then aborted: without a TLS close_notify OpenSSL drops the session from its cache, so the
                # client's next connection makes a full handshake instead of resuming what no longer passes.
                response.close_after()
                case.send(reply)
                response.abort()
                return
            case.send(reply)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug outside the decision itself (logging, metrics): still a denial, never a bare 500.
            log.exception("internal error while handling a request")
            if exchange.response.started:
                exchange.response.abort()  # an answer cut short: only a reset says so
            else:
                case.send(deny(Reason.INTERNAL_ERROR, request_id(headers.get("X-Request-ID"))))
        finally:
            CURRENT_TRACE.reset(token)
            self.in_flight -= 1
            if spans is not None:
                spans.finish(trace, case.span_attributes(), case.status)

    def protocol_error(self, exc: ProtocolError, line: RequestLine | None, info: ConnectionInfo) -> ErrorAnswer:
        """A request the listener could not read as HTTP/1.1, answered with its status hint and no handler. An HTTP
        version other than 1.0 and 1.1 (505) is a denial `request_ambiguous`, logged and counted as one; the
        rest (400, 414, 431, 501) are not requests the PEP decided anything about."""
        if exc.status_hint != 505:
            reply = unreadable_request(exc.status_hint, exc.reason)
            return reply.fields(), reply.body
        rt = self.runtime
        rid = new_id()
        outcome = _early(Reason.REQUEST_AMBIGUOUS, exc.reason)
        method = line.method.decode("latin-1") if line is not None else ""
        path = target_path(method, line.target.decode("latin-1")) if line is not None else ""
        subject = rt.identifier.unverified(lambda: _peercert(info, self.listener_tls))
        self._log.record(self._entry_for(rt, rid, UNMATCHED, method, path, subject, None, outcome, None))
        self._metrics.decisions[UNMATCHED, Reason.REQUEST_AMBIGUOUS].inc()
        reply = deny(Reason.REQUEST_AMBIGUOUS, rid, exc.status_hint)
        return reply.fields(), reply.body

    async def _credential(self, case: _Case, admission: Admission, outcome: Outcome) -> Outcome:
        """A route's just-in-time credential, obtained after the allow and before anything is sent: a refusal
        (`credential_unavailable`, `obligation_unsupported`) turns the allow into a denial. The caller's token
        goes to the token endpoint only: the detail names endpoints and OAuth error codes, never a token."""
        allow = outcome.decision
        source = case.rt.jit.get(admission.route.name)
        if source is None or not isinstance(allow, Allow):
            return outcome
        exchange = source.cfg.kind == "token_exchange"
        subject_token = case.rt.identifier.presented_token(case.exchange.headers) if exchange else None
        # The route's deadline bounds the wait; the fetch itself is bound by the credential's timeout_ms.
        got = await source.obtain(subject_token, allow.credential, admission.route.config.timeout_ms / 1000)
        if isinstance(got, CredentialRefusal):
            deny = Deny(got.reason, allow.decision_id, got.detail)
            return outcome.overruled(deny, got.detail)
        case.admission = admission.with_credential((got.header, got.value))
        return outcome

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
            pending = []
            for m in inspected.messages:  # (a loop: a comprehension is a call of its own)
                if m.rpc_id is not NO_ID and m.facts.get("method") != "mcp/response":
                    pending.append((m.rpc_id, m.facts["method"]))
            stream = Stream(pending)
            version = inspected.messages[0].facts.get("protocol_version")
        elif method == "GET":
            if resume is not None and resume.pending is not None:
                stream = Stream(list(resume.pending))
            else:
                stream = Stream([], get=True)
            version = resume.version if resume is not None else case.exchange.headers.get("MCP-Protocol-Version")
        else:
            return None
        filters = route.list_filters
        assert filters <= LISTS.keys()
        context = AnswerContext(
            engine=self._engine_now,
            log=self._log,
            log_budget=self._log_budget_now,
            count_unreadable=self._metrics.upstream_failures[route.name, "unreadable"].inc,
            route=route,
            document=admission.document,
            allow=allow,
            tokens=tokens,
            filters=filters,
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

    def _entry(self, case: _Case, rid: str, route_name: str, outcome: Outcome) -> dict[str, Any]:
        admission = case.admission
        rt = case.rt
        if admission is not None:
            document = admission.document
            path, subject = document["request"]["path"], document["subject"]
            messages = admission.inspected.messages
        else:
            path = target_path(case.method, case.exchange.target)
            subject = rt.identifier.unverified(case.peercert)
            messages, document = (), None
        approval = case.approval.log if case.approval is not None else None
        return self._entry_for(
            rt, rid, route_name, case.method, path, subject, document, outcome, case.trace, messages, approval
        )

    def _entry_for(
        self,
        rt: Runtime,
        rid: str,
        route_name: str,
        method: str,
        path: str,
        subject: dict[str, Any],
        document: dict[str, Any] | None,
        outcome: Outcome,
        trace: Trace | None,
        messages: tuple[Message, ...] = (),
        approval: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        decision = outcome.decision
        allow = isinstance(decision, Allow)
        if outcome.started is not None:  # when the engine took the decision up (pdp_ms counts from then)
            when = attributes.rfc3339(outcome.started)
        else:
            when = document["request"]["time"] if document else attributes.rfc3339_now()
        entry: dict[str, Any] = {
            "time": when,
            "request_id": rid,
            "decision_id": decision.decision_id,
            "route": route_name,
            "method": method,
            "path": path,
            "subject": subject,
            "mcp_method": None,
            "mcp_name": None,
            "decision": "allow" if allow else "deny",
            "reason": Reason.ALLOWED.value if allow else decision.reason.value,  # type: ignore[union-attr]
            "pdp_ms": outcome.pdp_ms,
            "attempts": outcome.attempts,
            "circuit": rt.engine.circuit.name.lower(),
            "trace_id": trace.trace_id if trace is not None else None,
        }
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
        if approval is not None:
            entry["approval"] = approval
        return entry


def _log_budget(rt: Runtime, outcome: Outcome) -> float:
    """What is left of the decision deadline (`pdp.timeout_ms`) after the PDP answered: a required log must have
    written the allow's line within it."""
    return (rt.config.pdp.timeout_ms - (outcome.pdp_ms or 0.0)) / 1000
