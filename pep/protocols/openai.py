"""OpenAI-style model APIs: which requests are model calls, and the `model` facts each one is decided on.

Every POST on an openai route is a model call (`model.action: "model.invoke"`), classified by its last path
segments, matched case-insensitively (Express and ASP.NET Core route `/v1/Chat/Completions` as a chat), with
path parameters (`;x`), empty segments and trailing slashes ignored, under any prefix. Azure's
`deployments/{name}/...` and the legacy `engines/{name}/...` forms name the model in the path: that name is the
fact, and a body `model` that differs is `request_ambiguous`. Endpoints whose body names the model are read
(JSON, or `multipart/form-data` for audio and images); endpoints where the PEP cannot see what will run
(`batches`, `files`, `uploads`, `realtime`, any POST it does not know) are not read: their facts say so
(`read: false`, `name: null`) and the body streams through if the policy allows such an endpoint by name.
Requests with other methods (`GET /v1/models`) are decided on their HTTP facts alone.

As on MCP routes, keys equal under case folding anywhere in a JSON body, or a key that folds to one read here
without being it (`Model`, `STREAM`, `N`), are `request_ambiguous`: OpenAI-compatible Go servers (Ollama) and
ASP.NET Core bind them to the field the PEP read. Form fields are held to the same rule (`pep/protocols/spelling`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from pep import strictjson
from pep.decision import Reason
from pep.protocols import Inspected, Message, Refused, multipart
from pep.protocols.spelling import Spelling

INVOKE: Final = "model.invoke"
TOOL_CALL: Final = "model.tool_call"
ANSWER: Final = "model.answer"

# How a body names its model: "json", "form" (JSON or multipart/form-data), "multipart", or "unread".
_JSON: Final = "json"
_FORM: Final = "form"
_MULTIPART: Final = "multipart"
_UNREAD: Final = "unread"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A kind of model call: how its body is read, whether it must name its model, whether its answers can call
    tools (then they are inspected)."""

    kind: str
    body: str
    model_required: bool = True
    answers: bool = False  # answers carry tool calls and the answering model: read and decided


# Suffixes of the path (lower-cased segments; "*" is any one segment), longest first.
_TABLE: Final[tuple[tuple[tuple[str, ...], Endpoint], ...]] = (
    (("threads", "*", "runs"), Endpoint("threads.runs", _JSON, False, True)),
    (("chat", "completions"), Endpoint("chat.completions", _JSON, True, True)),
    (("images", "generations"), Endpoint("images.generations", _FORM, False)),
    (("images", "edits"), Endpoint("images.edits", _FORM, False)),
    (("images", "variations"), Endpoint("images.variations", _MULTIPART, False)),
    (("audio", "transcriptions"), Endpoint("audio.transcriptions", _MULTIPART)),
    (("audio", "translations"), Endpoint("audio.translations", _MULTIPART)),
    (("audio", "speech"), Endpoint("audio.speech", _JSON)),
    (("threads", "runs"), Endpoint("threads.runs", _JSON, False, True)),
    (("assistants", "*"), Endpoint("assistants", _JSON, False)),
    (("fine_tuning", "jobs"), Endpoint("fine_tuning.jobs", _JSON)),
    (("realtime", "*"), Endpoint("realtime", _UNREAD)),
    (("completions",), Endpoint("completions", _JSON, True, True)),
    (("embeddings",), Endpoint("embeddings", _JSON)),
    (("responses",), Endpoint("responses", _JSON, True, True)),
    (("moderations",), Endpoint("moderations", _JSON, False)),
    (("assistants",), Endpoint("assistants", _JSON)),
    (("batches",), Endpoint("batches", _UNREAD)),
    (("files",), Endpoint("files", _UNREAD)),
    (("uploads",), Endpoint("uploads", _UNREAD)),
    (("realtime",), Endpoint("realtime", _UNREAD)),
)
UNKNOWN: Final = Endpoint("unknown", _UNREAD)
CHAT: Final = _TABLE[1][1]
ANSWERING_KINDS: Final = frozenset(e.kind for _, e in _TABLE if e.answers)
ENDPOINT_KINDS: Final = (*dict.fromkeys(e.kind for _, e in _TABLE), UNKNOWN.kind)
_NAMING: Final = ("deployments", "engines")  # `{naming}/{model}/<endpoint>`: the path names the model
# What the PEP reads from a JSON call, from each tool or function, and from a tool's function; from a form, its
# fields. Each must be spelled exactly.
_CALL_KEYS: Final = Spelling("model", "stream", "tools", "functions", "n")
_TOOL_KEYS: Final = Spelling("type", "name", "function")
_FUNCTION_KEYS: Final = Spelling("name")
_FORM_FIELDS: Final = ("model", "stream", "n")
_FORM_KEYS: Final = Spelling(*_FORM_FIELDS)


