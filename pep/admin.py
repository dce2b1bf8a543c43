"""The admin listener: liveness, readiness and metrics, never served on the agent-facing port."""

from __future__ import annotations

from collections.abc import Callable

import orjson
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from pep.breaker import State
from pep.metrics import Metrics


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
