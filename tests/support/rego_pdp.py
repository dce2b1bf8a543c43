"""An OPA-shaped PDP whose Rego is evaluated for real, by regorus, on a loopback socket.

It serves OPA's REST Data API for `POST /v1/data/<path>`: `{"input": DOC}` in, `{"result": <data.<path>>}` out, or
`{}` when the document is undefined, and OPA's error body with 400 for a body that is not a JSON object. So the
policies under config/policies/rego/ can be tested through the PEP's own OPA client without an `opa` binary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import regorus
from aiohttp import web

from tests.support.loopback import LoopbackServer

REGO_DIR = Path(__file__).resolve().parents[2] / "config" / "policies" / "rego"
_DATA_PREFIX = "/v1/data/"


def opa_error(code: str, message: str) -> bytes:
    return orjson.dumps({"code": code, "message": message})


def _first_line(exc: Exception) -> str:
    """regorus errors carry a Rust backtrace after the message; OPA's bodies carry only the message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class RegoPdp(LoopbackServer):
    """Serves the `.rego` files under `policy_dir` on 127.0.0.1:`port` (0: a free port, known after start)."""

    policy_dir: Path = REGO_DIR
    port: int = 0
    inputs: list[Any] = field(default_factory=list)  # every input document evaluated, in order
    _engine: Any = None  # regorus.Engine with the policies loaded; cloned per request (it holds the input)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The data path of the `pep.authz` package, as `pdp.url` for `kind: opa`."""
        return f"{self.base_url}/v1/data/pep/authz"

    def load(self) -> None:
        """Parse every policy file once. A syntax error raises here, so a broken policy fails the test loudly."""
        engine = regorus.Engine()
        files = sorted(self.policy_dir.glob("*.rego"))
        if not files:
            raise FileNotFoundError(f"no .rego files in {self.policy_dir}")
        for path in files:
            engine.add_policy(path.name, path.read_text(encoding="utf-8"))
        self._engine = engine

    def evaluate(self, query: str, input_json: str | None) -> Any:
        """The value of `query` (e.g. `data.pep.authz`) for one input, or None when it is undefined."""
        engine = self._engine.clone()
        if input_json is not None:
            engine.set_input_json(input_json)
        # The JSON form turns Rego sets into arrays, as OPA does on the wire.
        answer = orjson.loads(engine.eval_query_as_json(query))
        results = answer.get("result") or []
        if not results:
            return None
        return results[0]["expressions"][0]["value"]

    async def start(self) -> None:
        if self._engine is None:
            self.load()
        app = web.Application()
        app.router.add_post("/v1/data", self._handle)
        app.router.add_post("/v1/data/{path:.*}", self._handle)
        await self.serve(web.AppRunner(app, access_log=None))

    async def stop(self) -> None:
        await super().stop()
        # A regorus engine must be freed on the thread that made it; left in the app's reference cycle, the
        # cyclic GC would free it later on whatever thread runs it (an SDK's worker thread) and raise there.
        self._engine = None

    async def _handle(self, request: web.Request) -> web.Response:
        parts = [p for p in request.path[len(_DATA_PREFIX) :].split("/") if p]
        query = ".".join(["data", *parts])
        raw = await request.read()
        input_json: str | None = None
        if raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                return self._json(400, opa_error("invalid_parameter", f"body contains malformed input document: {exc}"))
            if not isinstance(body, dict):
                return self._json(400, opa_error("invalid_parameter", "body contains malformed input document"))
            if "input" in body:
                self.inputs.append(body["input"])
                input_json = orjson.dumps(body["input"]).decode()
        try:
            value = self.evaluate(query, input_json)
        except Exception as exc:  # regorus raises RuntimeError; any failure is a 500, as in OPA
            # OPA answers 500 for evaluation errors such as conflicting values of a complete rule.
            return self._json(500, opa_error("internal_error", _first_line(exc)))
        if value is None:
            return self._json(200, b"{}")
        return self._json(200, orjson.dumps({"result": value}))

    @staticmethod
    def _json(status: int, body: bytes) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")
