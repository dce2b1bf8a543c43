"""Who is asking: verified bearer tokens (JWT via JWKS) and SPIFFE IDs from client certificates.

Everything here verifies identity; nothing decides. A failure is a `Refusal` with its reason and a description
that is safe to log: it never holds the token or any part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from pep.decision import Reason

REALM: Final = "failclosed-pep"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why no identity could be established. `error` is the RFC 6750 code for the challenge, if any;
    `drop_session`: the connection's TLS session must not be used again (closed without a close_notify)."""

    reason: Reason
    detail: str
    error: str | None = None
    drop_session: bool = False

    @property
    def challenge(self) -> str | None:
        """The `WWW-Authenticate` value for a 401 (identity_missing and identity_invalid), else None."""
        if self.reason is Reason.IDENTITY_MISSING:
            return f'Bearer realm="{REALM}"'  # RFC 6750 3.1: no error code when nothing was presented
        if self.reason is Reason.IDENTITY_INVALID:
            error = self.error or "invalid_token"
            return f'Bearer realm="{REALM}", error="{error}", error_description="{self.detail}"'
        return None


def missing(detail: str) -> Refusal:
    return Refusal(Reason.IDENTITY_MISSING, detail)


def invalid(detail: str, error: str = "invalid_token") -> Refusal:
    return Refusal(Reason.IDENTITY_INVALID, detail, error)


def unavailable(detail: str) -> Refusal:
    return Refusal(Reason.IDENTITY_UNAVAILABLE, detail)


@dataclass(frozen=True, slots=True)
class Verified:
    """What a verified token says about its caller. `claims` holds only the configured allow-list."""

    subject_id: str  # `sub`
    agent: str | None  # the acting agent: `act.sub`, else `azp`, else `client_id`
    claims: dict[str, Any]
    expires: float  # `exp`, seconds since the epoch
