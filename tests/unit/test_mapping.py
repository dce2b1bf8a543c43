"""pep.pdp.mapping: the `pep/v1` document as AuthZEN subject, action, resource and context (README,
"Default mapping"), and per-route changes with literals and `$paths`."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pep.config import RouteMapping
from pep.pdp.mapping import (
    AmbiguousMapping,
    CompiledMapping,
    MappingError,
    Parts,
    Ref,
    default_parts,
    map_document,
    principal,
)
from tests.support.documents import pep_document

doc = pep_document


def compiled(**kwargs: Any) -> CompiledMapping:
    return CompiledMapping.compile(RouteMapping(**kwargs))


# --- default parts ---------------------------------------------------------------------------------------------


def test_plain_http_request() -> None:
    parts = default_parts(doc(method="POST", query={"q": ["1", "2"]}))
    facts = {
        "route": "tools",
        "method": "POST",
        "host": "127.0.0.1:8080",
        "path": "/tools/search",
        "query": {"q": ["1", "2"]},
    }
    assert parts.action == {"name": "POST"}
    assert parts.resource == {"type": "route", "id": "tools", "properties": facts}
    assert parts.subject == {
        "type": "agent",
        "id": "spiffe://test/agent",
        "properties": {"workload": "spiffe://test/agent", "claims": {}},
    }
    assert parts.context == {**facts, "request_id": "rid-1", "time": "2026-01-01T00:00:00.000Z"}


def test_absent_host_and_query_are_dropped_or_empty() -> None:
    d = doc()
    del d["request"]["host"]
    d["request"]["query"] = None
    parts = default_parts(d)
    assert "host" not in parts.resource["properties"]
    assert parts.resource["properties"]["query"] == {}


def test_mcp_tools_call() -> None:
    mcp = {"method": "tools/call", "name": "send_email", "arguments": {"to": "a@example.com", "n": 2}}
    parts = default_parts(doc(method="POST", mcp=mcp, protocol="mcp"))
    assert parts.action == {"name": "tools/call"}
    assert parts.resource["type"] == "tool"
    assert parts.resource["id"] == "send_email"
    props = parts.resource["properties"]
    assert props["name"] == "send_email"
    assert props["arguments"] == {"to": "a@example.com", "n": 2}
    assert props["method"] == "POST"  # the HTTP facts stay
    assert props["route"] == "tools"
    # The same facts go into the context.
    assert parts.context["name"] == "send_email"
    assert parts.context["arguments"] == {"to": "a@example.com", "n": 2}


@pytest.mark.parametrize(
    ("method", "name", "rtype", "rid"),
    [
        ("prompts/get", "summarise", "prompt", "summarise"),
        ("resources/read", "file:///etc/motd", "resource", "file:///etc/motd"),
        ("resources/subscribe", "db://t/1", "resource", "db://t/1"),
        ("tools/list", None, "route", "tools"),
        ("prompts/list", None, "route", "tools"),
        ("initialize", None, "route", "tools"),
        ("tools/call", "", "route", "tools"),  # an empty name is no name
        ("completion/complete", "x", "route", "tools"),
    ],
)
def test_mcp_resource_types(method: str, name: str | None, rtype: str, rid: str) -> None:
    mcp: dict[str, Any] = {"method": method, "name": name, "arguments": None}
    parts = default_parts(doc(method="POST", mcp=mcp, protocol="mcp"))
    assert parts.action == {"name": method}
    assert parts.resource["type"] == rtype
    assert parts.resource["id"] == rid
    if name is None:
        assert "name" not in parts.resource["properties"]
    assert "arguments" not in parts.resource["properties"]  # None is dropped


def test_model_request() -> None:
    model = {"name": "gpt-x", "stream": True, "tools": ["search"]}
    parts = default_parts(doc(method="POST", model=model, protocol="openai"))
    assert parts.action == {"name": "model.invoke"}
    assert parts.resource["type"] == "model"
    assert parts.resource["id"] == "gpt-x"
    props = parts.resource["properties"]
    assert (props["name"], props["stream"], props["tools"]) == ("gpt-x", True, ["search"])
    assert parts.context["stream"] is True


def test_model_without_a_name_is_its_endpoint_and_nones_are_dropped() -> None:
    """A call whose model the PEP cannot see is decided on its endpoint: a policy allows such endpoints by name."""
    model = {"action": "model.invoke", "endpoint": "batches", "name": None, "read": False, "stream": None, "n": None}
    parts = default_parts(doc(method="POST", model={**model, "tools": []}))
    assert parts.action == {"name": "model.invoke"}
    assert (parts.resource["type"], parts.resource["id"]) == ("endpoint", "batches")
    props = parts.resource["properties"]
    assert "name" not in props
    assert "stream" not in props
    assert (props["endpoint"], props["read"], props["tools"]) == ("batches", False, [])
    named = default_parts(doc(method="POST", model={"name": "m", "stream": False, "tools": None}))
    assert named.resource["properties"]["stream"] is False  # False is a value, not an absence
    assert "tools" not in named.resource["properties"]


def test_answer_side_model_documents() -> None:
    """A tool an answer calls is the tool resource under action model.tool_call; a model answering in another's
    place is a model resource under model.answer; both keep the decided model as a property."""
    base = {"endpoint": "chat.completions", "name": "gpt-x", "read": True, "stream": True, "n": 2, "tools": ["s"]}
    call = default_parts(doc(method="POST", model={**base, "action": "model.tool_call", "tool": "send_email"}))
    assert call.action == {"name": "model.tool_call"}
    assert (call.resource["type"], call.resource["id"]) == ("tool", "send_email")
    assert (call.resource["properties"]["name"], call.resource["properties"]["model"]) == ("send_email", "gpt-x")
    assert call.context["n"] == 2
    answer = default_parts(doc(method="POST", model={**base, "action": "model.answer", "answered": "gpt-y"}))
    assert answer.action == {"name": "model.answer"}
    assert (answer.resource["type"], answer.resource["id"]) == ("model", "gpt-y")
    assert (answer.resource["properties"]["name"], answer.resource["properties"]["decided"]) == ("gpt-y", "gpt-x")


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ({"workload": "w", "agent": "a", "id": "alice"}, ("user", "alice")),
        ({"workload": "w", "agent": "a", "claims": {}}, ("agent", "w")),
        ({"workload": "w", "agent": "a"}, ("agent", "w")),  # the agent header is never the id
        ({"workload": "w", "agent": None, "unverified_agent": "alice"}, ("agent", "w")),
        ({"workload": "w", "agent": ""}, ("agent", "w")),
        ({"workload": "w", "agent": "a", "id": ""}, ("agent", "w")),
        ({"workload": "w", "agent": "a", "id": 42}, ("agent", "w")),  # not a string
        ({"workload": None, "agent": "alice"}, ("anonymous", "anonymous")),
        ({"workload": None, "agent": None}, ("anonymous", "anonymous")),
        ({"workload": "", "agent": None, "claims": None}, ("anonymous", "anonymous")),
        ({}, ("anonymous", "anonymous")),
    ],
)
def test_the_principal_is_a_verified_or_configured_name_typed_by_where_it_comes_from(
    subject: dict[str, Any], expected: tuple[str, str]
) -> None:
    d = doc(subject=subject)
    assert principal(d) == expected
    parts = default_parts(d)
    assert (parts.subject["type"], parts.subject["id"]) == expected


def test_an_unverified_name_never_shares_a_principal_with_a_verified_one() -> None:
    """`x-agent-id: alice` without a token, on any listener, is never the user whose token says `sub: alice`."""
    verified = default_parts(doc(subject={"workload": "w", "agent": None, "id": "alice", "claims": {}})).subject
    for subject in (
        {"workload": "w", "agent": None, "id": None, "claims": None, "unverified_agent": "alice"},  # with identity.jwt
        {"workload": "w", "agent": "alice"},  # without identity.jwt
        {"workload": None, "agent": "alice"},
        {"workload": "alice", "agent": None},  # a workload named like a user: same id, another type
    ):
        other = default_parts(doc(subject=subject)).subject
        assert (other["type"], other["id"]) != (verified["type"], verified["id"])
        assert other["type"] != verified["type"]


def test_subject_without_a_subject_object() -> None:
    d = doc()
    del d["subject"]
    assert principal(d) == ("anonymous", "anonymous")
    assert default_parts(d).subject["properties"] == {"claims": {}}


def test_identity_attributes_are_flattened_into_subject_properties() -> None:
    subject = {
        "workload": "spiffe://w",
        "agent": "bot-1",
        "id": "alice",
        "claims": {"sub": "alice", "department": "support"},
        "attributes": {"team": "support", "tier": "gold", "nothing": None},
    }
    parts = default_parts(doc(subject=subject))
    assert parts.subject == {
        "type": "user",
        "id": "alice",
        "properties": {
            "workload": "spiffe://w",
            "agent": "bot-1",
            "claims": {"sub": "alice", "department": "support"},
            "team": "support",
            "tier": "gold",
        },
    }


def test_the_document_is_not_changed() -> None:
    d = doc(mcp={"method": "tools/call", "name": "t", "arguments": {"a": 1}})
    before = copy.deepcopy(d)
    mapping = compiled(subject_type="user", resource_properties=(("x", "$request.path"),), action="call")
    map_document(d, mapping)
    assert d == before


# --- Ref -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tool", "tool"),
        ("$request.method", "GET"),
        ("$request.headers.x-tenant", "acme"),
        ("$request.query.tenant.0", "acme"),
        ("$request.query.tenant.1", None),  # out of range
        ("$request.query.tenant.x", None),  # not an index
        ("$request.query.tenant.-1", None),
        ("$request.query.tenant", ["acme"]),
        ("$request.nope", None),
        ("$request.method.more", None),  # through a string
        ("$$literal", "$literal"),
        ("$$", "$"),
        ("a$b", "a$b"),
        ("$route", {"name": "tools", "protocol": "http", "upstream": "http://u/", "upstream_url": "http://u/x"}),
    ],
)
def test_ref_resolves_literals_and_paths(text: str, expected: Any) -> None:
    d = doc(query={"tenant": ["acme"]})
    assert Ref.parse(text).resolve(d) == expected


@pytest.mark.parametrize("text", ["$request.query.tenant.0", "$request.query.tenant.1", "$request.query.tenant.5"])
def test_picking_one_value_of_a_repeated_query_field_is_ambiguous(text: str) -> None:
    """`tenant=acme&tenant=evil`: Flask and Go read acme, PHP and Rails evil; whichever value the mapping picks,
    some upstream acts on the other one."""
    with pytest.raises(AmbiguousMapping, match="'tenant' is repeated"):
        Ref.parse(text).resolve(doc(query={"tenant": ["acme", "evil"]}))


def test_a_repeated_query_field_taken_whole_is_not_ambiguous() -> None:
    assert Ref.parse("$request.query.tenant").resolve(doc(query={"tenant": ["acme", "evil"]})) == ["acme", "evil"]
    assert Ref.parse("$mcp.arguments.to.1").resolve({"mcp": {"arguments": {"to": ["a", "b"]}}}) == "b"


# --- map_document ----------------------------------------------------------------------------------------------


def test_no_mapping_is_the_default() -> None:
    d = doc()
    assert map_document(d, None) == default_parts(d)


def test_an_empty_mapping_is_the_default() -> None:
    d = doc()
    assert map_document(d, compiled()) == default_parts(d)


def test_overrides_with_literals_and_paths() -> None:
    mapping = compiled(
        subject_type="user",
        action="$$read",
        resource_type="tenant",
        resource_id="$request.query.tenant.0",
    )
    parts = map_document(doc(query={"tenant": ["acme"]}), mapping)
    assert parts.subject["type"] == "user"
    assert parts.subject["id"] == "spiffe://test/agent"  # the id is never mapped
    assert parts.action == {"name": "$read"}
    assert parts.resource["type"] == "tenant"
    assert parts.resource["id"] == "acme"
    # Properties not mapped stay the default ones.
    assert parts.resource["properties"]["route"] == "tools"
    assert parts.subject["properties"]["workload"] == "spiffe://test/agent"


def test_an_integer_value_becomes_a_string_id() -> None:
    d = doc()
    d["request"]["body_bytes"] = 12
    assert map_document(d, compiled(resource_id="$request.body_bytes")).resource["id"] == "12"


def test_properties_are_replaced_not_merged() -> None:
    mapping = compiled(
        subject_properties=(("team", "support"), ("agent_id", "$subject.agent")),
        resource_properties=(
            ("tenant", "$request.headers.x-tenant"),
            ("missing", "$request.nope"),
            ("q", "$request.query"),
        ),
    )
    parts = map_document(doc(subject={"workload": "w", "agent": "bot"}), mapping)
    assert parts.subject["properties"] == {"team": "support", "agent_id": "bot"}
    assert parts.resource["properties"] == {"tenant": "acme", "q": {"q": ["1"]}}  # None dropped
    # The context keeps the default facts.
    assert parts.context["route"] == "tools"
    assert parts.context["path"] == "/tools/search"


def test_empty_properties_mapping_empties_them() -> None:
    parts = map_document(doc(), compiled(resource_properties=()))
    assert parts.resource["properties"] == {}


@pytest.mark.parametrize(
    ("field", "ref", "name"),
    [
        ("resource_id", "$request.query.tenant.0", "resource.id"),  # absent query parameter
        ("resource_id", "$request.query", "resource.id"),  # an object, not a string
        ("resource_id", "$request.query.q", "resource.id"),  # a list
        ("resource_type", "$request.headers.x-missing", "resource.type"),
        ("action", "$request.body_bytes", "action.name"),  # null
        ("subject_type", "$request.headers.x-empty", "subject.type"),  # ""
        ("action", "$mcp.name", "action.name"),  # no mcp member at all
        ("resource_id", "$subject.flag", "resource.id"),  # a boolean
    ],
)
def test_a_required_value_that_resolves_to_nothing_is_a_mapping_error(field: str, ref: str, name: str) -> None:
    d = doc()
    d["request"]["headers"]["x-empty"] = ""
    d["subject"]["flag"] = True
    with pytest.raises(MappingError, match=name):
        map_document(d, compiled(**{field: ref}))


def test_compiled_mapping_keeps_none_as_default() -> None:
    m = compiled(action="x")
    assert m.action == Ref("x")
    assert m.resource_id is None
    assert m.subject_properties is None
    assert isinstance(map_document(doc(), m), Parts)


def test_connect_is_the_connect_action_on_the_route_with_its_host() -> None:
    d = doc(method="CONNECT", path="", query={}, route="egress")
    d["request"]["host"] = "api.example.com:443"
    d["route"]["upstream_url"] = "api.example.com:443"
    parts = default_parts(d)
    assert parts.action == {"name": "connect"}
    assert parts.resource["type"] == "route"
    assert parts.resource["id"] == "egress"
    props = parts.resource["properties"]
    assert props["method"] == "CONNECT"
    assert props["host"] == "api.example.com:443"
    assert props["upstream"] == "api.example.com:443"
