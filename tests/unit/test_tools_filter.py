"""Filtering an MCP `tools/list` answer (JSON or SSE) with a fake `decide`: denied and unnamed tools go, allowed
ones stay in order, `cacheScope` becomes private where a cache could share the list, and anything that cannot be
read (or decided) is a `FilterError`, never the unfiltered list.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pep.protocols.tools_filter import FilterError, filter_json, filter_sse

V2026 = "2026-07-28"


class FakeDecide:
    """Denies the names in `denied`; with `answer`, returns that string (the PDP could not decide) instead."""

    def __init__(self, denied: frozenset[str] = frozenset({"shell"}), answer: str | None = None) -> None:
        self.denied = denied
        self.answer = answer
        self.calls: list[list[str]] = []

    async def __call__(self, names: list[str]) -> list[bool] | str:
        self.calls.append(list(names))
        if self.answer is not None:
            return self.answer
        return [n not in self.denied for n in names]


def tool(name: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "inputSchema": {"type": "object"}, **extra}


def answer(tools: Any, rpc_id: Any = 1, **result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": {"tools": tools, **result}}


TOOLS = [
    tool("read_file", description="Reads a file"),
    tool("shell", description="Runs anything"),
    tool("search", title="Search", annotations={"readOnlyHint": True}),
    tool("write_file"),
]
ALLOWED = [TOOLS[0], TOOLS[2], TOOLS[3]]


def load(data: bytes) -> Any:
    return orjson.loads(data)


# --- JSON answers -------------------------------------------------------------------------------------------------


async def test_denied_tools_are_removed_and_allowed_kept_in_order() -> None:
    decide = FakeDecide()
    body = orjson.dumps(answer(TOOLS, "req-7", nextCursor="c2", _meta={"k": "v"}))
    out, removed = await filter_json(body, decide, None)
    assert load(out) == {
        "jsonrpc": "2.0",
        "id": "req-7",
        "result": {"tools": ALLOWED, "nextCursor": "c2", "_meta": {"k": "v"}},
    }
    assert removed == ["shell"]
    assert decide.calls == [["read_file", "shell", "search", "write_file"]]  # once, with every name, in order


async def test_all_allowed_keeps_every_tool() -> None:
    decide = FakeDecide(denied=frozenset())
    out, removed = await filter_json(orjson.dumps(answer(TOOLS)), decide, None)
    assert load(out)["result"]["tools"] == TOOLS
    assert removed == []


async def test_all_denied_leaves_an_empty_list() -> None:
    decide = FakeDecide(denied=frozenset(t["name"] for t in TOOLS))
    out, removed = await filter_json(orjson.dumps(answer(TOOLS)), decide, None)
    assert load(out)["result"]["tools"] == []
    assert removed == ["read_file", "shell", "search", "write_file"]


async def test_tools_without_a_string_name_are_removed() -> None:
    decide = FakeDecide(denied=frozenset())
    tools: list[Any] = [
        tool("a"),
        {"description": "no name at all"},
        tool(None),
        tool(7),
        tool(["a"]),
        tool({"name": "b"}),
        "c",
        None,
        [tool("d")],
        tool("e"),
    ]
    out, removed = await filter_json(orjson.dumps(answer(tools)), decide, None)
    assert load(out)["result"]["tools"] == [tool("a"), tool("e")]
    assert removed == ["<unnamed>"] * 8
    assert decide.calls == [["a", "e"]]  # only string names are ever decided


async def test_only_unnamed_tools_need_no_decision() -> None:
    decide = FakeDecide(answer="pdp_timeout")  # would fail if it were asked
    out, removed = await filter_json(orjson.dumps(answer([{"title": "x"}, tool(1)])), decide, None)
    assert load(out)["result"]["tools"] == []
    assert removed == ["<unnamed>", "<unnamed>"]
    assert decide.calls == []


async def test_an_empty_list_needs_no_decision() -> None:
    decide = FakeDecide(answer="pdp_timeout")
    out, removed = await filter_json(orjson.dumps(answer([])), decide, None)
    assert load(out) == answer([])
    assert (removed, decide.calls) == ([], [])


@pytest.mark.parametrize(
    ("version", "extra", "scope"),
    [
        (V2026, {}, "private"),
        ("2027-01-01", {}, "private"),  # later versions too
        (V2026, {"cacheScope": "public"}, "private"),
        (None, {"cacheScope": "public"}, "private"),
        ("2025-06-18", {"cacheScope": "shared"}, "private"),
        ("2025-11-25", {"cacheScope": None}, "private"),
        (None, {}, None),
        ("2025-03-26", {}, None),
        ("2025-11-25", {}, None),
    ],
)
async def test_cache_scope_becomes_private(version: str | None, extra: dict[str, Any], scope: str | None) -> None:
    out, _ = await filter_json(orjson.dumps(answer(TOOLS, **extra)), FakeDecide(), version)
    result = load(out)["result"]
    assert result.get("cacheScope", "absent") == (scope if scope is not None else "absent")
    assert result["tools"] == ALLOWED


async def test_cache_scope_set_even_when_nothing_is_removed() -> None:
    out, removed = await filter_json(orjson.dumps(answer([tool("a")])), FakeDecide(), V2026)
    assert load(out)["result"] == {"tools": [tool("a")], "cacheScope": "private"}
    assert removed == []


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "Method not found"}},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "x", "data": {"tools": [tool("shell")]}}},
        {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hi"}},
        "just a string",
        42,
        None,
    ],
    ids=["error", "error with data", "notification", "string", "number", "null"],
)
async def test_messages_without_a_result_pass_unchanged(message: Any) -> None:
    decide = FakeDecide()
    body = orjson.dumps(message)
    out, removed = await filter_json(body, decide, V2026)
    assert out == body
    assert load(out) == message
    assert (removed, decide.calls) == ([], [])


@pytest.mark.parametrize(
    "result",
    [{}, {"tools": {}}, {"tools": "shell"}, {"tools": None}, {"content": []}, [], None, "tools", 1],
    ids=["empty", "tools object", "tools string", "tools null", "call result", "list", "null", "string", "number"],
)
async def test_a_result_without_a_tools_list_is_an_error(result: Any) -> None:
    decide = FakeDecide()
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": result})
    with pytest.raises(FilterError, match="without a tools list"):
        await filter_json(body, decide, None)
    assert decide.calls == []


UNREADABLE = [
    ("garbage", b"<html>Bad Gateway</html>"),
    ("empty", b""),
    ("truncated", orjson.dumps(answer(TOOLS))[:-3]),
    ("trailing data", orjson.dumps(answer(TOOLS)) + b"{}"),
    ("duplicate result", b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]},"result":{"tools":[{"name":"shell"}]}}'),
    ("duplicate tools", b'{"jsonrpc":"2.0","id":1,"result":{"tools":[],"tools":[{"name":"shell"}]}}'),
    ("duplicate name", b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"read_file","name":"shell"}]}}'),
    ("invalid utf-8", b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"\xff"}]}}'),
    ("nan", b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a","x":NaN}]}}'),
]


@pytest.mark.parametrize("body", [b for _, b in UNREADABLE], ids=[i for i, _ in UNREADABLE])
async def test_unreadable_json_is_an_error(body: bytes) -> None:
    decide = FakeDecide()
    with pytest.raises(FilterError, match=r"^tools/list answer: "):
        await filter_json(body, decide, None)
    assert decide.calls == []


@pytest.mark.parametrize("reason", ["pdp_timeout", "pdp_error_status", "circuit_open"])
async def test_a_reason_from_decide_is_an_error_carrying_it(reason: str) -> None:
    decide = FakeDecide(answer=reason)
    with pytest.raises(FilterError) as caught:
        await filter_json(orjson.dumps(answer(TOOLS)), decide, V2026)
    assert str(caught.value) == reason
    assert decide.calls == [["read_file", "shell", "search", "write_file"]]


async def test_an_answer_wrapped_in_an_array_is_filtered() -> None:
    # Some clients (the TypeScript SDK) accept an array of messages as the answer to a single request: the list
    # inside must not get through unfiltered.
    decide = FakeDecide()
    out, removed = await filter_json(orjson.dumps([answer(TOOLS)]), decide, None)
    assert load(out) == [answer(ALLOWED)]
    assert removed == ["shell"]
    assert decide.calls == [["read_file", "shell", "search", "write_file"]]


async def test_an_array_with_another_result_is_an_error_for_a_single_request() -> None:
    with pytest.raises(FilterError, match="without a tools list"):
        await filter_json(orjson.dumps([answer(TOOLS), {"jsonrpc": "2.0", "id": 2, "result": {}}]), FakeDecide(), None)


async def test_a_batch_answer_filters_the_tools_results_only() -> None:
    decide = FakeDecide()
    ping = {"jsonrpc": "2.0", "id": 1, "result": {}}
    call = {"jsonrpc": "2.0", "id": 3, "result": {"content": [{"type": "text", "text": "shell"}]}}
    error = {"jsonrpc": "2.0", "id": 4, "error": {"code": -32601, "message": "no"}}
    body = orjson.dumps([ping, answer(TOOLS, 2), call, error])
    out, removed = await filter_json(body, decide, None, batch=True)
    assert load(out) == [ping, answer(ALLOWED, 2), call, error]
    assert removed == ["shell"]
    assert decide.calls == [["read_file", "shell", "search", "write_file"]]


async def test_a_batch_answer_with_a_broken_tools_result_is_an_error() -> None:
    body = orjson.dumps([{"jsonrpc": "2.0", "id": 1, "result": {}}, answer("shell", 2)])
    with pytest.raises(FilterError, match="without a tools list"):
        await filter_json(body, FakeDecide(), None, batch=True)


# --- SSE answers --------------------------------------------------------------------------------------------------

NOTE = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1, "total": 2}})
SERVER_REQUEST = orjson.dumps({"jsonrpc": "2.0", "id": "s-1", "method": "ping"})
RESULT = orjson.dumps(answer(TOOLS, 1))
FILTERED = orjson.dumps(answer(ALLOWED, 1))


async def test_sse_rewrites_only_the_result_event() -> None:
    decide = FakeDecide()
    head = b": ping\n\nevent: message\nid: 1\ndata: " + NOTE + b"\n\nid: 2\ndata:" + SERVER_REQUEST + b"\n\n"
    tail = b"\n\n: keep-alive\n\nevent: message\ndata: " + NOTE + b"\n\n"
    body = head + b"event: message\nid: 3\nretry: 500\ndata: " + RESULT + tail
    out, removed = await filter_sse(body, decide, None)
    assert out == head + b"event: message\nid: 3\nretry: 500\ndata: " + FILTERED + tail
    assert removed == ["shell"]
    assert decide.calls == [["read_file", "shell", "search", "write_file"]]


async def test_sse_without_a_result_passes_byte_for_byte() -> None:
    decide = FakeDecide()
    error = orjson.dumps({"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "no"}})
    body = b": ping\n\nid: 1\ndata: " + NOTE + b"\n\nid: 2\nevent: message\ndata: " + error + b"\n\n: bye\n"
    out, removed = await filter_sse(body, decide, V2026)
    assert out == body
    assert (removed, decide.calls) == ([], [])


async def test_sse_multi_line_data_is_joined_then_rewritten_as_one_line() -> None:
    decide = FakeDecide()
    pretty = orjson.dumps(answer(TOOLS), option=orjson.OPT_INDENT_2)
    event = b"id: 9\n" + b"\n".join(b"data: " + line for line in pretty.split(b"\n")) + b"\n\n"
    out, removed = await filter_sse(event, decide, None)
    assert out == b"id: 9\ndata: " + orjson.dumps(answer(ALLOWED)) + b"\n\n"
    assert removed == ["shell"]


async def test_sse_data_without_a_space_after_the_colon() -> None:
    out, removed = await filter_sse(b"data:" + RESULT + b"\n\n", FakeDecide(), None)
    assert out == b"data: " + FILTERED + b"\n\n"
    assert removed == ["shell"]


async def test_sse_cache_scope_on_2026() -> None:
    out, _ = await filter_sse(b"event: message\ndata: " + RESULT + b"\n\n", FakeDecide(), V2026)
    data = out.split(b"data: ", 1)[1].split(b"\n", 1)[0]
    assert load(data)["result"] == {"tools": ALLOWED, "cacheScope": "private"}
    out, _ = await filter_sse(b"event: message\ndata: " + RESULT + b"\n\n", FakeDecide(), "2025-06-18")
    data = out.split(b"data: ", 1)[1].split(b"\n", 1)[0]
    assert "cacheScope" not in load(data)["result"]


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"], ids=["crlf", "cr"])
async def test_sse_other_line_endings(newline: bytes) -> None:
    decide = FakeDecide()
    events = [b": ping", b"id: 1\ndata: " + NOTE, b"event: message\nid: 2\ndata: " + RESULT, b""]
    body = b"\n\n".join(events).replace(b"\n", newline)
    out, removed = await filter_sse(body, decide, None)
    assert removed == ["shell"]
    assert decide.calls == [["read_file", "shell", "search", "write_file"]]
    # The line endings are normalised to LF; every event keeps its fields, only the result's data changes.
    assert out == b": ping\n\nid: 1\ndata: " + NOTE + b"\n\nevent: message\nid: 2\ndata: " + FILTERED + b"\n\n"
    assert b"shell" not in out


async def test_sse_mixed_line_endings() -> None:
    body = b"id: 1\r\ndata: " + NOTE + b"\n\r\nevent: message\rdata: " + RESULT + b"\r\n\r\n"
    out, removed = await filter_sse(body, FakeDecide(), None)
    assert removed == ["shell"]
    assert b"shell" not in out
    assert out.endswith(b"event: message\ndata: " + FILTERED + b"\n\n")


async def test_sse_leading_byte_order_mark() -> None:
    # An event stream may start with a BOM, which SSE parsers skip: the first event is still a data event.
    out, removed = await filter_sse(b"\xef\xbb\xbfdata: " + RESULT + b"\n\n", FakeDecide(), None)
    assert removed == ["shell"]
    assert b"shell" not in out


async def test_sse_array_data_is_filtered() -> None:
    out, removed = await filter_sse(b"data: [" + RESULT + b"]\n\n", FakeDecide(), None)
    assert load(out.removeprefix(b"data: ")) == [answer(ALLOWED)]
    assert removed == ["shell"]


async def test_sse_unreadable_data_is_an_error() -> None:
    decide = FakeDecide()
    with pytest.raises(FilterError, match=r"^tools/list answer: "):
        await filter_sse(b"data: " + NOTE + b"\n\ndata: not json\n\n", decide, None)
    dup = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a","name":"shell"}]}}'
    with pytest.raises(FilterError, match=r"^tools/list answer: "):
        await filter_sse(b"data: " + dup + b"\n\n", decide, None)
    assert decide.calls == []


async def test_sse_result_without_tools_is_an_error() -> None:
    with pytest.raises(FilterError, match="without a tools list"):
        await filter_sse(b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n', FakeDecide(), None)


async def test_sse_a_reason_from_decide_is_an_error_carrying_it() -> None:
    decide = FakeDecide(answer="pdp_unreachable")
    with pytest.raises(FilterError) as caught:
        await filter_sse(b": ping\n\ndata: " + RESULT + b"\n\n", decide, None)
    assert str(caught.value) == "pdp_unreachable"
    assert len(decide.calls) == 1


async def test_sse_without_a_final_blank_line() -> None:
    out, removed = await filter_sse(b"id: 1\ndata: " + RESULT, FakeDecide(), None)
    assert out == b"id: 1\ndata: " + FILTERED
    assert removed == ["shell"]
