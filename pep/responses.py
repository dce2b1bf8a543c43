"""Responses the PEP makes itself: denials (README, "Denials") and failures after an allow (502/504/413/408)."""

from __future__ import annotations

import orjson
from aiohttp import web

from pep.decision import Reason
from pep.protocols import NO_ID, Inspected

MESSAGES: dict[Reason, str] = {
    Reason.POLICY_DENIED: "The policy denied this request.",
    Reason.PDP_UNDEFINED: "The policy gave no decision for this request.",
    Reason.PDP_MALFORMED: "The policy decision point gave an answer that could not be read.",
    Reason.PDP_ERROR_STATUS: "The policy decision point answered with an error.",
    Reason.PDP_TIMEOUT: "The policy decision point did not answer in time.",
    Reason.PDP_UNREACHABLE: "The policy decision point could not be reached.",
    Reason.PDP_OVERLOADED: "Too many decisions are waiting for the policy decision point.",
    Reason.CIRCUIT_OPEN: "The policy decision point is failing; requests are refused until it recovers.",
    Reason.OBLIGATION_UNSUPPORTED: "The decision asked for something the proxy cannot carry out.",
    Reason.BODY_TOO_LARGE: "The request body is larger than this route allows.",
    Reason.BODY_UNREADABLE: "The request body could not be read.",
    Reason.REQUEST_AMBIGUOUS: "The request could be read in more than one way.",
    Reason.NO_ROUTE: "No route matches this request.",
    Reason.CREDENTIAL_UNAVAILABLE: "The credential for this route is unavailable.",
    Reason.AUDIT_UNAVAILABLE: "The decision could not be recorded.",
    Reason.IDENTITY_MISSING: "No verified identity was presented.",
    Reason.IDENTITY_INVALID: "The presented identity could not be verified.",
    Reason.IDENTITY_UNAVAILABLE: "Identities cannot be verified right now.",
    Reason.INTERNAL_ERROR: "The proxy failed while deciding.",
}

_JSON = "application/json"

# The PDP could not decide (JSON-RPC -32603, "internal") as opposed to a decision against the request (-32001).
UNDECIDED: frozenset[Reason] = frozenset(
    {
        Reason.PDP_UNDEFINED,
        Reason.PDP_MALFORMED,
        Reason.PDP_ERROR_STATUS,
        Reason.PDP_TIMEOUT,
        Reason.PDP_UNREACHABLE,
        Reason.PDP_OVERLOADED,
        Reason.CIRCUIT_OPEN,
        Reason.AUDIT_UNAVAILABLE,
        Reason.INTERNAL_ERROR,
    }
)
MCP_DENIED = -32001
MCP_UNDECIDED = -32603


def _deny_headers(reason: Reason, request_id: str) -> dict[str, str]:
    return {
        "x-pep-decision": "deny",
        "x-pep-reason": reason.value,
        "x-request-id": request_id,
        "cache-control": "no-store",
    }


def deny(reason: Reason, request_id: str, status: int = 403) -> web.Response:
    """A denial for a plain HTTP route: `{"error": {code, reason, message, request_id}}`."""
    body = orjson.dumps(
        {
            "error": {
                "code": "access_denied",
                "reason": reason.value,
                "message": MESSAGES[reason],
                "request_id": request_id,
            }
        }
    )
    return web.Response(status=status, body=body, headers=_deny_headers(reason, request_id), content_type=_JSON)


def deny_mcp(reason: Reason, request_id: str, inspected: Inspected | None, deny_status: int) -> web.Response:
    """A JSON-RPC error for each request of the body (its id), -32001 for a refusal, -32603 when undecided.

    With `deny_status: 200` (the default: every MCP SDK generation reads the error from a 200, where the 1.x
    client ends its session on a 403) the status is 200 for requests and 202 for notifications and responses
    (which expect no body). GET, DELETE and bodies that could not be read get the plain 403.
    """
    messages = inspected.messages if inspected is not None else ()
    # Requests only: a response the client sent is never answered (its id is from the server's id space).
    ids = [m.rpc_id for m in messages if m.rpc_id is not NO_ID and m.facts.get("method") != "mcp/response"]
    headers = _deny_headers(reason, request_id)
    if inspected is None or inspected.body is None:
        return deny(reason, request_id)
    if not ids:
        if deny_status == 200:
            return web.Response(status=202, headers=headers)
        return deny(reason, request_id)
    error = {
        "code": MCP_UNDECIDED if reason in UNDECIDED else MCP_DENIED,
        "message": MESSAGES[reason],
        "data": {"reason": reason.value, "request_id": request_id},
    }
    replies = [{"jsonrpc": "2.0", "id": rpc_id, "error": error} for rpc_id in ids]
    body = orjson.dumps(replies if inspected.batch else replies[0])
    return web.Response(status=deny_status, body=body, headers=headers, content_type=_JSON)


def deny_openai(reason: Reason, request_id: str) -> web.Response:
    """OpenAI's error shape; `x-should-retry: false` keeps the SDKs from retrying a refusal."""
    body = orjson.dumps(
        {"error": {"message": MESSAGES[reason], "type": "permission_denied", "code": reason.value, "param": None}}
    )
    headers = _deny_headers(reason, request_id)
    headers["x-should-retry"] = "false"
    return web.Response(status=403, body=body, headers=headers, content_type=_JSON)


_UPSTREAM_FAILURES = {
    "connect": (502, "upstream_unavailable", "The upstream could not be reached."),
    "reset": (502, "upstream_unavailable", "The upstream closed the connection without a response."),
    "timeout": (504, "upstream_timeout", "The upstream did not answer in time."),
    "body_limit": (413, "body_too_large", "The request body is larger than this route allows."),
    "unreadable": (502, "upstream_unreadable", "The upstream's answer could not be read to be decided."),
    "body_timeout": (408, "request_timeout", "The request body did not arrive in time."),
}


def upstream_failure(kind: str, request_id: str, decision_id: str) -> web.Response:
    """An allowed request that got no upstream response. Not a denial: `x-pep-decision: allow`."""
    status, code, message = _UPSTREAM_FAILURES[kind]
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})
    headers = {
        "x-pep-decision": "allow",
        "x-pep-upstream-error": kind,
        "x-pep-decision-id": decision_id,
        "x-request-id": request_id,
        "cache-control": "no-store",
    }
    return web.Response(status=status, body=body, headers=headers, content_type=_JSON)
