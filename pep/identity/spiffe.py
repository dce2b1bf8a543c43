"""SPIFFE over mTLS: the listener's TLS context, and the caller's SPIFFE ID from its verified certificate.

The TLS handshake does the trust decision (`CERT_REQUIRED` against the trust bundle), so a caller with no
certificate or an untrusted one never gets an HTTP exchange at all. An X509-SVID has exactly one URI SAN, a
`spiffe://trust-domain/path` (SPIFFE ID and X509-SVID specs).

A handshake's verdict must not outlive what a full handshake would accept now. Session resumption skips
verification, and its keys live in the listener's first context, which rotation never replaces, so the server
contexts issue no session tickets (TLS 1.2 tickets and all TLS 1.3 tickets: TLS 1.3 cannot resume at all).
Python's `ssl` cannot switch off the TLS 1.2 session-ID cache, and a keep-alive connection outlives its
certificate just the same, so every request checks again what changes with time: the certificate's validity
period, and that no CA left the bundle since the certificate was verified. A connection that fails this is
answered and then aborted without a TLS close_notify, which makes OpenSSL forget its session.
"""

from __future__ import annotations

import math
import re
import ssl
import time
import weakref
from collections.abc import Callable
from typing import Any, Final

from pep.config import MtlsConfig
from pep.decision import Reason
from pep.identity import Refusal, invalid
from pep.secret_file import Stamp, file_stamp
from pep.stderr import say

# spiffe://<trust domain>/<path>: lower-case trust domain, path segments of [A-Za-z0-9._-], no dot segments.
_SPIFFE_ID: Final = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*\Z")
MAX_ID_BYTES: Final = 2048


def server_context(cfg: MtlsConfig) -> ssl.SSLContext:
    """TLS 1.2+ with a required client certificate that chains to `ca_file`, and no session tickets (see the
    module docstring). Raises OSError/ssl.SSLError."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cfg.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET  # no TLS 1.2 tickets, no stateless TLS 1.3 tickets
    ctx.num_tickets = 0  # no TLS 1.3 tickets at all (OP_NO_TICKET alone makes them stateful)
    return ctx


def _anchors(ctx: ssl.SSLContext) -> frozenset[bytes]:
    """The trust bundle a context verifies with, as DER certificates."""
    return frozenset(ctx.get_ca_certs(binary_form=True))


def stale(detail: str) -> Refusal:
    """A connection whose certificate would not pass a full handshake now: refused, and its session dropped."""
    return Refusal(Reason.IDENTITY_INVALID, detail, "invalid_token", drop_session=True)


CHECK_S: Final = 1.0  # the certificate files are looked at (three stats) at most this often


class ListenerTls:
    """The mTLS listener's TLS context, following its files: SVIDs rotate (hourly, by default), so a changed
    `cert_file`, `key_file` or `ca_file` takes effect for new connections without a restart.

    The listener keeps one context; its SNI callback, which OpenSSL calls on every handshake (with no server name
    too), hands the connection the current context. A changed file set that cannot be loaded (a half-written
    rotation) keeps the last good context and is retried at the next check. A reload that drops a CA from the
    bundle starts a new trust generation: connections verified before it are refused (see `peer`)."""

    def __init__(
        self, cfg: MtlsConfig, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time
    ) -> None:
        self._cfg = cfg
        self._clock = clock
        self._wall = wall
        self._stamp = self._stamps()
        self.current = server_context(cfg)
        self._checked = clock()
        self.problem: str | None = None
        self._bundle = _anchors(self.current)
        self._generation = 0
        self._distrusted_at = -math.inf  # wall clock, whole seconds: when a CA last left the bundle
        self._generation_of: weakref.WeakKeyDictionary[ssl.SSLContext, int] = weakref.WeakKeyDictionary()
        self._generation_of[self.current] = 0
        self.listener = server_context(cfg)
        self._generation_of[self.listener] = 0
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
            current = server_context(self._cfg)
        except (OSError, ssl.SSLError) as exc:
            if self.problem is None:
                say(f"failclosed-pep: identity.mtls: keeping the last good certificates: {exc}")
            self.problem = str(exc)
            return
        bundle = _anchors(current)
        if self._bundle - bundle:  # a CA was removed: what it verified is no longer known to be trusted
            self._generation += 1
            self._distrusted_at = float(math.floor(self._wall()))
        self._bundle = bundle
        self._generation_of[current] = self._generation
        self.current = current
        self._stamp, self.problem = stamp, None

    def _select(self, conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self._clock() - self._checked >= CHECK_S:
            self.refresh()
        conn.context = self.current

    def peer(self, conn: ssl.SSLObject) -> dict[str, Any] | Refusal | None:
        """The connection's verified client certificate (`getpeercert()`), if it would still pass a full handshake
        now; else why not. Asked on every request of the connection."""
        cert = conn.getpeercert()
        if not cert:
            return None
        if self._clock() - self._checked >= CHECK_S:
            self.refresh()
        now = self._wall()
        begins, ends = cert.get("notBefore"), cert.get("notAfter")
        try:
            if not isinstance(begins, str) or not isinstance(ends, str):
                raise ValueError("no validity period")
            not_before, not_after = ssl.cert_time_to_seconds(begins), ssl.cert_time_to_seconds(ends)
        except ValueError:
            return stale("the client certificate has no readable validity period")
        if now < not_before:
            return stale("the client certificate is not valid yet")
        if now > not_after:
            return stale("the client certificate has expired")
        if conn.session_reused:
            # A resumed TLS 1.2 session: verified when the session was made (whole seconds), by whichever bundle
            # was in force then. Made in the second a CA left or before: not known to be trusted any more.
            session = conn.session
            if session is None or session.time <= self._distrusted_at:
                return stale("the client certificate was verified before the trust bundle changed")
        elif self._generation_of.get(conn.context) != self._generation:
            return stale("the client certificate was verified before the trust bundle changed")
        return cert


def spiffe_id(peercert: dict[str, Any] | Refusal | None) -> str | Refusal:
    """The SPIFFE ID of a verified peer certificate (`ssl.SSLSocket.getpeercert()`), or why there is none."""
    if isinstance(peercert, Refusal):
        return peercert
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
