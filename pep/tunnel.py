"""CONNECT tunnels: after an `Allow` for `CONNECT host:port`, bytes are spliced both ways, never inspected.

The PEP decides once per tunnel, on host:port; what flows through it (TLS, usually) is not looked at. The tunnel
goes to the host:port bound into the `Allow` (the route's upstream), closes as a whole when either side closes,
and closes when nothing moved either way for the route's `timeout_ms` (pep/transport/tunnel.py moves the bytes).
"""

from __future__ import annotations

from pep import transport
from pep.authority import resolve_authority
from pep.decision import Allow
from pep.responses import upstream_failure
from pep.routing import Route
from pep.transport import Exchange, UpstreamError


async def splice(exchange: Exchange, allow: Allow, route: Route) -> int:
    """Open the tunnel the `Allow` names, answer 200, and move bytes until it ends; the status answered.

    Bytes the client sent after its CONNECT head were held by the listener (never forwarded undecided); they go
    first once the tunnel is open."""
    target = resolve_authority(allow.upstream_url, None)
    if allow.method != "CONNECT" or target is None:  # an Allow for something else is never a tunnel
        raise ValueError("not an allowed tunnel")
    timeout = route.config.timeout_ms / 1000
    try:
        upstream = await transport.connect(target[0], target[1], timeout)
    except UpstreamError:
        reply = upstream_failure("connect", allow.request_id, allow.decision_id)
        response = exchange.response
        response.close_after()
        response.send(reply.status, reply.fields(), reply.body)
        return reply.status
    try:
        client = exchange.switch()
    except BaseException:
        upstream.close(abort=True)
        raise
    await transport.splice(client, upstream, timeout)
    return 200