@dataclass(frozen=True, slots=True)
class Call:
    """A POST on an openai route: its endpoint, and the model its path names (deployments/engines forms)."""

    endpoint: Endpoint
    path_model: str | None = None

    @property
    def read(self) -> bool:
        return self.endpoint.body != _UNREAD


def _segments(path: str) -> list[str]:
    """The path's segments as an upstream router matches them: path parameters and empty segments dropped."""
    return [s.partition(";")[0] for s in path.split("/") if s.partition(";")[0]]


def _suffix_matches(pattern: tuple[str, ...], lowered: list[str]) -> bool:
    if len(lowered) < len(pattern):
        return False
    tail = lowered[len(lowered) - len(pattern) :]
    return all(p in ("*", s) for p, s in zip(pattern, tail, strict=True))


def _path_model(path: str, prefix_len: int) -> str | Refused | None:
    """The model a `deployments/{name}` or `engines/{name}` prefix names (the raw segment, decoded), if any."""
    raw = [s for s in path.split("/") if s.partition(";")[0]]
    prefix = raw[:prefix_len]
    at = [i for i, s in enumerate(prefix[:-1]) if s.partition(";")[0].lower() in _NAMING]
    if not at:
        return None
    if len(at) > 1:
        return Refused(Reason.REQUEST_AMBIGUOUS, "the path names a deployment or engine more than once")
    segment = prefix[at[0] + 1]
    if ";" in segment:
        # `gpt-4o;x` is deployment `gpt-4o` to a servlet container and `gpt-4o;x` to others.
        return Refused(Reason.REQUEST_AMBIGUOUS, "a path parameter in the model the path names")
    try:
        return unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        return Refused(Reason.REQUEST_AMBIGUOUS, "the model the path names is not UTF-8")


def classify(method: str, path: str) -> Call | Refused | None:
    """The model call a request is, or None when it is not one (not a POST). A path that names a model in the
    deployments/engines form is read that way first: the upstream serves the model the path names."""
    if method != "POST":
        return None
    segments = _segments(path)
    lowered = [s.lower() for s in segments]
    first: Call | None = None
    for pattern, endpoint in _TABLE:
        if not _suffix_matches(pattern, lowered):
            continue
        named = _path_model(path, len(segments) - len(pattern))
        if isinstance(named, Refused):
            return named
        if named is not None:
            return Call(endpoint, named)
        first = first or Call(endpoint)
    return first or Call(UNKNOWN)


def invokes_model(method: str, path: str) -> bool:
    """A model call whose body is read to be decided (the others stream through on path facts)."""
    call = classify(method, path)
    return isinstance(call, Call) and call.read


def unread_message(call: Call) -> Message:
    """The facts of a model call whose body the PEP does not read: it cannot see which model will run."""
    return Message(
        "model",
        {
            "action": INVOKE,
            "endpoint": call.endpoint.kind,
            "name": None,
            "read": False,
            "stream": None,
            "n": None,
            "tools": [],
        },
    )


# The most tools (and functions) one call may declare: each name goes into the policy input twice, and a 1 MiB body
# of `{"name":"a"}` items held 80,000, which Cedar took 0.2 s to evaluate in the event loop (every other request of
# the process waiting) and Cerbos 0.12 s, close to the default 250 ms deadline whose timeouts count against the
# breaker. OpenAI's API accepts 128.
MAX_TOOLS: Final = 1024


def _tool_names(tools: Any) -> list[str] | str:
    if tools is None:
        return []
    if not isinstance(tools, list):
        return "tools must be a list"
    names: list[str] = []
    for tool in tools:
        if not isinstance(tool, dict):
            return "each tool must be an object"
        function = tool.get("function")
        name = tool.get("name")
        if isinstance(function, dict):
            if "name" in tool and function.get("name") != name:
                return "a tool has two different names"  # servers differ on which one they use
            name = function.get("name")
        if name is None and "function" not in tool and tool.get("type") != "function":
            name = tool.get("type")  # built-in tools (web_search, ...) are named by their type
        if not isinstance(name, str):
            return "a tool has no name"
        names.append(name)
    return names


def _spelling_problem(obj: dict[str, Any]) -> str | None:
    """A key of the call, of a tool or function, or of a tool's function that folds to a name read here without
    being it (`_tool_names` reads the same keys from `tools` and `functions` items)."""
    if problem := _CALL_KEYS.problem(obj, "model API body"):
        return problem
    for key in ("tools", "functions"):
        listed = obj.get(key)
        for item in listed if isinstance(listed, list) else ():
            if not isinstance(item, dict):
                continue
            if problem := _TOOL_KEYS.problem(item, key):
                return problem
            function = item.get("function")
            if isinstance(function, dict) and (problem := _FUNCTION_KEYS.problem(function, f"{key}[].function")):
                return problem
    return None


