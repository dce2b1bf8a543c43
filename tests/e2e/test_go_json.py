"""The PEP against Go's encoding/json, the reader of many MCP servers and of Ollama (tests/support/gojson/main.go).

encoding/json matches an object's keys to struct fields exactly first, then case-insensitively with Unicode
simple folding (U+017F is s, U+212A is k), and keeps the last key bound to a field. For every body of a corpus
of tricky ones (case variants, folded letters, escapes, nesting, batches), either the PEP refuses it, or what the
PEP put in the policy input is what Go binds. And through a running PEP, a Go upstream never runs a tool the PDP
was not asked about.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from pep.decision import Reason
from pep.protocols import NO_ID, Inspected, Refused, mcp, model_answer, openai
from tests.conftest import PepStarter, RunningPep, base_config
from tests.support import gojson
from tests.support.policy_pdp import PolicyPdp

NAMED_BY = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
META = "io.modelcontextprotocol/protocolVersion"
TYPED = ("to", "path", "query", "key")  # the fields of the Go program's typed tool input
REFUSALS = {Reason.REQUEST_AMBIGUOUS, Reason.BODY_UNREADABLE}


@pytest.fixture(scope="session")
def go_reader() -> Path:
    """The built program. No Go is a failure, never a skip: `make test` installs it (`make go-deps`)."""
    try:
        return gojson.build()
    except gojson.GoUnavailable as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)


def msg(body: str) -> bytes:
    """A JSON-RPC message written as text (non-ASCII keys as themselves, `\\u` escapes as JSON escapes)."""
    return body.encode()


def call(params: str, extra: str = "") -> bytes:
    return msg('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":' + params + extra + "}")


# (body, the PEP must refuse it). Refused ones are those where Go binds what the PEP would not have read.
MCP_CORPUS: list[tuple[bytes, bool]] = [
    (call('{"name":"search"}'), False),
    (call('{"name":"search","arguments":{"query":"q","path":"/tmp"}}'), False),
    (call('{"name":"search","Name":"shell"}'), True),
    (call('{"Name":"shell","name":"search"}'), True),
    (call('{"Name":"shell"}'), True),
    (call('{"nAmE":"shell"}'), True),
    (call('{"\\u004eame":"shell"}'), True),  # Name, escaped
    (call('{"name":"search","NAME":"shell","arguments":{}}'), True),
    (call('{"name":"search","arguments":{"path":"/tmp","PATH":"/etc"}}'), True),
    (call('{"name":"search","arguments":{"key":"a","\u212aey":"b"}}'), True),  # KELVIN SIGN
    (call('{"name":"search","arguments":{"\u212aey":"b"}}'), False),  # one spelling: the policy sees it as sent
    (call('{"name":"search","arguments":{"Path":"/etc"}}'), False),
    (call('{"name":"search","arguments":{"to":"a@acme.example","To":"x@evil.example"}}'), True),
    (call('{"name":"search","arguments":{"deep":[{"to":"a","tO":"b"}]}}'), True),
    (call('{"name":"search","arguments":{"s":1,"\u017f":2}}'), True),  # LONG S
    (call('{"name":"search","arguments":{"\u0130d":1,"id":2}}'), False),  # dotted capital I folds to i + dot
    (call('{"name":"search","arguments":{"\u0131d":1,"id":2}}'), False),  # dotless i: no folding to i
    (call('{"name":"search","arguments":{"\u0405":1,"s":2}}'), False),  # Cyrillic DZE is not s
    (call('{"name":"search"}', ',"Params":{"name":"shell"}'), True),
    (call('{"name":"search"}', ',"param\u017f":{"name":"shell"}'), True),
    (call('{"name":"search","Arguments":{"path":"/etc"}}'), True),
    (msg('{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"shell"}}'), True),
    (msg('{"jsonrpc":"2.0","id":1,"METHOD":"tools/call","params":{"name":"shell"}}'), True),
    (msg('{"j\u017fonrpc":"2.0","id":1,"method":"ping"}'), True),
    (msg('{"jsonrpc":"2.0","id":1,"ID":2,"method":"ping"}'), True),
    (msg('{"jsonrpc":"2.0","id":1,"result":{},"Method":"tools/call","params":{"name":"shell"}}'), True),
    (msg('{"jsonrpc":"2.0","id":1,"result":{}}'), False),
    (msg('{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///ok"}}'), False),
    (msg('{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///ok","URI":"file:///etc"}}'), True),
    (msg('{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"Uri":"file:///etc"}}'), True),
    (msg('{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p","nAME":"q"}}'), True),
    (msg('{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-03-26"}}'), False),
    (msg('{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolversion":"2025-03-26"}}'), True),
    (msg(f'{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"_meta":{{"{META}":"2025-03-26"}}}}}}'), False),
    (msg(f'{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"_META":{{"{META}":"2025-03-26"}}}}}}'), True),
    (msg('[{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":2,"method":"ping"}]'), False),
    (msg('[{"jsonrpc":"2.0","id":1,"method":"ping"},' + call('{"name":"search","Name":"shell"}').decode() + "]"), True),
    (msg('[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"Method":"tools/call"}]'), True),
    (
        msg(
            "["
            + call('{"name":"search"}').decode()
            + ","
            + call('{"name":"lookup_order"}').decode().replace('"id":1', '"id":2')
            + "]"
        ),
        False,
    ),
]


def chat(extra: str) -> bytes:
    return msg('{"model":"gpt-ok","messages":[{"role":"user","content":"hi"}]' + extra + "}")


OPENAI_CORPUS: list[tuple[bytes, bool]] = [
    (chat(""), False),
    (chat(',"stream":true'), False),
    (chat(',"tools":[{"type":"function","function":{"name":"search"}}]'), False),
    (chat(',"functions":[{"name":"search"}]'), False),
    (chat(',"MODEL":"gpt-evil"'), True),
    (msg('{"Model":"gpt-evil","messages":[]}'), True),
    (chat(',"Stream":true'), True),
    (chat(',"\u017ftream":true'), True),
    (chat(',"tools":[],"TOOLS":[{"type":"function","function":{"name":"shell"}}]'), True),
    (chat(',"tool\u017f":[{"type":"function","function":{"name":"shell"}}]'), True),
    (chat(',"tools":[{"type":"function","Function":{"name":"shell"}}]'), True),
    (chat(',"tools":[{"type":"function","function":{"name":"search","Name":"shell"}}]'), True),
    (chat(',"tools":[{"type":"function","function":{"NAME":"shell"}}]'), True),
    (chat(',"functions":[{"Name":"shell"}]'), True),
    (chat(',"Functions":[{"name":"shell"}]'), True),
    (chat(',"messages":[{"role":"user","ROLE":"system"}]'), True),
    (chat(',"temperature":1,"Seed":3'), False),  # keys the PEP does not read may use any case
]


def _go_mcp_version(message: dict[str, Any], params: dict[str, Any]) -> Any:
    meta = params.get("_meta")
    if isinstance(meta, dict) and isinstance(meta.get(META), str):
        return meta[META]
    if message.get("method") == "initialize" and isinstance(params.get("protocolVersion"), str):
        return params["protocolVersion"]
    return None


def agrees_mcp(inspected: Inspected, go: dict[str, Any]) -> list[str]:
    """Where the policy input and Go's binding differ (empty when they agree)."""
    if not go["ok"]:
        return []  # Go refuses the body: a Go server runs nothing from it
    problems: list[str] = []
    for i, (message, bound) in enumerate(zip(inspected.messages, go["messages"], strict=True)):
        m = bound["message"]
        params = m.get("params") or {}
        facts = message.facts

        def differ(what: str, pep: Any, go_value: Any, i: int = i) -> None:
            if pep != go_value:
                problems.append(f"message {i}: {what}: the PEP read {pep!r}, Go bound {go_value!r}")

        differ("jsonrpc", "2.0", m.get("jsonrpc"))
        go_method = m.get("method")
        differ("method", facts["method"], go_method if go_method is not None else "mcp/response")
        if (message.rpc_id is not NO_ID and message.rpc_id is not None) or "id" in m:
            differ("id", message.rpc_id, m.get("id"))
        field = NAMED_BY.get(go_method or "")
        if field is not None:
            differ(field, facts["name"], params.get(field))
        differ("arguments", facts["arguments"], bound["arguments"])
        differ("protocol version", facts["protocol_version"], _go_mcp_version(m, params))
        arguments = facts["arguments"] or {}
        for name, value in (bound["typed"] or {}).items():
            spelled = [k for k in arguments if k.casefold() == name]
            if value and (len(spelled) != 1 or arguments[spelled[0]] != value):
                problems.append(f"message {i}: typed {name}={value!r}, the policy input has {spelled}")
    return problems


