"""An OpenAI-compatible model API on loopback for the SDK tests: answers like the real one and records every request.

- `POST /v1/chat/completions`: a `chat.completion` object, or with `"stream": true` an SSE stream of
  `chat.completion.chunk` events (a role chunk, one chunk per word of the reply, a finish chunk, a usage chunk when
  `stream_options.include_usage` is set) ending with `data: [DONE]`; `gap_ms` between chunks (default 20);
- `POST /v1/embeddings`: one 3-float vector per input string;
- `POST /v1/responses`: a minimal completed `response` object;
- anything else under `/v1/`: a JSON echo of method and path (for plain HTTP clients);
- `GET /v1/models`: the model list.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.support.loopback import LoopbackServer

REPLY = "Your refund was issued today"


@dataclass(frozen=True)
class ModelRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, or None

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None


@dataclass
class OpenAiUpstream(LoopbackServer):
    port: int = 0
    gap_ms: int = 20
    seen: list[ModelRequest] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The API base, as an OpenAI client's `base_url`."""
        return f"http://127.0.0.1:{self.port}/v1"

    def for_model(self, model: str) -> list[ModelRequest]:
        return [r for r in self.seen if r.model == model]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/v1/{rest:.*}", self._echo)
        await self.serve(web.AppRunner(app, access_log=None))

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        body = orjson.loads(raw) if raw else None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append(ModelRequest(request.method, request.raw_path, headers, body))
        return body

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = body["model"]
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-test-1",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": REPLY, "refusal": None},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-test-2",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }

        words = REPLY.split(" ")
        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
        events.append(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 9, "completion_tokens": len(words), "total_tokens": 9 + len(words)}
            events.append({**chunk({}), "choices": [], "usage": usage})
        for event in events:
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
            await asyncio.sleep(self.gap_ms / 1000)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            }
        )

    async def _responses(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        return web.json_response(
            {
                "id": "resp_test_1",
                "object": "response",
                "created_at": int(time.time()),
                "status": "completed",
                "model": body["model"],
                "output": [
                    {
                        "type": "message",
                        "id": "msg_test_1",
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": REPLY, "annotations": []}],
                    }
                ],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": {"input_tokens": 9, "output_tokens": 5, "total_tokens": 14},
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        models = [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in ("gpt-test-allowed",)]
        return web.json_response({"object": "list", "data": models})

    async def _echo(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"method": request.method, "path": request.raw_path})
