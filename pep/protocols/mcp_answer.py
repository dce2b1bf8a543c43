"""MCP answers, read without IO: every message a server sends the agent, classified and checked against what the
answer may carry. Pure (JSON values in, messages, facts and rewritten values out), so it outlives the transport.

An answer is a POST's answer (JSON, or an SSE stream) or a `GET` stream. Each JSON-RPC message in it is one of:
- a **response**: on a POST (or a `GET` that resumes a POST's stream) it must answer a request of that POST that
  is still unanswered, by exactly its id (`1` is not `"1"`): the MCP SDKs give any response on a POST's stream
  to the POST's request, and a JSON answer's response to whichever pending request has its id, so a response
  with another id would answer another call. An error with a null id (a server that could not read the request)
  answers nothing and passes. On a `GET` stream that resumes no request, a response is `Stray`: dropped;
- a **server message**: a request (`sampling/createMessage`, `elicitation/create`, `roots/list`, `ping`) or a
  notification, decided by its method with the facts of `server_facts`.
Keys the PEP reads are spelled exactly (a case-insensitive client would read `Tools` as `tools`).
"""

from __future__ import annotations

from typing import Any, Final

from pep import strictjson
from pep.protocols import NO_ID
from pep.protocols.spelling import Spelling

MAX_DEPTH: Final = 128  # tool schemas and structured results nest deeper than requests
SERVER_TO_CLIENT: Final = "server_to_client"
CLIENT_TO_SERVER: Final = "client_to_server"
# The list answers a route may filter: the result key holding the items, and the item key naming each one.
LISTS: Final[dict[str, tuple[str, str]]] = {
    "tools/list": ("tools", "name"),
    "prompts/list": ("prompts", "name"),
    "resources/list": ("resources", "uri"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate"),
}
INPUT_REQUIRED: Final = "input_required"  # 2026-07-28: `resultType` of a result that asks the client first
_MESSAGE_KEYS: Final = Spelling("jsonrpc", "id", "method", "params", "result", "error")
_RESULT_KEYS: Final = Spelling("resultType", "inputRequests", "cacheScope", *(key for key, _ in LISTS.values()))
_ITEM_KEYS: Final = Spelling("name", "uri", "uriTemplate")
_EMBEDDED_KEYS: Final = Spelling("method", "params")
_PARAMS_KEYS: Final = Spelling("tools", "requestedSchema", "mode", "url")
_SCHEMA_KEYS: Final = Spelling("properties")
# Type tests as tuples: a `str | int` written in a check builds a union object each time it runs.
_SERVER_ID_TYPES: Final = (str, int)
_ID_TYPES: Final = (str, int, type(None))
_PARAMS_TYPES: Final = (dict, list)


class Unreadable(ValueError):
    """The answer cannot be read to be decided; the message says why (for the log)."""


def id_key(rpc_id: Any) -> tuple[str, Any]:
    """A JSON-RPC id as clients compare it: `1` and `"1"` are different ids."""
    return type(rpc_id).__name__, rpc_id


class Response:
    rpc_id: Final[Any]
    answers: Final[str]  # the method of the request it answers
    message: Final[dict[str, Any]]

    def __init__(self, rpc_id: Any, answers: str, message: dict[str, Any]) -> None:
        self.rpc_id = rpc_id
        self.answers = answers
        self.message = message


class ServerMessage:
    method: Final[str]
    rpc_id: Final[Any]  # NO_ID for a notification
    params: Final[Any]
    message: Final[dict[str, Any]]

    def __init__(self, method: str, rpc_id: Any, params: Any, message: dict[str, Any]) -> None:
        self.method = method
        self.rpc_id = rpc_id
        self.params = params
        self.message = message


class Stray:
    """A response on a stream that answers no request: never relayed."""

    rpc_id: Final[Any]
    message: Final[dict[str, Any]]

    def __init__(self, rpc_id: Any, message: dict[str, Any]) -> None:
        self.rpc_id = rpc_id
        self.message = message


Incoming = Response | ServerMessage | Stray


def load(data: bytes) -> Any:
    """One JSON value of an answer, strictly (no duplicate keys: clients keep different copies)."""
    try:
        return strictjson.loads(data, MAX_DEPTH)
    except strictjson.JsonError as exc:
        raise Unreadable(f"MCP answer: {exc}"[:200]) from None


class Stream:
    """What one answer may carry, and what it has carried so far.

    `pending` are the requests it answers, (id, method) each; a `GET` stream that resumes no request has none. A
    response read is claimed (a second one for the same id is unreadable); its request stays pending until the
    response is relayed (`answered`), so a refusal before that still answers it."""

    def __init__(self, pending: list[tuple[Any, str]], get: bool = False) -> None:
        self.get = get
        self._pending = {id_key(rpc_id): (rpc_id, method) for rpc_id, method in pending}
        self._claimed: set[tuple[str, Any]] = set()

    @property
    def pending(self) -> list[tuple[Any, str]]:
        """The requests whose answer has not been relayed, (id, method) each."""
        return list(self._pending.values())

    def answered(self, rpc_id: Any) -> None:
        """The response to `rpc_id` has been relayed."""
        self._pending.pop(id_key(rpc_id), None)

    @property
    def done(self) -> bool:
        """A POST's answer has answered every request: nothing after it is for the client."""
        return not self.get and not self._pending

    def read(self, value: Any) -> list[Incoming]:
        """The messages of one JSON value (a message, or an array of them)."""
        items = value if isinstance(value, list) else [value]
        if not items:
            raise Unreadable("an empty JSON-RPC batch")
        return [self._one(item) for item in items]

    def _one(self, item: Any) -> Incoming:
        if not isinstance(item, dict):
            raise Unreadable("not a JSON-RPC message")
        if problem := _MESSAGE_KEYS.problem(item, "JSON-RPC message"):
            raise Unreadable(problem)
        if item.get("jsonrpc") != "2.0":
            raise Unreadable("not a JSON-RPC 2.0 message")
        rpc_id = item.get("id", NO_ID)
        method = item.get("method")
        if method is not None:
            if not isinstance(method, str) or not method:
                raise Unreadable("method must be a non-empty string")
            if "result" in item or "error" in item:
                # A client SDK may read it as a response (the 2.x SDK does, with an `error`), to any call.
                raise Unreadable("a JSON-RPC request with a result or an error")
            if rpc_id is not NO_ID and (isinstance(rpc_id, bool) or not isinstance(rpc_id, _SERVER_ID_TYPES)):
                raise Unreadable("a server request id must be a string or a number")
            params = item.get("params")
            if params is not None and not isinstance(params, _PARAMS_TYPES):
                raise Unreadable("params must be an object or an array")
            return ServerMessage(method, rpc_id, params, item)
        if rpc_id is NO_ID or ("result" in item) == ("error" in item):
            raise Unreadable("a JSON-RPC response needs an id and exactly one of result and error")
        if isinstance(rpc_id, bool) or not isinstance(rpc_id, _ID_TYPES):
            raise Unreadable("a JSON-RPC id must be a string, a number or null")
        if rpc_id is None and "error" in item and not self.get:
            return Response(None, "", item)  # an error about a request the server could not read: answers nothing
        key = id_key(rpc_id)
        answered = self._pending.get(key)
        if answered is not None and key not in self._claimed:
            self._claimed.add(key)
            return Response(rpc_id, answered[1], item)
        if self.get:
            return Stray(rpc_id, item)
        raise Unreadable("a response to no request of this answer")


def listed(result: Any, method: str) -> tuple[list[Any], list[str]]:
    """The items of a list result and the names of those that have one (items without a name are never shown)."""
    key, name_key = LISTS[method]
    if not isinstance(result, dict):
        raise Unreadable(f"a {method} result that is not an object")
    if problem := _RESULT_KEYS.problem(result, f"{method} result"):
        raise Unreadable(problem)
    items = result.get(key)
    if not isinstance(items, list):
        raise Unreadable(f"a {method} result without a {key} list")
    for item in items:
        if isinstance(item, dict) and (problem := _ITEM_KEYS.problem(item, f"{method} item")):
            raise Unreadable(problem)
    return items, [i[name_key] for i in items if isinstance(i, dict) and isinstance(i.get(name_key), str)]


def filtered(
    message: dict[str, Any], method: str, visible: set[str], version: str | None
) -> tuple[dict[str, Any], list[str]]:
    """The response with only the `visible` items, and the names removed (`<unnamed>` for an item without one).

    A per-caller list must not be served to others from a shared cache: from 2026-07-28 on, or when the answer
    has a `cacheScope`, it becomes `private`."""
    result = message["result"]
    key, name_key = LISTS[method]
    items, _ = listed(result, method)
    kept: list[Any] = []
    removed: list[str] = []
    for item in items:
        name = item.get(name_key) if isinstance(item, dict) else None
        if isinstance(name, str) and name in visible:
            kept.append(item)
        else:
            removed.append(name if isinstance(name, str) else "<unnamed>")
    new = {**result, key: kept}
    if (version is not None and version >= "2026-07-28") or "cacheScope" in new:
        new["cacheScope"] = "private"
    return {**message, "result": new}, removed


def input_requests(message: dict[str, Any]) -> dict[str, tuple[str, Any]] | None:
    """A 2026-07-28 `InputRequiredResult`'s server requests (key -> (method, params)), or None for another result.

    Any result holding `inputRequests` counts, whatever its `resultType`: the SDKs try that result shape last, so
    a result that is nothing else is read as one."""
    result = message.get("result")
    if not isinstance(result, dict):
        return None
    if problem := _RESULT_KEYS.problem(result, "result"):
        raise Unreadable(problem)
    if result.get("resultType") != INPUT_REQUIRED and "inputRequests" not in result:
        return None
    requests = result.get("inputRequests", {})
    if not isinstance(requests, dict):
        raise Unreadable("inputRequests must be an object")
    found: dict[str, tuple[str, Any]] = {}
    for key, request in requests.items():
        if not isinstance(request, dict) or (problem := _EMBEDDED_KEYS.problem(request, "input request")):
            raise Unreadable(problem or "an input request that is not an object")
        method, params = request.get("method"), request.get("params")
        if not isinstance(method, str) or not method or (params is not None and not isinstance(params, dict)):
            raise Unreadable("an input request needs a method and object params")
        found[key] = (method, params)
    return found


def with_input_requests(message: dict[str, Any], requests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    result = message["result"]
    return {**message, "result": {**result, "inputRequests": requests}}


def offered_tools(params: Any) -> list[Any] | None:
    """The `tools` a `sampling/createMessage` offers the agent's model, or None when it offers none."""
    if not isinstance(params, dict):
        return None
    if problem := _PARAMS_KEYS.problem(params, "params"):
        raise Unreadable(problem)
    tools = params.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise Unreadable("sampling tools must be a list")
    for tool in tools:
        if isinstance(tool, dict) and (problem := _ITEM_KEYS.problem(tool, "sampling tool")):
            raise Unreadable(problem)
    return tools


def tool_names(tools: list[Any]) -> list[str]:
    return [t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]


def with_tools(params: dict[str, Any], visible: set[str]) -> dict[str, Any]:
    """Sampling params offering only the `visible` tools (and none without a name)."""
    tools = [t for t in params["tools"] if isinstance(t, dict) and t.get("name") in visible]
    return {**params, "tools": tools}


def server_facts(method: str, params: Any, version: str | None) -> dict[str, Any]:
    """The `mcp` facts of a message the server sends the agent.

    `sampling/createMessage`: `tools`, the names of the tools offered to the agent's model. `elicitation/create`:
    `fields`, the names of the form's fields (`requestedSchema.properties`), or for a URL-mode elicitation
    `name`, the URL the user is sent to."""
    facts: dict[str, Any] = {
        "method": method,
        "name": None,
        "arguments": None,
        "protocol_version": version,
        "direction": SERVER_TO_CLIENT,
    }
    if method == "sampling/createMessage":
        tools = offered_tools(params)
        facts["tools"] = tool_names(tools) if tools is not None else []
    elif method == "elicitation/create" and isinstance(params, dict):
        if problem := _PARAMS_KEYS.problem(params, "params"):
            raise Unreadable(problem)
        schema = params.get("requestedSchema")
        if isinstance(schema, dict):
            if problem := _SCHEMA_KEYS.problem(schema, "requestedSchema"):
                raise Unreadable(problem)
            properties = schema.get("properties")
            facts["fields"] = sorted(properties) if isinstance(properties, dict) else []
        else:
            facts["fields"] = []
        url = params.get("url")
        if params.get("mode") == "url" or url is not None:
            if not isinstance(url, str):
                raise Unreadable("a URL elicitation without a URL")
            facts["name"] = url
    return facts


def visibility_facts(method: str, name: str, version: str | None) -> dict[str, Any]:
    """Whether the agent may see one listed item: its own action, the list method, with the item's name."""
    return {
        "method": method,
        "name": name,
        "arguments": None,
        "protocol_version": version,
        "direction": SERVER_TO_CLIENT,
    }


def error_message(rpc_id: Any, code: int, message: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": code, "message": message, "data": data}}
