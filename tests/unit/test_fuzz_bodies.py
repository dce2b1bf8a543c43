"""The body readers for any bytes, against fuzz/oracles.py (shared with the atheris harness fuzz/fuzz_bodies.py):
pep/protocols/dispatch.py on a route of each protocol, mcp.py and openai.py behind it, and pep/strictjson.py.

- Any request gets an Inspected or a Refused with a reason from the closed set, never an exception; a body that
  the route's protocol decides on is always read (nothing reaches the upstream on its HTTP facts alone).
- What is accepted is what the standard library reads strictly from the same bytes (same values, same types).
- A duplicate key anywhere, however it is spelled (`"a"` and `"\\u0061"`), is refused; so are two keys equal
  under case folding (`name` and `Name`, `s` and U+017F), as `request_ambiguous`.
- A JSON-RPC batch is one message per element, each with that element's facts.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from fuzz.oracles import (
    check_dispatch,
    check_form,
    check_mcp,
    check_model_call,
    check_openai,
    check_strict,
    examples,
    invokes_model,
)
from pep import strictjson
from pep.config import RouteConfig
from pep.decision import Reason
from pep.protocols import Inspected, Refused, dispatch, mcp, openai

KEYS = st.sampled_from(["a", "b", "id", "name", "é", "\u2028", "😀", "", "Name", "\u212a"])
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.integers(2**64 - 2, 2**66)  # beyond 64 bits too (a known bug, counted by the oracle)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=10,
)
METHODS = st.sampled_from(["tools/call", "prompts/get", "resources/read", "resources/subscribe", "initialize", "ping"])
PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=4) | JSON,
        "uri": st.text(max_size=4) | JSON,
        "arguments": st.dictionaries(KEYS, JSON, max_size=3) | JSON,
        "_meta": st.fixed_dictionaries(
            {"io.modelcontextprotocol/protocolVersion": st.sampled_from(["2025-03-26", "2025-06-18", "2026-07-28"])}
        ),
        "protocolVersion": st.sampled_from(["2025-03-26", "2026-07-28"]),
    },
)
MESSAGE = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0") | JSON},
    optional={
        "id": st.integers(-3, 3) | st.text(max_size=3) | st.none() | JSON,
        "method": METHODS | JSON,
        "params": PARAMS | JSON,
        "result": JSON,
        "error": JSON,
    },
)
# Mostly well-formed: most examples are accepted, so the facts are checked and not only the refusals.
NEAR_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=4),
        "uri": st.text(max_size=4),
        "arguments": st.dictionaries(KEYS, JSON, max_size=3),
        "_meta": st.fixed_dictionaries({"io.modelcontextprotocol/protocolVersion": st.just("2025-03-26")}),
    },
)
NEAR = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"), "method": METHODS},
    optional={"id": st.integers(-3, 3) | st.text(max_size=3) | st.none(), "params": NEAR_PARAMS},
)
RESPONSE = st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "id": st.integers(0, 3), "result": JSON})
RPC = (
    NEAR
    | NEAR
    | RESPONSE
    | st.lists(NEAR | RESPONSE, min_size=1, max_size=4)
    | st.lists(NEAR | MESSAGE, max_size=4)
    | MESSAGE
    | JSON
)
NEAR_MODEL_CALL = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-x", "m"])},
    optional={
        "stream": st.booleans(),
        "tools": st.lists(
            st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": KEYS})})
            | st.fixed_dictionaries({"type": st.sampled_from(["web_search", "file_search"])}),
            max_size=3,
        ),
        "functions": st.lists(st.fixed_dictionaries({"name": KEYS}), max_size=2),
        "messages": st.lists(JSON, max_size=2),
    },
)
MODEL_CALL = NEAR_MODEL_CALL | st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["gpt-x", ""]) | JSON,
        "stream": st.booleans() | JSON,
        "tools": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "type": st.sampled_from(["function", "web_search"]) | JSON,
                    "name": st.sampled_from(["f", "g"]) | JSON,
                    "function": st.fixed_dictionaries({}, optional={"name": st.sampled_from(["f", "g"]) | JSON}) | JSON,
                },
            )
            | JSON,
            max_size=3,
        )
        | JSON,
        "functions": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["f", "h"]) | JSON}), max_size=2),
    },
)
MIRRORED: st.SearchStrategy[dict[str, str]] = st.just({}) | st.dictionaries(
    st.sampled_from(
        ["MCP-Protocol-Version", "Mcp-Method", "Mcp-Name", "Content-Encoding", "Last-Event-ID", "Content-Type"]
    ),
    st.sampled_from(["2025-03-26", "2026-07-28", "tools/call", "ping", "f", "", "gzip", "identity", " Identity "])
    | st.sampled_from(["=?base64?dG9vbHMvY2FsbA==?=", "=?base64?@?=", "=?base64??="])
    | st.sampled_from(["application/json", "Application/X-WWW-Form-Urlencoded; charset=utf-8", "text/plain"]),
    max_size=3,
)


def dumps(value: Any) -> bytes:
    """Compact JSON like orjson's, but integers of any size (orjson cannot write those beyond 64 bits)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


