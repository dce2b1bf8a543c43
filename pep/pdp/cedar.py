"""An embedded Cedar PDP (cedarpy): policies parsed once, evaluated in process, any evaluation error a deny.

Principal, action, resource and context come from the same mapping as AuthZEN (`pep/pdp/mapping.py`), with entity
types upper-cased (`agent` -> `Agent`). Cedar has no null and no float: nulls are left out, and floats become
decimals when Cedar's decimal can hold them exactly (4 places), strings otherwise. A record key Cedar reads as
an escape (`__entity`, `__extn`, `__expr`) would let a tool argument forge an entity reference, so such a record
is passed as its JSON text instead.

A deny whose determining policies are all `@approval("approver")` forbid policies naming one approver asks for that
person's approval (`approval_required`); `@approval_message("...")` is the text for them.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Final

import cedarpy
import orjson
from mypy_extensions import mypyc_attr

from pep.decision import Reason
from pep.pdp import UNSENT, ApprovalAsk, Failure, Pdp, Verdict
from pep.pdp.approval import MAX_MESSAGE, approver_of, message_of
from pep.pdp.mapping import AmbiguousMapping, CompiledMapping, MappingError, map_document

_ESCAPES: Final = frozenset({"__entity", "__extn", "__expr"})
_I64: Final = 2**63
_DECIMAL_MAX: Final = 922337203685477.5807
_NOTE_MAX: Final = 256
# Parsed request entities kept for reuse, by their JSON text: Cedar's parse of the principal and resource costs
# more than the evaluation, and most requests repeat one (same agent, route, path and arguments). Bounded in
# entries and, through the largest text kept, in bytes; emptied by a reload. Each set kept holds its own copy of
# the entities file's map (measured: about 180 bytes per entity), so a large file keeps fewer sets: at most
# _ENTITY_SLOTS entities over all of them.
_ENTITIES_CACHED: Final = 256
_ENTITIES_KEY_MAX: Final = 4096
_ENTITY_SLOTS: Final = 16384


# How cedarpy reports a request it could not build (a principal type that is no Cedar name, a string that is not
# valid Unicode in the context): in the diagnostics, not as an exception. Pinned by tests/unit/test_cedar.py.
_BUILD_ERROR: Final = "failed to build request"


def _cannot_take(detail: str) -> Failure:
    """Caller data Cedar cannot take (entities or a request that do not parse): a denial of this request alone,
    `request_ambiguous`, as for the remote PDPs; not an evaluation error of the policies."""
    return Failure(Reason.REQUEST_AMBIGUOUS, "error", False, f"cedar cannot take the request: {detail}"[:_NOTE_MAX])


class CedarLoadError(Exception):
    """The policies or entities cannot be used; the message names the config key and the file."""


def cedar_type(authzen_type: str) -> str:
    return authzen_type[:1].upper() + authzen_type[1:]


def cedar_value(value: Any) -> Any:
    """A JSON value as Cedar's JSON entity/context format reads it (see the module docstring)."""
    kind = type(value)  # exact types first (nearly every value): isinstance only for subclasses, below
    if kind is str or kind is bool or value is None:
        return value
    if kind is dict:
        return _record(value)
    if kind is list:
        return [cedar_value(v) for v in value if v is not None]
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -_I64 <= value < _I64 else str(value)
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) <= _DECIMAL_MAX and round(value, 4) == value:
            return {"__extn": {"fn": "decimal", "arg": f"{value:.4f}"}}
        return str(value)
    if isinstance(value, list):
        return [cedar_value(v) for v in value if v is not None]
    if isinstance(value, dict):
        return _record(value)
    return str(value)


def _record(value: dict[Any, Any]) -> Any:
    if not _ESCAPES.isdisjoint(value):
        return json.dumps(value, sort_keys=True)
    return {str(k): cedar_value(v) for k, v in value.items() if v is not None}


def _json(value: Any) -> str:
    """JSON text for cedarpy. orjson refuses a string that is not valid Unicode (a lone surrogate); the standard
    library escapes it, and Cedar then refuses the request in its own words, as it always did."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value)


def policy_files(path: Path) -> list[Path]:
    """The `.cedar` files `pdp.policies` names: the file itself, or a directory's, in name order."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix == ".cedar" and p.is_file())
    return [path]


