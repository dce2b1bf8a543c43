"""SPIFFE over mTLS: the listener's TLS context, and the caller's SPIFFE ID from its verified certificate.

The TLS handshake does the trust decision (`CERT_REQUIRED` against the trust bundle), so a caller with no
certificate or an untrusted one never gets an HTTP exchange at all. What remains per request is reading the ID:
an X509-SVID has exactly one URI SAN, a `spiffe://trust-domain/path` (SPIFFE ID and X509-SVID specs).
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Callable
from typing import Any

from pep.config import MtlsConfig
from pep.identity import Refusal, invalid
from pep.secret_file import Stamp, file_stamp
from pep.stderr import say

# spiffe://<trust domain>/<path>: lower-case trust domain, path segments of [A-Za-z0-9._-], no dot segments.
_SPIFFE_ID = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*\Z")
MAX_ID_BYTES = 2048


def server_context(cfg: MtlsConfig) -> ssl.SSLContext:
    """TLS 1.2+ with a required client certificate that chains to `ca_file`. Raises OSError/ssl.SSLError."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cfg.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


CHECK_S = 1.0  # the certificate files are looked at (three stats) at most this often


class ListenerTls:
    """The mTLS listener's TLS context, following its files: SVIDs rotate (hourly, by default), so a changed
    `cert_file`, `key_file` or `ca_file` takes effect for new connections without a restart.

    The listener keeps one context; its SNI callback, which OpenSSL calls on every handshake (with no server name
    too), hands the connection the current context. A changed file set that cannot be loaded (a half-written
    rotation) keeps the last good context and is retried at the next check."""

    def __init__(self, cfg: MtlsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self._clock = clock
        self._stamp = self._stamps()
        self.current = server_context(cfg)
        self._checked = clock()
        self.problem: str | None = None
        self.listener = server_context(cfg)
        self.listener.sni_callback = self._select

    def _stamps(self) -> tuple[Stamp | None, ...]:
        return tuple(file_stamp(path) for path in (self._cfg.ca_file, self._cfg.cert_file, self._cfg.key_file))

    def refresh(self) -> None:
        """Reload if a file changed (SIGHUP calls this too)."""
        self._checked = self._clock()
        stamp = self._stamps()
        if stamp == self._stamp:
            return
        try:
            self.current = server_context(self._cfg)
        except (OSError, ssl.SSLError) as exc:
            if self.problem is None:
                say(f"failclosed-pep: identity.mtls: keeping the last good certificates: {exc}")
            self.problem = str(exc)
            return
        self._stamp, self.problem = stamp, None

    def _select(self, conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self._clock() - self._checked >= CHECK_S:
            self.refresh()
        conn.context = self.current


def spiffe_id(peercert: dict[str, Any] | None) -> str | Refusal:
    """The SPIFFE ID of a verified peer certificate (`ssl.SSLSocket.getpeercert()`), or why there is none."""
    if not peercert:
        return invalid("no verified client certificate")
    uris = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        return invalid("the client certificate must carry exactly one URI SAN (an X509-SVID)")
    uri = uris[0]
    if len(uri) > MAX_ID_BYTES or not isinstance(uri, str) or not _SPIFFE_ID.match(uri):
        return invalid("the client certificate URI SAN is not a valid spiffe:// ID")
    segments = uri[len("spiffe://") :].split("/")[1:]
    if any(seg in (".", "..") for seg in segments):
        return invalid("the client certificate URI SAN is not a valid spiffe:// ID")
    return uri
