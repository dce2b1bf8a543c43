"""The identity config (issue 6): `identity.jwt`, `identity.mtls` and a route's `require_identity`, read into
JwtConfig/MtlsConfig with their defaults, every refusal as `file: key.path: message`, and `pep check` reading the
files they name (a jwks_file that is missing, unreadable or not a usable key set)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from pep.cli import EXIT_CONFIG, main
from pep.config import DEFAULT_JWT_ALGORITHMS, ConfigError, JwtConfig, MtlsConfig, parse
from tests.support.jwt_keys import ec_key, jwks, rsa_key, write_jwks

SRC = "f.yaml"
Mutation = Callable[[dict[str, Any]], object]
JWT = {"issuers": ["https://issuer.test"], "audiences": ["failclosed-pep"], "jwks_file": "/etc/pep/jwks.json"}
AUTHZEN: dict[str, Any] = {"kind": "authzen", "url": "http://127.0.0.1:3592"}


def minimal(**jwt: Any) -> dict[str, Any]:
    """A config with identity.jwt: JWT updated with `jwt` (a None value removes the key)."""
    merged = {k: v for k, v in {**JWT, **jwt}.items() if v is not None}
    return {
        "version": 1,
        "listen": "127.0.0.1:8080",
        "identity": {"workload": "spiffe://test/agent", "agent_header": "x-agent-id", "jwt": merged},
        "pdp": {"kind": "opa", "url": "http://127.0.0.1:8181/v1/data/pep/authz"},
        "routes": [{"name": "crm", "match": {"path_prefix": "/crm/"}, "upstream": "https://crm.internal:8443/api/"}],
    }


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, SRC)
    return info.value.problems


def jwt_of(data: dict[str, Any]) -> JwtConfig:
    jwt = parse(data, SRC).identity.jwt
    assert jwt is not None
    return jwt


# --- valid ------------------------------------------------------------------------------------------------------


def test_the_defaults() -> None:
    assert jwt_of(minimal()) == JwtConfig(
        issuers=("https://issuer.test",),
        audiences=("failclosed-pep",),
        jwks_file="/etc/pep/jwks.json",
        jwks_url=None,
        jwks_ca_file=None,
        algorithms=DEFAULT_JWT_ALGORITHMS,
        header="authorization",
        leeway_ms=30000,
        claims=(),
        cache_size=10000,
        jwks_timeout_ms=2000,
        jwks_min_refresh_ms=10000,
        jwks_cache_ms=300000,
        jwks_max_stale_ms=3600000,
    )
    assert DEFAULT_JWT_ALGORITHMS == ("RS256", "ES256", "EdDSA")


def test_everything_set() -> None:
    data = minimal(
        issuers=["https://a.test", "https://b.test"],
        audiences=["pep", "api"],
        jwks_file=None,
        jwks_url="https://issuer.test/.well-known/jwks.json",
        jwks_ca_file="/etc/pep/issuer-ca.pem",
        algorithms=["PS256", "ES384", "EdDSA"],
        header="X-Agent-Token",
        leeway_ms=0,
        claims=["sub", "azp", "department"],
        cache_size=0,
        jwks_timeout_ms=500,
        jwks_min_refresh_ms=0,
        jwks_cache_ms=1000,
        jwks_max_stale_ms=0,
    )
    jwt = jwt_of(data)
    assert jwt.issuers == ("https://a.test", "https://b.test")
    assert jwt.audiences == ("pep", "api")
    assert (jwt.jwks_file, jwt.jwks_url) == (None, "https://issuer.test/.well-known/jwks.json")
    assert jwt.jwks_ca_file == "/etc/pep/issuer-ca.pem"
    assert jwt.algorithms == ("PS256", "ES384", "EdDSA")
    assert jwt.header == "x-agent-token"  # lower-cased
    assert jwt.claims == ("sub", "azp", "department")
    assert (jwt.leeway_ms, jwt.cache_size, jwt.jwks_timeout_ms) == (0, 0, 500)
    assert (jwt.jwks_min_refresh_ms, jwt.jwks_cache_ms, jwt.jwks_max_stale_ms) == (0, 1000, 0)


def test_require_identity_with_a_token_source() -> None:
    data = minimal()
    data["routes"][0]["require_identity"] = True
    data["routes"].append({"name": "open", "match": {"path_prefix": "/open"}, "upstream": "http://h"})
    cfg = parse(data, SRC)
    assert [r.require_identity for r in cfg.routes] == [True, False]


def test_mtls() -> None:
    data = minimal()
    data["identity"]["mtls"] = {"ca_file": "/b.pem", "cert_file": "/c.pem", "key_file": "/k.pem"}
    assert parse(data, SRC).identity.mtls == MtlsConfig("/b.pem", "/c.pem", "/k.pem")


# --- refused ----------------------------------------------------------------------------------------------------


def jwt_set(**values: Any) -> Mutation:
    return lambda c: c["identity"]["jwt"].update(values)


def jwt_del(*keys: str) -> Mutation:
    def mutate(c: dict[str, Any]) -> None:
        for key in keys:
            del c["identity"]["jwt"][key]

    return mutate


P = "identity.jwt"
ERRORS: list[tuple[str, Mutation, str]] = [
    ("alg-none", jwt_set(algorithms=["RS256", "none"]), f"{P}.algorithms: must not contain none"),
    ("alg-None", jwt_set(algorithms=["None"]), f"{P}.algorithms: must not contain none"),
    ("alg-hs256", jwt_set(algorithms=["HS256"]), f"{P}.algorithms: HS256 is an HMAC algorithm"),
    ("alg-hs512-lower", jwt_set(algorithms=["ES256", "hs512"]), f"{P}.algorithms: hs512 is an HMAC algorithm"),
    ("alg-unknown", jwt_set(algorithms=["RS1"]), f"{P}.algorithms: 'RS1' is not one of RS256"),
    ("alg-lowercase", jwt_set(algorithms=["rs256"]), f"{P}.algorithms: 'rs256' is not one of"),
    ("alg-empty", jwt_set(algorithms=[]), f"{P}.algorithms: must be a non-empty list"),
    ("alg-string", jwt_set(algorithms="RS256"), f"{P}.algorithms: must be a non-empty list"),
    ("both-sources", jwt_set(jwks_url="https://i.test/jwks"), f"{P}: needs exactly one of jwks_file and jwks_url"),
    ("no-source", jwt_del("jwks_file"), f"{P}: needs exactly one of jwks_file and jwks_url"),
    (
        "http-url",
        lambda c: (jwt_del("jwks_file")(c), jwt_set(jwks_url="http://issuer.test/jwks")(c)),
        f"{P}.jwks_url: must be an https:// URL",
    ),
    (
        "not-a-url",
        lambda c: (jwt_del("jwks_file")(c), jwt_set(jwks_url="issuer.test/jwks")(c)),
        f"{P}.jwks_url: must be an http:// or https:// URL",
    ),
    (
        "url-with-credentials",
        lambda c: (jwt_del("jwks_file")(c), jwt_set(jwks_url="https://u:p@issuer.test/jwks")(c)),
        f"{P}.jwks_url: must not carry user credentials",
    ),
    ("ca-without-url", jwt_set(jwks_ca_file="/ca.pem"), f"{P}.jwks_ca_file: is only used with jwks_url"),
    ("bad-header", jwt_set(header="x token"), f"{P}.header: is not a valid header name: 'x token'"),
    ("bad-header-colon", jwt_set(header="authorization:"), f"{P}.header: is not a valid header name"),
    ("empty-header", jwt_set(header=""), f"{P}.header: must be a non-empty string"),
    (
        "agent-header-is-the-token-header",
        jwt_set(header="X-Agent-ID"),
        "identity.agent_header: must differ from identity.jwt.header",
    ),
    (
        "agent-header-is-authorization",
        lambda c: c["identity"].update(agent_header="Authorization"),
        "identity.agent_header: must differ from identity.jwt.header",
    ),
    ("no-issuers", jwt_del("issuers"), f"{P}.issuers: is required"),
    ("empty-issuers", jwt_set(issuers=[]), f"{P}.issuers: must be a non-empty list of non-empty strings"),
    ("issuer-empty-string", jwt_set(issuers=[""]), f"{P}.issuers: must be a non-empty list"),
    ("issuer-string", jwt_set(issuers="https://i"), f"{P}.issuers: must be a non-empty list"),
    ("no-audiences", jwt_del("audiences"), f"{P}.audiences: is required"),
    ("audience-number", jwt_set(audiences=[1]), f"{P}.audiences: must be a non-empty list"),
    ("claims-empty", jwt_set(claims=[]), f"{P}.claims: must be a non-empty list"),
    ("claims-number", jwt_set(claims=["sub", 2]), f"{P}.claims: must be a non-empty list"),
    ("unknown-key", jwt_set(jwks_uri="https://i.test"), f"{P}.jwks_uri: unknown key"),
    ("leeway-negative", jwt_set(leeway_ms=-1), f"{P}.leeway_ms: must be between 0 and 600000"),
    ("leeway-huge", jwt_set(leeway_ms=600_001), f"{P}.leeway_ms: must be between"),
    ("leeway-string", jwt_set(leeway_ms="30s"), f"{P}.leeway_ms: must be an integer"),
    ("cache-size-negative", jwt_set(cache_size=-1), f"{P}.cache_size: must be between"),
    ("timeout-zero", jwt_set(jwks_timeout_ms=0), f"{P}.jwks_timeout_ms: must be between"),
    ("cache-ms-small", jwt_set(jwks_cache_ms=999), f"{P}.jwks_cache_ms: must be between"),
    ("min-refresh-bool", jwt_set(jwks_min_refresh_ms=True), f"{P}.jwks_min_refresh_ms: must be an integer"),
    ("max-stale-negative", jwt_set(jwks_max_stale_ms=-1), f"{P}.jwks_max_stale_ms: must be between"),
    ("jwt-not-mapping", lambda c: c["identity"].update(jwt="yes"), "identity.jwt: must be a mapping"),
    ("jwt-empty", lambda c: c["identity"].update(jwt={}), f"{P}.issuers: is required"),
    ("mtls-not-mapping", lambda c: c["identity"].update(mtls=True), "identity.mtls: must be a mapping"),
    (
        "mtls-no-ca",
        lambda c: c["identity"].update(mtls={"cert_file": "/c", "key_file": "/k"}),
        "identity.mtls.ca_file: is required",
    ),
    (
        "mtls-no-key",
        lambda c: c["identity"].update(mtls={"ca_file": "/b", "cert_file": "/c"}),
        "identity.mtls.key_file: is required",
    ),
    (
        "mtls-unknown-key",
        lambda c: c["identity"].update(mtls={"ca_file": "/b", "cert_file": "/c", "key_file": "/k", "crl": "/r"}),
        "identity.mtls.crl: unknown key",
    ),
    ("require-identity-string", lambda c: c["routes"][0].update(require_identity="yes"), "routes[0].require_identity"),
    (
        "require-identity-without-jwt",
        lambda c: (c["identity"].pop("jwt"), c["routes"][0].update(require_identity=True)),
        "routes[0].require_identity: needs identity.jwt (where verified tokens come from)",
    ),
    (
        "attribute-named-like-the-unverified-agent",
        lambda c: c["identity"].update(attributes={"unverified_agent": "alice"}),
        "identity.attributes.unverified_agent: is a",
    ),
    (
        "mapped-subject-type-for-callers-with-and-without-a-token",
        lambda c: (c.update(pdp=AUTHZEN), c["routes"][0].update(mapping={"subject": {"type": "agent"}})),
        "routes[0].mapping.subject.type: would give callers with a verified token and callers without one the same",
    ),
]


@pytest.mark.parametrize("setting", ["require-identity", "no-jwt"])
def test_a_mapped_subject_type_where_every_caller_is_of_one_kind(setting: str) -> None:
    """Every caller of a `require_identity` route has a verified token; without identity.jwt none has."""
    data = minimal()
    data["pdp"] = AUTHZEN
    data["routes"][0]["mapping"] = {"subject": {"type": "customer"}}
    if setting == "require-identity":
        data["routes"][0]["require_identity"] = True
    else:
        del data["identity"]["jwt"]
    mapping = parse(data, SRC).routes[0].mapping
    assert mapping is not None
    assert mapping.subject_type == "customer"


@pytest.mark.parametrize(("mutation", "expected"), [pytest.param(m, e, id=i) for i, m, e in ERRORS])
def test_refused_with_the_key_path(mutation: Mutation, expected: str) -> None:
    data = minimal()
    mutation(data)
    found = problems(data)
    assert any(p.startswith(f"{SRC}: {expected}") for p in found), found
    assert all(p.startswith(f"{SRC}: ") and "\n" not in p for p in found)


def test_an_empty_mtls_mapping_is_refused() -> None:
    data = minimal()
    data["identity"]["mtls"] = {}
    found = problems(data)
    assert f"{SRC}: identity.mtls.ca_file: is required" in found


def test_every_identity_problem_at_once() -> None:
    data = minimal(algorithms=["none", "HS256"], header="bad header", jwks_url="http://i.test/jwks")
    data["identity"]["mtls"] = {"ca_file": "/b"}
    found = [p.split(": ")[1] for p in problems(data)]
    assert found.count(f"{P}.algorithms") == 2
    for key in (f"{P}.header", P, "identity.mtls.cert_file", "identity.mtls.key_file"):
        assert key in found


# --- pep check reads the jwks_file ------------------------------------------------------------------------------


def write_config(tmp_path: Path, **jwt: Any) -> Path:
    data = minimal(**jwt)
    data["admin_listen"] = "127.0.0.1:0"
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_accepts_a_usable_jwks_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = write_jwks(tmp_path / "jwks.json", rsa_key(), ec_key())
    assert check(write_config(tmp_path, jwks_file=str(keys)), capsys) == (0, "ok\n", "")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot be read"),
        ("directory", "cannot be read"),
        ("{", "is not JSON"),
        ("[]", 'is not a JWK Set (an object with a "keys" list)'),
        (
            json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "a"}]}),
            "holds no usable public signing key for RS256, ES256, EdDSA",
        ),
    ],
    ids=["missing", "directory", "not-json", "not-a-set", "only-symmetric"],
)
def test_check_refuses_an_unusable_jwks_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, problem: str
) -> None:
    keys = tmp_path / "jwks.json"
    if content == "directory":
        keys.mkdir()
    elif content is not None:
        keys.write_text(content)
    path = write_config(tmp_path, jwks_file=str(keys))
    code, out, err = check(path, capsys)
    assert (code, out) == (EXIT_CONFIG, "")
    assert err.startswith(f"{path}: identity.jwt.jwks_file: {str(keys)!r} {problem}")
    assert len(err.strip().splitlines()) == 1


def test_check_refuses_a_jwks_file_with_private_keys_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "jwks.json"
    keys.write_text(json.dumps({"keys": [rsa_key().private_jwk()]}))
    code, _, err = check(write_config(tmp_path, jwks_file=str(keys)), capsys)
    assert code == EXIT_CONFIG
    assert "identity.jwt.jwks_file: " in err
    assert "holds no usable public signing key" in err


def test_check_accepts_a_jwks_file_with_one_malformed_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "jwks.json"
    bad = {"kty": "RSA", "kid": "bad", "n": "AQAB", "e": "AQAB"}
    keys.write_text(json.dumps(jwks(bad, rsa_key())))
    assert check(write_config(tmp_path, jwks_file=str(keys)), capsys) == (0, "ok\n", "")


def test_check_refuses_a_jwks_ca_file_that_is_no_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    path = write_config(tmp_path, jwks_file=None, jwks_url="https://issuer.test/jwks", jwks_ca_file=str(ca))
    code, _, err = check(path, capsys)
    assert code == EXIT_CONFIG
    assert err.startswith(f"{path}: identity.jwt.jwks_ca_file: ")


def test_check_accepts_a_jwks_url_with_its_ca_without_fetching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    # Nothing listens on port 9: `pep check` reads files, it does not fetch keys.
    path = write_config(tmp_path, jwks_file=None, jwks_url="https://127.0.0.1:9/jwks", jwks_ca_file=str(ca))
    assert check(path, capsys) == (0, "ok\n", "")
