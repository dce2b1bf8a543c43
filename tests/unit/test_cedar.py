"""pep.pdp.cedar: values as Cedar reads them (no forged entity references), the embedded PDP's verdicts on small
policy files, loading errors that name the config key, reloads that keep the last good policies, and the engine
around an in-process PDP (no breaker; a late verdict is not used)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cedarpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.breaker import State
from pep.config import PdpConfig, RouteMapping
from pep.decision import Allow, Deny, Reason
from pep.engine import Check, Engine
from pep.headers import obligation_forbidden
from pep.metrics import Metrics
from pep.pdp import Failure, Verdict
from pep.pdp.cedar import CedarLoadError, CedarPdp, cedar_type, cedar_value, load_entities, load_policies
from pep.pdp.mapping import CompiledMapping
from tests.support.documents import pep_document

ALLOW_GET = 'permit(principal, action == Action::"GET", resource == Route::"tools");\n'
BROKEN = "permit(principal, action, resource) when {"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


async def ask(pdp: CedarPdp, doc: dict[str, Any] | None = None) -> Verdict | Failure:
    return await pdp.ask(doc if doc is not None else pep_document(), "rid-1")


async def verdict(pdp: CedarPdp, doc: dict[str, Any] | None = None) -> Verdict:
    result = await ask(pdp, doc)
    assert isinstance(result, Verdict), result
    return result


# --- cedar_value -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s", "s"),
        (True, True),
        (False, False),
        (0, 0),
        (2**63 - 1, 2**63 - 1),
        (-(2**63), -(2**63)),
        (2**63, str(2**63)),
        (-(2**63) - 1, str(-(2**63) - 1)),
        (10**30, str(10**30)),
        (1.5, {"__extn": {"fn": "decimal", "arg": "1.5000"}}),
        (-0.25, {"__extn": {"fn": "decimal", "arg": "-0.2500"}}),
        (2.0, {"__extn": {"fn": "decimal", "arg": "2.0000"}}),
        (0.1234, {"__extn": {"fn": "decimal", "arg": "0.1234"}}),
        (0.12345, "0.12345"),  # more than 4 places: a string, never a rounded decimal
        (1 / 3, str(1 / 3)),
        (1e20, "1e+20"),  # beyond Cedar's decimal range
        (float("inf"), "inf"),
        (float("nan"), "nan"),
        ([1, None, "a"], [1, "a"]),
        ({"a": None, "b": 1}, {"b": 1}),
        (
            {"a": {"b": [1.5, None, {"c": None, "d": 2**64}]}},
            {"a": {"b": [{"__extn": {"fn": "decimal", "arg": "1.5000"}}, {"d": str(2**64)}]}},
        ),
        ({1: "x"}, {"1": "x"}),
    ],
)
def test_cedar_value(value: Any, expected: Any) -> None:
    assert cedar_value(value) == expected


def test_none_is_none_at_the_top() -> None:
    assert cedar_value(None) is None


@pytest.mark.parametrize("key", ["__entity", "__extn", "__expr"])
def test_a_record_with_an_escape_key_becomes_its_json_text(key: str) -> None:
    value = {key: {"type": "Company", "id": "acme"}, "other": 1}
    out = cedar_value(value)
    assert isinstance(out, str)
    assert json.loads(out) == value
    # Also deep inside lists and records.
    assert cedar_value({"args": [value]}) == {"args": [out]}


def test_cedar_decimals_are_accepted_by_cedar() -> None:
    policy = 'permit(principal, action, resource) when { context.price.lessThan(decimal("2.0")) };'
    request = {
        "principal": {"type": "Agent", "id": "a"},
        "action": {"type": "Action", "id": "GET"},
        "resource": {"type": "Route", "id": "r"},
        "context": cedar_value({"price": 1.5}),
    }
    result = cedarpy.is_authorized(request, policy, [])
    assert result.allowed is True, result.diagnostics.errors


def test_a_forged_entity_in_tool_arguments_cannot_satisfy_an_in_check() -> None:
    policy = 'permit(principal, action, resource) when { context.arguments.x in Company::"acme" };'
    arguments = {"x": {"__entity": {"type": "Company", "id": "acme"}}}

    def request(context: Any) -> dict[str, Any]:
        return {
            "principal": {"type": "Agent", "id": "a"},
            "action": {"type": "Action", "id": "tools/call"},
            "resource": {"type": "Tool", "id": "t"},
            "context": context,
        }

    # The attack is real: handed to Cedar as is, the argument is an entity reference and the policy permits.
    assert cedarpy.is_authorized(request({"arguments": arguments}), policy, []).allowed is True
    # Through cedar_value it is a string: the `in` check is an evaluation error, never a permit.
    escaped = cedarpy.is_authorized(request(cedar_value({"arguments": arguments})), policy, [])
    assert escaped.allowed is False
    assert escaped.diagnostics.errors


async def test_a_forged_entity_in_tool_arguments_through_the_pdp(tmp_path: Path) -> None:
    policy = 'permit(principal, action, resource) when { context.arguments.x in Company::"acme" };'
    pdp = CedarPdp(write(tmp_path / "p.cedar", policy))
    mcp = {"method": "tools/call", "name": "t", "arguments": {"x": {"__entity": {"type": "Company", "id": "acme"}}}}
    result = await ask(pdp, pep_document(method="POST", mcp=mcp))
    assert isinstance(result, Failure)
    assert result.reason is Reason.PDP_ERROR_STATUS


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["a", "b", "__entity", "__extn", "__expr"]) | st.text(max_size=4), inner, max_size=3
        )
    ),
    max_leaves=10,
)


def _only_generated_escapes(value: Any) -> bool:
    """The only escape record in Cedar's input is the decimal extension cedar_value makes itself."""
    if isinstance(value, list):
        return all(_only_generated_escapes(v) for v in value)
    if isinstance(value, dict):
        if value.keys() & {"__entity", "__extn", "__expr"}:
            return (
                set(value) == {"__extn"}
                and set(value["__extn"]) == {"fn", "arg"}
                and value["__extn"]["fn"] == "decimal"
            )
        return all(_only_generated_escapes(v) for v in value.values())
    return value is None or isinstance(value, bool | int | str)


