"""SPIFFE over mTLS (issue 6): the agent-facing listener requires a client certificate from `identity.mtls.ca_file`,
and the peer's one spiffe:// URI SAN becomes `subject.workload`. Real TLS sockets on loopback, real clients
(aiohttp, httpx), a test CA with SPIFFE SANs (tests/support/spiffe_pki.py).

- No certificate, or one from another CA: the handshake fails; no HTTP exchange, no decision, nothing forwarded.
- A trusted certificate that is not an X509-SVID (no URI SAN, two URI SANs, a non-spiffe URI): 401
  identity_invalid with a Bearer challenge, the PDP not asked, nothing forwarded.
- Plain HTTP to the TLS listener: no proxying at all.
- With identity.jwt too: the workload from the certificate and the caller from the token.
- A denial before the policy input exists is logged with the peer's SPIFFE ID, never the configured workload.
- `pep check` names an unusable mTLS file by its key path.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
import yaml

from pep.cli import EXIT_CONFIG, main
from pep.headers import CLIENT_CERTIFICATE
from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp
from tests.support.spiffe_pki import OTHER_SPIFFE_ID, SPIFFE_ID, TRUST_DOMAIN, JwtAuthority, SpiffePki
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]
STATIC_WORKLOAD = "spiffe://test/agent"  # tests/conftest.py base_config: never the subject on an mTLS listener
ISSUER = "https://issuer.test"
AUDIENCE = "failclosed-pep"
TIMEOUT = aiohttp.ClientTimeout(total=5)
# What a client sees when the handshake is refused: a TLS alert, a reset or a close, depending on timing and the
# TLS version (with TLS 1.3 the client learns of the refusal on its first read).
AIOHTTP_REFUSED = (aiohttp.ClientConnectionError, ssl.SSLError, ConnectionError)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SpiffePki:
    return SpiffePki.create(tmp_path_factory.mktemp("spiffe"))


@pytest.fixture
def authority(tmp_path: Path) -> JwtAuthority:
    return JwtAuthority(tmp_path / "jwks.json", ISSUER, AUDIENCE)


def with_mtls(pki: SpiffePki, jwt: dict[str, Any] | None = None, **route: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["identity"]["mtls"] = pki.mtls_config()
        if jwt is not None:
            raw["identity"]["jwt"] = jwt
        raw["routes"][0].update(route)

    return mutate


@pytest.fixture
async def mtls_pep(make_pep: PepFactory, pki: SpiffePki) -> RunningPep:
    running: RunningPep = await make_pep(with_mtls(pki))
    return running


def https(pep: RunningPep, target: str = "/tools/search?q=1") -> str:
    return f"https://127.0.0.1:{pep.port}{target}"


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def reason(self) -> str | None:
        return self.headers.get("x-pep-reason")


async def get(
    pki: SpiffePki,
    pep: RunningPep,
    client: str | None = "svid",
    headers: dict[str, str] | None = None,
    target: str = "/tools/search?q=1",
) -> Answer:
    """One request over a new TLS connection that presents `client`'s certificate (None: none)."""
    connector = aiohttp.TCPConnector(ssl=pki.client_context(client), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session,
        session.get(https(pep, target), headers=headers or {}) as r,
    ):
        body = await r.read()
        return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, body)


def pdp_inputs(pdp: FaultPdp) -> list[dict[str, Any]]:
    return [seen.body["input"] for seen in pdp.requests]


def assert_nothing_decided_or_forwarded(pdp: FaultPdp, upstream: RecordingUpstream) -> None:
    assert upstream.seen == []
    assert pdp.requests == []


# --- accepted ----------------------------------------------------------------------------------------------------


