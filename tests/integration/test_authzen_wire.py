"""AuthZEN on the wire: the PEP against a scriptable AuthZEN PDP, both on loopback sockets.

What the PDP receives (discovery, X-Request-ID, the default and a route's mapping, the PDP credential), and what
every answer or misbehaviour becomes for the caller, the upstream, the decision log and /metrics (README,
"AuthZEN" and "Default mapping"). The batch client is driven directly at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pep.config import PdpConfig
from pep.decision import Reason
from pep.pdp import Failure, Verdict
from pep.pdp.authzen import AuthzenPdp
from pep.pdp.transport import HttpTransport
from pep.secret_file import FileSecret
from tests.conftest import RunningPep
from tests.support.authzen_pdp import AuthzenTestPdp
from tests.support.documents import pep_document
from tests.support.observe import LOG_KEYS, metric
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]
TOKEN = "s3cret-pdp-token-6d1f"


@pytest.fixture
async def az() -> AsyncIterator[AuthzenTestPdp]:
    pdp = AuthzenTestPdp()
    await pdp.start()
    yield pdp
    await pdp.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def authzen(url: str, **extra: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["pdp"] = {
            "kind": "authzen",
            "url": url,
            "timeout_ms": 2000,
            "retries": 1,
            "breaker": {"failure_threshold": 1000, "open_ms": 5000, "half_open_probes": 1},
            **extra.pop("pdp", {}),
        }
        for key, value in extra.items():
            if key == "route":
                raw["routes"][0].update(value)
            else:
                raw[key] = value

    return mutate


async def start(make_pep: PepFactory, az: AuthzenTestPdp, **extra: Any) -> RunningPep:
    running: RunningPep = await make_pep(authzen(az.url, **extra))
    return running


async def get(
    client: aiohttp.ClientSession, pep: RunningPep, target: str = "/tools/search?q=1", **headers: str
) -> tuple[int, str | None, str | None]:
    """Status, x-pep-reason and x-request-id (set on denies) of one GET through the PEP."""
    async with client.get(pep.url + target, headers=headers) as r:
        await r.read()
        return r.status, r.headers.get("x-pep-reason"), r.headers.get("x-request-id")


async def scrape(client: aiohttp.ClientSession, pep: RunningPep) -> str:
    async with client.get(pep.admin_url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


# --- allow, deny and what the PDP is asked ---------------------------------------------------------------------


async def test_allow_reaches_upstream_with_the_default_mapping(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    pep = await start(
        make_pep,
        az,
        identity={"workload": "spiffe://test/agent", "agent_header": "x-agent-id", "attributes": {"team": "support"}},
    )
    async with client.get(
        pep.url + "/tools/search?q=1&q=2", headers={"x-request-id": "az-1", "x-agent-id": "bot-7"}
    ) as r:
        assert r.status == 200
        assert r.headers.get("x-pep-decision") != "deny"
        await r.read()
    assert len(upstream.seen) == 1
    assert upstream.seen[0].target == "/tools/search?q=1&q=2"

    # One discovery GET at the well-known URL, then one evaluation POST at the endpoint it named.
    assert [(s.method, s.path) for s in az.seen] == [
        ("GET", "/.well-known/authzen-configuration"),
        ("POST", "/access/v1/evaluation"),
    ]
    discovery, evaluation = az.seen
    assert "x-request-id" not in discovery.headers
    assert evaluation.headers["content-type"] == "application/json"
    assert evaluation.headers["x-request-id"] == "az-1"
    body = evaluation.body
    assert set(body) == {"subject", "action", "resource", "context"}
    assert body["subject"] == {
        "type": "agent",
        "id": "spiffe://test/agent",  # the workload: the agent header is a property, never the id
        "properties": {"workload": "spiffe://test/agent", "agent": "bot-7", "claims": {}, "team": "support"},
    }
    assert body["action"] == {"name": "GET"}
    facts = {
        "route": "tools",
        "method": "GET",
        "host": f"127.0.0.1:{pep.port}",
        "path": "/tools/search",
        "query": {"q": ["1", "2"]},
    }
    assert body["resource"] == {"type": "route", "id": "tools", "properties": facts}
    assert body["context"] == {**facts, "request_id": "az-1", "time": body["context"]["time"]}
    assert isinstance(body["context"]["time"], str)

    entries = await pep.log_entries()
    assert len(entries) == 1
    assert set(entries[0]) >= LOG_KEYS
    assert (entries[0]["decision"], entries[0]["reason"], entries[0]["request_id"]) == ("allow", "allowed", "az-1")
    text = await scrape(client, pep)
    assert metric(text, "pep_decisions_total", route="tools", decision="allow", reason="allowed") == 1
    assert metric(text, "pep_pdp_request_duration_seconds_count", outcome="ok") == 1


async def test_subject_id_is_the_workload_without_an_agent_header(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    pep = await start(make_pep, az)
    assert (await get(client, pep))[0] == 200
    subject = az.evaluations[0].body["subject"]
    assert subject["id"] == "spiffe://test/agent"
    assert subject["properties"] == {"workload": "spiffe://test/agent", "claims": {}}


async def test_a_route_mapping_changes_what_the_pdp_sees(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    mapping = {
        "subject": {"type": "user", "properties": {"origin": "$$sidecar", "agent_id": "$subject.agent"}},
        "action": {"name": "read"},
        "resource": {
            "type": "tenant",
            "id": "$request.query.tenant.0",
            "properties": {"tenant_header": "$request.headers.x-tenant", "nothing": "$request.headers.x-absent"},
        },
    }
    pep = await start(make_pep, az, route={"mapping": mapping})
    status, _, _ = await get(client, pep, "/tools/items?tenant=acme", **{"x-tenant": "t-1", "x-agent-id": "bot"})
    assert status == 200
    body = az.evaluations[0].body
    assert body["subject"] == {
        "type": "user",
        "id": "spiffe://test/agent",
        "properties": {"origin": "$sidecar", "agent_id": "bot"},
    }
    assert body["action"] == {"name": "read"}
    assert body["resource"] == {"type": "tenant", "id": "acme", "properties": {"tenant_header": "t-1"}}
    assert body["context"]["path"] == "/tools/items"  # the context keeps the default facts
    assert len(upstream.seen) == 1


async def test_a_mapping_whose_resource_id_is_absent_denies_undefined(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    pep = await start(make_pep, az, route={"mapping": {"resource": {"id": "$request.query.tenant.0"}}})
    status, reason, _ = await get(client, pep, "/tools/items?other=1")
    assert (status, reason) == (403, "pdp_undefined")
    assert az.evaluations == []  # nothing to ask: the PDP is not called
    assert upstream.seen == []
    entries = await pep.log_entries()
    assert entries[0]["reason"] == "pdp_undefined"
    assert entries[0]["detail"].startswith("mapping: resource.id")


@pytest.mark.parametrize(
    "query", ["tenant=acme&tenant=evil", "tenant=acme&x=1&tenant=acme", "%74enant=evil&tenant=acme"]
)
async def test_a_mapping_picking_one_of_repeated_query_values_is_ambiguous(
    query: str, make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """The PDP is asked about `tenant.0`; a last-wins upstream (PHP, Rails) would act on the last one."""
    pep = await start(
        make_pep, az, route={"mapping": {"resource": {"type": "tenant", "id": "$request.query.tenant.0"}}}
    )
    status, reason, _ = await get(client, pep, f"/tools/items?{query}")
    assert (status, reason) == (403, "request_ambiguous")
    assert az.evaluations == []
    assert upstream.seen == []
    entries = await pep.log_entries()
    assert entries[0]["reason"] == "request_ambiguous"
    assert "repeated" in entries[0]["detail"]


async def test_a_batch_item_picking_one_of_repeated_query_values_is_not_sent(az: AuthzenTestPdp) -> None:
    from pep.config import RouteMapping
    from pep.pdp.mapping import CompiledMapping

    mapping = CompiledMapping.compile(RouteMapping(resource_id="$request.query.tenant.0"))
    pdp = AuthzenPdp(az.url, HttpTransport(1 << 20, 4), {"tools": mapping})
    try:
        docs = [pep_document(query={"tenant": ["a"]}), pep_document(query={"tenant": ["a", "b"]})]
        assert outcomes(await pdp.ask_many(docs, "b")) == ["allow", "request_ambiguous"]
    finally:
        await pdp.close()


async def test_deny_is_policy_denied_with_the_pdp_reason_logged(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    az.decide = lambda _r: {"decision": False, "context": {"reason_admin": {"403": "policy C076E82F"}}}
    pep = await start(make_pep, az)
    status, reason, rid = await get(client, pep)
    assert (status, reason) == (403, "policy_denied")
    assert upstream.seen == []
    entries = await pep.log_entries()
    assert entries[0]["reason"] == "policy_denied"
    assert entries[0]["request_id"] == rid
    assert "C076E82F" in entries[0]["detail"]
    text = await scrape(client, pep)
    assert metric(text, "pep_decisions_total", route="tools", decision="deny", reason="policy_denied") == 1


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"decision": "true"}, "pdp_malformed"),
        ({"decision": 1}, "pdp_malformed"),
        ({"decision": None}, "pdp_malformed"),
        ({}, "pdp_undefined"),
        ({"decision": True, "context": "yes"}, "pdp_malformed"),
        (
            {"decision": True, "context": {"obligations": [{"id": "o1", "type": "notification"}]}},
            "obligation_unsupported",
        ),
        ([{"decision": True}], "pdp_malformed"),
    ],
)
async def test_answers_that_are_not_an_allow(
    make_pep: PepFactory,
    az: AuthzenTestPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    answer: Any,
    reason: str,
) -> None:
    az.decide = lambda _r: answer
    pep = await start(make_pep, az)
    assert (await get(client, pep))[:2] == (403, reason)
    assert upstream.seen == []
    assert len(az.evaluations) == 1  # none of these is retried


async def test_an_error_status_from_the_evaluation_endpoint(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    az.evaluation_status = 500
    pep = await start(make_pep, az)
    assert (await get(client, pep))[:2] == (403, "pdp_error_status")
    assert upstream.seen == []


async def test_a_dropped_evaluation_connection_is_unreachable(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    az.drop_evaluations = True
    pep = await start(make_pep, az)
    assert (await get(client, pep))[:2] == (403, "pdp_unreachable")
    assert upstream.seen == []
    assert len(az.evaluations) == 2  # a transport error is retried once (retries: 1)
    text = await scrape(client, pep)
    assert metric(text, "pep_pdp_request_duration_seconds_count", outcome="unreachable") == 2


# --- discovery -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["status_500", "drop", "not_json", "array"])
async def test_failed_discovery_is_unreachable_and_not_remembered(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession, fault: str
) -> None:
    az.metadata_status = 500 if fault == "status_500" else 200
    az.drop_discovery = fault == "drop"
    az.metadata_body = {"not_json": b"<html>ok</html>", "array": b"[{}]"}.get(fault)
    pep = await start(make_pep, az)
    for _ in range(2):
        status, reason, _ = await get(client, pep)
        assert (status, reason) == (403, "pdp_unreachable")
    assert upstream.seen == []
    assert az.evaluations == []
    # Each decision fetched the document again: a failure is never cached. Only a transport error is retried
    # (retries: 1); the PDP client never resends on its own.
    fetched = len(az.discoveries)
    assert fetched == (4 if fault == "drop" else 2)
    text = await scrape(client, pep)
    assert metric(text, "pep_decisions_total", route="tools", decision="deny", reason="pdp_unreachable") == 2

    # The PDP recovers: the very next request discovers and is allowed.
    az.metadata_status = 200
    az.drop_discovery = False
    az.metadata_body = None
    assert (await get(client, pep))[0] == 200
    assert len(az.discoveries) == fetched + 1
    assert len(upstream.seen) == 1


async def test_wrong_policy_decision_point_denies_until_the_document_is_fixed(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    az.cache_control = "no-store"
    pep = await start(make_pep, az)
    assert (await get(client, pep))[0] == 200

    # A mix-up: the document names another PDP. Its endpoints are not used, also not the ones learnt before.
    az.metadata = {**az.default_metadata(), "policy_decision_point": "http://127.0.0.1:1"}
    for _ in range(3):
        assert (await get(client, pep))[:2] == (403, "pdp_malformed")
    assert len(az.evaluations) == 1  # only the first, allowed request
    assert len(upstream.seen) == 1
    entries = await pep.log_entries()
    assert "policy_decision_point" in entries[-1]["detail"]

    az.metadata = None
    assert (await get(client, pep))[0] == 200
    assert len(upstream.seen) == 2


async def test_an_evaluation_endpoint_on_another_origin_is_never_called(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    other = AuthzenTestPdp()
    await other.start()
    try:
        az.metadata = {**az.default_metadata(), "access_evaluation_endpoint": other.url + "/access/v1/evaluation"}
        pep = await start(make_pep, az)
        assert (await get(client, pep))[:2] == (403, "pdp_malformed")
        assert other.seen == []
        assert upstream.seen == []
    finally:
        await other.stop()


async def test_a_base_url_with_a_path_discovers_at_the_rfc_8615_url(
    make_pep: PepFactory, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    tenant = AuthzenTestPdp(base_path="/tenant1")
    await tenant.start()
    try:
        pep = await start(make_pep, tenant)
        assert (await get(client, pep))[0] == 200
        assert [(s.method, s.path) for s in tenant.seen] == [
            ("GET", "/.well-known/authzen-configuration/tenant1"),
            ("POST", "/tenant1/access/v1/evaluation"),
        ]
    finally:
        await tenant.stop()


@pytest.mark.parametrize(
    ("cache_control", "fetches"), [("max-age=60", 1), (None, 1), ("no-store", 4), ("max-age=0", 4)]
)
async def test_cache_control_decides_how_often_discovery_runs(
    make_pep: PepFactory,
    az: AuthzenTestPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    cache_control: str | None,
    fetches: int,
) -> None:
    az.cache_control = cache_control
    pep = await start(make_pep, az)
    for _ in range(4):
        assert (await get(client, pep))[0] == 200
    assert len(az.discoveries) == fetches
    assert len(az.evaluations) == 4


async def test_metadata_is_fetched_again_when_max_age_expires(az: AuthzenTestPdp) -> None:
    now = [1000.0]
    az.cache_control = "max-age=30"
    pdp = AuthzenPdp(az.url, HttpTransport(1 << 20, 4), clock=lambda: now[0])
    try:
        for _ in range(3):
            assert await pdp.ask(pep_document(), "r") == Verdict(True, Reason.ALLOWED)
        assert len(az.discoveries) == 1
        now[0] += 29.9
        await pdp.ask(pep_document(), "r")
        assert len(az.discoveries) == 1
        now[0] += 0.2
        # Expired, and the new document is a mix-up: the old endpoints are not used any more.
        az.metadata = {**az.default_metadata(), "policy_decision_point": "http://127.0.0.1:1"}
        result = await pdp.ask(pep_document(), "r")
        assert isinstance(result, Failure)
        assert result.reason is Reason.PDP_MALFORMED
        assert len(az.discoveries) == 2
        assert len(az.evaluations) == 4
    finally:
        await pdp.close()


# --- X-Request-ID ------------------------------------------------------------------------------------------------


async def test_the_request_id_sent_is_the_one_in_the_decision_log(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    pep = await start(make_pep, az)
    given = "caller-id-42"
    assert (await get(client, pep, **{"x-request-id": given}))[0] == 200
    assert (await get(client, pep))[0] == 200
    generated = upstream.seen[1].headers["x-request-id"]
    assert upstream.seen[0].headers["x-request-id"] == given
    assert generated != given
    sent = [s.headers["x-request-id"] for s in az.evaluations]
    assert sent == [given, generated]
    assert [e["request_id"] for e in await pep.log_entries()] == [given, generated]
    assert [e["decision"] for e in await pep.log_entries()] == ["allow", "allow"]
    assert [s.body["context"]["request_id"] for s in az.evaluations] == [given, generated]


async def test_an_echoed_request_id_that_differs_is_malformed(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    az.echo = "wrong"
    pep = await start(make_pep, az)
    assert (await get(client, pep))[:2] == (403, "pdp_malformed")
    assert upstream.seen == []
    assert "X-Request-ID" in (await pep.log_entries())[0]["detail"]


async def test_no_echo_is_accepted(
    make_pep: PepFactory, az: AuthzenTestPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    az.echo = "none"
    pep = await start(make_pep, az)
    assert (await get(client, pep))[0] == 200
    assert len(upstream.seen) == 1


# --- the PEP's credential to the PDP ---------------------------------------------------------------------------


async def test_the_pdp_credential_is_sent_and_never_shown(
    tmp_path: Path,
    make_pep: PepFactory,
    az: AuthzenTestPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    token_file = tmp_path / "pdp-token"
    token_file.write_text(TOKEN + "\n")
    pep = await start(make_pep, az, pdp={"auth": {"value_file": str(token_file), "format": "Bearer {}"}})
    assert (await get(client, pep, **{"x-request-id": "auth-1"}))[0] == 200
    assert (await get(client, pep, "/tools/x", **{"authorization": "Bearer caller"}))[0] == 200

    # Sent on discovery and on every evaluation, exactly as formatted.
    assert len(az.seen) == 3
    for seen in az.seen:
        assert seen.headers.getall("authorization") == [f"Bearer {TOKEN}"]
    # Never in what the policy sees, the decision log, the metrics, or the upstream request.
    for seen in az.evaluations:
        assert TOKEN.encode() not in seen.raw
        assert b"caller" not in seen.raw  # the caller's credential is not in the input either
    await pep.log_entries()
    assert TOKEN.encode() not in pep.log_path.read_bytes()
    assert TOKEN not in await scrape(client, pep)
    for got in upstream.seen:
        assert all(TOKEN not in v for v in got.headers.values())


async def test_a_custom_pdp_credential_header(
    tmp_path: Path,
    make_pep: PepFactory,
    az: AuthzenTestPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    token_file = tmp_path / "key"
    token_file.write_text(TOKEN)
    pep = await start(
        make_pep, az, pdp={"auth": {"value_file": str(token_file), "header": "X-Api-Key", "format": "{}"}}
    )
    assert (await get(client, pep))[0] == 200
    for seen in az.seen:
        assert seen.headers.getall("x-api-key") == [TOKEN]
        assert "authorization" not in seen.headers


async def test_a_missing_pdp_credential_denies_without_asking(
    tmp_path: Path,
    make_pep: PepFactory,
    az: AuthzenTestPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    pep = await start(make_pep, az, pdp={"auth": {"value_file": str(tmp_path / "absent")}})
    status, reason, _ = await get(client, pep)
    assert status == 403
    assert reason == "pdp_unreachable"
    assert az.seen == []
    assert upstream.seen == []
    assert "pdp.auth.value_file" in (await pep.log_entries())[0]["detail"]


# --- batches (AuthzenPdp.ask_many) -----------------------------------------------------------------------------


def documents(*methods: str) -> list[dict[str, Any]]:
    """One document per method, each on its own route: distinct resources, so they may share a batch."""
    return [pep_document(method=m, route=f"r{i}", request_id=f"rid-{i}") for i, m in enumerate(methods)]


def by_method(request: dict[str, Any]) -> Any:
    method = request["action"]["name"]
    if method == "GET":
        return {"decision": True}
    if method == "PUT":
        return {"decision": "true"}
    return {"decision": False, "context": {"reason": f"no {method}"}}


def outcomes(results: list[Verdict | Failure]) -> list[str]:
    return [("allow" if r.allow else r.reason.value) if isinstance(r, Verdict) else r.reason.value for r in results]


@pytest.fixture
async def client_pdp(az: AuthzenTestPdp) -> AsyncIterator[AuthzenPdp]:
    pdp = AuthzenPdp(az.url, HttpTransport(PdpConfig(kind="authzen").max_response_bytes, 4))
    yield pdp
    await pdp.close()


async def test_batch_uses_the_evaluations_endpoint_with_execute_all(az: AuthzenTestPdp, client_pdp: AuthzenPdp) -> None:
    az.decide = by_method
    results = await client_pdp.ask_many(documents("GET", "POST", "PUT", "GET"), "batch-1")
    assert outcomes(results) == ["allow", "policy_denied", "pdp_malformed", "allow"]
    assert isinstance(results[1], Verdict)
    assert results[1].note == "no POST"
    assert az.evaluations == []
    assert len(az.batches) == 1
    batch = az.batches[0]
    assert batch.headers["x-request-id"] == "batch-1"
    assert batch.body["options"] == {"evaluations_semantic": "execute_all"}
    items = batch.body["evaluations"]
    assert [i["action"]["name"] for i in items] == ["GET", "POST", "PUT", "GET"]
    assert [i["resource"]["id"] for i in items] == ["r0", "r1", "r2", "r3"]
    assert all(set(i) == {"subject", "action", "resource", "context"} for i in items)
    assert [i["context"]["request_id"] for i in items] == ["rid-0", "rid-1", "rid-2", "rid-3"]


async def test_a_short_batch_answer_denies_the_missing_items(az: AuthzenTestPdp, client_pdp: AuthzenPdp) -> None:
    # As under deny_on_first_deny: the PDP stopped early.
    az.batch_answer = lambda items: {"evaluations": [{"decision": True}]}
    results = await client_pdp.ask_many(documents("GET", "GET", "GET"), "b")
    assert outcomes(results) == ["allow", "pdp_undefined", "pdp_undefined"]


async def test_a_long_or_shapeless_batch_answer_is_malformed(az: AuthzenTestPdp, client_pdp: AuthzenPdp) -> None:
    az.batch_answer = lambda items: {"evaluations": [{"decision": True}] * (len(items) + 1)}
    assert outcomes(await client_pdp.ask_many(documents("GET", "GET"), "b")) == ["pdp_malformed"] * 2
    az.batch_answer = lambda items: {"decision": True}
    assert outcomes(await client_pdp.ask_many(documents("GET", "GET"), "b")) == ["pdp_malformed"] * 2


async def test_a_batch_echo_mismatch_is_malformed(az: AuthzenTestPdp, client_pdp: AuthzenPdp) -> None:
    az.echo = "wrong"
    assert outcomes(await client_pdp.ask_many(documents("GET", "GET"), "b")) == ["pdp_malformed"] * 2


async def test_without_a_batch_endpoint_items_are_asked_one_by_one(az: AuthzenTestPdp, client_pdp: AuthzenPdp) -> None:
    az.batch_endpoint = False
    az.decide = by_method
    results = await client_pdp.ask_many(documents("GET", "POST", "GET"), "b")
    assert outcomes(results) == ["allow", "policy_denied", "allow"]
    assert az.batches == []
    assert len(az.evaluations) == 3
    assert len(az.discoveries) == 1
    sent = sorted(s.headers["x-request-id"] for s in az.evaluations)
    assert sent == ["b-0", "b-1", "b-2"]  # one id per evaluation, each echoed back and checked


async def test_items_naming_the_same_resource_are_asked_one_by_one(az: AuthzenTestPdp, client_pdp: AuthzenPdp) -> None:
    # Cerbos answers every item of a batch naming the same resource with the first item's decision.
    az.decide = lambda r: {"decision": r["resource"]["properties"]["path"] == "/tools/a"}
    docs = [pep_document(path="/tools/a", request_id="x"), pep_document(path="/tools/b", request_id="y")]
    assert outcomes(await client_pdp.ask_many(docs, "b")) == ["allow", "policy_denied"]
    assert az.batches == []
    assert sorted(s.headers["x-request-id"] for s in az.evaluations) == ["b-0", "b-1"]


async def test_a_batch_item_whose_mapping_fails_is_undefined_and_not_sent(az: AuthzenTestPdp) -> None:
    from pep.config import RouteMapping
    from pep.pdp.mapping import CompiledMapping

    mapping = CompiledMapping.compile(RouteMapping(resource_id="$request.query.tenant.0"))
    pdp = AuthzenPdp(az.url, HttpTransport(1 << 20, 4), {"tools": mapping})
    try:
        docs = [pep_document(query={"tenant": ["a"]}), pep_document(query={}), pep_document(query={"tenant": ["c"]})]
        # The mapped resources differ (tenant a, tenant c): one batch of the two that could be mapped.
        results = await pdp.ask_many(docs, "b")
        assert outcomes(results) == ["allow", "pdp_undefined", "allow"]
        assert [i["resource"]["id"] for i in az.batches[0].body["evaluations"]] == ["a", "c"]
    finally:
        await pdp.close()


async def test_a_batch_when_discovery_fails(az: AuthzenTestPdp, client_pdp: AuthzenPdp) -> None:
    az.metadata_status = 503
    assert outcomes(await client_pdp.ask_many(documents("GET", "GET"), "b")) == ["pdp_unreachable"] * 2
    assert az.batches == []


async def test_the_batch_credential_header(tmp_path: Path, az: AuthzenTestPdp) -> None:
    token_file = tmp_path / "t"
    token_file.write_text(TOKEN)
    pdp = AuthzenPdp(az.url, HttpTransport(1 << 20, 4), auth=FileSecret(str(token_file), "Bearer {}"))
    try:
        assert outcomes(await pdp.ask_many(documents("GET"), "b")) == ["allow"]
        assert az.batches[0].headers["authorization"] == f"Bearer {TOKEN}"
        assert TOKEN.encode() not in az.batches[0].raw
    finally:
        await pdp.close()


# --- the client directly: one discovery for concurrent callers, the credential over time -------------------------


async def test_concurrent_callers_share_one_discovery(az: AuthzenTestPdp, client_pdp: AuthzenPdp) -> None:
    az.discovery_delay = 0.1
    results = await asyncio.gather(*(client_pdp.ask(pep_document(), f"r{i}") for i in range(5)))
    assert all(r == Verdict(True, Reason.ALLOWED) for r in results)
    assert len(az.discoveries) == 1
    assert len(az.evaluations) == 5


async def test_a_caller_that_gives_up_leaves_the_discovery_to_the_others(
    az: AuthzenTestPdp, client_pdp: AuthzenPdp
) -> None:
    az.discovery_delay = 0.15
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):  # as the engine's deadline would
            await client_pdp.ask(pep_document(), "impatient")
    assert await client_pdp.ask(pep_document(), "patient") == Verdict(True, Reason.ALLOWED)
    assert len(az.discoveries) == 1
    assert [s.headers["x-request-id"] for s in az.evaluations] == ["patient"]


async def test_close_during_discovery(az: AuthzenTestPdp) -> None:
    az.discovery_delay = 0.3
    pdp = AuthzenPdp(az.url, HttpTransport(1 << 20, 4))
    waiting = asyncio.ensure_future(pdp.ask(pep_document(), "r"))
    for _ in range(200):
        if az.discoveries:
            break
        await asyncio.sleep(0.005)
    async with asyncio.timeout(2):
        await pdp.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert az.evaluations == []


async def test_nothing_is_sent_when_no_item_can_be_mapped(az: AuthzenTestPdp) -> None:
    from pep.config import RouteMapping
    from pep.pdp.mapping import CompiledMapping

    mapping = CompiledMapping.compile(RouteMapping(action="$request.headers.x-absent"))
    pdp = AuthzenPdp(az.url, HttpTransport(1 << 20, 4), {"tools": mapping})
    try:
        assert outcomes(await pdp.ask_many([pep_document(), pep_document()], "b")) == ["pdp_undefined"] * 2
        assert az.seen == []
    finally:
        await pdp.close()


async def test_the_credential_file_is_followed_after_discovery(tmp_path: Path, az: AuthzenTestPdp) -> None:
    now = [50.0]
    token_file = tmp_path / "t"
    token_file.write_text("first")
    secret = FileSecret(str(token_file), "Bearer {}", clock=lambda: now[0])
    pdp = AuthzenPdp(az.url, HttpTransport(1 << 20, 4), auth=secret)
    try:
        assert await pdp.ask(pep_document(), "r1") == Verdict(True, Reason.ALLOWED)
        # Rotated (a new file): the new value is sent once the file is looked at again.
        token_file.unlink()
        token_file.write_text("second-value")
        now[0] += 1.5
        assert await pdp.ask(pep_document(), "r2") == Verdict(True, Reason.ALLOWED)
        assert [s.headers["authorization"] for s in az.seen] == ["Bearer first", "Bearer first", "Bearer second-value"]
        # Deleted: evaluations and batches are denied without asking; the metadata stays cached.
        token_file.unlink()
        now[0] += 1.5
        result = await pdp.ask(pep_document(), "r3")
        assert isinstance(result, Failure)
        assert result.reason is Reason.PDP_UNREACHABLE
        assert "second-value" not in result.detail
        assert outcomes(await pdp.ask_many(documents("GET", "POST"), "b")) == ["pdp_unreachable"] * 2
        assert len(az.seen) == 3
    finally:
        await pdp.close()
