"""What a model answer does, read without IO: the tools it calls and the models that answered.

Pure (bytes in, findings out), so it outlives the transport. Answers are read the way the agents' SDKs read
them, and strictly: a JSON answer is one strict JSON value (no duplicate keys, valid UTF-8); a stream is split
into Server-Sent Events by `protocols.sse` (the WHATWG field rules, UTF-8 only), and each event's `data` lines,
joined with LF, are one strict JSON value unless they start with `[DONE]`.

A tool call is found wherever an answer can hold one: every `tool_calls` list (chat messages and stream deltas,
Assistants runs and run steps: `function.name`, `custom.name`, else the item's `type` for built-in tools),
every `function_call` object (the legacy chat form), and every object whose `type` ends in `_call` (Responses
output items: `function_call`, `custom_tool_call` and `mcp_call` by `name`, built-in ones such as
`web_search_call` by the type without `_call`) or is `mcp_approval_request`. The models are the answer's
`model` and, in Responses stream events, `response.model`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

from pep import strictjson
from pep.protocols.spelling import Spelling
from pep.protocols.sse import MAX_EVENT, SseError, SseEvent, SseReader

_NAMED_TYPES: Final = frozenset({"function_call", "custom_tool_call", "mcp_call", "mcp_approval_request"})
_VERSION: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{4}|[0-9]{8}")
# The keys a tool call is found by, which must be spelled exactly: a Go agent's client (encoding/json) binds
# `Function` or `TOOL_CALLS` as `function` or `tool_calls`, where the PEP would have found no call.
_HOLDERS: Final = Spelling("tool_calls", "function_call")  # in any object
_CALL_KEYS: Final = Spelling("function", "custom", "name", "type")  # in a `tool_calls` item
_NAME_KEYS: Final = Spelling("name")  # in a function or custom object, or a legacy `function_call`
_ITEM_KEYS: Final = Spelling("type", "name")  # in a Responses item whose type is a tool call
_ANSWER_KEYS: Final = Spelling("model", "response")  # at the top of an answer or event


class AnswerError(ValueError):
    """The answer cannot be read; the message says why (for the log). In a stream, `before` holds the events
    read whole before the one that could not be (they may still be relayed)."""

    def __init__(self, message: str, before: list[Event] | None = None) -> None:
        super().__init__(message)
        self.before = before or []


@dataclass(slots=True)
class Findings:
    tools: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    def add_tool(self, name: Any) -> None:
        if not isinstance(name, str) or not name:
            raise AnswerError("a tool call whose name is not a non-empty string")
        if name not in self.tools:
            self.tools.append(name)

    def add_model(self, model: Any) -> None:
        if model is None:
            return
        if not isinstance(model, str):
            raise AnswerError("an answer model that is not a string")
        if model not in self.models:
            self.models.append(model)


def same_model(decided: str | None, answered: str) -> bool:
    """The answering model is the decided one: equal, or the decided name followed by `-` and a date or version
    (`gpt-4o-2024-08-06`, `gpt-4-0613`, `x-20250101` for `gpt-4o`, `gpt-4`, `x`). Anything else is another
    model (`gpt-4o-mini` is not `gpt-4o`)."""
    if decided is None:
        return False
    if answered == decided:
        return True
    return answered.startswith(decided + "-") and _VERSION.fullmatch(answered[len(decided) + 1 :]) is not None


def _spelled(spelling: Spelling, obj: dict[str, Any], where: str) -> None:
    if problem := spelling.problem(obj, where):
        raise AnswerError(problem)


def _call_name(item: dict[str, Any]) -> Any:
    """The tool of one `tool_calls` item; None for a stream delta that continues a call named before."""
    _spelled(_CALL_KEYS, item, "a tool call")
    for key in ("function", "custom"):
        inner = item.get(key)
        if isinstance(inner, dict):
            _spelled(_NAME_KEYS, inner, f"a tool call's {key}")
            if "name" in inner:
                return inner["name"]
    if "name" in item:
        return item["name"]
    kind = item.get("type")
    return kind if isinstance(kind, str) and kind not in ("function", "custom") else None


def scan(value: Any, found: Findings) -> None:
    """Add every tool call and answering model in one JSON answer or event to `found`."""
    if isinstance(value, dict):
        _spelled(_ANSWER_KEYS, value, "a model answer")
        found.add_model(value.get("model"))
        response = value.get("response")
        if isinstance(response, dict):
            _spelled(_ANSWER_KEYS, response, "a model answer's response")
            found.add_model(response.get("model"))
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))  # in document order
            continue
        if not isinstance(node, dict):
            continue
        folded = "\0".join(node).casefold()  # one C pass: most objects hold neither name in any spelling
        if "tool_calls" in folded or "function_call" in folded:
            _spelled(_HOLDERS, node, "a model answer")
        calls = node.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise AnswerError("tool_calls must be a list of objects")
            for call in calls:
                name = _call_name(call)
                if name is not None:
                    found.add_tool(name)
        legacy = node.get("function_call")
        if isinstance(legacy, dict):
            _spelled(_NAME_KEYS, legacy, "a function_call")
            if "name" in legacy:
                found.add_tool(legacy["name"])
        kind = node.get("type")
        if isinstance(kind, str) and (kind.endswith("_call") or kind in _NAMED_TYPES):
            _spelled(_ITEM_KEYS, node, f"a {kind[:40]} item")
            found.add_tool(node.get("name") if kind in _NAMED_TYPES else kind[: -len("_call")])
        stack.extend(reversed(node.values()))


def read_json(body: bytes) -> Findings:
    """The findings of a whole JSON answer."""
    try:
        value = strictjson.loads(body)
    except strictjson.JsonError as exc:
        raise AnswerError(f"model answer: {exc}"[:200]) from None
    found = Findings()
    scan(value, found)
    return found


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes  # the event as relayed: its lines joined with LF, ending in a blank line
    findings: Findings


class EventReader:
    """Reads a Server-Sent Events stream (split by `protocols.sse`) event by event: feed chunks, then `finish`."""

    def __init__(self) -> None:
        self._sse = SseReader(MAX_EVENT)
        self._named: set[tuple[int, int | str]] = set()  # (choice, tool call index) named so far in chat deltas
        self._calls: dict[int, int] = {}  # chat stream choice index -> how many tool calls it has begun

    def feed(self, chunk: bytes) -> list[Event]:
        try:
            events = self._sse.feed(chunk)
        except SseError as exc:
            raise AnswerError(str(exc), self._read(exc.before)) from None
        return self._read(events)

    def finish(self) -> list[Event]:
        """The last event when the stream ends without a blank line (some clients still act on it)."""
        try:
            events = self._sse.finish()
        except SseError as exc:
            raise AnswerError(str(exc)) from None
        return self._read(events)

    def _read(self, events: list[SseEvent]) -> list[Event]:
        done: list[Event] = []
        for event in events:
            try:
                done.append(self._event(event))
            except AnswerError as exc:
                raise AnswerError(str(exc), done) from None
        return done

    def _event(self, event: SseEvent) -> Event:
        found = Findings()
        text = event.data
        if text is not None and not text.startswith(b"[DONE]"):
            try:
                value = strictjson.loads(text)
            except strictjson.JsonError as exc:
                raise AnswerError(f"stream event: {exc}"[:200]) from None
            self._check_deltas(value)
            scan(value, found)
        return Event(event.raw, found)

    def _check_deltas(self, value: Any) -> None:
        """A chat stream names each tool call once, in its first delta: a second name for the same call would be
        concatenated by SDKs that accumulate deltas into a name the PEP never decided.

        SDKs keep choices and tool calls in lists, by position: the openai SDK reads a delta's `index` as a list
        position (`-1` is the last call begun, `true` is 1, an index past the end is appended at the end, and a
        choice seen first is at position 0 whatever its index). So indexes must be non-negative integers, and each
        new choice or call must take the next index: then the index the PEP keys a call by is the SDK's position."""
        choices = value.get("choices") if isinstance(value, dict) else None
        if not isinstance(choices, list):
            return
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            position = choice.get("index")
            begun = self._calls.get(position) if _ordinal(position) else None
            if begun is None:
                if position != len(self._calls) or not _ordinal(position):
                    raise AnswerError("a chat stream choice index that is not the next one")
                begun = 0
            keyed: list[tuple[int | str, Any]] = []
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    if not isinstance(call, dict):
                        continue
                    index = call.get("index")
                    if not _ordinal(index) or index > begun:
                        raise AnswerError("a streamed tool call index that is neither a call begun nor the next one")
                    begun += index == begun
                    keyed.append((index, call))
            self._calls[position] = begun
            if isinstance(delta.get("function_call"), dict):
                keyed.append(("function_call", delta["function_call"]))
            for index, call in keyed:
                named = _call_name(call) if index != "function_call" else call.get("name")
                if named is None:
                    continue
                key = (position, index)
                if key in self._named:
                    raise AnswerError("a streamed tool call named more than once")
                self._named.add(key)


def _ordinal(value: Any) -> TypeGuard[int]:
    """A JSON integer usable as a list position as written (not a boolean, not negative)."""
    return type(value) is int and value >= 0
