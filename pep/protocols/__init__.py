"""How a route's protocol turns a request into what is decided: one or more messages, each a set of facts.

A plain HTTP route has one message and no facts. An MCP route has one message per JSON-RPC message in the body
(a 2025-03-26 batch has several), an OpenAI route one with the model facts. The exact bytes read are what is
forwarded, so the decision covers exactly the body the upstream gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from pep.decision import Reason

NO_ID: Final[Any] = object()  # a JSON-RPC message without an id (notification), distinct from an explicit null


class Message:
    """One thing to decide: `facts` become the document's `mcp` or `model` section (under `key`)."""

    key: Final[str | None]  # "mcp", "model", or None for plain HTTP
    facts: Final[dict[str, Any]]
    rpc_id: Final[Any]  # the JSON-RPC id to answer a denial with

    def __init__(self, key: str | None = None, facts: dict[str, Any] | None = None, rpc_id: Any = NO_ID) -> None:
        self.key = key
        self.facts = dict() if facts is None else facts
        self.rpc_id = rpc_id


class Inspected:
    messages: Final[tuple[Message, ...]]
    body: Final[bytes | None]  # the exact bytes to forward, or None when the body is streamed
    batch: Final[bool]
    value: Final[Any]  # the body as parsed (MCP), for what is read after the subject is known (mcp_replies)

    def __init__(
        self, messages: tuple[Message, ...], body: bytes | None, batch: bool = False, value: Any = None
    ) -> None:
        self.messages = messages
        self.body = body
        self.batch = batch
        self.value = value


@dataclass(frozen=True, slots=True)
class Refused:
    """The request cannot be decided as it is: a denial before the PDP is asked."""

    reason: Reason
    detail: str


PLAIN: Final = Inspected((Message(),), None)
