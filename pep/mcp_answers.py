"""MCP answers are decided before the agent sees them, message by message: what the server sends is read with
`protocols.mcp_answer` and each message is relayed only once it has been decided.

For an allowed POST (its answer: JSON read whole, or an SSE stream event by event) and a `GET` stream:
- a **response** must answer a request of that POST, by its exact id; a response to a filtered list
  (`filter_tools_list`, `filter_prompts_list`, `filter_resources_list`) is relayed only once each item has been
  decided as its own action (`mcp.method` the list method, `mcp.name` the item) and the denied ones removed; a
  2026-07-28 `InputRequiredResult` is relayed only once each request it embeds was decided like the requests
  below (their keys become sealed tokens, `protocols.mcp_tokens`);
- a **server request or notification** (`sampling/createMessage`, `elicitation/create`, `roots/list`, `ping`,
  `notifications/...`) is decided by its method (`direction: server_to_client`, `protocols.mcp_answer.
  server_facts`); a request's id becomes a sealed token, so the client's reply says what it answers. On a route
  that filters `tools/list`, the tools a `sampling/createMessage` offers are first cut to the visible ones;
- on a `GET` stream that resumes no request, a response is dropped (logged): the SDKs would give it to whichever
  call has its id.
What is refused: a denied notification, and anything on a `GET` stream, is dropped (the server is not told; a
request it sent times out there). A denied request or embedded request on a POST's answer ends the answer: a JSON
answer becomes the JSON-RPC denial of the POST's requests, a stream gets that denial as its last event. An
answer that cannot be read (not UTF-8 or another charset, encoded, not JSON-RPC, a response with another id) is
never relayed: a 502, or mid-stream a JSON-RPC error (-32603, `upstream_unreadable`) for the POST's requests (a
`GET` stream just ends). Every decision is a decision log line; with a required log an allow is written before
what it lets through is relayed.
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
from pep.protocols import NO_ID, Inspected, media
from pep.protocols.mcp_answer import (
    Incoming,
    Response,
    ServerMessage,
    Stray,
    Stream,
    Unreadable,
    error_message,
    filtered,
    input_requests,
    listed,
    load,
    offered_tools,
    server_facts,
    tool_names,
    visibility_facts,
    with_input_requests,
    with_tools,
)
from pep.protocols.mcp_tokens import Tokens
from pep.protocols.sse import SseError, SseEvent, SseReader, encode, field
from pep.responses import MCP_DENIED, MCP_UNDECIDED, MESSAGES, UNDECIDED, Reply, deny_mcp
from pep.routing import Route

log: Final = logging.getLogger("pep.mcp_answers")
UNREADABLE: Final = "upstream_unreadable"
_UNREADABLE_MESSAGE: Final = "The upstream's answer could not be read to be decided."
# A tool the PDP answered about: allowed, or refused for itself (not "the PDP could not decide").
_VERDICTS: Final = frozenset(
    {Reason.ALLOWED, Reason.POLICY_DENIED, Reason.PDP_UNDEFINED, Reason.OBLIGATION_UNSUPPORTED}
)


class _Cut(Exception):
    """The answer ends here: `reason` (a Reason, or UNREADABLE) is what the POST's requests are answered with."""

    def __init__(self, reason: Reason | str, detail: str = "") -> None:
        super().__init__(detail)
        self.reason = reason


