"""pep.protocols.mcp: how an MCP POST body becomes decided messages, and what is refused before the PDP."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from pep.config import RouteConfig
from pep.decision import Reason
from pep.protocols import NO_ID, Inspected, Message, Refused, dispatch, mcp

V_BATCH = "2025-03-26"
V_0618 = "2025-06-18"
V_1125 = "2025-11-25"
V_2026 = "2026-07-28"
META = "io.modelcontextprotocol/protocolVersion"


def hdrs(*pairs: tuple[str, str], **named: str) -> CIMultiDict[str]:
    """Request headers; keyword names use `_` for `-` (`Mcp_Method=...`)."""
    out: CIMultiDict[str] = CIMultiDict(pairs)
    for k, v in named.items():
        out.add(k.replace("_", "-"), v)
    return out


def rpc(method: str | None = "ping", rpc_id: Any = 1, params: Any = NO_ID, **extra: Any) -> bytes:
    obj: dict[str, Any] = {"jsonrpc": "2.0"}
    if rpc_id is not NO_ID:
        obj["id"] = rpc_id
    if method is not None:
        obj["method"] = method
    if params is not NO_ID:
        obj["params"] = params
    obj.update(extra)
    return orjson.dumps(obj)


def ok(body: bytes, headers: CIMultiDict[str] | None = None) -> Inspected:
    result = mcp.inspect(body, headers if headers is not None else CIMultiDict())
    assert isinstance(result, Inspected), result
    assert result.body == body  # the exact bytes decided are the bytes forwarded
    return result


def refused(body: bytes, headers: CIMultiDict[str] | None = None) -> Reason:
    result = mcp.inspect(body, headers if headers is not None else CIMultiDict())
    assert isinstance(result, Refused), result
    assert result.detail
    return result.reason


def only(result: Inspected) -> Message:
    assert not result.batch
    assert len(result.messages) == 1
    return result.messages[0]


# --- shapes and facts ---------------------------------------------------------------------------------------


def test_tools_call_request_facts() -> None:
    body = rpc("tools/call", 7, {"name": "send_email", "arguments": {"to": "a@b", "n": [1, 2]}})
    message = only(ok(body))
    assert message.key == "mcp"
    assert message.rpc_id == 7
    assert message.facts == {
        "method": "tools/call",
        "name": "send_email",
        "arguments": {"to": "a@b", "n": [1, 2]},
        "protocol_version": None,
        "direction": "client_to_server",
    }


@pytest.mark.parametrize(
    ("method", "params", "name"),
    [
        ("tools/call", {"name": "t"}, "t"),
        ("prompts/get", {"name": "greet", "arguments": {"who": "x"}}, "greet"),
        ("resources/read", {"uri": "file:///etc/motd"}, "file:///etc/motd"),
        ("resources/subscribe", {"uri": "db://rows/1"}, "db://rows/1"),
        ("resources/unsubscribe", {"uri": "db://rows/1"}, "db://rows/1"),
        # Only the field that names the target counts: a `name` on a resource read or a `uri` on a call is not it.
        ("resources/read", {"name": "decoy", "uri": "file:///a"}, "file:///a"),
        ("tools/call", {"name": "real", "uri": "file:///decoy"}, "real"),
        ("tools/list", {"name": "ignored"}, None),
        ("resources/list", {"uri": "ignored"}, None),
        ("tools/call", {}, None),
        ("tools/call", NO_ID, None),
        ("tools/call", ["positional"], None),
    ],
)
def test_name_comes_from_the_field_the_method_uses(method: str, params: Any, name: str | None) -> None:
    assert only(ok(rpc(method, 1, params))).facts["name"] == name


@pytest.mark.parametrize("rpc_id", [0, -1, 2**53, "abc", "", None])
def test_request_ids_kept_as_sent(rpc_id: Any) -> None:
    message = only(ok(rpc("ping", rpc_id)))
    assert message.rpc_id == rpc_id
    assert message.rpc_id is not NO_ID
    assert type(message.rpc_id) is type(rpc_id)


def test_notification_has_no_id() -> None:
    message = only(ok(rpc("notifications/initialized", NO_ID)))
    assert message.rpc_id is NO_ID
    assert message.facts["method"] == "notifications/initialized"
    assert message.facts["name"] is None
    assert message.facts["arguments"] is None


def test_null_id_is_not_a_notification() -> None:
    assert only(ok(rpc("ping", None))).rpc_id is None


@pytest.mark.parametrize(
    "body",
    [
        rpc(None, 5, result={"content": []}),
        rpc(None, "s-1", error={"code": -1, "message": "no"}),
        rpc(None, None, error={"code": -32700, "message": "parse error"}),
    ],
)
def test_client_responses_are_mcp_response(body: bytes) -> None:
    message = only(ok(body))
    assert message.facts == {
        "method": "mcp/response",
        "name": None,
        "arguments": None,
        "protocol_version": None,
        "direction": "client_to_server",
    }
    assert message.rpc_id is not NO_ID


def test_response_carries_the_header_version() -> None:
    message = only(ok(rpc(None, 5, result={}), hdrs(MCP_Protocol_Version=V_0618)))
    assert message.facts["protocol_version"] == V_0618


@pytest.mark.parametrize(
    "body",
    [
        rpc(None, NO_ID, result={}),  # a response needs an id
        rpc(None, 1),  # neither result nor error
        rpc(None, 1, result={}, error={"code": 1, "message": "x"}),  # both
    ],
)
def test_malformed_responses_are_unreadable(body: bytes) -> None:
    assert refused(body) is Reason.BODY_UNREADABLE


# --- the protocol version -----------------------------------------------------------------------------------


def test_version_from_the_header() -> None:
    assert only(ok(rpc("tools/list"), hdrs(MCP_Protocol_Version=V_1125))).facts["protocol_version"] == V_1125


def test_header_name_is_case_insensitive() -> None:
    headers = hdrs(("mcp-protocol-version", V_0618))
    assert only(ok(rpc("tools/list"), headers)).facts["protocol_version"] == V_0618


def test_version_from_meta() -> None:
    body = rpc("tools/list", 1, {"_meta": {META: V_1125}})
    assert only(ok(body)).facts["protocol_version"] == V_1125


def test_version_from_meta_matching_the_header() -> None:
    body = rpc("tools/list", 1, {"_meta": {META: V_1125}})
    assert only(ok(body, hdrs(MCP_Protocol_Version=V_1125))).facts["protocol_version"] == V_1125


def test_version_from_initialize() -> None:
    body = rpc("initialize", 0, {"protocolVersion": V_0618, "capabilities": {}, "clientInfo": {"name": "c"}})
    assert only(ok(body)).facts["protocol_version"] == V_0618


def test_initialize_params_do_not_override_the_header() -> None:
    body = rpc("initialize", 0, {"protocolVersion": V_0618})
    assert only(ok(body, hdrs(MCP_Protocol_Version=V_1125))).facts["protocol_version"] == V_1125


def test_protocol_version_param_counts_only_on_initialize() -> None:
    assert only(ok(rpc("tools/list", 1, {"protocolVersion": V_0618}))).facts["protocol_version"] is None


@pytest.mark.parametrize("meta", [{META: 20250618}, {META: None}, "not an object", ["x"], {"other": V_0618}])
def test_meta_without_a_string_version_is_ignored(meta: Any) -> None:
    assert only(ok(rpc("tools/list", 1, {"_meta": meta}))).facts["protocol_version"] is None


def test_header_disagreeing_with_meta_is_unreadable() -> None:
    body = rpc("tools/list", 1, {"_meta": {META: V_1125}})
    assert refused(body, hdrs(MCP_Protocol_Version=V_0618)) is Reason.BODY_UNREADABLE


# --- HTTP actions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "action"),
    [("GET", "mcp/stream"), ("DELETE", "mcp/session/delete"), ("PUT", "mcp/http/PUT"), ("PATCH", "mcp/http/PATCH")],
)
def test_http_actions(method: str, action: str) -> None:
    message = mcp.http_action(method)
    assert message.key == "mcp"
    assert message.rpc_id is NO_ID
    assert message.facts == {
        "method": action,
        "name": None,
        "arguments": None,
        "protocol_version": None,
        "direction": "client_to_server",
    }


# --- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"{",
        b'{"jsonrpc":"2.0","id":1,"method":"ping"',
        b'{"jsonrpc":"2.0","id":1,"method":"ping"} {}',  # trailing data
        b'{"jsonrpc":"2.0","id":1,"method":"ping"}x',
        b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}',
        b"{'jsonrpc':'2.0'}",
        b'{"jsonrpc":"2.0","id":1,"method":"ping",}',
        b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}',  # a BOM is not JSON
    ],
)
def test_invalid_json_is_unreadable(body: bytes) -> None:
    assert refused(body) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\xff"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\xc3"}}',  # truncated sequence
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\xed\xa0\x80"}}',  # encoded surrogate
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\ud800"}}',  # lone surrogate escape
        '{"jsonrpc":"2.0","id":1,"method":"ping"}'.encode("utf-16"),
    ],
)
def test_invalid_utf8_is_unreadable(body: bytes) -> None:
    assert refused(body) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}',
        b'{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"safe","name":"rm_rf"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"to":"a","to":"b"}}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"x":{"y":1,"y":1}}}}',
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping","id":3}]',
    ],
)
def test_duplicate_keys_are_unreadable(body: bytes) -> None:
    assert refused(body) is Reason.BODY_UNREADABLE


def _nested(depth: int) -> bytes:
    """A tools/call whose arguments bring the whole body to `depth` levels of nesting."""
    inner = "1"
    for _ in range(depth - 2):  # the message object and params are two levels; arguments is the first of these
        inner = '{"a":' + inner + "}"
    return ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":' + inner + "}}").encode()


def test_depth_limit() -> None:
    assert mcp.MAX_DEPTH == 64
    ok(_nested(64))
    assert refused(_nested(65)) is Reason.BODY_UNREADABLE
    assert refused(_nested(5000)) is Reason.BODY_UNREADABLE
    assert refused(b"[" * 100_000 + b"]" * 100_000) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":1,"method":"ping"}',
        b'{"jsonrpc":"1.0","id":1,"method":"ping"}',
        b'{"jsonrpc":2.0,"id":1,"method":"ping"}',
        b'{"jsonrpc":null,"id":1,"method":"ping"}',
        b"null",
        b"1",
        b'"tools/call"',
        b"true",
        b"{}",
    ],
)
def test_not_jsonrpc_2_is_unreadable(body: bytes) -> None:
    assert refused(body) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize("rpc_id", [True, False, 1.5, 1.0, 1e3, {"a": 1}, [1], {}])
def test_bad_id_types_are_unreadable(rpc_id: Any) -> None:
    assert refused(rpc("ping", rpc_id)) is Reason.BODY_UNREADABLE
    assert refused(rpc(None, rpc_id, result={})) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize("method", [1, True, {"m": 1}, ["ping"], ""])
def test_method_must_be_a_non_empty_string(method: Any) -> None:
    assert refused(orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method})) is Reason.BODY_UNREADABLE


# A request that also carries a result or an error: the 2.x SDK reads the `error` ones as error responses to its
# own request with that id, the others as requests (pydantic's union keeps the shape with most fields set).
REQUESTS_WITH_AN_OUTCOME = [
    rpc("ping", 1, error={"code": -32000, "message": "declined"}),
    rpc("notifications/initialized", 1, error={"code": 1, "message": "x"}),
    rpc("ping", "t", params={}, error={"code": 1, "message": "x", "data": {}}),
    rpc("ping", 1, result={"action": "accept"}),
    rpc("ping", NO_ID, error={"code": 1, "message": "x"}),
    rpc("ping", 1, error=None),
    rpc("ping", 1, result=None),
]


@pytest.mark.parametrize("body", REQUESTS_WITH_AN_OUTCOME)
def test_a_request_with_a_result_or_an_error_is_unreadable(body: bytes) -> None:
    """The PEP would decide the method while the server may take the message as the reply to one of its own
    requests, under the server's id: a reply that was never opened and decided as one."""
    assert refused(body) is Reason.BODY_UNREADABLE
    assert refused(b"[" + body + b"]") is Reason.BODY_UNREADABLE


