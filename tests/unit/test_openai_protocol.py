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
        ("post", "/v1/chat/completions"),  # aiohttp hands methods over upper-cased
    ],
)
def test_other_requests_are_not_inspected(method: str, path: str) -> None:
    assert not openai.invokes_model(method, path)
    assert openai.classify(method, path) is None


CHAT = {"action": "model.invoke", "endpoint": "chat.completions", "read": True, "n": 1}


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
    assert ok(body) == {**CHAT, "name": "gpt-4o-mini", "stream": True, "tools": ["get_weather", "send_email"]}


def test_defaults_without_stream_and_tools() -> None:
    assert ok({"model": "m", "messages": []}) == {**CHAT, "name": "m", "stream": False, "tools": []}
    assert ok({"model": "m", "tools": None, "stream": False}) == {**CHAT, "name": "m", "stream": False, "tools": []}
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
        **CHAT,
        "name": "text-embedding-3-small",
        "stream": False,
        "tools": [],
    }
    assert ok({"model": "gpt-3.5-turbo-instruct", "prompt": "x", "stream": True})["stream"] is True


def test_odd_bytes_are_kept() -> None:
    raw = b' {\n  "stream" : false ,"model":"m\\u00e9",\t"tools":[ ] }\r\n'
    assert ok(raw) == {**CHAT, "name": "m\u00e9", "stream": False, "tools": []}


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


def test_at_most_max_tools_tools_and_functions() -> None:
    """Each name goes into the policy input twice: 80,000 of them (a 1 MiB body) took Cedar 0.2 s in the event
    loop. The bound counts tools and functions together."""
    tool = {"type": "function", "function": {"name": "a"}}
    assert len(ok({"model": "m", "tools": [tool] * openai.MAX_TOOLS})["tools"]) == openai.MAX_TOOLS
    assert refused({"model": "m", "tools": [tool] * (openai.MAX_TOOLS + 1)}) is Reason.BODY_TOO_LARGE
    half = openai.MAX_TOOLS // 2
    assert refused({"model": "m", "tools": [tool] * half, "functions": [{"name": "b"}] * (half + 1)}) is (
        Reason.BODY_TOO_LARGE
    )
    assert refused({"model": "m", "functions": [{"name": "b"}] * 80_000}) is Reason.BODY_TOO_LARGE


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


# --- which POSTs are which model calls (issue 14.4) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "path_model"),
    [
        ("/v1/chat/completions", "chat.completions", None),
        # Express and ASP.NET Core route paths case-insensitively: these are chat completions there.
        ("/v1/Chat/Completions", "chat.completions", None),
        ("/V1/CHAT/COMPLETIONS/", "chat.completions", None),
        ("/v1/chat//completions", "chat.completions", None),
        ("/v1/Chat;x/Completions;y/", "chat.completions", None),
        ("/openai/deployments/gpt-4o/chat/completions", "chat.completions", "gpt-4o"),
        ("/openai/Deployments/My-Dep/Chat/Completions", "chat.completions", "My-Dep"),
        ("/openai/deployments/my%20dep/embeddings", "embeddings", "my dep"),
        ("/v1/engines/davinci/completions", "completions", "davinci"),
        ("/deployments/chat/completions", "completions", "chat"),  # Azure reads deployment `chat`
        ("/v1/images/generations", "images.generations", None),
        ("/v1/images/edits", "images.edits", None),
        ("/v1/images/variations", "images.variations", None),
        ("/v1/audio/transcriptions", "audio.transcriptions", None),
        ("/openai/deployments/whisper/audio/translations", "audio.translations", "whisper"),
        ("/v1/audio/speech", "audio.speech", None),
        ("/v1/moderations", "moderations", None),
        ("/v1/threads/runs", "threads.runs", None),
        ("/v1/threads/thread_1/runs", "threads.runs", None),
        ("/v1/assistants", "assistants", None),
        ("/v1/assistants/asst_1", "assistants", None),
        ("/v1/fine_tuning/jobs", "fine_tuning.jobs", None),
        ("/v1/batches", "batches", None),
        ("/v1/Files", "files", None),
        ("/v1/uploads", "uploads", None),
        ("/v1/realtime/client_secrets", "realtime", None),
        ("/v1/models", "unknown", None),
        ("/v1/chat/completions/x", "unknown", None),
        ("/v1/chat/completionsx", "unknown", None),
        ("/v1/vector_stores", "unknown", None),
    ],
)
def test_every_post_is_a_model_call_of_a_kind(path: str, kind: str, path_model: str | None) -> None:
    call = openai.classify("POST", path)
    assert isinstance(call, openai.Call), call
    assert (call.endpoint.kind, call.path_model) == (kind, path_model)
    assert openai.invokes_model("POST", path) is call.read


