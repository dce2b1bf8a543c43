"""MCP over Streamable HTTP (2025-03-26 to 2026-07-28): every message on an MCP route is decided.

POST bodies are read whole and strictly (`strictjson`: one JSON value, valid UTF-8, no duplicate keys, a depth
limit) and must have the JSON-RPC 2.0 shape. Keys equal under case folding anywhere in the body, and a key that
folds to one the PEP reads (`Method`, `Name`) without being it, are `request_ambiguous`: Go servers bind them.
Action names (`mcp.method`):
- requests and notifications: their method (`tools/call`, `notifications/initialized`, ...);
- responses the client sends to server requests: `mcp/response` (what they answer is added by
  `protocols.mcp_replies`, which opens the id the PEP gave the server's request);
- `GET` on the route (the server stream): `mcp/stream`; `DELETE` (end of session): `mcp/session/delete`;
  any other HTTP method: `mcp/http/<METHOD>`.
`mcp.name` is the tool or prompt name (`params.name`) or the resource URI (`params.uri`); for
`completion/complete` the target of `params.ref` (a prompt's name or a resource template's URI), with
`ref_type` (`ref/prompt`, `ref/resource`) and `argument` (`params.argument.name`, the argument completed).
`direction` is `client_to_server`. Mirrored headers (`Mcp-Method`, `Mcp-Name`) are never trusted: present ones
must match the body, and 2026-07-28 requests must carry them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Final

from pep import strictjson
from pep.config import DEFAULT_MAX_BATCH_MESSAGES, DEFAULT_MAX_JSON_VALUES
from pep.decision import Reason
from pep.protocols import NO_ID, Inspected, Message, Refused
from pep.protocols.mcp_answer import CLIENT_TO_SERVER, id_key
from pep.protocols.spelling import Spelling

BATCH_VERSION: Final = "2025-03-26"  # the only version with JSON-RPC batches
HEADER_VERSION: Final = "2026-07-28"  # from this version on, Mcp-Method/Mcp-Name are required and mirror the body
MAX_DEPTH: Final = 64
_NAMED_BY: Final = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
}
_META_VERSION: Final = "io.modelcontextprotocol/protocolVersion"
# Type tests as tuples: a `str | int` written in a check builds a union object each time it runs.
_ID_TYPES: Final = (str, int, type(None))
_PARAMS_TYPES: Final = (dict, list)
_HTTP_ACTIONS: Final = {"GET": "mcp/stream", "DELETE": "mcp/session/delete"}
# What the PEP reads from a message, its params and params._meta: each must be spelled exactly.
_MESSAGE_KEYS: Final = Spelling("jsonrpc", "id", "method", "params", "result", "error")
_PARAMS_KEYS: Final = Spelling(
    "name", "uri", "arguments", "_meta", "protocolVersion", "ref", "argument", "inputResponses"
)
_META_KEYS: Final = Spelling(_META_VERSION)
_REF_KEYS: Final = Spelling("type", "name", "uri")
_COMPLETED: Final = {
    "ref/prompt": "name",
    "ref/resource": "uri",
}  # completion/complete: where params.ref names its target


def http_action(method: str) -> Message:
    """A request on an MCP route that carries no JSON-RPC body."""
    return Message(
        "mcp",
        {
            "method": _HTTP_ACTIONS.get(method, f"mcp/http/{method}"),
            "name": None,
            "arguments": None,
            "protocol_version": None,
            "direction": CLIENT_TO_SERVER,
        },
    )


def decode_header(value: str) -> str | None:
    """A mirrored header value: plain, or `=?base64?...?=` for values that are not safe ASCII."""
    if value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    return value


def _spelling_problem(obj: Any) -> str | None:
    """A key of the message, its params or params._meta that folds to a name the PEP reads without being it."""
    if not isinstance(obj, dict):
        return None
    if problem := _MESSAGE_KEYS.problem(obj, "JSON-RPC message"):
        return problem
    params = obj.get("params")
    if not isinstance(params, dict):
        return None
    if problem := _PARAMS_KEYS.problem(params, "params"):
        return problem
    meta = params.get("_meta")
    if isinstance(meta, dict) and (problem := _META_KEYS.problem(meta, "params._meta")):
        return problem
    ref = params.get("ref")
    if isinstance(ref, dict) and (problem := _REF_KEYS.problem(ref, "params.ref")):
        return problem
    argument = params.get("argument")
    return _REF_KEYS.problem(argument, "params.argument") if isinstance(argument, dict) else None


def _message(obj: Any, version: str | None) -> Message | str:
    """One JSON-RPC 2.0 message, or what is wrong with it."""
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        return "not a JSON-RPC 2.0 message"
    rpc_id = obj.get("id", NO_ID)
    if rpc_id is not NO_ID and (isinstance(rpc_id, bool) or not isinstance(rpc_id, _ID_TYPES)):
        return "a JSON-RPC id must be a string, a number or null"
    method = obj.get("method")
    if method is None:
        if rpc_id is NO_ID or ("result" in obj) == ("error" in obj):
            return "a JSON-RPC response needs an id and exactly one of result and error"
        facts = {
            "method": "mcp/response",
            "name": None,
            "arguments": None,
            "protocol_version": version,
            "direction": CLIENT_TO_SERVER,
        }
        return Message("mcp", facts, rpc_id)
    if not isinstance(method, str) or not method:
        return "method must be a non-empty string"
    if "result" in obj or "error" in obj:
        # The SDKs read such a message as whichever shape fits best: the 2.x SDK takes `{"id": 1, "method":
        # "ping", "error": {...}}` as an error response to its request 1, which the PEP would have decided as a ping.
        return "a JSON-RPC request with a result or an error"
    params = obj.get("params")
    if params is not None and not isinstance(params, _PARAMS_TYPES):
        return "params must be an object or an array"
    name: Any = None
    arguments: Any = None
    completion: dict[str, Any] = {}
    if isinstance(params, dict):
        field = _NAMED_BY.get(method)
        if field is not None:
            name = params.get(field)
            if name is not None and not isinstance(name, str):
                return f"params.{field} must be a string"
        if method == "completion/complete":
            target = _completion(params)
            if isinstance(target, str):
                return target
            name, completion = target
        arguments = params.get("arguments")
        if arguments is not None and not isinstance(arguments, dict):
            return "params.arguments must be an object"
        meta = params.get("_meta")
        if isinstance(meta, dict) and isinstance(meta.get(_META_VERSION), str):
            if version is not None and meta[_META_VERSION] != version:
                return "MCP-Protocol-Version header disagrees with params._meta"
            version = meta[_META_VERSION]
        elif method == "initialize" and isinstance(params.get("protocolVersion"), str):
            version = version or params["protocolVersion"]
    facts = {
        "method": method,
        "name": name,
        "arguments": arguments,
        "protocol_version": version,
        "direction": CLIENT_TO_SERVER,
    }
    if completion:
        facts.update(completion)
    return Message("mcp", facts, rpc_id)


def _completion(params: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
    """What a completion completes: the prompt or resource template `params.ref` names, and the argument."""
    ref = params.get("ref")
    if not isinstance(ref, dict) or ref.get("type") not in _COMPLETED:
        return "completion/complete needs params.ref of type ref/prompt or ref/resource"
    ref_type = ref["type"]
    target = ref.get(_COMPLETED[ref_type])
    if not isinstance(target, str):
        return f"params.ref.{_COMPLETED[ref_type]} must be a string"
    argument = params.get("argument")
    if not isinstance(argument, dict) or not isinstance(argument.get("name"), str):
        return "completion/complete needs params.argument.name"
    return target, {"ref_type": ref_type, "argument": argument["name"]}


def inspect(
    body: bytes,
    headers: Mapping[str, str],
    max_batch_messages: int = DEFAULT_MAX_BATCH_MESSAGES,
    max_json_values: int = DEFAULT_MAX_JSON_VALUES,
) -> Inspected | Refused:
    """The messages of one POST body, checked against the mirrored headers.

    A batch of more than `max_batch_messages` is `body_too_large`: each message is one PDP decision, and the
    route decides at most that many for one body (like `max_body_bytes`, a bound on what one body may cost). So is
    a body of more than `max_json_values` values: the PDP's time grows with them, and a decision one caller's
    input makes the PDP too slow for would count against the breaker as the PDP's timeout."""
    getall = getattr(headers, "getall", None)  # a repeated header: the upstream may read the copy not checked
    if getall is not None:
        # Each looked up once: its first value is what `headers.get` gives.
        versions = getall("MCP-Protocol-Version", ())
        sent_methods = getall("Mcp-Method", ())
        sent_names = getall("Mcp-Name", ())
        if len(versions) > 1 or len(sent_methods) > 1 or len(sent_names) > 1:
            return Refused(Reason.REQUEST_AMBIGUOUS, "a repeated MCP-Protocol-Version, Mcp-Method or Mcp-Name header")
        version = versions[0] if versions else None
        sent_method = sent_methods[0] if sent_methods else None
        sent_name = sent_names[0] if sent_names else None
    else:
        version = headers.get("MCP-Protocol-Version")
        sent_method = headers.get("Mcp-Method")
        sent_name = headers.get("Mcp-Name")
    try:
        value = strictjson.loads(body, MAX_DEPTH, fold_keys=True, max_values=max_json_values)
    except strictjson.FoldedKeys as exc:
        return Refused(Reason.REQUEST_AMBIGUOUS, f"MCP body: {exc}"[:200])
    except strictjson.TooManyValues as too_many_values:
        return Refused(Reason.BODY_TOO_LARGE, f"MCP body: {too_many_values}, max_json_values"[:200])
    except strictjson.JsonError as json_error:
        # A duplicate key is unreadable too: the upstream might act on the value the PEP did not see.
        return Refused(Reason.BODY_UNREADABLE, f"MCP body: {json_error}"[:200])
    batch = isinstance(value, list)
    if batch:
        if version not in (None, BATCH_VERSION):
            return Refused(Reason.REQUEST_AMBIGUOUS, f"a JSON-RPC batch is not valid in MCP {version}")
        if not value:
            return Refused(Reason.BODY_UNREADABLE, "an empty JSON-RPC batch")
        if sent_method is not None or sent_name is not None:
            return Refused(Reason.REQUEST_AMBIGUOUS, "mirrored MCP headers cannot describe a batch")
        if len(value) > max_batch_messages:
            detail = f"a JSON-RPC batch of {len(value)} messages, over max_batch_messages {max_batch_messages}"
            return Refused(Reason.BODY_TOO_LARGE, detail)
        items = value
    else:
        items = [value]
    messages: list[Message] = []
    for item in items:
        if (problem := _spelling_problem(item)) is not None:
            return Refused(Reason.REQUEST_AMBIGUOUS, problem)
        message = _message(item, version)
        if isinstance(message, str):
            return Refused(Reason.BODY_UNREADABLE, message)
        messages.append(message)
    if batch and any(m.facts["protocol_version"] not in (None, BATCH_VERSION) for m in messages):
        return Refused(Reason.REQUEST_AMBIGUOUS, "a batch element declares an MCP version without batches")
    if batch:
        # Each answer is matched to its request by id: with two requests under one id, the server's answer to a
        # filtered `tools/list` could be taken for the answer to the `ping` beside it, and relayed unfiltered.
        ids = [id_key(m.rpc_id) for m in messages if m.rpc_id is not NO_ID and m.facts["method"] != "mcp/response"]
        if len(set(ids)) != len(ids):
            return Refused(Reason.REQUEST_AMBIGUOUS, "two requests of a JSON-RPC batch share an id")
    if not batch and (problem := _header_problem(messages[0], sent_method, sent_name)):
        return Refused(Reason.REQUEST_AMBIGUOUS, problem)
    return Inspected(tuple(messages), body, batch, value)


def _header_problem(message: Message, sent_method: str | None, sent_name: str | None) -> str | None:
    """A mirrored header (`Mcp-Method`, `Mcp-Name`: the first value of each) that disagrees with the body, or
    one a 2026-07-28 request lacks."""
    facts = message.facts
    method = facts["method"]
    version = facts["protocol_version"]
    requires = version is not None and version >= HEADER_VERSION and method != "mcp/response"
    if sent_method is None:
        if requires:
            return f"MCP {version} requires the Mcp-Method header"
    elif decode_header(sent_method) != method:
        return "Mcp-Method header disagrees with the body"
    if sent_name is None:
        if requires and method in _NAMED_BY:
            return f"MCP {version} requires the Mcp-Name header for {method}"
    elif decode_header(sent_name) != facts["name"]:
        return "Mcp-Name header disagrees with the body"
    return None
