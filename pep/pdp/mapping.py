"""From the `pep/v1` document to subject, action, resource and context: the shape AuthZEN and Cedar decide on.

One mapping serves both PDP kinds, so a policy written for one sees the same facts in the other. Pure functions;
per-route changes are compiled once at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from pep.config import RouteMapping

_MISSING: Final = object()
_FACTS: Final = ("route", "method", "host", "path", "query")


class MappingError(ValueError):
    """The document does not hold what the mapping needs (e.g. the resource id path is absent)."""


class AmbiguousMapping(MappingError):
    """The mapping picks one value of a query field the caller repeated (`tenant=acme&tenant=evil`): upstreams
    disagree on which one counts (Flask and Go take the first, PHP and Rails the last, Express a list), so the PDP
    would be asked about one while the upstream acts on another. The request is ambiguous, not the mapping."""


@dataclass(frozen=True, slots=True)
class Ref:
    """A mapping value: a literal string, or a dotted path into the document (`$request.headers.x-tenant`)."""

    literal: str | None
    path: tuple[str, ...] = ()
    picks_query_value: bool = False  # `$request.query.NAME.N`: one of a field's values, by position

    def __post_init__(self) -> None:
        object.__setattr__(self, "picks_query_value", self.path[:2] == ("request", "query") and len(self.path) > 3)

    @classmethod
    def parse(cls, text: str) -> Ref:
        if text.startswith("$$"):
            return cls(text[1:])
        if text.startswith("$"):
            return cls(None, tuple(text[1:].split(".")))
        return cls(text)

    def resolve(self, doc: dict[str, Any]) -> Any:
        if self.literal is not None:
            return self.literal
        value: Any = doc
        for part in self.path:
            if isinstance(value, dict):
                value = value.get(part, _MISSING)
            elif isinstance(value, list) and self.picks_query_value and len(value) > 1:
                raise AmbiguousMapping(f"query field {self.path[2]!r} is repeated; the mapping picks one value")
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return None
            if value is _MISSING:
                return None
        return value


@dataclass(frozen=True, slots=True)
class CompiledMapping:
    subject_type: Ref | None
    subject_properties: tuple[tuple[str, Ref], ...] | None
    action: Ref | None
    resource_type: Ref | None
    resource_id: Ref | None
    resource_properties: tuple[tuple[str, Ref], ...] | None

    @classmethod
    def compile(cls, m: RouteMapping) -> CompiledMapping:
        def ref(text: str | None) -> Ref | None:
            return Ref.parse(text) if text is not None else None

        def props(pairs: tuple[tuple[str, str], ...] | None) -> tuple[tuple[str, Ref], ...] | None:
            return tuple((k, Ref.parse(v)) for k, v in pairs) if pairs is not None else None

        return cls(
            ref(m.subject_type),
            props(m.subject_properties),
            ref(m.action),
            ref(m.resource_type),
            ref(m.resource_id),
            props(m.resource_properties),
        )


@dataclass(frozen=True, slots=True)
class Parts:
    """The four AuthZEN members; Cedar builds its principal, action, resource and context from the same."""

    subject: dict[str, Any]
    action: dict[str, Any]
    resource: dict[str, Any]
    context: dict[str, Any]


USER: Final = "user"  # a verified token's `sub`
AGENT: Final = "agent"  # the workload behind the listener: the peer's SPIFFE ID (mTLS), else `identity.workload`
ANONYMOUS: Final = "anonymous"  # neither


def principal(doc: dict[str, Any]) -> tuple[str, str]:
    """Whom the decision is about, as (type, id); the type says where the id comes from.

    Names from different sources must never be one principal: a caller with no token must not become the user
    whose token says `sub: alice`, however it names itself. So the id is only ever a name the PEP verified or
    was configured with, and the type tells them apart: the agent header (which nobody verified) is never an id,
    only a property; ids are scoped to their type (AuthZEN), and each type is its own entity type in Cedar."""
    subject = doc.get("subject") or {}
    sub = subject.get("id")
    if isinstance(sub, str) and sub:
        return USER, sub
    workload = subject.get("workload")
    if isinstance(workload, str) and workload:
        return AGENT, workload
    return ANONYMOUS, ANONYMOUS


def _drop_none(d: dict[Any, Any]) -> dict[Any, Any]:  # keys as given: a key that is not a string is refused later
    return {k: v for k, v in d.items() if v is not None}


def default_parts(doc: dict[str, Any]) -> Parts:
    request = doc["request"]
    route = doc["route"]
    subject = doc.get("subject") or {}
    mcp = doc.get("mcp")
    model = doc.get("model")
    facts: dict[str, Any] = {
        "route": route["name"],
        "method": request["method"],
        "host": request.get("host"),
        "path": request["path"],
        "query": request.get("query") or {},
    }
    if mcp is not None:
        action, resource = _mcp_parts(mcp, route["name"])
        facts["name"] = mcp.get("name")
        facts["arguments"] = mcp.get("arguments")
        for key in _MCP_FACTS:
            facts[key] = mcp.get(key)
    elif model is not None:
        action, resource = _model_parts(model, facts)
    elif request["method"] == "CONNECT":
        action = "connect"  # a tunnel, decided on host:port alone (`host`); its contents are never inspected
        resource = {"type": "route", "id": route["name"]}
        facts["upstream"] = route.get("upstream_url")
    else:
        action = request["method"]
        resource = {"type": "route", "id": route["name"]}
    facts = _drop_none(facts)
    properties = _drop_none(
        {
            "workload": subject.get("workload"),
            "agent": subject.get("agent"),
            "unverified_agent": subject.get("unverified_agent"),
            "claims": subject.get("claims") or {},
            **(subject.get("attributes") or {}),
        }
    )
    context = dict(facts)
    context["request_id"] = request["id"]
    context["time"] = request["time"]
    if doc.get("approval") is not None:  # asked again after a person approved (AuthZEN: `context.approval`)
        context["approval"] = doc["approval"]
    kind, name = principal(doc)
    return Parts(
        subject={"type": kind, "id": name, "properties": properties},
        action={"name": action},
        resource={**resource, "properties": facts},
        context=context,
    )


# MCP facts that go into the properties as they are (absent ones are left out).
_MCP_FACTS: Final = ("direction", "replies_to", "fields", "tools", "ref_type", "argument")
_KINDS: Final = {"tools": "tool", "prompts": "prompt", "resources": "resource"}
_REFS: Final = {"ref/prompt": "prompt", "ref/resource": "resource"}


def _mcp_parts(mcp: dict[str, Any], route: str) -> tuple[str, dict[str, str]]:
    """The action is the MCP method; the resource the tool, prompt or resource it names (`tools/call`,
    `prompts/get`, `resources/read`, and a list's visibility of one item: `tools/list` of a tool), the prompt or
    resource template a `completion/complete` completes, else the route."""
    method = mcp.get("method") or ""
    name = mcp.get("name")
    if method == "completion/complete":
        rtype = _REFS.get(mcp.get("ref_type") or "")
    else:
        rtype = _KINDS.get(method.split("/", 1)[0])
    if not name or rtype is None:
        return method, {"type": "route", "id": route}
    return method, {"type": rtype, "id": name}


def _model_parts(model: dict[str, Any], facts: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """A model call (`model.invoke`: the model, or for a call whose model the PEP cannot see, the endpoint), a
    tool an answer calls (`model.tool_call`: the tool), or a model that answered in another's place
    (`model.answer`: the answering model)."""
    action = model.get("action") or "model.invoke"
    name = model.get("name")
    facts.update(
        endpoint=model.get("endpoint"),
        read=model.get("read"),
        stream=model.get("stream"),
        n=model.get("n"),
        tools=model.get("tools"),
    )
    if action == "model.tool_call":
        facts.update(name=model.get("tool"), model=name)
        return action, {"type": "tool", "id": str(model.get("tool"))}
    if action == "model.answer":
        facts.update(name=model.get("answered"), decided=name)
        return action, {"type": "model", "id": str(model.get("answered"))}
    facts["name"] = name
    if name is None:
        return action, {"type": "endpoint", "id": str(model.get("endpoint") or "unknown")}
    return action, {"type": "model", "id": name}


def map_document(doc: dict[str, Any], mapping: CompiledMapping | None) -> Parts:
    """The default parts, with a route's changes applied. Raises MappingError when a needed value is absent."""
    parts = default_parts(doc)
    if mapping is None:
        return parts
    if mapping.subject_type is not None:
        parts.subject["type"] = _required(mapping.subject_type, doc, "subject.type")
    if mapping.subject_properties is not None:
        parts.subject["properties"] = _properties(mapping.subject_properties, doc)
    if mapping.action is not None:
        parts.action["name"] = _required(mapping.action, doc, "action.name")
    if mapping.resource_type is not None:
        parts.resource["type"] = _required(mapping.resource_type, doc, "resource.type")
    if mapping.resource_id is not None:
        parts.resource["id"] = _required(mapping.resource_id, doc, "resource.id")
    if mapping.resource_properties is not None:
        parts.resource["properties"] = _properties(mapping.resource_properties, doc)
    return parts


def _required(ref: Ref, doc: dict[str, Any], name: str) -> str:
    value = ref.resolve(doc)
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise MappingError(f"{name} maps to nothing usable ({value!r})")
    return str(value)


def _properties(pairs: tuple[tuple[str, Ref], ...], doc: dict[str, Any]) -> dict[str, Any]:
    return _drop_none({name: ref.resolve(doc) for name, ref in pairs})
