"""An OPA-shaped test PDP whose answer is a Python policy: subclass and override `decide`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.loopback import LoopbackServer


@dataclass
class PolicyPdp(LoopbackServer):
    """Answers `{"result": decide(input)}` at OPA's data path, keeping every input document."""

    inputs: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/data/pep/authz"

    def decide(self, doc: dict[str, Any]) -> Any:
        return True

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/data/pep/authz", self._answer)
        await self.serve(web.AppRunner(app, access_log=None))

    async def _answer(self, request: web.Request) -> web.Response:
        doc = (await request.json())["input"]
        self.inputs.append(doc)
        return web.json_response({"result": self.decide(doc)})