def _form_spelling_problem(names: tuple[str, ...]) -> str | None:
    """Two field names equal under case folding, or one that folds to a field read here without being it: a
    case-insensitive binder (ASP.NET Core) reads it as that field. A repeated name (an array) is not a problem."""
    if problem := _FORM_KEYS.problem(names, "form"):
        return problem
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(strictjson.fold(name), name)
        if other != name:
            return f"form fields {other[:40]!r} and {name[:40]!r} are equal under case folding"
    return None


def _count(value: Any) -> int | str:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "n must be a positive integer"
    return value


def _json_facts(body: bytes) -> dict[str, Any] | Refused | str:
    try:
        obj = strictjson.loads_object(body, fold_keys=True)
    except strictjson.FoldedKeys as exc:
        return Refused(Reason.REQUEST_AMBIGUOUS, f"model API body: {exc}"[:200])
    except strictjson.JsonError as json_error:
        return f"model API body: {json_error}"
    if (problem := _spelling_problem(obj)) is not None:
        return Refused(Reason.REQUEST_AMBIGUOUS, problem[:200])
    model = obj.get("model")
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        return "stream must be a boolean"
    tools = _tool_names(obj.get("tools"))
    if isinstance(tools, str):
        return tools
    functions = _tool_names(obj.get("functions"))  # chat completions' deprecated form, still accepted
    if isinstance(functions, str):
        return f"functions: {functions}"
    if len(tools) + len(functions) > MAX_TOOLS:
        detail = f"{len(tools) + len(functions)} tools and functions, over {MAX_TOOLS}"
        return Refused(Reason.BODY_TOO_LARGE, detail)
    n = _count(obj.get("n"))
    if isinstance(n, str):
        return n
    return {"model": model, "stream": stream, "tools": tools + functions, "n": n}


_DIGITS: Final = re.compile(r"[1-9][0-9]{0,8}")


def _form_facts(body: bytes, content_type: str) -> dict[str, Any] | Refused | str:
    form = multipart.fields(body, content_type, _FORM_FIELDS)
    if isinstance(form, str):
        return form
    if (problem := _form_spelling_problem(form.names)) is not None:
        return Refused(Reason.REQUEST_AMBIGUOUS, problem[:200])
    stream_text = form.values.get("stream")
    if stream_text not in (None, "true", "false"):
        return "stream must be true or false"
    n_text = form.values.get("n")
    if n_text is not None and not _DIGITS.fullmatch(n_text):
        return "n must be a positive integer"
    return {
        "model": form.values.get("model"),
        "stream": stream_text == "true",
        "tools": [],
        "n": int(n_text) if n_text is not None else 1,
    }


def is_multipart(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


def inspect(body: bytes, call: Call | None = None, content_type: str | None = None) -> Inspected | Refused:
    """The facts of a model call's body (`call` defaults to a chat completion on a path naming no model)."""
    call = call or Call(CHAT)
    endpoint = call.endpoint
    if is_multipart(content_type):
        if endpoint.body not in (_FORM, _MULTIPART):
            return Refused(Reason.BODY_UNREADABLE, f"{endpoint.kind} takes a JSON body, not multipart/form-data")
        facts = _form_facts(body, content_type or "")
    elif endpoint.body == _MULTIPART:
        return Refused(Reason.BODY_UNREADABLE, f"{endpoint.kind} takes a multipart/form-data body")
    else:
        facts = _json_facts(body)
    if isinstance(facts, Refused):
        return facts
    if isinstance(facts, str):
        return Refused(Reason.BODY_UNREADABLE, facts[:200])
    model = facts["model"]
    if model is not None and (not isinstance(model, str) or not model):
        return Refused(Reason.BODY_UNREADABLE, "model must be a non-empty string")
    if call.path_model is not None:
        if model is not None and model != call.path_model:
            return Refused(Reason.REQUEST_AMBIGUOUS, "the path and the body name different models")
        model = call.path_model
    if model is None and endpoint.model_required:
        return Refused(Reason.BODY_UNREADABLE, "model must be a non-empty string")
    message = Message(
        "model",
        {
            "action": INVOKE,
            "endpoint": endpoint.kind,
            "name": model,
            # An optional model left out: the upstream runs its default (or an assistant's), which the PEP
            # cannot see.
            "read": model is not None,
            "stream": facts["stream"],
            "n": facts["n"],
            "tools": facts["tools"],
        },
    )
    return Inspected((message,), body)