def load_policies(path: str) -> cedarpy.PolicySet:
    """Parse a `.cedar` file, or every `.cedar` file of a directory (in name order), into one policy set."""
    texts = []
    for file in policy_files(Path(path)):
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as os_error:
            raise CedarLoadError(f"pdp.policies: cannot read {str(file)!r}: {os_error}") from None
    if Path(path).is_dir() and not texts:
        raise CedarLoadError(f"pdp.policies: no .cedar file in {path!r}")
    try:
        return cedarpy.PolicySet.from_str("\n".join(texts))
    except ValueError as exc:
        raise CedarLoadError(f"pdp.policies: {path!r}: {exc}") from None


def load_entities(path: str | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    try:
        entities = json.loads(Path(path).read_text(encoding="utf-8"))
        cedarpy.Entities.from_json_str(json.dumps(entities))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CedarLoadError(f"pdp.entities: {path!r}: {exc}") from None
    if not isinstance(entities, list):
        raise CedarLoadError(f"pdp.entities: {path!r}: must be a JSON list of entities")
    for e in entities:  # Cedar also reads a uid written as {"__entity": {type, id}}: one form for the merge below
        uid = e["uid"]
        if "__entity" in uid:
            e["uid"] = uid["__entity"]
    return entities


def approval_annotations(policies: cedarpy.PolicySet, path: str) -> dict[str, ApprovalAsk]:
    """The `@approval("approver")` forbid policies (with an optional `@approval_message("...")`), by policy id.

    Refused at load: `@approval` on a permit (an allow needs no approval), or an approver or message that
    `pep.pdp.approval` would not accept from a remote PDP."""
    found: dict[str, ApprovalAsk] = {}
    for policy_id, policy in policies.to_pst().static_policies.items():
        annotations = policy.annotations
        if "approval" not in annotations:
            if "approval_message" in annotations:
                raise CedarLoadError(f"pdp.policies: {path!r}: {policy_id}: @approval_message without @approval")
            continue
        if policy.effect != "forbid":
            raise CedarLoadError(f"pdp.policies: {path!r}: {policy_id}: @approval is only for forbid policies")
        approver = approver_of(annotations["approval"], "@approval")
        if isinstance(approver, Failure):
            raise CedarLoadError(f"pdp.policies: {path!r}: {policy_id}: {approver.detail}")
        message = message_of(annotations.get("approval_message"), "@approval_message")
        if isinstance(message, Failure):
            raise CedarLoadError(f"pdp.policies: {path!r}: {policy_id}: {message.detail}")
        found[policy_id] = ApprovalAsk(approver, message)
    return found


def approval_of(determining: list[str], approvals: dict[str, ApprovalAsk]) -> ApprovalAsk | None:
    """A deny asks for approval when it has determining policies and every one is an `@approval` forbid naming the
    same approver (messages joined); otherwise it stays a policy deny."""
    asks = [approvals.get(policy_id) for policy_id in determining]
    if not asks or any(ask is None for ask in asks):
        return None
    approvers = {ask.approver for ask in asks if ask is not None}
    if len(approvers) != 1:
        return None  # two people would have to approve: one CIBA request cannot ask both
    messages = list(dict.fromkeys(ask.message for ask in asks if ask is not None and ask.message))
    return ApprovalAsk(approvers.pop(), "; ".join(messages)[:MAX_MESSAGE] if messages else None)


@mypyc_attr(allow_interpreted_subclasses=True)
class CedarPdp(Pdp):
    """Evaluates in process. There is nothing remote to fail, so the engine gives it no circuit breaker."""

    remote = False

    def __init__(
        self, policies: str, entities: str | None = None, mappings: dict[str, CompiledMapping] | None = None
    ) -> None:
        self._policies_path = policies
        self._entities_path = entities
        self._mappings = mappings or {}
        self._load()

    def _load(self) -> None:
        policies = load_policies(self._policies_path)
        approvals = approval_annotations(policies, self._policies_path)
        entities = load_entities(self._entities_path)
        file_entities = {(e["uid"]["type"], e["uid"]["id"]): e for e in entities}
        base = cedarpy.Entities.from_json_str(json.dumps(entities))
        # Only now, with everything read: a reload that fails half-way changes nothing.
        self._policies, self._approvals, self._file_entities, self._base = policies, approvals, file_entities, base
        self._parsed: OrderedDict[str, cedarpy.Entities] = OrderedDict()  # parsed against this load's entities
        self._parsed_max = min(_ENTITIES_CACHED, _ENTITY_SLOTS // (len(entities) + 2))

    def reload(self) -> str | None:
        """Re-read the files; on any problem keep the policies in force and say why."""
        try:
            self._load()
        except CedarLoadError as exc:
            return str(exc)
        return None

    def _entities(self, generated: list[dict[str, Any]]) -> cedarpy.Entities:
        text = _json(generated)
        if len(text) > _ENTITIES_KEY_MAX or not self._parsed_max:
            return self._parse_entities(generated, text)
        parsed = self._parsed
        entities = parsed.get(text)
        if entities is not None:
            parsed.move_to_end(text)
            return entities
        entities = self._parse_entities(generated, text)  # raises on entities Cedar cannot take: never cached
        parsed[text] = entities
        if len(parsed) > self._parsed_max:
            parsed.popitem(last=False)
        return entities

    def _parse_entities(self, generated: list[dict[str, Any]], text: str) -> cedarpy.Entities:
        known = [e for e in generated if (e["uid"]["type"], e["uid"]["id"]) in self._file_entities]
        if not known:
            return self._base.with_added_json_str(text)
        # An entity the file also defines keeps the file's parents and attributes, and gains the request's.
        merged = dict(self._file_entities)
        for e in generated:
            key = (e["uid"]["type"], e["uid"]["id"])
            if key in merged:
                attrs = {**e["attrs"], **merged[key].get("attrs", {})}
                merged[key] = {**merged[key], "attrs": attrs}
            else:
                merged[key] = e
        return cedarpy.Entities.from_json_str(json.dumps(list(merged.values())))

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        try:
            parts = map_document(document, self._mappings.get(document["route"]["name"]))
        except AmbiguousMapping as exc:
            return Failure(Reason.REQUEST_AMBIGUOUS, UNSENT, False, f"mapping: {exc}")
        except MappingError as mapping_error:
            return Verdict(False, Reason.PDP_UNDEFINED, note=f"mapping: {mapping_error}")
        principal = {"type": cedar_type(parts.subject["type"]), "id": str(parts.subject["id"])}
        resource = {"type": cedar_type(parts.resource["type"]), "id": str(parts.resource["id"])}
        generated = [
            {"uid": principal, "attrs": cedar_value(parts.subject.get("properties") or {}), "parents": []},
            {"uid": resource, "attrs": cedar_value(parts.resource.get("properties") or {}), "parents": []},
        ]
        if principal == resource:
            generated.pop()
        request = {
            "principal": principal,
            "action": {"type": "Action", "id": str(parts.action["name"])},
            "resource": resource,
            # As text: cedarpy would encode a dict with the standard library's json, several times slower.
            "context": _json(cedar_value(parts.context)),
        }
        try:
            result = cedarpy.is_authorized(request, self._policies, self._entities(generated))
        except (ValueError, TypeError) as value_error:
            return _cannot_take(str(value_error))
        errors = result.diagnostics.errors
        if errors and all(e.startswith(_BUILD_ERROR) for e in errors):
            return _cannot_take("; ".join(errors))
        if errors:
            # Cedar skips a policy whose evaluation fails and may still allow; a PEP must not.
            return Failure(Reason.PDP_ERROR_STATUS, "error", False, f"cedar: {'; '.join(errors)}"[:_NOTE_MAX])
        reasons = ", ".join(result.diagnostics.reasons)[:_NOTE_MAX] or None
        if result.allowed is True:
            return Verdict(True, Reason.ALLOWED, note=reasons)
        ask = approval_of(result.diagnostics.reasons, self._approvals)
        if ask is not None:
            return Verdict(False, Reason.APPROVAL_REQUIRED, note=reasons, approval=ask)
        return Verdict(False, Reason.POLICY_DENIED, note=reasons)

    async def close(self) -> None:
        return None
