"""pep.approval_step, the pure parts: what an approval binds (the exact bytes on plain routes, the JSON-RPC call
without its id on MCP routes), which clients are offered a URL elicitation, what `pep explain` shows; and the
admission reading the whole body of a route with `approval` (so the approval binds what is forwarded)."""

from __future__ import annotations

import secrets
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from pep import approval_step
from pep.admission import Admission, RequestFacts, admit
from pep.config import RouteApproval, RouteConfig
from pep.decision import Deny, Reason
from pep.engine import Outcome
from pep.pdp import ApprovalAsk
from pep.protocols import Refused
from pep.protocols.mcp_tokens import for_caller
from pep.routing import RouteTable
from pep.seal import Sealer
from tests.unit.test_admission import Setup

SUBJECT = {"workload": "spiffe://test/agent", "agent": "bot"}
HOLD = RouteApproval("hold", 120000)
CAPABILITIES: dict[str, Any] = {"elicitation": {"url": {}, "form": {}}}


def call(rpc_id: int, amount: int = 5, meta: dict[str, Any] | None = None) -> bytes:
    params: dict[str, Any] = {"name": "issue_refund", "arguments": {"amount": amount}}
    if meta is not None:
        params["_meta"] = meta
    return orjson.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call", "params": params})


def routes() -> Setup:
    return Setup(
        RouteTable(
            (
                RouteConfig(
                    name="mcp",
                    path_prefix="/mcp",
                    upstream="http://up/mcp",
                    protocol="mcp",
                    max_body_bytes=4096,
                    approval=RouteApproval("ticket"),
                ),
                RouteConfig(
                    name="refunds", path_prefix="/refunds", upstream="http://up", max_body_bytes=64, approval=HOLD
                ),
                RouteConfig(name="plain", path_prefix="/plain", upstream="http://up"),
            )
        ),
        sealer=Sealer([secrets.token_bytes(32)]),
    )


async def admitted(target: str, body: bytes, agent: str = "bot", content_type: str = "application/json") -> Admission:
    headers = CIMultiDict({"Host": "pep.test", "Content-Type": content_type, "Accept": "application/json"})
    facts = RequestFacts("POST", target, headers, "http", len(body), bool(body), "rid")
    read: list[int] = []

    async def identify(_route: Any) -> dict[str, Any]:
        return {**SUBJECT, "agent": agent}

    async def read_body(limit: int) -> bytes | Refused:
        read.append(limit)
        return body

    found = await admit(facts, routes(), identify, read_body)
    assert isinstance(found, Admission), found
    return found


async def test_an_approval_route_reads_the_whole_body_and_an_allow_would_carry_it() -> None:
    refund = await admitted("/refunds/1", b"amount=5", content_type="text/plain")
    assert refund.check.body == b"amount=5"
    plain = await admitted("/plain/1", b"amount=5", content_type="text/plain")
    assert plain.check.body is None  # streamed after the allow, as before


async def test_plain_routes_bind_the_exact_bytes() -> None:
    one = approval_step.binding_of(await admitted("/refunds/1", b'{"a": 1}'))
    assert one == approval_step.binding_of(await admitted("/refunds/1", b'{"a": 1}'))
    assert one != approval_step.binding_of(await admitted("/refunds/1", b'{"a":1}'))
    assert one != approval_step.binding_of(await admitted("/refunds/2", b'{"a": 1}'))
    assert one != approval_step.binding_of(await admitted("/refunds/1", b'{"a": 1}', agent="other"))


async def test_mcp_routes_bind_the_call_without_its_id() -> None:
    """An SDK numbers every attempt anew: the retry of the same call is the same approval, another call is not."""
    first = approval_step.binding_of(await admitted("/mcp", call(1)))
    assert first == approval_step.binding_of(await admitted("/mcp", call(2)))
    assert first == approval_step.binding_of(await admitted("/mcp", b" " + call(7)))  # same message, other bytes
    assert first != approval_step.binding_of(await admitted("/mcp", call(1, amount=6)))
    assert first != approval_step.binding_of(await admitted("/mcp", call(1), agent="other"))


@pytest.mark.parametrize(
    ("meta", "offered"),
    [
        ({approval_step.CLIENT_CAPABILITIES: CAPABILITIES}, True),
        ({approval_step.CLIENT_CAPABILITIES: {"elicitation": {"form": {}}}}, False),
        ({approval_step.CLIENT_CAPABILITIES: {"elicitation": {}}}, False),
        ({approval_step.CLIENT_CAPABILITIES: {"elicitation": {"url": True}}}, False),
        ({}, False),
        (None, False),
    ],
)
async def test_url_elicitation_only_for_a_request_that_declares_it(meta: dict[str, Any] | None, offered: bool) -> None:
    assert approval_step.url_elicitation(await admitted("/mcp", call(1, meta=meta))) is offered


async def test_wanted_only_for_approval_required_with_an_ask_on_an_approval_route() -> None:
    ask = ApprovalAsk("alice", "Refund")
    mcp = await admitted("/mcp", call(1))
    plain = await admitted("/plain/1", b"{}")
    required = Outcome(Deny(Reason.APPROVAL_REQUIRED, "d"), 1, 1.0, approval=ask)
    assert approval_step.wanted(required, mcp)
    assert not approval_step.wanted(required, plain)  # no `approval` on the route: a plain denial
    assert not approval_step.wanted(required, None)
    assert not approval_step.wanted(Outcome(Deny(Reason.POLICY_DENIED, "d"), 1, 1.0, approval=ask), mcp)
    assert not approval_step.wanted(Outcome(Deny(Reason.APPROVAL_REQUIRED, "d"), 1, 1.0), mcp)


async def test_explain_describes_who_would_be_asked_and_how_the_request_waits() -> None:
    refund = await admitted("/refunds/1", b"{}")
    described = approval_step.describe(refund, ApprovalAsk("alice", "Refund"))
    assert described == {
        "approver": "alice",
        "message": "Refund",
        "code": approval_step.binding_of(refund).code,
        "mode": "hold",
        "hold_ms": 30000,  # hold_ms, cut to the route's timeout_ms
    }
    assert approval_step.describe(await admitted("/mcp", call(1)), ApprovalAsk("bob"))["mode"] == "ticket"


async def test_mcp_replies_bind_the_server_request_they_answer() -> None:
    """A reply's id names the server request it answers: an `accept` to one elicitation is not an `accept` to
    another (the content is the same, the question is not). The same reply sent again binds alike."""
    setup = routes()
    headers = CIMultiDict({"Host": "pep.test", "Content-Type": "application/json", "Accept": "application/json"})
    tokens = for_caller(setup.sealer, "mcp", SUBJECT, headers)

    async def reply(server_id: int) -> Admission:
        token = tokens.request_id(server_id, "elicitation/create")
        body = orjson.dumps({"jsonrpc": "2.0", "id": token, "result": {"action": "accept", "content": {}}})

        async def identify(_route: Any) -> dict[str, Any]:
            return SUBJECT

        async def read_body(_limit: int) -> bytes | Refused:
            return body

        facts = RequestFacts("POST", "/mcp", headers, "http", len(body), True, "rid")
        found = await admit(facts, setup, identify, read_body)
        assert isinstance(found, Admission), found
        return found

    first = approval_step.binding_of(await reply(1))
    assert first == approval_step.binding_of(await reply(1))
    assert first != approval_step.binding_of(await reply(2))
