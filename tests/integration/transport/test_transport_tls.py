"""TLS and mTLS on the listener, with the PEP's own listener contexts (pep/identity/spiffe.py ListenerTls):
the handler sees the scheme and the TLS object, a client certificate's SPIFFE ID is read from it, a rotated
certificate and bundle apply to new connections through the SNI callback, and an answer followed by `abort()`
ends the TLS session without close_notify, so OpenSSL forgets it and the client cannot resume it."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
from pathlib import Path

import httpx
import trustme

from pep.config import MtlsConfig
from pep.identity import Refusal
from pep.identity.spiffe import CHECK_S, ListenerTls, spiffe_id
from pep.transport import Exchange, Listener, serve
from tests.support.spiffe_pki import SPIFFE_ID, SpiffePki

TIMEOUT_S = 5.0


async def test_the_handler_sees_tls(listeners: list[Listener]) -> None:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)

    async def handler(exchange: Exchange) -> None:
        tls = exchange.connection.ssl_object
        version = tls.version() if tls is not None else None
        exchange.response.send(200, [], f"{exchange.connection.scheme} {version}".encode())

    listener = await serve("127.0.0.1", 0, handler, ssl=server)
    listeners.append(listener)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with httpx.AsyncClient(verify=client_ctx) as client:
        response = await client.get(f"https://127.0.0.1:{listener.address[1]}/")
    assert response.text == "https TLSv1.3"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mtls_listener(pki: SpiffePki, clock: Clock) -> ListenerTls:
    return ListenerTls(MtlsConfig(str(pki.ca_file), str(pki.server.cert_file), str(pki.server.key_file)), clock)


def spiffe_handler(tls: ListenerTls) -> object:
    async def handler(exchange: Exchange) -> None:
        conn = exchange.connection.ssl_object
        assert conn is not None
        found = spiffe_id(tls.peer(conn))
        if isinstance(found, Refusal):
            exchange.response.close_after()
            exchange.response.send(401, [], found.detail.encode())
            if found.drop_session:
                exchange.response.abort()
            return
        if exchange.target == "/refuse":  # as the PEP does after a refused mTLS request: answer, then abort
            exchange.response.send(401, [], b"refused")
            exchange.response.abort()
            return
        exchange.response.send(200, [], found.encode())

    return handler


Attempt = tuple[int | None, bytes, bool, ssl.SSLSession | None]


def request(port: int, ctx: ssl.SSLContext, target: str = "/", session: ssl.SSLSession | None = None) -> Attempt:
    """One GET on a new TLS connection (blocking: run in a thread): status (None: refused), body, whether the
    session was resumed, and the session."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    try:
        tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1", session=session)
    except OSError:
        sock.close()
        return None, b"", False, None
    data = b""
    try:
        tls.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        while len(body) < length:
            body += tls.recv(65536)
        status = int(head.split(b" ")[1])
    except (OSError, StopIteration, IndexError, ValueError):
        return None, b"", bool(tls.session_reused), None
    found = (status, body, bool(tls.session_reused), tls.session)
    try:
        tls.unwrap().close()  # a clean close: the client keeps a resumable session
    except OSError:
        tls.close()
    return found


async def test_mtls_reads_the_spiffe_id_and_refuses_what_the_bundle_does_not_trust(
    tmp_path: Path, listeners: list[Listener]
) -> None:
    pki = SpiffePki.create(tmp_path / "pki")
    tls = mtls_listener(pki, Clock())
    listener = await serve("127.0.0.1", 0, spiffe_handler(tls), ssl=tls.listener)  # type: ignore[arg-type]
    listeners.append(listener)
    port = listener.address[1]
    status, body, _, _ = await asyncio.to_thread(request, port, pki.client_context("svid"))
    assert (status, body) == (200, SPIFFE_ID.encode())
    status, body, _, _ = await asyncio.to_thread(request, port, pki.client_context("no_uri"))
    assert status == 401
    for refused in (pki.client_context(None), pki.client_context("untrusted")):
        status, _, _, _ = await asyncio.to_thread(request, port, refused)
        assert status is None  # no HTTP exchange at all


async def test_a_rotated_certificate_and_bundle_apply_to_new_connections(
    tmp_path: Path, listeners: list[Listener]
) -> None:
    old, new = SpiffePki.create(tmp_path / "old"), SpiffePki.create(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    paths = {"ca": live / "ca.pem", "cert": live / "server.pem", "key": live / "server.key"}

    def install(pki: SpiffePki) -> None:
        for key, source in (("ca", pki.ca_file), ("cert", pki.server.cert_file), ("key", pki.server.key_file)):
            staged = paths[key].with_suffix(".new")
            shutil.copyfile(source, staged)
            os.replace(staged, paths[key])

    install(old)
    clock = Clock()
    tls = ListenerTls(MtlsConfig(str(paths["ca"]), str(paths["cert"]), str(paths["key"])), clock)
    listener = await serve("127.0.0.1", 0, spiffe_handler(tls), ssl=tls.listener)  # type: ignore[arg-type]
    listeners.append(listener)
    port = listener.address[1]
    assert (await asyncio.to_thread(request, port, old.client_context()))[0] == 200
    assert (await asyncio.to_thread(request, port, new.client_context()))[0] is None

    install(new)
    st = os.stat(paths["cert"])
    os.utime(paths["cert"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new stamp, even within one tick
    clock.now += CHECK_S  # the SNI callback looks at the files again on the next handshake
    assert (await asyncio.to_thread(request, port, new.client_context()))[0] == 200
    assert (await asyncio.to_thread(request, port, old.client_context()))[0] is None


async def test_an_aborted_answer_leaves_no_session_to_resume(tmp_path: Path, listeners: list[Listener]) -> None:
    pki = SpiffePki.create(tmp_path / "pki")
    tls = mtls_listener(pki, Clock())
    listener = await serve("127.0.0.1", 0, spiffe_handler(tls), ssl=tls.listener)  # type: ignore[arg-type]
    listeners.append(listener)
    port = listener.address[1]
    ctx = pki.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.2 session IDs: the listener cannot turn them off

    # The control: after a clean close, the session is resumed.
    status, _, resumed, session = await asyncio.to_thread(request, port, ctx)
    assert (status, resumed) == (200, False)
    status, _, resumed, _ = await asyncio.to_thread(request, port, ctx, "/", session)
    assert (status, resumed) == (200, True)

    # Answered, then aborted: the client still reads the answer, and its session is gone.
    status, body, resumed, session = await asyncio.to_thread(request, port, ctx, "/refuse")
    assert (status, body, resumed) == (401, b"refused", False)
    assert session is not None
    status, _, resumed, _ = await asyncio.to_thread(request, port, ctx, "/", session)
    assert (status, resumed) == (200, False)  # a full handshake