def names(tools: Any) -> list[str]:
    """The tool names the PEP's own rule takes from Go's bound tools (a function's name, else the tool's)."""
    found = openai._tool_names(tools)
    assert isinstance(found, list), found
    return found


def agrees_openai(inspected: Inspected, go: dict[str, Any]) -> list[str]:
    if not go["ok"]:
        return []
    bound = go["chat"]
    facts = inspected.messages[0].facts
    go_tools = [name for key in ("tools", "functions") for name in names(bound.get(key))]
    seen = {"name": bound.get("model"), "stream": bound.get("stream", False), "tools": go_tools}
    return [f"{k}: the PEP read {facts[k]!r}, Go bound {v!r}" for k, v in seen.items() if facts[k] != v]


@pytest.mark.parametrize(
    ("protocol", "corpus"),
    [("mcp", MCP_CORPUS), ("openai", OPENAI_CORPUS)],
)
def test_the_pep_refuses_or_reads_what_go_binds(
    go_reader: Path, protocol: str, corpus: list[tuple[bytes, bool]]
) -> None:
    bodies = [body for body, _ in corpus]
    bound = gojson.decode(go_reader, protocol, bodies)
    problems: list[str] = []
    for (body, must_refuse), go in zip(corpus, bound, strict=True):
        result = mcp.inspect(body, CIMultiDict()) if protocol == "mcp" else openai.inspect(body)
        text = body.decode()
        if isinstance(result, Refused):
            if result.reason not in REFUSALS or not must_refuse:
                problems.append(f"{text}: refused {result.reason.value} ({result.detail})")
            continue
        if must_refuse:
            problems.append(f"{text}: read, not refused")
        disagreement = agrees_mcp(result, go) if protocol == "mcp" else agrees_openai(result, go)
        problems += [f"{text}: {p}" for p in disagreement]
    assert not problems, "\n".join(problems)


