"""What must hold for any input: the invariants both fuzzing engines check.

The atheris harnesses (fuzz/fuzz_*.py) and the hypothesis properties (tests/unit/test_fuzz_*.py) feed inputs to
the PEP's pure readers and hand each result to a `check_*` function here. A broken invariant raises
`OracleError` with what was wrong. The expectations are written from the contract (the README) and from
independent references, not from the code under test: strict JSON is re-read with the standard library, paths
are percent-decoded byte by byte, and the PDP client's answers are compared with what h11 reads from the same
bytes.

No atheris here: the unit suite imports this module from the project's main virtualenv.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import gzip
import json
import os
import re
import ssl
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from pep.decision import Reason
from pep.http1 import DEFAULT_LIMITS
from pep.pdp import Failure, Verdict
from pep.pdp.http1 import Answer, ExchangeError, Http1Client
from pep.pdp.transport import RawAnswer
from pep.protocols import NO_ID, Inspected, Refused
from pep.protocols.mcp_answer import Response, Stream, Unreadable
from pep.protocols.mcp_answer import load as load_answer
from pep.protocols.sse import SseError, SseEvent, SseReader
from pep.transport.connection import UpstreamConnection
from pep.transport.pool import _Slots


class OracleError(AssertionError):
    """An invariant does not hold for this input."""


# pep/ bugs the oracles found and whose fixes have not landed: an input that shows only such a bug is counted in
# `known_hits` instead of failing, so the fuzzers keep looking for new ones (pin each with a strict xfail test).
# Empty: the six found so far are fixed (docs/reliability.md, Fuzzing), so an input showing one again fails
# (`known` refuses a name not listed here).
KNOWN_BUGS: dict[str, str] = {}
known_hits: Counter[str] = Counter()


def known(bug: str) -> bool:
    """Count an input that shows the known bug `bug`; always True (for use in conditions)."""
    assert bug in KNOWN_BUGS
    known_hits[bug] += 1
    return True


def examples(n: int) -> int:
    """A property's example count: `n`, times PEP_FUZZ_SCALE (default 1). The unit suite stays fast; a longer
    run asks for more (`PEP_FUZZ_SCALE=50 pytest tests/unit/test_fuzz_*.py`)."""
    return n * max(1, int(os.environ.get("PEP_FUZZ_SCALE", "1")))


def require(condition: bool, what: str, *context: object) -> None:
    if not condition:
        shown = " | ".join(repr(c)[:300] for c in context)
        raise OracleError(f"{what}: {shown}" if shown else what)


# --- request integrity (pep/integrity.py, pep/authority.py) ---------------------------------------------------

MAX_DECODES = 4  # pep/integrity.py decodes a segment up to 4 times, refusing anything nested deeper
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_WELL_FORMED = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")
_CONTROL = frozenset(range(0x20)) | {0x7F}
METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
# DESIGN: "path-override headers that frameworks honour" (the list README.md gives).
PATH_OVERRIDES = frozenset(
    {
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "x-forwarded-uri",
        "x-forwarded-path",
        "x-forwarded-url",
        "x-envoy-original-path",
        "x-replaced-path",
        "x-original-path",
        "x-override-url",
        "x-http-path-override",
    }
)


def percent_decode(data: bytes) -> bytes:
    """One round of percent-decoding, byte by byte, as a server that decodes to bytes would do it."""
    return _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), data)


def decoding_layers(segment: bytes, rounds: int = MAX_DECODES) -> list[bytes]:
    """The segment as sent and after each round of decoding that still changes it (at most `rounds + 1`)."""
    layers = [segment]
    for _ in range(rounds + 1):
        decoded = percent_decode(layers[-1])
        if decoded == layers[-1]:
            break
        layers.append(decoded)
    return layers


def _is_dot(layer: bytes) -> bool:
    # `..;x` is `..` to servlet containers, which drop path parameters before normalising.
    return layer.partition(b";")[0] in (b".", b"..")


def check_path(path: str, problem: str | None) -> None:
    """An accepted path is visible ASCII without `\\` or `#`, its escapes are well-formed and encode no unreserved
    character, and no segment is (or decodes, in up to MAX_DECODES rounds, to) a dot segment, a separator or a
    control character; a segment that still changes after MAX_DECODES rounds is refused. No segment is empty (`//`,
    which nginx merges), nor empty before its parameters (`/;x/`), but the last (`/a/`)."""
    require(problem is None or (isinstance(problem, str) and bool(problem)), "path_problem answers a reason", problem)
    if problem is not None:
        return
    require(path.startswith("/"), "accepted path starts with /", path)
    require(all(0x21 <= ord(c) <= 0x7E and c not in "\\#" for c in path), "accepted path is visible ASCII", path)
    for escape in _WELL_FORMED.finditer(path):
        byte = int(escape.group(0)[1:], 16)
        require(byte not in _UNRESERVED, "accepted path has no percent-encoded unreserved character", path)
    require(path.count("%") == len(_WELL_FORMED.findall(path)), "every % in an accepted path is an escape", path)
    segments = path.split("/")
    # Empty segments, also behind parameters (`/;x/` is `//` to a servlet container): only the root and a trailing `/`.
    inner = [seg.partition(";")[0] for seg in segments[1:-1]]
    require(all(inner) and not segments[-1].startswith(";"), "accepted path has no empty segment but a last one", path)
    for segment in segments:
        layers = decoding_layers(segment.encode("ascii"))
        require(len(layers) <= MAX_DECODES + 1, "accepted segment decodes to a fixed point", path, layers)
        for layer in layers:
            require(not _is_dot(layer), "accepted path has no dot segment, raw or decoded", path, layer)
            require(b"/" not in layer and b"\\" not in layer, "accepted path has no encoded separator", path, layer)
            require(not _CONTROL.intersection(layer), "accepted path has no control character", path, layer)


def check_parameters(path: str, problem: str | None) -> None:
    """For a path `path_problem` accepts: path parameters are refused exactly when a segment holds `;` as sent or
    after any round of decoding (`%3b`, `%253b`, `%3%62`)."""
    require(problem is None or (isinstance(problem, str) and bool(problem)), "parameter_problem answers a reason")
    layers = [layer for seg in path.split("/") for layer in decoding_layers(seg.encode("ascii"))]
    expected = any(b";" in layer for layer in layers)
    require((problem is not None) == expected, "a path parameter refused exactly when present", path, problem)


def _field_name(pair: str) -> str:
    """A field's name as PHP reads it (the most lenient reader): decoded, NUL-ended, leading spaces dropped,
    ` ` and `.` as `_`, up to a `[`."""
    raw = pair.split("=", 1)[0].replace("+", " ").encode("utf-8", "surrogatepass")
    name = percent_decode(raw).decode("latin-1")
    name = name.split("\x00", 1)[0].lstrip(" ").replace(" ", "_").replace(".", "_")
    return name.split("[", 1)[0]


def check_method_field(fields: str, problem: str | None, wanted: str = "_method") -> None:
    """A `_method` field (or `wanted`: any case, `&` or `;` separated) is refused exactly when present."""
    names = [_field_name(pair) for part in fields.split("&") for pair in part.split(";")]
    expected = any(n.lower() == wanted for n in names)
    require((problem is not None) == expected, f"a {wanted} field refused exactly when present", fields, problem)


def check_query(query: str, problem: str | None) -> None:
    """The query is forwarded as sent: accepted when it is visible ASCII without `#`."""
    require(problem is None or isinstance(problem, str), "query_problem answers a reason", problem)
    if problem is None:
        require(all(0x21 <= ord(c) <= 0x7E and c != "#" for c in query), "accepted query is visible ASCII", query)
    else:
        require(query != "", "an empty query is fine", query)


def check_override(names: Sequence[str], problem: str | None) -> None:
    """Method- and path-override headers are refused, whatever their case; nothing else is."""
    expected = any(n.lower() in METHOD_OVERRIDES | PATH_OVERRIDES for n in names)
    require((problem is not None) == expected, "override header refused exactly when present", list(names), problem)


def check_authority(
    text: str,
    split: tuple[str, int | None] | None,
    resolved: tuple[str, int] | None,
    default_port: int | None,
    formatted: Callable[[str, int], str],
    resplit: Callable[[str], tuple[str, int | None] | None],
) -> None:
    """A split authority is a lower-case host and a port in range; formatting it back gives the same parts."""
    if split is None:
        require(resolved is None, "resolve refuses what split refuses", text)
        return
    host, port = split
    require(bool(host) and host == host.lower(), "host is non-empty and lower-case", text, split)
    require(not any(c in host for c in "/?#@ \t\r\n\\[]"), "host has no delimiter", text, split)
    require(port is None or 1 <= port <= 65535, "port in range", text, split)
    require(not any(c in text for c in "/?#@ \t\r\n\\"), "an authority has no path, query or user info", text)
    if port is not None or default_port is not None:
        effective = port if port is not None else default_port
        assert effective is not None
        require(resolved == (host, effective), "resolve uses the explicit port, else the default", text, resolved)
        require(resplit(formatted(host, effective)) == (host, effective), "format round-trips", text, split)
    else:
        require(resolved is None, "no port and no default: not resolved", text, resolved)


# --- strict JSON (pep/strictjson.py) --------------------------------------------------------------------------


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Duplicate(next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def container_depth(value: Any) -> int:
    """Nesting of arrays and objects: 0 for a scalar, 1 for `[]`, 2 for `[[]]`."""
    depth, level = 0, [value]
    while level := [v for v in level if isinstance(v, dict | list)]:
        depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return depth


@dataclass(frozen=True, slots=True)
class Reference:
    """What the standard library reads from the bytes: the value, or why they are not one strict JSON value."""

    value: Any
    problem: str | None


def _int64(text: str) -> int:
    """Integers are exact, and within 64 bits: a wider one would be rounded by orjson, so the PEP refuses it."""
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"integer beyond 64 bits: {text[:24]}")
    return value


def _finite(text: str) -> float:
    """A number too large for a double is not one the PEP can read (orjson refuses it as infinity)."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number beyond a double: {text[:24]}")
    return value


