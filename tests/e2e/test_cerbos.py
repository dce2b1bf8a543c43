"""The PEP against a real third-party PDP: Cerbos 0.55.0 speaking OpenID AuthZEN, on loopback sockets.

Policies are the shipped ones (config/policies/cerbos). Cerbos is stopped, killed, frozen (SIGSTOP) and resumed
to show every outage is a deny with its reason, that the breaker opens and closes again, and that nothing reaches
the upstream without an allow.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from pep.attributes import document
from pep.config import RouteConfig
from pep.decision import Reason
from pep.pdp import DENIED, Failure, Verdict
from pep.pdp.authzen import AuthzenPdp
from pep.pdp.transport import HttpTransport
from pep.routing import Route
from tests.conftest import RunningPep
from tests.support.cerbos import CerbosServer
from tests.support.upstream import RecordingUpstream

CerbosPepFactory = Callable[..., Any]


class FakeClock:
    """Monotonic time plus an offset the test bumps: `open_ms` is skipped at once, deadlines still pass in real time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def pep(make_cerbos_pep: CerbosPepFactory) -> RunningPep:
    running: RunningPep = await make_cerbos_pep()
    return running


class Answer:
    def __init__(self, status: int, reason: str | None, decision: str | None, body: bytes, seconds: float) -> None:
        self.status = status
        self.reason = reason
        self.decision = decision
        self.body = body
        self.seconds = seconds


async def call(
    client: aiohttp.ClientSession, pep: RunningPep, target: str, method: str = "GET", request_id: str | None = None
) -> Answer:
    headers = {"x-request-id": request_id} if request_id else {}
    started = time.perf_counter()
    async with client.request(method, pep.url + target, headers=headers) as r:
        body = await r.read()
        return Answer(
            r.status,
            r.headers.get("x-pep-reason"),
            r.headers.get("x-pep-decision"),
            body,
            time.perf_counter() - started,
        )


def assert_denied(answer: Answer, reason: str) -> None:
    assert answer.status == 403, answer.body
    assert answer.decision == "deny"
    assert answer.reason == reason
    assert orjson.loads(answer.body)["error"]["reason"] == reason


async def entry_for(pep: RunningPep, request_id: str) -> dict[str, Any]:
    entries = [e for e in await pep.log_entries() if e["request_id"] == request_id]
    assert len(entries) == 1, entries
    return entries[0]


