"""An OpenAI-compatible model API on loopback for the SDK tests: answers like the real one and records every request.

- `POST /v1/chat/completions`: a `chat.completion` object, or with `"stream": true` an SSE stream of
  `chat.completion.chunk` events (a role chunk, one chunk per word of the reply, a finish chunk, a usage chunk when
  `stream_options.include_usage` is set) ending with `data: [DONE]`; `gap_ms` between chunks (default 20);
- `POST /v1/embeddings`: one 3-float vector per input string;
- `POST /v1/responses`: a minimal completed `response` object;
- anything else under `/v1/`: a JSON echo of method and path (for plain HTTP clients);
- `GET /v1/models`: the model list;
- `POST /openai/deployments/{name}/chat/completions` (Azure OpenAI's form): a chat completion by deployment `name`.

With `calls` set, chat completions and responses answer by calling those tools: one choice with every call, or
with `n` > 1 one call per choice; streamed as the real API streams them (a delta naming each call, then its
arguments; Responses `response.output_item.added` events with `function_call` items). With `answer_model` set,
every answer names that model instead of the one asked for.
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
    calls: list[str] = field(default_factory=list)
    answer_model: str | None = None

    @property
    def url(self) -> str:
        """The API base, as an OpenAI client's `base_url`."""
        return f"http://127.0.0.1:{self.port}/v1"

    def for_model(self, model: str) -> list[ModelRequest]:
        return [r for r in self.seen if r.model == model]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/v1/{rest:.*}", self._echo)
        await self.serve(web.AppRunner(app, access_log=None))

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = {"raw_bytes": len(raw)}  # a form or a file upload
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append(ModelRequest(request.method, request.raw_path, headers, body))
        return body

    def _tool_call(self, name: str, i: int) -> dict[str, Any]:
        return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": '{"q": "refund"}'}}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = self.answer_model or request.match_info.get("deployment") or body["model"]
        created = int(time.time())
        if self.calls and not body.get("stream"):
            n = body.get("n", 1)
            groups = [self.calls] if n == 1 else [[c] for c in self.calls[:n]]
            choices = [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "refusal": None,
                        "tool_calls": [self._tool_call(name, i * 10 + j) for j, name in enumerate(group)],
                    },
                    "finish_reason": "tool_calls",
                    "logprobs": None,
                }
                for i, group in enumerate(groups)
            ]
            return web.json_response(
                {
                    "id": "chatcmpl-t",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": choices,
                }
            )
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
        if self.calls:
            for i, name in enumerate(self.calls):
                first = {"index": i, "id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": ""}}
                events.append(chunk({"tool_calls": [first]}))
                events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": '{"q": "refund"}'}}]}))
            events.append(chunk({}, "tool_calls"))
        else:
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

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        output: list[dict[str, Any]] = [
            {
                "type": "function_call",
                "id": f"fc_{i}",
                "call_id": f"call_{i}",
                "name": name,
                "arguments": '{"q": "refund"}',
                "status": "completed",
            }
            for i, name in enumerate(self.calls)
        ]
        if not self.calls:
            text = {"type": "output_text", "text": REPLY, "annotations": []}
            output.append(
                {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": [text]}
            )
        response = {
            "id": "resp_test_1",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": self.answer_model or body["model"],
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {"input_tokens": 9, "output_tokens": 5, "total_tokens": 14},
        }
        if not body.get("stream"):
            return web.json_response(response)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": {**response, "status": "in_progress", "output": []}}
        ]
        for i, item in enumerate(output):
            events.append({"type": "response.output_item.added", "output_index": i, "item": item})
            events.append({"type": "response.output_item.done", "output_index": i, "item": item})
        events.append({"type": "response.completed", "response": response})
        for n, event in enumerate(events):
            await resp.write(
                f"event: {event['type']}\n".encode()
                + b"data: "
                + orjson.dumps({**event, "sequence_number": n})
                + b"\n\n"
            )
            await asyncio.sleep(self.gap_ms / 1000)
        await resp.write_eof()
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        models = [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in ("gpt-test-allowed",)]
        return web.json_response({"object": "list", "data": models})

    async def _echo(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"method": request.method, "path": request.raw_path})