def test_the_sdk_reads_a_request_with_an_error_as_a_response() -> None:
    """Why the shape is refused, shown on the receiver: the official SDK's own message reader."""
    from mcp.types import JSONRPCError, jsonrpc_message_adapter

    read = jsonrpc_message_adapter.validate_json(REQUESTS_WITH_AN_OUTCOME[0], by_name=False)  # as its transports
    assert isinstance(read, JSONRPCError)
    assert read.id == 1


@pytest.mark.parametrize("params", ["x", 1, True, 1.5])
def test_params_must_be_an_object_or_an_array(params: Any) -> None:
    assert refused(rpc("tools/call", 1, params)) is Reason.BODY_UNREADABLE


def test_null_params_are_no_params() -> None:
    assert only(ok(rpc("tools/call", 1, None))).facts["name"] is None


@pytest.mark.parametrize(
    ("method", "field"),
    [
        ("tools/call", "name"),
        ("prompts/get", "name"),
        ("resources/read", "uri"),
        ("resources/subscribe", "uri"),
        ("resources/unsubscribe", "uri"),
    ],
)
@pytest.mark.parametrize("value", [1, True, ["a"], {"a": 1}])
def test_name_and_uri_must_be_strings(method: str, field: str, value: Any) -> None:
    assert refused(rpc(method, 1, {field: value})) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize("arguments", [[1, 2], "a=1", 1, True])
