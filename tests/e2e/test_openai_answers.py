"""Model APIs decide the model the upstream will run and what its answer does (issue 14, item 4), with the
official openai SDK as the agent, through the PEP, against the recording test upstream and Express.

- Azure's `deployments/{name}` path names the model the upstream serves: that name is decided, and a body naming
  another one is refused.
- Express routes `/v1/Chat/Completions` as a chat completion: so does the PEP (any letter case).
- Endpoints that name a model the PEP does not read as JSON (multipart images and audio) are read; endpoints where
  it cannot see the model (batches, files) are decided as such and denied unless allowed by name.
- Answers: tool calls (JSON with n > 1, streamed chunks, Responses items and stream events) for tools the policy
  denies never reach the agent, and neither does an answer from a model the policy never approved.

The policies are the shipped ones plus tests/e2e/policies: models allow gpt-test-allowed only, answer tool calls
follow the shipped tool rules (search and lookup_order yes, shell no). `permissive` adds a rule that allows any
plain POST on the `models` route, as an operator allowing its non-model endpoints might: without the PEP reading
those requests as model calls, they would pass on that rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.conftest import PepStarter, RunningPep
from tests.support.openai_upstream import REPLY, OpenAiUpstream
from tests.support.sdk_stack import AGENT, ALLOWED_MODEL, DENIED_MODEL, PDP_KINDS, PdpUnderTest, pep_config, settled_log

MESSAGES: list[Any] = [{"role": "user", "content": "Where is my refund?"}]
BOUND_S = 10.0
EXPRESS = Path(__file__).resolve().parents[1] / "support" / "readers"
PERMISSIVE = 'permit (principal, action == Action::"POST", resource == Route::"models");\n'


@pytest.fixture
async def models() -> AsyncIterator[OpenAiUpstream]:
    upstream = OpenAiUpstream(gap_ms=5)
    await upstream.start()
    yield upstream
    await upstream.stop()


async def start(
    tmp_path: Path, models_url: str, kind: str = "cedar", binary: Path | None = None, permissive: bool = False
) -> tuple[PepStarter, RunningPep, PdpUnderTest]:
    """A PEP with the `models` route (/v1) and an `azure` route (/openai), both protocol openai."""
    pdp = await PdpUnderTest.start(kind, tmp_path, binary)
    if permissive:
        assert kind == "cedar"
        (Path(pdp.config["policies"]) / "zz_permissive.cedar").write_text(PERMISSIVE)
    base = models_url.removesuffix("/v1")

    def build(log: Path) -> dict[str, Any]:
        config = pep_config(pdp.config, log, models_upstream=models_url)
        config["routes"].append(
            {
                "name": "azure",
                "match": {"path_prefix": "/openai"},
                "upstream": f"{base}/openai",
                "strip_prefix": True,
                "protocol": "openai",
            }
        )
        return config

    starter = PepStarter(tmp_path, build, "openai-answers.yaml")
    return starter, await starter(), pdp


def client(pep: RunningPep) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pep.url}/v1", api_key="sk-test", default_headers={"x-agent-id": AGENT})


def azure(pep: RunningPep, deployment: str | None) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=pep.url,
        azure_deployment=deployment,
        api_version="2024-10-21",
        api_key="sk-test",
        default_headers={"x-agent-id": AGENT},
    )


def answer_entries(entries: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
    return [e["answer"] for e in entries if "answer" in e]


# --- the request: which model will run ---------------------------------------------------------------------------


async def test_azure_deployment_is_the_decided_model(models: OpenAiUpstream, tmp_path: Path) -> None:
    """AzureOpenAI with `azure_deployment` sends the deployment in the path and any `model` in the body: the
    upstream serves the deployment, so that is what is decided."""
    starter, pep, _ = await start(tmp_path, models.url)
    try:
        async with asyncio.timeout(BOUND_S):
            denied = azure(pep, DENIED_MODEL)
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await asyncio.to_thread(denied.chat.completions.create, model=ALLOWED_MODEL, messages=MESSAGES)
            assert caught.value.code == "request_ambiguous"
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await asyncio.to_thread(denied.chat.completions.create, model=DENIED_MODEL, messages=MESSAGES)
            assert caught.value.code == "policy_denied"
            # Without azure_deployment the SDK puts the body's model in the path: decided as usual.
            plain = azure(pep, None)
            with pytest.raises(openai.PermissionDeniedError):
                await asyncio.to_thread(plain.chat.completions.create, model=DENIED_MODEL, messages=MESSAGES)
            models.answer_model = f"{ALLOWED_MODEL}-2024-08-06"  # a dated version of the deployment's model
            done = await asyncio.to_thread(plain.chat.completions.create, model=ALLOWED_MODEL, messages=MESSAGES)
            assert done.choices[0].message.content == REPLY
            allowed = azure(pep, ALLOWED_MODEL)
            done = await asyncio.to_thread(allowed.chat.completions.create, model=ALLOWED_MODEL, messages=MESSAGES)
            assert done.model == f"{ALLOWED_MODEL}-2024-08-06"
        assert [r.path.split("?")[0] for r in models.seen] == [
            f"/openai/deployments/{ALLOWED_MODEL}/chat/completions"
        ] * 2
        assert all(DENIED_MODEL not in r.path for r in models.seen)
    finally:
        await starter.close()


@contextlib.contextmanager
def express_upstream() -> Iterator[str]:
    """The Express server of tests/support/readers/openai_express.js (Express installed by `make express`), on a free
    loopback port."""
    node = shutil.which("node")
    assert node is not None, "node is required (make express installs the Express upstream)"
    assert (EXPRESS / "node_modules" / "express").is_dir(), "run `make express` first"
    process = subprocess.Popen([node, str(EXPRESS / "openai_express.js")], stdout=subprocess.PIPE, env=dict(os.environ))
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("listening "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_model_endpoints_in_any_letter_case(tmp_path: Path) -> None:
    """Express serves POST /v1/Chat/Completions as a chat completion: the PEP decides it as one."""
    with express_upstream() as base:
        starter, pep, _ = await start(tmp_path, f"{base}/v1", permissive=True)
        try:
            sdk = client(pep)
            async with asyncio.timeout(BOUND_S):
                done = await asyncio.to_thread(
                    sdk.post,
                    "/Chat/Completions",
                    body={"model": ALLOWED_MODEL, "messages": MESSAGES},
                    cast_to=ChatCompletion,
                )
                assert done.choices[0].message.content == "served by express"
                # A path parameter is refused before any reading (the route does not set allow_path_parameters).
                paths = {"/Chat/Completions": "policy_denied", "/CHAT/completions/": "policy_denied"}
                paths["/chat;v=1/Completions"] = "request_ambiguous"
                for path, reason in paths.items():
                    with pytest.raises(openai.PermissionDeniedError) as caught:
                        await asyncio.to_thread(
                            sdk.post, path, body={"model": DENIED_MODEL, "messages": MESSAGES}, cast_to=ChatCompletion
                        )
                    assert caught.value.code == reason
                async with httpx.AsyncClient() as http:
                    seen = (await http.get(f"{base}/seen")).json()
            assert [(s["path"], s["model"]) for s in seen] == [("/v1/Chat/Completions", ALLOWED_MODEL)]
        finally:
            await starter.close()


async def test_a_body_in_another_charset_never_reaches_express(tmp_path: Path) -> None:
    """Express's JSON parser decodes a body by its charset. In UTF-7 `+ACI-` is a quote: the body below names the
    allowed model to a UTF-8 reader and the denied one to Express, so it is refused, and so is a second charset."""
    smuggled = f"+ACI-,+ACI-model+ACI-:+ACI-{DENIED_MODEL}"
    body = json.dumps({"model": ALLOWED_MODEL, "messages": MESSAGES, "user": smuggled}).encode()
    with express_upstream() as base:
        starter, pep, _ = await start(tmp_path, f"{base}/v1")
        try:
            async with httpx.AsyncClient(timeout=BOUND_S) as http:
                for content_type in (
                    "application/json; charset=utf-7",
                    "application/json; charset=utf-7; charset=utf-8",
                ):
                    headers = {"Content-Type": content_type, "x-agent-id": AGENT}
                    reply = await http.post(f"{pep.url}/v1/chat/completions", content=body, headers=headers)
                    # Without the refusal, Express runs the denied model (its answer is refused only afterwards).
                    assert (await http.get(f"{base}/seen")).json() == []
                    assert reply.status_code == 403, reply.text
                    assert reply.headers["x-pep-reason"] == "body_unreadable"
                # The same bytes as UTF-8 are the allowed model, to the PEP and to Express alike.
                headers = {"Content-Type": "application/json; charset=utf-8", "x-agent-id": AGENT}
                reply = await http.post(f"{pep.url}/v1/chat/completions", content=body, headers=headers)
                assert reply.status_code == 200, reply.text
                seen = (await http.get(f"{base}/seen")).json()
            assert [s["model"] for s in seen] == [ALLOWED_MODEL]
        finally:
            await starter.close()


async def test_unread_and_multipart_endpoints(models: OpenAiUpstream, tmp_path: Path) -> None:
    """Batches and files cannot show the PEP the model they will run: denied unless allowed by name, even where
    a rule allows plain POSTs on the route. Multipart images and audio are read for their model."""
    starter, pep, _ = await start(tmp_path, models.url, permissive=True)
    try:
        sdk = client(pep)
        async with asyncio.timeout(BOUND_S):
            with pytest.raises(openai.PermissionDeniedError):
                await asyncio.to_thread(
                    sdk.batches.create,
                    completion_window="24h",
                    endpoint="/v1/chat/completions",
                    input_file_id="file-1",
                )
            jsonl = json.dumps({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions"}).encode()
            with pytest.raises(openai.PermissionDeniedError):
                await asyncio.to_thread(sdk.files.create, file=("batch.jsonl", jsonl), purpose="batch")
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await asyncio.to_thread(
                    sdk.images.edit, image=("a.png", b"\x89PNG...."), prompt="x", model=DENIED_MODEL
                )
            assert caught.value.code == "policy_denied"
            with pytest.raises(openai.PermissionDeniedError):
                await asyncio.to_thread(
                    sdk.audio.transcriptions.create, file=("a.wav", b"RIFF...."), model=DENIED_MODEL
                )
            await asyncio.to_thread(sdk.audio.transcriptions.create, file=("a.wav", b"RIFF...."), model=ALLOWED_MODEL)
        assert [r.path for r in models.seen] == ["/v1/audio/transcriptions"]
        entries = await settled_log(pep, lambda e: len(e) >= 5)
        assert [(e["endpoint"], e["reason"]) for e in entries[:2]] == [
            ("batches", "policy_denied"),
            ("files", "policy_denied"),
        ]
    finally:
        await starter.close()


# --- the answer: which tools it calls, which model answered ------------------------------------------------------


@pytest.mark.parametrize("kind", PDP_KINDS)
async def test_answer_tool_calls_are_decided(
    kind: str, request: pytest.FixtureRequest, models: OpenAiUpstream, tmp_path: Path
) -> None:
    """A chat answer with n=2 whose second choice calls `shell`: the agent gets the 403, not the call."""
    binary = request.getfixturevalue("cerbos_binary") if kind == "cerbos" else None
    starter, pep, pdp = await start(tmp_path, models.url, kind, binary)
    try:
        sdk = client(pep)
        async with asyncio.timeout(BOUND_S):
            models.calls = ["search", "lookup_order"]
            done = await asyncio.to_thread(sdk.chat.completions.create, model=ALLOWED_MODEL, messages=MESSAGES, n=2)
            names = [c.message.tool_calls[0].function.name for c in done.choices if c.message.tool_calls]  # type: ignore[union-attr]
            assert names == ["search", "lookup_order"]
            models.calls = ["search", "shell"]
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await asyncio.to_thread(sdk.chat.completions.create, model=ALLOWED_MODEL, messages=MESSAGES, n=2)
            assert caught.value.code == "policy_denied"
            models.calls = ["send_email"]  # allowed through MCP for the agent's own domain: never by name alone
            with pytest.raises(openai.PermissionDeniedError):
                await asyncio.to_thread(sdk.chat.completions.create, model=ALLOWED_MODEL, messages=MESSAGES)
        entries = await settled_log(pep, lambda e: len(answer_entries(e)) >= 3)
        reasons = [{i["tool"]: i["reason"] for i in items} for items in answer_entries(entries)]
        assert reasons[0] == {"search": "allowed", "lookup_order": "allowed"}
        assert reasons[1]["shell"] == "policy_denied"
        assert reasons[2] == {"send_email": "policy_denied"}
    finally:
        await starter.close()
        await pdp.stop()


async def test_streamed_tool_calls_stop_before_a_denied_one(models: OpenAiUpstream, tmp_path: Path) -> None:
    """Chat chunks and Responses events are relayed one by one; the first one naming a denied tool is replaced by
    an error event, which the SDK raises, and the stream ends there."""
    starter, pep, _ = await start(tmp_path, models.url)
    try:
        sdk = client(pep)
        models.calls = ["search", "shell", "lookup_order"]

        def chat_stream() -> tuple[list[str], BaseException | None]:
            named: list[str] = []
            try:
                for chunk in sdk.chat.completions.create(model=ALLOWED_MODEL, messages=MESSAGES, stream=True):
                    for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                        if call.function and call.function.name:
                            named.append(call.function.name)
            except openai.APIError as exc:
                return named, exc
            return named, None

        def responses_stream() -> tuple[list[str], BaseException | None]:
            named: list[str] = []
            try:
                for event in sdk.responses.create(model=ALLOWED_MODEL, input="x", stream=True):
                    if event.type == "response.output_item.added" and event.item.type == "function_call":
                        named.append(event.item.name)
            except openai.APIError as exc:
                return named, exc
            return named, None

        async with asyncio.timeout(BOUND_S):
            named, error = await asyncio.to_thread(chat_stream)
            assert named == ["search"]
            assert isinstance(error, openai.APIError)
            assert error.body["code"] == "policy_denied"  # type: ignore[index]
            named, error = await asyncio.to_thread(responses_stream)
            assert named == ["search"]
            assert isinstance(error, openai.APIError)
            with pytest.raises(openai.PermissionDeniedError):
                await asyncio.to_thread(sdk.responses.create, model=ALLOWED_MODEL, input="x")
            models.calls = ["search"]
            named, error = await asyncio.to_thread(responses_stream)
            assert (named, error) == (["search"], None)
            response = await asyncio.to_thread(sdk.responses.create, model=ALLOWED_MODEL, input="x")
            assert [o.name for o in response.output if o.type == "function_call"] == ["search"]
    finally:
        await starter.close()


def read_stream(sdk: openai.OpenAI) -> None:
    for _ in sdk.chat.completions.create(model=ALLOWED_MODEL, messages=MESSAGES, stream=True):
        raise AssertionError("no chunk of another model's stream reaches the agent")


async def test_an_answer_from_another_model_is_refused(models: OpenAiUpstream, tmp_path: Path) -> None:
    """The upstream answers with a model the policy never approved: the agent gets the denial, not the answer.
    A dated version of the decided model is the decided model."""
    starter, pep, _ = await start(tmp_path, models.url)
    try:
        sdk = client(pep)
        async with asyncio.timeout(BOUND_S):
            models.answer_model = DENIED_MODEL
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await asyncio.to_thread(sdk.chat.completions.create, model=ALLOWED_MODEL, messages=MESSAGES)
            assert caught.value.code == "policy_denied"
            with pytest.raises(openai.APIError):
                await asyncio.to_thread(read_stream, sdk)
            models.answer_model = f"{ALLOWED_MODEL}-2024-08-06"
            done = await asyncio.to_thread(sdk.chat.completions.create, model=ALLOWED_MODEL, messages=MESSAGES)
            assert done.choices[0].message.content == REPLY
        entries = await settled_log(pep, lambda e: len(answer_entries(e)) >= 2)
        assert answer_entries(entries)[:2] == [[{"model": DENIED_MODEL, "reason": "policy_denied"}]] * 2
    finally:
        await starter.close()