def _lone_surrogate(value: Any) -> bool:
    """A string (a key or a value) anywhere in `value` holding a lone surrogate: an escape like `\\ude70` that
    RFC 8259's grammar allows and I-JSON (RFC 7493) forbids; no UTF-8 text can carry one."""
    level = [value]
    while level:
        found: list[Any] = []
        for v in level:
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return True
            elif isinstance(v, dict):
                found.extend(v.keys())
                found.extend(v.values())
            elif isinstance(v, list):
                found.extend(v)
        level = found
    return False


def reference_loads(data: bytes, max_depth: int = 64) -> Reference:
    """Strict UTF-8, RFC 8259 grammar, no duplicate keys, no NaN/Infinity, integers exact and within 64 bits, no
    lone surrogate (README: strict JSON refuses it), nesting limit."""
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_int=_int64, parse_float=_finite
        )
    except _Duplicate as exc:
        return Reference(None, f"duplicate key {exc}")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return Reference(None, f"{type(exc).__name__}: {exc}"[:100])
    if _lone_surrogate(value):
        return Reference(None, "lone surrogate")
    if max_depth and container_depth(value) > max_depth:
        return Reference(None, "too deep")
    return Reference(value, None)


def _rounded_big_int(pep: Any, exact: Any) -> bool:
    """The PEP's float where the bytes hold an integer beyond 64 bits (known bug json-int-beyond-64-bits)."""
    if type(pep) is not float or type(exact) is not int or -(2**63) <= exact < 2**64:
        return False
    try:
        return pep == float(exact) and known("json-int-beyond-64-bits")
    except OverflowError:
        return False


def same_json(pep: Any, exact: Any) -> bool:
    """Equal values of equal types all the way down (1, 1.0 and True are three different values): what the PEP
    read (`pep`) and what the reference read (`exact`)."""
    if type(pep) is not type(exact):
        return _rounded_big_int(pep, exact)
    if isinstance(pep, dict):
        return pep.keys() == exact.keys() and all(same_json(pep[k], exact[k]) for k in pep)
    if isinstance(pep, list):
        return len(pep) == len(exact) and all(same_json(x, y) for x, y in zip(pep, exact, strict=True))
    return bool(pep == exact)


