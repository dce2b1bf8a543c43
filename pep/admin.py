"""The admin listener: liveness, readiness and metrics, never served on the agent-facing port.

It stays on aiohttp (prometheus-client's handler serves /metrics): it is off the request path, and a scrape a
few times a minute costs nothing worth a transport of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from pep.breaker import State
from pep.metrics import Metrics

# Idle keep-alive limit of the admin listener (aiohttp's AppRunner default is 3630 s).
KEEPALIVE_S = 75.0


def bound_address(site: web.TCPSite) -> tuple[str, int]:
    """The address a started site listens on (port 0 in the config means the OS chose it)."""
    sockets = getattr(site._server, "sockets", None) or ()
    if not sockets:
        raise RuntimeError("the listener has no socket")
    host, port = sockets[0].getsockname()[:2]
    return str(host), int(port)


async def serve_admin(app: web.Application, host: str, port: int) -> tuple[web.BaseRunner, tuple[str, int]]:
    """Start `app` on host:port: its runner (to clean up) and the bound address."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        return runner, bound_address(site)
    except BaseException:
        await runner.cleanup()
        raise


def admin_app(
    metrics: Metrics,
    circuit: Callable[[], State],
    shutting_down: Callable[[], bool],
    pdp_never_reached: Callable[[], bool] = lambda: False,
) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    async def readyz(_request: web.Request) -> web.Response:
        reasons = []
        if shutting_down():
            reasons.append("shutting_down")
        if circuit() is State.OPEN:
            reasons.append("circuit_open")
        if pdp_never_reached():  # every request would be denied: not in service until the PDP was reached once
            reasons.append("pdp_unreachable")
        body = orjson.dumps({"ready": not reasons, "reasons": reasons})
        return web.Response(status=503 if reasons else 200, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    return app
