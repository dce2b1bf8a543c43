"""A TLS handshake's verdict on the mTLS listener never outlives what a full handshake would accept now (issue 13).

Real TLS clients (Python's `ssl`, TLS 1.2 and TLS 1.3) against a PEP on loopback, with certificates from a test
trust domain (tests/support/spiffe_pki.py). Each client makes a full handshake while its SVID is valid and
trusted, keeps its TLS session (`session=`, as a resuming client does) and a keep-alive connection, and then:

- its SVID expires, or
- its CA is removed from the bundle file (`identity.mtls.ca_file`).

Then a resumed TLS 1.3 session is impossible (the listener issues no session tickets): the client makes a full
handshake and is refused. A TLS 1.2 session ID, which Python's `ssl` cannot stop OpenSSL from caching, is
resumed, but its request is denied `identity_invalid` and the connection aborted so that OpenSSL forgets the
session: the client's next attempt is a full handshake, and refused. A request on the kept-alive connection is
denied `identity_invalid`. The upstream never sees any of these requests.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.conftest import RunningPep
from tests.support.spiffe_pki import SpiffePki
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]
TIMEOUT_S = 5.0
CHECK_S = 1.0  # pep.identity.spiffe.CHECK_S: how often the certificate files are looked at


@dataclass
class Attempt:
    """One request on a new connection. `status` None: the TLS handshake (or the connection) was refused."""

    status: int | None
    reason: str | None
    resumed: bool
    session: ssl.SSLSession | None


class Connection:
    """A blocking HTTP/1.1 client on one TLS connection (call it from a thread: the PEP runs in the test's loop)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        try:
            self.tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1", session=session)
        except BaseException:
            sock.close()
            raise
        self._buffer = b""

    def request(self, close: bool = False) -> tuple[int, dict[str, str]]:
        """GET /tools/search; the status and the lower-cased headers. Raises OSError (ssl.SSLError included)."""
        connection = "close" if close else "keep-alive"
        self.tls.sendall(f"GET /tools/search HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: {connection}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self._buffer:
            self._read()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            self._read()
        self._buffer = self._buffer[length:]
        return int(status_line.split()[1]), headers

    def _read(self) -> None:
        chunk = self.tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a whole answer")
        self._buffer += chunk

    def close(self) -> None:
        """A clean close (close_notify), which keeps the client's session resumable."""
        try:
            self.tls.unwrap().close()
        except OSError:
            self.tls.close()


def attempt(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> Attempt:
    """One request on a new connection, offering `session`; blocking."""
    try:
        conn = Connection(port, ctx, session)
    except OSError:  # a TLS 1.2 handshake refused by the server
        return Attempt(None, None, False, None)
    try:
        status, headers = conn.request(close=True)
    except OSError:  # with TLS 1.3 the client learns of a refused certificate on its first read
        return Attempt(None, None, bool(conn.tls.session_reused), None)
    # Read only now: a TLS 1.3 session (its ticket) arrives after the handshake.
    found = Attempt(status, headers.get("x-pep-reason"), bool(conn.tls.session_reused), conn.tls.session)
    conn.close()
    return found


def client(pki: SpiffePki, name: str, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = pki.client_context(name)
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def not_after(pki: SpiffePki, name: str) -> float:
    cert = x509.load_pem_x509_certificate(pki.clients[name].cert_file.read_bytes())
    return cert.not_valid_after_utc.timestamp()


def session_misses(pep: RunningPep) -> int:
    """Offered TLS session IDs the listener did not find in its cache (OpenSSL's counter)."""
    listener = pep.server.listener_tls
    assert listener is not None
    return int(listener.listener.session_stats()["misses"])


TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


class Held:
    """What a client keeps from before the change: a TLS 1.3 session, a TLS 1.2 session, a kept-alive connection."""

    def __init__(self, pki: SpiffePki, name: str) -> None:
        # A session is resumed through the client context that made it.
        self.ctx13, self.ctx12 = client(pki, name, TLS13), client(pki, name, TLS12)
        self.tls13: Attempt | None = None
        self.tls12: Attempt | None = None
        self.live: Connection | None = None

    @classmethod
    async def take(cls, port: int, pki: SpiffePki, name: str) -> Held:
        held = cls(pki, name)
        held.tls13 = await asyncio.to_thread(attempt, port, held.ctx13)
        held.tls12 = await asyncio.to_thread(attempt, port, held.ctx12)
        held.live = live = await asyncio.to_thread(Connection, port, held.ctx13)
        status, _ = await asyncio.to_thread(live.request)
        assert (held.tls13.status, held.tls12.status, status) == (200, 200, 200)
        assert held.tls13.session is not None
        assert held.tls12.session is not None
        return held

    async def assert_all_refused(self, pep: RunningPep) -> None:
        assert self.tls13 is not None
        assert self.tls12 is not None
        assert self.live is not None
        port = pep.port
        resumed13 = await asyncio.to_thread(attempt, port, self.ctx13, self.tls13.session)
        assert (resumed13.resumed, resumed13.status) == (False, None)  # no ticket to resume: a full handshake

        misses = session_misses(pep)
        resumed12 = await asyncio.to_thread(attempt, port, self.ctx12, self.tls12.session)
        assert (resumed12.resumed, resumed12.status, resumed12.reason) in [
            (True, 401, "identity_invalid"),  # resumed, and the request refused
            (True, None, None),  # resumed, refused, and aborted before the client read the answer
        ]
        again = await asyncio.to_thread(attempt, port, self.ctx12, self.tls12.session)
        assert (again.resumed, again.status) == (False, None)  # the session was forgotten: a full handshake
        assert session_misses(pep) == misses + 1  # offered, and not found

        try:
            status, headers = await asyncio.to_thread(self.live.request)
        except OSError:
            pass  # aborted before the answer was read: refused all the same
        else:
            assert (status, headers["x-pep-reason"]) == (401, "identity_invalid")
        await asyncio.to_thread(self.live.close)


def with_mtls(ca_file: Path, pki: SpiffePki) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["identity"]["mtls"] = {**pki.mtls_config(), "ca_file": str(ca_file)}

    return mutate


@pytest.fixture
def pki(tmp_path: Path) -> SpiffePki:
    return SpiffePki.create(tmp_path / "pki")


async def test_an_expired_svid_is_refused_on_a_resumed_session_and_a_kept_connection(
    make_pep: PepFactory, pki: SpiffePki, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(with_mtls(pki.ca_file, pki))
    pki.issue_svid("short", datetime.timedelta(seconds=3))
    held = await Held.take(pep.port, pki, "short")
    assert len(upstream.seen) == 3
    await asyncio.sleep(max(0.0, not_after(pki, "short") - time.time()) + 1.2)  # expired, whole seconds and all

    await held.assert_all_refused(pep)
    assert len(upstream.seen) == 3
    fresh = await asyncio.to_thread(attempt, pep.port, client(pki, "svid", TLS12))
    assert fresh.status == 200  # a valid SVID still passes
    entries = [e for e in await pep.log_entries() if e["reason"] == "identity_invalid"]
    assert {e["detail"] for e in entries} == {"the client certificate has expired"}


async def test_a_ca_removed_from_the_bundle_is_refused_on_a_resumed_session_and_a_kept_connection(
    make_pep: PepFactory, pki: SpiffePki, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.cert_pem + pki.other_ca.cert_pem)
    pep: RunningPep = await make_pep(with_mtls(bundle, pki))
    held = await Held.take(pep.port, pki, "svid")
    assert len(upstream.seen) == 3

    staged = bundle.with_suffix(".new")
    staged.write_bytes(pki.other_ca.cert_pem)  # the CA of `svid` is distrusted
    os.replace(staged, bundle)
    await asyncio.sleep(CHECK_S + 0.2)

    await held.assert_all_refused(pep)
    assert len(upstream.seen) == 3
    other = await asyncio.to_thread(attempt, pep.port, client(pki, "untrusted", TLS12))
    assert other.status == 200  # a certificate of the CA that stayed passes, with a full handshake
    entries = [e for e in await pep.log_entries() if e["reason"] == "identity_invalid"]
    assert {e["detail"] for e in entries} == {"the client certificate was verified before the trust bundle changed"}