def check_strict(data: bytes, max_depth: int, outcome: Any, error: Exception | None) -> None:
    """`strictjson.loads` accepts only what the reference reads, and reads the same value from it."""
    ref = reference_loads(data, max_depth)
    if error is not None:
        require(isinstance(error, ValueError), "strictjson raises only JsonError", data, error)
        return
    require(ref.problem is None, "strictjson accepted bytes the reference refuses", data, ref.problem)
    require(same_json(outcome, ref.value), "strictjson and the reference read the same value", data, outcome)


def _read_outcome(read: Callable[..., Any], data: bytes, depth: int, fold: bool, scan: Any) -> Any:
    try:
        return ("value", read(data, depth, fold, 1000, scan))
    except ValueError as exc:
        # Which of two folded pairs is named first may differ (the C scan lists objects inner first).
        return (type(exc).__name__, "" if type(exc).__name__ == "FoldedKeys" else str(exc))


def check_scan(data: bytes, read: Callable[..., Any], depth: int, fold: bool, scan: Any) -> None:
    """`strictjson.read` with the C scan (`scan`) answers as without it: the same value, or the same refusal."""
    native = _read_outcome(read, data, depth, fold, scan)
    walked = _read_outcome(read, data, depth, fold, None)
    same = same_json(native[1], walked[1]) if walked[0] == native[0] == "value" else native == walked
    require(same, "the C scan decides as the walk does", data, (native, walked))


# --- body readers (pep/protocols/dispatch.py, mcp.py, openai.py) ---------------------------------------------

BODY_REFUSALS = frozenset({Reason.BODY_UNREADABLE, Reason.REQUEST_AMBIGUOUS})
NAMED_BY = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
NAMED_BY |= {"resources/subscribe": "uri", "resources/unsubscribe": "uri"}
MIRRORED = ("MCP-Protocol-Version", "Mcp-Method", "Mcp-Name")
BATCH_VERSION = "2025-03-26"
# Model calls by the last path segments (any case; "*" one segment), longest first; True where the body is read.
MODEL_ENDPOINTS = (
    ("threads/*/runs", True),
    *((e, True) for e in ("chat/completions", "images/generations", "images/edits", "images/variations")),
    *((e, True) for e in ("audio/transcriptions", "audio/translations", "audio/speech", "threads/runs")),
    ("assistants/*", True),
    ("fine_tuning/jobs", True),
    ("realtime/*", False),
    *((e, True) for e in ("completions", "embeddings", "responses", "moderations", "assistants")),
    *((e, False) for e in ("batches", "files", "uploads", "realtime")),
)
MCP_MAX_DEPTH = 64


# The keys the PEP reads, per object; a case-insensitive reader (Go's encoding/json) binds any key folding to one.
MCP_READS = ("jsonrpc", "id", "method", "params", "result", "error")
MCP_PARAMS_READS = ("name", "uri", "arguments", "_meta", "protocolVersion", "ref", "argument", "inputResponses")
MODEL_READS = ("model", "stream", "tools", "functions", "n")
MODEL_TOOL_READS = ("type", "name", "function")