class AnswerContext:
    """What deciding one answer needs besides the answer itself."""

    engine: Final[Callable[[], Engine]]  # the current runtime's engine (a GET stream outlives a reload)
    log: Final[DecisionLog]
    log_budget: Final[Callable[[Outcome], float]]
    count_unreadable: Final[Callable[[], None]]
    route: Final[Route]
    document: Final[dict[str, Any]]  # the policy input of the request the answer belongs to
    allow: Final[Allow]
    tokens: Final[Tokens]
    filters: Final[frozenset[str]]  # the list methods the route filters
    version: Final[str | None]
    trace_id: Final[str | None]

    def __init__(
        self,
        engine: Callable[[], Engine],
        log: DecisionLog,
        log_budget: Callable[[Outcome], float],
        count_unreadable: Callable[[], None],
        route: Route,
        document: dict[str, Any],
        allow: Allow,
        tokens: Tokens,
        filters: frozenset[str],
        version: str | None,
        trace_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.log = log
        self.log_budget = log_budget
        self.count_unreadable = count_unreadable
        self.route = route
        self.document = document
        self.allow = allow
        self.tokens = tokens
        self.filters = filters
        self.version = version
        self.trace_id = trace_id


class McpAnswers:
    """The answer check of one allowed MCP request (`upstream.AnswerCheck`)."""

    def __init__(self, context: AnswerContext, stream: Stream, inspected: Inspected | None) -> None:
        self._c = context
        self._stream = stream
        self._inspected = inspected  # the POST's messages, to answer a refused JSON answer with their denial
        self._reader: SseReader | None = None  # made by the first event-stream chunk (most answers are JSON)
        self._allowed: set[bytes] = set()  # server message facts allowed earlier in this answer
        self.refused: Reason | str | None = None  # why the answer was stopped, for tests and logs

    # --- upstream.AnswerCheck ---------------------------------------------------------------------------------

    def mode(self, status: int, content_types: list[str], encodings: list[str], located: bool) -> str:
        read = media.mcp_reads(status, located)
        return media.answer_mode(status, content_types, encodings, self._note_unreadable, read)

    async def whole(self, body: bytes, content_type: str) -> bytes | Reply | None:
        if not body.strip():
            return body  # a 202 or an empty answer: nothing to decide
        try:
            value = load(body)
            kept, changed = await self._messages(self._stream.read(value))
        except Unreadable as exc:
            self._note_unreadable(str(exc))
            return None  # the forwarder answers 502 and counts it
        except _Cut as cut:
            self.refused = reason = cut.reason if isinstance(cut.reason, Reason) else Reason.INTERNAL_ERROR
            return deny_mcp(reason, self._c.allow.request_id, self._inspected, self._c.route.config.deny_status)
        if not changed:
            return body
        if isinstance(value, list):
            return orjson.dumps(kept)
        return orjson.dumps(kept[0]) if kept else b""

    async def gate(self, chunk: bytes | None) -> tuple[bytes, bool]:
        problem: SseError | None = None
        try:
            reader = self._reader
            if reader is None:
                reader = self._reader = SseReader()
            events = reader.feed(chunk) if chunk is not None else reader.finish()
        except SseError as exc:
            events, problem = exc.before, exc
        out: list[bytes] = []
        try:
            for event in events:
                piece = await self._event(event)
                out.append(piece)
                if self._stream.done:
                    return b"".join(out), True  # every request answered: nothing after it is for the client
            if problem is not None:
                raise Unreadable(str(problem))
        except Unreadable as unreadable:
            self._note_unreadable(str(unreadable))
            self._c.count_unreadable()
            return b"".join(out) + self._cut_events(UNREADABLE), True
        except _Cut as cut:
            self.refused = cut.reason
            return b"".join(out) + self._cut_events(cut.reason), True
        return b"".join(out), False

    # --- events and messages --------------------------------------------------------------------------------------

    async def _event(self, event: SseEvent) -> bytes:
        """The event as relayed (b"" when nothing of it is), its id sealed."""
        if event.data is not None and event.event != "message":
            # No MCP client reads another event type; what the PEP does not read is not relayed.
            log.info("request %s: an SSE event of type %r dropped", self._c.allow.request_id, event.event[:40])
            return b""
        data = event.data
        if data is not None:
            value = load(data)
            kept, changed = await self._messages(self._stream.read(value))
            if not kept:
                return b""
            # Unchanged, the data lines go out as they came.
            data = orjson.dumps(kept if isinstance(value, list) else kept[0]) if changed else None
        return self._rebuild(event, data)

    def _rebuild(self, event: SseEvent, data: bytes | None) -> bytes:
        """The event with its id sealed (the client resumes with it, `protocols.mcp_tokens`) and `data` in place
        of its data lines when given; every other line as it came, in its place."""
        sealed = None
        if event.id:
            pending = None if self._stream.get else self._stream.pending
            sealed = self._c.tokens.event_id(event.id, pending, self._c.version)
        if sealed is None and data is None:
            return event.raw
        lines: list[bytes] = []
        id_done = data_done = False
        for line in event.lines:
            name = field(line)[0]
            if name == b"id" and sealed is not None:
                if not id_done:  # every id line goes: the one kept is the event's id, sealed
                    lines.append(b"id: " + sealed.encode())
                    id_done = True
            elif name == b"data" and data is not None:
                if not data_done:
                    lines += [b"data: " + part for part in data.split(b"\n")]
                    data_done = True
            else:
                lines.append(line)
        return b"\n".join(lines) + b"\n\n"

    async def _messages(self, incoming: list[Incoming]) -> tuple[list[dict[str, Any]], bool]:
        """The messages to relay, and whether any differs from what came (one dropped or rewritten)."""
        kept: list[dict[str, Any]] = []
        changed = False
        for message in incoming:
            if type(message) is Response:
                # (Most answers: a response relayed as it came, decided without a coroutine.)
                out = self._response_as_is(message)
                if out is None:
                    out = await self._response(message)
            else:
                out = await self._message(message)
            if out is not None:
                kept.append(out)
            changed = changed or out is not message.message
        for message in incoming:
            if isinstance(message, Response):
                self._stream.answered(message.rpc_id)  # all of them decided: relayed with this event
        return kept, changed

    async def _message(self, incoming: Incoming) -> dict[str, Any] | None:
        if isinstance(incoming, Stray):
            log.warning(
                "request %s: a response (id %r) on a GET stream that resumes no request dropped",
                self._c.allow.request_id,
                incoming.rpc_id,
            )
            return None
        if isinstance(incoming, Response):
            return await self._response(incoming)
        return await self._server_message(incoming)

    def _response_as_is(self, response: Response) -> dict[str, Any] | None:
        """The response's message when it is relayed as it came (an error, or a result neither filtered nor
        asking for input), else None (`_response` decides it). Raises what `_response` would raise first."""
        message = response.message
        if "result" not in message:
            return message
        if response.answers in self._c.filters:
            return None
        return message if input_requests(message) is None else None

    async def _response(self, response: Response) -> dict[str, Any]:
        message = response.message
        if "result" not in message:
            return message
        method = response.answers
        if method in self._c.filters:
            message = await self._filter(message, method)
        requests = input_requests(message)
        if requests is not None:
            sealed: dict[str, dict[str, Any]] = {}
            for key, (inner, params) in requests.items():
                done = await self._server_request(inner, params)
                if isinstance(done, Reason):
                    raise _Cut(done, f"{inner} in an InputRequiredResult")
                request: dict[str, Any] = {"method": inner}
                if done is not None:
                    request["params"] = done
                sealed[self._c.tokens.input_key(key, inner)] = request
            message = with_input_requests(message, sealed)
        return message

    async def _server_message(self, server: ServerMessage) -> dict[str, Any] | None:
        done = await self._server_request(server.method, server.params)
        if isinstance(done, Reason):
            if server.rpc_id is NO_ID or self._stream.get:
                return None  # a notification, or anything on a GET stream: dropped (the decision is logged)
            raise _Cut(done, server.method)
        message = server.message
        if done is not server.params:
            message = {**message, "params": done}
        if server.rpc_id is not NO_ID:
            message = {**message, "id": self._c.tokens.request_id(server.rpc_id, server.method)}
        return message

    async def _server_request(self, method: str, params: Any) -> Any:
        """The params to relay (the sampling tools cut to the visible ones), or the reason it is refused."""
        if method == "sampling/createMessage" and "tools/list" in self._c.filters:
            tools = offered_tools(params)
            if tools:
                visible = await self._visible("tools/list", tool_names(tools), "sampling/createMessage")
                if isinstance(visible, Reason):
                    return visible
                params = with_tools(params, visible)
        reason = await self._decide(server_facts(method, params, self._c.version))
        return params if reason is Reason.ALLOWED else reason

    async def _filter(self, message: dict[str, Any], method: str) -> dict[str, Any]:
        _, names = listed(message["result"], method)
        visible = await self._visible(method, names, method) if names else set()
        if isinstance(visible, Reason):
            raise _Cut(visible, f"{method} filter")
        rewritten, _ = filtered(message, method, visible, self._c.version)
        return rewritten

    # --- decisions ------------------------------------------------------------------------------------------------

    async def _visible(self, method: str, names: list[str], shown_by: str) -> set[str] | Reason:
        """The names the caller may see, each decided as its own action; or why they could not be decided."""
        if not names:
            return set()
        c = self._c
        docs = [{**c.document, "mcp": visibility_facts(method, name, c.version)} for name in names]
        outcome = await c.engine().decide(self._check(docs))
        decision = outcome.decision
        reasons = outcome.reasons or ((Reason.ALLOWED if isinstance(decision, Allow) else decision.reason),) * len(
            names
        )
        undecided = [r for r in reasons if r not in _VERDICTS]
        if len(reasons) != len(names) and not undecided:
            undecided = [Reason.PDP_UNDEFINED]
        overall = undecided[0] if undecided else Reason.ALLOWED
        pairs = list(zip(names, reasons, strict=False))
        entry = self._entry(method, None, outcome, overall)
        entry["filtered"] = {
            "kept": [n for n, r in pairs if r is Reason.ALLOWED],
            "removed": [n for n, r in pairs if r is not Reason.ALLOWED],
        }
        if shown_by != method:
            entry["shown_by"] = shown_by
        overall = await self._record(entry, outcome, overall, any(r is Reason.ALLOWED for r in reasons))
        if overall is not Reason.ALLOWED:
            return overall
        return {n for n, r in pairs if r is Reason.ALLOWED}

    async def _decide(self, facts: dict[str, Any]) -> Reason:
        """One server message decided (each distinct set of facts once per answer)."""
        key = orjson.dumps(facts, option=orjson.OPT_SORT_KEYS)
        if key in self._allowed:
            return Reason.ALLOWED
        outcome = await self._c.engine().decide(self._check([{**self._c.document, "mcp": facts}]))
        decision = outcome.decision
        reason = Reason.ALLOWED if isinstance(decision, Allow) else decision.reason
        entry = self._entry(facts["method"], facts.get("name"), outcome, reason)
        for extra in ("tools", "fields"):
            if extra in facts:
                entry[extra] = facts[extra]
        reason = await self._record(entry, outcome, reason, reason is Reason.ALLOWED)
        if reason is Reason.ALLOWED:
            self._allowed.add(key)
        return reason

    def _check(self, docs: list[dict[str, Any]]) -> Check:
        allow = self._c.allow
        route = self._c.route
        return Check(
            docs[0],
            allow.request_id,
            route.name,
            allow.method,
            allow.upstream_url,
            route.obligation_forbidden,
            more=tuple(docs[1:]),
        )

    async def _record(self, entry: dict[str, Any], outcome: Outcome, reason: Reason, lets_through: bool) -> Reason:
        """Log the decision; what it lets through reaches the agent only once a required log has written it."""
        log_ = self._c.log
        if lets_through and log_.required:
            problem = await log_.commit(entry, self._c.log_budget(outcome))
            if problem is not None:
                log_.record(unaudited(entry, problem))
                return Reason.AUDIT_UNAVAILABLE
        else:
            log_.record(entry)
        return reason

    def _entry(self, method: str, name: Any, outcome: Outcome, reason: Reason) -> dict[str, Any]:
        c = self._c
        document = c.document
        entry: dict[str, Any] = {
            "time": attributes.rfc3339_now(),
            "request_id": c.allow.request_id,
            "decision_id": outcome.decision.decision_id,
            "route": c.route.name,
            "method": document["request"]["method"],
            "path": document["request"]["path"],
            "subject": document["subject"],
            "mcp_method": method,
            "mcp_name": name,
            "direction": "server_to_client",
            "decision": "allow" if reason is Reason.ALLOWED else "deny",
            "reason": reason.value,
            "pdp_ms": outcome.pdp_ms,
            "attempts": outcome.attempts,
            "circuit": c.engine().circuit.name.lower(),
            "trace_id": c.trace_id,
        }
        if outcome.note:
            entry["detail"] = outcome.note
        return entry

    # --- refusals -------------------------------------------------------------------------------------------------

    def _cut_events(self, reason: Reason | str) -> bytes:
        """The last events of a refused POST answer: a JSON-RPC error for each request it had yet to answer."""
        if self._stream.get:
            return b""
        if isinstance(reason, Reason):
            code = MCP_UNDECIDED if reason in UNDECIDED else MCP_DENIED
            text, value = MESSAGES[reason], reason.value
        else:
            code, text, value = MCP_UNDECIDED, _UNREADABLE_MESSAGE, reason
        data = {"reason": value, "request_id": self._c.allow.request_id}
        return b"".join(
            encode(orjson.dumps(error_message(rpc_id, code, text, data))) for rpc_id, _ in self._stream.pending
        )

    def _note_unreadable(self, why: str) -> None:
        """Not a decision (no PDP was asked): a warning, and the upstream failure count `unreadable`."""
        self.refused = UNREADABLE
        log.warning("request %s: the MCP answer could not be read: %s", self._c.allow.request_id, why)
