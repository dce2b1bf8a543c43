"""A small OpenID AuthZEN 1.0 PDP on a real loopback socket, scriptable to misbehave the ways real servers can.

It serves the metadata document at the RFC 8615 well-known URL of its base (`/.well-known/authzen-configuration`
plus the base path), single evaluations and batches. Everything it receives is recorded with headers and bodies.
Knobs, all changeable between requests:
- `metadata`: the document (None: a correct one for `url`), or `metadata_body` as raw bytes; `metadata_status`,
  `cache_control`, `drop_discovery`, `discovery_delay`;
  `batch_endpoint`: False leaves `access_evaluations_endpoint` out of the default document.
- `decide(request) -> decision object` for single evaluations and for each batch item (default: allow);
  `batch_answer(items) -> body` replaces the whole batch answer; `evaluation_status`; `drop_evaluations`.
- `echo`: "same" (echo X-Request-ID), "none" (like Cerbos) or "wrong".
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from tests.support.loopback import LoopbackServer

WELL_KNOWN = "/.well-known/authzen-configuration"
EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"

Decide = Callable[[dict[str, Any]], Any]


def allow_all(_request: dict[str, Any]) -> Any:
    return {"decision": True}


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    raw: bytes
    body: Any  # the parsed JSON, or None


@dataclass
class AuthzenTestPdp(LoopbackServer):
    base_path: str = ""  # e.g. "/tenant1": the PDP's base URL has a path
    port: int = 0
    metadata: dict[str, Any] | None = None
    metadata_body: bytes | None = None  # raw bytes instead of the document (not JSON, not an object...)
    metadata_status: int = 200
    cache_control: str | None = None
    drop_discovery: bool = False
    discovery_delay: float = 0.0  # seconds before the metadata answer
    batch_endpoint: bool = True
    decide: Decide = allow_all
    batch_answer: Callable[[list[dict[str, Any]]], Any] | None = None
    evaluation_status: int = 200
    drop_evaluations: bool = False
    echo: str = "same"  # same | none | wrong
    seen: list[Seen] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The base URL the PEP is configured with (`pdp.url`)."""
        return self.origin + self.base_path

    def default_metadata(self) -> dict[str, Any]:
        doc = {
            "policy_decision_point": self.url,
            "access_evaluation_endpoint": self.url + EVALUATION,
            "search_resource_endpoint": self.url + "/access/v1/search/resource",
            "capabilities": [],
            "x-unknown-field": {"ignored": True},
        }
        if self.batch_endpoint:
            doc["access_evaluations_endpoint"] = self.url + EVALUATIONS
        return doc

    @property
    def discoveries(self) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith(WELL_KNOWN)]

    @property
    def evaluations(self) -> list[Seen]:
        return [s for s in self.seen if s.path == self.base_path + EVALUATION]

    @property
    def batches(self) -> list[Seen]:
        return [s for s in self.seen if s.path == self.base_path + EVALUATIONS]

    async def start(self) -> None:
        server = web.Server(self._handle, access_log=None)
        await self.serve(web.ServerRunner(server))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), raw, body))
        path = request.rel_url.path
        if request.method == "GET" and path == WELL_KNOWN + self.base_path:
            return await self._discovery(request)
        if request.method == "POST" and path == self.base_path + EVALUATION:
            return self._evaluate(request, body, single=True)
        if request.method == "POST" and path == self.base_path + EVALUATIONS:
            return self._evaluate(request, body, single=False)
        return web.Response(status=404, text="not found")

    async def _discovery(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.discovery_delay:
            await asyncio.sleep(self.discovery_delay)
        if self.drop_discovery:
            return _drop(request)
        doc = self.metadata if self.metadata is not None else self.default_metadata()
        body = self.metadata_body if self.metadata_body is not None else orjson.dumps(doc)
        headers = {"Cache-Control": self.cache_control} if self.cache_control is not None else {}
        return web.Response(status=self.metadata_status, body=body, content_type="application/json", headers=headers)

    def _evaluate(self, request: web.BaseRequest, body: Any, *, single: bool) -> web.StreamResponse:
        if self.drop_evaluations:
            return _drop(request)
        if single:
            answer = self.decide(body)
        elif self.batch_answer is not None:
            answer = self.batch_answer(body["evaluations"])
        else:
            answer = {"evaluations": [self.decide(item) for item in body["evaluations"]]}
        headers: dict[str, str] = {}
        sent = request.headers.get("X-Request-ID")
        if self.echo == "same" and sent is not None:
            headers["X-Request-ID"] = sent
        elif self.echo == "wrong":
            headers["X-Request-ID"] = "not-" + (sent or "anything")
        return web.Response(
            status=self.evaluation_status, body=orjson.dumps(answer), content_type="application/json", headers=headers
        )


def _drop(request: web.BaseRequest) -> web.StreamResponse:
    """The request was read (and recorded); the connection is reset before any byte of a response."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=599)  # never sent: the transport is gone
