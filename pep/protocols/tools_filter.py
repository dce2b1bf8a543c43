"""Filtering an MCP `tools/list` answer: only the tools the PDP would let this caller call are kept.

The answer is JSON, or SSE whose events carry JSON-RPC messages; the one holding `result.tools` is rewritten,
every other byte is kept. Anything that cannot be read is an error: the unfiltered list never goes out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from pep import strictjson
from pep.protocols.mcp import HEADER_VERSION

# Decides the named tools: one bool per name, or a string saying why no decision could be had.
Decide = Callable[[list[str]], Awaitable[list[bool] | str]]


class FilterError(Exception):
    """The answer could not be filtered; the message says why (for the decision log)."""


async def _filter_message(message: Any, decide: Decide, version: str | None, batch: bool) -> tuple[Any, list[str]]:
    """The message with denied tools removed, and the names removed. Non-results pass unchanged.

    An array (a batch answer, or an answer some clients accept wrapped in one) is filtered element by element. In
    the answer to a batch, results without `tools` answer the batch's other requests and pass unchanged.
    """
    if isinstance(message, list):
        done = [await _filter_message(m, decide, version, batch) for m in message]
        if all(new is old for (new, _), old in zip(done, message, strict=True)):
            return message, []
        return [new for new, _ in done], [name for _, removed in done for name in removed]
    if not isinstance(message, dict) or "result" not in message:
        return message, []
    result = message["result"]
    if batch and not (isinstance(result, dict) and "tools" in result):
        return message, []
    tools = result.get("tools") if isinstance(result, dict) else None
    if not isinstance(tools, list):
        raise FilterError("a tools/list result without a tools list")
    named = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
    verdicts = await decide([t["name"] for t in named]) if named else []
    if isinstance(verdicts, str):
        raise FilterError(verdicts)
    kept = [t for t, ok in zip(named, verdicts, strict=True) if ok]
    removed = [t["name"] for t, ok in zip(named, verdicts, strict=True) if not ok]
    removed += ["<unnamed>"] * (len(tools) - len(named))  # a tool without a name is never passed on
    result = {**result, "tools": kept}
    if (version is not None and version >= HEADER_VERSION) or "cacheScope" in result:
        result["cacheScope"] = "private"  # a per-caller list must not be served to others from a shared cache
    return {**message, "result": result}, removed


def _load(data: bytes) -> Any:
    try:
        return strictjson.loads(data)
    except strictjson.JsonError as exc:
        raise FilterError(f"tools/list answer: {exc}") from None


async def filter_json(body: bytes, decide: Decide, version: str | None, batch: bool = False) -> tuple[bytes, list[str]]:
    message, removed = await _filter_message(_load(body), decide, version, batch)
    return orjson.dumps(message), removed


async def filter_sse(body: bytes, decide: Decide, version: str | None, batch: bool = False) -> tuple[bytes, list[str]]:
    """Rewrite the event holding the result; other events, comments and fields are kept (with LF line ends).

    Lines end with CRLF, LF or a lone CR, and a leading BOM is skipped, as SSE clients read them: an event the
    client would see must not be missed here.
    """
    body = body.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    events = body.split(b"\n\n")
    out: list[bytes] = []
    removed_all: list[str] = []
    for event in events:
        lines = event.split(b"\n")
        data_lines = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        if not data_lines:
            out.append(event)
            continue
        message = _load(b"\n".join(data_lines))
        rewritten, removed = await _filter_message(message, decide, version, batch)
        if rewritten is message:
            out.append(event)
            continue
        removed_all += removed
        others = [line for line in lines if not line.startswith(b"data:")]
        out.append(b"\n".join([*others, b"data: " + orjson.dumps(rewritten)]))
    return b"\n\n".join(out), removed_all