def _holds_none(value: Any) -> bool:
    if isinstance(value, list):
        return any(v is None or _holds_none(v) for v in value)
    if isinstance(value, dict):
        return any(v is None or _holds_none(v) for v in value.values())
    return False


@given(JSON_VALUES)
def test_cedar_value_never_passes_an_escape_or_a_null_through(value: Any) -> None:
    out = cedar_value(value)
    assert _only_generated_escapes(out)
    assert (out is None) == (value is None)
    assert not _holds_none(out)
    if out is not None:
        # Whatever it is, Cedar accepts it as a context attribute.
        request = {
            "principal": {"type": "Agent", "id": "a"},
            "action": {"type": "Action", "id": "GET"},
            "resource": {"type": "Route", "id": "r"},
            "context": {"v": out},
        }
        cedarpy.is_authorized(request, "permit(principal, action, resource);", [])


def test_cedar_type() -> None:
    assert cedar_type("agent") == "Agent"
    assert cedar_type("route") == "Route"
    assert cedar_type("Tool") == "Tool"
    assert cedar_type("mcpServer") == "McpServer"


# --- verdicts --------------------------------------------------------------------------------------------------


async def test_allow_and_deny(tmp_path: Path) -> None:
    pdp = CedarPdp(write(tmp_path / "p.cedar", ALLOW_GET))
    allowed = await verdict(pdp)
    assert allowed.allow is True
    assert allowed.reason is Reason.ALLOWED
    assert allowed.note == "policy0"  # the ids Cedar gives policies parsed from text
    denied = await verdict(pdp, pep_document(method="POST"))
    assert denied.allow is False
    assert denied.reason is Reason.POLICY_DENIED
    other_route = await verdict(pdp, pep_document(route="admin"))
    assert other_route.reason is Reason.POLICY_DENIED


