"""The README quickstart's configs work as shipped: `pep check` accepts them, and the real SDKs work through
`pep run` on them (only the addresses changed, to free loopback ports and the test's own servers).

- config/mcp.yaml with config/policies/mcp.cedar: the MCP 2.x SDK client, in both session shapes, against a real
  MCP server: the session plumbing is allowed, the tool list is filtered, an allowed tool runs, the shell is
  refused and never reaches the server.
- config/openai.yaml with config/policies/openai.cedar: the openai SDK, the API key from the PEP's environment;
  an allowed model on an allowed endpoint, the tools its answers may call (and not the shell), and the endpoints
  whose model the PEP cannot see (files, batches) denied until the policy names them, as its last comment shows.
- config/container.yaml, the image's default config, with its policy where the Dockerfile puts it.

Only processes started here are signalled, by their own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.support.mcp_servers import Mcp2Server, ToolCall
from tests.support.openai_upstream import OpenAiUpstream
from tests.support.process import REPO, ensure_stopped, pep_env, read_line

CONFIG = REPO / "config"
POLICY_DENY = -32001
BOUND_S = 15.0


def local_copy(name: str, tmp_path: Path, upstream: str, policies: Path | None = None) -> Path:
    """The shipped config with free loopback ports and the test's upstream (and `policies`, when given);
    everything else as shipped."""
    raw = yaml.safe_load((CONFIG / name).read_text())
    raw["listen"] = "127.0.0.1:0"
    raw["admin_listen"] = "127.0.0.1:0"
    (route,) = raw["routes"]
    route["upstream"] = upstream
    if policies is not None:
        raw["pdp"]["policies"] = str(policies)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


async def check(config: Path, env: dict[str, str]) -> tuple[int | None, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pep", "check", "-c", str(config), cwd=REPO, env=env, stdout=-1, stderr=-1
    )
    try:
        async with asyncio.timeout(BOUND_S):
            out, err = await proc.communicate()
    finally:
        await ensure_stopped(proc)
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def pep_run(config: Path, env: dict[str, str]) -> AsyncIterator[str]:
    """`pep run -c config` from the repository root, as the quickstart says; yields the proxy's base URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pep", "run", "-c", str(config), cwd=REPO, env=env, stdout=-3, stderr=-1
    )
    try:
        assert proc.stderr is not None
        line = await read_line(proc.stderr, "proxy on", BOUND_S)
        yield "http://" + line.split("proxy on ", 1)[1].split(",", 1)[0]
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
        await ensure_stopped(proc)


def without_key() -> dict[str, str]:
    env = pep_env()
    env.pop("OPENAI_API_KEY", None)
    return env


@pytest.mark.parametrize("name", ["mcp.yaml", "openai.yaml", "example.yaml"])
async def test_the_shipped_configs_pass_pep_check(name: str) -> None:
    code, out, err = await check(CONFIG / name, {**without_key(), "OPENAI_API_KEY": "sk-test"})
    assert (code, out, err) == (0, "ok\n", "")


async def test_without_its_key_the_openai_config_is_ok_with_a_warning() -> None:
    code, out, err = await check(CONFIG / "openai.yaml", without_key())
    assert (code, out) == (0, "ok\n")
    assert err == (
        f"warning: {CONFIG / 'openai.yaml'}: routes[0].credential.value_env: OPENAI_API_KEY is not set or empty:"
        " requests on route models are denied (credential_unavailable)\n"
    )


async def test_the_image_config_passes_pep_check_where_the_dockerfile_puts_its_policy(tmp_path: Path) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY config/container.yaml /etc/pep/config.yaml" in dockerfile
    assert "COPY config/policies/mcp.cedar /etc/pep/policies/mcp.cedar" in dockerfile
    assert 'CMD ["--config", "/etc/pep/config.yaml"]' in dockerfile
    raw = yaml.safe_load((CONFIG / "container.yaml").read_text())
    assert (raw["listen"], raw["admin_listen"]) == ("0.0.0.0:8080", "0.0.0.0:9901")  # reachable through -p
    assert raw["pdp"]["policies"] == "/etc/pep/policies/mcp.cedar"
    raw["pdp"]["policies"] = str(CONFIG / "policies" / "mcp.cedar")
    copy = tmp_path / "container.yaml"
    copy.write_text(yaml.safe_dump(raw))
    assert await check(copy, pep_env()) == (0, "ok\n", "")


@pytest.fixture
async def mcp_server() -> AsyncIterator[Mcp2Server]:
    async with Mcp2Server() as server:
        yield server


