"""The real OpenAI SDK (`openai`, default `max_retries`) through the PEP's `protocol: openai` route, on loopback.

The upstream is an OpenAI-compatible test server (tests/support/openai_upstream.py) that records every request;
the PDPs allow `model.invoke` of gpt-test-allowed only (tests/e2e/policies). A denial is a 403 that the SDK raises
as PermissionDeniedError and never retries: the upstream sees nothing and the PEP decides exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import PepStarter, RunningPep
from tests.support.openai_upstream import REPLY, OpenAiUpstream
from tests.support.sdk_stack import (
    AGENT,
    ALLOWED_MODEL,
    DENIED_MODEL,
    PDP_KINDS,
    PdpUnderTest,
    at_least,
    pep_config,
    settled_log,
)

MESSAGES: list[Any] = [{"role": "user", "content": "Where is my refund?"}]
BOUND_S = 10.0


@pytest.fixture
async def models() -> AsyncIterator[OpenAiUpstream]:
    upstream = OpenAiUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


async def start_pep(tmp_path: Path, pdp: PdpUnderTest, models: OpenAiUpstream) -> tuple[PepStarter, RunningPep]:
    starter = PepStarter(
        tmp_path, lambda log: pep_config(pdp.config, log, models_upstream=models.url), "openai-sdk-test.yaml"
    )
    return starter, await starter()


def sync_client(base_url: str) -> openai.OpenAI:
    """The synchronous SDK with its default retries (2); used from a worker thread, the servers run on the loop."""
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", default_headers={"x-agent-id": AGENT})
    assert client.max_retries == openai.DEFAULT_MAX_RETRIES > 0
    return client


def chat(client: openai.OpenAI, model: str) -> str | None:
    completion = client.chat.completions.create(model=model, messages=MESSAGES)
    return completion.choices[0].message.content


def chat_stream(client: openai.OpenAI, model: str) -> list[tuple[float, str | None]]:
    """Each chunk with the time it arrived; the iterator ends at `data: [DONE]`."""
    started = time.monotonic()
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    with stream:
        return [
            (time.monotonic() - started, chunk.choices[0].delta.content if chunk.choices else "<usage>")
            for chunk in stream
        ]


def model_decisions(entries: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["method"], e["decision"], e["reason"]) for e in entries if e["route"] == "models"]


async def test_sdk_against_the_upstream_directly(models: OpenAiUpstream) -> None:
    client = sync_client(models.url)
    async with asyncio.timeout(BOUND_S):
        assert await asyncio.to_thread(chat, client, ALLOWED_MODEL) == REPLY
        chunks = await asyncio.to_thread(chat_stream, client, DENIED_MODEL)  # no policy without the PEP
    assert "".join(text or "" for _, text in chunks if text != "<usage>") == REPLY
    assert chunks[-1][1] == "<usage>"
    assert [r.model for r in models.seen] == [ALLOWED_MODEL, DENIED_MODEL]


@pytest.mark.parametrize("kind", PDP_KINDS)
async def test_sdk_through_pep(
    kind: str, request: pytest.FixtureRequest, models: OpenAiUpstream, tmp_path: Path
) -> None:
    binary = request.getfixturevalue("cerbos_binary") if kind == "cerbos" else None
    pdp = await PdpUnderTest.start(kind, tmp_path, binary)
    starter, pep = await start_pep(tmp_path, pdp, models)
    try:
        client = sync_client(f"{pep.url}/v1")
        async with asyncio.timeout(BOUND_S):
            assert await asyncio.to_thread(chat, client, ALLOWED_MODEL) == REPLY

            chunks = await asyncio.to_thread(chat_stream, client, ALLOWED_MODEL)
            texts = [text for _, text in chunks]
            assert "".join(t or "" for t in texts if t != "<usage>") == REPLY
            assert texts[-1] == "<usage>"  # the last chunk before [DONE] made it through
            # Passed through as it was produced, not buffered: the chunks arrive spread over the upstream's gaps.
            assert chunks[-1][0] - chunks[0][0] >= 0.5 * models.gap_ms / 1000 * (len(chunks) - 1)

            started = time.monotonic()
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await asyncio.to_thread(chat, client, DENIED_MODEL)
            assert time.monotonic() - started < 2.0  # no retries with backoff
            with pytest.raises(openai.PermissionDeniedError):
                await asyncio.to_thread(chat_stream, client, DENIED_MODEL)
        error = caught.value
        assert error.status_code == 403
        assert error.code == "policy_denied"
        assert error.type == "permission_denied"
        assert error.response.headers["x-should-retry"] == "false"

        # The upstream never saw the denied model, and each denied call was decided exactly once (no SDK retry).
        assert models.for_model(DENIED_MODEL) == []
        assert [(r.model, r.body.get("stream", False)) for r in models.seen] == [
            (ALLOWED_MODEL, False),
            (ALLOWED_MODEL, True),
        ]
        assert model_decisions(await settled_log(pep, at_least(4))) == [
            ("POST", "allow", "allowed"),
            ("POST", "allow", "allowed"),
            ("POST", "deny", "policy_denied"),
            ("POST", "deny", "policy_denied"),
        ]
    finally:
        await starter.close()
        await pdp.stop()


async def test_async_sdk_embeddings_and_responses(models: OpenAiUpstream, tmp_path: Path) -> None:
    pdp = await PdpUnderTest.start("cedar", tmp_path)
    starter, pep = await start_pep(tmp_path, pdp, models)
    try:
        client = openai.AsyncOpenAI(base_url=f"{pep.url}/v1", api_key="sk-test", default_headers={"x-agent-id": AGENT})
        async with asyncio.timeout(BOUND_S):
            embedded = await client.embeddings.create(model=ALLOWED_MODEL, input=["refund", "order"])
            assert [e.embedding for e in embedded.data] == [[0.1, 0.2, 0.3]] * 2
            response = await client.responses.create(model=ALLOWED_MODEL, input="Where is my refund?")
            assert response.output_text == REPLY
            with pytest.raises(openai.PermissionDeniedError):
                await client.embeddings.create(model=DENIED_MODEL, input="x")
            with pytest.raises(openai.PermissionDeniedError):
                await client.responses.create(model=DENIED_MODEL, input="x")
            await client.close()
        assert [(r.path, r.model) for r in models.seen] == [
            ("/v1/embeddings", ALLOWED_MODEL),
            ("/v1/responses", ALLOWED_MODEL),
        ]
    finally:
        await starter.close()


@pytest.mark.parametrize("kind", ["opa", "cerbos"])
async def test_sdk_pdp_down(kind: str, request: pytest.FixtureRequest, models: OpenAiUpstream, tmp_path: Path) -> None:
    """The PDP is gone: the SDK gets PermissionDeniedError at once, does not retry, and nothing is forwarded."""
    binary = request.getfixturevalue("cerbos_binary") if kind == "cerbos" else None
    pdp = await PdpUnderTest.start(kind, tmp_path, binary)
    starter, pep = await start_pep(tmp_path, pdp, models)
    try:
        await pdp.down()
        client = sync_client(f"{pep.url}/v1")
        started = time.monotonic()
        async with asyncio.timeout(BOUND_S):
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await asyncio.to_thread(chat, client, ALLOWED_MODEL)
            with pytest.raises(openai.PermissionDeniedError):
                await asyncio.to_thread(chat_stream, client, ALLOWED_MODEL)
        assert time.monotonic() - started < 3.0
        assert caught.value.code == "pdp_unreachable"
        assert models.seen == []
        assert model_decisions(await settled_log(pep, at_least(2))) == [("POST", "deny", "pdp_unreachable")] * 2
    finally:
        await starter.close()
        await pdp.stop()


async def test_plain_httpx_through_pep(models: OpenAiUpstream, tmp_path: Path) -> None:
    """A plain HTTP client on the model route: the same decisions, and OpenAI's error shape on a denial."""
    pdp = await PdpUnderTest.start("cedar", tmp_path)
    starter, pep = await start_pep(tmp_path, pdp, models)
    try:
        async with httpx.AsyncClient(base_url=pep.url, headers={"x-agent-id": AGENT}, timeout=BOUND_S) as http:
            allowed = await http.post("/v1/chat/completions", json={"model": ALLOWED_MODEL, "messages": MESSAGES})
            assert allowed.status_code == 200
            assert allowed.json()["choices"][0]["message"]["content"] == REPLY
            assert allowed.headers.get("x-pep-decision") != "deny"

            denied = await http.post("/v1/chat/completions", json={"model": DENIED_MODEL, "messages": MESSAGES})
            assert denied.status_code == 403
            assert denied.headers["x-should-retry"] == "false"
            assert denied.headers["x-pep-reason"] == "policy_denied"
            error = denied.json()["error"]
            assert (error["type"], error["code"], error["param"]) == ("permission_denied", "policy_denied", None)

            # Not a model call: decided on its HTTP facts (GET on route `models`), which no test policy allows.
            listing = await http.get("/v1/models")
            assert listing.status_code == 403
            assert listing.headers["x-pep-reason"] == "policy_denied"
        assert [(r.method, r.path, r.model) for r in models.seen] == [("POST", "/v1/chat/completions", ALLOWED_MODEL)]
    finally:
        await starter.close()