async def test_a_forbid_overrides_a_permit(tmp_path: Path) -> None:
    text = ALLOW_GET + "forbid(principal, action, resource) when { context.query has q };"
    pdp = CedarPdp(write(tmp_path / "p.cedar", text))
    assert (await verdict(pdp)).reason is Reason.POLICY_DENIED
    assert (await verdict(pdp, pep_document(query={}))).allow is True


async def test_policies_see_the_mapped_principal_resource_and_context(tmp_path: Path) -> None:
    text = (
        'permit(principal == Agent::"spiffe://w", action == Action::"tools/call", resource == Tool::"send_email")\n'
        'when { principal.agent == "bot-7" && principal.team == "support" && resource.route == "tools"\n'
        '  && context.arguments.to == "a@example.com" && context.arguments.amount.greaterThan(decimal("1.0"))\n'
        '  && !(context.arguments has skip) && context.request_id == "rid-1" };'
    )
    pdp = CedarPdp(write(tmp_path / "p.cedar", text))
    subject = {"workload": "spiffe://w", "agent": "bot-7", "attributes": {"team": "support"}}
    mcp = {
        "method": "tools/call",
        "name": "send_email",
        "arguments": {"to": "a@example.com", "amount": 1.25, "skip": None},
    }
    assert (await verdict(pdp, pep_document(method="POST", subject=subject, mcp=mcp))).allow is True


async def test_a_name_nobody_verified_is_never_the_verified_user(tmp_path: Path) -> None:
    """Each source of a principal is its own entity type: `User::"alice"` is only a token whose `sub` is alice."""
    pdp = CedarPdp(write(tmp_path / "p.cedar", 'permit(principal == User::"alice", action, resource);'))
    user: dict[str, Any] = {"workload": "spiffe://w", "agent": None, "id": "alice", "claims": {}}
    assert (await verdict(pdp, pep_document(subject=user))).allow is True
    for subject in (
        {"workload": "spiffe://w", "agent": None, "id": None, "claims": None, "unverified_agent": "alice"},
        {"workload": "spiffe://w", "agent": "alice"},
        {"workload": "alice", "agent": None},
        {"workload": None, "agent": "alice"},
    ):
        assert (await verdict(pdp, pep_document(subject=subject))).reason is Reason.POLICY_DENIED, subject


async def test_an_evaluation_error_denies_even_when_another_policy_permits(tmp_path: Path) -> None:
    text = ALLOW_GET + "permit(principal, action, resource) when { context.missing == 1 };\n"
    pdp = CedarPdp(write(tmp_path / "p.cedar", text))
    result = await ask(pdp)
    assert isinstance(result, Failure)
    assert result.reason is Reason.PDP_ERROR_STATUS
    assert result.retryable is False
    assert "policy1" in result.detail
    # Guarded with `has`, the same policy is fine.
    guarded = ALLOW_GET + "permit(principal, action, resource) when { context has missing && context.missing == 1 };"
    pdp2 = CedarPdp(write(tmp_path / "g.cedar", guarded))
    assert (await verdict(pdp2)).allow is True


@pytest.mark.parametrize("text", ["", "\n\n", "// no policies yet\n"])
async def test_an_empty_policy_set_denies(tmp_path: Path, text: str) -> None:
    pdp = CedarPdp(write(tmp_path / "p.cedar", text))
    result = await verdict(pdp)
    assert result.allow is False
    assert result.reason is Reason.POLICY_DENIED


async def test_a_directory_of_policy_files(tmp_path: Path) -> None:
    d = tmp_path / "policies"
    d.mkdir()
    write(d / "10-get.cedar", 'permit(principal, action == Action::"GET", resource);  // no newline at the end')
    write(d / "20-post.cedar", 'permit(principal, action == Action::"POST", resource);')
    write(d / "README.md", BROKEN)  # not a .cedar file: ignored
    (d / "sub.cedar").mkdir()  # a directory, even with the suffix: ignored
    pdp = CedarPdp(str(d))
    # Files are read in name order: 10-get holds policy0.
    assert (await verdict(pdp)).note == "policy0"
    assert (await verdict(pdp, pep_document(method="POST"))).note == "policy1"
    assert (await verdict(pdp, pep_document(method="DELETE"))).reason is Reason.POLICY_DENIED


