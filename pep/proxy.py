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
from yarl import URL

from pep import attributes, integrity, tunnel
from pep.answers import ModelAnswers
from pep.authority import resolve_authority
from pep.config import Config
from pep.credentials import CredentialSource
from pep.decision import Allow, Deny, Reason
from pep.decision_log import DecisionLog, unaudited
from pep.engine import Check, Engine, Outcome
from pep.headers import end_to_end
from pep.identity import Refusal
from pep.identity.keys import KeySource
from pep.identity.spiffe import ListenerTls
from pep.identity.subject import Identifier, PeerCert
from pep.ids import new_id, request_id
from pep.mcp_answers import AnswerContext, McpAnswers
from pep.metrics import UNMATCHED, Metrics
from pep.protocols import NO_ID, Inspected, Message, Refused, dispatch, mcp_replies, openai
from pep.protocols.body import BODY_DEADLINE, read_body
from pep.protocols.mcp_answer import LISTS, Stream
from pep.protocols.mcp_tokens import Resumption, Tokens, for_caller
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


def _authority_matches(target: URL, host_header: str | None) -> bool:
    """An absolute-form target must name the same host and port as the Host header."""
    if host_header is None or target.host is None:
        return False
    try:
        host = URL.build(scheme=target.scheme or "http", authority=host_header)
    except (ValueError, TypeError):
        return False
    return (target.host.lower(), target.port) == ((host.host or "").lower(), host.port)


class _Case:
    """What the handler learns about a request on the way to its decision (for the log and the answer)."""

    __slots__ = (
        "challenge",
        "credential",
        "document",
        "drop_session",
        "inspected",
        "outcome",
        "replaced",
        "resume",
        "route",
        "rt",
        "tokens",
        "trace",
    )

    def __init__(self, rt: Runtime, trace: Trace) -> None:
        self.rt = rt  # the config this request is decided and logged under
        self.trace = trace
        self.outcome: Outcome | None = None
        self.route: Route | None = None
        self.document: dict[str, Any] | None = None
        self.inspected: Inspected | None = None
        self.credential: tuple[str, str] | None = None  # (header, value) to inject if allowed
        self.challenge: str | None = None  # WWW-Authenticate for identity_missing/identity_invalid (401)
        self.drop_session = False  # the connection's client certificate no longer passes: abort after the answer
        self.tokens: Tokens | None = None  # MCP routes: the caller's tokens for relayed server ids
        self.resume: Resumption | None = None  # a GET that resumes a stream (its Last-Event-ID opened)
        self.replaced: tuple[tuple[str, str], ...] = ()  # caller headers forwarded with another value

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


async def _inspect(request: web.BaseRequest, route: Route, path: str) -> Inspected | Refused:
    """Read and parse the body where the route's protocol needs it; plain routes stream it later."""
    early = dispatch.before_body(route.config, request.method, path, request.headers, request.body_exists)
    if early is not None:
        return early
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        # The body is needed for the decision, so the caller may send it now.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await read_body(request, dispatch.read_limit(route.config))
    if isinstance(body, Refused):
        return body
    return dispatch.parse(route.config, request.method, path, request.headers, body)


def _denial(route: Route | None, inspected: Inspected | None, reason: Reason, rid: str) -> web.Response:
    protocol = route.config.protocol if route is not None else "http"
    if protocol == "mcp" and route is not None:
        return deny_mcp(reason, rid, inspected, route.config.deny_status)
    if protocol == "openai":
        return deny_openai(reason, rid)
    return deny(reason, rid)


