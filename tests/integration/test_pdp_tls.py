"""TLS to the PDP: the fault PDP served over HTTPS with a throwaway CA (trustme). The PEP allows only through a
verified connection: its `pdp.tls.ca_file`, and for a PDP that requires it, its client certificate."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp
from tests.support.observe import metric
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def client_cert(tmp_path: Path, ca: trustme.CA) -> tuple[str, str]:
    cert = ca.issue_cert("pep.test")
    cert_path, key_path = tmp_path / "client.pem", tmp_path / "client.key"
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(cert_path), append=i > 0)
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


def server_context(ca: trustme.CA, *, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


async def tls_pdp(ca: trustme.CA, *, require_client_cert: bool = False) -> FaultPdp:
    pdp = FaultPdp(tls=server_context(ca, require_client_cert=require_client_cert))
    await pdp.start()
    return pdp


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def over_tls(url: str, tls: dict[str, str] | None) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["pdp"]["url"] = url
        raw["pdp"]["timeout_ms"] = 2000
        if tls is not None:
            raw["pdp"]["tls"] = tls

    return mutate


async def through(client: aiohttp.ClientSession, pep: RunningPep) -> tuple[int, str | None]:
    async with client.get(pep.url + "/tools/search") as r:
        await r.read()
        return r.status, r.headers.get("x-pep-reason")


async def test_a_pdp_verified_with_the_configured_ca_allows(
    make_pep: PepFactory, ca: trustme.CA, ca_file: str, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    pdp = await tls_pdp(ca)
    try:
        assert pdp.url.startswith("https://127.0.0.1:")
        pep: RunningPep = await make_pep(over_tls(pdp.url, {"ca_file": ca_file}))
        assert await through(client, pep) == (200, None)
        assert len(pdp.requests) == 1
        assert pdp.requests[0].headers["x-request-id"]
        assert len(upstream.seen) == 1
    finally:
        await pdp.stop()


@pytest.mark.parametrize("tls", [None, {}], ids=["no-tls-key", "tls-without-ca"])
async def test_without_the_ca_the_pdp_is_unreachable(
    make_pep: PepFactory,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    tls: dict[str, str] | None,
) -> None:
    pdp = await tls_pdp(ca)
    try:
        pep: RunningPep = await make_pep(over_tls(pdp.url, tls))
        assert await through(client, pep) == (403, "pdp_unreachable")
        assert pdp.requests == []  # the handshake failed: no request was sent
        assert upstream.seen == []
        entry = (await pep.log_entries())[0]
        assert entry["reason"] == "pdp_unreachable"
        assert "certificate" in entry["detail"].lower()
        async with client.get(pep.admin_url + "/metrics") as r:
            text = await r.text()
        assert metric(text, "pep_pdp_request_duration_seconds_count", outcome="unreachable") >= 1
    finally:
        await pdp.stop()


async def test_a_ca_that_did_not_sign_the_pdp_certificate_is_refused(
    make_pep: PepFactory, ca: trustme.CA, tmp_path: Path, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    pdp = await tls_pdp(ca)
    try:
        pep: RunningPep = await make_pep(over_tls(pdp.url, {"ca_file": str(other)}))
        assert await through(client, pep) == (403, "pdp_unreachable")
        assert upstream.seen == []
    finally:
        await pdp.stop()


async def test_mtls_with_a_client_certificate_allows(
    make_pep: PepFactory,
    ca: trustme.CA,
    ca_file: str,
    client_cert: tuple[str, str],
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    pdp = await tls_pdp(ca, require_client_cert=True)
    try:
        cert_file, key_file = client_cert
        tls = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        pep: RunningPep = await make_pep(over_tls(pdp.url, tls))
        assert await through(client, pep) == (200, None)
        assert len(pdp.requests) == 1
        assert len(upstream.seen) == 1
    finally:
        await pdp.stop()


async def test_mtls_without_a_client_certificate_is_unreachable(
    make_pep: PepFactory, ca: trustme.CA, ca_file: str, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    pdp = await tls_pdp(ca, require_client_cert=True)
    try:
        pep: RunningPep = await make_pep(over_tls(pdp.url, {"ca_file": ca_file}))
        assert await through(client, pep) == (403, "pdp_unreachable")
        assert pdp.requests == []
        assert upstream.seen == []
    finally:
        await pdp.stop()