@pytest.mark.parametrize("method", ["tools/call", "prompts/get", "completion/complete"])
def test_arguments_must_be_an_object(method: str, arguments: Any) -> None:
    assert refused(rpc(method, 1, {"name": "t", "arguments": arguments})) is Reason.BODY_UNREADABLE


# --- batches ------------------------------------------------------------------------------------------------

BATCH = orjson.dumps(
    [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a", "arguments": {"x": 1}}},
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}},
        {"jsonrpc": "2.0", "id": "r", "result": {}},
        {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "file:///b"}},
    ]
)


@pytest.mark.parametrize("headers", [hdrs(), hdrs(MCP_Protocol_Version=V_BATCH)])
def test_batch_is_one_message_per_element(headers: CIMultiDict[str]) -> None:
    result = ok(BATCH, headers)
    assert result.batch
    version = headers.get("MCP-Protocol-Version")
    assert [(m.facts["method"], m.facts["name"], m.rpc_id) for m in result.messages] == [
        ("tools/call", "a", 1),
        ("notifications/progress", None, NO_ID),
        ("mcp/response", None, "r"),
        ("resources/read", "file:///b", 2),
    ]
    assert result.messages[0].facts["arguments"] == {"x": 1}
    assert all(m.key == "mcp" and m.facts["protocol_version"] == version for m in result.messages)


