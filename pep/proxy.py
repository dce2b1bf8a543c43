"""The request handler: integrity checks, route, decide, record, then forward an Allow or answer a Deny.

It moves bytes and calls the pure parts; it decides nothing itself. Anything that goes wrong before a decision
is a `Deny(internal_error)`: the only path to the upstream goes through `Upstream.forward(…, Allow, …)`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, web
from yarl import URL

from pep import attributes, integrity
from pep.config import Config
from pep.decision import Allow, Deny, Reason
from pep.decision_log import DecisionLog
from pep.engine import Check, Engine, Outcome
from pep.headers import end_to_end
from pep.ids import new_id, request_id
from pep.metrics import UNMATCHED, Metrics
from pep.responses import deny
from pep.routing import Route, RouteTable
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


class Proxy:
    """The catch-all handler of the agent-facing listener."""

    def __init__(
        self,
        config: Config,
        routes: RouteTable,
        engine: Engine,
        upstream: Upstream,
        decision_log: DecisionLog,
        metrics: Metrics,
    ) -> None:
        self._routes = routes
        self._engine = engine
        self._upstream = upstream
        self._log = decision_log
        self._metrics = metrics
        self._workload = config.identity.workload
        # The agent header is only believed from callers on this machine (a loopback listener).
        self._agent_header = config.identity.agent_header if config.listen.is_loopback else None
        self._attributes = dict(config.identity.attributes)
        self._subject: dict[str, Any] = self._subject_for(None)
        self.in_flight = 0
        metrics.requests_in_flight.set_function(lambda: self.in_flight)

    def _subject_for(self, agent: str | None) -> dict[str, Any]:
        subject: dict[str, Any] = {"workload": self._workload, "agent": agent}
        if self._attributes:
            subject["attributes"] = self._attributes
        return subject

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await self._handle(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug outside the decision itself (logging, metrics): still a denial, never a bare 500.
            log.exception("internal error while handling a request")
            return deny(Reason.INTERNAL_ERROR, request_id(request.headers.get("X-Request-ID")))
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        rid = request_id(request.headers.get("X-Request-ID"))
        route: Route | None = None
        status = 403
        document: dict[str, Any] | None = None
        try:
            if request.version not in _HTTP_1:
                status = 505
                outcome = _early(Reason.REQUEST_AMBIGUOUS, f"HTTP version {request.version}")
            else:
                route, document, outcome = await self._decide(request, rid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("internal error while deciding request %s", rid)
            outcome = _early(Reason.INTERNAL_ERROR, f"{type(exc).__name__}")

        decision = outcome.decision
        route_name = route.name if route is not None else UNMATCHED
        entry = self._entry(request, rid, route_name, document, outcome)
        if not self._log.record(entry) and self._log.required and isinstance(decision, Allow):
            decision = Deny(Reason.AUDIT_UNAVAILABLE, decision.decision_id, "decision log unavailable")
        metrics = self._metrics
        reason = Reason.ALLOWED if isinstance(decision, Allow) else decision.reason
        metrics.decisions[route_name, reason].inc()
        metrics.decision_duration[route_name].observe(time.perf_counter() - started)
        if isinstance(decision, Allow) and route is not None:
            return await self._upstream.forward(request, decision, route)
        assert isinstance(decision, Deny)
        response = deny(decision.reason, rid, status)
        if status == 505:
            response.force_close()
        return response

    async def _decide(self, request: web.BaseRequest, rid: str) -> tuple[Route | None, dict[str, Any] | None, Outcome]:
        raw_target = request.raw_path
        rel = request.rel_url
        path = rel.raw_path
        query = rel.raw_query_string
        headers = request.headers
        if request.method == "CONNECT":
            return None, None, _early(Reason.NO_ROUTE, "no route allows tunnels")
        if "#" in raw_target:
            return None, None, _early(Reason.REQUEST_AMBIGUOUS, "fragment in the request target")
        if not raw_target.startswith("/") and not _authority_matches(request.url, headers.get("Host")):
            return None, None, _early(Reason.REQUEST_AMBIGUOUS, "absolute-form target disagrees with Host")
        problem = integrity.path_problem(path) or integrity.query_problem(query) or integrity.override_header(headers)
        if problem:
            return None, None, _early(Reason.REQUEST_AMBIGUOUS, problem)
        route = self._routes.match(path)
        if route is None:
            return None, None, _early(Reason.NO_ROUTE, "no route matches the path")
        length = request.content_length
        limit = route.config.max_body_bytes
        if limit is not None and length is not None and length > limit:
            return route, None, _early(Reason.BODY_TOO_LARGE, f"content-length {length} > {limit}")
        upstream_url = route.upstream_url(path, query)
        subject = self._subject
        if self._agent_header is not None:
            agents = headers.getall(self._agent_header, ())
            if len(agents) > 1:
                return route, None, _early(Reason.REQUEST_AMBIGUOUS, "more than one agent header")
            if agents:
                subject = self._subject_for(agents[0])
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
        check = Check(document, rid, route.name, request.method, upstream_url, route.obligation_forbidden)
        return route, document, await self._engine.decide(check)

    def _entry(
        self,
        request: web.BaseRequest,
        rid: str,
        route_name: str,
        document: dict[str, Any] | None,
        outcome: Outcome,
    ) -> dict[str, Any]:
        decision = outcome.decision
        allow = isinstance(decision, Allow)
        entry: dict[str, Any] = {
            "time": document["request"]["time"] if document else attributes.rfc3339_now(),
            "request_id": rid,
            "decision_id": decision.decision_id,
            "route": route_name,
            "method": request.method,
            "path": request.rel_url.raw_path,
            "subject": document["subject"] if document else self._subject,
            "mcp_method": None,
            "mcp_name": None,
            "decision": "allow" if allow else "deny",
            "reason": Reason.ALLOWED.value if allow else decision.reason.value,  # type: ignore[union-attr]
            "pdp_ms": outcome.pdp_ms,
            "attempts": outcome.attempts,
            "circuit": self._engine.circuit.name.lower(),
        }
        if outcome.note:
            entry["detail"] = outcome.note
        return entry
