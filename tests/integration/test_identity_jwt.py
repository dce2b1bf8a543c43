"""Verified bearer tokens through the PEP (issue 6): tokens minted here with generated keys, a JWKS file or an
HTTPS JWKS server on loopback, the fault PDP recording what it was asked and the recording upstream proving what
arrived. A refused token is a 401 (identity_missing, identity_invalid) or a 403 (identity_unavailable), and then
the PDP is never asked and the upstream sees nothing."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import aiohttp
import orjson
import pytest
import trustme
from multidict import CIMultiDict, CIMultiDictProxy

from pep.responses import MESSAGES
from tests.conftest import PepStarter, RunningPep
from tests.support.fault_pdp import FaultPdp, Mode
from tests.support.jwt_keys import (
    AUDIENCE,
    ISSUER,
    JwksServer,
    SigningKey,
    claims,
    ec_key,
    ed_key,
    hmac_token,
    rsa_key,
    unsigned_token,
    write_ca,
    write_jwks,
)
from tests.support.observe import metric
from tests.support.upstream import RecordingUpstream

WORKLOAD = "spiffe://test/agent"
CHALLENGE = 'Bearer realm="failclosed-pep"'
ALLOW_LISTED = ["department", "azp", "scope"]
MESSAGES_BY_VALUE = {reason.value: text for reason, text in MESSAGES.items()}


@dataclass(frozen=True)
class Keys:
    rsa: SigningKey
    ec: SigningKey
    ed: SigningKey
    rogue: SigningKey  # another RSA key that claims the kid of `rsa`
    spare: SigningKey  # published only when a test rotates the keys


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(rsa_key("rsa-1"), ec_key("ec-1"), ed_key("ed-1"), rsa_key("rsa-1"), ec_key("spare-1"))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def jwks_path(tmp_path: Path, keys: Keys) -> Path:
    return write_jwks(tmp_path / "jwks.json", keys.rsa, keys.ec, keys.ed)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def jwks_server(ca: trustme.CA, keys: Keys) -> AsyncIterator[JwksServer]:
    server = JwksServer(ca)
    server.publish(keys.rsa, keys.ec, keys.ed)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> str:
    return write_ca(ca, tmp_path / "jwks-ca.pem")


def with_jwt(**jwt: Any) -> Callable[[dict[str, Any]], None]:
    """identity.jwt from `jwt` (over a base with issuer, audience and claim allow-list) and four routes: /tools
    (token optional), /secure (required), /mcp (mcp, required), /v1 (openai, required)."""

    def mutate(raw: dict[str, Any]) -> None:
        raw["identity"]["jwt"] = {"issuers": [ISSUER], "audiences": [AUDIENCE], "claims": ALLOW_LISTED, **jwt}
        up = raw["routes"][0]["upstream"]
        raw["routes"] += [
            {"name": "secure", "match": {"path_prefix": "/secure"}, "upstream": up, "require_identity": True},
            {
                "name": "mcp",
                "match": {"path_prefix": "/mcp"},
                "upstream": up,
                "protocol": "mcp",
                "require_identity": True,
            },
            {
                "name": "ai",
                "match": {"path_prefix": "/v1"},
                "upstream": up,
                "protocol": "openai",
                "require_identity": True,
            },
        ]

    return mutate


def with_url(server: JwksServer, ca_file: str, **jwt: Any) -> Callable[[dict[str, Any]], None]:
    return with_jwt(jwks_url=server.url, jwks_ca_file=ca_file, **jwt)


@pytest.fixture
async def jwt_pep(make_pep: PepStarter, jwks_path: Path) -> RunningPep:
    running: RunningPep = await make_pep(with_jwt(jwks_file=str(jwks_path)))
    return running


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def call(
    client: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str] | CIMultiDict[str] | None = None,
    *,
    method: str = "GET",
    body: Any = None,
) -> Answer:
    data = orjson.dumps(body) if body is not None else None
    sent: CIMultiDict[str] = CIMultiDict(headers or {})
    if data is not None:
        sent["Content-Type"] = "application/json"
    async with client.request(method, url, headers=sent, data=data) as r:
        return Answer(r.status, r.headers, await r.read())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def subjects(pdp: FaultPdp) -> list[dict[str, Any]]:
    return [seen.body["input"]["subject"] for seen in pdp.requests]


def assert_http_denial(answer: Answer, reason: str, request_id: str | None = None) -> None:
    """README "Denials" for an http route: the headers and `{"error": {...}}`."""
    assert answer.headers["x-pep-decision"] == "deny"
    assert answer.headers["x-pep-reason"] == reason
    rid = answer.headers["x-request-id"]
    if request_id is not None:
        assert rid == request_id
    assert answer.json() == {
        "error": {"code": "access_denied", "reason": reason, "message": MESSAGES_BY_VALUE[reason], "request_id": rid}
    }


def assert_challenge(answer: Answer, reason: str, error: str | None, description: str | None) -> None:
    if reason == "identity_unavailable":
        assert answer.status == 403
        assert "WWW-Authenticate" not in answer.headers
        return
    assert answer.status == 401
    assert answer.headers.getall("WWW-Authenticate") == [
        CHALLENGE if error is None else f'{CHALLENGE}, error="{error}", error_description="{description}"'
    ]


def assert_untouched(pdp: FaultPdp, upstream: RecordingUpstream) -> None:
    assert pdp.requests == [], "the PDP must not be asked when the identity is refused"
    assert upstream.seen == [], "nothing may be forwarded when the identity is refused"


async def poll(check: Callable[[], Any], seconds: float = 4.0) -> bool:
    """Whether the async `check()` returns true within `seconds` (asked every 50 ms)."""
    for _ in range(int(seconds / 0.05)):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


def replace_file(path: Path, content: bytes | None) -> None:
    """Rewrite `path` in place (None: delete it)."""
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)


# --- valid tokens -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rsa", "ec", "ed"], ids=["RS256", "ES256", "EdDSA"])
async def test_a_valid_token_is_allowed(
    jwt_pep: RunningPep,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    which: str,
) -> None:
    key: SigningKey = getattr(keys, which)
    token = key.sign(claims(sub=f"user-{which}"))
    answer = await call(client, jwt_pep.url + "/secure/x", bearer(token))
    assert answer.status == 200
    assert len(upstream.seen) == 1
    assert "Authorization" not in upstream.seen[0].headers  # the caller's token is not the upstream's business
    (subject,) = subjects(fault_pdp)
    assert subject["id"] == f"user-{which}"
    assert token not in orjson.dumps(fault_pdp.requests[0].body).decode()


# --- refused tokens ---------------------------------------------------------------------------------------------

Headers = dict[str, str] | CIMultiDict[str]


@dataclass(frozen=True)
class Refused:
    headers: Callable[[Keys], Headers]
    reason: str
    error: str | None = None  # None: identity_missing (no error code) or identity_unavailable (no challenge)
    description: str | None = None


def _now() -> int:
    return int(time.time())


def _tampered(keys: Keys) -> Headers:
    head, _, sig = keys.rsa.sign(claims()).split(".")
    forged = unsigned_token(claims(sub="admin")).split(".")[1]
    return bearer(f"{head}.{forged}.{sig}")


def _raw_claims(more: str) -> bytes:
    """Valid claims as JSON text with `more` written into the object as it is (a repeated name, say)."""
    return (json.dumps(claims())[:-1] + more + "}").encode()


INVALID = "invalid_token"
REFUSED: dict[str, Refused] = {
    "expired": Refused(
        lambda k: bearer(k.rsa.sign(claims(iat=_now() - 7200, exp=_now() - 3600))),
        "identity_invalid",
        INVALID,
        "the token has expired",
    ),
    "not-yet-valid": Refused(
        lambda k: bearer(k.ec.sign(claims(nbf=_now() + 3600, exp=_now() + 7200))),
        "identity_invalid",
        INVALID,
        "the token is not valid yet",
    ),
    "wrong-issuer": Refused(
        lambda k: bearer(k.ed.sign(claims(iss="https://evil.test"))),
        "identity_invalid",
        INVALID,
        "the token is from an untrusted issuer",
    ),
    "wrong-audience": Refused(
        lambda k: bearer(k.rsa.sign(claims(aud="some-other-service"))),
        "identity_invalid",
        INVALID,
        "the token is not for this audience",
    ),
    "alg-none": Refused(
        lambda k: bearer(unsigned_token(claims(), kid="rsa-1")),
        "identity_invalid",
        INVALID,
        "the token algorithm (none) is not accepted",
    ),
    "alg-None-mixed-case": Refused(
        lambda k: bearer(unsigned_token(claims(), alg="nOnE", kid="rsa-1")),
        "identity_invalid",
        INVALID,
        "the token algorithm (nOnE) is not accepted",
    ),
    "hs256-keyed-with-the-rsa-public-key": Refused(
        lambda k: bearer(hmac_token(claims(), k.rsa.public_pem(), kid="rsa-1")),
        "identity_invalid",
        INVALID,
        "the token algorithm (other) is not accepted",
    ),
    "unknown-key-with-a-known-kid": Refused(
        lambda k: bearer(k.rogue.sign(claims())),
        "identity_invalid",
        INVALID,
        "the token signature does not verify",
    ),
    "tampered-payload": Refused(_tampered, "identity_invalid", INVALID, "the token signature does not verify"),
    "unknown-kid": Refused(
        lambda k: bearer(k.spare.sign(claims())),
        "identity_invalid",
        INVALID,
        "no signing key fits the token (unknown kid)",
    ),
    "kid-of-a-key-of-another-type": Refused(
        lambda k: bearer(k.ec.sign(claims(), kid="rsa-1")),
        "identity_invalid",
        INVALID,
        "no signing key fits the token (unknown kid)",
    ),
    "no-exp": Refused(
        lambda k: bearer(k.rsa.sign(claims(exp=None))), "identity_invalid", INVALID, "the token has no exp claim"
    ),
    "no-sub": Refused(
        lambda k: bearer(k.rsa.sign(claims(sub=None))), "identity_invalid", INVALID, "the token has no sub claim"
    ),
    "critical-header": Refused(
        lambda k: bearer(unsigned_token(claims(), alg="RS256", kid="rsa-1", crit=["b64"], b64=True) + "c2ln"),
        "identity_invalid",
        INVALID,
        "the token has critical header parameters",
    ),
    "unknown-critical-extension": Refused(
        lambda k: bearer(k.rsa.sign(claims(), crit=["exp"])), "identity_invalid", INVALID, "the token is malformed"
    ),
    "kid-not-a-string": Refused(
        lambda k: bearer(unsigned_token(claims(), alg="RS256", kid=1) + "c2ln"),
        "identity_invalid",
        INVALID,
        "the token is malformed",
    ),
    "a-claim-named-twice": Refused(
        lambda k: bearer(k.rsa.sign_raw(b'{"alg":"RS256","kid":"rsa-1"}', _raw_claims(', "sub": "admin"'))),
        "identity_invalid",
        INVALID,
        "the token is malformed",
    ),
    "an-exp-beyond-a-float": Refused(
        lambda k: bearer(k.rsa.sign_raw(b'{"alg":"RS256","kid":"rsa-1"}', _raw_claims(', "exp": 1' + "0" * 400))),
        "identity_invalid",
        INVALID,
        "the token is malformed",
    ),
    "a-lone-surrogate-in-a-claim": Refused(
        lambda k: bearer(k.rsa.sign_raw(b'{"alg":"RS256","kid":"rsa-1"}', _raw_claims(', "department": "\\udc00"'))),
        "identity_invalid",
        INVALID,
        "the token is malformed",
    ),
    "a-logout-token": Refused(
        lambda k: bearer(
            k.rsa.sign(claims(events={"http://schemas.openid.net/event/backchannel-logout": {}}), typ="logout+jwt")
        ),
        "identity_invalid",
        INVALID,
        "the token type (typ) is not an access token",
    ),
    "garbage": Refused(lambda k: bearer("not-a-token"), "identity_invalid", INVALID, "the token is malformed"),
    "garbage-with-dots": Refused(
        lambda k: bearer("abc.def.ghi"), "identity_invalid", INVALID, "the token is malformed"
    ),
    "empty-bearer": Refused(
        lambda k: {"Authorization": "Bearer"}, "identity_invalid", "invalid_request", "the token is empty"
    ),
    "two-authorization-headers": Refused(
        lambda k: CIMultiDict(
            [("Authorization", f"Bearer {k.rsa.sign(claims())}"), ("Authorization", f"Bearer {k.ec.sign(claims())}")]
        ),
        "identity_invalid",
        "invalid_request",
        "more than one token was presented",
    ),
    "no-token": Refused(lambda k: {}, "identity_missing"),
    "token-in-the-wrong-header": Refused(lambda k: {"x-token": k.rsa.sign(claims())}, "identity_missing"),
    "not-a-bearer-scheme": Refused(lambda k: {"Authorization": "Basic dXNlcjpwYXNz"}, "identity_missing"),
    "token-without-a-scheme": Refused(lambda k: {"Authorization": k.rsa.sign(claims())}, "identity_missing"),
}


@pytest.mark.parametrize("case", list(REFUSED.values()), ids=list(REFUSED))
async def test_a_refused_token_is_denied_and_nothing_is_forwarded(
    jwt_pep: RunningPep,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    case: Refused,
) -> None:
    presented = CIMultiDict(case.headers(keys))
    sent = CIMultiDict(presented)
    sent["X-Request-ID"] = "req-identity-1"
    answer = await call(client, jwt_pep.url + "/secure/x", sent)
    assert_challenge(answer, case.reason, case.error, case.description)
    assert_http_denial(answer, case.reason, "req-identity-1")
    assert_untouched(fault_pdp, upstream)
    (entry,) = await jwt_pep.log_entries()
    assert (entry["decision"], entry["reason"], entry["route"]) == ("deny", case.reason, "secure")
    assert entry["subject"] == {
        "workload": WORKLOAD,
        "agent": None,
        "id": None,
        "claims": None,
        "unverified_agent": None,
    }
    # The token, or any part of it, is in no answer and no log line.
    log_text = jwt_pep.log_path.read_text()
    answer_text = answer.body.decode() + " ".join(f"{k}: {v}" for k, v in answer.headers.items())
    for value in presented.values():
        for part in value.removeprefix("Bearer ").split("."):
            if len(part) >= 8:
                assert part not in log_text
                assert part not in answer_text


async def test_the_refusal_is_counted_by_reason(
    jwt_pep: RunningPep, keys: Keys, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    await call(client, jwt_pep.url + "/secure/x")
    token = keys.rsa.sign(claims(aud="elsewhere"))
    await call(client, jwt_pep.url + "/secure/x", bearer(token))
    async with client.get(jwt_pep.admin_url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "pep_decisions_total", route="secure", reason="identity_missing") == 1
    assert metric(text, "pep_decisions_total", route="secure", reason="identity_invalid") == 1
    assert token.split(".")[1] not in text
    assert upstream.seen == []


# --- the policy input -------------------------------------------------------------------------------------------


async def test_the_pdp_gets_the_verified_subject_and_never_the_token(
    jwt_pep: RunningPep, keys: Keys, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    extra: dict[str, Any] = {"department": "sales", "secret_claim": "do-not-copy", "client_id": "cid-1"}
    tokens = [
        keys.rsa.sign(claims(sub="u-act", act={"sub": "agent-act"}, azp="agent-azp", **extra)),
        keys.ec.sign(claims(sub="u-azp", azp="agent-azp", **extra)),
        keys.ed.sign(claims(sub="u-cid", client_id="cid-only")),
        keys.rsa.sign(claims(sub="u-none")),
    ]
    for token in tokens:
        # A verified token's agent replaces the unverified agent header, also when the token names none.
        answer = await call(client, jwt_pep.url + "/secure/x", {**bearer(token), "x-agent-id": "spoofed"})
        assert answer.status == 200
    assert subjects(fault_pdp) == [
        {
            "workload": WORKLOAD,
            "agent": "agent-act",
            "id": "u-act",
            "claims": {"department": "sales", "azp": "agent-azp"},
            "unverified_agent": None,
        },
        {
            "workload": WORKLOAD,
            "agent": "agent-azp",
            "id": "u-azp",
            "claims": {"department": "sales", "azp": "agent-azp"},
            "unverified_agent": None,
        },
        {"workload": WORKLOAD, "agent": "cid-only", "id": "u-cid", "claims": {}, "unverified_agent": None},
        {"workload": WORKLOAD, "agent": None, "id": "u-none", "claims": {}, "unverified_agent": None},
    ]
    assert len(upstream.seen) == 4
    # The raw token: in no PDP request (body or headers), no log line, no metric, and not upstream.
    entries = await jwt_pep.log_entries()
    assert [e["subject"]["id"] for e in entries] == ["u-act", "u-azp", "u-cid", "u-none"]
    async with client.get(jwt_pep.admin_url + "/metrics") as r:
        metrics_text = await r.text()
    places = {
        "pdp": b"".join(orjson.dumps(s.body) + orjson.dumps(s.headers) for s in fault_pdp.requests).decode(),
        "log": jwt_pep.log_path.read_text(),
        "metrics": metrics_text,
        "upstream": "".join(f"{k}: {v}\n" for x in upstream.seen for k, v in x.headers.items()),
    }
    for token in tokens:
        signature = token.rsplit(".", 1)[1]
        for where, text in places.items():
            assert token not in text, where
            assert signature not in text, where
    assert all("authorization" not in x.headers for x in upstream.seen)
    assert all("authorization" not in s.body["input"]["request"]["headers"] for s in fault_pdp.requests)
    assert "do-not-copy" not in places["pdp"]


@pytest.mark.parametrize("spelling", ["X_User", "x_user", "X-User_Id"])
async def test_a_caller_cannot_respell_the_identity_header_the_pdp_sets(
    jwt_pep: RunningPep,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    spelling: str,
) -> None:
    """The PDP passes the verified user on as an obligation header (`x-user` / `x-user-id`). A CGI-style upstream
    (Rack, WSGI, PHP) reads `X_User` and `X-User` as one variable, so a caller's respelling would join or override
    the PDP's value there: the request is refused instead, and nothing is forwarded."""
    fault_pdp.set(
        Mode(body=orjson.dumps({"result": {"allow": True, "headers": {"x-user": "u-1", "x-user-id": "u-1"}}}))
    )
    token = keys.rsa.sign(claims(sub="u-1"))
    answer = await call(client, jwt_pep.url + "/secure/x", {**bearer(token), spelling: "admin"})
    assert answer.status == 403
    assert_http_denial(answer, "request_ambiguous")
    assert upstream.seen == []
    (entry,) = await jwt_pep.log_entries()
    assert (entry["decision"], entry["reason"]) == ("deny", "request_ambiguous")
    # Another name with `_` is not a spelling of an obligation's: forwarded as sent, next to the PDP's value.
    answer = await call(client, jwt_pep.url + "/secure/x", {**bearer(token), "x_other": "1"})
    assert answer.status == 200
    [seen] = upstream.seen
    assert seen.headers.getall("x-user") == ["u-1"]
    assert seen.headers["x_other"] == "1"