@pytest.mark.parametrize("kind", ["batches", "files", "uploads", "realtime", "unknown"])
def test_unread_endpoints_say_so(kind: str) -> None:
    call = openai.classify("POST", {"unknown": "/v1/vector_stores"}.get(kind, f"/v1/{kind}"))
    assert isinstance(call, openai.Call)
    assert not call.read
    message = openai.unread_message(call)
    assert message.key == "model"
    assert message.facts == {
        "action": "model.invoke",
        "endpoint": kind,
        "name": None,
        "read": False,
        "stream": None,
        "n": None,
        "tools": [],
    }


@pytest.mark.parametrize(
    "path",
    [
        "/openai/deployments/a/deployments/b/chat/completions",
        "/openai/deployments/gpt-4o;x/chat/completions",
        "/v1/engines/%ff/completions",
    ],
)
def test_ambiguous_model_paths_are_refused(path: str) -> None:
    refused = openai.classify("POST", path)
    assert isinstance(refused, Refused)
    assert refused.reason is Reason.REQUEST_AMBIGUOUS


def inspect_at(path: str, body: Any, content_type: str | None = None) -> Inspected | Refused:
    call = openai.classify("POST", path)
    assert isinstance(call, openai.Call)
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return openai.inspect(raw, call, content_type)


def test_the_path_names_the_model_and_the_body_must_agree() -> None:
    """Azure serves the deployment the path names, whatever the body says: that name is decided."""
    path = "/openai/deployments/gpt-test-denied/chat/completions"
    result = inspect_at(path, {"model": "gpt-test-allowed", "messages": []})
    assert isinstance(result, Refused)
    assert result.reason is Reason.REQUEST_AMBIGUOUS
    same = inspect_at(path, {"model": "gpt-test-denied", "messages": []})
    assert isinstance(same, Inspected)
    assert same.messages[0].facts["name"] == "gpt-test-denied"
    bare = inspect_at(path, {"messages": []})  # the SDK's AzureOpenAI with azure_deployment may omit nothing
    assert isinstance(bare, Inspected)
    assert bare.messages[0].facts["name"] == "gpt-test-denied"


def test_n_is_a_fact() -> None:
    assert ok({"model": "m", "n": 3})["n"] == 3
    for n in (0, -1, True, "2", 1.5):
        assert refused({"model": "m", "n": n}) is Reason.BODY_UNREADABLE


@pytest.mark.parametrize("key", ["Model", "MODEL", "Stream", "Tools", "N", "Functions"])
def test_keys_differing_only_in_case_are_ambiguous(key: str) -> None:
    """ASP.NET Core's and Go's JSON binding is case-insensitive: `Model` would be the model it runs."""
    assert refused({"model": "gpt-test-allowed", key: "x"}) is Reason.REQUEST_AMBIGUOUS
    assert refused({key: "x"} if key != "N" else {"model": "m", "N": 2}) is Reason.REQUEST_AMBIGUOUS


def test_optional_models_left_out_are_unread() -> None:
    """Images, moderations and runs fall back to a default (or the assistant's) model the PEP cannot see."""
    for path in ("/v1/images/generations", "/v1/moderations", "/v1/threads/t/runs", "/v1/assistants/a"):
        result = inspect_at(path, {"prompt": "x"})
        assert isinstance(result, Inspected), path
        facts = result.messages[0].facts
        assert (facts["name"], facts["read"]) == (None, False), path
    for path in ("/v1/embeddings", "/v1/audio/speech", "/v1/fine_tuning/jobs", "/v1/responses", "/v1/assistants"):
        result = inspect_at(path, {"input": "x"})
        assert isinstance(result, Refused), path
        assert result.reason is Reason.BODY_UNREADABLE, path


def test_runs_override_the_model_and_tools() -> None:
    body = {"assistant_id": "a", "model": "gpt-4o", "tools": [{"type": "function", "function": {"name": "f"}}]}
    result = inspect_at("/v1/threads/thread_1/runs", body)
    assert isinstance(result, Inspected)
    facts = result.messages[0].facts
    assert (facts["endpoint"], facts["name"], facts["read"], facts["tools"]) == ("threads.runs", "gpt-4o", True, ["f"])


B = "----pepboundary7MA4YWxk"
FORM = f"multipart/form-data; boundary={B}"


def form(*parts: tuple[str, str], end: str = f"--{B}--\r\n") -> bytes:
    """Parts are (header block, content)."""
    out = "".join(f"--{B}\r\n{head}\r\n\r\n{content}\r\n" for head, content in parts)
    return (out + end).encode()