def folds_together(value: Any) -> bool:
    """Some object, at any depth, has two keys equal under Unicode case folding."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if len({k.casefold() for k in item}) != len(item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def misspelled(obj: Any, reads: Sequence[str]) -> bool:
    """`obj` has a key that folds to one the PEP reads without being it."""
    folded = {r.casefold() for r in reads}
    return isinstance(obj, dict) and any(k not in reads and k.casefold() in folded for k in obj)


def _mirrored(value: str) -> str | None:
    if value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    return value


def _refusal(result: Inspected | Refused, allowed: frozenset[Reason]) -> bool:
    require(isinstance(result, Inspected | Refused), "an Inspected or a Refused", result)
    if isinstance(result, Refused):
        require(result.reason in allowed, "refused with a reason from the closed set", result)
        require(isinstance(result.detail, str) and bool(result.detail), "a refusal says why", result)
        return True
    return False


MAX_BATCH_MESSAGES = 16  # the route default
MAX_JSON_VALUES = 10_000  # the route default


def _values(value: Any) -> int:
    """Object members and array elements at any depth (what `max_json_values` bounds), counted on its own."""
    if isinstance(value, dict):
        return len(value) + sum(_values(v) for v in value.values())
    if isinstance(value, list):
        return len(value) + sum(_values(v) for v in value)
    return 0


def check_mcp(body: bytes, headers: CIMultiDict[str], result: Inspected | Refused) -> None:
    """An accepted MCP body is one strict JSON-RPC 2.0 message, or a non-empty batch of at most
    MAX_BATCH_MESSAGES decided as one message per element, with facts taken from that element; mirrored headers
    agree with the body. Only such an over-long batch, or a body of more than MAX_JSON_VALUES values, is
    `body_too_large`."""
    if _refusal(result, BODY_REFUSALS | {Reason.BODY_TOO_LARGE}):
        if isinstance(result, Refused) and result.reason is Reason.BODY_TOO_LARGE:
            value = reference_loads(body, MCP_MAX_DEPTH).value
            long_batch = isinstance(value, list) and len(value) > MAX_BATCH_MESSAGES
            require(long_batch or _values(value) > MAX_JSON_VALUES, "too large: a long batch or many values", body)
        return
    assert isinstance(result, Inspected)
    ref = reference_loads(body, MCP_MAX_DEPTH)
    require(ref.problem is None, "MCP body accepted that the reference refuses", body, ref.problem)
    require(result.body == body, "the decided body is the body read", body)
    value = ref.value
    require(not folds_together(value), "no keys equal under case folding anywhere", body)
    batch = isinstance(value, list)
    require(result.batch == batch, "batch flag matches the body", body)
    items = value if batch else [value]
    require(len(items) <= MAX_BATCH_MESSAGES, "a batch over max_batch_messages is refused", body)
    for item in items:
        params = item.get("params") if isinstance(item, dict) else None
        spelled = not misspelled(item, MCP_READS) and not misspelled(params, MCP_PARAMS_READS)
        require(spelled, "the keys the PEP reads are spelled exactly", item)
    require(len(items) >= 1 and len(result.messages) == len(items), "one message per batch element", body)
    for name in MIRRORED:
        require(len(headers.getall(name, ())) <= 1, "a repeated mirrored header is refused", name)
    if batch:
        require("Mcp-Method" not in headers and "Mcp-Name" not in headers, "no mirrored headers on a batch", body)
        require(headers.get("MCP-Protocol-Version") in (None, BATCH_VERSION), "batches only in 2025-03-26", body)
    for message, item in zip(result.messages, items, strict=True):
        require(message.key == "mcp", "MCP facts", message)
        require(isinstance(item, dict) and item.get("jsonrpc") == "2.0", "each element is JSON-RPC 2.0", item)
        if "id" in item:
            require(same_json(message.rpc_id, item["id"]), "the element's id", item, message.rpc_id)
            require(isinstance(item["id"], str | int | None) and not isinstance(item["id"], bool), "id type", item)
        else:
            require(message.rpc_id is NO_ID, "a notification has no id", item)
        facts = message.facts
        method = item.get("method")
        params = item.get("params")
        if method is None:
            require(facts["method"] == "mcp/response", "a response is mcp/response", item, facts)
            require("id" in item and (("result" in item) != ("error" in item)), "a response has id and one of", item)
            continue
        require(isinstance(method, str) and bool(method) and facts["method"] == method, "method is named", item)
        field = NAMED_BY.get(method)
        named = params.get(field) if isinstance(params, dict) and field else None
        if method == "completion/complete" and isinstance(params, dict) and isinstance(params.get("ref"), dict):
            ref = params["ref"]
            named = ref.get({"ref/prompt": "name", "ref/resource": "uri"}.get(ref.get("type"), ""))
        require(facts["name"] == named, "name is params.name or params.uri (a completion's params.ref)", item, facts)
        arguments = params.get("arguments") if isinstance(params, dict) else None
        require(same_json(facts["arguments"], arguments), "arguments are params.arguments", item, facts)
        require(arguments is None or isinstance(arguments, dict), "arguments are an object", item)
        if not batch:
            sent_method, sent_name = headers.get("Mcp-Method"), headers.get("Mcp-Name")
            require(sent_method is None or _mirrored(sent_method) == method, "Mcp-Method agrees", item, sent_method)
            require(sent_name is None or _mirrored(sent_name) == named, "Mcp-Name agrees", item, sent_name)


MAX_TOOLS = 1024  # tools and functions of one model call


def check_openai(body: bytes, result: Inspected | Refused) -> None:
    """An accepted model call is a strict JSON object with a non-empty model, a boolean stream, named tools, at
    most MAX_TOOLS of them; only more is `body_too_large`."""
    if _refusal(result, BODY_REFUSALS | {Reason.BODY_TOO_LARGE}):
        if isinstance(result, Refused) and result.reason is Reason.BODY_TOO_LARGE:
            obj = reference_loads(body).value
            declared = [obj.get(k) for k in ("tools", "functions")] if isinstance(obj, dict) else []
            count = sum(len(t) for t in declared if isinstance(t, list))
            require(count > MAX_TOOLS, "too large: more than MAX_TOOLS tools and functions", body)
        return
    assert isinstance(result, Inspected)
    ref = reference_loads(body)
    require(ref.problem is None and isinstance(ref.value, dict), "model body accepted that the reference refuses", body)
    obj = ref.value
    require(not folds_together(obj), "no keys equal under case folding anywhere", body)
    listed_tools = [t for k in ("tools", "functions") if isinstance(obj.get(k), list) for t in obj[k]]
    spelled = not misspelled(obj, MODEL_READS) and not any(misspelled(t, MODEL_TOOL_READS) for t in listed_tools)
    require(spelled, "the keys the PEP reads are spelled exactly", obj)
    require(result.body == body and len(result.messages) == 1, "one message, the body read", body)
    facts = result.messages[0].facts
    require(result.messages[0].key == "model", "model facts", result)
    model = obj["model"]
    require(isinstance(model, str) and bool(model) and facts["name"] == model, "model name", obj)
    require(same_json(facts["stream"], obj.get("stream", False)), "stream is the body's boolean", obj, facts)
    tools = facts["tools"]
    require(isinstance(tools, list) and all(isinstance(t, str) for t in tools), "tool names are strings", facts)
    listed = [obj.get(k) for k in ("tools", "functions") if obj.get(k) is not None]
    require(len(tools) == sum(len(t) for t in listed), "one name per tool and function", obj, facts)


def invokes_model(method: str, path: str) -> bool:
    """A POST whose last path segments (path parameters and empty segments aside, in any letter case) name a
    model endpoint whose body names the model (the longest match decides)."""
    if method != "POST":
        return False
    segments = [s.lower() for s in (s.partition(";")[0] for s in path.split("/")) if s]
    for pattern, read in MODEL_ENDPOINTS:
        wanted = pattern.split("/")
        tail = segments[-len(wanted) :] if len(segments) >= len(wanted) else None
        if tail is not None and all(w in ("*", t) for w, t in zip(wanted, tail, strict=True)):
            return read
    return False


def check_dispatch(
    protocol: str,
    filter_tools_list: bool,
    method: str,
    path: str,
    headers: Mapping[str, str],
    has_body: bool,
    early: Inspected | Refused | None,
) -> None:
    """A body is read and inspected whenever the route's protocol decides on it: no body of an MCP route, and
    no model call on an OpenAI route, reaches the upstream on its HTTP facts alone; an encoded body is never
    inspected (the PEP would decide on other bytes than the upstream reads)."""
    resumes = "Last-Event-ID" in headers
    repeated = isinstance(headers, CIMultiDict) and len(headers.getall("Last-Event-ID", [])) > 1
    if protocol == "mcp" and resumes and (method != "GET" or repeated):
        require(isinstance(early, Refused), "only a GET resumes an MCP stream", method, headers, early)
    form = method == "POST" and has_body and is_form(headers)
    if early is None:
        inspected = (protocol == "mcp" and method == "POST") or (protocol == "openai" and invokes_model(method, path))
        require(inspected or form, "only inspected routes and form POSTs are read", protocol, method, path)
        encoding = headers.get("Content-Encoding")
        if inspected:
            require(encoding is None or encoding.strip().lower() in ("", "identity"), "no encoded body is read")
        return
    if _refusal(early, BODY_REFUSALS):
        return
    assert isinstance(early, Inspected)
    require(early.body is None, "no body bytes decided before the body is read", early)
    if protocol == "mcp":
        require(not has_body, "an MCP body is never forwarded undecided", method, path)
        require(method != "POST", "an MCP POST is always read", method, path)
        (message,) = early.messages
        require(message.key == "mcp" and str(message.facts["method"]).startswith("mcp/"), "an MCP action", early)
    elif protocol == "openai":
        require(not invokes_model(method, path), "a model call is always read", method, path)
        if method == "POST":
            (message,) = early.messages
            facts = message.facts
            require(message.key == "model" and facts["read"] is False, "an unread POST is an unread model call", early)
            require(facts["name"] is None, "an unread model call names no model", early)
    require(not form, "a form POST is read (for a _method field)", protocol, method, headers)


def is_form(headers: Mapping[str, str]) -> bool:
    """A body Rack reads as a form: no Content-Type, or (any of them) urlencoded."""
    values = list(headers.getall("Content-Type", ())) if isinstance(headers, CIMultiDict) else []
    return not values or any("x-www-form-urlencoded" in v.lower() or not v.strip() for v in values)


def check_form(body: bytes, result: Inspected | Refused, unread_model: bool = False) -> None:
    """A form body is forwarded as read, one plain message (on an openai route: an unread model call's), unless it
    holds a `_method` field."""
    if _refusal(result, frozenset({Reason.REQUEST_AMBIGUOUS})):
        check_method_field(body.decode("latin-1"), "refused")
        return
    assert isinstance(result, Inspected)
    require(result.body == body and len(result.messages) == 1, "the form body as read, one message", body)
    message = result.messages[0]
    if unread_model:
        unread = message.key == "model" and message.facts["read"] is False and message.facts["name"] is None
        require(unread, "an unread model call's facts, none from the form", result)
    else:
        require(message.key is None, "no facts from a form", result)
    check_method_field(body.decode("latin-1"), None)


def check_model_call(body: bytes, headers: Mapping[str, str], result: Inspected | Refused) -> None:
    """A model call read through dispatch: as `check_openai`, and a body a framework may read as a form (no
    Content-Type, or an urlencoded one) is accepted only without a `_method` field."""
    check_openai(body, result)
    if isinstance(result, Inspected) and is_form(headers):
        check_method_field(body.decode("latin-1"), None)


# --- PDP answers (pep/pdp/answer.py, opa.py, authzen.py) -----------------------------------------------------

# Content types a PDP might send beside the usual one, for both fuzzers: near misses of application/json.
ODD_CONTENT_TYPES = (
    "application/json; charset=utf-8",
    "Application/JSON",
    " application/json ;x=1",
    "application/problem+json",
    "application/+json",
    "application/jsonx",
    "text/json",
    "text/plain",
    "",
)

_MISSING: Any = object()


def is_json_media(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        return True
    top, _, sub = media.partition("/")
    return top == "application" and sub.endswith("+json") and len(sub) > len("+json")


def answer_object(answer: RawAnswer) -> tuple[Reason, dict[str, Any]] | Reason:
    """README, "PDPs" (how an answer becomes a reason), before the PDP kind's own fields: the object, or a reason."""
    if not 200 <= answer.status < 300:
        return Reason.PDP_ERROR_STATUS
    if answer.oversize or answer.undecodable or not is_json_media(answer.content_type):
        return Reason.PDP_MALFORMED
    ref = reference_loads(answer.body)
    if ref.problem is not None or not isinstance(ref.value, dict):
        return Reason.PDP_MALFORMED
    return Reason.ALLOWED, ref.value


def opa_expected(answer: RawAnswer) -> Reason:
    """OPA: allow iff `result` is true, or an object whose `allow` is true (headers, if any, an object of strings)."""
    read = answer_object(answer)
    if isinstance(read, Reason):
        return read
    result = read[1].get("result", _MISSING)
    if result is _MISSING:
        return Reason.PDP_UNDEFINED
    if isinstance(result, bool):
        return Reason.ALLOWED if result else Reason.POLICY_DENIED
    if not isinstance(result, dict):
        return Reason.PDP_MALFORMED
    allow = result.get("allow", _MISSING)
    if allow is _MISSING:
        return Reason.PDP_UNDEFINED
    if not isinstance(allow, bool):
        return Reason.PDP_MALFORMED
    if "approval" in result:  # README "Approvals": only on a deny, {approver, message?} and nothing else
        if allow or not _approval_ok(result["approval"], ("approver", "message")):
            return Reason.PDP_MALFORMED
        return Reason.APPROVAL_REQUIRED
    if not allow:
        return Reason.POLICY_DENIED
    if "credential" in result and not _narrowing_ok(result["credential"]):
        return Reason.PDP_MALFORMED
    headers = result.get("headers")
    if headers is not None and not (isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values())):
        return Reason.PDP_MALFORMED
    return Reason.ALLOWED