def test_a_directory_without_policy_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CedarLoadError, match=r"pdp\.policies: no \.cedar file"):
        load_policies(str(tmp_path))


ENTITIES = [
    {
        "uid": {"type": "Agent", "id": "spiffe://test/agent"},
        "attrs": {"clearance": 3, "workload": "from-the-file"},
        "parents": [{"type": "Company", "id": "acme"}],
    },
    {"uid": {"type": "Company", "id": "acme"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Route", "id": "tools"}, "attrs": {}, "parents": [{"type": "Company", "id": "acme"}]},
]


async def test_entities_from_the_file_keep_their_parents_for_the_request_principal(tmp_path: Path) -> None:
    text = (
        'permit(principal in Company::"acme", action, resource in Company::"acme") when { principal.clearance >= 3 };'
    )
    pdp = CedarPdp(write(tmp_path / "p.cedar", text), write(tmp_path / "e.json", json.dumps(ENTITIES)))
    assert (await verdict(pdp)).allow is True
    # Another principal is not in the file: not in Company::"acme".
    other = pep_document(subject={"workload": "spiffe://test/other", "agent": None})
    assert (await verdict(pdp, other)).reason is Reason.POLICY_DENIED


async def test_file_attributes_win_over_request_attributes(tmp_path: Path) -> None:
    text = 'permit(principal, action, resource) when { principal.workload == "from-the-file" };'
    pdp = CedarPdp(write(tmp_path / "p.cedar", text), write(tmp_path / "e.json", json.dumps(ENTITIES)))
    assert (await verdict(pdp)).allow is True


async def test_parsed_entities_reused_only_for_the_same_request_entities(tmp_path: Path) -> None:
    """Request entities parsed once are reused by their JSON text: another path is another resource, never the
    entities of an earlier request; one that is too large to keep is decided as usual."""
    pdp = CedarPdp(write(tmp_path / "p.cedar", 'permit(principal, action, resource) when { resource.path == "/a" };'))

    def at(path: str) -> dict[str, Any]:
        doc = pep_document()
        doc["request"] = {**doc["request"], "path": path}
        return doc

    outcomes = [(await verdict(pdp, at(path))).allow for path in ("/a", "/b", "/a", "/b", "/a" + "x" * 5000)]
    assert outcomes == [True, False, True, False, False]
    assert len(pdp._parsed) == 2  # /a and /b; the long path was not kept


async def test_parsed_entities_are_bounded_and_emptied_by_a_reload(tmp_path: Path) -> None:
    text = 'permit(principal in Company::"acme", action, resource);'
    entities = tmp_path / "e.json"
    pdp = CedarPdp(write(tmp_path / "p.cedar", text), write(entities, json.dumps(ENTITIES)))
    assert (await verdict(pdp)).allow is True
    # The agent leaves the company: the same request's entities, kept from before, must not keep its parent.
    write(entities, json.dumps(ENTITIES).replace('"parents": [{"type": "Company", "id": "acme"}]', '"parents": []', 1))
    assert pdp.reload() is None
    assert (await verdict(pdp)).reason is Reason.POLICY_DENIED
    for i in range(300):
        doc = pep_document()
        doc["request"] = {**doc["request"], "path": f"/tools/{i}"}
        await ask(pdp, doc)
    assert len(pdp._parsed) == 256


async def test_a_large_entities_file_keeps_fewer_parsed_sets(tmp_path: Path) -> None:
    """Every set kept copies the file's entity map: with 1,000 entities in the file, 16 sets, not 256."""
    people = [{"uid": {"type": "User", "id": f"u{i}"}, "attrs": {}, "parents": []} for i in range(998)]
    pdp = CedarPdp(
        write(tmp_path / "p.cedar", "permit(principal, action, resource);"),
        write(tmp_path / "e.json", json.dumps(people)),
    )
    for i in range(40):
        doc = pep_document()
        doc["request"] = {**doc["request"], "path": f"/tools/{i}"}
        assert (await verdict(pdp, doc)).allow is True
    assert len(pdp._parsed) == 16


async def test_entities_with_escaped_uids(tmp_path: Path) -> None:
    entities = [
        {
            "uid": {"__entity": {"type": "Agent", "id": "spiffe://test/agent"}},
            "attrs": {},
            "parents": [{"__entity": {"type": "Company", "id": "acme"}}],
        }
    ]
    pdp = CedarPdp(
        write(tmp_path / "p.cedar", 'permit(principal in Company::"acme", action, resource);'),
        write(tmp_path / "e.json", json.dumps(entities)),
    )
    assert (await verdict(pdp)).allow is True


async def test_a_route_mapping_changes_principal_and_resource_types(tmp_path: Path) -> None:
    text = 'permit(principal is User, action == Action::"read", resource == Tenant::"acme");'
    mapping = CompiledMapping.compile(
        RouteMapping(subject_type="user", action="read", resource_type="tenant", resource_id="$request.query.tenant.0")
    )
    pdp = CedarPdp(write(tmp_path / "p.cedar", text), None, {"tools": mapping})
    assert (await verdict(pdp, pep_document(query={"tenant": ["acme"]}))).allow is True
    assert (await verdict(pdp, pep_document(query={"tenant": ["beta"]}))).reason is Reason.POLICY_DENIED
    absent = await verdict(pdp, pep_document(query={}))
    assert absent.reason is Reason.PDP_UNDEFINED
    assert absent.note is not None
    assert absent.note.startswith("mapping: resource.id")


async def test_a_mapping_picking_one_of_repeated_query_values_is_ambiguous(tmp_path: Path) -> None:
    """`tenant=acme&tenant=evil` is not asked about as `Tenant::"acme"`: a last-wins upstream would serve evil."""
    text = 'permit(principal, action, resource == Tenant::"acme");'
    mapping = CompiledMapping.compile(RouteMapping(resource_type="tenant", resource_id="$request.query.tenant.0"))
    pdp = CedarPdp(write(tmp_path / "p.cedar", text), None, {"tools": mapping})
    result = await ask(pdp, pep_document(query={"tenant": ["acme", "evil"]}))
    assert isinstance(result, Failure)
    assert result.reason is Reason.REQUEST_AMBIGUOUS
    assert "repeated" in result.detail


async def test_a_type_cedar_cannot_name_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    """Entities Cedar cannot read are the request's problem (`request_ambiguous`), not an evaluation error."""
    mapping = CompiledMapping.compile(RouteMapping(resource_type="not a type"))
    pdp = CedarPdp(write(tmp_path / "p.cedar", "permit(principal, action, resource);"), None, {"tools": mapping})
    result = await ask(pdp)
    assert isinstance(result, Failure)
    assert result.reason is Reason.REQUEST_AMBIGUOUS


async def test_a_request_cedar_cannot_build_is_reported_in_its_diagnostics(tmp_path: Path) -> None:
    """Pins how cedarpy reports a request (here its context) it cannot build: in the diagnostics, under
    `_BUILD_ERROR`, not as an exception. Another cedarpy that words it otherwise fails here, not in production
    (where it would be `pdp_error_status`: a denial all the same)."""
    pdp = CedarPdp(write(tmp_path / "p.cedar", "permit(principal, action, resource);"))
    doc = pep_document()
    doc["request"] = {**doc["request"], "id": "\ud800"}  # in the context only, not in an entity
    result = await ask(pdp, doc)
    assert isinstance(result, Failure)
    assert result.reason is Reason.REQUEST_AMBIGUOUS
    assert result.detail.startswith("cedar cannot take the request: failed to build request")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"subject": {"id": "a\udcff"}}, id="user-id-not-utf8"),  # a User principal's id
        pytest.param({"subject": {"workload": "spiffe://t/w\udcff"}}, id="agent-id-not-utf8"),  # an Agent's id
        pytest.param({"subject": {"agent": "a\udcff"}}, id="agent-header-not-utf8"),  # only a property now
        pytest.param({"subject": {"workload": "w", "claims": {"dept": "\ud800"}}}, id="claim-lone-surrogate"),
        pytest.param({"request": {"host": "h\udcff"}}, id="host-not-utf8"),
        pytest.param({"approval": {"approver": "b\udcff", "id": "a-1"}}, id="approval-not-utf8"),  # a re-ask
    ],
)
async def test_caller_data_cedar_cannot_take_denies_that_request_alone(
    tmp_path: Path, change: dict[str, dict[str, Any]]
) -> None:
    """A string that is not valid Unicode (a header byte that is not UTF-8, a token claim with a lone surrogate
    escape) reaches Cedar's entities or context: a denial of that request, `request_ambiguous`; the next request is
    decided as usual."""
    pdp = CedarPdp(write(tmp_path / "p.cedar", "permit(principal, action, resource);"))
    doc = pep_document()
    for key, values in change.items():
        doc[key] = {**doc.get(key, {}), **values}
    for _ in range(3):
        result = await ask(pdp, doc)
        assert isinstance(result, Failure)
        assert result.reason is Reason.REQUEST_AMBIGUOUS
        assert result.detail.startswith("cedar cannot take the request")
    assert (await verdict(pdp, pep_document())).allow is True


