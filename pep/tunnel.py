"""CONNECT tunnels: after an `Allow` for `CONNECT host:port`, bytes are spliced both ways, never inspected.

The PEP decides once per tunnel, on host:port; what flows through it (TLS, usually) is not looked at. The tunnel
goes to the host:port bound into the `Allow` (the route's upstream), closes as a whole when either side closes,
and closes when nothing moved either way for the route's `timeout_ms` (pep/transport/tunnel.py moves the bytes),
or when a reload takes its route away (`Tunnels.revoke`): it was decided under a route that is no longer there.
"""

from __future__ import annotations

import asyncio

from pep import transport
from pep.authority import resolve_authority
from pep.config import RouteConfig
from pep.decision import Allow
from pep.responses import upstream_failure
from pep.routing import Route, RouteTable
from pep.transport import Exchange, UpstreamError


class Tunnels:
    """The tunnels open on one listener (the task that moves each one's bytes, and the route it was decided
    under), and the routes in force: a reload closes the tunnels whose route it takes away (`revoke`)."""

    __slots__ = ("_open", "_routes")

    def __init__(self, routes: RouteTable) -> None:
        self._routes = routes
        self._open: dict[asyncio.Task[None], RouteConfig] = {}

    def _kept(self, config: RouteConfig) -> bool:
        return any(r.config == config for r in self._routes.routes if r.config.tunnel)

    def add(self, task: asyncio.Task[None], config: RouteConfig) -> None:
        """A tunnel opens; one whose route went away while it connected is closed at once."""
        self._open[task] = config
        if not self._kept(config):
            task.cancel()

    def remove(self, task: asyncio.Task[None]) -> None:
        self._open.pop(task, None)

    def revoke(self, routes: RouteTable) -> int:
        """`routes` are now in force: close the open tunnels whose route they no longer have exactly as it was
        (removed, no longer a tunnel, or changed). How many were closed."""
        self._routes = routes
        revoked = [task for task, config in self._open.items() if not self._kept(config)]
        for task in revoked:
            task.cancel()
        return len(revoked)


async def splice(exchange: Exchange, allow: Allow, route: Route, tunnels: Tunnels | None = None) -> int:
    """Open the tunnel the `Allow` names, answer 200, and move bytes until it ends; the status answered. While it
    is open it is in `tunnels`.

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
    moving = asyncio.ensure_future(transport.splice(client, upstream, timeout))
    if tunnels is not None:
        tunnels.add(moving, route.config)
    try:
        await moving  # cancelling this request cancels `moving` too (both sides aborted)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is None or current.cancelling():
            raise
        # `moving` alone was cancelled: a reload closed the tunnel; the request ends here.
    finally:
        if tunnels is not None:
            tunnels.remove(moving)
        # Closed already unless `moving` was cancelled before it ran (a reload while the tunnel connected).
        client.close(abort=True)
        upstream.close(abort=True)
    return 200
