"""Reading a PDP's "approval required" strictly: who approves, what to tell them, until when.

Each PDP kind carries the same three facts in its own place (OPA `result.approval`, AuthZEN
`context.access_request` per the Access Request and Approval Profile, Cedar `@approval` annotations); the rules for
the values are here, once. Anything that does not read is `pdp_malformed`: an approval the PEP cannot carry out
exactly as asked is never carried out some other way.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final

from pep.pdp import ApprovalAsk, Failure
from pep.pdp.answer import malformed

MAX_APPROVER: Final = 256
MAX_MESSAGE: Final = 1024


def _printable(text: str) -> bool:
    return all(c.isprintable() for c in text)


def approver_of(value: Any, where: str) -> str | Failure:
    """The approver: the CIBA `login_hint` the OP resolves to a person (a non-empty, printable string)."""
    if not isinstance(value, str) or not value.strip():
        return malformed(f"{where} is not a non-empty string")
    if len(value) > MAX_APPROVER or not _printable(value) or value != value.strip():
        return malformed(f"{where} is longer than {MAX_APPROVER} or holds control or surrounding space characters")
    return value


def message_of(value: Any, where: str) -> str | Failure | None:
    """The policy's text for the approver; absent is fine."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_MESSAGE:
        return malformed(f"{where} is not a string of at most {MAX_MESSAGE} characters")
    return value


_RFC3339: Final = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})\Z")


def rfc3339(value: Any, where: str) -> float | Failure:
    """An RFC 3339 date-time (seconds and offset required), as seconds since the epoch. ISO 8601's other forms
    (no seconds, no offset, a space for `T`) are refused: the profile says RFC 3339."""
    if not isinstance(value, str) or not _RFC3339.match(value):
        return malformed(f"{where} is not an RFC 3339 date-time with seconds and an offset")
    try:
        return datetime.fromisoformat(value.upper()).timestamp()
    except (ValueError, OverflowError):  # month 13, hour 24, a leap second (Python has none)
        return malformed(f"{where} is not an RFC 3339 date-time with seconds and an offset")


_OPA_KEYS: Final = frozenset({"approver", "message"})


def opa_approval(value: Any) -> ApprovalAsk | Failure:
    """OPA `result.approval`: `{approver, message?}`. Unknown keys are refused: a condition the PEP would ignore
    (two approvers, a quorum) must not become a weaker approval."""
    if not isinstance(value, dict):
        return malformed("result.approval is not an object")
    unknown = sorted(set(value) - _OPA_KEYS)
    if unknown:
        return malformed(f"result.approval has keys the PEP does not carry out: {', '.join(unknown)[:100]}")
    approver = approver_of(value.get("approver"), "result.approval.approver")
    if isinstance(approver, Failure):
        return approver
    message = message_of(value.get("message"), "result.approval.message")
    if isinstance(message, Failure):
        return message
    return ApprovalAsk(approver, message)


def authzen_approval(value: Any) -> ApprovalAsk | Failure:
    """AuthZEN `context.access_request` (the Access Request and Approval Profile's requestable denial).

    From the profile: `expires_at` (required, RFC 3339), and `display.description` (else `display.title`) as the
    message. The approver is this PEP's member `approver` (the profile leaves approver routing to the Access
    Request Service; here the approval engine is CIBA, which needs a `login_hint`). Other members are ignored, as
    the profile requires of unknown extension members."""
    if not isinstance(value, dict):
        return malformed("context.access_request is not an object")
    approver = approver_of(value.get("approver"), "context.access_request.approver")
    if isinstance(approver, Failure):
        return approver
    expires_at = rfc3339(value.get("expires_at"), "context.access_request.expires_at")
    if isinstance(expires_at, Failure):
        return expires_at
    display = value.get("display")
    if display is not None and not isinstance(display, dict):
        return malformed("context.access_request.display is not an object")
    message: str | Failure | None = None
    if display:
        key = "description" if display.get("description") is not None else "title"
        message = message_of(display.get(key), f"context.access_request.display.{key}")
    if isinstance(message, Failure):
        return message
    return ApprovalAsk(approver, message, expires_at)