def _peercert(request: web.BaseRequest, listener: ListenerTls | None) -> PeerCert:
    """Reads the verified client certificate of the request's connection (mTLS listener), when asked."""
    transport = request.transport

    def peercert() -> dict[str, Any] | Refusal | None:
        conn = transport.get_extra_info("ssl_object") if transport is not None and listener is not None else None
        return listener.peer(conn) if listener is not None and isinstance(conn, ssl.SSLObject) else None

    return peercert


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
        case = _Case(self.runtime, trace)
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
            answers = self._model_answers(route, case, decision) or self._mcp_answers(request, route, case, decision)
            return await self._upstream.forward(request, decision, route, case.credential, answers, case.replaced)
        assert isinstance(decision, Deny)
        if status == 505:
            response = deny(decision.reason, rid, status)
            response.force_close()
            return response
        response = _denial(route, case.inspected, decision.reason, rid)
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
        raw_target = request.raw_path
        rel = request.rel_url
        path = rel.raw_path
        query = rel.raw_query_string
        headers = request.headers
        if request.method == "CONNECT":
            return await self._decide_connect(request, rid, case)
        if "#" in raw_target:
            return _early(Reason.REQUEST_AMBIGUOUS, "fragment in the request target")
        if not raw_target.startswith("/") and not _authority_matches(request.url, headers.get("Host")):
            return _early(Reason.REQUEST_AMBIGUOUS, "absolute-form target disagrees with Host")
        problem = integrity.request_problem(request.method, path, query, headers)
        if problem:
            return _early(Reason.REQUEST_AMBIGUOUS, problem)
        route = case.route = case.rt.routes.match(path, headers.get("Host"), request.scheme)
        if route is None:
            return _early(Reason.NO_ROUTE, "no route matches the path")
        if not route.config.allow_path_parameters and (problem := integrity.parameter_problem(path)):
            return _early(Reason.REQUEST_AMBIGUOUS, problem)
        length = request.content_length
        limit = route.config.max_body_bytes
        if limit is not None and length is not None and length > limit:
            return _early(Reason.BODY_TOO_LARGE, f"content-length {length} > {limit}")
        subject = await self._subject_of(request, route, case)
        if isinstance(subject, Outcome):
            return subject
        source = case.rt.credentials.get(route.name)
        if source is not None:
            value = source.value()
            if value is None:
                # Named by path only: the value never appears in a log.
                return _early(Reason.CREDENTIAL_UNAVAILABLE, "the route's credential is missing or empty")
            case.credential = (source.header, value)
        upstream_url = route.upstream_url(path, query)
        inspected = await _inspect(request, route, path)
        if isinstance(inspected, Refused):
            return _early(inspected.reason, inspected.detail)
        if route.config.protocol == "mcp":
            inspected = self._mcp_replies(request, route, case, subject, inspected)
            if isinstance(inspected, Refused):
                return _early(inspected.reason, inspected.detail)
        case.inspected = inspected
        body = inspected.body
        if body is not None:
            length = len(body)
        document = attributes.document(
            request_id=rid,
            method=request.method,
            scheme=request.scheme,
            host=headers.get("Host", ""),
            path=path,
            query=query,
            headers=attributes.header_map(end_to_end(headers, route.policy_drop)),
            body_bytes=length if length is not None or request.body_exists else 0,
            route=route,
            upstream_url=upstream_url,
            subject=subject,
        )
        documents = [attributes.with_facts(document, m) for m in inspected.messages]
        case.document = documents[0]
        check = Check(
            documents[0],
            rid,
            route.name,
            request.method,
            upstream_url,
            route.obligation_forbidden,
            more=tuple(documents[1:]),
            body=body,
        )
        return await case.rt.engine.decide(check)

    async def _subject_of(self, request: web.BaseRequest, route: Route, case: _Case) -> dict[str, Any] | Outcome:
        """The verified subject, or the denial (with its 401 challenge where one applies)."""
        peercert = _peercert(request, self.listener_tls)
        found = await case.rt.identifier.subject(request.headers, peercert, route.config.require_identity)
        if isinstance(found, Refusal):
            case.challenge = found.challenge
            case.drop_session = found.drop_session
            return _early(found.reason, found.detail)
        return found

    async def _decide_connect(self, request: web.BaseRequest, rid: str, case: _Case) -> Outcome:
        """CONNECT host:port: decided once, on the authority, by a `tunnel: true` route for it.

        The policy input has `request.method` CONNECT, `request.host` the target as sent, `request.path` empty,
        and `route.upstream_url` the host:port the tunnel would go to (the route's upstream)."""
        target = request.raw_path
        named = resolve_authority(target, None)
        if named is None:
            return _early(Reason.REQUEST_AMBIGUOUS, "a CONNECT target must be host:port")
        host_header = request.headers.get("Host")
        if host_header is not None and resolve_authority(host_header, None) != named:
            return _early(Reason.REQUEST_AMBIGUOUS, "CONNECT target disagrees with Host")
        problem = integrity.override_header(request.headers)
        if problem:
            return _early(Reason.REQUEST_AMBIGUOUS, problem)
        route = case.route = case.rt.routes.tunnel(target)
        if route is None or route.tunnel_target is None:
            return _early(Reason.NO_ROUTE, f"no tunnel route for {target}")
        subject = await self._subject_of(request, route, case)
        if isinstance(subject, Outcome):
            return subject
        upstream_url = route.tunnel_target
        document = attributes.document(
            request_id=rid,
            method="CONNECT",
            scheme=request.scheme,
            host=target,
            path="",
            query="",
            headers=attributes.header_map(end_to_end(request.headers, route.policy_drop)),
            body_bytes=None,
            route=route,
            upstream_url=upstream_url,
            subject=subject,
        )
        case.document = document
        check = Check(document, rid, route.name, "CONNECT", upstream_url, route.obligation_forbidden)
        outcome = await case.rt.engine.decide(check)
        allow = outcome.decision
        if isinstance(allow, Allow) and allow.headers:
            # Header obligations cannot be applied inside a tunnel: an allow that needs them is not one.
            detail = "header obligations cannot be applied to a tunnel"
            deny = Deny(Reason.OBLIGATION_UNSUPPORTED, allow.decision_id, detail)
            return dataclasses.replace(outcome, decision=deny, note=detail, reasons=())
        return outcome

    def _model_answers(self, route: Route, case: _Case, allow: Allow) -> ModelAnswers | None:
        """For an allowed model call whose answers can call tools: the check its answer must pass."""
        inspected = case.inspected
        document = case.document
        if inspected is None or document is None or inspected.messages[0].key != "model":
            return None
        if inspected.messages[0].facts["endpoint"] not in openai.ANSWERING_KINDS:
            return None
        failures = self._metrics.upstream_failures
        rt = case.rt
        return ModelAnswers(
            rt.engine,
            self._log,
            lambda outcome: _log_budget(rt, outcome),
            failures[route.name, "unreadable"].inc,
            route,
            document,
            allow,
            route.config.decide_answer_tool_calls,
            case.trace.trace_id,
        )

    @staticmethod
    def _mcp_replies(
        request: web.BaseRequest, route: Route, case: _Case, subject: dict[str, Any], inspected: Inspected
    ) -> Inspected | Refused:
        """An MCP request with what its replies answer (their ids opened), or why it cannot be forwarded. A GET
        with `Last-Event-ID` must carry an event id the PEP relayed: it resumes that stream, read as before."""
        tokens = case.tokens = for_caller(case.rt.sealer, route.name, subject, request.headers)
        config = route.config
        prepared, case.resume = mcp_replies.prepare(
            request.method, request.headers, inspected, tokens, config.filter_tools_list, config.max_batch_messages
        )
        if case.resume is not None:
            case.replaced = (("Last-Event-ID", case.resume.event_id),)
        return prepared

    def _mcp_answers(self, request: web.BaseRequest, route: Route, case: _Case, allow: Allow) -> McpAnswers | None:
        """For an allowed MCP POST or GET: the check its answer must pass, message by message."""
        config = route.config
        document = case.document
        tokens = case.tokens
        if config.protocol != "mcp" or document is None or tokens is None:
            return None
        inspected = case.inspected
        resume = case.resume
        if request.method == "POST" and inspected is not None and inspected.messages:
            pending = [
                (m.rpc_id, m.facts["method"])
                for m in inspected.messages
                if m.rpc_id is not NO_ID and m.facts.get("method") != "mcp/response"
            ]
            stream = Stream(pending)
            version = inspected.messages[0].facts.get("protocol_version")
        elif request.method == "GET":
            if resume is not None and resume.pending is not None:
                stream = Stream(list(resume.pending))
            else:
                stream = Stream([], get=True)
            version = resume.version if resume is not None else request.headers.get("MCP-Protocol-Version")
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
            document=document,
            allow=allow,
            tokens=tokens,
            filters=frozenset(filters),
            version=version,
            trace_id=case.trace.trace_id,
        )
        return McpAnswers(context, stream, inspected if request.method == "POST" else None)

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
        document = case.document
        decision = outcome.decision
        allow = isinstance(decision, Allow)
        rt = case.rt
        if outcome.started is not None:  # when the engine took the decision up (pdp_ms counts from then)
            when = attributes.rfc3339(outcome.started)
        else:
            when = document["request"]["time"] if document else attributes.rfc3339_now()
        subject = document["subject"] if document else rt.identifier.unverified(_peercert(request, self.listener_tls))
        entry: dict[str, Any] = {
            "time": when,
            "request_id": rid,
            "decision_id": decision.decision_id,
            "route": route_name,
            "method": request.method,
            "path": document["request"]["path"] if document else request.rel_url.raw_path,
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
        messages = case.inspected.messages if case.inspected is not None else ()
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
