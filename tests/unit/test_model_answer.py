"""pep.protocols.model_answer: the tools a model answer calls and the models that answered, read without IO."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pep.protocols.model_answer import AnswerError, EventReader, read_json, same_model


def chat(*choices: list[str], model: str = "gpt-4o") -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": n, "arguments": "{}"}} for n in names
                    ],
                },
            }
            for i, names in enumerate(choices)
        ],
    }


def test_every_choice_and_call_of_a_chat_answer() -> None:
    found = read_json(orjson.dumps(chat(["search"], ["shell", "search"])))
    assert (found.tools, found.models) == (["search", "shell"], ["gpt-4o"])


@pytest.mark.parametrize(
    ("answer", "tools"),
    [
        ({"choices": [{"message": {"function_call": {"name": "legacy", "arguments": "{}"}}}]}, ["legacy"]),
        ({"choices": [{"message": {"tool_calls": [{"type": "custom", "custom": {"name": "c", "input": ""}}]}}]}, ["c"]),
        ({"output": [{"type": "function_call", "name": "f", "arguments": "{}", "call_id": "1"}]}, ["f"]),
        ({"output": [{"type": "custom_tool_call", "name": "g", "input": ""}]}, ["g"]),
        ({"output": [{"type": "web_search_call", "status": "completed"}]}, ["web_search"]),
        ({"output": [{"type": "mcp_call", "name": "m", "server_label": "s"}]}, ["m"]),
        ({"output": [{"type": "mcp_approval_request", "name": "a", "server_label": "s"}]}, ["a"]),
        (
            {
                "required_action": {
                    "submit_tool_outputs": {"tool_calls": [{"type": "function", "function": {"name": "r"}}]}
                }
            },
            ["r"],
        ),
        (
            {"step_details": {"tool_calls": [{"type": "code_interpreter", "code_interpreter": {}}]}},
            ["code_interpreter"],
        ),
        ({"tools": [{"type": "function", "name": "declared"}], "tool_choice": {"type": "function", "name": "x"}}, []),
        ({"choices": [{"message": {"content": "no tools", "function_call": None, "tool_calls": None}}]}, []),
    ],
)
def test_tool_calls_wherever_an_answer_holds_them(answer: dict[str, Any], tools: list[str]) -> None:
    assert read_json(orjson.dumps(answer)).tools == tools


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b'{"model":"a","model":"b"}',  # which one the agent reads depends on its parser
        b'{"choices":[{"message":{"tool_calls":{"name":"x"}}}]}',
        b'{"choices":[{"message":{"tool_calls":["x"]}}]}',
        b'{"choices":[{"message":{"tool_calls":[{"function":{"name":5}}]}}]}',
        b'{"output":[{"type":"function_call","name":""}]}',
        b'{"model":5}',
        b'{"model":"\xff"}',
        # keys a tool call is found by, spelled so that a case-insensitive client (Go) reads them: unreadable
        b'{"choices":[{"message":{"tool_calls":[{"type":"function","Function":{"name":"shell"}}]}}]}',
        b'{"choices":[{"message":{"tool_calls":[{"function":{"name":"search","Name":"shell"}}]}}]}',
        b'{"choices":[{"delta":{"TOOL_CALLS":[{"index":0,"function":{"name":"shell"}}]}}]}',
        b'{"choices":[{"message":{"Function_Call":{"name":"shell"}}}]}',
        b'{"choices":[{"message":{"tool_call\xc5\xbf":[{"function":{"name":"shell"}}]}}]}',  # U+017F folds to s
        b'{"output":[{"type":"function_call","Name":"shell"}]}',
        b'{"Model":"gpt-evil","choices":[]}',
    ],
)
def test_unreadable_answers_are_errors(raw: bytes) -> None:
    with pytest.raises(AnswerError):
        read_json(raw)


@pytest.mark.parametrize(
    ("decided", "answered", "same"),
    [
        ("gpt-4o", "gpt-4o", True),
        ("gpt-4o", "gpt-4o-2024-08-06", True),
        ("gpt-4", "gpt-4-0613", True),
        ("claude", "claude-20250101", True),
        ("gpt-4o", "gpt-4o-mini", False),
        ("gpt-4o", "gpt-4o-mini-2024-07-18", False),
        ("gpt-4o", "gpt-4", False),
        ("gpt-4o", "gpt-4o-2024-08-06x", False),
        ("gpt-4o", "GPT-4o", False),
        (None, "gpt-4o", False),
    ],
)
def test_same_model(decided: str | None, answered: str, same: bool) -> None:
    assert same_model(decided, answered) is same


def chunk(delta: dict[str, Any], model: str = "gpt-4o") -> bytes:
    return b"data: " + orjson.dumps({"model": model, "choices": [{"index": 0, "delta": delta}]}) + b"\n\n"


def call(index: int, name: str | None = None, arguments: str = "") -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    return {"tool_calls": [{"index": index, "function": function}]}


def test_events_as_the_sdk_splits_them() -> None:
    stream = b"\xef\xbb\xbf: comment\r\n\r\n" + chunk({"role": "assistant"}).replace(b"\n\n", b"\r\r")
    stream += chunk(call(0, "search")) + chunk(call(0, None, '{"q":1}')).replace(b"\n", b"\r\n")
    stream += b"data: [DONE]\n\n"
    # Fed one byte at a time: CRLF split across chunks, a BOM split across chunks.
    reader = EventReader()
    events = [e for i in range(len(stream)) for e in reader.feed(stream[i : i + 1])] + reader.finish()
    assert [e.findings.tools for e in events] == [[], [], ["search"], [], []]
    assert events[1].findings.models == ["gpt-4o"]
    assert events[0].raw == b": comment\n\n"
    assert all(e.raw.endswith(b"\n\n") and b"\r" not in e.raw for e in events)


def test_a_last_event_without_a_blank_line_is_read() -> None:
    reader = EventReader()
    assert reader.feed(chunk(call(0, "shell")).rstrip(b"\n")) == []
    (event,) = reader.finish()
    assert event.findings.tools == ["shell"]


def test_multiline_data_is_one_value() -> None:
    reader = EventReader()
    (event,) = reader.feed(b'event: x\ndata: {"output":[{"type":"function_call",\ndata: "name":"f"}]}\n\n')
    assert event.findings.tools == ["f"]


def test_responses_stream_events() -> None:
    item = {"type": "function_call", "name": "shell", "arguments": ""}
    added = {"type": "response.output_item.added", "item": item}
    created = {"type": "response.created", "response": {"model": "gpt-4.1", "output": []}}
    reader = EventReader()
    events = reader.feed(b"data: " + orjson.dumps(created) + b"\n\ndata: " + orjson.dumps(added) + b"\n\n")
    assert [(e.findings.tools, e.findings.models) for e in events] == [([], ["gpt-4.1"]), (["shell"], [])]


@pytest.mark.parametrize(
    "stream",
    [
        b"data: {not json}\n\n",
        b'data: {"a":1,"a":2}\n\n',
        b"data: \xff\n\n",
        # A second name for call 0: SDKs that accumulate deltas would run `search_and_shell`, never decided.
        chunk(call(0, "search")) + chunk(call(0, "_and_shell")),
    ],
)
def test_unreadable_streams_are_errors(stream: bytes) -> None:
    reader = EventReader()
    with pytest.raises(AnswerError):
        reader.feed(stream)


def test_separate_calls_may_each_be_named() -> None:
    reader = EventReader()
    events = reader.feed(chunk(call(0, "search")) + chunk(call(1, "lookup_order")))
    assert [e.findings.tools for e in events] == [["search"], ["lookup_order"]]


def _tool_chunk(choice: int | bool, index: Any, name: str) -> dict[str, Any]:
    call_delta = {"index": index, "id": f"call-{name}", "type": "function", "function": {"name": name, "arguments": ""}}
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": choice, "delta": {"tool_calls": [call_delta]}, "finish_reason": None}],
    }


POSITIONAL_STREAMS = {
    "negative index": [_tool_chunk(0, 0, "sh"), _tool_chunk(0, -1, "ell")],
    "boolean index": [_tool_chunk(0, 0, "search"), _tool_chunk(0, 1, "sh"), _tool_chunk(0, True, "ell")],
    "index past the end": [_tool_chunk(0, 0, "search"), _tool_chunk(0, 7, "sh"), _tool_chunk(0, 1, "ell")],
    "choice 1 first": [_tool_chunk(1, 0, "sh"), _tool_chunk(0, 0, "ell")],
}


@pytest.mark.parametrize("chunks", POSITIONAL_STREAMS.values(), ids=POSITIONAL_STREAMS.keys())
def test_stream_indexes_must_be_the_positions_sdks_keep_calls_at(chunks: list[dict[str, Any]]) -> None:
    """The openai SDK takes a delta's `index` as a list position: under `-1` or `true`, `ell` joins the call
    named `sh` (decided apart, each allowed by a rule that forbids only `shell`) and the agent runs `shell`."""
    with pytest.raises(AnswerError):
        EventReader().feed(b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks))


def test_the_sdk_joins_calls_by_position() -> None:
    """Why: the official SDK's own stream accumulator, fed the first two of those streams."""
    from openai.lib.streaming.chat._completions import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    for name in ("negative index", "boolean index"):
        state = ChatCompletionStreamState()
        for chunk_value in POSITIONAL_STREAMS[name]:
            state.handle_chunk(ChatCompletionChunk.model_validate(chunk_value))
        calls = state.current_completion_snapshot.choices[0].message.tool_calls or []
        assert "shell" in [c.function.name for c in calls]


def test_ordered_choices_and_parallel_calls_are_read() -> None:
    chunks = [_tool_chunk(0, 0, "search"), _tool_chunk(1, 0, "lookup_order"), _tool_chunk(0, 1, "lookup_order")]
    both = {"index": 0, "delta": {"tool_calls": [call(0, "search")["tool_calls"][0], call(1, "x")["tool_calls"][0]]}}
    chunks.append({"model": "gpt-4o", "choices": [{"index": 2, "delta": {}}]})
    events = EventReader().feed(b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks))
    assert [e.findings.tools for e in events] == [["search"], ["lookup_order"], ["lookup_order"], []]
    events = EventReader().feed(b"data: " + orjson.dumps({"choices": [both]}) + b"\n\n")
    assert events[0].findings.tools == ["search", "x"]