@pytest.fixture
def wsgi_upstream() -> Iterator[str]:
    """A real CGI-style reader: the standard library's WSGI server, answering with the `HTTP_X_USER` it built
    (wsgiref joins the fields that map to one variable with `,`, as CGI gateways do)."""

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        start("200 OK", [("Content-Type", "text/plain")])
        return [environ.get("HTTP_X_USER", "").encode()]

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


async def test_a_wsgi_upstream_reads_the_user_the_pdp_set(
    make_pep: PepStarter,
    jwks_path: Path,
    keys: Keys,
    fault_pdp: FaultPdp,
    client: aiohttp.ClientSession,
    wsgi_upstream: str,
) -> None:
    """What the respelling would do behind the PEP: the WSGI server reads `X_User` and `x-user` as one variable."""

    def mutate(raw: dict[str, Any]) -> None:
        with_jwt(jwks_file=str(jwks_path))(raw)
        raw["routes"][0]["upstream"] = wsgi_upstream

    pep = await make_pep(mutate)
    fault_pdp.set(Mode(body=orjson.dumps({"result": {"allow": True, "headers": {"x-user": "u-1"}}})))
    token = keys.rsa.sign(claims(sub="u-1"))
    answer = await call(client, pep.url + "/tools/x", bearer(token))
    assert (answer.status, answer.body) == (200, b"u-1")
    answer = await call(client, pep.url + "/tools/x", {**bearer(token), "X_User": "admin"})
    assert answer.status == 403, answer.body  # not b"admin,u-1"
    assert answer.headers["x-pep-reason"] == "request_ambiguous"