def _scope_token(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 256 and all("!" <= ch <= "~" for ch in value)


def _narrowing_ok(value: Any) -> bool:
    """README "Just-in-time credentials": `{audience?, scopes?}`, scopes distinct scope tokens (at most 64)."""
    if not isinstance(value, dict) or not set(value) <= {"audience", "scopes"}:
        return False
    audience, scopes = value.get("audience"), value.get("scopes")
    if audience is not None and not _scope_token(audience):
        return False
    if scopes is None:
        return True
    return (
        isinstance(scopes, list)
        and len(scopes) <= 64
        and all(_scope_token(x) for x in scopes)
        and len(set(scopes)) == len(scopes)
    )


def _approver_ok(value: Any) -> bool:
    """A non-empty printable string of at most 256 characters, without surrounding white space."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 256
        and value == value.strip()
        and all(ch.isprintable() for ch in value)
    )


def _message_ok(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= 1024)


def _approval_ok(value: Any, keys: tuple[str, ...]) -> bool:
    return (
        isinstance(value, dict)
        and set(value) <= set(keys)
        and _approver_ok(value.get("approver"))
        and (_message_ok(value.get("message")))
    )


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z")


def _date_time_in_range(text: str) -> bool:
    """Every field of an RFC 3339 date-time within its range (no leap second: Python cannot hold one)."""
    year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
    hour, minute, second = int(text[11:13]), int(text[14:16]), int(text[17:19])
    if not (year >= 1 and 1 <= month <= 12) or not 1 <= day <= calendar.monthrange(year, month)[1]:
        return False
    if hour > 23 or minute > 59 or second > 59:
        return False
    offset = text[-6:]
    return text[-1] in "Zz" or (int(offset[1:3]) <= 23 and int(offset[4:6]) <= 59)


def _access_request_ok(value: Any) -> bool:
    """ARAP's requestable denial as the README reads it: `approver`, an RFC 3339 `expires_at`, an optional
    `display` object whose description (else title) is the message; other members are ignored."""
    if not isinstance(value, dict) or not _approver_ok(value.get("approver")):
        return False
    expires = value.get("expires_at")
    if not isinstance(expires, str) or not _RFC3339.match(expires) or not _date_time_in_range(expires):
        return False
    display = value.get("display")
    if display is None:
        return True
    if not isinstance(display, dict):
        return False
    text = display.get("description") if display.get("description") is not None else display.get("title")
    return _message_ok(text)


def authzen_decision_expected(obj: Any) -> Reason:
    """AuthZEN: allow iff `decision` is true and there are no obligations the PEP would have to carry out."""
    if not isinstance(obj, dict):
        return Reason.PDP_MALFORMED
    if "decision" not in obj:
        return Reason.PDP_UNDEFINED
    decision, context = obj["decision"], obj.get("context")
    if not isinstance(decision, bool) or (context is not None and not isinstance(context, dict)):
        return Reason.PDP_MALFORMED
    if context and context.get("access_request") is not None:
        if decision or not _access_request_ok(context["access_request"]):
            return Reason.PDP_MALFORMED
        return Reason.APPROVAL_REQUIRED
    if not decision:
        return Reason.POLICY_DENIED
    obligations = context.get("obligations") if context else None
    if obligations not in (None, []):
        return Reason.OBLIGATION_UNSUPPORTED
    if context and context.get("credential") is not None and not _narrowing_ok(context["credential"]):
        return Reason.PDP_MALFORMED
    return Reason.ALLOWED


def _authzen_object(answer: RawAnswer, request_id: str) -> dict[str, Any] | Reason:
    read = answer_object(answer)
    if isinstance(read, Reason):
        return read
    if answer.request_id is not None and answer.request_id != request_id:
        return Reason.PDP_MALFORMED  # an echoed X-Request-ID that differs
    return read[1]


def authzen_expected(answer: RawAnswer, request_id: str) -> Reason:
    obj = _authzen_object(answer, request_id)
    return obj if isinstance(obj, Reason) else authzen_decision_expected(obj)


def authzen_batch_expected(answer: RawAnswer, request_id: str, count: int) -> list[Reason]:
    obj = _authzen_object(answer, request_id)
    if isinstance(obj, Reason):
        return [obj] * count
    results = obj.get("evaluations")
    if not isinstance(results, list) or len(results) > count:
        return [Reason.PDP_MALFORMED] * count
    return [authzen_decision_expected(r) for r in results] + [Reason.PDP_UNDEFINED] * (count - len(results))


def check_verdict(expected: Reason, outcome: Verdict | Failure, context: object) -> None:
    """The outcome is allow exactly when the contract says so, with the contract's reason."""
    require(isinstance(outcome, Verdict | Failure), "a Verdict or a Failure", outcome)
    allowed = isinstance(outcome, Verdict) and outcome.allow
    require(allowed == (expected is Reason.ALLOWED), "allow exactly on the documented allow shapes", context, outcome)
    require(outcome.reason is expected, "the documented reason", context, expected, outcome)
    if isinstance(outcome, Verdict):
        require(outcome.allow == (outcome.reason is Reason.ALLOWED), "a Verdict allows iff its reason is allowed")
    else:
        require(not outcome.retryable or outcome.reason is Reason.PDP_ERROR_STATUS, "only statuses retry", outcome)


def check_opa(answer: RawAnswer, outcome: Verdict | Failure) -> None:
    check_verdict(opa_expected(answer), outcome, answer)
    if isinstance(outcome, Verdict) and outcome.allow:
        result = reference_loads(answer.body).value["result"]
        headers = result.get("headers") if isinstance(result, dict) else None
        require(outcome.headers == tuple((headers or {}).items()), "obligation headers as the PDP sent them", answer)


def check_authzen(answer: RawAnswer, request_id: str, outcome: Verdict | Failure) -> None:
    check_verdict(authzen_expected(answer, request_id), outcome, (answer, request_id))


def check_authzen_batch(answer: RawAnswer, request_id: str, count: int, outcomes: Sequence[Verdict | Failure]) -> None:
    expected = authzen_batch_expected(answer, request_id, count)
    require(len(outcomes) == count, "one result per evaluation", answer, count, outcomes)
    for reason, outcome in zip(expected, outcomes, strict=True):
        check_verdict(reason, outcome, (answer, request_id, count))


# --- the PDP's HTTP/1.1 client (pep/pdp/http1.py) -------------------------------------------------------------

URL = "http://pdp/v1/data/pep/authz"
_TLS = ssl.create_default_context()  # unused (an http URL), made once: a client would make one per exchange


class _Transport:
    """Stands in for the event loop's socket transport: `abort` closes it and reports the loss on the next turn,
    and once closed it delivers nothing more, as asyncio's and uvloop's transports do."""

    def __init__(self, protocol: UpstreamConnection) -> None:
        self.protocol = protocol
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


def _connected(client: Http1Client) -> tuple[UpstreamConnection, _Transport]:
    """A connection of the client's own pool to the PDP's origin, over the stand-in transport, idle and ready
    for the next exchange (the client takes it as it would take any kept-alive connection)."""
    pool = client._pool
    loop = asyncio.get_running_loop()
    pool._loop = loop
    origin = client.target("POST", URL).origin
    slots = pool._origins[origin] = _Slots()
    slots.open = 1
    conn = UpstreamConnection(loop, DEFAULT_LIMITS, None, 262144, lambda: pool._gone(slots, conn))
    transport = _Transport(conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.park(loop.time() + 60)
    slots.idle.append(conn)
    return conn, transport


@dataclass(frozen=True, slots=True)
class Exchange:
    """How one exchange ended: an Answer, an error (raised by the exchange), still waiting, or an exception that
    escaped the protocol's callbacks into the event loop (never allowed)."""

    answer: Answer | None
    error: BaseException | None
    escaped: BaseException | None
    pending: bool


async def exchange(chunks: Sequence[bytes], eof: bool, limit: int) -> Exchange:
    """Feed a server's bytes, read by read, to one exchange of the PDP client (a POST of `{}`) over its pool's
    connection; then the server closes the connection (`eof`) or not."""
    client = Http1Client(limit, 1, _TLS, "")
    conn, transport = _connected(client)
    task = asyncio.ensure_future(client.exchange("POST", URL, b"{}", {}))
    await asyncio.sleep(0)
    escaped: BaseException | None = None
    for chunk in chunks:
        if transport.closed:
            break
        try:
            conn.data_received(chunk)
        except Exception as exc:  # a real transport logs a fatal error and closes the connection with it
            escaped = exc
            transport.closed = True
            conn.connection_lost(exc)
            break
        await asyncio.sleep(0)
    if eof and not transport.closed:
        transport.closed = True
        conn.connection_lost(None)
    for _ in range(3):
        await asyncio.sleep(0)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Exchange(None, None, escaped, True)
    error = task.exception()
    return Exchange(None if error is not None else task.result(), error, escaped, False)


@dataclass(frozen=True, slots=True)
class H11Reading:
    """What h11 reads from the same bytes: the final response, its body, and whether it was complete."""

    status: int | None
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool
    error: str | None
    interim_headers: bool = False  # a 1xx answer before it carried headers
    trailing: bytes = b""  # bytes after the end of the final response


_STATUS_LINE = re.compile(rb"(HTTP/[0-9]\.[0-9] ([0-9]{3}))( [^\r\n]*)?\r\n")
_HEADER_LINES = re.compile(rb"(?:[^\r\n]+\r\n)*\r\n")


def _without_transfer_encoding(data: bytes) -> bytes:
    if data.startswith(b"\r\n"):
        return data
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    lines = data[:end].split(b"\r\n")
    kept = [line for line in lines if not line.lower().startswith(b"transfer-encoding:")]
    return b"".join(line + b"\r\n" for line in kept) + b"\r\n" + data[end + 4 :]


def as_h11_reads_it(data: bytes) -> bytes:
    """The bytes with leniencies of llhttp that make nothing ambiguous undone, so that h11 (strict there) reads
    the same messages: empty lines before a status line (RFC 9112 2.2 asks servers to ignore them before a request
    line) are dropped, each reason phrase (never read by the PEP, and which llhttp lets hold a NUL) becomes `R`,
    and a 204 or 304 answer loses a Transfer-Encoding field (it has no body either way)."""
    out = b""
    while True:
        data = data.lstrip(b"\r\n")
        line = _STATUS_LINE.match(data)
        if line is None:
            return out + data
        out += line.group(1) + b" R\r\n"
        data = data[line.end() :]
        if line.group(2) in (b"204", b"304"):  # no body, whatever its framing says (RFC 9112 6.3): h11 reads
            return out + _without_transfer_encoding(data)  # only chunked, llhttp ignores the field
        if not line.group(2).startswith(b"1"):  # the final answer: the rest is its headers and body
            return out + data
        head = _HEADER_LINES.match(data)  # an interim answer: headers only, then the next status line
        if head is None:
            return out + data
        out, data = out + head.group(0), data[head.end() :]


def h11_reading(data: bytes, eof: bool) -> H11Reading:
    import h11

    data = as_h11_reads_it(data)

    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "pdp"), ("Content-Length", "2")]))
    conn.send(h11.Data(data=b"{}"))
    conn.send(h11.EndOfMessage())
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = []
    body: list[bytes] = []
    interim_headers = False
    try:
        conn.receive_data(data)
        if eof:
            conn.receive_data(b"")
        while True:
            event = conn.next_event()
            if isinstance(event, h11.InformationalResponse):
                interim_headers = interim_headers or bool(event.headers)
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                trailing = conn.trailing_data[0]
                return H11Reading(status, headers, b"".join(body), True, None, interim_headers, trailing)
            elif event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return H11Reading(status, headers, b"".join(body), False, None, interim_headers)
    except h11.RemoteProtocolError as exc:
        return H11Reading(status, headers, b"".join(body), False, str(exc), interim_headers)


