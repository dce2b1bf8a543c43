"""Responses the PEP makes itself: denials (DESIGN.md shapes) and failures after an allow (502/504/413)."""

from __future__ import annotations

import orjson
from aiohttp import web

from pep.decision import Reason

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
    headers = {
        "x-pep-decision": "deny",
        "x-pep-reason": reason.value,
        "x-request-id": request_id,
        "cache-control": "no-store",
    }
    return web.Response(status=status, body=body, headers=headers, content_type=_JSON)


_UPSTREAM_FAILURES = {
    "connect": (502, "upstream_unavailable", "The upstream could not be reached."),
    "reset": (502, "upstream_unavailable", "The upstream closed the connection without a response."),
    "timeout": (504, "upstream_timeout", "The upstream did not answer in time."),
    "body_limit": (413, "body_too_large", "The request body is larger than this route allows."),
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
