"""Responses the PEP makes itself: denials (README, "Denials"), failures after an allow (502/504/413/408) and
requests the listener cannot read (400, 414, 431, 501, 505).

Each is a `Reply` value (status, fields, body), edited where the request calls for it (a 401 with its challenge)
and then sent whole by the transport, which alone writes the framing fields.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from pep.approvals.binding import ApprovalPending
from pep.decision import Reason
from pep.protocols import NO_ID, Inspected

MESSAGES: Final[dict[Reason, str]] = {
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
    Reason.APPROVAL_REQUIRED: "This request needs a person's approval; retry it with the ticket once approved.",
    Reason.APPROVAL_DENIED: "The approver declined this request.",
    Reason.APPROVAL_TIMEOUT: "Nobody approved this request in time.",
    Reason.APPROVAL_UNAVAILABLE: "Approvals cannot be asked for right now.",
    Reason.APPROVAL_INVALID: "The approval ticket is not valid for this request.",
    Reason.INTERNAL_ERROR: "The proxy failed while deciding.",
}

_JSON: Final = "application/json"


class Reply:
    """An answer the PEP makes itself. `headers` are lower-case names to values (one each); `content-type` among
    them when the reply has a body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes = b"", content_type: str | None = _JSON):
        self.status = status
        self.headers = headers
        self.body = body
        if content_type is not None:
            headers["content-type"] = content_type

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    def fields(self) -> list[tuple[bytes, bytes]]:
        """The header fields to send (the transport adds Content-Length and Connection)."""
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers.items()]


# The PDP could not decide (JSON-RPC -32603, "internal") as opposed to a decision against the request (-32001).
UNDECIDED: Final[frozenset[Reason]] = frozenset(
    {
        Reason.PDP_UNDEFINED,
        Reason.PDP_MALFORMED,
        Reason.PDP_ERROR_STATUS,
        Reason.PDP_TIMEOUT,
        Reason.PDP_UNREACHABLE,
        Reason.PDP_OVERLOADED,
        Reason.CIRCUIT_OPEN,
        Reason.AUDIT_UNAVAILABLE,
        Reason.APPROVAL_TIMEOUT,
        Reason.APPROVAL_UNAVAILABLE,
        Reason.INTERNAL_ERROR,
    }
)
MCP_DENIED: Final = -32001
MCP_UNDECIDED: Final = -32603
MCP_URL_ELICITATION_REQUIRED: Final = -32042  # MCP 2025-11-25: the client shows the user a URL, then retries


def _deny_headers(reason: Reason, request_id: str) -> dict[str, str]:
    return {
        "x-pep-decision": "deny",
        "x-pep-reason": reason.value,
        "x-request-id": request_id,
        "cache-control": "no-store",
    }


def _approval_headers(headers: dict[str, str], approval: ApprovalPending | None) -> dict[str, str]:
    if approval is not None:
        headers["retry-after"] = approval.retry_after_s
    return headers


def deny(reason: Reason, request_id: str, status: int = 403, approval: ApprovalPending | None = None) -> Reply:
    """A denial for a plain HTTP route: `{"error": {code, reason, message, request_id}}`, with `approval` (and a
    `retry-after` header) when the request waits for a person."""
    error: dict[str, Any] = {
        "code": "access_denied",
        "reason": reason.value,
        "message": MESSAGES[reason],
        "request_id": request_id,
    }
    if approval is not None:
        error["approval"] = approval.fields()
    headers = _approval_headers(_deny_headers(reason, request_id), approval)
    return Reply(status, headers, orjson.dumps({"error": error}))


def _mcp_error(
    reason: Reason, request_id: str, approval: ApprovalPending | None, url_elicitation: bool
) -> dict[str, Any]:
    data: dict[str, Any] = {"reason": reason.value, "request_id": request_id}
    if approval is None:
        return {"code": MCP_UNDECIDED if reason in UNDECIDED else MCP_DENIED, "message": MESSAGES[reason], "data": data}
    data["approval"] = approval.fields()
    if not url_elicitation or approval.elicitation_url is None:
        return {"code": MCP_DENIED, "message": MESSAGES[reason], "data": data}
    # The URL-elicitation-required error (MCP 2025-11-25): the client shows the URL to its user and may retry.
    text = f"A person must approve this request (code {approval.code}); retry it once approved."
    data["elicitations"] = [
        {"mode": "url", "message": text, "url": approval.elicitation_url, "elicitationId": approval.approval_id}
    ]
    return {"code": MCP_URL_ELICITATION_REQUIRED, "message": MESSAGES[reason], "data": data}