@st.composite
def bodies(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    """Valid JSON of the shape, sometimes damaged: cut, extended, re-spaced or with a byte changed."""
    data = dumps(draw(values))
    how = draw(st.sampled_from(["as is", "as is", "as is", "as is", "spaced", "cut", "extra", "byte"]))
    if how == "spaced":
        return b" \n" + data.replace(b",", b" ,\t").replace(b":", b": ") + b"\r\n"
    if how == "cut" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "extra":
        return data + draw(st.sampled_from([b"x", b"{}", b",", b"\x00", b" 1", b"\xff"]))
    if how == "byte" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    return data


# urlencoded form bodies, with and without a `_method` field in its spellings (PHP reads `.method` as `_method`)
FORMS = st.lists(
    st.sampled_from(
        ["_method", "%5Fmethod", "_METHOD", ".method", "+_method", "_method[x]", "method", "a", ""]
    ).flatmap(lambda name: st.sampled_from(["", "=DELETE", "=", "=_method"]).map(lambda value: name + value)),
    max_size=3,
).flatmap(lambda pairs: st.sampled_from(["&", ";"]).map(lambda sep: sep.join(pairs).encode()))


def route(protocol: str, filter_tools_list: bool = False) -> RouteConfig:
    limit = 1 << 20 if protocol != "http" else None
    return RouteConfig(
        name="r",
        path_prefix="/r",
        upstream="http://127.0.0.1:9/",
        protocol=protocol,
        max_body_bytes=limit,
        filter_tools_list=filter_tools_list,
    )


PATHS = st.lists(
    st.sampled_from(["v1", "chat", "completions", "embeddings", "responses", "models", ";x", "", "Chat", "mcp"]),
    max_size=4,
).map(lambda s: "/" + "/".join(s))


@settings(max_examples=examples(300), deadline=None)
@given(
    protocol=st.sampled_from(["mcp", "openai", "http"]),
    filter_tools_list=st.booleans(),
    method=st.sampled_from(["POST", "POST", "GET", "DELETE", "PUT", "PATCH", "OPTIONS"]),
    path=PATHS,
    headers=MIRRORED,
    body=bodies(RPC) | bodies(MODEL_CALL) | st.binary(max_size=32) | FORMS,
    has_body=st.booleans(),
)
def test_dispatch_reads_every_body_it_decides_on(
    protocol: str,
    filter_tools_list: bool,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    has_body: bool,
) -> None:
    config = route(protocol, filter_tools_list)
    sent = CIMultiDict(headers)
    early = dispatch.before_body(config, method, path, sent, has_body)
    check_dispatch(protocol, filter_tools_list, method, path, sent, has_body, early)
    event(f"before_body: {type(early).__name__}")
    if early is None:
        parsed = dispatch.parse(config, method, path, sent, body)
        event(f"parse: {type(parsed).__name__}")
        if protocol == "mcp":
            check_mcp(body, sent, parsed)
        elif protocol == "openai" and invokes_model(method, path):
            check_model_call(body, sent, parsed)
        else:
            check_form(body, parsed, unread_model=protocol == "openai")


@settings(max_examples=examples(400), deadline=None)
@given(bodies(RPC), MIRRORED)
def test_mcp_accepts_only_what_the_reference_reads_one_message_per_element(
    body: bytes, headers: dict[str, str]
) -> None:
    sent = CIMultiDict(headers)
    result = mcp.inspect(body, sent)
    event(
        f"{type(result).__name__}, batch" if isinstance(result, Inspected) and result.batch else type(result).__name__
    )
    check_mcp(body, sent, result)


@pytest.mark.parametrize("count", [9_993, 9_994])
def test_the_oracle_takes_a_body_over_max_json_values_as_too_large(count: int) -> None:
    """Members: jsonrpc, id, method, params; name, arguments; `a`: 7 before the array's elements."""
    arguments = {"a": [0] * count}
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": arguments}}
    body = json.dumps(call).encode()
    result = mcp.inspect(body, CIMultiDict())
    assert isinstance(result, Refused) == (count > 9_993)
    check_mcp(body, CIMultiDict(), result)


@pytest.mark.parametrize("count", [1024, 1025])
def test_the_oracle_takes_a_call_over_max_tools_as_too_large(count: int) -> None:
    body = json.dumps({"model": "m", "functions": [{"name": "f"}] * count}).encode()
    result = openai.inspect(body)
    assert isinstance(result, Refused) == (count > 1024)
    check_openai(body, result)


@settings(max_examples=examples(200), deadline=None)
@given(bodies(MODEL_CALL))
def test_openai_accepts_only_what_the_reference_reads(body: bytes) -> None:
    result = openai.inspect(body)
    event(type(result).__name__)
    check_openai(body, result)


@settings(max_examples=examples(300), deadline=None)
@given(bodies(JSON) | st.binary(max_size=24), st.sampled_from([0, 1, 2, 64]))
def test_strictjson_reads_what_the_reference_reads(data: bytes, max_depth: int) -> None:
    try:
        value, error = strictjson.loads(data, max_depth), None
    except strictjson.JsonError as exc:
        value, error = None, exc
    event("refused" if error else "accepted")
    check_strict(data, max_depth, value, error)


# --- duplicate keys, at any depth and however they are spelled -----------------------------------------------


def spell(key: str, how: int) -> str:
    """The same key, written three ways: as is, ASCII-escaped, and every character as \\uXXXX."""
    if how == 0:
        return json.dumps(key, ensure_ascii=False)
    if how == 1 or any(ord(c) > 0xFFFF for c in key):
        return json.dumps(key, ensure_ascii=True)
    return '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"'


def dump_with_duplicate(
    value: Any, target: int, key: str, spellings: tuple[int, int], other: str | None = None
) -> tuple[str, int]:
    """JSON text of `value` where the `target`-th object (depth first) starts with `key` twice (or with `key`,
    then `other`)."""
    counter = 0

    def dump(v: Any) -> str:
        nonlocal counter
        if isinstance(v, dict):
            index = counter
            counter += 1
            added = {key, key if other is None else other}
            members = [f"{json.dumps(k)}:{dump(x)}" for k, x in v.items() if not (index == target and k in added)]
            if index == target:
                second = key if other is None else other
                members = [f"{spell(key, spellings[0])}:1", f"{spell(second, spellings[1])}:2", *members]
            return "{" + ",".join(members) + "}"
        if isinstance(v, list):
            return "[" + ",".join(dump(x) for x in v) + "]"
        return json.dumps(v)

    return dump(value), counter


@settings(max_examples=examples(300), deadline=None)
@given(MESSAGE.filter(lambda m: isinstance(m, dict)), KEYS, st.data())
def test_a_duplicate_key_anywhere_is_refused(message: dict[str, Any], key: str, data: st.DataObject) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": message}}
    plain, objects = dump_with_duplicate(body, -1, key, (0, 0))
    try:
        strictjson.loads(plain.encode(), fold_keys=True)
    except strictjson.JsonError:
        assume(False)  # refused without the duplicate already
    target = data.draw(st.integers(0, objects - 1))
    spellings = data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2)))
    text, _ = dump_with_duplicate(body, target, key, spellings)
    raw = text.encode()
    with pytest.raises(strictjson.JsonError, match="duplicate key"):
        strictjson.loads(raw)
    refused = mcp.inspect(raw, CIMultiDict())
    assert isinstance(refused, Refused)
    assert refused.reason is Reason.BODY_UNREADABLE
    in_batch = b"[" + raw + b"]"
    assert isinstance(mcp.inspect(in_batch, CIMultiDict()), Refused)
    model = b'{"model":"m","metadata":' + raw + b"}"
    refused_model = openai.inspect(model)
    assert isinstance(refused_model, Refused)
    assert refused_model.reason is Reason.BODY_UNREADABLE