def test_single_element_batch_is_still_a_batch() -> None:
    result = ok(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]')
    assert result.batch
    assert len(result.messages) == 1


@pytest.mark.parametrize("version", [V_0618, V_1125, V_2026, "2099-01-01", "garbage"])
def test_batch_refused_after_2025_03_26(version: str) -> None:
    assert refused(BATCH, hdrs(MCP_Protocol_Version=version)) is Reason.REQUEST_AMBIGUOUS


def test_empty_batch_is_unreadable() -> None:
    assert refused(b"[]") is Reason.BODY_UNREADABLE
    assert refused(b" [ ] ", hdrs(MCP_Protocol_Version=V_BATCH)) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize(
    "bad",
    [
        {"jsonrpc": "1.0", "id": 2, "method": "ping"},
        {"jsonrpc": "2.0", "id": True, "method": "ping"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": 3}},
        [{"jsonrpc": "2.0", "id": 2, "method": "ping"}],  # nested batch
        "ping",
        None,
    ],
)
def test_one_bad_element_refuses_the_batch(bad: Any) -> None:
    body = orjson.dumps([{"jsonrpc": "2.0", "id": 1, "method": "ping"}, bad])
    assert refused(body) is Reason.BODY_UNREADABLE


def test_batch_element_meta_must_agree_with_the_header() -> None:
    body = orjson.dumps([{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": {META: V_0618}}}])
    assert refused(body, hdrs(MCP_Protocol_Version=V_BATCH)) is Reason.BODY_UNREADABLE


# --- mirrored headers ---------------------------------------------------------------------------------------


def b64(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


CALL = rpc("tools/call", 1, {"name": "send_email", "arguments": {}})
READ = rpc("resources/read", 1, {"uri": "file:///r\u00e9sum\u00e9.txt"})


def test_2026_requires_mcp_method() -> None:
    assert refused(rpc("tools/list"), hdrs(MCP_Protocol_Version=V_2026)) is Reason.REQUEST_AMBIGUOUS
    message = only(ok(rpc("tools/list"), hdrs(MCP_Protocol_Version=V_2026, Mcp_Method="tools/list")))
    assert message.facts["protocol_version"] == V_2026


def test_2026_from_meta_also_requires_mcp_method() -> None:
    body = rpc("tools/list", 1, {"_meta": {META: V_2026}})
    assert refused(body) is Reason.REQUEST_AMBIGUOUS
    ok(body, hdrs(Mcp_Method="tools/list"))


@pytest.mark.parametrize(("body", "name"), [(CALL, "send_email"), (READ, "file:///r\u00e9sum\u00e9.txt")])
def test_2026_requires_mcp_name_for_named_methods(body: bytes, name: str) -> None:
    method = orjson.loads(body)["method"]
    assert refused(body, hdrs(MCP_Protocol_Version=V_2026, Mcp_Method=method)) is Reason.REQUEST_AMBIGUOUS
    good = hdrs(MCP_Protocol_Version=V_2026, Mcp_Method=method, Mcp_Name=b64(name))
    assert only(ok(body, good)).facts["name"] == name


def test_2026_prompts_get_requires_mcp_name() -> None:
    body = rpc("prompts/get", 1, {"name": "greet"})
    assert refused(body, hdrs(MCP_Protocol_Version=V_2026, Mcp_Method="prompts/get")) is Reason.REQUEST_AMBIGUOUS
    ok(body, hdrs(MCP_Protocol_Version=V_2026, Mcp_Method="prompts/get", Mcp_Name="greet"))


def test_2026_unnamed_method_needs_no_mcp_name() -> None:
    ok(rpc("resources/list"), hdrs(MCP_Protocol_Version=V_2026, Mcp_Method="resources/list"))


def test_2026_notifications_need_mcp_method_too() -> None:
    body = rpc("notifications/cancelled", NO_ID, {"requestId": 1})
    assert refused(body, hdrs(MCP_Protocol_Version=V_2026)) is Reason.REQUEST_AMBIGUOUS
    ok(body, hdrs(MCP_Protocol_Version=V_2026, Mcp_Method="notifications/cancelled"))


def test_2026_responses_need_no_mirrored_headers() -> None:
    ok(rpc(None, 3, result={}), hdrs(MCP_Protocol_Version=V_2026))


@pytest.mark.parametrize("version", [None, V_BATCH, V_0618, V_1125, V_2026])
@pytest.mark.parametrize(
    "mirrored",
    [
        {"Mcp-Method": "tools/list"},  # the wrong method
        {"Mcp-Method": "tools/call", "Mcp-Name": "read_file"},  # the wrong name
        {"Mcp-Method": "Tools/Call", "Mcp-Name": "send_email"},  # values are case-sensitive
        {"Mcp-Method": "tools/call", "Mcp-Name": "send_email "},
        {"Mcp-Method": "tools/call", "Mcp-Name": ""},
        {"Mcp-Method": b64("tools/list"), "Mcp-Name": "send_email"},
        {"Mcp-Method": "tools/call", "Mcp-Name": b64("read_file")},
        {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?not base64!?="},  # invalid base64: a mismatch
        {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?c2VuZF9lbWFpbA?="},  # missing padding
        {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?" + base64.b64encode(b"\xff\xfe").decode() + "?="},
    ],
)
def test_mirrored_headers_that_disagree_are_ambiguous(version: str | None, mirrored: dict[str, str]) -> None:
    headers = hdrs(*mirrored.items())
    if version is not None:
        headers["MCP-Protocol-Version"] = version
    assert refused(CALL, headers) is Reason.REQUEST_AMBIGUOUS


@pytest.mark.parametrize("version", [None, V_0618, V_2026])
@pytest.mark.parametrize(
    "mirrored",
    [
        {"Mcp-Method": "tools/call", "Mcp-Name": "send_email"},
        {"mcp-method": "tools/call", "mcp-name": "send_email"},
        {"Mcp-Method": b64("tools/call"), "Mcp-Name": b64("send_email")},
    ],
)
def test_mirrored_headers_that_agree_are_accepted(version: str | None, mirrored: dict[str, str]) -> None:
    headers = hdrs(*mirrored.items())
    if version is not None:
        headers["MCP-Protocol-Version"] = version
    assert only(ok(CALL, headers)).facts["name"] == "send_email"


def test_older_versions_do_not_require_mirrored_headers() -> None:
    for version in (V_BATCH, V_0618, V_1125):
        ok(CALL, hdrs(MCP_Protocol_Version=version))


def test_mcp_name_on_a_method_without_a_name_is_ambiguous() -> None:
    assert refused(rpc("tools/list"), hdrs(Mcp_Method="tools/list", Mcp_Name="x")) is Reason.REQUEST_AMBIGUOUS


def test_mcp_method_on_a_response_is_ambiguous() -> None:
    assert refused(rpc(None, 1, result={}), hdrs(Mcp_Method="tools/call")) is Reason.REQUEST_AMBIGUOUS


def test_non_ascii_name_compared_after_base64_decoding() -> None:
    name = "file:///r\u00e9sum\u00e9.txt"
    ok(READ, hdrs(Mcp_Method="resources/read", Mcp_Name=b64(name)))
    assert refused(READ, hdrs(Mcp_Method="resources/read", Mcp_Name=b64("file:///resume.txt"))) is (
        Reason.REQUEST_AMBIGUOUS
    )


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("tools/call", "tools/call"),
        (b64("caf\u00e9"), "caf\u00e9"),
        ("=?base64??=", ""),
        ("=?base64?!!!?=", None),
        ("=?base64?" + base64.b64encode(b"\xc3").decode() + "?=", None),
        ("=?base64?YQ==", "=?base64?YQ=="),  # not the encoded form: taken literally
    ],
)
def test_decode_header(value: str, decoded: str | None) -> None:
    assert mcp.decode_header(value) == decoded


def test_repeated_mirrored_header_is_ambiguous() -> None:
    """Two `Mcp-Name` fields: the PEP must not check one while the upstream reads the other."""
    headers = hdrs(("Mcp-Method", "tools/call"), ("Mcp-Name", "send_email"), ("Mcp-Name", "delete_all"))
    assert refused(CALL, headers) is Reason.REQUEST_AMBIGUOUS
    headers = hdrs(("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/list"), ("Mcp-Name", "send_email"))
    assert refused(CALL, headers) is Reason.REQUEST_AMBIGUOUS
    headers = hdrs(("MCP-Protocol-Version", V_BATCH), ("MCP-Protocol-Version", V_2026))
    assert refused(BATCH, headers) is Reason.REQUEST_AMBIGUOUS


# --- properties ---------------------------------------------------------------------------------------------

_KEYS = st.sampled_from(
    ["jsonrpc", "id", "method", "params", "name", "uri", "arguments", "_meta", META, "result", "error", "x"]
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["2.0", "tools/call", "resources/read", "initialize", "", V_BATCH, V_2026])
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS | st.text(max_size=4), inner, max_size=5),
    max_leaves=16,
)
# Objects close to a JSON-RPC message, so that the accepting paths are explored as well as the refusals.
MESSAGES = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0") | JSON_VALUES},
    optional={
        "id": st.integers(-5, 5) | st.text(max_size=3) | JSON_VALUES,
        "method": st.sampled_from(["tools/call", "prompts/get", "resources/read", "initialize", "ping"]) | JSON_VALUES,
        "params": st.fixed_dictionaries(
            {},
            optional={
                "name": st.text(max_size=4) | JSON_VALUES,
                "uri": st.text(max_size=4) | JSON_VALUES,
                "arguments": st.dictionaries(st.text(max_size=3), JSON_VALUES, max_size=3) | JSON_VALUES,
                "_meta": st.fixed_dictionaries({META: st.sampled_from([V_BATCH, V_0618, V_2026])}) | JSON_VALUES,
                "protocolVersion": st.sampled_from([V_BATCH, V_2026]) | JSON_VALUES,
            },
        )
        | JSON_VALUES,
        "result": JSON_VALUES,
        "error": JSON_VALUES,
    },
)
# Mostly well-formed messages, so that a good share of the examples is accepted and the facts are checked.
NEAR_MESSAGES = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0")},
    optional={
        "id": st.integers(-5, 5) | st.text(max_size=3) | st.none(),
        "method": st.sampled_from(["tools/call", "prompts/get", "resources/read", "initialize", "ping", "x"]),
        "params": st.fixed_dictionaries(
            {},
            optional={
                "name": st.text(max_size=4),
                "uri": st.text(max_size=4),
                "arguments": st.dictionaries(st.text(max_size=3), JSON_VALUES, max_size=3),
                "_meta": st.fixed_dictionaries({META: st.sampled_from([V_BATCH, V_0618])}),
                "protocolVersion": st.sampled_from([V_BATCH, V_2026]),
            },
        ),
        "result": JSON_VALUES,
    },
)
BODIES = (
    JSON_VALUES
    | MESSAGES
    | NEAR_MESSAGES
    | NEAR_MESSAGES
    | st.lists(MESSAGES | NEAR_MESSAGES, max_size=4)
    | st.lists(NEAR_MESSAGES, min_size=1, max_size=4)
)
HEADERS: st.SearchStrategy[dict[str, str]] = st.just({}) | st.dictionaries(
    st.sampled_from(["MCP-Protocol-Version", "Mcp-Method", "Mcp-Name"]),
    st.sampled_from([V_BATCH, V_0618, V_2026, "tools/call", "ping", "", b64("tools/call"), "=?base64?@?="])
    | st.text(max_size=6),
    max_size=3,
)


def _check(body: bytes, headers: dict[str, str], value: Any) -> None:
    result = mcp.inspect(body, CIMultiDict(headers))
    assert isinstance(result, Inspected | Refused)
    if isinstance(result, Refused):
        assert result.reason in (Reason.BODY_UNREADABLE, Reason.REQUEST_AMBIGUOUS)
        return
    assert result.body == body
    assert result.messages
    assert result.batch == isinstance(value, list)
    if result.batch:
        assert len(result.messages) == len(value)
    for message in result.messages:
        method = message.facts["method"]
        assert isinstance(method, str)
        assert method
        assert message.key == "mcp"
        completion = {"ref_type", "argument"} if message.facts["method"] == "completion/complete" else set()
        assert set(message.facts) == {"method", "name", "arguments", "protocol_version", "direction", *completion}
        assert message.facts["name"] is None or isinstance(message.facts["name"], str)
        assert message.facts["arguments"] is None or isinstance(message.facts["arguments"], dict)


@settings(max_examples=400, deadline=None)
@given(BODIES, HEADERS)
def test_inspect_never_raises_and_methods_are_named(value: Any, headers: dict[str, str]) -> None:
    _check(orjson.dumps(value), headers, value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), HEADERS)
def test_inspect_never_raises_on_arbitrary_bytes(body: bytes, headers: dict[str, str]) -> None:
    result = mcp.inspect(body, CIMultiDict(headers))
    assert isinstance(result, Inspected | Refused)
    if isinstance(result, Inspected):
        assert all(isinstance(m.facts["method"], str) and m.facts["method"] for m in result.messages)


def test_a_batch_with_mirrored_headers_is_ambiguous() -> None:
    body = b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]'
    refused = mcp.inspect(body, CIMultiDict({"Mcp-Method": "tools/list"}))
    assert isinstance(refused, Refused)
    assert refused.reason is Reason.REQUEST_AMBIGUOUS


