"""Reading a PDP's narrowing of a route's just-in-time credential: `{audience?, scopes?}` on an allow.

OPA `result.credential`, AuthZEN `context.credential`. The shape is checked here (anything else is
`pdp_malformed`); whether it is within the route's maximum is checked when the credential is obtained (wider is
`obligation_unsupported`), since only the route knows its maximum.
"""

from __future__ import annotations

from typing import Any, Final

from pep.decision import CredentialNarrowing
from pep.pdp import Failure
from pep.pdp.answer import malformed

_KEYS: Final = frozenset({"audience", "scopes"})
MAX_SCOPES: Final = 64
MAX_TEXT: Final = 256


def _token(value: Any) -> bool:
    """A non-empty scope token or audience: printable ASCII, no spaces (RFC 6749 3.3 scope-token)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT and all(0x21 <= ord(c) <= 0x7E for c in value)


def credential_narrowing(value: Any, where: str) -> CredentialNarrowing | Failure:
    if not isinstance(value, dict):
        return malformed(f"{where} is not an object")
    unknown = sorted(set(value) - _KEYS)
    if unknown:
        return malformed(f"{where} has keys the PEP does not carry out: {', '.join(unknown)[:100]}")
    audience = value.get("audience")
    if audience is not None and not _token(audience):
        return malformed(f"{where}.audience is not a non-empty string without spaces")
    scopes = value.get("scopes")
    if scopes is not None:
        if (
            not isinstance(scopes, list)
            or len(scopes) > MAX_SCOPES
            or not all(_token(s) for s in scopes)
            or len(set(scopes)) != len(scopes)
        ):
            return malformed(f"{where}.scopes is not a list of distinct scope names")
        scopes = tuple(scopes)
    return CredentialNarrowing(audience, scopes)