def field(name: str, value: str) -> tuple[str, str]:
    return (f'Content-Disposition: form-data; name="{name}"', value)


AUDIO = ('Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav', "RIFF....")


def test_multipart_model_is_read() -> None:
    body = form(AUDIO, field("model", "whisper-1"), field("stream", "true"))
    result = inspect_at("/v1/audio/transcriptions", body, FORM)
    assert isinstance(result, Inspected), result
    assert result.body == body
    facts = result.messages[0].facts
    assert (facts["endpoint"], facts["name"], facts["stream"], facts["read"]) == (
        "audio.transcriptions",
        "whisper-1",
        True,
        True,
    )
    images = inspect_at("/v1/images/edits", form(AUDIO, field("model", "gpt-image-1"), field("n", "2")), FORM)
    assert isinstance(images, Inspected)
    assert images.messages[0].facts["n"] == 2
    quoted = inspect_at("/v1/audio/translations", body, f'multipart/form-data; boundary="{B}"')
    assert isinstance(quoted, Inspected)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (form(AUDIO, field("model", "a"), field("model", "b")), FORM),  # which one runs depends on the parser
        (form(AUDIO), FORM),  # transcriptions must name the model
        (form(AUDIO, ('Content-Disposition: form-data; name="model"; filename="m.txt"', "whisper-1")), FORM),
        (form(AUDIO, ('Content-Disposition: form-data; name="model"\r\nContent-Type: application/json', '"a"')), FORM),
        (form(field("model", "a"), ('Content-Disposition: form-data; name="model"\r\nX-Other: 1', "b")), FORM),
        (form(field("model", "a"), ("Content-Disposition: form-data; name*=utf-8''model", "b")), FORM),
        (form(field("model", "a"), ("Content-Transfer-Encoding: base64", "YQ==")), FORM),
        (b"preamble\r\n" + form(field("model", "a")), FORM),
        (form(field("model", "a"), end=f"--{B}--\r\nepilogue"), FORM),
        (form(field("model", "a"), end=f"--{B}"), FORM),
        (form(field("model", "a")).replace(b"\r\n", b"\n"), FORM),  # LF-only delimiters
        (form(field("model", "a"), field("prompt", f"x\n--{B}\nContent-Disposition: form-data; name=model")), FORM),
        (form(field("model", "a")).replace(b"\r\n\r\na\r\n", b"\r\n\r\n\xff\r\n"), FORM),  # not UTF-8
        (form(field("model", "a")), f"multipart/form-data; boundary={B}; boundary=other"),
        (form(field("model", "a")), f"multipart/form-data; boundary={B}; charset=utf-8"),
        (form(field("model", "a")), "multipart/form-data"),
        (orjson.dumps({"model": "whisper-1"}), "application/json"),  # transcriptions are multipart only
    ],
)
def test_ambiguous_or_malformed_forms_are_refused(body: bytes, content_type: str) -> None:
    result = inspect_at("/v1/audio/transcriptions", body, content_type)
    assert isinstance(result, Refused), result
    assert result.reason is Reason.BODY_UNREADABLE
    assert result.detail


@pytest.mark.parametrize(
    "body",
    [
        form(AUDIO, field("Model", "b"), field("model", "a")),  # case-insensitive binders read `Model`
        form(AUDIO, field("MODEL", "whisper-1")),
        form(AUDIO, field("model", "whisper-1"), field("N", "2")),
        form(AUDIO, field("model", "whisper-1"), field("Stream", "true")),
        form(AUDIO, field("model", "whisper-1"), field("language", "en"), field("Language", "de")),
    ],
)
def test_form_fields_equal_under_case_folding_are_ambiguous(body: bytes) -> None:
    """The same rule as for JSON keys: one field a case-insensitive binder reads as another is request_ambiguous."""
    result = inspect_at("/v1/audio/transcriptions", body, FORM)
    assert isinstance(result, Refused), result
    assert result.reason is Reason.REQUEST_AMBIGUOUS, result


def test_repeated_form_fields_the_pep_does_not_read_are_fine() -> None:
    granularities = field("timestamp_granularities[]", "word"), field("timestamp_granularities[]", "segment")
    result = inspect_at("/v1/audio/transcriptions", form(AUDIO, field("model", "whisper-1"), *granularities), FORM)
    assert isinstance(result, Inspected), result


def test_a_json_endpoint_refuses_a_form() -> None:
    result = inspect_at("/v1/chat/completions", form(field("model", "a")), FORM)
    assert isinstance(result, Refused)
    assert result.reason is Reason.BODY_UNREADABLE


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