def test_a_batch_element_declaring_a_later_version_is_ambiguous() -> None:
    meta = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}
    body = orjson.dumps([{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": meta}])
    refused = mcp.inspect(body, CIMultiDict())
    assert isinstance(refused, Refused)
    assert refused.reason is Reason.REQUEST_AMBIGUOUS


# --- case folding: what a Go server (encoding/json) binds must be what the PEP read -----------------------------


@pytest.mark.parametrize(
    "body",
    [
        # two spellings of one key: the PEP reads one, a case-insensitive server binds the last
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","Name":"shell"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"shell"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","NAME":"shell"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"to":"a","To":"b"}}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":[{"path":1,"PATH":2}]}}}',
        '{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"a","\u212aey":1,"key":2}}'.encode(),
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"x","Method":"y"}]',
        # one key that folds to a name the PEP reads without being it: the PEP sees none, Go binds it
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"Name":"shell"}}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"na\u006de":"ok","n\u0061M\u0065":"shell"}}'.encode(),
        b'{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"shell"}}',
        b'{"JSONRPC":"2.0","jsonrpc":"2.0","id":1,"method":"ping"}',
        b'{"jsonrpc":"2.0","Id":1,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","Params":{"name":"shell"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","Arguments":{"q":1}}}',
        b'{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"URI":"file:///etc/passwd"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"ProtocolVersion":"2026-07-28"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"_META":{}}}',
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"_meta":{"io.modelcontextprotocol/PROTOCOLVERSION":"x"}}}',
        b'{"jsonrpc":"2.0","id":1,"Result":{}}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"nam\u0045":"shell"}}'.encode(),
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"\u017fearch":1,"name":"search"},"param\u017f":{}}'.encode(),
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"Method":"tools/call"}]',
    ],
)
def test_keys_equal_under_case_folding_are_ambiguous(body: bytes) -> None:
    assert refused(body) is Reason.REQUEST_AMBIGUOUS