@pytest.mark.parametrize("mode", ["auto", "legacy"], ids=["2026-07-28", "2025-session"])
async def test_the_mcp_quickstart_with_the_mcp_sdk(tmp_path: Path, mcp_server: Mcp2Server, mode: str) -> None:
    config = local_copy("mcp.yaml", tmp_path, mcp_server.url)
    async with (
        pep_run(config, pep_env()) as proxy,
        asyncio.timeout(BOUND_S),
        httpx2.AsyncClient() as http,
        Client(streamable_http_client(f"{proxy}/mcp", http_client=http), mode=mode) as client,
    ):
        listed = await client.list_tools()
        assert sorted(t.name for t in listed.tools) == ["lookup_order", "search"]  # filter_tools_list
        result = await client.call_tool("search", {"query": "refunds"})
        assert "".join(getattr(b, "text", "") for b in result.content) == "3 articles match 'refunds'"
        with pytest.raises(MCPError) as denied:
            await client.call_tool("shell", {"command": "id"})
        assert denied.value.error.code == POLICY_DENY
        with pytest.raises(MCPError):
            await client.call_tool("send_email", {"to": "a@b.example", "subject": "s", "body": "b"})
    assert mcp_server.calls == [ToolCall("search", {"query": "refunds"})]
    assert all("x-pep-decision-id" in r.headers for r in mcp_server.requests)


@pytest.fixture
async def models() -> AsyncIterator[OpenAiUpstream]:
    upstream = OpenAiUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


async def test_the_openai_quickstart_with_the_openai_sdk(tmp_path: Path, models: OpenAiUpstream) -> None:
    config = local_copy("openai.yaml", tmp_path, models.url)
    env = {**pep_env(), "OPENAI_API_KEY": "sk-the-peps-own"}
    messages: Any = [{"role": "user", "content": "Where is my refund?"}]
    async with pep_run(config, env) as proxy:
        client = openai.AsyncOpenAI(base_url=f"{proxy}/v1", api_key="the-agent-holds-none", max_retries=0)
        async with asyncio.timeout(BOUND_S):
            answer = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            assert answer.choices[0].message.content
            assert [m.id for m in (await client.models.list()).data]
            with pytest.raises(openai.PermissionDeniedError):
                await client.chat.completions.create(model="gpt-4o", messages=messages)
        await client.close()
    assert [r.model for r in models.seen if r.model] == ["gpt-4o-mini"]  # the denied model never reached it
    assert {r.headers.get("authorization") for r in models.seen} == {"Bearer sk-the-peps-own"}


async def test_the_openai_quickstart_decides_what_answers_call(tmp_path: Path, models: OpenAiUpstream) -> None:
    """The tools the policy names reach the agent in an answer; the shell does not, and neither does an allowed
    model on an endpoint the policy does not name."""
    config = local_copy("openai.yaml", tmp_path, models.url)
    env = {**pep_env(), "OPENAI_API_KEY": "sk-the-peps-own"}
    messages: Any = [{"role": "user", "content": "Where is my refund?"}]
    async with pep_run(config, env) as proxy:
        client = openai.AsyncOpenAI(base_url=f"{proxy}/v1", api_key="the-agent-holds-none", max_retries=0)
        async with asyncio.timeout(BOUND_S):
            models.calls = ["search", "lookup_order"]
            answer = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            called = [c.function.name for c in answer.choices[0].message.tool_calls or [] if c.type == "function"]
            assert called == ["search", "lookup_order"]
            models.calls = ["search", "shell"]
            with pytest.raises(openai.PermissionDeniedError):
                await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            with pytest.raises(openai.PermissionDeniedError):
                await client.embeddings.create(model="gpt-4o-mini", input="refunds")
        await client.close()
    assert [r.path for r in models.seen] == ["/v1/chat/completions"] * 2  # the embeddings call never reached it


@pytest.mark.parametrize("allowed", [False, True], ids=["as-shipped", "files-allowed-by-name"])
async def test_the_openai_quickstart_denies_unread_endpoints_unless_named(
    tmp_path: Path, models: OpenAiUpstream, allowed: bool
) -> None:
    """A file upload (its JSONL may name any model) and a batch are denied as shipped; enabling the policy's own
    commented example allows file uploads by name, and only those."""
    policies = None
    if allowed:
        shipped = (CONFIG / "policies" / "openai.cedar").read_text()
        example = '// permit (principal, action == Action::"model.invoke", resource == Endpoint::"files");'
        assert example in shipped
        policies = tmp_path / "openai.cedar"
        policies.write_text(shipped.replace(example, example.removeprefix("// ")))
    config = local_copy("openai.yaml", tmp_path, models.url, policies)
    env = {**pep_env(), "OPENAI_API_KEY": "sk-the-peps-own"}
    batch_line = b'{"custom_id":"1","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o"}}\n'
    async with pep_run(config, env) as proxy:
        client = openai.AsyncOpenAI(base_url=f"{proxy}/v1", api_key="the-agent-holds-none", max_retries=0)
        async with asyncio.timeout(BOUND_S):
            upload = client.files.create(file=("requests.jsonl", batch_line), purpose="batch")
            if allowed:
                await upload
            else:
                with pytest.raises(openai.PermissionDeniedError):
                    await upload
            with pytest.raises(openai.PermissionDeniedError):
                await client.batches.create(
                    input_file_id="file-1", endpoint="/v1/chat/completions", completion_window="24h"
                )
        await client.close()
    assert [r.path for r in models.seen] == (["/v1/files"] if allowed else [])