# --- policy decisions through the proxy ------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["search", "lookup_order"])
async def test_allowed_tool_reaches_the_upstream(
    tool: str, pep: RunningPep, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    answer = await call(client, pep, f"/tools/{tool}?q=1", request_id=f"allow-{tool}")
    assert answer.status == 200, answer.body
    assert [(u.method, u.target) for u in upstream.seen] == [("GET", f"/tools/{tool}?q=1")]
    entry = await entry_for(pep, f"allow-{tool}")
    assert entry["decision"] == "allow"
    assert entry["reason"] == "allowed"
    assert entry["route"] == tool.replace("_", "-")
    assert entry["attempts"] == 1
    assert entry["decision_id"] == upstream.seen[0].headers["x-pep-decision-id"]


@pytest.mark.parametrize(
    ("tool", "method"),
    [
        ("shell", "GET"),  # an explicit EFFECT_DENY rule
        ("shell", "POST"),
        ("send_email", "GET"),  # allowed only with arguments.to inside the company; a plain route has none
    ],
)
async def test_denied_tool_never_reaches_the_upstream(
    tool: str, method: str, pep: RunningPep, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    answer = await call(client, pep, f"/tools/{tool}", method=method, request_id=f"deny-{tool}")
    assert_denied(answer, "policy_denied")
    assert upstream.seen == []
    entry = await entry_for(pep, f"deny-{tool}")
    assert entry["decision"] == "deny"
    assert entry["reason"] == "policy_denied"
    assert entry["attempts"] == 1


@pytest.mark.parametrize(
    ("target", "method", "allowed"),
    [
        ("/orders?tenant=acme", "GET", True),
        ("/orders/42?tenant=acme&x=1", "GET", True),
        ("/orders?tenant=evil", "GET", False),
        ("/orders", "GET", False),  # no tenant: the property is absent
        ("/orders?tenant=", "GET", False),  # an empty tenant is no tenant
        ("/orders?tenant=ACME", "GET", False),  # case-sensitive
        ("/orders?tenant=acme", "POST", False),  # only GET is allowed
    ],
)
async def test_tenant_rule(
    target: str,
    method: str,
    allowed: bool,
    pep: RunningPep,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    answer = await call(client, pep, target, method=method, request_id="tenant")
    entry = await entry_for(pep, "tenant")
    if allowed:
        assert answer.status == 200, answer.body
        assert [u.target for u in upstream.seen] == [target]
        assert (entry["decision"], entry["reason"]) == ("allow", "allowed")
    else:
        assert_denied(answer, "policy_denied")
        assert upstream.seen == []
        assert (entry["decision"], entry["reason"]) == ("deny", "policy_denied")


@pytest.mark.parametrize("query", ["tenant=acme&tenant=evil", "tenant=evil&tenant=acme"])
async def test_a_repeated_tenant_is_ambiguous_whatever_its_order(
    query: str, pep: RunningPep, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """The mapping reads `tenant.0`: with `tenant=acme&tenant=evil` Cerbos would allow acme while a last-wins
    upstream (PHP, Rails) serves evil's orders."""
    answer = await call(client, pep, f"/orders?{query}", request_id="tenant-twice")
    assert_denied(answer, "request_ambiguous")
    assert upstream.seen == []
    entry = await entry_for(pep, "tenant-twice")
    assert (entry["decision"], entry["reason"]) == ("deny", "request_ambiguous")


async def test_tenant_comes_from_configured_attributes_not_the_caller(
    make_cerbos_pep: CerbosPepFactory, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """The tenant is a fact configured about the workload; a PEP without it cannot read any tenant's orders."""

    def no_attributes(raw: dict[str, Any]) -> None:
        del raw["identity"]["attributes"]

    pep = await make_cerbos_pep(no_attributes)
    assert_denied(await call(client, pep, "/orders?tenant=acme"), "policy_denied")
    async with client.get(pep.url + "/orders?tenant=acme", headers={"x-agent-id": "acme"}) as r:
        assert r.status == 403
    assert (await call(client, pep, "/tools/search")).status == 200
    assert [u.target for u in upstream.seen] == ["/tools/search"]


# --- outages ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_stopped_cerbos_is_pdp_unreachable_and_restart_recovers(
    how: str,
    pep: RunningPep,
    cerbos: CerbosServer,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    assert (await call(client, pep, "/tools/search")).status == 200  # discovery done, a pooled connection open
    upstream.seen.clear()

    await (cerbos.stop() if how == "stop" else cerbos.kill())
    for tool in ("search", "lookup_order", "shell"):
        answer = await call(client, pep, f"/tools/{tool}", request_id=f"down-{tool}")
        assert_denied(answer, "pdp_unreachable")
        assert answer.seconds < 1.0
    assert upstream.seen == []
    entry = await entry_for(pep, "down-search")
    assert (entry["decision"], entry["reason"]) == ("deny", "pdp_unreachable")

    await cerbos.restart()  # same ports: the configured URL and the discovered endpoints still hold
    assert (await call(client, pep, "/tools/search")).status == 200
    assert_denied(await call(client, pep, "/tools/shell"), "policy_denied")
    assert [u.target for u in upstream.seen] == ["/tools/search"]


async def test_cerbos_down_at_pep_start_is_denied_until_it_comes_up(
    make_cerbos_pep: CerbosPepFactory,
    cerbos: CerbosServer,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """No discovery document yet: nothing is guessed, every request is denied until Cerbos answers."""
    await cerbos.stop()
    pep = await make_cerbos_pep()
    assert_denied(await call(client, pep, "/tools/search"), "pdp_unreachable")
    await cerbos.restart()
    assert (await call(client, pep, "/tools/search")).status == 200
    assert len(upstream.seen) == 1


async def test_frozen_cerbos_times_out_opens_the_circuit_and_recovers(
    make_cerbos_pep: CerbosPepFactory,
    cerbos: CerbosServer,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    threshold, open_ms, timeout_ms = 2, 60_000, 200
    clock = FakeClock()

    def tight(raw: dict[str, Any]) -> None:
        raw["pdp"]["timeout_ms"] = timeout_ms
        raw["pdp"]["breaker"] = {"failure_threshold": threshold, "open_ms": open_ms, "half_open_probes": 1}

    pep = await make_cerbos_pep(tight, clock=clock)
    assert (await call(client, pep, "/tools/search")).status == 200
    upstream.seen.clear()

    cerbos.freeze()  # connections are still accepted by the kernel; nothing answers
    for i in range(threshold):
        answer = await call(client, pep, "/tools/search", request_id=f"frozen-{i}")
        assert_denied(answer, "pdp_timeout")
        assert timeout_ms / 1000 * 0.9 <= answer.seconds < timeout_ms / 1000 + 0.5
    entry = await entry_for(pep, "frozen-0")
    assert (entry["decision"], entry["reason"]) == ("deny", "pdp_timeout")

    # Open: denied at once without asking Cerbos (a question would take the whole timeout).
    async with client.get(pep.admin_url + "/readyz") as r:
        assert r.status == 503
    for i in range(3):
        answer = await call(client, pep, "/tools/search", request_id=f"open-{i}")
        assert_denied(answer, "circuit_open")
        assert answer.seconds < 0.1
    entry = await entry_for(pep, "open-0")
    assert (entry["reason"], entry["attempts"], entry["pdp_ms"], entry["circuit"]) == ("circuit_open", 0, None, "open")
    assert upstream.seen == []

    # Cerbos back, but open_ms not over yet: still open.
    cerbos.resume()
    assert_denied(await call(client, pep, "/tools/search"), "circuit_open")

    # open_ms over: the next request is the probe, Cerbos allows, the circuit closes, decisions are real again.
    clock.advance(open_ms / 1000 + 1)
    answer = await call(client, pep, "/tools/search", request_id="probe")
    assert answer.status == 200, answer.body
    assert (await entry_for(pep, "probe"))["decision"] == "allow"
    async with client.get(pep.admin_url + "/readyz") as r:
        assert r.status == 200
    assert (await call(client, pep, "/tools/lookup_order")).status == 200
    assert_denied(await call(client, pep, "/tools/shell"), "policy_denied")
    assert [u.target for u in upstream.seen] == ["/tools/search", "/tools/lookup_order"]


async def test_cerbos_frozen_during_discovery_times_out_then_recovers(
    make_cerbos_pep: CerbosPepFactory,
    cerbos: CerbosServer,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """The metadata fetch itself hangs: each request is denied at its deadline, none waits longer."""

    def quick(raw: dict[str, Any]) -> None:
        raw["pdp"]["timeout_ms"] = 200

    cerbos.freeze()
    pep = await make_cerbos_pep(quick)
    for _ in range(2):
        answer = await call(client, pep, "/tools/search")
        assert_denied(answer, "pdp_timeout")
        assert answer.seconds < 0.7
    cerbos.resume()
    assert (await call(client, pep, "/tools/search")).status == 200
    assert [u.target for u in upstream.seen] == ["/tools/search"]


# --- the AuthZEN batch path ------------------------------------------------------------------------------------

SUBJECT = {"workload": "spiffe://test/agent", "agent": None, "attributes": {"company_domain": "example.com"}}
MCP_ROUTE = Route.build(RouteConfig(name="mcp", path_prefix="/mcp", upstream="http://127.0.0.1:9/mcp"))


def mcp_document(tool: str, arguments: dict[str, Any], request_id: str, method: str = "tools/call") -> dict[str, Any]:
    """A `tools/call` document as the proxy builds it for an MCP route."""
    doc = document(
        request_id=request_id,
        method="POST",
        scheme="http",
        host="127.0.0.1",
        path="/mcp",
        query="",
        headers={"content-type": "application/json"},
        body_bytes=100,
        route=MCP_ROUTE,
        upstream_url=MCP_ROUTE.upstream,
        subject=SUBJECT,
    )
    doc["mcp"] = {"method": method, "name": tool, "arguments": arguments}
    return doc


# One call per tool, so no two evaluations share a resource.
CALLS: list[tuple[str, dict[str, Any], bool]] = [
    ("search", {"q": "x"}, True),
    ("shell", {"cmd": "id"}, False),
    ("send_email", {"to": "bob@example.com", "body": "hi"}, True),
    ("lookup_order", {"id": "42"}, True),
    ("delete_everything", {}, False),
]

# The same tool with different arguments: each call must be decided on its own arguments.
EMAILS: list[tuple[dict[str, Any], bool]] = [
    ({"to": "bob@example.com"}, True),
    ({"to": "bob@evil.com"}, False),
    ({"to": "bob@notexample.com"}, False),
    ({"to": "bob@EXAMPLE.COM"}, False),
    ({"to": ["bob@example.com"]}, False),
    ({"to": 42}, False),
    ({}, False),
    ({"to": "alice@example.com"}, True),
]


@pytest.fixture
async def authzen(cerbos: CerbosServer) -> AsyncIterator[AuthzenPdp]:
    pdp = AuthzenPdp(cerbos.url, HttpTransport(1 << 20, 8))
    yield pdp
    await pdp.close()


def assert_verdicts(results: list[Verdict | Failure], expected: list[bool], what: list[Any]) -> None:
    assert len(results) == len(expected)
    for result, allowed, item in zip(results, expected, what, strict=True):
        assert isinstance(result, Verdict), (item, result)
        assert result.allow is allowed, item
        assert result.reason is (Reason.ALLOWED if allowed else Reason.POLICY_DENIED), item


async def test_batch_returns_one_verdict_per_document_in_order(authzen: AuthzenPdp) -> None:
    docs = [mcp_document(tool, args, f"b-{i}") for i, (tool, args, _) in enumerate(CALLS)]
    verdicts = await authzen.ask_many(docs, "batch-1")
    assert_verdicts(verdicts, [allowed for *_, allowed in CALLS], CALLS)

    # The single-evaluation endpoint decides each document the same way.
    assert [await authzen.ask(d, f"s-{i}") for i, d in enumerate(docs)] == verdicts

    # Reordered, the answers follow their documents.
    assert await authzen.ask_many(docs[::-1], "batch-2") == verdicts[::-1]


@pytest.mark.parametrize("order", ["as_listed", "reversed"])
async def test_batch_decides_each_call_of_one_tool_on_its_own_arguments(order: str, authzen: AuthzenPdp) -> None:
    """A JSON-RPC batch may call one tool twice: an allowed call must not carry a forbidden one with it."""
    emails = EMAILS if order == "as_listed" else EMAILS[::-1]
    docs = [mcp_document("send_email", args, f"e-{i}") for i, (args, _) in enumerate(emails)]
    expected = [allowed for _, allowed in emails]
    assert_verdicts([await authzen.ask(d, f"s-{i}") for i, d in enumerate(docs)], expected, emails)
    assert_verdicts(await authzen.ask_many(docs, "emails"), expected, emails)


async def test_batch_against_a_stopped_cerbos_is_all_unreachable(authzen: AuthzenPdp, cerbos: CerbosServer) -> None:
    docs = [mcp_document(tool, args, f"b-{i}") for i, (tool, args, _) in enumerate(CALLS[:3])]
    assert [v.allow for v in await authzen.ask_many(docs, "up") if isinstance(v, Verdict)] == [True, False, True]
    await cerbos.stop()
    results = await authzen.ask_many(docs, "down")
    assert len(results) == 3
    assert all(isinstance(r, Failure) and r.reason is Reason.PDP_UNREACHABLE for r in results), results


async def test_batch_decides_other_actions_on_one_tool_on_their_own_arguments(authzen: AuthzenPdp) -> None:
    """Cerbos 0.55 groups batch items by subject id and resource, whatever the action: a harmless-looking item
    first must not lend its arguments to a forbidden `tools/call` of the same tool after it."""
    decoy = mcp_document("send_email", {"to": "bob@example.com"}, "d-0", method="tools/describe")
    exfil = mcp_document("send_email", {"to": "x@evil.com"}, "d-1")
    assert [await authzen.ask(d, f"s-{i}") for i, d in enumerate((decoy, exfil))] == [DENIED, DENIED]
    assert await authzen.ask_many([decoy, exfil], "mixed") == [DENIED, DENIED]