@pytest.mark.parametrize(
    "body",
    [
        # argument names are the tool's: any spelling, as long as no two fold together (the policy sees them as sent)
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"Path":"/a","maxResults":3}}}',
        b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-03-26","clientInfo":{}}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"Name","arguments":{"name":"NAME"}}}',
    ],
)
def test_keys_distinct_under_case_folding_are_read(body: bytes) -> None:
    ok(body)


# --- the bound on messages per batch ------------------------------------------------------------------------------


def pings(count: int) -> bytes:
    return b"[" + b",".join(rpc("ping", NO_ID) for _ in range(count)) + b"]"


def test_a_batch_holds_at_most_max_batch_messages() -> None:
    assert len(ok(pings(16)).messages) == 16  # the default, DEFAULT_MAX_BATCH_MESSAGES
    result = mcp.inspect(pings(17), CIMultiDict())
    assert isinstance(result, Refused)
    assert result.reason is Reason.BODY_TOO_LARGE
    assert "17 messages" in result.detail
    assert "max_batch_messages 16" in result.detail


def test_the_batch_bound_is_the_routes() -> None:
    assert isinstance(mcp.inspect(pings(3), CIMultiDict(), max_batch_messages=3), Inspected)
    refused_4 = mcp.inspect(pings(4), CIMultiDict(), max_batch_messages=3)
    assert isinstance(refused_4, Refused)
    assert refused_4.reason is Reason.BODY_TOO_LARGE
    assert isinstance(mcp.inspect(pings(3000), CIMultiDict(), max_batch_messages=1000), Refused)
    one = mcp.inspect(pings(1), CIMultiDict(), max_batch_messages=1)
    assert isinstance(one, Inspected)
    assert one.batch