# --- loading and reloading -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [BROKEN, "allow(principal, action, resource);", "permit(principal, action, resource) when { context.x == };"],
)
def test_bad_policy_text_names_pdp_policies(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "bad.cedar", text)
    with pytest.raises(CedarLoadError) as info:
        CedarPdp(path)
    assert str(info.value).startswith("pdp.policies: ")
    assert path in str(info.value)


def test_a_bad_file_in_a_directory_names_pdp_policies(tmp_path: Path) -> None:
    write(tmp_path / "a.cedar", ALLOW_GET)
    write(tmp_path / "b.cedar", BROKEN)
    with pytest.raises(CedarLoadError, match=r"^pdp\.policies: "):
        CedarPdp(str(tmp_path))


def test_a_missing_policy_file_names_pdp_policies(tmp_path: Path) -> None:
    with pytest.raises(CedarLoadError, match=r"^pdp\.policies: cannot read"):
        CedarPdp(str(tmp_path / "missing.cedar"))


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"uid": {"type": "A", "id": "a"}}),
        json.dumps([{"uid": {"type": "A"}, "attrs": {}, "parents": []}]),
        json.dumps([1]),
    ],
)
def test_bad_entities_name_pdp_entities(tmp_path: Path, content: str) -> None:
    with pytest.raises(CedarLoadError, match=r"^pdp\.entities: "):
        load_entities(write(tmp_path / "e.json", content))