async def test_on_a_route_that_does_not_require_a_token(
    jwt_pep: RunningPep, keys: Keys, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    answer = await call(client, jwt_pep.url + "/tools/x", {"x-agent-id": "from-header"})
    assert answer.status == 200
    # Next to verified names, the agent header (nobody verified it) is only ever `unverified_agent`.
    assert subjects(fault_pdp) == [
        {"workload": WORKLOAD, "agent": None, "id": None, "claims": None, "unverified_agent": "from-header"}
    ]
    assert len(upstream.seen) == 1
    # A token that is presented is verified all the same: an invalid one is refused, not ignored.
    expired = keys.rsa.sign(claims(iat=_now() - 7200, exp=_now() - 3600))
    answer = await call(client, jwt_pep.url + "/tools/x", bearer(expired))
    assert_challenge(answer, "identity_invalid", INVALID, "the token has expired")
    assert_http_denial(answer, "identity_invalid")
    answer = await call(client, jwt_pep.url + "/tools/x", {"x-token": "whatever"})  # not the token header
    assert answer.status == 200
    good = keys.ec.sign(claims(sub="u-7", department="ops"))
    answer = await call(client, jwt_pep.url + "/tools/x", bearer(good))
    assert answer.status == 200
    assert subjects(fault_pdp)[-1] == {
        "workload": WORKLOAD,
        "agent": None,
        "id": "u-7",
        "claims": {"department": "ops"},
        "unverified_agent": None,
    }
    assert len(fault_pdp.requests) == 3
    assert len(upstream.seen) == 3


@pytest.mark.parametrize(
    "target",
    [
        "/tools/x?access_token=other",
        "/tools/x?q=1&access_token=other",
        "/tools/x?q=1;access_token=other",
        "/tools/x?%61ccess_token=other",
        "/tools/x?Access_Token=other",
        "/tools/x?access.token=other",
        "/tools/x?access_token[]=other",
    ],
)
@pytest.mark.parametrize("with_token", [False, True], ids=["anonymous", "verified"])
async def test_a_second_bearer_token_in_the_query_is_refused(
    jwt_pep: RunningPep,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    target: str,
    with_token: bool,
) -> None:
    """RFC 6750 2.3: an upstream that also takes `access_token` from the query (Rails' Doorkeeper does by default)
    would act as that token's holder, not as the subject the PDP decided on (the verified token is removed, or
    there was none)."""
    headers = bearer(keys.rsa.sign(claims(sub="u-1"))) if with_token else {}
    answer = await call(client, jwt_pep.url + target, headers)
    assert answer.status == 403, answer.body
    assert_http_denial(answer, "request_ambiguous")
    assert_untouched(fault_pdp, upstream)


async def test_a_bearer_token_field_in_a_form_body_is_refused(
    jwt_pep: RunningPep, keys: Keys, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """RFC 6750 2.2: the same token as a field of an urlencoded POST body the PEP reads."""
    form = {**bearer(keys.rsa.sign(claims(sub="u-1"))), "Content-Type": "application/x-www-form-urlencoded"}
    async with client.post(jwt_pep.url + "/tools/x", headers=form, data=b"a=1&access_token=other") as r:
        assert r.status == 403
        assert r.headers["x-pep-reason"] == "request_ambiguous"
    assert_untouched(fault_pdp, upstream)
    async with client.post(jwt_pep.url + "/tools/x", headers=form, data=b"a=1&token_kind=access") as r:
        assert r.status == 200  # a field that is not one
    assert len(upstream.seen) == 1


async def test_an_access_token_query_passes_without_identity_jwt(
    make_pep: PepStarter, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """Without `identity.jwt` the PEP verifies no token: a query token is the upstream's own business."""
    pep = await make_pep(lambda raw: None)
    answer = await call(client, pep.url + "/tools/x?access_token=upstream-key", {})
    assert answer.status == 200
    assert len(upstream.seen) == 1


@pytest.mark.parametrize("keep", [False, True], ids=["stripped", "keep_caller_credentials"])
async def test_a_custom_token_header(
    make_pep: PepStarter,
    jwks_path: Path,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    keep: bool,
) -> None:
    mutate = with_jwt(jwks_file=str(jwks_path), header="X-Agent-Token")

    def config(raw: dict[str, Any]) -> None:
        mutate(raw)
        raw["routes"][1]["keep_caller_credentials"] = keep

    pep: RunningPep = await make_pep(config)
    token = keys.rsa.sign(claims(sub="u-custom"))
    # In Authorization it is not where the config says: no token at all.
    answer = await call(client, pep.url + "/secure/x", bearer(token))
    assert_challenge(answer, "identity_missing", None, None)
    assert_untouched(fault_pdp, upstream)
    # The token alone, without a scheme.
    answer = await call(client, pep.url + "/secure/x", {"x-agent-token": token})
    assert answer.status == 200
    assert subjects(fault_pdp)[0]["id"] == "u-custom"
    assert "x-agent-token" not in fault_pdp.requests[0].body["input"]["request"]["headers"]
    assert token not in orjson.dumps(fault_pdp.requests[0].body).decode()
    (seen,) = upstream.seen
    assert seen.headers.getall("x-agent-token", []) == ([token] if keep else [])
    answer = await call(client, pep.url + "/secure/x", {"x-agent-token": f"Bearer {token}"})
    assert_challenge(answer, "identity_invalid", INVALID, "the token is malformed")
    assert len(upstream.seen) == 1


# --- deny shapes by protocol ------------------------------------------------------------------------------------


async def test_mcp_and_openai_routes_answer_401_with_the_challenge(
    jwt_pep: RunningPep, keys: Keys, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    rpc = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "send_email", "arguments": {}}}
    mcp_headers = {"Accept": "application/json, text/event-stream"}
    answer = await call(client, jwt_pep.url + "/mcp", mcp_headers, method="POST", body=rpc)
    assert_challenge(answer, "identity_missing", None, None)
    # The identity is checked before the body is read, so there is no JSON-RPC id to answer: the http shape.
    assert_http_denial(answer, "identity_missing")
    expired = keys.rsa.sign(claims(iat=_now() - 7200, exp=_now() - 3600))
    answer = await call(client, jwt_pep.url + "/mcp", {**mcp_headers, **bearer(expired)}, method="POST", body=rpc)
    assert_challenge(answer, "identity_invalid", INVALID, "the token has expired")
    assert_http_denial(answer, "identity_invalid")

    chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    for headers, reason, error, description in [
        ({}, "identity_missing", None, None),
        (bearer(expired), "identity_invalid", INVALID, "the token has expired"),
    ]:
        answer = await call(client, jwt_pep.url + "/v1/chat/completions", headers, method="POST", body=chat)
        assert_challenge(answer, reason, error, description)
        assert answer.headers["x-pep-reason"] == reason
        assert answer.headers["x-should-retry"] == "false"
        assert answer.json() == {
            "error": {"message": MESSAGES_BY_VALUE[reason], "type": "permission_denied", "code": reason, "param": None}
        }
    assert_untouched(fault_pdp, upstream)


async def test_identity_is_checked_after_the_size_and_before_the_credential(
    make_pep: PepStarter,
    jwks_path: Path,
    tmp_path: Path,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    mutate = with_jwt(jwks_file=str(jwks_path))

    def config(raw: dict[str, Any]) -> None:
        mutate(raw)
        secure = raw["routes"][1]
        secure["max_body_bytes"] = 10
        secure["credential"] = {"header": "x-api-key", "format": "{}", "value_file": str(tmp_path / "missing")}

    pep: RunningPep = await make_pep(config)
    answer = await call(client, pep.url + "/secure/x", method="POST", body={"pad": "x" * 100})
    assert (answer.status, answer.headers["x-pep-reason"]) == (403, "body_too_large")
    answer = await call(client, pep.url + "/secure/x")
    assert (answer.status, answer.headers["x-pep-reason"]) == (401, "identity_missing")
    answer = await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims())))
    assert (answer.status, answer.headers["x-pep-reason"]) == (403, "credential_unavailable")
    assert_untouched(fault_pdp, upstream)


