"""What goes wrong on a transport, as types: the proxy maps each to its reason and metric label without reading
a message.

Upstream failures carry `kind`, the label of `pep_upstream_failures_total` they count under (`connect`,
`timeout`, `reset`). Nothing here is retried: a failure after any request byte went out is a `reset`, never a
second delivery.
"""

from __future__ import annotations

from typing import ClassVar


class ClientGone(ConnectionError):
    """The caller's connection closed: nothing more can be read from it or written to it."""


class BodyTimeout(TimeoutError):
    """A request body stopped arriving: no chunk within the per-chunk deadline, or not whole within the
    deadline of `read_all`. The connection is closed after the answer (the rest of the body is never awaited)."""


class NotAdmitted(Exception):
    """The caller's admission check (`admit`) said no right before the request would have been written: nothing
    was sent, and the connection, if one was taken or made for it, went back to the pool unused."""


class UpstreamError(Exception):
    """The upstream (or PDP) exchange failed; `kind` is the metric label."""

    kind: ClassVar[str] = "reset"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConnectFailed(UpstreamError):
    """No connection: refused, unreachable, unresolvable, or the TLS handshake failed. Nothing was sent.
    `error`: the system's error, when there was one (carried here: compiled code drops `raise ... from`)."""

    kind = "connect"

    def __init__(self, detail: str, error: OSError | None = None) -> None:
        super().__init__(detail)
        self.error = error


class UpstreamTimeout(UpstreamError):
    """A wait ran out: for a connection, for a free slot in the pool, for the answer or a chunk of it, or for
    the upstream to take more of the request body."""

    kind = "timeout"


class ConnectTimeout(UpstreamTimeout):
    """Connecting (TCP and TLS) took longer than the connect timeout. Nothing was sent."""


class PoolTimeout(UpstreamTimeout):
    """Every connection to the origin was busy for longer than the caller could wait. Nothing was sent."""


class UpstreamReset(UpstreamError):
    """The connection broke after the exchange began: the request may have been delivered, so it is never
    sent again."""


class BadResponse(UpstreamReset):
    """The answer broke HTTP/1.1 (the core's ProtocolError): it is not relayed, and the connection is closed."""


class ResponseTooLarge(BadResponse):
    """The answer's body is over the caller's limit (known at the head for a Content-Length)."""