def deny_mcp(
    reason: Reason,
    request_id: str,
    inspected: Inspected | None,
    deny_status: int,
    approval: ApprovalPending | None = None,
    url_elicitation: bool = False,
) -> Reply:
    """A JSON-RPC error for each request of the body (its id), -32001 for a refusal, -32603 when undecided.

    With `deny_status: 200` (the default: every MCP SDK generation reads the error from a 200, where the 1.x
    client ends its session on a 403) the status is 200 for requests and 202 for notifications and responses
    (which expect no body). GET, DELETE and bodies that could not be read get the plain 403.
    A request waiting for a person (`approval`) gets -32001 with the ticket in `data.approval`, or -32042 with a
    URL elicitation when the client declared URL elicitation support (`url_elicitation`) and a URL is configured.
    """
    messages = inspected.messages if inspected is not None else ()
    # Requests only: a response the client sent is never answered (its id is from the server's id space).
    ids = [m.rpc_id for m in messages if m.rpc_id is not NO_ID and m.facts.get("method") != "mcp/response"]
    headers = _approval_headers(_deny_headers(reason, request_id), approval)
    if inspected is None or inspected.body is None:
        return deny(reason, request_id, approval=approval)
    if not ids:
        if deny_status == 200:
            return Reply(202, headers, content_type=None)
        return deny(reason, request_id, approval=approval)
    error = _mcp_error(reason, request_id, approval, url_elicitation)
    replies = [{"jsonrpc": "2.0", "id": rpc_id, "error": error} for rpc_id in ids]
    body = orjson.dumps(replies if inspected.batch else replies[0])
    return Reply(deny_status, headers, body)


def deny_openai(reason: Reason, request_id: str, approval: ApprovalPending | None = None) -> Reply:
    """OpenAI's error shape; `x-should-retry: false` keeps the SDKs from retrying a refusal (a retry of a request
    waiting for a person needs its ticket, which the SDK would not send)."""
    error: dict[str, Any] = {
        "message": MESSAGES[reason],
        "type": "permission_denied",
        "code": reason.value,
        "param": None,
    }
    if approval is not None:
        error["approval"] = approval.fields()
    body = orjson.dumps({"error": error})
    headers = _approval_headers(_deny_headers(reason, request_id), approval)
    headers["x-should-retry"] = "false"
    return Reply(403, headers, body)


_UPSTREAM_FAILURES: Final = {
    "connect": (502, "upstream_unavailable", "The upstream could not be reached."),
    "reset": (502, "upstream_unavailable", "The upstream closed the connection without a response."),
    "timeout": (504, "upstream_timeout", "The upstream did not answer in time."),
    "body_limit": (413, "body_too_large", "The request body is larger than this route allows."),
    "unreadable": (502, "upstream_unreadable", "The upstream's answer could not be read to be decided."),
    "body_timeout": (408, "request_timeout", "The request body did not arrive in time."),
}


def upstream_failure(kind: str, request_id: str, decision_id: str) -> Reply:
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
    return Reply(status, headers, body)


_UNREADABLE_REQUESTS: Final = {
    400: "bad_request",
    413: "body_too_large",
    414: "uri_too_long",
    431: "header_fields_too_large",
    501: "not_implemented",
}


def unreadable_request(status: int, why: str) -> Reply:
    """A request the listener could not read as HTTP/1.1 (its status hint): nothing was decided about it, so no
    `x-pep-decision`; `why` is the reader's reason (never request data)."""
    code = _UNREADABLE_REQUESTS.get(status, "bad_request")
    return Reply(status, {"cache-control": "no-store"}, orjson.dumps({"error": {"code": code, "message": why}}))
