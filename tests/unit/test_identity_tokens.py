"""pep.identity.tokens: reading the token from its header, the acting agent, and TokenVerifier (PyJWT behind an
algorithm allow-list, fixed descriptions, a by-hash LRU of verified tokens) with fake clocks and key sources."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from pep.config import DEFAULT_JWT_ALGORITHMS, JwtConfig
from pep.decision import Reason
from pep.identity import REALM, Refusal, Verified, invalid, missing, unavailable
from pep.identity.keys import FileKeys, KeySet, KeySource, Lookup
from pep.identity.tokens import MAX_TOKEN_BYTES, TokenVerifier, acting_agent, read_token
from tests.support.jwt_keys import (
    AUDIENCE,
    ISSUER,
    SigningKey,
    claims,
    hmac_token,
    jwks,
    raw_token,
    rsa_key,
    segment,
    unsigned_token,
    write_jwks,
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeKeys(KeySource):
    """A key source whose keys the test replaces (unchanged keys stay the same objects), counting lookups."""

    def __init__(self, *keys: SigningKey | dict[str, Any], problem: str | None = None) -> None:
        self.keyset: KeySet | None = None
        self.problem = problem
        self.lookups: list[tuple[str | None, str]] = []
        if keys:
            self.replace(*keys)

    def replace(self, *keys: SigningKey | dict[str, Any]) -> None:
        self.keyset = KeySet.parse(json.dumps(jwks(*keys)).encode(), JWT_ALGS, self.keyset) if keys else None

    async def lookup(self, kid: str | None, alg: str) -> Lookup:
        self.lookups.append((kid, alg))
        if self.keyset is None:
            return Lookup(None, self.problem or "no keys")
        return Lookup(self.keyset.get(kid, alg), None)


JWT_ALGS = ("RS256", "PS256", "ES256", "EdDSA")


def jwt_config(**overrides: Any) -> JwtConfig:
    base: dict[str, Any] = {
        "issuers": (ISSUER,),
        "audiences": (AUDIENCE,),
        "jwks_file": "/unused/jwks.json",
        "algorithms": DEFAULT_JWT_ALGORITHMS,
        "claims": ("department", "azp"),
    }
    base.update(overrides)
    return JwtConfig(**base)


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


TOKEN = "aaa.bbb.ccc"

# --- read_token -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ((), None),
        ((("Authorization", f"Bearer {TOKEN}"),), TOKEN),
        ((("authorization", f"bearer {TOKEN}"),), TOKEN),
        ((("Authorization", f"BEARER   {TOKEN}  "),), TOKEN),
        ((("Authorization", f"  Bearer {TOKEN}"),), TOKEN),
        ((("Authorization", "Basic dXNlcjpwYXNz"),), None),
        ((("Authorization", f"DPoP {TOKEN}"),), None),
        ((("Authorization", TOKEN),), None),  # no scheme: not a bearer token
        ((("x-token", f"Bearer {TOKEN}"),), None),  # another header is not looked at
        ((("Authorization", "Bearer"),), invalid("the token is empty", "invalid_request")),
        ((("Authorization", "Bearer    "),), invalid("the token is empty", "invalid_request")),
        (
            (("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")),
            invalid("more than one token was presented", "invalid_request"),
        ),
        ((("Authorization", "Bearer abc"),), invalid("the token is malformed")),
        ((("Authorization", "Bearer a.b.c.d"),), invalid("the token is malformed")),
        ((("Authorization", "Bearer a.b+c.d"),), invalid("the token is malformed")),
        ((("Authorization", "Bearer a.b=.c"),), invalid("the token is malformed")),
        ((("Authorization", "Bearer a.b c.d"),), invalid("the token is malformed")),
        ((("Authorization", "Bearer a.bé.c"),), invalid("the token is malformed")),
        ((("Authorization", "Bearer a.b."),), "a.b."),  # alg none has an empty signature: refused later
    ],
)
def test_read_token_from_authorization(pairs: tuple[tuple[str, str], ...], expected: str | Refusal | None) -> None:
    assert read_token(headers(*pairs), "authorization") == expected


def test_read_token_length_limit() -> None:
    at_limit = "a." + "b" * (MAX_TOKEN_BYTES - 4) + ".c"
    assert len(at_limit) == MAX_TOKEN_BYTES
    assert read_token(headers(("Authorization", f"Bearer {at_limit}")), "authorization") == at_limit
    over = "a." + "b" * (MAX_TOKEN_BYTES - 3) + ".c"
    assert read_token(headers(("Authorization", f"Bearer {over}")), "authorization") == invalid(
        "the token is malformed"
    )


def test_read_token_from_a_custom_header_takes_the_value_alone() -> None:
    assert read_token(headers(("X-Agent-Token", f" {TOKEN} ")), "x-agent-token") == TOKEN
    assert read_token(headers(("X-Agent-Token", f"Bearer {TOKEN}")), "x-agent-token") == invalid(
        "the token is malformed"
    )
    assert read_token(headers(("Authorization", f"Bearer {TOKEN}")), "x-agent-token") is None
    assert read_token(headers(("X-Agent-Token", "")), "x-agent-token") == invalid(
        "the token is empty", "invalid_request"
    )


def test_read_token_from_proxy_authorization_uses_the_bearer_scheme() -> None:
    assert read_token(headers(("Proxy-Authorization", f"Bearer {TOKEN}")), "proxy-authorization") == TOKEN
    assert read_token(headers(("Proxy-Authorization", "Basic eDp5")), "proxy-authorization") is None


# --- acting_agent -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token_claims", "agent"),
    [
        ({"act": {"sub": "a-act"}, "azp": "a-azp", "client_id": "a-cid"}, "a-act"),
        ({"act": {"sub": "a-act", "act": {"sub": "earlier"}}}, "a-act"),  # the current actor, not the chain
        ({"azp": "a-azp", "client_id": "a-cid"}, "a-azp"),
        ({"client_id": "a-cid"}, "a-cid"),
        ({"act": {"sub": ""}, "azp": "a-azp"}, "a-azp"),
        ({"act": {"sub": 7}, "client_id": "a-cid"}, "a-cid"),
        ({"act": "a-act", "azp": "a-azp"}, "a-azp"),
        ({"act": {}, "azp": ""}, None),
        ({"azp": ["x"], "client_id": 3}, None),
        ({}, None),
    ],
)
def test_acting_agent(token_claims: dict[str, Any], agent: str | None) -> None:
    assert acting_agent(token_claims) == agent


# --- refusals ---------------------------------------------------------------------------------------------------


def test_challenges() -> None:
    assert REALM == "failclosed-pep"
    assert missing("no token").challenge == 'Bearer realm="failclosed-pep"'
    assert invalid("the token has expired").challenge == (
        'Bearer realm="failclosed-pep", error="invalid_token", error_description="the token has expired"'
    )
    assert invalid("two", "invalid_request").challenge == (
        'Bearer realm="failclosed-pep", error="invalid_request", error_description="two"'
    )
    assert unavailable("keys are down").challenge is None
    assert (missing("x").reason, invalid("x").reason, unavailable("x").reason) == (
        Reason.IDENTITY_MISSING,
        Reason.IDENTITY_INVALID,
        Reason.IDENTITY_UNAVAILABLE,
    )


# --- TokenVerifier ----------------------------------------------------------------------------------------------


async def test_valid_tokens_of_each_algorithm(rsa: SigningKey, ec: SigningKey, ed: SigningKey) -> None:
    verifier = TokenVerifier(jwt_config(), FakeKeys(rsa, ec, ed))
    for key in (rsa, ec, ed):
        payload = claims(sub=f"s-{key.alg}", azp="bot", department="ops", email="x@example.test")
        found = await verifier.verify(key.sign(payload))
        assert found == Verified(f"s-{key.alg}", "bot", {"department": "ops", "azp": "bot"}, float(payload["exp"]))


async def test_audiences_and_issuers_are_any_of(rsa: SigningKey) -> None:
    verifier = TokenVerifier(jwt_config(issuers=("https://a.test", ISSUER), audiences=("x", AUDIENCE)), FakeKeys(rsa))
    assert isinstance(await verifier.verify(rsa.sign(claims(aud=["other", AUDIENCE]))), Verified)
    refused = await verifier.verify(rsa.sign(claims(aud=["other", "another"])))
    assert refused == invalid("the token is not for this audience")
    refused = await verifier.verify(rsa.sign(claims(iss="https://b.test")))
    assert refused == invalid("the token is from an untrusted issuer")


async def test_leeway(rsa: SigningKey) -> None:
    now = int(time.time())
    lenient = TokenVerifier(jwt_config(leeway_ms=30000), FakeKeys(rsa))
    strict = TokenVerifier(jwt_config(leeway_ms=0), FakeKeys(rsa))
    just_expired = rsa.sign(claims(iat=now - 100, exp=now - 10))
    almost_valid = rsa.sign(claims(nbf=now + 10))
    assert isinstance(await lenient.verify(just_expired), Verified)
    assert isinstance(await lenient.verify(almost_valid), Verified)
    assert await strict.verify(just_expired) == invalid("the token has expired")
    assert await strict.verify(almost_valid) == invalid("the token is not valid yet")
    assert await lenient.verify(rsa.sign(claims(iat=now - 100, exp=now - 60))) == invalid("the token has expired")
    assert await lenient.verify(rsa.sign(claims(iat=now + 3600, exp=now + 7200))) == invalid(
        "the token is not valid yet"
    )


async def test_algorithms_outside_the_allow_list(rsa: SigningKey, ec: SigningKey) -> None:
    keys = FakeKeys(rsa, ec)
    verifier = TokenVerifier(jwt_config(algorithms=("RS256",)), keys)
    assert await verifier.verify(ec.sign(claims())) == invalid("the token algorithm (ES256) is not accepted")
    assert await verifier.verify(unsigned_token(claims(), kid="rsa-1")) == invalid(
        "the token algorithm (none) is not accepted"
    )
    forged = hmac_token(claims(), rsa.public_pem(), kid="rsa-1")
    assert await verifier.verify(forged) == invalid("the token algorithm (other) is not accepted")
    # An attacker-chosen alg string is never echoed.
    odd = unsigned_token(claims(), alg="RS256<script>")
    assert await verifier.verify(odd) == invalid("the token algorithm (other) is not accepted")
    no_alg = raw_token({"typ": "JWT", "kid": "rsa-1"}, claims(), b"sig")
    assert await verifier.verify(no_alg) == invalid("the token algorithm (other) is not accepted")
    alg_list = raw_token({"alg": ["RS256"], "kid": "rsa-1"}, claims(), b"sig")
    assert await verifier.verify(alg_list) == invalid("the token algorithm (other) is not accepted")
    assert keys.lookups == []  # refused before any key was looked at


async def test_a_key_must_fit_the_algorithm(rsa: SigningKey) -> None:
    """With RS256 and PS256 allowed, a JWK without `alg` serves both, but a token relabelled from one to the other
    does not verify."""
    verifier = TokenVerifier(jwt_config(algorithms=("RS256", "PS256")), FakeKeys(rsa.public_jwk(alg=None)))
    ps = SigningKey("rsa-1", "PS256", rsa.private)
    assert isinstance(await verifier.verify(ps.sign(claims())), Verified)
    _, payload, sig = rsa.sign(claims()).split(".")
    relabelled = segment({"alg": "PS256", "kid": "rsa-1", "typ": "JWT"})
    refused = await verifier.verify(f"{relabelled}.{payload}.{sig}")
    assert refused == invalid("the token signature does not verify")


async def test_kid_rules(rsa: SigningKey, ec: SigningKey) -> None:
    other_rsa = rsa_key("rsa-2")
    one = TokenVerifier(jwt_config(), FakeKeys(rsa))
    assert isinstance(await one.verify(rsa.sign(claims(), kid=None)), Verified)  # the only RS256 key
    two = TokenVerifier(jwt_config(), FakeKeys(rsa, other_rsa, ec))
    assert await two.verify(rsa.sign(claims(), kid=None)) == invalid("no signing key fits the token (unknown kid)")
    assert isinstance(await two.verify(ec.sign(claims(), kid=None)), Verified)  # the only ES256 key
    assert isinstance(await two.verify(other_rsa.sign(claims())), Verified)
    assert await two.verify(rsa.sign(claims(), kid="nope")) == invalid("no signing key fits the token (unknown kid)")
    assert await two.verify(ec.sign(claims(), kid="rsa-1")) == invalid("no signing key fits the token (unknown kid)")
    assert await two.verify(other_rsa.sign(claims(), kid="rsa-1")) == invalid("the token signature does not verify")


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (claims(ttl=86400, exp=None), "the token has no exp claim"),
        (claims(ttl=86400, sub=None), "the token has no sub claim"),
        (claims(ttl=86400, iss=None), "the token has no iss claim"),
        (claims(ttl=86400, aud=None), "the token has no aud claim"),
        (claims(ttl=86400, sub=""), "the token sub claim is not a non-empty string"),
        (claims(ttl=86400, sub=42), "the token is malformed"),
        (claims(ttl=86400, exp="tomorrow"), "the token is malformed"),
        (claims(ttl=86400, iat="yesterday"), "the token has an invalid iat claim"),
    ],
    ids=["no-exp", "no-sub", "no-iss", "no-aud", "empty-sub", "sub-number", "exp-string", "iat-string"],
)
async def test_claims_that_are_required_or_typed(rsa: SigningKey, payload: dict[str, Any], detail: str) -> None:
    verifier = TokenVerifier(jwt_config(), FakeKeys(rsa))
    token = rsa.sign(payload)
    refused = await verifier.verify(token)
    assert refused == invalid(detail)


def _claims_text(**raw: str) -> bytes:
    """Valid claims as JSON text, then `raw` name/value pairs written as they are (repeats and all)."""
    text = json.dumps(claims(ttl=86400))[:-1]
    return (text + "".join(f', "{name.rstrip("_")}": {value}' for name, value in raw.items()) + "}").encode()


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        (b'{"alg":"RS256","kid":"rsa-1"}', _claims_text(sub_='"admin"')),
        (b'{"alg":"RS256","kid":"rsa-1"}', _claims_text(department='"a"', department_='"b"')),
        (b'{"alg":"none","alg":"RS256","kid":"rsa-1"}', _claims_text()),
        (b'{"alg":"RS256","kid":"rsa-1"}', _claims_text(exp_="1" + "0" * 400)),
        (b'{"alg":"RS256","kid":"rsa-1"}', _claims_text(department='"\\ud800"')),
        (b'{"alg":"RS256","kid":"rsa-1"}', _claims_text(department="NaN")),
        (b'{"alg":"RS256","kid":"rsa-1"}', b"[1]"),
    ],
    ids=["sub-twice", "claim-twice", "alg-twice", "exp-beyond-float", "lone-surrogate", "nan", "not-an-object"],
)
async def test_header_and_claims_are_read_strictly(rsa: SigningKey, header: bytes, payload: bytes) -> None:
    """Validly signed, but JSON that readers disagree on (a repeated name: PyJWT keeps the last, others the first)
    or that the policy input cannot carry (an exp beyond a float, a lone surrogate): malformed, never a crash."""
    verifier = TokenVerifier(jwt_config(), FakeKeys(rsa))
    assert await verifier.verify(rsa.sign_raw(header, payload)) == invalid("the token is malformed")
    # The same bytes without the offending member verify: the refusal is the strict reading, not the signing.
    assert isinstance(await verifier.verify(rsa.sign_raw(b'{"alg":"RS256","kid":"rsa-1"}', _claims_text())), Verified)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/at+jwt", "AT+JWT", "JOSE", None])
async def test_access_token_types_are_accepted(rsa: SigningKey, typ: str | None) -> None:
    verifier = TokenVerifier(jwt_config(), FakeKeys(rsa))
    token = (
        rsa.sign(claims(), typ=typ)
        if typ is not None
        else rsa.sign_raw(b'{"alg":"RS256","kid":"rsa-1"}', _claims_text())
    )
    assert isinstance(await verifier.verify(token), Verified)


@pytest.mark.parametrize(
    "typ", ["logout+jwt", "secevent+jwt", "dpop+jwt", "application/logout+jwt", "id_token+jwt", "JWE"]
)
async def test_tokens_typed_for_another_purpose_are_refused(rsa: SigningKey, typ: str) -> None:
    """Same issuer, same keys, same audience and subject: a back-channel logout token, a security event token, a
    DPoP proof are still not access tokens."""
    verifier = TokenVerifier(jwt_config(), FakeKeys(rsa))
    refused = await verifier.verify(rsa.sign(claims(), typ=typ))
    assert refused == invalid("the token type (typ) is not an access token")
    typed_list = rsa.sign_raw(b'{"alg":"RS256","kid":"rsa-1","typ":["JWT"]}', _claims_text())
    assert await verifier.verify(typed_list) == invalid("the token type (typ) is not an access token")


async def test_unusable_keys_are_unavailable_not_invalid(rsa: SigningKey) -> None:
    verifier = TokenVerifier(jwt_config(), FakeKeys(problem="jwks_url answered HTTP 500"))
    refused = await verifier.verify(rsa.sign(claims()))
    assert refused == unavailable("signing keys are unavailable: jwks_url answered HTTP 500")
    assert isinstance(refused, Refusal)
    assert refused.challenge is None


async def test_descriptions_never_hold_the_token(rsa: SigningKey) -> None:
    verifier = TokenVerifier(jwt_config(), FakeKeys(rsa))
    now = int(time.time())
    tokens = [
        rsa.sign(claims(exp=now - 3600, iat=now - 7200, sub="secret-sub")),
        rsa.sign(claims(aud="secret-aud")),
        rsa.sign(claims(iss="https://secret-iss.test")),
        rsa_key("rsa-1").sign(claims()),
        rsa.sign(claims(), kid="secret-kid"),
        unsigned_token(claims(), alg="secret-alg"),
        "eyJzZWNyZXQiOiAxfQ.eyJzZWNyZXQiOiAxfQ.c2VjcmV0",
    ]
    for token in tokens:
        refused = await verifier.verify(token)
        assert isinstance(refused, Refusal)
        assert "secret" not in refused.detail
        for part in token.split("."):
            assert not part or part not in refused.detail


# --- the cache of verified tokens -------------------------------------------------------------------------------


async def test_a_verified_token_is_not_verified_again(rsa: SigningKey) -> None:
    keys = FakeKeys(rsa)
    verifier = TokenVerifier(jwt_config(), keys)
    token = rsa.sign(claims())
    first = await verifier.verify(token)
    assert isinstance(first, Verified)
    assert await verifier.verify(token) is first
    assert keys.lookups == [("rsa-1", "RS256")] * 2  # a remembered token still asks whether its key is there
    # Keyed by the token's hash: the token itself is not kept.
    assert list(verifier._cache) == [hashlib.sha256(token.encode()).digest()]


async def test_a_refused_token_is_not_remembered(rsa: SigningKey) -> None:
    later = rsa_key("later")
    keys = FakeKeys(rsa)
    verifier = TokenVerifier(jwt_config(), keys)
    token = later.sign(claims())
    assert await verifier.verify(token) == invalid("no signing key fits the token (unknown kid)")
    assert await verifier.verify(token) == invalid("no signing key fits the token (unknown kid)")
    assert len(keys.lookups) == 2
    keys.replace(rsa, later)
    assert isinstance(await verifier.verify(token), Verified)
    keys.problem = "down"
    keys.keyset = None
    other = rsa.sign(claims(sub="other"))
    assert isinstance(await verifier.verify(other), Refusal)
    assert len(verifier._cache) == 1


async def test_a_remembered_token_expires_with_its_exp(rsa: SigningKey) -> None:
    now = float(int(time.time()))
    clock = Clock(now)
    keys = FakeKeys(rsa)
    verifier = TokenVerifier(jwt_config(leeway_ms=5000), keys, clock=clock)
    token = rsa.sign(claims(now=now, ttl=60))
    first = await verifier.verify(token)
    assert isinstance(first, Verified)
    clock.now = now + 60 + 4.9  # within exp + leeway: still remembered
    assert await verifier.verify(token) is first
    clock.now = now + 60 + 5.1  # past it: forgotten, so verified again (PyJWT, on the real clock, still accepts)
    again = await verifier.verify(token)
    assert isinstance(again, Verified)
    assert again is not first


async def test_a_withdrawn_key_stops_its_remembered_tokens(rsa: SigningKey, ec: SigningKey) -> None:
    keys = FakeKeys(rsa, ec)
    verifier = TokenVerifier(jwt_config(), keys)
    token, other = rsa.sign(claims()), ec.sign(claims(sub="other"))
    assert isinstance(await verifier.verify(token), Verified)
    kept = await verifier.verify(other)
    assert isinstance(kept, Verified)
    keys.replace(ec)  # the RSA key was withdrawn; the EC key stays (the same key)
    assert await verifier.verify(token) == invalid("no signing key fits the token (unknown kid)")
    assert await verifier.verify(other) is kept  # still remembered: its key is still there
    assert len(verifier._cache) == 1


async def test_a_key_replaced_under_the_same_kid_stops_its_remembered_tokens(rsa: SigningKey) -> None:
    keys = FakeKeys(rsa)
    verifier = TokenVerifier(jwt_config(), keys)
    token = rsa.sign(claims())
    assert isinstance(await verifier.verify(token), Verified)
    keys.replace(rsa_key("rsa-1"))  # another key, the same kid
    assert await verifier.verify(token) == invalid("the token signature does not verify")


async def test_keys_that_cannot_be_had_refuse_remembered_tokens(rsa: SigningKey) -> None:
    keys = FakeKeys(rsa)
    verifier = TokenVerifier(jwt_config(), keys)
    token = rsa.sign(claims())
    first = await verifier.verify(token)
    assert isinstance(first, Verified)
    keys.keyset, keys.problem = None, "jwks_url keys expired and could not be refreshed (jwks_url answered HTTP 500)"
    refused = await verifier.verify(token)
    assert refused == unavailable(f"signing keys are unavailable: {keys.problem}")
    keys.replace(rsa)  # back, from a new fetch: a new key object, so the token is verified again
    again = await verifier.verify(token)
    assert isinstance(again, Verified)
    assert again is not first


async def test_the_cache_is_a_bounded_lru(rsa: SigningKey) -> None:
    keys = FakeKeys(rsa)
    verifier = TokenVerifier(jwt_config(cache_size=2), keys)
    a, b, c = (rsa.sign(claims(sub=s)) for s in "abc")
    first = {token: await verifier.verify(token) for token in (a, b)}
    assert await verifier.verify(a) is first[a]  # `a` was used again, so `b` is the least recent when `c` arrives
    assert isinstance(await verifier.verify(c), Verified)
    assert await verifier.verify(a) is first[a]
    again = await verifier.verify(b)
    assert isinstance(again, Verified)
    assert again is not first[b]  # forgotten: verified again
    assert len(verifier._cache) == 2


async def test_cache_size_zero_verifies_every_time(rsa: SigningKey) -> None:
    keys = FakeKeys(rsa)
    verifier = TokenVerifier(jwt_config(cache_size=0), keys)
    token = rsa.sign(claims())
    for _ in range(3):
        assert isinstance(await verifier.verify(token), Verified)
    assert len(keys.lookups) == 3


# --- with a JWKS file -------------------------------------------------------------------------------------------


async def test_with_a_jwks_file_and_fake_clocks(tmp_path: Path, rsa: SigningKey, ec: SigningKey) -> None:
    path = write_jwks(tmp_path / "jwks.json", rsa)
    file_clock = Clock(1000.0)
    keys = FileKeys(str(path), DEFAULT_JWT_ALGORITHMS, clock=file_clock)
    await keys.start()
    now = time.time()
    verifier = TokenVerifier(jwt_config(jwks_file=str(path)), keys, clock=Clock(now))
    old = rsa.sign(claims(sub="old"))
    new = ec.sign(claims(sub="new"))
    assert isinstance(await verifier.verify(old), Verified)
    assert await verifier.verify(new) == invalid("no signing key fits the token (unknown kid)")
    write_jwks(path, ec)  # rotated: the RSA key is withdrawn
    file_clock.now += 0.5  # the file is looked at once a second: not yet
    assert await verifier.verify(new) == invalid("no signing key fits the token (unknown kid)")
    file_clock.now += 0.5
    assert isinstance(await verifier.verify(new), Verified)  # read again: the new key
    # The remembered `old` asks for its key, which went with the old file.
    assert await verifier.verify(old) == invalid("no signing key fits the token (unknown kid)")
    path.write_text("{")
    file_clock.now += 1
    refused = await verifier.verify(ec.sign(claims(sub="third")))
    assert refused == unavailable("signing keys are unavailable: jwks_file is not JSON")
    # A remembered token too: an unusable file refuses every token.
    assert await verifier.verify(new) == unavailable("signing keys are unavailable: jwks_file is not JSON")