UNDECODABLE = b"<undecodable>"
OVERSIZE = b"<oversize>"
_ONE_STREAM = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}


def reference_decoding(headers: list[tuple[bytes, bytes]], body: bytes, limit: int) -> bytes:
    """The body as the contract reads it under its Content-Encoding: every field is one list of codings (RFC 9110
    8.4); `identity` and empty members change nothing; exactly one of gzip, x-gzip, deflate is undone, and the body
    must then be one whole stream with nothing after it (a second gzip member is trailing data, as for JSON);
    anything else is UNDECODABLE. More than `limit` bytes once decoded is OVERSIZE."""
    codings = [c.strip(b" \t") for k, v in headers if k == b"content-encoding" for c in v.lower().split(b",")]
    codings = [c for c in codings if c not in (b"", b"identity")]
    if not codings:
        return body
    if len(codings) > 1 or codings[0] not in _ONE_STREAM:
        return UNDECODABLE
    d = zlib.decompressobj(_ONE_STREAM[codings[0]])
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error:
        return UNDECODABLE
    if len(out) > limit:
        return OVERSIZE
    if not d.eof or d.unused_data:
        return UNDECODABLE
    if codings[0] != b"deflate":  # the standard library's own reading of the gzip file agrees on the content
        require(gzip.decompress(body) == out, "one gzip member reads the same through the gzip module", body)
    return out


