"""JWT bearer tokens: read from the configured header, verified with PyJWT against the JWKS keys.

PyJWT (with `cryptography`) does the signature and claim checks; it is the most used JOSE library for Python,
kept up to date, and already in the dependency tree through the MCP SDK. Around it this module adds what a
proxy needs: header and claims read strictly first (`strict_parts`), the algorithm allow-list enforced before
any key is chosen (never `none`, never HMAC), a key that must fit the algorithm, `exp`/`iss`/`aud`/`sub`
required, descriptions that never echo the token, and a bounded LRU of verified tokens keyed by the SHA-256 of
the token, kept until the token expires. The cache holds identity (who the caller is), never a decision: every
request still goes to the PDP.

A remembered token is only as good as the key that verified it: each use asks the key source again (which is how
a file gets looked at and a stale URL refetched), and the token passes only while that very key (same kid,
algorithm and material) is still in the usable set. Keys that can no longer be had refuse remembered tokens
exactly as they refuse new ones, whatever the source.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import jwt
from jwt import PyJWK
from jwt.utils import base64url_decode
from multidict import CIMultiDict, CIMultiDictProxy

from pep import strictjson
from pep.config import JWT_ALGORITHMS, JwtConfig
from pep.identity import Refusal, Verified, invalid, unavailable
from pep.identity.keys import KeySource

_BEARER_HEADERS: Final = frozenset({"authorization", "proxy-authorization"})
_REQUIRED: Final = ["exp", "iss", "aud", "sub"]
_TOKEN_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
MAX_TOKEN_BYTES: Final = 16384

# PyJWT's exceptions as fixed descriptions: its messages can quote parts of the token.
_DESCRIPTIONS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is not for this audience"),
    (jwt.InvalidIssuerError, "the token is from an untrusted issuer"),
    (jwt.InvalidSignatureError, "the token signature does not verify"),
    (jwt.InvalidAlgorithmError, "the token algorithm does not fit its key"),
    (jwt.InvalidIssuedAtError, "the token has an invalid iat claim"),
)


def _describe(exc: Exception) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError) and exc.claim in _REQUIRED:
        return f"the token has no {exc.claim} claim"
    for kind, text in _DESCRIPTIONS:
        if isinstance(exc, kind):
            return text
    return "the token is malformed"


def read_token(headers: CIMultiDictProxy[str] | CIMultiDict[str], header: str) -> str | Refusal | None:
    """The token the caller presents in `header`; None when there is none; a Refusal when it is unusable.

    `authorization` and `proxy-authorization` carry `Bearer <token>` (RFC 6750 2.1; another scheme is not a
    bearer token, so there is none); any other header carries the token alone."""
    values = headers.getall(header, ())
    if not values:
        return None
    if len(values) > 1:
        return invalid("more than one token was presented", "invalid_request")
    value = values[0].strip()
    if header in _BEARER_HEADERS:
        scheme, _, value = value.partition(" ")
        if scheme.lower() != "bearer":
            return None
        value = value.strip()
    if not value:
        return invalid("the token is empty", "invalid_request")
    if len(value) > MAX_TOKEN_BYTES or value.count(".") != 2 or not _TOKEN_CHARS.issuperset(value):
        return invalid("the token is malformed")
    return value


def strict_parts(token: str) -> bool:
    """Whether the token's header and claims are each one strict JSON object (`pep.strictjson`).

    PyJWT reads both with `json.loads`, which keeps the last of repeated names (`{"sub":"a","sub":"admin"}`),
    reads integers of any size and lone surrogates: a reader keeping the first name would see another caller,
    and the policy input could not be written (an `exp` beyond a float, a surrogate in a claim)."""
    try:
        head, body, _ = token.split(".")
        strictjson.loads_object(base64url_decode(head))
        strictjson.loads_object(base64url_decode(body))
    except (ValueError, strictjson.JsonError):  # binascii.Error is a ValueError
        return False
    return True


# `typ` values (RFC 7515 4.1.9: case-insensitive, `application/` optional) a bearer access token may carry: RFC
# 9068's `at+jwt`, and the generic `JWT` and `JOSE` most IdPs and JWT-SVIDs use.
_ACCESS_TYPES: Final = frozenset({"jwt", "jose", "at+jwt"})


def access_token_type(typ: object) -> bool:
    """Whether a header's `typ` may be an access token's. A token typed as something else (`logout+jwt`,
    `secevent+jwt`, `dpop+jwt`, ...) is signed by the same keys for another purpose, often with the same `iss`,
    `aud` and `sub`: explicit typing exists so that it cannot be replayed as a bearer token (RFC 8725 3.11)."""
    return isinstance(typ, str) and typ.lower().removeprefix("application/") in _ACCESS_TYPES


def acting_agent(claims: dict[str, Any]) -> str | None:
    """The agent acting with this token: RFC 8693 `act.sub`, else OIDC `azp`, else RFC 9068 `client_id`."""
    act = claims.get("act")
    if isinstance(act, dict) and isinstance(act.get("sub"), str) and act["sub"]:
        return str(act["sub"])
    for name in ("azp", "client_id"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return None


class _Remembered:
    """A verified token, with the key that verified it: valid while that key is still in the usable set."""

    __slots__ = ("alg", "key", "kid", "verified")

    def __init__(self, verified: Verified, kid: str | None, alg: str, key: PyJWK) -> None:
        self.verified = verified
        self.kid = kid
        self.alg = alg
        self.key = key


class TokenVerifier:
    """Verifies tokens against `identity.jwt`, remembering verified ones (by hash) until they expire."""

    def __init__(self, cfg: JwtConfig, keys: KeySource, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.keys = keys
        self._clock = clock
        self._leeway = cfg.leeway_ms / 1000
        self._algorithms = frozenset(cfg.algorithms)
        self._cache: OrderedDict[bytes, _Remembered] = OrderedDict()
        self._cache_size = cfg.cache_size

    async def verify(self, token: str) -> Verified | Refusal:
        digest = hashlib.sha256(token.encode("ascii")).digest()
        cache = self._cache
        hit = cache.get(digest)
        if hit is not None:
            if self._clock() < hit.verified.expires + self._leeway:
                found = await self.keys.lookup(hit.kid, hit.alg)
                if found.problem is not None:
                    return unavailable(f"signing keys are unavailable: {found.problem}")
                if found.key is hit.key:
                    cache.move_to_end(digest)
                    return hit.verified
            # Expired, or its key left the set (or changed under the same kid): verified again from scratch.
            cache.pop(digest, None)
        result = await self._verify(token)
        if isinstance(result, _Remembered):
            if self._cache_size:
                cache[digest] = result
                if len(cache) > self._cache_size:
                    cache.popitem(last=False)
            return result.verified
        return result

    async def _verify(self, token: str) -> _Remembered | Refusal:
        if not strict_parts(token):
            return invalid("the token is malformed")
        try:
            header = jwt.get_unverified_header(token)  # PyJWT's own header checks (a `kid` that is not a string)
        except jwt.PyJWTError:
            return invalid("the token is malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            shown = alg if isinstance(alg, str) and (alg in JWT_ALGORITHMS or alg.lower() == "none") else "other"
            return invalid(f"the token algorithm ({shown}) is not accepted")
        if "crit" in header:
            return invalid("the token has critical header parameters")
        if not access_token_type(header.get("typ", "JWT")):
            return invalid("the token type (typ) is not an access token")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return invalid("the token kid is not a string")
        found = await self.keys.lookup(kid, alg)
        if found.problem is not None:
            return unavailable(f"signing keys are unavailable: {found.problem}")
        if found.key is None:
            return invalid("no signing key fits the token (unknown kid)")
        cfg = self.cfg
        try:
            claims = jwt.decode(
                token,
                found.key,
                algorithms=[alg],
                audience=list(cfg.audiences),
                issuer=list(cfg.issuers),
                leeway=self._leeway,
                options={"require": _REQUIRED, "strict_aud": False},
            )
        except Exception as exc:
            return invalid(_describe(exc))
        sub = claims.get("sub")
        exp = claims.get("exp")
        if not isinstance(sub, str) or not sub:
            return invalid("the token sub claim is not a non-empty string")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            return invalid("the token exp claim is not a number")
        kept = {name: claims[name] for name in cfg.claims if name in claims}
        return _Remembered(Verified(sub, acting_agent(claims), kept, float(exp)), kid, alg, found.key)
