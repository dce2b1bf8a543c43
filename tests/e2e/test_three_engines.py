"""One policy, three engines: the same tool rules in Rego (OPA), Cerbos YAML (AuthZEN) and Cedar decide alike.

The rules: a support agent may call `search` and `lookup_order`; `send_email` only when the string argument `to`
ends with "@" + the agent's company domain (case-sensitive); all three are listed to it (`tools/list` of the tool,
no arguments: send_email is listed although only some of its calls are allowed); it may read, list and complete
the prompt `refund_reply` (a completion is decided on the prompt it completes, so it is allowed exactly where
reading the prompt is); `shell` never; anything else is denied. All of it for identified callers (the workload,
or a verified token's subject); a caller with neither gets nothing, even when it names itself in the agent header.

Every case is one `pep/v1` document put to the PEP's own PDP clients:
- OPA: `OpaPdp` against an OPA-shaped server evaluating config/policies/rego with regorus;
- Cerbos: `AuthzenPdp` against a real Cerbos serving config/policies/cerbos;
- Cedar: the embedded `CedarPdp` with config/policies/cedar.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pep.attributes import document
from pep.config import RouteConfig
from pep.decision import Reason
from pep.pdp import Failure, Verdict
from pep.pdp.authzen import AuthzenPdp
from pep.pdp.cedar import CedarPdp
from pep.pdp.opa import OpaPdp
from pep.pdp.transport import HttpTransport
from pep.routing import Route
from tests.support.cerbos import CerbosServer
from tests.support.rego_pdp import RegoPdp

REPO = Path(__file__).resolve().parents[2]
CEDAR_POLICIES = REPO / "config" / "policies" / "cedar"

ACME = "acme.example"
GLOBEX = "globex.example"
WORKLOAD = "spiffe://cluster.local/ns/agents/sa/support-bot"
MCP_ROUTE = Route.build(
    RouteConfig(name="mcp", path_prefix="/mcp", upstream="http://127.0.0.1:9/mcp", strip_prefix=True, protocol="mcp")
)
_ABSENT: Any = object()  # an argument or attribute left out of the document altogether


@dataclass(frozen=True)
class Case:
    id: str
    tool: str | None
    arguments: Any
    company_domain: str | None
    allow: bool
    method: str = "tools/call"
    subject: str = "agent"  # see SUBJECTS
    facts: tuple[tuple[str, str], ...] = ()  # more MCP facts (a completion's ref_type and argument)
    # Cedar has no type test, so a `to` that is not a string makes its `like` an evaluation error, which the Cedar
    # PDP reports as a Failure (a deny in the PEP). Such a case expects that Failure instead of a Verdict.
    cedar_type_error: bool = False


CASES = [
    Case("search", "search", {"query": "refund policy"}, ACME, True),
    Case("lookup_order", "lookup_order", {"order_id": "A-1001"}, ACME, True),
    Case("shell", "shell", {"command": "id"}, ACME, False),
    Case("unknown_tool", "delete_everything", {}, ACME, False),
    Case("send_email_own_domain", "send_email", {"to": "bob@acme.example", "body": "hi"}, ACME, True),
    Case("send_email_other_domain", "send_email", {"to": "bob@evil.example"}, ACME, False),
    Case("send_email_domain_as_prefix", "send_email", {"to": "bob@acme.example.evil.com"}, ACME, False),
    Case("send_email_lookalike_domain", "send_email", {"to": "bob@evil-acme.example"}, ACME, False),
    Case("send_email_subdomain", "send_email", {"to": "bob@mail.acme.example"}, ACME, False),
    Case("send_email_other_case", "send_email", {"to": "BOB@ACME.EXAMPLE"}, ACME, False),
    Case("send_email_no_to", "send_email", {"subject": "hi"}, ACME, False),
    Case("send_email_no_arguments", "send_email", _ABSENT, ACME, False),
    Case("send_email_to_number", "send_email", {"to": 42}, ACME, False, cedar_type_error=True),
    Case("send_email_to_list", "send_email", {"to": ["bob@acme.example"]}, ACME, False, cedar_type_error=True),
    Case("globex_own_domain", "send_email", {"to": "x@globex.example"}, GLOBEX, True),
    Case("globex_to_acme", "send_email", {"to": "bob@acme.example"}, GLOBEX, False),
    Case("acme_to_globex", "send_email", {"to": "x@globex.example"}, ACME, False),
    Case("no_company_domain", "send_email", {"to": "bob@acme.example"}, None, False),
    Case("empty_company_domain", "send_email", {"to": "bob@"}, "", False),
    Case("tools_call_without_name", None, _ABSENT, ACME, False),
    Case("tools_list", None, _ABSENT, ACME, False, method="tools/list"),
    Case("search_listed", "search", None, ACME, True, method="tools/list"),
    Case("lookup_order_listed", "lookup_order", None, ACME, True, method="tools/list"),
    Case("send_email_listed_whatever_its_arguments", "send_email", None, ACME, True, method="tools/list"),
    Case("send_email_listed_without_a_domain", "send_email", None, None, True, method="tools/list"),
    Case("shell_never_listed", "shell", None, ACME, False, method="tools/list"),
    Case("unknown_tool_not_listed", "delete_everything", None, ACME, False, method="tools/list"),
    Case("listed_anonymous", "search", None, ACME, False, method="tools/list", subject="anonymous"),
    Case("prompts_get", "search", {}, ACME, False, method="prompts/get"),
    Case("refund_reply_get", "refund_reply", {"order_id": "A-1"}, ACME, True, method="prompts/get"),
    Case("refund_reply_listed", "refund_reply", None, ACME, True, method="prompts/list"),
    Case("other_prompt_get", "internal_notes", {}, ACME, False, method="prompts/get"),
    Case(
        "refund_reply_completed",
        "refund_reply",
        None,
        ACME,
        True,
        method="completion/complete",
        facts=(("ref_type", "ref/prompt"), ("argument", "order_id")),
    ),
    Case(
        "other_prompt_completed",
        "internal_notes",
        None,
        ACME,
        False,
        method="completion/complete",
        facts=(("ref_type", "ref/prompt"), ("argument", "x")),
    ),
    Case(
        "resource_template_completed",
        "file:///{path}",
        None,
        ACME,
        False,
        method="completion/complete",
        facts=(("ref_type", "ref/resource"), ("argument", "path")),
    ),
    Case(
        "refund_reply_completed_anonymous",
        "refund_reply",
        None,
        ACME,
        False,
        method="completion/complete",
        subject="anonymous",
        facts=(("ref_type", "ref/prompt"), ("argument", "order_id")),
    ),
    Case("search_as_a_verified_user", "search", {"query": "refunds"}, ACME, True, subject="user"),
    Case("send_email_as_a_verified_user", "send_email", {"to": "bob@acme.example"}, ACME, True, subject="user"),
    Case("search_anonymous", "search", {"query": "refunds"}, ACME, False, subject="anonymous"),
    Case("search_named_only_by_the_agent_header", "search", {"query": "x"}, ACME, False, subject="header"),
]

# The subject the PEP builds, by how the caller is known (without attributes, added per case).
SUBJECTS: dict[str, dict[str, Any]] = {
    "agent": {"workload": WORKLOAD, "agent": "support-bot"},  # a sidecar's workload, the agent header believed
    "user": {"workload": WORKLOAD, "agent": "support-bot", "id": "alice", "claims": {}, "unverified_agent": None},
    "anonymous": {"workload": None, "agent": None},
    "header": {"workload": None, "agent": None, "id": None, "claims": None, "unverified_agent": "support-bot"},
}


def pep_document(case: Case, request_id: str) -> dict[str, Any]:
    """The `pep/v1` document the PEP builds for one MCP call on the `mcp` route (MCP facts added by hand)."""
    attributes = {"tenant": "acme"}
    if case.company_domain is not None:
        attributes["company_domain"] = case.company_domain
    doc = document(
        request_id=request_id,
        method="POST",
        scheme="http",
        host="127.0.0.1:8080",
        path="/mcp",
        query="",
        headers={"content-type": "application/json", "accept": "application/json, text/event-stream"},
        body_bytes=120,
        route=MCP_ROUTE,
        upstream_url=MCP_ROUTE.upstream,
        subject={**SUBJECTS[case.subject], "attributes": attributes},
    )
    mcp: dict[str, Any] = {"method": case.method}
    if case.tool is not None:
        mcp["name"] = case.tool
    if case.arguments is not _ABSENT:
        mcp["arguments"] = case.arguments
    mcp["protocol_version"] = "2025-11-25"
    mcp["direction"] = "server_to_client" if case.method.endswith("/list") and case.tool else "client_to_server"
    mcp.update(case.facts)
    doc["mcp"] = mcp
    return doc


@pytest.fixture
async def rego_pdp() -> AsyncIterator[RegoPdp]:
    pdp = RegoPdp()
    await pdp.start()
    yield pdp
    await pdp.stop()


@pytest.fixture
async def opa(rego_pdp: RegoPdp) -> AsyncIterator[OpaPdp]:
    pdp = OpaPdp(rego_pdp.url, HttpTransport(1048576, 16))
    yield pdp
    await pdp.close()


@pytest.fixture
async def authzen(cerbos: CerbosServer) -> AsyncIterator[AuthzenPdp]:
    pdp = AuthzenPdp(cerbos.url, HttpTransport(1048576, 16))
    yield pdp
    await pdp.close()


@pytest.fixture
async def cedar() -> AsyncIterator[CedarPdp]:
    pdp = CedarPdp(str(CEDAR_POLICIES))
    yield pdp
    await pdp.close()


def decision(engine: str, case: Case, result: Verdict | Failure) -> bool:
    """The engine's allow/deny, with the checks every well-formed answer must pass."""
    if isinstance(result, Failure):
        expected_error = engine == "cedar" and case.cedar_type_error and "type error" in result.detail
        assert expected_error, f"{engine}: no decision for {case.id}: {result.reason.value}: {result.detail}"
        return False
    assert result.reason is (Reason.ALLOWED if result.allow else Reason.POLICY_DENIED), f"{engine}: {result}"
    return result.allow


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_three_engines_decide_alike(
    case: Case, rego_pdp: RegoPdp, opa: OpaPdp, authzen: AuthzenPdp, cedar: CedarPdp
) -> None:
    pdps: dict[str, OpaPdp | AuthzenPdp | CedarPdp] = {"opa": opa, "cerbos": authzen, "cedar": cedar}
    docs = {name: pep_document(case, f"{case.id}-{name}") for name in pdps}
    results = {name: await pdp.ask(docs[name], f"{case.id}-{name}") for name, pdp in pdps.items()}
    assert rego_pdp.inputs == [docs["opa"]]  # regorus evaluated exactly the document the PEP's OPA client sent
    decisions = {name: decision(name, case, result) for name, result in results.items()}
    assert decisions == dict.fromkeys(pdps, case.allow), f"{case.id}: expected allow={case.allow}, got {results}"


