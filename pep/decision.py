"""Decisions: the closed set of reasons, and the only value that lets a request through.

The guarantee is made structural here: the forwarding code takes an `Allow`, and an `Allow` can only be built
with the mint key, which `engine.py` claims once at import. Nothing else in the process can create one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final


class Reason(enum.StrEnum):
    """Why a request was decided as it was. A closed set: these are metric label values."""

    ALLOWED = "allowed"
    POLICY_DENIED = "policy_denied"
    PDP_UNDEFINED = "pdp_undefined"
    PDP_MALFORMED = "pdp_malformed"
    PDP_ERROR_STATUS = "pdp_error_status"
    PDP_TIMEOUT = "pdp_timeout"
    PDP_UNREACHABLE = "pdp_unreachable"
    PDP_OVERLOADED = "pdp_overloaded"
    CIRCUIT_OPEN = "circuit_open"
    OBLIGATION_UNSUPPORTED = "obligation_unsupported"
    BODY_TOO_LARGE = "body_too_large"
    BODY_UNREADABLE = "body_unreadable"
    REQUEST_AMBIGUOUS = "request_ambiguous"
    NO_ROUTE = "no_route"
    CREDENTIAL_UNAVAILABLE = "credential_unavailable"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    IDENTITY_MISSING = "identity_missing"
    IDENTITY_INVALID = "identity_invalid"
    IDENTITY_UNAVAILABLE = "identity_unavailable"
    APPROVAL_REQUIRED = "approval_required"  # the PDP allows once a person approves; not yet approved
    APPROVAL_DENIED = "approval_denied"  # the person declined
    APPROVAL_TIMEOUT = "approval_timeout"  # nobody answered in time
    APPROVAL_UNAVAILABLE = "approval_unavailable"  # the OpenID Provider is down, slow or answered nonsense
    APPROVAL_INVALID = "approval_invalid"  # a ticket that is forged, expired, reused, or for another request
    INTERNAL_ERROR = "internal_error"


DENY_REASONS: tuple[Reason, ...] = tuple(r for r in Reason if r is not Reason.ALLOWED)


class _MintKey:
    """The capability to create an Allow. Exactly one instance exists and only one caller may claim it."""

    __slots__ = ()


def _one_key() -> tuple[Callable[[], _MintKey], Callable[[object], bool]]:
    key = _MintKey()
    claimed = False

    def claim() -> _MintKey:
        nonlocal claimed
        if claimed:
            raise RuntimeError("the Allow mint key has already been claimed")
        claimed = True
        return key

    def is_key(candidate: object) -> bool:
        return candidate is key

    return claim, is_key


# `claim_mint_key` hands the key to its single owner (the decision engine); a second claim raises.
claim_mint_key, _is_mint_key = _one_key()


@dataclass(frozen=True, slots=True)
class CredentialNarrowing:
    """A PDP's narrowing of a route's just-in-time credential (OPA `result.credential`, AuthZEN
    `context.credential`): one audience and/or fewer scopes than the route's maximum, never more."""

    audience: str | None = None
    scopes: tuple[str, ...] | None = None


class Allow:
    """An explicit, in-time allow for one exact request: method, upstream URL and (on inspected routes) the
    body are bound at decision time. The forwarder sends what is stored here, so what is forwarded is what was
    decided. `credential` is the PDP's narrowing of the route's just-in-time credential, if any.

    Immutable both ways it runs. Compiled (`make native`), its fields are `Final` slots of a native class: no
    setter exists for them (not even `object.__setattr__` reaches one), and the constructor stores them directly.
    Interpreted, `__setattr__` lets each slot be set once (by the constructor) and `__delattr__` refuses.
    """

    __slots__ = ("body", "credential", "decision_id", "headers", "method", "request_id", "route", "upstream_url")

    def __init__(
        self,
        key: object,
        *,
        decision_id: str,
        request_id: str,
        route: str,
        method: str,
        upstream_url: str,
        headers: tuple[tuple[str, str], ...],
        body: bytes | None = None,
        credential: CredentialNarrowing | None = None,
    ) -> None:
        if not _is_mint_key(key):
            raise TypeError("an Allow can only be created by the decision engine")
        self.decision_id: Final = decision_id
        self.request_id: Final = request_id
        self.route: Final = route
        self.method: Final = method
        self.upstream_url: Final = upstream_url
        self.headers: Final = headers  # obligation headers the PDP asked for, already vetted
        self.body: Final = body  # on inspected routes, the exact bytes decided on and to be forwarded
        self.credential: Final = credential

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, name):  # interpreted only: compiled, the constructor's stores do not come here
            raise AttributeError("Allow is immutable")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Allow is immutable")

    def __repr__(self) -> str:
        return f"Allow(decision_id={self.decision_id!r}, route={self.route!r}, method={self.method!r})"


@dataclass(frozen=True, slots=True)
class Deny:
    """A refusal with its reason; `detail` is for the decision log only, never sent to the caller."""

    reason: Reason
    decision_id: str
    detail: str = ""


Decision = Allow | Deny