def test_a_missing_entities_file_names_pdp_entities(tmp_path: Path) -> None:
    with pytest.raises(CedarLoadError, match=r"^pdp\.entities: "):
        CedarPdp(write(tmp_path / "p.cedar", ALLOW_GET), str(tmp_path / "missing.json"))


async def test_reload_keeps_the_old_policies_when_the_new_text_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "p.cedar"
    pdp = CedarPdp(write(path, ALLOW_GET))
    assert (await verdict(pdp)).allow is True
    write(path, BROKEN)
    problem = pdp.reload()
    assert problem is not None
    assert problem.startswith("pdp.policies: ")
    assert (await verdict(pdp)).allow is True  # still the last good policies
    path.unlink()
    assert pdp.reload() is not None
    assert (await verdict(pdp)).allow is True


async def test_reload_picks_up_a_valid_change(tmp_path: Path) -> None:
    path = tmp_path / "p.cedar"
    pdp = CedarPdp(write(path, ALLOW_GET))
    write(path, 'permit(principal, action == Action::"POST", resource);')
    assert pdp.reload() is None
    assert (await verdict(pdp)).reason is Reason.POLICY_DENIED
    assert (await verdict(pdp, pep_document(method="POST"))).allow is True


async def test_reload_with_broken_entities_keeps_policies_and_entities(tmp_path: Path) -> None:
    policies = tmp_path / "p.cedar"
    entities = tmp_path / "e.json"
    pdp = CedarPdp(
        write(policies, 'permit(principal in Company::"acme", action, resource);'),
        write(entities, json.dumps(ENTITIES)),
    )
    assert (await verdict(pdp)).allow is True
    # New policies that would deny everything, but the entities file is broken: nothing changes.
    write(policies, "")
    write(entities, "[")
    problem = pdp.reload()
    assert problem is not None
    assert problem.startswith("pdp.entities: ")
    assert (await verdict(pdp)).allow is True