def test_dispatch_applies_the_routes_batch_bound() -> None:
    route = RouteConfig(
        name="r", path_prefix="/r", upstream="http://127.0.0.1:9/", protocol="mcp", max_batch_messages=2
    )
    assert isinstance(dispatch.parse(route, "POST", "/r", CIMultiDict(), pings(2)), Inspected)
    refused_3 = dispatch.parse(route, "POST", "/r", CIMultiDict(), pings(3))
    assert isinstance(refused_3, Refused)
    assert refused_3.reason is Reason.BODY_TOO_LARGE


def call_with(arguments: Any) -> bytes:
    return orjson.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": arguments}}
    )


def test_a_body_holds_at_most_max_json_values() -> None:
    """A PDP's time grows with the values of its input: one caller's body that takes the PDP longer than the
    deadline would count against the breaker as a PDP timeout. Members and elements at any depth count."""
    # the body's members: jsonrpc, id, method, params; params: name, arguments; arguments: "a"; then its elements
    assert isinstance(mcp.inspect(call_with({"a": [0] * 93}), CIMultiDict(), max_json_values=100), Inspected)
    overs: list[dict[str, Any]] = [{"a": [0] * 94}, {"a": [{}] * 94}, {"a": [[0]] * 47}]
    for over in overs:
        refused = mcp.inspect(call_with(over), CIMultiDict(), max_json_values=100)
        assert isinstance(refused, Refused)
        assert refused.reason is Reason.BODY_TOO_LARGE
        assert "max_json_values" in refused.detail
    big_string = mcp.inspect(call_with({"a": "x" * 500_000}), CIMultiDict(), max_json_values=10)
    assert isinstance(big_string, Inspected)  # bytes are max_body_bytes' to bound
    default = mcp.inspect(call_with({"a": [0] * 10_000}), CIMultiDict())
    assert isinstance(default, Refused)
    assert default.reason is Reason.BODY_TOO_LARGE


