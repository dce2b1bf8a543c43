"""The sans-IO parts of deciding MCP answers and replies: pep/protocols/mcp_answer.py, mcp_tokens.py and
mcp_replies.py. Messages in, classes, facts, rewritten values and sealed ids out; no socket, no PDP."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from pep.decision import Reason
from pep.protocols import NO_ID, Inspected, Refused, mcp
from pep.protocols.mcp_answer import (
    Response,
    ServerMessage,
    Stray,
    Stream,
    Unreadable,
    filtered,
    input_requests,
    listed,
    server_facts,
)
from pep.protocols.mcp_replies import reply_facts, restore
from pep.protocols.mcp_tokens import TOKEN_TTL_S, Tokens
from pep.seal import Sealer

KEY = bytes(range(32))


def tokens(subject: str = "agent:spiffe://a", session: str | None = "s-1", now: float = 1000.0) -> Tokens:
    return Tokens(Sealer([KEY], clock=lambda: now), "mcp", subject, session, now=lambda: now)


def response(rpc_id: Any, result: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": {} if result is None else result}


# --- what an answer may carry ---------------------------------------------------------------------------------------


def test_a_post_answer_answers_its_own_requests_once() -> None:
    stream = Stream([(7, "tools/list"), ("a", "ping")])
    (first,) = stream.read(response(7))
    assert isinstance(first, Response)
    assert first.answers == "tools/list"
    assert not stream.done  # decided, not yet relayed
    stream.answered(7)
    with pytest.raises(Unreadable):  # another response for the same request
        stream.read(response(7))
    with pytest.raises(Unreadable):  # the id of another request of the session, or of nothing
        stream.read(response(8))
    with pytest.raises(Unreadable):  # "a" is not 'a' as a number, nor 1 as "1"
        Stream([(1, "ping")]).read(response("1"))
    (second,) = stream.read(response("a"))
    stream.answered("a")
    assert isinstance(second, Response)
    assert stream.done


def test_an_error_with_a_null_id_answers_nothing() -> None:
    stream = Stream([(1, "tools/call")])
    (error,) = stream.read({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse"}})
    assert isinstance(error, Response)
    assert stream.pending == [(1, "tools/call")]


def test_a_get_stream_carries_no_response() -> None:
    stream = Stream([], get=True)
    items = stream.read([response(7), {"jsonrpc": "2.0", "method": "notifications/progress"}])
    assert [type(i) for i in items] == [Stray, ServerMessage]
    assert not stream.done  # a GET stream is never done


@pytest.mark.parametrize(
    "value",
    [
        [],
        {"jsonrpc": "1.0", "id": 1, "result": {}},
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}},
        {"jsonrpc": "2.0", "Id": 1, "result": {}},  # a case-insensitive client reads it as `id`
        {"jsonrpc": "2.0", "id": True, "method": "ping"},
        {"jsonrpc": "2.0", "method": ""},
        {"jsonrpc": "2.0", "method": "x", "params": 3},
        # a request with an outcome: the 2.x SDK client reads the first as an error answering its call 1
        {"jsonrpc": "2.0", "id": 1, "method": "ping", "error": {"code": 1, "message": "x"}},
        {"jsonrpc": "2.0", "method": "notifications/message", "error": {"code": 1, "message": "x"}},
        {"jsonrpc": "2.0", "id": 2, "method": "ping", "result": {}},
        "text",
    ],
)
def test_what_is_not_a_json_rpc_message_is_unreadable(value: Any) -> None:
    with pytest.raises(Unreadable):
        Stream([(1, "ping")]).read(value)


# --- lists ----------------------------------------------------------------------------------------------------------


def test_a_list_is_filtered_to_the_visible_names() -> None:
    message = response(1, {"tools": [{"name": "a"}, {"name": "b"}, {"title": "no name"}], "nextCursor": "c"})
    assert listed(message["result"], "tools/list")[1] == ["a", "b"]
    new, removed = filtered(message, "tools/list", {"a"}, "2025-11-25")
    assert new["result"] == {"tools": [{"name": "a"}], "nextCursor": "c"}
    assert removed == ["b", "<unnamed>"]
    new, _ = filtered(message, "tools/list", {"a"}, "2026-07-28")
    assert new["result"]["cacheScope"] == "private"


@pytest.mark.parametrize(
    ("method", "result"),
    [
        ("tools/list", {"items": []}),
        ("tools/list", {"tools": {}}),
        ("tools/list", {"tools": [], "Tools": [{"name": "shell"}]}),
        ("tools/list", {"tools": [{"Name": "shell"}]}),
        ("prompts/list", {"tools": []}),
        ("resources/list", []),
    ],
)
def test_an_unreadable_list_is_never_passed(method: str, result: Any) -> None:
    with pytest.raises(Unreadable):
        listed(result, method)


# --- server requests ------------------------------------------------------------------------------------------------


def test_server_facts() -> None:
    sampling = {"messages": [], "tools": [{"name": "search"}, {"name": "shell"}, {"x": 1}]}
    assert server_facts("sampling/createMessage", sampling, None)["tools"] == ["search", "shell"]
    form = {"message": "Session expired", "requestedSchema": {"properties": {"api_key": {}, "email": {}}}}
    facts = server_facts("elicitation/create", form, "2025-11-25")
    assert facts == {
        "method": "elicitation/create",
        "name": None,
        "arguments": None,
        "protocol_version": "2025-11-25",
        "direction": "server_to_client",
        "fields": ["api_key", "email"],
    }
    url = server_facts("elicitation/create", {"mode": "url", "url": "https://x.example/pay"}, None)
    assert (url["name"], url["fields"]) == ("https://x.example/pay", [])
    with pytest.raises(Unreadable):
        server_facts("elicitation/create", {"requestedSchema": {"Properties": {}}}, None)
    with pytest.raises(Unreadable):
        server_facts("sampling/createMessage", {"Tools": [{"name": "shell"}]}, None)


def test_input_required_results() -> None:
    embedded = {"k1": {"method": "elicitation/create", "params": {"requestedSchema": {"properties": {}}}}}
    message = response(1, {"resultType": "input_required", "inputRequests": embedded, "requestState": "s"})
    assert input_requests(message) == {"k1": ("elicitation/create", embedded["k1"]["params"])}
    # Read whatever its resultType: the SDKs take a result that is nothing else for one.
    assert input_requests(response(1, {"inputRequests": embedded})) is not None
    assert input_requests(response(1, {"content": []})) is None
    with pytest.raises(Unreadable):
        input_requests(response(1, {"resultType": "input_required", "inputRequests": {"k": {"Method": "x"}}}))


# --- tokens ---------------------------------------------------------------------------------------------------------


def test_a_token_opens_only_for_its_route_caller_and_session() -> None:
    token = tokens().request_id(5, "elicitation/create")
    assert tokens().open_request_id(token) == (5, "elicitation/create")
    assert "another caller" in str(tokens(subject="agent:spiffe://b").open_request_id(token))
    assert "another session" in str(tokens(session="s-2").open_request_id(token))
    other_route = Tokens(Sealer([KEY], clock=lambda: 1000.0), "mcp2", "agent:spiffe://a", "s-1", now=lambda: 1000.0)
    assert "another route" in str(other_route.open_request_id(token))
    assert "expired" in str(tokens(now=1000.0 + TOKEN_TTL_S).open_request_id(token))
    assert isinstance(tokens().open_input_key(token), str)  # sealed for another purpose
    assert isinstance(tokens().open_request_id("5"), str)
    assert isinstance(tokens().open_request_id(5), str)


def test_event_ids_carry_the_requests_still_unanswered() -> None:
    token = tokens().event_id("ev-3", [(7, "tools/list")], "2025-11-25")
    opened = tokens().open_event_id(token)
    assert not isinstance(opened, str)
    assert (opened.event_id, opened.pending, opened.version) == ("ev-3", ((7, "tools/list"),), "2025-11-25")
    opened = tokens().open_event_id(tokens().event_id("ev-4", None, None))
    assert not isinstance(opened, str)
    assert opened.pending is None


# --- replies --------------------------------------------------------------------------------------------------------


def inspect(body: Any) -> Inspected:
    result = mcp.inspect(orjson.dumps(body), CIMultiDict())
    assert isinstance(result, Inspected)
    return result


def test_a_reply_is_decided_by_what_it_answers_and_forwarded_with_the_servers_id() -> None:
    t = tokens()
    sealed = t.request_id(5, "elicitation/create")
    reply = {"jsonrpc": "2.0", "id": sealed, "result": {"action": "accept", "content": {"api_key": "sk-1"}}}
    restored = restore(inspect(reply), t, filter_tools=False)
    assert isinstance(restored, Inspected)
    (message,) = restored.messages
    assert message.facts == {
        "method": "mcp/response",
        "name": None,
        "arguments": {"api_key": "sk-1"},
        "protocol_version": None,
        "direction": "client_to_server",
        "replies_to": "elicitation/create",
        "fields": ["api_key"],
    }
    assert orjson.loads(restored.body or b"") == {**reply, "id": 5}  # the server gets its own id back


def test_a_reply_nobody_asked_for_is_refused() -> None:
    reply = {"jsonrpc": "2.0", "id": 5, "result": {}}
    refused = restore(inspect(reply), tokens(), filter_tools=False)
    assert isinstance(refused, Refused)
    assert refused.reason is Reason.REQUEST_AMBIGUOUS
    other = tokens(subject="agent:other").request_id(5, "ping")
    assert isinstance(restore(inspect({**reply, "id": other}), tokens(), filter_tools=False), Refused)


def test_a_sampling_reply_names_the_tools_used_and_each_must_be_visible() -> None:
    t = tokens()
    result = {"role": "assistant", "model": "m", "content": [{"type": "tool_use", "name": "shell", "id": "u"}]}
    reply = {"jsonrpc": "2.0", "id": t.request_id("s", "sampling/createMessage"), "result": result}
    restored = restore(inspect(reply), t, filter_tools=True)
    assert isinstance(restored, Inspected)
    first, visibility = restored.messages
    assert (first.facts["replies_to"], first.facts["tools"]) == ("sampling/createMessage", ["shell"])
    assert (visibility.facts["method"], visibility.facts["name"]) == ("tools/list", "shell")
    assert visibility.rpc_id is NO_ID  # decided with the reply, never answered


@pytest.mark.parametrize(
    ("answers", "result"),
    [
        ("elicitation/create", {"action": "accept", "Content": {"api_key": "sk-1"}}),
        ("sampling/createMessage", {"role": "assistant", "CONTENT": [{"type": "tool_use", "name": "shell"}]}),
        ("sampling/createMessage", {"role": "assistant", "content": [{"Type": "tool_use", "name": "shell"}]}),
        ("sampling/createMessage", {"role": "assistant", "content": {"type": "tool_use", "Name": "shell"}}),
    ],
    ids=["elicitation Content", "sampling CONTENT", "tool_use Type", "tool_use Name"],
)
def test_a_reply_key_spelled_another_way_is_ambiguous(answers: str, result: dict[str, Any]) -> None:
    """A Go server binds `Content` to `content`: the policy would see no fields (or no tool used) where the server
    gets them. Refused as a reply and as an input response."""
    t = tokens()
    reply = {"jsonrpc": "2.0", "id": t.request_id(5, answers), "result": result}
    refused = restore(inspect(reply), t, filter_tools=True)
    assert isinstance(refused, Refused)
    assert refused.reason is Reason.REQUEST_AMBIGUOUS
    params = {"name": "search", "inputResponses": {t.input_key("k1", answers): result}}
    retry = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": params}
    refused = restore(inspect(retry), t, filter_tools=True)
    assert isinstance(refused, Refused)
    assert refused.reason is Reason.REQUEST_AMBIGUOUS


def test_a_retry_carries_its_input_responses_under_the_servers_keys() -> None:
    t = tokens()
    key = t.input_key("ask-1", "elicitation/create")
    retry: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "tools/call",
        "params": {
            "name": "deploy",
            "arguments": {},
            "inputResponses": {key: {"action": "accept", "content": {"password": "x"}}},
            "requestState": "opaque",
        },
    }
    restored = restore(inspect(retry), t, filter_tools=False)
    assert isinstance(restored, Inspected)
    call, reply = restored.messages
    assert (call.facts["method"], call.rpc_id) == ("tools/call", 9)
    assert (reply.facts["replies_to"], reply.facts["fields"]) == ("elicitation/create", ["password"])
    forwarded = orjson.loads(restored.body or b"")
    assert forwarded["params"]["inputResponses"] == {"ask-1": {"action": "accept", "content": {"password": "x"}}}
    assert forwarded["params"]["requestState"] == "opaque"
    forged = {**retry, "params": {**retry["params"], "inputResponses": {"ask-1": {}}}}
    assert isinstance(restore(inspect(forged), t, filter_tools=False), Refused)


def test_reply_facts_of_an_error_reply() -> None:
    facts = reply_facts("roots/list", {"error": {"code": -1, "message": "no"}}, None)
    assert facts["replies_to"] == "roots/list"
    assert "fields" not in facts


def test_completion_names_its_target() -> None:
    (message,) = inspect(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "completion/complete",
            "params": {"ref": {"type": "ref/prompt", "name": "refund_reply"}, "argument": {"name": "o", "value": "A"}},
        }
    ).messages
    assert (message.facts["name"], message.facts["ref_type"], message.facts["argument"]) == (
        "refund_reply",
        "ref/prompt",
        "o",
    )
    (resource,) = inspect(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "completion/complete",
            "params": {"ref": {"type": "ref/resource", "uri": "file:///{p}"}, "argument": {"name": "p", "value": ""}},
        }
    ).messages
    assert (resource.facts["name"], resource.facts["ref_type"]) == ("file:///{p}", "ref/resource")
    bad = mcp.inspect(
        orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "completion/complete", "params": {"ref": {"type": "x"}}}),
        CIMultiDict(),
    )
    assert isinstance(bad, Refused)


def test_what_a_body_adds_to_decide_counts_against_the_batch_bound() -> None:
    """A sampling reply naming one tool a thousand times is one visibility decision; answers beyond the route's
    `max_batch_messages` are refused before the PDP is asked, as a long batch is."""
    t = tokens()
    used = [{"type": "tool_use", "name": "search", "id": str(i), "input": {}} for i in range(1000)]
    reply = {
        "jsonrpc": "2.0",
        "id": t.request_id("s", "sampling/createMessage"),
        "result": {"role": "assistant", "model": "m", "content": used},
    }
    restored = restore(inspect(reply), t, filter_tools=True)
    assert isinstance(restored, Inspected)
    assert [m.facts["method"] for m in restored.messages] == ["mcp/response", "tools/list"]
    answers = {t.input_key(f"k{i}", "elicitation/create"): {"action": "decline"} for i in range(20)}
    retry = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x", "inputResponses": answers}}
    refused = restore(inspect(retry), t, filter_tools=False, max_messages=16)
    assert isinstance(refused, Refused)
    assert refused.reason is Reason.BODY_TOO_LARGE
    assert isinstance(restore(inspect(retry), t, filter_tools=False, max_messages=21), Inspected)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
MESSAGES = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0")},
    optional={
        "id": st.sampled_from([1, "1", 7, None, True]),
        "method": st.sampled_from(["ping", "sampling/createMessage", "elicitation/create", "", 3]),
        "params": JSON | st.fixed_dictionaries({"tools": JSON, "requestedSchema": JSON, "url": JSON, "mode": JSON}),
        "result": JSON
        | st.fixed_dictionaries({"tools": JSON, "inputRequests": JSON, "resultType": st.just("input_required")}),
        "error": JSON,
    },
)


@settings(max_examples=400, deadline=None)
@given(MESSAGES | st.lists(MESSAGES, max_size=3) | JSON, st.booleans())
def test_an_answer_is_read_or_unreadable_never_anything_else(value: Any, get: bool) -> None:
    stream = Stream([] if get else [(1, "tools/list"), (7, "tools/call")], get=get)
    try:
        incoming = stream.read(value)
        for message in incoming:
            if isinstance(message, Response) and "result" in message.message:
                if message.answers == "tools/list":
                    filtered(message.message, "tools/list", {"search"}, None)
                input_requests(message.message)
            if isinstance(message, ServerMessage):
                server_facts(message.method, message.params, None)
    except Unreadable:
        return
    for message in incoming:
        if isinstance(message, Response) and message.rpc_id is not None:
            assert not get  # a GET stream answers nothing
            assert (type(message.rpc_id), message.rpc_id) in {(int, 1), (int, 7)}  # exactly a pending id