FOLDED = {"name": ("Name", "NAME"), "method": ("Method",), "id": ("ID", "Id"), "s": ("S", "\u017f"), "k": ("\u212a",)}


@settings(max_examples=examples(150), deadline=None)
@given(MESSAGE.filter(lambda m: isinstance(m, dict)), st.sampled_from(sorted(FOLDED)), st.data())
def test_keys_equal_under_case_folding_anywhere_are_ambiguous(
    message: dict[str, Any], key: str, data: st.DataObject
) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": message}}
    plain, objects = dump_with_duplicate(body, -1, key, (0, 0))
    try:
        strictjson.loads(plain.encode(), fold_keys=True)
    except strictjson.JsonError:
        assume(False)  # refused without the added keys already
    target = data.draw(st.integers(0, objects - 1))
    other = data.draw(st.sampled_from(FOLDED[key]))
    spellings = data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2)))
    raw = dump_with_duplicate(body, target, key, spellings, other)[0].encode()
    with pytest.raises(strictjson.FoldedKeys):
        strictjson.loads(raw, fold_keys=True)
    for refused in (mcp.inspect(raw, CIMultiDict()), mcp.inspect(b"[" + raw + b"]", CIMultiDict())):
        assert isinstance(refused, Refused)
        assert refused.reason is Reason.REQUEST_AMBIGUOUS
    refused_model = openai.inspect(b'{"model":"m","metadata":' + raw + b"}")
    assert isinstance(refused_model, Refused)
    assert refused_model.reason is Reason.REQUEST_AMBIGUOUS


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(MESSAGE, min_size=1, max_size=5))
def test_a_batch_is_one_message_per_element_in_order(items: list[dict[str, Any]]) -> None:
    wellformed = [{**m, "jsonrpc": "2.0", "method": "tools/call", "id": i} for i, m in enumerate(items)]
    body = dumps(wellformed)
    result = mcp.inspect(body, CIMultiDict())
    check_mcp(body, CIMultiDict(), result)
    if isinstance(result, Inspected):
        assert [m.rpc_id for m in result.messages] == list(range(len(items)))


# --- found by these properties -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pay","arguments":{"cents":100000000000000000001}}}',
        b'{"model":"m","max_tokens":18446744073709551616}',
    ],
)
def test_an_integer_beyond_64_bits_is_refused_not_rounded(body: bytes) -> None:
    with pytest.raises(strictjson.JsonError):
        strictjson.loads(body)