def test_table_has_both_outcomes_for_every_rule() -> None:
    """The table is worth running only if each rule is seen both allowing and denying."""
    assert {c.allow for c in CASES if c.tool == "send_email"} == {True, False}
    assert {c.allow for c in CASES if c.company_domain == GLOBEX} == {True, False}
    assert {c.allow for c in CASES if c.method == "tools/list"} == {True, False}
    assert {c.allow for c in CASES if c.method == "completion/complete"} == {True, False}
    assert len({c.id for c in CASES}) == len(CASES) >= 14


async def test_regorus_pdp_speaks_opa_errors_and_undefined(rego_pdp: RegoPdp, opa: OpaPdp) -> None:
    """The test PDP is OPA-shaped: an undefined document is `{}`, and a body that is not JSON is OPA's 400."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{rego_pdp.base_url}/v1/data/pep/nothing", json={"input": {}}) as resp:
            assert resp.status == 200
            assert await resp.json() == {}
        async with session.post(rego_pdp.url, data=b'{"input": ') as resp:
            assert resp.status == 400
            assert (await resp.json())["code"] == "invalid_parameter"
    # No MCP facts at all (a plain HTTP request): the default applies, with a reason.
    doc = pep_document(CASES[0], "plain-http")
    del doc["mcp"]
    verdict = await opa.ask(doc, "plain-http")
    assert verdict == Verdict(False, Reason.POLICY_DENIED, note="not a tool or prompt this agent may use")


REFUND_APPROVER = "alice@example.com"
APPROVED = {"approver": REFUND_APPROVER, "approved_at": "2026-11-24T12:00:00Z", "id": "a1"}


async def test_issue_refund_asks_a_person_in_rego_and_cedar_cerbos_cannot(
    rego_pdp: RegoPdp, opa: OpaPdp, authzen: AuthzenPdp, cedar: CedarPdp
) -> None:
    """The shipped approval rule: `issue_refund` is "approval required" (alice@example.com, "Issue a refund") in
    Rego and Cedar, allowed once the input holds her approval, and never for an anonymous caller or on another's
    approval. Cerbos answers AuthZEN with `decision` alone, so its copy has no such rule: a plain denial."""
    pdps: dict[str, OpaPdp | AuthzenPdp | CedarPdp] = {"opa": opa, "cerbos": authzen, "cedar": cedar}

    async def ask(subject: str, approval: dict[str, str] | None) -> dict[str, Verdict | Failure]:
        case = Case("refund", "issue_refund", {"order_id": "A-1", "amount": 250}, ACME, False, subject=subject)
        found = {}
        for name, pdp in pdps.items():
            doc = pep_document(case, f"refund-{name}")
            if approval is not None:
                doc["approval"] = approval
            found[name] = await pdp.ask(doc, f"refund-{name}")
        return found

    asked = await ask("agent", None)
    for name in ("opa", "cedar"):
        verdict = asked[name]
        assert isinstance(verdict, Verdict), verdict
        assert (verdict.allow, verdict.reason) == (False, Reason.APPROVAL_REQUIRED)
        assert verdict.approval is not None
        assert (verdict.approval.approver, verdict.approval.message) == (REFUND_APPROVER, "Issue a refund")
    assert isinstance(asked["cerbos"], Verdict)
    assert (asked["cerbos"].allow, asked["cerbos"].reason) == (False, Reason.POLICY_DENIED)

    approved = await ask("agent", APPROVED)
    assert {name: isinstance(v, Verdict) and v.allow for name, v in approved.items()} == {
        "opa": True,
        "cerbos": False,
        "cedar": True,
    }
    for answers in (await ask("agent", {**APPROVED, "approver": "bob@example.com"}), await ask("anonymous", None)):
        assert not any(isinstance(v, Verdict) and v.allow for v in answers.values()), answers
    anonymous = await ask("anonymous", None)
    assert all(isinstance(v, Verdict) and v.reason is Reason.POLICY_DENIED for v in anonymous.values()), anonymous