def chat_answer(calls: str, holder: str = "tool_calls", where: str = "message") -> bytes:
    """A chat completion answer whose one choice's `where` holds `calls` under `holder`."""
    return f'{{"model":"m","choices":[{{"index":0,"{where}":{{"{holder}":{calls}}}}}]}}'.encode()


# Model answers as a Go agent's OpenAI client (go-openai: encoding/json) binds them: every tool it would run must
# be one the PEP found (and decided), or the answer is unreadable to the PEP.
ANSWER_CORPUS = [
    chat_answer('[{"type":"function","function":{"name":"search"}}]'),
    chat_answer('[{"type":"function","Function":{"name":"shell"}}]'),
    chat_answer('[{"type":"function","function":{"name":"search"},"Function":{"name":"shell"}}]'),
    chat_answer('[{"type":"function","function":{"Name":"shell"}}]'),
    chat_answer('[{"type":"function","function":{"name":"search","NAME":"shell"}}]'),
    chat_answer('[{"type":"function","function":{"name":"shell"}}]', holder="Tool_Calls"),
    chat_answer('[{"type":"function","function":{"name":"shell"}}]', holder="TOOL_CALLS", where="delta"),
    chat_answer('{"name":"search","Name":"shell"}', holder="function_call"),
    chat_answer('{"name":"shell"}', holder="Function_Call"),
    chat_answer('[{"type":"function","\u0046unction":{"name":"shell"}}]'),
    chat_answer('[{"type":"function","function":{"name":"shell"}}]', holder="tool_ca\u006cls"),
]


def go_answer_tools(bound: dict[str, Any]) -> set[str]:
    tools: set[str] = set()
    for choice in (bound.get("answer") or {}).get("choices") or []:
        for part in (choice.get("message"), choice.get("delta")):
            if not part:
                continue
            for call in part.get("tool_calls") or []:
                if (call.get("function") or {}).get("name"):
                    tools.add(call["function"]["name"])
            if (part.get("function_call") or {}).get("name"):
                tools.add(part["function_call"]["name"])
    return tools


def test_a_model_answer_the_pep_reads_names_every_tool_go_would_run(go_reader: Path) -> None:
    bound = gojson.decode(go_reader, "answer", ANSWER_CORPUS)
    problems: list[str] = []
    for body, go in zip(ANSWER_CORPUS, bound, strict=True):
        assert go["ok"], go
        try:
            found = model_answer.read_json(body)
        except model_answer.AnswerError:
            continue
        if missed := go_answer_tools(go) - set(found.tools):
            problems.append(f"{body.decode()}: Go runs {sorted(missed)}, the PEP found {found.tools}")
    assert not problems, "\n".join(problems)
    assert {"shell"} <= go_answer_tools(bound[1])  # the corpus is about a real difference


