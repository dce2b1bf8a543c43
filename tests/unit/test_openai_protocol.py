"""pep.protocols.openai: which requests invoke a model, and the `model` facts read from their bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pep.decision import Reason
from pep.protocols import NO_ID, Inspected, Refused, openai


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/chat/completions/",
        "/v1/completions/",
        "/v1/embeddings/",
        "/v1/responses/",
        "/openai/deployments/x/chat/completions",
        "/chat/completions",
    ],
)
def test_model_endpoints_are_inspected(path: str) -> None:
    assert openai.invokes_model("POST", path)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/responses"),
        ("DELETE", "/v1/responses"),
        ("PUT", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("POST", "/v1/models"),
        ("POST", "/v1/files"),
        ("POST", "/v1/chat/completionsx"),
        ("POST", "/v1/chat/completions/x"),
        ("post", "/v1/chat/completions"),  # aiohttp hands methods over upper-cased
    ],
)
def test_other_requests_are_not_inspected(method: str, path: str) -> None:
    assert not openai.invokes_model(method, path)


def ok(body: Any) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    result = openai.inspect(raw)
    assert isinstance(result, Inspected), result
    assert result.body == raw
    assert not result.batch
    assert len(result.messages) == 1
    message = result.messages[0]
    assert message.key == "model"
    assert message.rpc_id is NO_ID
    return message.facts


def refused(body: Any) -> Reason:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    result = openai.inspect(raw)
    assert isinstance(result, Refused), result
    assert result.detail
    return result.reason


def test_chat_facts() -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "send_email"}},
        ],
        "tool_choice": "auto",
    }
    assert ok(body) == {"name": "gpt-4o-mini", "stream": True, "tools": ["get_weather", "send_email"]}


def test_defaults_without_stream_and_tools() -> None:
    assert ok({"model": "m", "messages": []}) == {"name": "m", "stream": False, "tools": []}
    assert ok({"model": "m", "tools": None, "stream": False}) == {"name": "m", "stream": False, "tools": []}
    assert ok({"model": "m", "tools": []})["tools"] == []


def test_responses_api_tools() -> None:
    body = {
        "model": "gpt-4.1",
        "input": "what is the weather",
        "tools": [
            {"type": "function", "name": "get_weather", "parameters": {}},
            {"type": "web_search"},
            {"type": "file_search", "vector_store_ids": ["vs_1"]},
            {"type": "code_interpreter", "container": {"type": "auto"}},
        ],
    }
    assert ok(body)["tools"] == ["get_weather", "web_search", "file_search", "code_interpreter"]


def test_embeddings_and_completions() -> None:
    assert ok({"model": "text-embedding-3-small", "input": ["a", "b"]}) == {
        "name": "text-embedding-3-small",
        "stream": False,
        "tools": [],
    }
    assert ok({"model": "gpt-3.5-turbo-instruct", "prompt": "x", "stream": True})["stream"] is True


def test_odd_bytes_are_kept() -> None:
    raw = b' {\n  "stream" : false ,"model":"m\\u00e9",\t"tools":[ ] }\r\n'
    assert ok(raw) == {"name": "m\u00e9", "stream": False, "tools": []}


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"model": ""},
        {"model": None},
        {"model": 4},
        {"model": ["gpt-4o"]},
        {"model": {"name": "gpt-4o"}},
        {"model": True},
    ],
)
def test_model_must_be_a_non_empty_string(body: Any) -> None:
    assert refused(body) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize("stream", ["true", 1, 0, None, {}, []])
def test_stream_must_be_a_boolean(stream: Any) -> None:
    assert refused({"model": "m", "stream": stream}) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize("tools", [{"type": "function"}, "web_search", 1, True])
def test_tools_must_be_a_list(tools: Any) -> None:
    assert refused({"model": "m", "tools": tools}) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize(
    "tool",
    [
        {},
        {"description": "no name"},
        {"function": {"description": "no name"}},
        {"type": "function", "function": {"description": "no name"}},
        {"type": "function", "function": {"name": None}},
        {"type": "function"},
        {"type": "function", "function": {"name": 5}},
        {"type": 5},
        {"name": ["a"]},
        "get_weather",
        ["get_weather"],
        None,
    ],
)
def test_a_tool_without_a_name_is_refused(tool: Any) -> None:
    assert refused({"model": "m", "tools": [{"type": "function", "function": {"name": "ok"}}, tool]}) is (
        Reason.BODY_UNREADABLE
    )


def test_a_tool_named_twice_is_refused() -> None:
    """A Responses-style `name` and a chat-style `function.name` that differ: which one runs depends on the
    server, so the policy cannot be shown one of them."""
    tool = {"type": "function", "name": "delete_everything", "function": {"name": "get_weather"}}
    assert refused({"model": "m", "tools": [tool]}) is Reason.BODY_UNREADABLE
    same = {"type": "function", "name": "get_weather", "function": {"name": "get_weather"}}
    assert ok({"model": "m", "tools": [same]})["tools"] == ["get_weather"]


def test_legacy_functions_are_tools() -> None:
    """Chat completions still accept the deprecated `functions` list: those are tools the model may call."""
    body = {"model": "m", "functions": [{"name": "delete_everything", "parameters": {}}]}
    assert ok(body)["tools"] == ["delete_everything"]
    body = {"model": "m", "tools": [{"type": "function", "function": {"name": "a"}}], "functions": [{"name": "b"}]}
    assert ok(body)["tools"] == ["a", "b"]
    assert refused({"model": "m", "functions": [{"description": "x"}]}) is Reason.BODY_UNREADABLE
    assert refused({"model": "m", "functions": {"name": "b"}}) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"allowed","model":"forbidden"}',
        b'{"model":"m","stream":false,"stream":true}',
        b'{"model":"m","tools":[{"type":"function","function":{"name":"a","name":"b"}}]}',
        b'{"model":"m","metadata":{"k":1,"k":2}}',
    ],
)
def test_duplicate_keys_are_refused(raw: bytes) -> None:
    assert refused(raw) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'[{"model":"m"}]',
        b'"m"',
        b"null",
        b"{",
        b'{"model":"m"} {"model":"n"}',
        b'{"model":"\xff"}',
        b'{"model":"m","x":NaN}',
        b'{"model":"m","temperature":Infinity}',
    ],
)
def test_not_one_json_object_is_refused(raw: bytes) -> None:
    assert refused(raw) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize("path", ["/v1/chat/completions;x", "/v1/chat;x/completions", "/v1;a/embeddings;b/"])
def test_model_endpoints_behind_path_parameters_are_still_read(path: str) -> None:
    assert openai.invokes_model("POST", path)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"gpt-ok","MODEL":"gpt-evil","messages":[]}',
        b'{"Model":"gpt-evil","messages":[]}',
        b'{"model":"m","Stream":true}',
        b'{"model":"m","TOOLS":[{"type":"function","function":{"name":"shell"}}]}',
        b'{"model":"m","Functions":[{"name":"shell"}]}',
        b'{"model":"m","tools":[{"type":"function","Function":{"name":"shell"}}]}',
        b'{"model":"m","tools":[{"type":"function","function":{"name":"ok","Name":"shell"}}]}',
        b'{"model":"m","tools":[{"type":"function","function":{"NAME":"shell"}}]}',
        b'{"model":"m","tools":[{"Type":"web_search"}]}',
        b'{"model":"m","functions":[{"Name":"shell"}]}',
        b'{"model":"m","messages":[{"role":"user","Role":"system","content":"x"}]}',
        '{"model":"m","\u017ftream":true}'.encode(),
        '{"model":"m","tool\u017f":[]}'.encode(),
    ],
)
def test_keys_equal_under_case_folding_are_ambiguous(raw: bytes) -> None:
    assert refused(raw) is Reason.REQUEST_AMBIGUOUS


def test_other_keys_may_use_any_case() -> None:
    assert ok(b'{"model":"m","Temperature":1,"messages":[{"Role":"user"}]}')["name"] == "m"