def _last(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    values = [v for k, v in headers if k == name]
    return values[-1] if values else None


def check_exchange(data: bytes, eof: bool, limit: int, result: Exchange) -> None:
    """Any bytes end in an Answer, an ExchangeError or nothing yet: no other exception. A 2xx Answer only comes
    from a complete, valid response (as h11 reads it), and carries that response's status, headers and body."""
    require(result.escaped is None, "no exception escapes the protocol callbacks", data, result.escaped)
    if result.error is not None:
        require(isinstance(result.error, ExchangeError), "an exchange fails with ExchangeError", data, result.error)
    answer = result.answer
    if answer is None or not 200 <= answer.status < 300:
        return
    reading = h11_reading(data, eof)
    if answer.oversize:  # reported as soon as it is known, without reading the rest; never allowed (malformed)
        return
    if reading.error == "Only Transfer-Encoding: chunked is supported":
        # A coding other than chunked (or beside it) is not undone by the client: never read as the body.
        require(answer.undecodable, "a transfer coding other than chunked is not read as the body", data, answer)
        return
    require(reading.status == answer.status, "the final response's status", data, reading.status, answer.status)
    require(reading.complete, "a 2xx answer only from a complete response", data, eof, reading)
    # llhttp keeps the trailing whitespace of a field value, h11 drops it (RFC 9110 5.5): both are compared without.
    content_type = _last(reading.headers, b"content-type")
    expected_type = content_type.decode("latin-1") if content_type is not None else ""
    request_id = _last(reading.headers, b"x-request-id")
    expected_id = request_id.decode("latin-1") if request_id is not None else None
    got_type = answer.content_type.rstrip(" \t")
    got_id = answer.request_id.rstrip(" \t") if answer.request_id is not None else None
    require(got_type == expected_type, "the final response's content type", data, answer.content_type)
    require(got_id == expected_id, "the final response's X-Request-ID", data, answer.request_id)
    expected = reference_decoding(reading.headers, reading.body, limit)
    if expected is UNDECODABLE:
        require(answer.undecodable, "a body that is not one whole stream of one known coding is undecodable", data)
    elif expected is OVERSIZE:
        require(answer.oversize, "a body that decodes to more than the limit is oversize", data)
    elif not answer.undecodable:  # refusing more is always safe (a 204 with an odd Transfer-Encoding, say)
        require(answer.body == expected, "the final response's (decoded) body", data, answer.body, expected)
        require(len(answer.body) <= limit, "the body is within the limit", data)


# --- answer streams (pep/protocols/sse.py, mcp_answer.py) ---------------------------------------------------------


@dataclass(frozen=True)
class RefEvent:
    data: str | None
    event: str
    id: str | None
    retry: int | None


def reference_sse(stream: bytes) -> list[RefEvent] | None:
    """The WHATWG EventSource field rules on the decoded text (None: not UTF-8), every event with any line returned
    (data or not), the last one even without a blank line: what the PEP must see, by a second reading."""
    try:
        text = stream.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.removeprefix("\ufeff")
    events: list[RefEvent] = []
    lines: list[str] = []

    def dispatch() -> None:
        data: list[str] = []
        kind, event_id, retry = "", None, None
        for line in lines:
            if line.startswith(":"):
                continue
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                kind = value
            elif name == "id" and "\0" not in value:
                event_id = value
            elif name == "retry" and value and all(c in "0123456789" for c in value):
                retry = int(value)
        events.append(RefEvent("\n".join(data) if data else None, kind or "message", event_id, retry))
        lines.clear()

    for line in re.split("\r\n|\r|\n", text):
        if line:
            lines.append(line)
        elif lines:
            dispatch()
    if lines:
        dispatch()
    return events


def check_sse(stream: bytes, whole: list[Any] | None, chunked: list[Any] | None) -> None:
    """The reader's events are the reference's, whatever the chunking; what is not UTF-8 is an error."""
    expected = reference_sse(stream)
    require(whole == chunked, "chunking never changes the events", stream, whole, chunked)
    if expected is None:
        require(whole is None, "a stream that is not UTF-8 is unreadable", stream, whole)
        return
    require(whole is not None, "a UTF-8 stream is read", stream)
    assert whole is not None
    got = [RefEvent(e.data.decode() if e.data is not None else None, e.event, e.id, e.retry) for e in whole]
    require(got == expected, "the events are the EventSource algorithm's", stream, got, expected)


def read_sse(stream: bytes, size: int) -> list[SseEvent] | None:
    """The events of `stream` fed in pieces of `size` bytes, or None when the reader refuses it."""
    reader = SseReader()
    events: list[SseEvent] = []
    try:
        for at in range(0, len(stream), size):
            events += reader.feed(stream[at : at + size])
        return events + reader.finish()
    except SseError:
        return None


def check_answer_stream(size: int, stream: bytes) -> None:
    """One stream through the SSE reader (whole and in pieces) and each event's JSON through an MCP answer that
    has one request pending (id 1)."""
    whole = read_sse(stream, max(len(stream), 1))
    check_sse(stream, whole, read_sse(stream, size))
    answer = Stream([(1, "tools/list")])
    for event in whole or ():
        if event.data is None:
            continue
        try:
            value = load_answer(event.data)
            result = answer.read(value)
        except Unreadable:
            continue
        check_mcp_answer(value, result, 1)
        for message in result:
            if isinstance(message, Response):
                answer.answered(message.rpc_id)


def check_mcp_answer(value: Any, result: list[Any] | None, pending: int) -> None:
    """A response passes only when it answers the pending request by its exact id (an int, `pending`), once; on
    anything else the answer is unreadable."""
    if result is None:
        return
    responses = [m for m in result if isinstance(m, Response) and m.rpc_id is not None]
    require(len(responses) <= 1, "a request is answered once", value, result)
    for response in responses:
        require(type(response.rpc_id) is int and response.rpc_id == pending, "the pending id exactly", value)