async def test_a_trusted_svid_is_the_subject_workload(
    mtls_pep: RunningPep, pki: SpiffePki, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    answer = await get(pki, mtls_pep, headers={"x-request-id": "svid-1"})
    assert answer.status == 200, answer.body
    assert [(u.method, u.target) for u in upstream.seen] == [("GET", "/tools/search?q=1")]
    assert upstream.seen[0].headers["x-forwarded-proto"] == "https"

    [doc] = pdp_inputs(fault_pdp)
    assert doc["subject"]["workload"] == SPIFFE_ID
    assert doc["request"]["scheme"] == "https"
    [entry] = await mtls_pep.log_entries()
    assert entry["request_id"] == "svid-1"
    assert entry["decision"] == "allow"
    assert entry["subject"]["workload"] == SPIFFE_ID
    assert entry["decision_id"] == upstream.seen[0].headers["x-pep-decision-id"]


async def test_each_connection_carries_its_own_workload(
    mtls_pep: RunningPep, pki: SpiffePki, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """The SPIFFE ID is read from each connection's certificate: a bad one in between changes nothing else."""
    assert (await get(pki, mtls_pep)).status == 200
    assert (await get(pki, mtls_pep, "not_spiffe")).reason == "identity_invalid"
    assert (await get(pki, mtls_pep)).status == 200
    assert [d["subject"]["workload"] for d in pdp_inputs(fault_pdp)] == [SPIFFE_ID, SPIFFE_ID]
    assert len(upstream.seen) == 2


async def test_httpx_with_a_client_certificate(
    mtls_pep: RunningPep, pki: SpiffePki, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    async with httpx.AsyncClient(verify=pki.client_context("svid"), timeout=5) as client:
        r = await client.post(https(mtls_pep, "/tools/create"), content=b'{"a":1}')
    assert r.status_code == 200, r.text
    assert orjson.loads(r.content)["target"] == "/tools/create"
    assert [(u.method, u.body) for u in upstream.seen] == [("POST", b'{"a":1}')]
    assert pdp_inputs(fault_pdp)[0]["subject"]["workload"] == SPIFFE_ID


# --- refused in the handshake ----------------------------------------------------------------------------------


@pytest.mark.parametrize("client", [None, "untrusted"], ids=["no-certificate", "untrusted-ca"])
async def test_no_or_an_untrusted_certificate_gets_no_http_exchange(
    mtls_pep: RunningPep, pki: SpiffePki, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: str | None
) -> None:
    with pytest.raises(AIOHTTP_REFUSED):
        await get(pki, mtls_pep, client)
    assert_nothing_decided_or_forwarded(fault_pdp, upstream)
    assert await mtls_pep.log_entries() == []  # no request was ever read, so there is no decision to log
    assert (await get(pki, mtls_pep)).status == 200  # the listener is still up for trusted callers
    assert len(upstream.seen) == 1


@pytest.mark.parametrize("client", [None, "untrusted"], ids=["no-certificate", "untrusted-ca"])
async def test_httpx_without_a_trusted_certificate_is_refused(
    mtls_pep: RunningPep, pki: SpiffePki, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: str | None
) -> None:
    async with httpx.AsyncClient(verify=pki.client_context(client), timeout=5) as http:
        with pytest.raises(httpx.TransportError):
            await http.post(https(mtls_pep, "/tools/create"), content=b"{}")
    assert_nothing_decided_or_forwarded(fault_pdp, upstream)


async def test_plain_http_to_the_tls_listener_is_not_proxied(
    mtls_pep: RunningPep, pki: SpiffePki, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mtls_pep.port)
    try:
        writer.write(b"GET /tools/search HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read(65536)  # until the server closes
    finally:
        writer.close()
    assert not data.startswith(b"HTTP/"), data
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{mtls_pep.port}/tools/search")
    assert_nothing_decided_or_forwarded(fault_pdp, upstream)


# --- trusted, but not an X509-SVID -----------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["no_uri", "two_uris", "not_spiffe"])
async def test_a_trusted_certificate_without_one_spiffe_id_is_identity_invalid(
    mtls_pep: RunningPep, pki: SpiffePki, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: str
) -> None:
    answer = await get(pki, mtls_pep, client, headers={"x-request-id": f"bad-{client}"})
    assert answer.status == 401, answer.body
    assert answer.reason == "identity_invalid"
    assert answer.headers["x-pep-decision"] == "deny"
    challenge = answer.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge
    assert orjson.loads(answer.body)["error"]["reason"] == "identity_invalid"
    assert_nothing_decided_or_forwarded(fault_pdp, upstream)
    [entry] = await mtls_pep.log_entries()
    assert (entry["request_id"], entry["decision"], entry["reason"]) == (f"bad-{client}", "deny", "identity_invalid")
    assert entry["attempts"] == 0


async def test_a_callers_client_certificate_fields_are_neither_forwarded_nor_decided_on(
    make_pep: PepFactory, pki: SpiffePki, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """The PEP terminates the agent's TLS: fields in which such a proxy passes the client certificate on (RFC 9440,
    Envoy's XFCC, ...) are the PEP's to set, so a caller's copy, naming a certificate nobody verified, reaches
    neither the upstream nor the policy, whatever the route (keep_caller_credentials too); with `_` for `-` it is
    refused."""
    pep = await make_pep(with_mtls(pki, keep_caller_credentials=True))
    claimed = {name: f"By=spiffe://{TRUST_DOMAIN}/pep;URI={OTHER_SPIFFE_ID}" for name in CLIENT_CERTIFICATE}
    answer = await get(pki, pep, headers={**claimed, "x-kept": "yes"})
    assert answer.status == 200, answer.body
    [seen] = upstream.seen
    forwarded = {name.lower() for name in seen.headers}
    assert "x-kept" in forwarded
    assert forwarded.isdisjoint(CLIENT_CERTIFICATE)
    [doc] = pdp_inputs(fault_pdp)
    assert doc["subject"]["workload"] == SPIFFE_ID
    assert "x-kept" in doc["request"]["headers"]
    assert set(doc["request"]["headers"]).isdisjoint(CLIENT_CERTIFICATE)
    assert OTHER_SPIFFE_ID not in orjson.dumps(doc).decode()

    refused = await get(pki, pep, headers={"X_Forwarded_Client_Cert": f"URI={OTHER_SPIFFE_ID}"})
    assert refused.reason == "request_ambiguous"
    assert len(upstream.seen) == 1


@pytest.mark.parametrize(("client", "workload"), [("svid", SPIFFE_ID), ("not_spiffe", None)])
async def test_an_early_denial_is_logged_with_the_peer_not_the_configured_workload(
    mtls_pep: RunningPep, pki: SpiffePki, upstream: RecordingUpstream, client: str, workload: str | None
) -> None:
    """On an mTLS listener `identity.workload` is nobody's identity: a request refused before its policy input
    exists (here `no_route`, or the certificate itself) is logged with the peer's SPIFFE ID, or none."""
    answer = await get(pki, mtls_pep, client, target="/elsewhere" if client == "svid" else "/tools/search")
    assert answer.reason == ("no_route" if client == "svid" else "identity_invalid")
    assert upstream.seen == []
    [entry] = await mtls_pep.log_entries()
    assert entry["subject"]["workload"] != STATIC_WORKLOAD
    assert entry["subject"]["workload"] == workload


# --- mTLS and a verified token together ---------------------------------------------------------------------------


async def test_the_workload_comes_from_the_certificate_and_the_caller_from_the_token(
    make_pep: PepFactory,
    pki: SpiffePki,
    authority: JwtAuthority,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
) -> None:
    jwt = authority.jwt_config(claims=["department"])
    pep: RunningPep = await make_pep(with_mtls(pki, jwt, require_identity=True))
    token = authority.mint("user-42", azp="support-bot", department="support")
    answer = await get(pki, pep, headers={"authorization": f"Bearer {token}", "x-agent-id": "spoofed"})
    assert answer.status == 200, answer.body

    [doc] = pdp_inputs(fault_pdp)
    subject = {k: v for k, v in doc["subject"].items() if k != "attributes"}
    assert subject == {
        "workload": SPIFFE_ID,
        "agent": "support-bot",  # from the token's azp: the agent header is not believed next to a token
        "id": "user-42",
        "claims": {"department": "support"},
        "unverified_agent": None,
    }
    assert "authorization" not in doc["request"]["headers"]
    [seen] = upstream.seen
    assert "authorization" not in seen.headers  # the caller's credential is not passed on
    [entry] = await pep.log_entries()
    assert entry["subject"]["workload"] == SPIFFE_ID
    assert entry["subject"]["id"] == "user-42"
    everything = orjson.dumps([doc, entry]) + pep.log_path.read_bytes()
    assert token.encode() not in everything
    assert token.rsplit(".", 1)[1].encode() not in everything  # not even the signature


@pytest.mark.parametrize("case", ["forged", "expired", "missing"])
async def test_a_bad_token_on_a_trusted_connection_is_refused(
    make_pep: PepFactory,
    pki: SpiffePki,
    authority: JwtAuthority,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    case: str,
) -> None:
    pep: RunningPep = await make_pep(with_mtls(pki, authority.jwt_config(), require_identity=True))
    headers: dict[str, str] = {}
    if case == "forged":
        headers["authorization"] = "Bearer " + authority.forger().mint()
    elif case == "expired":
        headers["authorization"] = "Bearer " + authority.mint(exp=1_000_000_000, iat=999_999_000, nbf=999_999_000)
    answer = await get(pki, pep, headers=headers)
    assert answer.status == 401, answer.body
    assert answer.reason == ("identity_missing" if case == "missing" else "identity_invalid")
    assert answer.headers["www-authenticate"].startswith("Bearer ")
    assert_nothing_decided_or_forwarded(fault_pdp, upstream)


# --- pep check ---------------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, mtls: dict[str, str]) -> Path:
    config = {
        "version": 1,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "identity": {"mtls": mtls},
        "pdp": {"kind": "opa", "url": "http://127.0.0.1:9/v1/data/pep/authz"},
        "routes": [{"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": "http://127.0.0.1:9"}],
    }
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_accepts_readable_mtls_files(tmp_path: Path, pki: SpiffePki, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(write_config(tmp_path, pki.mtls_config()), capsys) == (0, "ok\n", "")


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_check_names_a_missing_mtls_file_by_its_key(
    tmp_path: Path, pki: SpiffePki, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    missing = str(tmp_path / "nowhere" / f"{key}.pem")
    path = write_config(tmp_path, pki.mtls_config() | {key: missing})
    code, out, err = check(path, capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    # `file: key.path: what is wrong` (README, "Configuration"): which of the three files, and where it was looked for.
    assert err.startswith(f"{path}: identity.mtls.{key}: "), err
    assert missing in err


@pytest.mark.parametrize("problem", ["ca-not-a-certificate", "key-of-another-certificate"])
def test_check_refuses_unusable_mtls_files(
    tmp_path: Path, pki: SpiffePki, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    mtls = pki.mtls_config()
    if problem == "ca-not-a-certificate":
        bad = tmp_path / "ca.pem"
        bad.write_text("not a certificate\n")
        mtls["ca_file"] = str(bad)
    else:
        mtls["key_file"] = str(pki.clients["svid"].key_file)
    path = write_config(tmp_path, mtls)
    code, out, err = check(path, capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    assert err.startswith(f"{path}: identity.mtls"), err
