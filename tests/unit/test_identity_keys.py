"""pep.identity.keys: which JWKs are ever used (KeySet.parse), a JWKS file re-read when it changes (FileKeys), and
a JWKS URL cached per Cache-Control, refetched on an unknown kid at most once per interval, one fetch at a time,
stale keys kept for a while and then dropped (UrlKeys, against the HTTPS JWKS server on loopback, fake clock)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric.ec import SECP384R1, generate_private_key

from pep.config import JwtConfig
from pep.identity.keys import MAX_JWKS_BYTES, FileKeys, KeysError, KeySet, UrlKeys, fits
from tests.support.jwt_keys import (
    AUDIENCE,
    ISSUER,
    JwksServer,
    SigningKey,
    ed_key,
    jwks,
    rsa_key,
    write_jwks,
)

ALL = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
DEFAULT = ("RS256", "ES256", "EdDSA")


def parse(*keys: SigningKey | dict[str, Any], algorithms: tuple[str, ...] = DEFAULT) -> KeySet:
    return KeySet.parse(json.dumps(jwks(*keys)).encode(), algorithms)


# --- fits and KeySet.parse --------------------------------------------------------------------------------------


def test_fits(rsa: SigningKey, ec: SigningKey, ed: SigningKey) -> None:
    r, e, d = rsa.public_jwk(), ec.public_jwk(), ed.public_jwk()
    assert [alg for alg in ALL if fits(r, alg)] == ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    assert [alg for alg in ALL if fits(e, alg)] == ["ES256"]
    assert [alg for alg in ALL if fits(d, alg)] == ["EdDSA"]
    assert not fits({"kty": "oct", "k": "c2VjcmV0"}, "RS256")
    assert not fits({"kty": "EC", "crv": "P-384"}, "ES256")
    assert fits({"kty": "EC", "crv": "P-384"}, "ES384")
    assert fits({"kty": "OKP", "crv": "Ed448"}, "EdDSA")
    assert not fits({"kty": "OKP", "crv": "X25519"}, "EdDSA")
    assert not fits(r, "HS256")
    assert not fits(r, "none")


def test_each_key_is_found_by_kid_and_algorithm(rsa: SigningKey, ec: SigningKey, ed: SigningKey) -> None:
    keys = parse(rsa, ec, ed)
    assert keys.kids == frozenset({"rsa-1", "ec-1", "ed-1"})
    assert keys.get("rsa-1", "RS256") is not None
    assert keys.get("ec-1", "ES256") is not None
    assert keys.get("ed-1", "EdDSA") is not None
    assert keys.get("rsa-1", "ES256") is None  # a kid names a key, the key decides the algorithm
    assert keys.get("ec-1", "RS256") is None
    assert keys.get("nope", "RS256") is None
    assert keys.get(None, "RS256") is not None  # the only RS256 key serves a token without kid


def test_keys_not_for_signatures_are_skipped(rsa: SigningKey, ec: SigningKey) -> None:
    keys = parse(rsa.public_jwk(use="enc"), ec)
    assert keys.kids == frozenset({"ec-1"})
    assert keys.get("rsa-1", "RS256") is None
    assert parse(rsa.public_jwk(use=None)).get("rsa-1", "RS256") is not None  # no `use`: a signing key
    with pytest.raises(KeysError, match="no usable public signing key"):
        parse(rsa.public_jwk(use="enc"))


def test_private_keys_are_not_trusted(rsa: SigningKey, ec: SigningKey, ed: SigningKey) -> None:
    keys = parse(rsa.private_jwk(), ec.private_jwk(), ed)
    assert keys.kids == frozenset({"ed-1"})
    with pytest.raises(KeysError):
        parse(rsa.private_jwk())


def test_the_jwk_alg_must_be_an_allowed_one(rsa: SigningKey) -> None:
    rs512 = rsa.public_jwk(alg="RS512")
    with pytest.raises(KeysError, match="RS256, ES256, EdDSA"):
        parse(rs512)
    keys = parse(rs512, algorithms=("RS256", "RS512"))
    assert keys.get("rsa-1", "RS512") is not None
    assert keys.get("rsa-1", "RS256") is None
    # Without `alg`, the key serves every allowed algorithm of its type.
    keys = parse(rsa.public_jwk(alg=None), algorithms=("RS256", "PS256"))
    assert keys.get("rsa-1", "RS256") is not None
    assert keys.get("rsa-1", "PS256") is not None


def test_the_curve_must_fit(ec: SigningKey) -> None:
    p384 = SigningKey("p384", "ES384", generate_private_key(SECP384R1()))
    with pytest.raises(KeysError):
        parse(p384.public_jwk(alg=None))  # a P-384 key is no ES256 key
    keys = parse(p384.public_jwk(alg=None), ec, algorithms=("ES256", "ES384"))
    assert keys.get("p384", "ES384") is not None
    assert keys.get("p384", "ES256") is None


def test_keys_without_kid(rsa: SigningKey, ec: SigningKey) -> None:
    keys = parse(rsa.public_jwk(kid=None))
    assert keys.kids == frozenset()
    assert keys.get(None, "RS256") is not None
    assert keys.get("rsa-1", "RS256") is None
    two = parse(rsa.public_jwk(kid=None), rsa_key("rsa-2").public_jwk(kid=None), ec)
    assert two.get(None, "RS256") is None  # which of the two? neither
    assert two.get(None, "ES256") is not None
    numbered = parse(rsa.public_jwk(kid=7))
    assert numbered.kids == frozenset()
    assert numbered.get(None, "RS256") is not None


def test_a_new_parse_reuses_only_identical_keys(rsa: SigningKey, ec: SigningKey) -> None:
    """The same key object means the same kid, algorithm and material: what a remembered token is checked by."""
    old = parse(rsa, ec)
    rogue = rsa_key("rsa-1")  # another key under the same kid
    new = KeySet.parse(json.dumps(jwks(rogue, ec)).encode(), DEFAULT, old)
    assert new.get("ec-1", "ES256") is old.get("ec-1", "ES256")
    assert new.get("rsa-1", "RS256") is not None
    assert new.get("rsa-1", "RS256") is not old.get("rsa-1", "RS256")
    renamed = KeySet.parse(json.dumps(jwks(ec.public_jwk(kid="ec-2"))).encode(), DEFAULT, old)
    assert renamed.get("ec-2", "ES256") is not old.get("ec-1", "ES256")  # the kid is part of the key
    again = KeySet.parse(json.dumps(jwks(rsa, ec)).encode(), DEFAULT, new)
    assert again.get("rsa-1", "RS256") is not old.get("rsa-1", "RS256")  # only the previous set is reused


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "is not JSON"),
        (b"{", "is not JSON"),
        (b"[]", "is not a JWK Set"),
        (b'{"keys": {}}', "is not a JWK Set"),
        (b'{"key": []}', "is not a JWK Set"),
        (b'{"keys": []}', "holds no usable public signing key for RS256, ES256, EdDSA"),
        (b'{"keys": [1, "x", null, []]}', "holds no usable public signing key"),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "a"}]}', "holds no usable public signing key"),
        (b'{"keys": [{"kid": "a"}, {"kty": "XYZ", "kid": "b"}]}', "holds no usable public signing key"),
    ],
)
def test_unusable_sets(raw: bytes, problem: str) -> None:
    with pytest.raises(KeysError) as info:
        KeySet.parse(raw, DEFAULT)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        {"kty": "RSA", "kid": "bad", "n": "AQAB", "e": "AQAB"},
        {"kty": "RSA", "kid": "bad"},
        {"kty": "EC", "crv": "P-256", "kid": "bad", "x": "AA", "y": "AA"},
        {"kty": "OKP", "crv": "Ed25519", "kid": "bad", "x": "AA"},
        {"kty": "RSA", "kid": "bad", "n": 5, "e": "AQAB"},
        # P-384 coordinates under a P-256 label
        {
            "kty": "EC",
            "crv": "P-256",
            "kid": "bad",
            "x": "PlcDD1WS50SXiwdwg163P6XSTHXvWJZZ2-LD1ymobOuTAXP2F0tjrUJqPScBUcoC",
            "y": "xxhggRVA9EdlIDxzUDhCVWi3gIdseAgHVlW0i59o9RPFcGTqM4guS1PRz9KhWDfe",
        },
    ],
    ids=["rsa-short-n", "rsa-no-n", "ec-short", "okp-short", "rsa-n-number", "ec-wrong-curve"],
)
def test_a_malformed_key_is_skipped_not_raised(rsa: SigningKey, bad: dict[str, Any]) -> None:
    keys = parse(bad, rsa)  # one bad member does not spoil the set
    assert keys.kids == frozenset({"rsa-1"})
    with pytest.raises(KeysError, match="no usable public signing key"):
        parse(bad)


# --- FileKeys ---------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_jwks_file_is_read_at_start(tmp_path: Path, rsa: SigningKey) -> None:
    keys = FileKeys(str(write_jwks(tmp_path / "jwks.json", rsa)), DEFAULT, clock=Clock())
    await keys.start()
    found = await keys.lookup("rsa-1", "RS256")
    assert (found.key is not None, found.problem) == (True, None)
    missing = await keys.lookup("other", "RS256")
    assert (missing.key, missing.problem) == (None, None)  # no such key: the token is invalid, not unavailable


@pytest.mark.parametrize("kind", ["missing", "directory", "too-large", "not-json"])
async def test_an_unusable_file_fails_the_start_and_every_lookup(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "jwks.json"
    expected = {
        "missing": "jwks_file cannot be read",
        "directory": "jwks_file cannot be read",
        "too-large": f"jwks_file is larger than {MAX_JWKS_BYTES} bytes",
        "not-json": "jwks_file is not JSON",
    }[kind]
    if kind == "directory":
        path.mkdir()
    elif kind == "too-large":
        path.write_bytes(b" " * (MAX_JWKS_BYTES + 1))
    elif kind == "not-json":
        path.write_text("{")
    keys = FileKeys(str(path), DEFAULT, clock=Clock())
    with pytest.raises(KeysError) as info:
        await keys.start()
    assert str(info.value).startswith(expected)
    found = await keys.lookup("rsa-1", "RS256")
    assert found.key is None
    assert found.problem is not None
    assert found.problem.startswith(expected)


async def test_the_file_is_looked_at_once_a_second(tmp_path: Path, rsa: SigningKey, ec: SigningKey) -> None:
    path = write_jwks(tmp_path / "jwks.json", rsa)
    clock = Clock()
    keys = FileKeys(str(path), DEFAULT, clock=clock)
    await keys.start()
    first = (await keys.lookup("rsa-1", "RS256")).key
    write_jwks(path, rsa, ec)
    os.utime(path, ns=(1, 1))  # a different mtime whatever the clock's resolution
    clock.now += 0.99
    assert (await keys.lookup("ec-1", "ES256")).key is None
    clock.now += 0.01
    added = (await keys.lookup("ec-1", "ES256")).key
    assert added is not None
    assert (await keys.lookup("rsa-1", "RS256")).key is first  # re-read, and the unchanged key is the same key
    clock.now += 5
    assert (await keys.lookup("ec-1", "ES256")).key is added


async def test_a_symlink_swap_and_a_broken_file_and_a_repair(tmp_path: Path, rsa: SigningKey, ec: SigningKey) -> None:
    v1, v2 = write_jwks(tmp_path / "v1.json", rsa), write_jwks(tmp_path / "v2.json", ec)
    link = tmp_path / "jwks.json"
    link.symlink_to(v1)
    clock = Clock()
    keys = FileKeys(str(link), DEFAULT, clock=clock)
    await keys.start()
    tmp = tmp_path / "jwks.json.tmp"
    tmp.symlink_to(v2)
    os.replace(tmp, link)
    clock.now += 1
    assert (await keys.lookup("ec-1", "ES256")).key is not None
    assert (await keys.lookup("rsa-1", "RS256")).key is None
    v2.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    clock.now += 1
    broken = await keys.lookup("ec-1", "ES256")
    assert broken.key is None
    assert broken.problem == "jwks_file holds no usable public signing key for RS256, ES256, EdDSA"
    write_jwks(v2, ec)
    keys.refresh()  # SIGHUP: at once
    assert (await keys.lookup("ec-1", "ES256")).key is not None


# --- UrlKeys ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def server(ca: trustme.CA, rsa: SigningKey, ec: SigningKey) -> AsyncIterator[JwksServer]:
    jwks_server = JwksServer(ca)
    jwks_server.publish(rsa, ec)
    await jwks_server.start()
    yield jwks_server
    await jwks_server.stop()


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


class Source:
    """A UrlKeys with its fake clock and the results of its fetches."""

    def __init__(self, server: JwksServer, ca: trustme.CA, **cfg: Any) -> None:
        base = JwtConfig(issuers=(ISSUER,), audiences=(AUDIENCE,), jwks_url=server.url, algorithms=DEFAULT)
        self.cfg = replace(base, **cfg)
        self.clock = Clock()
        self.keys = UrlKeys(server.url, self.cfg, trusting(ca), clock=self.clock)
        self.results: list[bool] = []
        self.keys.fetches = self.results.append

    async def __aenter__(self) -> Source:
        try:
            await self.keys.start()
        except BaseException:
            await self.keys.close()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.keys.close()

    async def has(self, kid: str, alg: str = "RS256") -> bool:
        return (await self.keys.lookup(kid, alg)).key is not None

    async def problem(self, kid: str = "rsa-1", alg: str = "RS256") -> str | None:
        return (await self.keys.lookup(kid, alg)).problem


async def test_keys_are_fresh_for_max_age(server: JwksServer, ca: trustme.CA) -> None:
    server.cache_control = "public, max-age=300"
    async with Source(server, ca, jwks_min_refresh_ms=0) as src:
        assert server.requests == 1
        first = (await src.keys.lookup("rsa-1", "RS256")).key
        assert first is not None
        src.clock.now += 299.9
        assert await src.has("ec-1", "ES256")
        assert server.requests == 1  # fresh: not fetched
        src.clock.now += 0.1
        assert await src.has("rsa-1")
        assert server.requests == 2  # stale: fetched again before use
        assert src.results == [True, True]
        assert (await src.keys.lookup("rsa-1", "RS256")).key is first  # refetched unchanged: the same key


@pytest.mark.parametrize(
    ("cache_control", "fresh_s"),
    [(None, 5.0), ("max-age=2", 3.0), ("no-cache", 3.0), ("no-store, max-age=600", 3.0), ("max-age=x", 5.0)],
    ids=["none-default", "short-max-age-floored", "no-cache-floored", "no-store", "bad-max-age-default"],
)
async def test_freshness_without_a_usable_max_age(
    server: JwksServer, ca: trustme.CA, cache_control: str | None, fresh_s: float
) -> None:
    """No max-age: jwks_cache_ms. Never fresher than jwks_min_refresh_ms: no fetch per request."""
    server.cache_control = cache_control
    async with Source(server, ca, jwks_cache_ms=5000, jwks_min_refresh_ms=3000) as src:
        src.clock.now += fresh_s - 0.01
        assert await src.has("rsa-1")
        assert server.requests == 1
        src.clock.now += 0.01
        assert await src.has("rsa-1")
        assert server.requests == 2


async def test_an_unknown_kid_refetches_at_most_once_per_interval(
    server: JwksServer, ca: trustme.CA, rsa: SigningKey, ec: SigningKey
) -> None:
    spare = ed_key("spare")
    async with Source(server, ca, jwks_min_refresh_ms=10000) as src:
        assert not await src.has("spare", "EdDSA")
        assert server.requests == 1  # just fetched at start: not again
        server.publish(rsa, ec, spare)
        src.clock.now += 9.9
        for i in range(20):
            assert not await src.has(f"made-up-{i}")
        assert server.requests == 1
        src.clock.now += 0.1
        assert await src.has("spare", "EdDSA")  # rotated in: found by the one refetch
        assert server.requests == 2
        for i in range(20):
            assert not await src.has(f"made-up-{i}")
        assert server.requests == 2


async def test_one_fetch_at_a_time(server: JwksServer, ca: trustme.CA, rsa: SigningKey) -> None:
    async with Source(server, ca, jwks_min_refresh_ms=0) as src:
        server.hang = True
        lookups = [asyncio.ensure_future(src.keys.lookup(f"unknown-{i}", "RS256")) for i in range(50)]
        for _ in range(100):  # until the one fetch has arrived at the server
            if server.requests == 2:
                break
            await asyncio.sleep(0.01)
        server.hang = False
        await server.stop()  # releases the hanging answer: the fetch fails
        found = await asyncio.gather(*lookups)
        assert server.requests == 2  # fifty lookups, one fetch
        assert all(f.key is None and f.problem is None for f in found)  # the last good keys still serve
        assert src.results == [True, False]


async def test_stale_keys_serve_while_refetching_fails_then_are_dropped(
    server: JwksServer, ca: trustme.CA, rsa: SigningKey
) -> None:
    server.cache_control = "max-age=60"
    async with Source(server, ca, jwks_min_refresh_ms=1000, jwks_max_stale_ms=30000) as src:
        before = (await src.keys.lookup("rsa-1", "RS256")).key
        server.status = 500
        src.clock.now += 60
        assert await src.has("rsa-1")  # stale, the refetch failed: still used
        assert server.requests == 2
        src.clock.now += 29
        assert await src.has("rsa-1")  # 89 s: 60 fresh + 29 of the 30 stale
        assert server.requests == 3
        src.clock.now += 1
        assert await src.problem() == "jwks_url keys expired and could not be refreshed (jwks_url answered HTTP 500)"
        assert server.requests == 4
        assert await src.problem() is not None
        assert src.results == [True, False, False, False]
        server.status = 200
        assert await src.problem() is not None  # a fetch was tried less than jwks_min_refresh_ms ago
        src.clock.now += 1
        assert await src.problem() is None
        assert await src.has("rsa-1")
        assert src.results[-1] is True
        assert (await src.keys.lookup("rsa-1", "RS256")).key is not before  # dropped keys are gone for good


async def test_keys_just_fetched_are_used_even_with_no_staleness_allowed(server: JwksServer, ca: trustme.CA) -> None:
    server.cache_control = "no-cache"
    async with Source(server, ca, jwks_min_refresh_ms=0, jwks_max_stale_ms=0) as src:
        assert await src.problem() is None  # fetched just now, successfully
        assert await src.has("rsa-1")


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"status": 500}, "jwks_url answered HTTP 500"),
        ({"status": 302}, "jwks_url answered HTTP 302"),  # redirects are not followed
        ({"body": b"<html>"}, "jwks_url is not JSON"),
        ({"body": b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'}, "jwks_url holds no usable public signing key"),
        ({"hang": True}, "jwks_url could not be fetched ("),
    ],
    ids=["500", "redirect", "garbage", "oct-only", "hang"],
)
async def test_a_url_without_usable_keys(
    server: JwksServer, ca: trustme.CA, settings: dict[str, Any], problem: str
) -> None:
    for name, value in settings.items():
        setattr(server, name, value)
    async with Source(server, ca, jwks_timeout_ms=200) as src:  # a failed start is not fatal
        found = await src.problem()
        assert found is not None
        assert found.startswith(problem)
        assert src.results == [False]  # the start; the lookup came within jwks_min_refresh_ms


async def test_a_url_that_is_down_then_up(server: JwksServer, ca: trustme.CA) -> None:
    await server.stop()
    async with Source(server, ca, jwks_min_refresh_ms=2000) as src:
        assert await src.problem() == "jwks_url could not be fetched (ClientConnectorError)"
        await server.start()
        src.clock.now += 1.9
        assert await src.problem() is not None  # rate-limited: not tried yet
        src.clock.now += 0.1
        assert await src.problem() is None
        assert src.results == [False, True]


async def test_a_url_with_a_certificate_from_another_ca(server: JwksServer, rsa: SigningKey) -> None:
    async with Source(server, trustme.CA()) as src:
        problem = await src.problem()
        assert problem is not None
        assert problem.startswith("jwks_url could not be fetched (ClientConnectorCertificateError")
        assert server.requests == 0


async def test_a_url_with_one_malformed_key_serves_the_others(server: JwksServer, ca: trustme.CA) -> None:
    server.keys = [{"kty": "RSA", "kid": "bad", "n": "AQAB", "e": "AQAB"}, *server.keys]
    async with Source(server, ca) as src:
        assert await src.has("rsa-1")


async def test_an_answer_that_arrives_in_pieces_is_read_whole(server: JwksServer, ca: trustme.CA) -> None:
    server.split = True
    async with Source(server, ca) as src:
        assert await src.problem() is None
        assert await src.has("rsa-1")


async def test_an_answer_over_the_limit_is_refused_as_too_large(server: JwksServer, ca: trustme.CA) -> None:
    server.body = b'{"keys": [], "pad": "' + b"x" * MAX_JWKS_BYTES + b'"}'
    async with Source(server, ca) as src:
        assert await src.problem() == f"jwks_url answer is larger than {MAX_JWKS_BYTES} bytes"
