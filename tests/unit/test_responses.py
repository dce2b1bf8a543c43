"""pep.responses: the denial shapes of MCP and OpenAI routes (README, "Denials" and "Agent protocols")."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pep.decision import DENY_REASONS, Reason
from pep.protocols import NO_ID, Inspected, Message, mcp
from pep.responses import MCP_DENIED, MCP_UNDECIDED, MESSAGES, UNDECIDED, Reply, deny_mcp, deny_openai

RID = "req-1"
UNDECIDED_REASONS = sorted(UNDECIDED)
DECIDED_REASONS = [r for r in DENY_REASONS if r not in UNDECIDED]


def message(rpc_id: Any = 1, method: str = "tools/call") -> Message:
    return Message("mcp", {"method": method, "name": None, "arguments": None, "protocol_version": None}, rpc_id)


def single(rpc_id: Any = 1) -> Inspected:
    return Inspected((message(rpc_id),), b"{}")


def json_body(response: Reply) -> Any:
    assert isinstance(response.body, bytes)
    assert response.content_type == "application/json"
    return orjson.loads(response.body)


def assert_deny_headers(response: Reply, reason: Reason) -> None:
    assert response.headers["x-pep-decision"] == "deny"
    assert response.headers["x-pep-reason"] == reason.value
    assert response.headers["x-request-id"] == RID


def test_undecided_is_the_pdp_failures() -> None:
    assert {
        Reason.PDP_UNDEFINED,
        Reason.PDP_MALFORMED,
        Reason.PDP_ERROR_STATUS,
        Reason.PDP_TIMEOUT,
        Reason.PDP_UNREACHABLE,
        Reason.PDP_OVERLOADED,
        Reason.CIRCUIT_OPEN,
    } <= UNDECIDED
    assert Reason.POLICY_DENIED not in UNDECIDED
    assert Reason.ALLOWED not in UNDECIDED
    for reason in (Reason.BODY_UNREADABLE, Reason.BODY_TOO_LARGE, Reason.REQUEST_AMBIGUOUS, Reason.NO_ROUTE):
        assert reason not in UNDECIDED
    assert set(MESSAGES) == set(DENY_REASONS)


@pytest.mark.parametrize("reason", DECIDED_REASONS)
def test_mcp_refusals_are_32001(reason: Reason) -> None:
    response = deny_mcp(reason, RID, single(7), 403)
    assert response.status == 403
    assert_deny_headers(response, reason)
    assert json_body(response) == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {
            "code": MCP_DENIED,
            "message": MESSAGES[reason],
            "data": {"reason": reason.value, "request_id": RID},
        },
    }
    assert MCP_DENIED == -32001


@pytest.mark.parametrize("reason", UNDECIDED_REASONS)
def test_mcp_undecided_is_32603(reason: Reason) -> None:
    response = deny_mcp(reason, RID, single("abc"), 403)
    assert response.status == 403
    assert_deny_headers(response, reason)
    body = json_body(response)
    assert body["id"] == "abc"
    assert body["error"]["code"] == MCP_UNDECIDED == -32603
    assert body["error"]["data"] == {"reason": reason.value, "request_id": RID}


@pytest.mark.parametrize("rpc_id", [0, "", None, "x" * 50, 2**53])
def test_mcp_error_carries_the_id_as_sent(rpc_id: Any) -> None:
    body = json_body(deny_mcp(Reason.POLICY_DENIED, RID, single(rpc_id), 403))
    assert "id" in body
    assert body["id"] == rpc_id
    assert type(body["id"]) is type(rpc_id)


def test_mcp_batch_answers_every_request() -> None:
    inspected = Inspected(
        (message(1), message(NO_ID, "notifications/progress"), message("b", "mcp/response"), message(None)),
        b"[]",
        batch=True,
    )
    response = deny_mcp(Reason.POLICY_DENIED, RID, inspected, 403)
    assert response.status == 403
    assert_deny_headers(response, Reason.POLICY_DENIED)
    body = json_body(response)
    assert isinstance(body, list)
    assert [e["id"] for e in body] == [1, None]  # notifications and the client's responses get no answer
    assert all(e["jsonrpc"] == "2.0" and e["error"]["code"] == MCP_DENIED for e in body)


def test_mcp_batch_of_one_is_still_an_array() -> None:
    inspected = Inspected((message(3),), b"[]", batch=True)
    body = json_body(deny_mcp(Reason.PDP_TIMEOUT, RID, inspected, 403))
    assert body == [
        {
            "jsonrpc": "2.0",
            "id": 3,
            "error": {"code": MCP_UNDECIDED, "message": MESSAGES[Reason.PDP_TIMEOUT], "data": body[0]["error"]["data"]},
        }
    ]


def test_mcp_deny_status_200_for_requests() -> None:
    response = deny_mcp(Reason.POLICY_DENIED, RID, single(9), 200)
    assert response.status == 200
    assert_deny_headers(response, Reason.POLICY_DENIED)
    assert json_body(response)["error"]["code"] == MCP_DENIED
    batch = Inspected((message(1), message(NO_ID, "notifications/x")), b"[]", batch=True)
    response = deny_mcp(Reason.PDP_UNREACHABLE, RID, batch, 200)
    assert response.status == 200
    assert [e["id"] for e in json_body(response)] == [1]


NO_REQUESTS = [
    Inspected((message(NO_ID, "notifications/initialized"),), b"{}"),
    Inspected((message(NO_ID, "notifications/a"), message(NO_ID, "notifications/b")), b"[]", batch=True),
    # A response the client sends to a server request: answering it with an error under its id would look, to
    # the client, like the answer to its own request with the same id.
    Inspected((message(5, "mcp/response"),), b"{}"),
    Inspected((message("s-1", "mcp/response"), message(NO_ID, "notifications/x")), b"[]", batch=True),
]


@pytest.mark.parametrize("inspected", NO_REQUESTS)
def test_mcp_deny_status_200_without_requests_is_202_without_a_body(inspected: Inspected) -> None:
    response = deny_mcp(Reason.POLICY_DENIED, RID, inspected, 200)
    assert response.status == 202
    assert not response.body
    assert_deny_headers(response, Reason.POLICY_DENIED)


@pytest.mark.parametrize("inspected", NO_REQUESTS)
def test_mcp_without_requests_and_403_is_a_plain_denial(inspected: Inspected) -> None:
    response = deny_mcp(Reason.POLICY_DENIED, RID, inspected, 403)
    assert response.status == 403
    assert_deny_headers(response, Reason.POLICY_DENIED)
    assert json_body(response)["error"]["reason"] == "policy_denied"


@pytest.mark.parametrize("deny_status", [403, 200])
@pytest.mark.parametrize(
    "inspected",
    [None, Inspected((mcp.http_action("GET"),), None), Inspected((mcp.http_action("DELETE"),), None)],
)
def test_mcp_without_a_body_is_a_plain_403(inspected: Inspected | None, deny_status: int) -> None:
    """GET, DELETE and bodies refused before they were read: no JSON-RPC id to answer, so HTTP 403."""
    response = deny_mcp(Reason.BODY_UNREADABLE, RID, inspected, deny_status)
    assert response.status == 403
    assert_deny_headers(response, Reason.BODY_UNREADABLE)
    assert json_body(response) == {
        "error": {
            "code": "access_denied",
            "reason": "body_unreadable",
            "message": MESSAGES[Reason.BODY_UNREADABLE],
            "request_id": RID,
        }
    }


@pytest.mark.parametrize("reason", DENY_REASONS)
def test_openai_shape(reason: Reason) -> None:
    response = deny_openai(reason, RID)
    assert response.status == 403
    assert_deny_headers(response, reason)
    assert response.headers["x-should-retry"] == "false"
    assert json_body(response) == {
        "error": {"message": MESSAGES[reason], "type": "permission_denied", "code": reason.value, "param": None}
    }
