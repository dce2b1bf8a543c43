"""OpenAI-style model APIs: the model, the stream flag and the tool names of a call become `model` facts.

Only the endpoints that invoke a model are read (chat completions, completions, embeddings, responses); any
other request on the route (`GET /v1/models`) is decided on its HTTP facts alone.
"""

from __future__ import annotations

from typing import Any

from pep import strictjson
from pep.decision import Reason
from pep.protocols import Inspected, Message, Refused

ENDPOINTS = ("/chat/completions", "/completions", "/embeddings", "/responses")


def invokes_model(method: str, path: str) -> bool:
    return method == "POST" and path.rstrip("/").endswith(ENDPOINTS)


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
        name = function.get("name") if isinstance(function, dict) else tool.get("name")
        if name is None:
            name = tool.get("type")  # built-in tools (web_search, ...) are named by their type
        if not isinstance(name, str):
            return "a tool has no name"
        names.append(name)
    return names


def inspect(body: bytes) -> Inspected | Refused:
    try:
        obj = strictjson.loads_object(body)
    except strictjson.JsonError as exc:
        return Refused(Reason.BODY_UNREADABLE, f"model API body: {exc}"[:200])
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        return Refused(Reason.BODY_UNREADABLE, "model must be a non-empty string")
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        return Refused(Reason.BODY_UNREADABLE, "stream must be a boolean")
    tools = _tool_names(obj.get("tools"))
    if isinstance(tools, str):
        return Refused(Reason.BODY_UNREADABLE, tools)
    return Inspected((Message("model", {"name": model, "stream": stream, "tools": tools}),), body)
