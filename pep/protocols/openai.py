"""OpenAI-style model APIs: the model, the stream flag and the tool names of a call become `model` facts.

Only the endpoints that invoke a model are read (chat completions, completions, embeddings, responses); any
other request on the route (`GET /v1/models`) is decided on its HTTP facts alone. As on MCP routes, keys equal
under case folding, or a key that folds to one read here without being it (`Model`, `STREAM`), are
`request_ambiguous`: OpenAI-compatible Go servers (Ollama) bind them to the field the PEP read.
"""

from __future__ import annotations

import re
from typing import Any

from pep import strictjson
from pep.decision import Reason
from pep.protocols import Inspected, Message, Refused
from pep.protocols.spelling import Spelling

ENDPOINTS = ("/chat/completions", "/completions", "/embeddings", "/responses")


_PATH_PARAMS = re.compile(r";[^/]*")
# What the PEP reads from the call, from each tool and from each function: each must be spelled exactly.
_CALL_KEYS = Spelling("model", "stream", "tools", "functions")
_TOOL_KEYS = Spelling("type", "name", "function")
_FUNCTION_KEYS = Spelling("name")


def invokes_model(method: str, path: str) -> bool:
    """A POST to a model endpoint, also behind path parameters (`/v1/chat;x/completions`): servlet-style
    upstreams drop `;x` and would serve it as one."""
    return method == "POST" and _PATH_PARAMS.sub("", path).rstrip("/").endswith(ENDPOINTS)


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
    """A key of the call, of a tool or of a function that folds to a name read here without being it."""
    if problem := _CALL_KEYS.problem(obj, "model API body"):
        return problem
    for key, spelling in (("tools", _TOOL_KEYS), ("functions", _FUNCTION_KEYS)):
        listed = obj.get(key)
        for item in listed if isinstance(listed, list) else ():
            if not isinstance(item, dict):
                continue
            if problem := spelling.problem(item, key):
                return problem
            function = item.get("function") if key == "tools" else None
            if isinstance(function, dict) and (problem := _FUNCTION_KEYS.problem(function, "tools[].function")):
                return problem
    return None


def inspect(body: bytes) -> Inspected | Refused:
    try:
        obj = strictjson.loads_object(body, fold_keys=True)
    except strictjson.FoldedKeys as exc:
        return Refused(Reason.REQUEST_AMBIGUOUS, f"model API body: {exc}"[:200])
    except strictjson.JsonError as exc:
        return Refused(Reason.BODY_UNREADABLE, f"model API body: {exc}"[:200])
    if (problem := _spelling_problem(obj)) is not None:
        return Refused(Reason.REQUEST_AMBIGUOUS, problem)
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        return Refused(Reason.BODY_UNREADABLE, "model must be a non-empty string")
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        return Refused(Reason.BODY_UNREADABLE, "stream must be a boolean")
    tools = _tool_names(obj.get("tools"))
    if isinstance(tools, str):
        return Refused(Reason.BODY_UNREADABLE, tools)
    functions = _tool_names(obj.get("functions"))  # chat completions' deprecated form, still accepted
    if isinstance(functions, str):
        return Refused(Reason.BODY_UNREADABLE, f"functions: {functions}")
    return Inspected((Message("model", {"name": model, "stream": stream, "tools": tools + functions}),), body)
