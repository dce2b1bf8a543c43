"""Seed situation: an agentic workflow attempts a privileged action, and the approval engine times out (or is down,
or the person declines). The action is denied, never retried with implicit trust.

The real pieces: the official MCP SDK (2.x) as the agent and as the server, the shipped tool policy
(config/policies: `issue_refund` needs alice@example.com's approval) evaluated by regorus (OPA's Rego) or the
embedded Cedar, and a real OpenID Provider (oidc-provider, CIBA poll mode) that the test plays the person through.
Every denial is proven on the server side: the tool never ran.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError, UrlElicitationRequiredError

from tests.conftest import PepStarter, RunningPep
from tests.support.mcp_servers import (
    Mcp1Unavailable,
    Mcp2Server,
    ToolCall,
    build_tools_server,
    mcp1_python,
    run_mcp1_client,
)
from tests.support.op import OpenIdProvider, approvals_section
from tests.support.sdk_stack import AGENT, PdpUnderTest, pep_config, settled_log

APPROVER = "alice@example.com"  # the shipped policies' refund approver
REFUND = {"order_id": "A-1001", "amount": 250}
TICKET = "x-pep-approval-ticket"
CALL_BOUND_S = 10.0
POLICY_DENY = -32001
UNDECIDED = -32603


def build_refund_server(calls: list[ToolCall]) -> MCPServer:
    """The support-agent tools plus the privileged one."""
    server = build_tools_server(calls)

    @server.tool()
    def issue_refund(order_id: str, amount: int) -> str:
        """Refund an order (the shipped policy asks a person first)."""
        calls.append(ToolCall("issue_refund", {"order_id": order_id, "amount": amount}))
        return f"refunded {amount} on {order_id}"

    return server


@pytest.fixture
async def server() -> AsyncIterator[Mcp2Server]:
    async with Mcp2Server(build=build_refund_server) as running:
        yield running


@pytest.fixture(params=["opa", "cedar"])
async def pdp(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PdpUnderTest]:
    under_test = await PdpUnderTest.start(request.param, tmp_path)
    yield under_test
    await under_test.stop()


@pytest.fixture
async def opa(tmp_path: Path) -> AsyncIterator[PdpUnderTest]:
    under_test = await PdpUnderTest.start("opa", tmp_path)
    yield under_test
    await under_test.stop()


def approvals(op: OpenIdProvider, tmp_path: Path, **more: Any) -> dict[str, Any]:
    # The policy names the approver by email; the ID token must say the same.
    return approvals_section(op, tmp_path, scopes=["email"], approver_claim="email", **more)


@asynccontextmanager
async def running_pep(
    tmp_path: Path, pdp: PdpUnderTest, op: OpenIdProvider, server: Mcp2Server, approval: dict[str, Any], **more: Any
) -> AsyncIterator[RunningPep]:
    work = tmp_path / f"pep-{approval['mode']}"
    work.mkdir(exist_ok=True)

    def config(log: Path) -> dict[str, Any]:
        cfg = pep_config(pdp.config, log, mcp_upstream=server.url, mcp_options={"approval": approval})
        cfg["approvals"] = approvals(op, tmp_path, **more)
        return cfg

    starter = PepStarter(work, config, "approvals-mcp.yaml")
    try:
        yield await starter()
    finally:
        await starter.close()


@asynccontextmanager
async def agent(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[tuple[Client, httpx2.AsyncClient]]:
    async with (
        httpx2.AsyncClient(headers={"x-agent-id": AGENT, **(headers or {})}) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client, http


async def refused(client: Client, code: int, arguments: dict[str, Any] = REFUND) -> MCPError:
    async with asyncio.timeout(CALL_BOUND_S):
        with pytest.raises(MCPError) as caught:
            await client.call_tool("issue_refund", arguments)
    assert caught.value.error.code == code, caught.value.error
    return caught.value


def text_of(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


def refund_decisions(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["decision"], e["reason"]) for e in entries if e.get("mcp_name") == "issue_refund"]


async def test_a_privileged_call_waits_for_the_person_and_runs_once_after_approval(
    tmp_path: Path, pdp: PdpUnderTest, op: OpenIdProvider, server: Mcp2Server
) -> None:
    async with (
        running_pep(tmp_path, pdp, op, server, {"mode": "hold", "hold_ms": 8000}) as pep,
        agent(f"{pep.url}/mcp") as (client, _),
    ):
        call = asyncio.create_task(client.call_tool("issue_refund", REFUND))
        asked = await op.wait_ciba()
        assert asked["login_hint"] == APPROVER
        assert asked["binding_message"].startswith("Issue a refund #")
        await asyncio.sleep(0.3)
        assert server.called("issue_refund") == []  # held: nothing reached the server while nobody answered
        await op.approve(asked["auth_req_id"])
        async with asyncio.timeout(CALL_BOUND_S):
            result = await call
        assert text_of(result) == "refunded 250 on A-1001"
        # The same session goes on: an unprivileged call needs nobody.
        assert text_of(await client.call_tool("search", {"query": "x"})) == "3 articles match 'x'"
        entries = await settled_log(pep, lambda e: len(refund_decisions(e)) >= 1)
    assert server.called("issue_refund") == [ToolCall("issue_refund", REFUND)]
    assert refund_decisions(entries) == [("allow", "allowed")]
    logged = next(e for e in entries if e.get("mcp_name") == "issue_refund")
    assert logged["approval"]["approver"] == APPROVER
    if pdp.rego is not None:  # what the PDP was asked: first without, then with the approval
        refunds = [d for d in pdp.rego.inputs if d.get("mcp", {}).get("name") == "issue_refund"]
        assert ["approval" in d for d in refunds] == [False, True]
        assert set(refunds[1]["approval"]) == {"approver", "approved_at", "id"}
        assert refunds[1]["approval"]["approver"] == APPROVER
        assert refunds[1]["approval"]["id"] == logged["approval"]["id"]


@pytest.mark.parametrize("ending", ["nobody", "declined", "stopped", "frozen", "5xx", "malformed"])
async def test_a_privileged_call_is_denied_when_nobody_approves_or_the_op_is_down(
    tmp_path: Path, opa: PdpUnderTest, op: OpenIdProvider, server: Mcp2Server, ending: str
) -> None:
    expected = {"nobody": "approval_timeout", "declined": "approval_denied"}.get(ending, "approval_unavailable")
    async with (
        running_pep(
            tmp_path, opa, op, server, {"mode": "hold", "hold_ms": 1500 if ending == "nobody" else 8000}
        ) as pep,
        agent(f"{pep.url}/mcp") as (client, _),
    ):
        if ending == "stopped":
            await op.stop()
        elif ending == "frozen":
            op.freeze()
        elif ending == "5xx":
            await op.fault("status", status=502, body="bad gateway")
        elif ending == "malformed":
            await op.fault("malformed", body="<html>")
        try:
            call = asyncio.create_task(refused(client, POLICY_DENY if ending == "declined" else UNDECIDED))
            if ending == "declined":
                await op.deny((await op.wait_ciba())["auth_req_id"])
            denied = await call
        finally:
            if ending == "frozen":
                op.resume()
        assert denied.error.data["reason"] == expected
        assert "approval" not in denied.error.data
        entries = await settled_log(pep, lambda e: len(refund_decisions(e)) >= 1)
    assert server.called("issue_refund") == []
    assert refund_decisions(entries) == [("deny", expected)]


async def test_ticket_mode_the_agent_retries_the_same_call_with_its_ticket(
    tmp_path: Path, opa: PdpUnderTest, op: OpenIdProvider, server: Mcp2Server
) -> None:
    async with (
        running_pep(tmp_path, opa, op, server, {"mode": "ticket"}) as pep,
        agent(f"{pep.url}/mcp") as (client, http),
    ):
        denied = await refused(client, POLICY_DENY)
        assert denied.error.data["reason"] == "approval_required"
        ticket = denied.error.data["approval"]["ticket"]
        asked = await op.wait_ciba()
        assert denied.error.data["approval"]["code"] in asked["binding_message"]
        await op.approve(asked["auth_req_id"])
        http.headers[TICKET] = ticket
        # Another call with the ticket: not what was approved.
        other = await refused(client, POLICY_DENY, {"order_id": "A-1001", "amount": 9999})
        assert other.error.data["reason"] == "approval_invalid"
        # The same call (the SDK numbers it anew): forwarded, once.
        async with asyncio.timeout(CALL_BOUND_S):
            assert text_of(await client.call_tool("issue_refund", REFUND)) == "refunded 250 on A-1001"
        again = await refused(client, POLICY_DENY)
        assert again.error.data["reason"] == "approval_invalid"
        entries = await settled_log(pep, lambda e: len(refund_decisions(e)) >= 4)
    assert server.called("issue_refund") == [ToolCall("issue_refund", REFUND)]
    assert all(TICKET not in r.headers for r in server.requests)
    assert refund_decisions(entries) == [
        ("deny", "approval_required"),
        ("deny", "approval_invalid"),
        ("allow", "allowed"),
        ("deny", "approval_invalid"),
    ]
    assert ticket not in pep.log_path.read_text()


async def test_a_ticket_is_useless_to_another_caller(
    tmp_path: Path, opa: PdpUnderTest, op: OpenIdProvider, server: Mcp2Server
) -> None:
    async with running_pep(tmp_path, opa, op, server, {"mode": "ticket"}) as pep:
        async with agent(f"{pep.url}/mcp") as (client, _):
            ticket = (await refused(client, POLICY_DENY)).error.data["approval"]["ticket"]
        await op.approve((await op.wait_ciba())["auth_req_id"])
        async with agent(f"{pep.url}/mcp", {"x-agent-id": "other-bot", TICKET: ticket}) as (client, _):
            stolen = await refused(client, POLICY_DENY)
        assert stolen.error.data["reason"] == "approval_invalid"
    assert server.called("issue_refund") == []


async def test_url_elicitation_is_offered_to_a_client_that_declared_it(
    tmp_path: Path, opa: PdpUnderTest, op: OpenIdProvider, server: Mcp2Server
) -> None:
    """A 2.x client with an elicitation callback declares URL elicitation in every request's `_meta`: the
    denial is -32042 with the URL; the ticket rides beside it."""

    async def on_elicit(*_args: Any, **_kwargs: Any) -> Any:  # never called: the PEP does not elicit
        raise AssertionError("elicited")

    url = "https://approvals.example/pending/{id}"
    async with (
        running_pep(tmp_path, opa, op, server, {"mode": "ticket"}, elicitation_url=url) as pep,
        httpx2.AsyncClient(headers={"x-agent-id": AGENT}) as http,
    ):
        transport = streamable_http_client(f"{pep.url}/mcp", http_client=http)
        async with Client(transport, elicitation_callback=on_elicit) as client:
            async with asyncio.timeout(CALL_BOUND_S):
                with pytest.raises(MCPError) as caught:
                    await client.call_tool("issue_refund", REFUND)
    error = caught.value
    assert isinstance(error, UrlElicitationRequiredError) or error.error.code == -32042, error.error
    data = error.error.data
    assert data["reason"] == "approval_required"
    assert data["elicitations"][0]["url"] == url.replace("{id}", data["approval"]["id"])
    assert server.called("issue_refund") == []


@pytest.fixture
def mcp1_interpreter() -> Path:
    """.venv-mcp1/bin/python with mcp 1.30.0. Missing is a failure, never a skip: `make test` builds it."""
    try:
        return mcp1_python()
    except Mcp1Unavailable as exc:
        pytest.fail(str(exc))


async def test_a_session_client_gets_its_ticket_in_the_error_data_and_retries_in_a_new_session(
    tmp_path: Path, opa: PdpUnderTest, op: OpenIdProvider, server: Mcp2Server, mcp1_interpreter: Path
) -> None:
    """The last 1.x SDK (protocol 2025-11-25, sessions): its capabilities were declared in `initialize`, which the
    PEP keeps no state about, so even with `elicitation_url` set it gets -32001 with the ticket in `data`. The
    ticket is bound to the call, not the session: a retry in a new session with the ticket header goes through."""
    url_template = "https://approvals.example/pending/{id}"
    call = {"op": "call", "tool": "issue_refund", "arguments": REFUND}
    async with running_pep(tmp_path, opa, op, server, {"mode": "ticket"}, elicitation_url=url_template) as pep:
        first = await run_mcp1_client(
            mcp1_interpreter, f"{pep.url}/mcp", {"headers": {"x-agent-id": AGENT}, "steps": [call]}
        )
        step = first["steps"][0]
        assert (step["outcome"], step["code"], step["data"]["reason"]) == (
            "mcp_error",
            POLICY_DENY,
            "approval_required",
        )
        assert "elicitations" not in step["data"]
        ticket = step["data"]["approval"]["ticket"]
        await op.approve((await op.wait_ciba())["auth_req_id"])
        plan = {"headers": {"x-agent-id": AGENT, TICKET: ticket}, "steps": [call, call]}
        second = await run_mcp1_client(mcp1_interpreter, f"{pep.url}/mcp", plan)
    assert second["steps"][0]["outcome"] == "ok", second
    assert second["steps"][0]["text"] == "refunded 250 on A-1001"
    assert (second["steps"][1]["outcome"], second["steps"][1]["data"]["reason"]) == ("mcp_error", "approval_invalid")
    assert server.called("issue_refund") == [ToolCall("issue_refund", REFUND)]
