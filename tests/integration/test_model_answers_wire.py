"""Model answers the PEP cannot read, or that call a denied tool however they are labelled, never reach the agent
(raw answers from a canned upstream on loopback, a plain httpx client, the embedded Cedar PDP)."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import PepStarter
from tests.support.loopback import LoopbackServer
from tests.support.sdk_stack import AGENT, ALLOWED_MODEL, PdpUnderTest, pep_config

SHELL_CALL = orjson.dumps(
    {
        "model": ALLOWED_MODEL,
        "choices": [{"index": 0, "message": {"tool_calls": [{"type": "function", "function": {"name": "shell"}}]}}],
    }
)


def event(value: Any) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


def delta(name: str, index: int = 0) -> bytes:
    call = {"index": index, "type": "function", "function": {"name": name, "arguments": ""}}
    return event({"model": ALLOWED_MODEL, "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})


@dataclass
class CannedUpstream(LoopbackServer):
    """Answers every POST with the next canned (status, headers, body)."""

    answers: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    served: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{rest:.*}", self._answer)
        await self.serve(web.AppRunner(app, access_log=None))

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        status, headers, body = self.answers[self.served]
        self.served += 1
        return web.Response(status=status, headers=headers, body=body)


@pytest.fixture
async def canned() -> AsyncIterator[CannedUpstream]:
    upstream = CannedUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


JSON = {"Content-Type": "application/json"}
SSE = {"Content-Type": "text/event-stream"}


@pytest.mark.parametrize(
    ("headers", "body", "status", "kind"),
    [
        (JSON, b'{"model": "gpt-test-allowed", "choices": [', 502, "unreadable"),
        (JSON, b'{"model":"gpt-test-allowed","model":"x"}', 502, "unreadable"),
        ({**JSON, "Content-Encoding": "gzip"}, gzip.compress(SHELL_CALL), 502, "unreadable"),
        ({"Content-Type": "application/json; charset=iso-8859-1"}, SHELL_CALL, 502, "unreadable"),
        # A Go agent's client (encoding/json) binds `Function` as `function`: the PEP would have found no call.
        (JSON, SHELL_CALL.replace(b'"function":{', b'"Function":{'), 502, "unreadable"),
        # The openai SDK parses any body it expects JSON from: a label does not make a tool call harmless.
        ({"Content-Type": "text/plain"}, SHELL_CALL, 403, None),
        ({}, SHELL_CALL, 403, None),
    ],
)
async def test_json_answers_that_cannot_be_read_or_call_a_denied_tool(
    canned: CannedUpstream, tmp_path: Path, headers: dict[str, str], body: bytes, status: int, kind: str | None
) -> None:
    canned.answers = [(200, headers, body)]
    pdp = await PdpUnderTest.start("cedar", tmp_path)
    starter = PepStarter(tmp_path, lambda log: pep_config(pdp.config, log, models_upstream=canned.url), "a.yaml")
    try:
        pep = await starter()
        async with httpx.AsyncClient(base_url=pep.url, headers={"x-agent-id": AGENT}, timeout=10) as http:
            got = await http.post("/v1/chat/completions", json={"model": ALLOWED_MODEL, "messages": []})
        assert got.status_code == status
        assert got.headers.get("x-pep-upstream-error") == kind
        assert b"shell" not in got.content
        assert canned.served == 1
    finally:
        await starter.close()


async def test_error_answers_pass_and_streams_stop_at_what_cannot_be_read(
    canned: CannedUpstream, tmp_path: Path
) -> None:
    canned.answers = [
        (400, JSON, b'{"error": {"message": "bad request", "type": "invalid_request_error"}}'),
        (200, SSE, delta("search") + b"data: {broken\n\n" + delta("shell") + b"data: [DONE]\n\n"),
        (200, SSE, delta("search") + delta("shell", 1)),
    ]
    pdp = await PdpUnderTest.start("cedar", tmp_path)
    starter = PepStarter(tmp_path, lambda log: pep_config(pdp.config, log, models_upstream=canned.url), "a.yaml")
    try:
        pep = await starter()
        body = {"model": ALLOWED_MODEL, "messages": [], "stream": True}
        async with httpx.AsyncClient(base_url=pep.url, headers={"x-agent-id": AGENT}, timeout=10) as http:
            error = await http.post("/v1/chat/completions", json=body)
            assert (error.status_code, error.json()["error"]["message"]) == (400, "bad request")
            for code in ("upstream_unreadable", "policy_denied"):
                got = await http.post("/v1/chat/completions", json=body)
                assert got.status_code == 200
                events = got.content.split(b"\n\n")
                assert events[0] == delta("search").rstrip(b"\n")
                error_event = events[1].split(b"\n")
                assert error_event[0] == b"event: error"
                assert orjson.loads(error_event[1].removeprefix(b"data: "))["error"]["code"] == code
                assert events[2:] == [b""]  # nothing after the error event: no shell, no [DONE]
    finally:
        await starter.close()


# --- a required decision log ----------------------------------------------------------------------------------------


@dataclass
class LogRemovingUpstream(CannedUpstream):
    """Removes the PEP's log directory when the model call arrives (its own line is written by then), before
    answering: the answer's decisions cannot be logged."""

    directory: Path | None = None

    async def _answer(self, request: web.Request) -> web.Response:
        if self.directory is not None:
            shutil.rmtree(self.directory)
            self.directory = None
        return await super()._answer(request)


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_an_answer_allow_reaches_the_agent_only_once_logged(tmp_path: Path, answer: str) -> None:
    """With `required: true` the tools an answer may call are shown to the agent only after the line allowing
    them is written, as the request's own allow is before any byte goes upstream."""
    directory = tmp_path / "logs"
    directory.mkdir()
    search = orjson.dumps(
        {
            "model": ALLOWED_MODEL,
            "choices": [
                {"index": 0, "message": {"tool_calls": [{"type": "function", "function": {"name": "search"}}]}}
            ],
        }
    )
    body = (JSON, search) if answer == "json" else (SSE, delta("search") + b"data: [DONE]\n\n")
    upstream = LogRemovingUpstream(answers=[(200, *body)], directory=directory)
    await upstream.start()
    pdp = await PdpUnderTest.start("cedar", tmp_path)

    def config(log: Path) -> dict[str, Any]:
        raw = pep_config(pdp.config, log, models_upstream=upstream.url)
        raw["decision_log"] = {"sink": "file", "path": str(directory / "audit.jsonl"), "required": True}
        return raw

    starter = PepStarter(tmp_path, config, "a.yaml")
    try:
        pep = await starter()
        request = {"model": ALLOWED_MODEL, "messages": [], "stream": answer == "sse"}
        async with httpx.AsyncClient(base_url=pep.url, headers={"x-agent-id": AGENT}, timeout=10) as http:
            got = await http.post("/v1/chat/completions", json=request)
    finally:
        await starter.close()
        await upstream.stop()
    assert upstream.served == 1  # the call itself was logged, then forwarded; the log went away meanwhile
    assert b"search" not in got.content
    if answer == "json":
        assert (got.status_code, got.json()["error"]["code"]) == (403, "audit_unavailable")
    else:
        (error_event, end) = got.content.split(b"\n\n")
        assert end == b""
        assert error_event.split(b"\n")[0] == b"event: error"
        assert orjson.loads(error_event.split(b"\n")[1].removeprefix(b"data: "))["error"]["code"] == "audit_unavailable"