def test_go_does_bind_the_other_spelling(go_reader: Path) -> None:
    """The corpus is about a real difference: Go binds `Name` (last wins) and U+212A where the text says otherwise."""
    bodies = [
        call('{"name":"search","Name":"shell"}'),
        call('{"n\u0061me":"search","\u004eame":"shell"}'),
        msg('{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call"}'),
        call('{"name":"search","arguments":{"key":"a","\u212aey":"b","\u017fearch":1}}'),
    ]
    bound = gojson.decode(go_reader, "mcp", bodies)
    assert [b["messages"][0]["message"]["params"]["name"] for b in bound[:2]] == ["shell", "shell"]
    assert bound[2]["messages"][0]["message"]["method"] == "tools/call"
    assert bound[3]["messages"][0]["typed"]["key"] == "b"


def test_pep_folding_covers_every_fold_go_makes(go_reader: Path) -> None:
    """Every set of characters Go's folding makes equal is equal under the PEP's (a coarser one may refuse more)."""
    from pep.strictjson import fold

    orbits = gojson.fold_orbits(go_reader)
    assert len(orbits) > 1000
    loose = [o for o in orbits if len({fold(chr(c)) for c in o}) != 1]
    assert not loose, [[f"U+{c:04X}" for c in o] for o in loose[:20]]


# --- through a running PEP, onto a Go upstream ---------------------------------------------------------------------

ALLOWED = frozenset({"search"})


class ToolPdp(PolicyPdp):
    """Allows `tools/call` of `search` and every message that names no tool."""

    def decide(self, doc: dict[str, Any]) -> Any:
        mcp_facts = doc.get("mcp") or {}
        return mcp_facts.get("method") != "tools/call" or mcp_facts.get("name") in ALLOWED


@pytest.fixture
async def go_stack(go_reader: Path, tmp_path: Path) -> AsyncIterator[tuple[RunningPep, ToolPdp, gojson.GoUpstream]]:
    pdp = ToolPdp()
    await pdp.start()
    upstream = gojson.GoUpstream(go_reader)
    await upstream.start()

    def mutate(cfg: dict[str, Any]) -> None:
        route = {"name": "mcp", "match": {"path_prefix": "/mcp"}, "upstream": upstream.url + "/mcp"}
        cfg["routes"] = [{**route, "strip_prefix": True, "protocol": "mcp"}]

    starter = PepStarter(tmp_path, lambda log: base_config(pdp.url, upstream.url, log), "go.yaml")
    try:
        yield await starter(mutate=mutate), pdp, upstream
    finally:
        await starter.close()
        await upstream.stop()
        await pdp.stop()


async def _calls(session: aiohttp.ClientSession, upstream: gojson.GoUpstream) -> list[str]:
    async with session.get(upstream.url + "/calls") as response:
        calls: list[str] = await response.json()
    return calls


@pytest.mark.parametrize(
    "body",
    [
        call('{"name":"search","Name":"shell"}'),
        call('{"Name":"shell"}'),
        msg('{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"shell"}}'),
        msg('{"jsonrpc":"2.0","id":1,"method":"ping","METHOD":"tools/call","params":{"name":"shell"}}'),
    ],
)
async def test_a_go_upstream_never_runs_what_the_pdp_was_not_asked(
    go_stack: tuple[RunningPep, ToolPdp, gojson.GoUpstream], body: bytes
) -> None:
    pep, pdp, upstream = go_stack
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    async with aiohttp.ClientSession() as session:
        async with session.post(pep.url + "/mcp", data=body, headers=headers) as response:
            assert response.status == 403
            assert response.headers["x-pep-reason"] == "request_ambiguous"
            answer = await response.json()
        assert answer["error"]["reason"] == "request_ambiguous"  # refused before any message was read as one
        assert await _calls(session, upstream) == []
        assert pdp.inputs == []  # refused before the PDP: nothing was decided about one spelling
        # The same server runs what was allowed, so the refusal above is the PEP's, not the server's.
        async with session.post(pep.url + "/mcp", data=call('{"name":"search"}'), headers=headers) as response:
            assert response.status == 200
            assert json.loads(await response.read())["result"]["content"][0]["text"] == "ran search"
        assert await _calls(session, upstream) == ["search"]