# --- the engine around an in-process PDP -----------------------------------------------------------------------


class StepClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowCedar(CedarPdp):
    """A Cedar PDP whose evaluation takes `cost` seconds of (fake) time: it cannot be interrupted."""

    def __init__(self, policies: str, clock: StepClock, cost: float) -> None:
        super().__init__(policies)
        self.clock = clock
        self.cost = cost
        self.calls = 0

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        self.calls += 1
        self.clock.now += self.cost
        return await super().ask(document, request_id)


def cedar_engine(pdp: CedarPdp, clock: StepClock, timeout_ms: int = 250) -> Engine:
    config = PdpConfig(kind="cedar", policies="unused", timeout_ms=timeout_ms, retries=1)
    return Engine(pdp, config, Metrics(("tools",)), clock)


def cedar_check() -> Check:
    return Check(pep_document(), "rid-1", "tools", "GET", "http://u/x", obligation_forbidden(None))


async def test_an_in_process_pdp_gets_no_breaker(tmp_path: Path) -> None:
    text = "permit(principal, action, resource) when { context.missing == 1 };"
    clock = StepClock()
    pdp = SlowCedar(write(tmp_path / "p.cedar", text), clock, 0.0)
    engine = cedar_engine(pdp, clock)
    assert engine.breaker is None
    for _ in range(20):
        outcome = await engine.decide(cedar_check())
        assert isinstance(outcome.decision, Deny)
        assert outcome.decision.reason is Reason.PDP_ERROR_STATUS
        assert outcome.attempts == 1  # not retryable
    assert engine.circuit is State.CLOSED
    assert pdp.calls == 20


async def test_a_verdict_after_the_deadline_is_a_timeout(tmp_path: Path) -> None:
    clock = StepClock()
    pdp = SlowCedar(write(tmp_path / "p.cedar", ALLOW_GET), clock, 0.3)
    engine = cedar_engine(pdp, clock, timeout_ms=250)
    outcome = await engine.decide(cedar_check())
    assert isinstance(outcome.decision, Deny)
    assert outcome.decision.reason is Reason.PDP_TIMEOUT
    assert outcome.attempts == 1
    assert pdp.calls == 1
    # In time, the same policy allows.
    pdp.cost = 0.2
    assert isinstance((await engine.decide(cedar_check())).decision, Allow)


async def test_a_principal_that_is_also_the_resource(tmp_path: Path) -> None:
    # A mapping can make both Route::"tools": one entity, with the subject's properties.
    mapping = CompiledMapping.compile(RouteMapping(subject_type="route"))
    text = 'permit(principal, action, resource) when { principal == resource && resource.workload == "tools" };'
    pdp = CedarPdp(write(tmp_path / "p.cedar", text), None, {"tools": mapping})
    assert (await verdict(pdp, pep_document(subject={"workload": "tools", "agent": None}))).allow is True


DEMO_POLICY = str(Path(__file__).resolve().parents[2] / "config" / "policies" / "demo.cedar")


@pytest.mark.parametrize(
    ("tenants", "allowed"),
    [
        (["acme"], True),
        (["acme", "acme"], True),
        (["acme", "evil"], False),
        (["evil", "acme"], False),
        (["evil"], False),
    ],
)
async def test_the_demo_policy_allows_only_the_agents_own_tenant_alone(tenants: list[str], allowed: bool) -> None:
    """`contains` allowed `?tenant=acme&tenant=evil`, which an upstream reading the last value serves as evil."""
    pdp = CedarPdp(DEMO_POLICY)
    subject = {"workload": "spiffe://test/agent", "agent": None, "attributes": {"tenant": "acme"}}
    doc = pep_document(path="/tools/lookup_order", query={"tenant": tenants}, subject=subject)
    assert (await verdict(pdp, doc)).allow is allowed