# --- the claims cache -------------------------------------------------------------------------------------------


async def test_a_remembered_token_is_identity_not_a_decision(
    jwt_pep: RunningPep,
    jwks_path: Path,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    token = keys.rsa.sign(claims(sub="cached"))
    for _ in range(2):
        assert (await call(client, jwt_pep.url + "/secure/x", bearer(token))).status == 200
    assert len(fault_pdp.requests) == 2  # the cache holds identity: every request still went to the PDP
    fault_pdp.set("deny")
    answer = await call(client, jwt_pep.url + "/secure/x", bearer(token))
    assert_http_denial(answer, "policy_denied")
    assert len(upstream.seen) == 2
    replace_file(jwks_path, None)
    jwt_pep.server.reload()  # SIGHUP: the file is looked at now, and it is gone
    # Keys that cannot be had refuse every token, a remembered one too.
    answer = await call(client, jwt_pep.url + "/secure/x", bearer(token))
    assert_challenge(answer, "identity_unavailable", None, None)
    assert_http_denial(answer, "identity_unavailable")
    assert len(fault_pdp.requests) == 3
    assert len(upstream.seen) == 2


async def test_a_key_removed_from_the_set_stops_its_cached_tokens(
    jwt_pep: RunningPep, jwks_path: Path, keys: Keys, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    token = keys.rsa.sign(claims(sub="revoked-key"))
    assert (await call(client, jwt_pep.url + "/secure/x", bearer(token))).status == 200
    write_jwks(jwks_path, keys.ec, keys.ed)  # the RSA key is withdrawn: a new key set, not an unusable file
    jwt_pep.server.reload()
    answer = await call(client, jwt_pep.url + "/secure/x", bearer(token))
    assert_http_denial(answer, "identity_invalid")  # re-verified against the new set: no key for it
    assert len(upstream.seen) == 1


async def test_a_refused_token_is_not_remembered(
    jwt_pep: RunningPep,
    jwks_path: Path,
    keys: Keys,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    token = keys.spare.sign(claims(sub="later"))
    answer = await call(client, jwt_pep.url + "/secure/x", bearer(token))
    assert answer.headers["x-pep-reason"] == "identity_invalid"
    write_jwks(jwks_path, keys.rsa, keys.spare)
    jwt_pep.server.reload()
    assert (await call(client, jwt_pep.url + "/secure/x", bearer(token))).status == 200
    assert len(upstream.seen) == 1


# --- a JWKS file ------------------------------------------------------------------------------------------------


def swap_symlink(link: Path, target: Path) -> None:
    """Atomically point `link` at `target`, as Kubernetes does when it updates a mounted ConfigMap."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.symlink_to(target)
    os.replace(tmp, link)


async def test_a_rotated_jwks_file_takes_effect_without_a_signal(
    make_pep: PepStarter, tmp_path: Path, keys: Keys, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    old = write_jwks(tmp_path / "v1.json", keys.rsa)
    new = write_jwks(tmp_path / "v2.json", keys.spare)
    link = tmp_path / "jwks.json"
    link.symlink_to(old)
    pep: RunningPep = await make_pep(with_jwt(jwks_file=str(link)))
    rotated = keys.spare.sign(claims(sub="new-key"))
    assert (await call(client, pep.url + "/secure/x", bearer(rotated))).headers["x-pep-reason"] == "identity_invalid"
    swap_symlink(link, new)
    statuses: list[int] = []

    async def allowed() -> bool:
        answer = await call(client, pep.url + "/secure/x", bearer(rotated))
        statuses.append(answer.status)
        return answer.status == 200

    assert await poll(allowed)  # the file is looked at about once a second
    assert set(statuses[:-1]) <= {401}
    assert len(upstream.seen) == 1
    # The old key is gone with the old file: a token it signs (never seen before, so not remembered) is refused.
    answer = await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims(sub="old-key"))))
    assert answer.headers["x-pep-reason"] == "identity_invalid"
    assert len(upstream.seen) == 1


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"keys": []}', b"[]", b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "rsa-1"}]}'],
    ids=["not-json", "empty-set", "not-a-set", "only-a-symmetric-key"],
)
async def test_an_unusable_jwks_file_makes_tokens_unavailable(
    jwt_pep: RunningPep,
    jwks_path: Path,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    content: bytes,
) -> None:
    replace_file(jwks_path, content)
    jwt_pep.server.reload()
    answer = await call(client, jwt_pep.url + "/secure/x", bearer(keys.rsa.sign(claims())))
    assert_challenge(answer, "identity_unavailable", None, None)
    assert_http_denial(answer, "identity_unavailable")
    assert_untouched(fault_pdp, upstream)
    (entry,) = await jwt_pep.log_entries()
    assert entry["detail"].startswith("signing keys are unavailable: jwks_file ")
    write_jwks(jwks_path, keys.rsa)  # repaired: in use again
    jwt_pep.server.reload()
    assert (await call(client, jwt_pep.url + "/secure/x", bearer(keys.rsa.sign(claims())))).status == 200


async def test_a_jwks_file_that_turns_invalid_is_noticed_without_a_signal(
    jwt_pep: RunningPep, jwks_path: Path, keys: Keys, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    replace_file(jwks_path, b"garbage")
    n = 0

    async def unavailable() -> bool:
        nonlocal n
        n += 1  # a new token each time, each verified in full
        answer = await call(client, jwt_pep.url + "/secure/x", bearer(keys.ec.sign(claims(sub=f"u{n}"))))
        return answer.headers.get("x-pep-reason") == "identity_unavailable"

    assert await poll(unavailable)
    assert len(upstream.seen) == n - 1  # allowed with the last good keys until the file was looked at again


# --- a JWKS URL -------------------------------------------------------------------------------------------------


async def fetches(client: aiohttp.ClientSession, pep: RunningPep) -> tuple[float, float]:
    async with client.get(pep.admin_url + "/metrics") as r:
        text = await r.text()
    return (
        metric(text, "pep_jwks_fetches_total", result="success"),
        metric(text, "pep_jwks_fetches_total", result="error"),
    )


async def test_keys_from_a_url_are_fetched_once_while_fresh(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    jwks_server.cache_control = "public, max-age=3600"
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file, jwks_min_refresh_ms=0))
    assert jwks_server.requests == 1  # fetched at start
    for i, key in enumerate([keys.rsa, keys.ec, keys.ed, keys.rsa, keys.ec, keys.ed]):
        answer = await call(client, pep.url + "/secure/x", bearer(key.sign(claims(sub=f"u{i}"))))
        assert answer.status == 200
    assert jwks_server.requests == 1  # max-age=3600: not fetched again
    assert len(upstream.seen) == 6
    assert await fetches(client, pep) == (1, 0)


async def test_an_unknown_kid_refetches_and_a_rotated_key_is_accepted(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file, jwks_min_refresh_ms=0))
    token = keys.spare.sign(claims(sub="rotated"))
    answer = await call(client, pep.url + "/secure/x", bearer(token))
    assert_challenge(answer, "identity_invalid", INVALID, "no signing key fits the token (unknown kid)")
    assert jwks_server.requests == 2  # the unknown kid made it look again
    assert_untouched(fault_pdp, upstream)
    jwks_server.publish(keys.rsa, keys.spare)  # the issuer publishes its new key
    answer = await call(client, pep.url + "/secure/x", bearer(token))
    assert answer.status == 200
    assert jwks_server.requests == 3
    assert len(upstream.seen) == 1
    assert subjects(fault_pdp) == [
        {"workload": WORKLOAD, "agent": None, "id": "rotated", "claims": {}, "unverified_agent": None}
    ]


async def test_a_flood_of_unknown_kids_is_rate_limited(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file, jwks_min_refresh_ms=60000))
    started = jwks_server.requests
    tokens = [keys.rsa.sign(claims(), kid=f"made-up-{i}") for i in range(30)]
    answers = await asyncio.gather(*(call(client, pep.url + "/secure/x", bearer(t)) for t in tokens))
    assert {a.headers["x-pep-reason"] for a in answers} == {"identity_invalid"}
    assert jwks_server.requests <= started + 1  # at most one refetch per jwks_min_refresh_ms
    # Even a key that is really new waits for the interval: a flood cannot buy fetches.
    jwks_server.publish(keys.rsa, keys.spare)
    answer = await call(client, pep.url + "/secure/x", bearer(keys.spare.sign(claims())))
    assert answer.headers["x-pep-reason"] == "identity_invalid"
    assert jwks_server.requests <= started + 1
    assert_untouched(fault_pdp, upstream)


async def test_a_jwks_server_down_from_the_start(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    await jwks_server.stop()  # its port is known, and nothing listens on it
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file, jwks_min_refresh_ms=0))
    answer = await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims())))
    assert_challenge(answer, "identity_unavailable", None, None)
    assert_http_denial(answer, "identity_unavailable")
    assert_untouched(fault_pdp, upstream)
    success, error = await fetches(client, pep)
    assert (success, error >= 2) == (0, True)  # at start, and again for the request
    (entry,) = await pep.log_entries()
    assert entry["detail"].startswith("signing keys are unavailable: jwks_url could not be fetched")
    # The route that does not require a token still works without one.
    assert (await call(client, pep.url + "/tools/x")).status == 200
    await jwks_server.start()  # back: the next token is verified
    assert (await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims())))).status == 200
    assert len(upstream.seen) == 2


BAD_ANSWERS: dict[str, dict[str, Any]] = {
    "status-500": {"status": 500},
    "status-404": {"status": 404},
    "redirect": {"status": 302},
    "garbage": {"body": b"<html>keys</html>"},
    "not-a-set": {"body": b'{"keys": "none"}'},
    "only-a-symmetric-key": {"body": b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "rsa-1"}]}'},
    "only-encryption-keys": {"use": "enc"},
    "hang": {"hang": True},
}


@pytest.mark.parametrize("answer", list(BAD_ANSWERS.values()), ids=list(BAD_ANSWERS))
async def test_a_jwks_url_that_gives_no_usable_keys(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    answer: dict[str, Any],
) -> None:
    settings = dict(answer)
    if settings.pop("use", None) == "enc":
        jwks_server.keys = [k.public_jwk(use="enc") for k in (keys.rsa, keys.ec, keys.ed)]
    for name, value in settings.items():
        setattr(jwks_server, name, value)
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file, jwks_min_refresh_ms=0, jwks_timeout_ms=300))
    denied = await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims())))
    assert_challenge(denied, "identity_unavailable", None, None)
    assert_http_denial(denied, "identity_unavailable")
    assert_untouched(fault_pdp, upstream)
    success, error = await fetches(client, pep)
    assert (success, error >= 1) == (0, True)


async def test_a_jwks_url_of_another_ca_is_not_trusted(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    tmp_path: Path,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    other_ca = write_ca(trustme.CA(), tmp_path / "other-ca.pem")
    pep: RunningPep = await make_pep(with_url(jwks_server, other_ca))
    answer = await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims())))
    assert_challenge(answer, "identity_unavailable", None, None)
    assert_untouched(fault_pdp, upstream)


async def test_stale_keys_are_used_while_the_refetch_fails(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    jwks_server.cache_control = "max-age=0"  # stale at once: every lookup refetches (jwks_min_refresh_ms 0)
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file, jwks_min_refresh_ms=0))
    jwks_server.status = 500
    answer = await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims(sub="stale-ok"))))
    assert answer.status == 200  # within jwks_max_stale_ms (an hour by default) the last good keys serve
    assert jwks_server.requests == 2
    assert await fetches(client, pep) == (1, 1)
    assert len(upstream.seen) == 1


async def test_stale_keys_are_dropped_after_max_stale(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    jwks_server.cache_control = "max-age=1"
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file, jwks_min_refresh_ms=0, jwks_max_stale_ms=0))
    assert (await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims(sub="a"))))).status == 200
    jwks_server.status = 500
    n = 0
    last: list[Answer] = []

    async def refused() -> bool:
        nonlocal n
        n += 1  # a new token each time, each verified in full
        last[:] = [await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims(sub=f"b{n}"))))]
        return last[0].status != 200

    assert await poll(refused)  # fresh for a second, then the failed refetch drops them (jwks_max_stale_ms 0)
    assert_challenge(last[0], "identity_unavailable", None, None)
    entries = await pep.log_entries()
    assert "keys expired and could not be refreshed" in entries[-1]["detail"]
    assert "HTTP 500" in entries[-1]["detail"]
    assert len(upstream.seen) == n  # "a" and every "b" but the refused one
    jwks_server.status = 200
    assert (await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims(sub="c"))))).status == 200
    assert [s["id"] for s in subjects(fault_pdp)] == ["a", *[f"b{i}" for i in range(1, n)], "c"]


async def remembered_until(
    client: aiohttp.ClientSession, pep: RunningPep, token: str, reason: str
) -> tuple[bool, list[Answer]]:
    """Sends the same (remembered) token until it is refused for `reason`: whether it was, and every answer."""
    answers: list[Answer] = []

    async def refused() -> bool:
        answers.append(await call(client, pep.url + "/secure/x", bearer(token)))
        return answers[-1].headers.get("x-pep-reason") == reason

    return await poll(refused), answers


@pytest.mark.parametrize("change", ["withdrawn", "replaced-under-its-kid"])
async def test_a_key_gone_from_the_url_stops_its_remembered_tokens(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    change: str,
) -> None:
    """Once the keys are stale (max-age=1), the next use of a remembered token refetches them, and the token
    passes only while the key that verified it is still published, the same key under the same kid."""
    jwks_server.cache_control = "max-age=1"
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file, jwks_min_refresh_ms=0))
    token = keys.rsa.sign(claims(sub="remembered"))
    assert (await call(client, pep.url + "/secure/x", bearer(token))).status == 200
    if change == "withdrawn":
        jwks_server.publish(keys.ec, keys.ed)
    else:
        jwks_server.publish(keys.rogue, keys.ec, keys.ed)  # `rogue` claims the kid of `rsa`
    done, answers = await remembered_until(client, pep, token, "identity_invalid")
    assert done, [a.status for a in answers]
    assert {a.status for a in answers[:-1]} <= {200}  # allowed only while the old keys were fresh
    assert len(upstream.seen) == len(answers)  # the first call and every allowed one; never the refused one
    detail = (
        "no signing key fits the token (unknown kid)"
        if change == "withdrawn"
        else "the token signature does not verify"
    )
    assert_challenge(answers[-1], "identity_invalid", INVALID, detail)


async def test_remembered_tokens_are_refused_once_the_url_keys_are_stale_past_max_stale(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    jwks_server.cache_control = "max-age=1"
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file, jwks_min_refresh_ms=0, jwks_max_stale_ms=0))
    token = keys.rsa.sign(claims(sub="remembered"))
    assert (await call(client, pep.url + "/secure/x", bearer(token))).status == 200
    jwks_server.status = 500
    done, answers = await remembered_until(client, pep, token, "identity_unavailable")
    assert done, [a.status for a in answers]
    assert_challenge(answers[-1], "identity_unavailable", None, None)
    assert_http_denial(answers[-1], "identity_unavailable")
    assert len(upstream.seen) == len(answers)
    entries = await pep.log_entries()
    assert entries[-1]["detail"].startswith("signing keys are unavailable: jwks_url keys expired")
    jwks_server.status = 200  # back: the same token is verified again, and passes
    assert (await call(client, pep.url + "/secure/x", bearer(token))).status == 200


async def test_one_malformed_key_in_the_set_does_not_spoil_the_others(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    jwks_server.keys = [{"kty": "RSA", "kid": "broken", "n": "AQAB", "e": "AQAB"}, *jwks_server.keys]
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file))
    assert (await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims())))).status == 200
    answer = await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims(), kid="broken")))
    assert answer.headers["x-pep-reason"] == "identity_invalid"
    assert len(upstream.seen) == 1


async def test_a_jwks_answer_that_arrives_in_two_pieces(
    make_pep: PepStarter,
    jwks_server: JwksServer,
    ca_file: str,
    keys: Keys,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    jwks_server.split = True  # as any answer larger than a TCP segment or a TLS record may arrive
    pep: RunningPep = await make_pep(with_url(jwks_server, ca_file))
    assert (await call(client, pep.url + "/secure/x", bearer(keys.rsa.sign(claims())))).status == 200
    assert len(upstream.seen) == 1


async def test_a_valid_token_on_an_mcp_route(
    jwt_pep: RunningPep, keys: Keys, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search", "arguments": {"q": "x"}}}
    token = keys.ed.sign(claims(sub="mcp-user", azp="mcp-agent", department="support"))
    headers = {"Accept": "application/json, text/event-stream", **bearer(token)}
    answer = await call(client, jwt_pep.url + "/mcp", headers, method="POST", body=rpc)
    assert answer.status == 200
    (seen,) = fault_pdp.requests
    assert seen.body["input"]["subject"] == {
        "workload": WORKLOAD,
        "agent": "mcp-agent",
        "id": "mcp-user",
        "claims": {"department": "support", "azp": "mcp-agent"},
        "unverified_agent": None,
    }
    assert seen.body["input"]["mcp"]["name"] == "search"
    (forwarded,) = upstream.seen
    assert "authorization" not in forwarded.headers
    assert token.encode() not in forwarded.body