def test_dispatch_applies_the_routes_value_bound() -> None:
    route = RouteConfig(name="r", path_prefix="/r", upstream="http://127.0.0.1:9/", protocol="mcp", max_json_values=20)
    assert isinstance(dispatch.parse(route, "POST", "/r", CIMultiDict(), call_with({"a": [0] * 10})), Inspected)
    refused = dispatch.parse(route, "POST", "/r", CIMultiDict(), call_with({"a": [0] * 20}))
    assert isinstance(refused, Refused)
    assert refused.reason is Reason.BODY_TOO_LARGE


# --- what the body's headers say about its bytes ---------------------------------------------------------------------

MCP_ROUTE = RouteConfig(name="r", path_prefix="/r", upstream="http://127.0.0.1:9/", protocol="mcp")
MODEL_ROUTE = RouteConfig(name="m", path_prefix="/v1", upstream="http://127.0.0.1:9/", protocol="openai")


def before_body(route: RouteConfig, path: str, *pairs: tuple[str, str]) -> Refused | None:
    early = dispatch.before_body(route, "POST", path, CIMultiDict(pairs), True)
    assert early is None or isinstance(early, Refused), early
    return early


@pytest.mark.parametrize(
    "encodings",
    [["identity", "gzip"], ["gzip", "identity"], ["identity, deflate"], ["", "br"]],
    ids=["identity then gzip", "gzip then identity", "one field, two codings", "empty then br"],
)
@pytest.mark.parametrize(("route", "path"), [(MCP_ROUTE, "/r"), (MODEL_ROUTE, "/v1/chat/completions")])
def test_every_content_encoding_field_counts(route: RouteConfig, path: str, encodings: list[str]) -> None:
    """An upstream may inflate by any copy of a repeated Content-Encoding (or by the joined value): the PEP would
    decide on the compressed bytes. Only identity, in every field, is read."""
    early = before_body(route, path, *(("Content-Encoding", e) for e in encodings))
    assert early is not None
    assert early.reason is Reason.BODY_UNREADABLE
    assert before_body(route, path, ("Content-Encoding", "identity"), ("Content-Encoding", " Identity")) is None


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-7",  # Express decodes it: `+ACI-` is a quote
        "application/json; charset=UTF-7",
        'application/json; charset="utf-16"',
        "application/json; charset=iso-8859-1",
        "application/json; charset=us-ascii",
        "application/json; charset=utf-8-sig",
        "application/json; charset=",
        "application/json; charset=utf-7; charset=utf-8",  # Express reads the first copy
        'application/json; charset=utf-7; x="a;charset=utf-8"',  # a copy inside a quoted value
    ],
)
@pytest.mark.parametrize(("route", "path"), [(MCP_ROUTE, "/r"), (MODEL_ROUTE, "/v1/chat/completions")])
def test_a_charset_other_than_utf8_is_unreadable(route: RouteConfig, path: str, content_type: str) -> None:
    """The PEP reads the body as UTF-8; a server that decodes it by its charset reads other text."""
    early = before_body(route, path, ("Content-Type", content_type))
    assert early is not None
    assert early.reason is Reason.BODY_UNREADABLE


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", 'Application/JSON;Charset="UTF8"']
)
@pytest.mark.parametrize(("route", "path"), [(MCP_ROUTE, "/r"), (MODEL_ROUTE, "/v1/chat/completions")])
def test_utf8_bodies_are_read(route: RouteConfig, path: str, content_type: str) -> None:
    assert before_body(route, path, ("Content-Type", content_type)) is None


@pytest.mark.parametrize(("route", "path"), [(MCP_ROUTE, "/r"), (MODEL_ROUTE, "/v1/chat/completions")])
def test_a_repeated_content_type_is_ambiguous(route: RouteConfig, path: str) -> None:
    pairs = [("Content-Type", "application/json"), ("Content-Type", "application/json; charset=utf-7")]
    early = before_body(route, path, *pairs)
    assert early is not None
    assert early.reason is Reason.REQUEST_AMBIGUOUS


@pytest.mark.parametrize("ids", [(1, 1), ("x", "x"), (None, None)])
def test_two_requests_of_a_batch_under_one_id_are_ambiguous(ids: tuple[Any, Any]) -> None:
    """An answer is matched to its request by id: under one id, `tools/list`'s answer would pass for `ping`'s."""
    body = b"[" + rpc("tools/list", ids[0]) + b"," + rpc("ping", ids[1]) + b"]"
    assert refused(body) is Reason.REQUEST_AMBIGUOUS


def test_ids_of_a_batch_are_compared_as_clients_compare_them() -> None:
    body = b"[" + rpc("tools/list", 1) + b"," + rpc("ping", "1") + b"," + rpc("notifications/x", NO_ID) * 1 + b"]"
    assert ok(body).batch
