"""What the client's replies to server requests answer, read once the caller is known. Pure (no IO).

A reply names the request it answers only by the id the PEP gave that request (`protocols.mcp_tokens`); a
2026-07-28 retry carries its answers under the keys the PEP gave an `InputRequiredResult`'s requests. Both are
opened here, the server's own id or key is put back, and each reply becomes a message decided with what it
answers:
- `mcp.method` `mcp/response`, `mcp.replies_to` the method of the request it answers, `direction`
  `client_to_server`;
- a reply to `elicitation/create`: `fields`, the names of the form fields returned (`result.content`), and
  `arguments`, their values (the policy sees them; the decision log only under `include_arguments`);
- a reply to `sampling/createMessage`: `tools`, the tools the agent's model used (`tool_use` content); on a
  route that filters `tools/list`, each of them must also be visible to the caller (decided as the visibility
  of that tool: a model cannot have been offered a hidden one);
- an error reply: `replies_to` only.
A reply whose id or key does not open (not issued by the PEP, another caller's, expired) is `request_ambiguous`:
an unknown reply is never forwarded. The body forwarded is the one with the server's ids put back; the decision
covers exactly those bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from pep.config import DEFAULT_MAX_BATCH_MESSAGES
from pep.decision import Reason
from pep.protocols import Inspected, Message, Refused
from pep.protocols.mcp_answer import CLIENT_TO_SERVER, visibility_facts
from pep.protocols.mcp_tokens import Resumption, Tokens
from pep.protocols.spelling import Spelling

_RESULT_KEYS: Final = Spelling("content")  # what a reply to elicitation or sampling is read by
_BLOCK_KEYS: Final = Spelling("type", "name")  # a sampling reply's content block: a `tool_use` and its tool


def prepare(
    method: str,
    headers: Mapping[str, str],
    inspected: Inspected,
    tokens: Tokens,
    filter_tools: bool,
    max_messages: int = DEFAULT_MAX_BATCH_MESSAGES,
) -> tuple[Inspected | Refused, Resumption | None]:
    """An MCP request as it is decided and forwarded, once the caller is known: its replies opened (`restore`),
    and for a `GET` with `Last-Event-ID` the stream it resumes (the id must be one the PEP relayed, to this
    caller and session). The proxy and `pep explain` both call this."""
    resume = None
    if method == "GET" and "Last-Event-ID" in headers:
        opened = tokens.open_event_id(headers["Last-Event-ID"])
        if isinstance(opened, str):
            return Refused(Reason.REQUEST_AMBIGUOUS, f"Last-Event-ID: {opened}"), None
        resume = opened
    return restore(inspected, tokens, filter_tools, max_messages), resume


def reply_facts(replies_to: str, reply: dict[str, Any], version: str | None) -> dict[str, Any]:
    """The `mcp` facts of one reply (a JSON-RPC response's `result` or `error` member, as an object)."""
    facts: dict[str, Any] = {
        "method": "mcp/response",
        "name": None,
        "arguments": None,
        "protocol_version": version,
        "direction": CLIENT_TO_SERVER,
        "replies_to": replies_to,
    }
    result = reply.get("result")
    if not isinstance(result, dict):
        return facts
    if replies_to == "elicitation/create":
        content = result.get("content")
        facts["fields"] = sorted(content) if isinstance(content, dict) else []
        facts["arguments"] = content if isinstance(content, dict) else None
    elif replies_to == "sampling/createMessage":
        blocks = result.get("content")
        blocks = blocks if isinstance(blocks, list) else [blocks]
        used = [str(b.get("name")) for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
        facts["tools"] = list(dict.fromkeys(used))  # each tool once
    return facts


def spelling_problem(replies_to: str, reply: dict[str, Any]) -> str | None:
    """A key `reply_facts` reads, spelled so that a case-insensitive server (Go) or the 2.x SDK's models read it
    while the PEP does not (`Content` for `content`): the policy would see no fields, or no tool used."""
    result = reply.get("result")
    if replies_to not in ("elicitation/create", "sampling/createMessage") or not isinstance(result, dict):
        return None
    if problem := _RESULT_KEYS.problem(result, f"a reply to {replies_to}"):
        return problem
    blocks = result.get("content")
    if replies_to == "sampling/createMessage":
        for block in blocks if isinstance(blocks, list) else [blocks]:
            if isinstance(block, dict) and (problem := _BLOCK_KEYS.problem(block, "a sampling reply's content")):
                return problem
    return None


def restore(
    inspected: Inspected, tokens: Tokens, filter_tools: bool, max_messages: int = DEFAULT_MAX_BATCH_MESSAGES
) -> Inspected | Refused:
    """The messages and body with every reply opened, or why a reply cannot be forwarded. The messages a body
    adds (input responses, the visibility of each tool a sampling reply used) count against the route's
    `max_batch_messages`, as a batch's do: each is a PDP decision."""
    value = inspected.value
    messages = inspected.messages
    if value is None:
        return inspected
    single = not inspected.batch and len(messages) == 1  # (most bodies)
    if single and messages[0].facts.get("method") != "mcp/response" and _input_responses(value) is None:
        return inspected  # no reply to open, nothing retried
    replies = any(m.facts.get("method") == "mcp/response" for m in messages)
    # Any request carrying `inputResponses` (tools/call, prompts/get, resources/read, and extensions' own).
    retried = any(_input_responses(item) is not None for _, item in _pairs(inspected))
    if not (replies or retried):
        return inspected
    items: list[Any] = []
    extra: list[Message] = []
    out: list[Message] = []
    for message, sent in _pairs(inspected):
        item = sent
        facts = message.facts
        version = facts.get("protocol_version")
        if facts.get("method") == "mcp/response":
            opened = tokens.open_request_id(item.get("id"))
            if isinstance(opened, str):
                return Refused(Reason.REQUEST_AMBIGUOUS, f"a reply to no server request the PEP relayed: {opened}")
            rpc_id, replies_to = opened
            item = {**item, "id": rpc_id}
            if problem := spelling_problem(replies_to, item):
                return Refused(Reason.REQUEST_AMBIGUOUS, problem)
            reply = reply_facts(replies_to, item, version)
            out.append(Message("mcp", reply, rpc_id))
            extra += _visibility(reply, version, filter_tools)
            items.append(item)
            continue
        answers = _input_responses(item)
        if answers is not None:
            if not isinstance(answers, dict):
                return Refused(Reason.BODY_UNREADABLE, "params.inputResponses must be an object")
            restored: dict[str, Any] = {}
            for token, answer in answers.items():
                opened_key = tokens.open_input_key(token)
                if isinstance(opened_key, str):
                    return Refused(Reason.REQUEST_AMBIGUOUS, f"an input response to no input request: {opened_key}")
                key, replies_to = opened_key
                restored[key] = answer
                if problem := spelling_problem(replies_to, {"result": answer}):
                    return Refused(Reason.REQUEST_AMBIGUOUS, problem)
                reply = reply_facts(replies_to, {"result": answer}, version)
                extra.append(Message("mcp", reply))
                extra += _visibility(reply, version, filter_tools)
            item = {**item, "params": {**item["params"], "inputResponses": restored}}
        out.append(message)
        items.append(item)
    if len(out) + len(extra) > max_messages:
        detail = (
            f"{len(out) + len(extra)} messages to decide (replies included), over max_batch_messages {max_messages}"
        )
        return Refused(Reason.BODY_TOO_LARGE, detail)
    body = orjson.dumps(items if inspected.batch else items[0])
    return Inspected((*out, *extra), body, inspected.batch, items if inspected.batch else items[0])


def _pairs(inspected: Inspected) -> list[tuple[Message, Any]]:
    items = inspected.value if inspected.batch else [inspected.value]
    return list(zip(inspected.messages, items, strict=False))


def _input_responses(item: Any) -> Any:
    params = item.get("params") if isinstance(item, dict) else None
    return params.get("inputResponses") if isinstance(params, dict) else None


def _visibility(reply: dict[str, Any], version: str | None, filter_tools: bool) -> list[Message]:
    if not filter_tools:
        return []
    return [Message("mcp", visibility_facts("tools/list", tool, version)) for tool in reply.get("tools") or ()]
