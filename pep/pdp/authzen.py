"""OpenID AuthZEN Authorization API 1.0: discovery, single evaluations and batches, read strictly.

Endpoints come only from the PDP's metadata document, whose `policy_decision_point` must equal the configured
base URL (the spec's defence against mix-ups). Without valid metadata nothing is guessed: every request is denied.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from pep.cache_control import ttl_of
from pep.decision import Reason
from pep.pdp import BATCH_CONCURRENCY, GATE, NOT_ADMITTED, UNSENT, Failure, Pdp, Verdict, admitted, ask_each, encode
from pep.pdp.answer import malformed, read_object
from pep.pdp.approval import authzen_approval
from pep.pdp.credential import credential_narrowing
from pep.pdp.mapping import AmbiguousMapping, CompiledMapping, MappingError, Parts, map_document
from pep.pdp.transport import HttpTransport, RawAnswer, request_headers
from pep.secret_file import FileSecret

WELL_KNOWN: Final = "/.well-known/authzen-configuration"
DEFAULT_TTL_S: Final = 300.0  # metadata lifetime when the PDP sends no Cache-Control max-age
DISCOVERY_TIMEOUT_S: Final = 5.0  # one metadata fetch; callers still give up at their own decision deadline
_NOTE_MAX: Final = 256
_REASON_KEYS: Final = ("reason", "reason_admin", "reason_user")


def metadata_url(base: str) -> str:
    """RFC 8615: the well-known segment goes between the authority and the base URL's path."""
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{parts.path.rstrip('/')}"


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


def same_pdp(a: str, b: str) -> bool:
    """Two PDP identifiers name the same PDP: same origin (default ports implied) and path (a trailing `/` aside)."""
    try:
        return _origin(a) == _origin(b) and urlsplit(a).path.rstrip("/") == urlsplit(b).path.rstrip("/")
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Endpoints:
    evaluation: str
    evaluations: str | None


def _unreachable(failure: Failure) -> Failure:
    """Any failure to read the metadata denies `pdp_unreachable`; it is retried only when the cause would be."""
    return Failure(Reason.PDP_UNREACHABLE, failure.outcome, failure.retryable, f"discovery: {failure.detail}")


def _safe_origin(url: str, origin: tuple[str, str, int | None]) -> bool:
    try:
        return _origin(url) == origin
    except ValueError:
        return False


def parse_metadata(answer: RawAnswer | Failure, base: str) -> Endpoints | Failure:
    """Validate a metadata answer. Any failure to read it is `pdp_unreachable`; a mismatch is `pdp_malformed`."""
    if isinstance(answer, Failure):
        return _unreachable(answer)
    obj = read_object(answer)
    if isinstance(obj, Failure):
        return _unreachable(obj)
    pdp = obj.get("policy_decision_point")
    if not isinstance(pdp, str) or not same_pdp(pdp, base):
        return malformed(f"discovery: policy_decision_point {str(pdp)[:100]!r} is not {base!r}")
    origin = _origin(base)
    found: dict[str, str | None] = {}
    for key, required in (("access_evaluation_endpoint", True), ("access_evaluations_endpoint", False)):
        url = obj.get(key)
        if url is None and not required:
            found[key] = None
            continue
        if not isinstance(url, str) or not _safe_origin(url, origin):
            return malformed(f"discovery: {key} {str(url)[:100]!r} is not on the PDP's origin")
        found[key] = url
    evaluation = found["access_evaluation_endpoint"]
    assert evaluation is not None
    return Endpoints(evaluation, found["access_evaluations_endpoint"])


def _note(context: dict[str, Any] | None) -> str | None:
    """A reason from the decision context, for the decision log. Key names are not standardised."""
    if not context:
        return None
    for key in _REASON_KEYS:
        if key in context:
            value = context[key]
            text = value if isinstance(value, str) else orjson.dumps(value).decode()
            return text[:_NOTE_MAX]
    return None


def parse_decision(obj: Any) -> Verdict | Failure:
    """One AuthZEN decision object: allow iff `decision` is `true` and there are no obligations. A denial with
    `context.access_request` (a requestable denial) asks for a person's approval: `approval_required`. An allow's
    `context.credential` narrows the route's just-in-time credential."""
    if not isinstance(obj, dict):
        return malformed(f"a decision is a {type(obj).__name__}, not an object")
    if "decision" not in obj:
        return Verdict(False, Reason.PDP_UNDEFINED)
    decision = obj["decision"]
    if not isinstance(decision, bool):
        return malformed(f"decision is a {type(decision).__name__}, not a boolean")
    context = obj.get("context")
    if context is not None and not isinstance(context, dict):
        return malformed("context is not an object")
    note = _note(context)
    access_request = context.get("access_request") if context else None
    if access_request is not None:
        if decision:
            return malformed("context.access_request with decision: true (a requestable denial is a denial)")
        ask = authzen_approval(access_request)
        if isinstance(ask, Failure):
            return ask
        return Verdict(False, Reason.APPROVAL_REQUIRED, note=note, approval=ask)
    if not decision:
        return Verdict(False, Reason.POLICY_DENIED, note=note)
    obligations = context.get("obligations") if context else None
    if obligations is not None and obligations != []:
        # The PEP carries out no obligation yet; the Obligations Profile says such a response MUST be a deny.
        return Verdict(False, Reason.OBLIGATION_UNSUPPORTED, note="obligations present, none supported")
    if context and context.get("credential") is not None:
        credential = credential_narrowing(context["credential"], "context.credential")
        if isinstance(credential, Failure):
            return credential
        return Verdict(True, Reason.ALLOWED, note=note, credential=credential)
    return Verdict(True, Reason.ALLOWED, note=note)


def _read(answer: RawAnswer | Failure, request_id: str) -> dict[str, Any] | Failure:
    if isinstance(answer, Failure):
        return answer
    obj = read_object(answer)
    if isinstance(obj, Failure):
        return obj
    if answer.request_id is not None and answer.request_id != request_id:
        return malformed("X-Request-ID echoed by the PDP differs from the one sent")
    return obj


def parse_evaluation(answer: RawAnswer | Failure, request_id: str) -> Verdict | Failure:
    obj = _read(answer, request_id)
    return obj if isinstance(obj, Failure) else parse_decision(obj)


def parse_evaluations(answer: RawAnswer | Failure, request_id: str, count: int) -> list[Verdict | Failure]:
    """A batch answer under `execute_all`: one result per request, in order; a missing result is a deny."""
    obj = _read(answer, request_id)
    if isinstance(obj, Failure):
        return [obj] * count
    results = obj.get("evaluations")
    if not isinstance(results, list):
        return [malformed("evaluations is not a list")] * count
    if len(results) > count:
        return [malformed(f"{len(results)} results for {count} evaluations")] * count
    missing = Verdict(False, Reason.PDP_UNDEFINED, note="no result for this evaluation")
    return [parse_decision(r) for r in results] + [missing] * (count - len(results))


def _distinct(parts: Iterable[Parts]) -> bool:
    """True when no two items name the same subject id and resource (type and id), whatever their actions."""
    seen: set[tuple[Any, ...]] = set()
    for p in parts:
        key = (p.subject["id"], p.resource["type"], p.resource["id"])
        if key in seen:
            return False
        seen.add(key)
    return True


def _member(parts: Parts) -> dict[str, Any]:
    return {"subject": parts.subject, "action": parts.action, "resource": parts.resource, "context": parts.context}


class AuthzenPdp(Pdp):
    """An AuthZEN PDP behind its base URL. Metadata is fetched once per TTL by one request at a time."""

    remote = True

    def __init__(
        self,
        base_url: str,
        transport: HttpTransport,
        mappings: dict[str, CompiledMapping] | None = None,
        auth: FileSecret | None = None,
        auth_header: str = "authorization",
        clock: Callable[[], float] = time.monotonic,
        default_ttl: float = DEFAULT_TTL_S,
        discovery_timeout: float = DISCOVERY_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._transport = transport
        self._mappings = mappings or {}
        self._auth = auth
        self._auth_header = auth_header
        self._clock = clock
        self._default_ttl = default_ttl
        self._discovery_timeout = discovery_timeout
        self._endpoints: Endpoints | None = None
        self._expires = float("-inf")
        self._discovery: asyncio.Task[Endpoints | Failure] | None = None

    def _headers(self, request_id: str) -> dict[str, str] | Failure:
        return request_headers(request_id, self._auth, self._auth_header)

    async def endpoints(self) -> Endpoints | Failure:
        if self._endpoints is not None and self._clock() < self._expires:
            return self._endpoints
        # Starting or joining a discovery is this decision's call to the PDP: the breaker must still admit it.
        if not admitted():
            return NOT_ADMITTED
        task = self._discovery
        if task is None or task.done():
            task = self._discovery = asyncio.get_running_loop().create_task(self._discover())
        # Shielded: a caller whose deadline passes leaves the fetch running for the others.
        return await asyncio.shield(task)

    async def _discover(self) -> Endpoints | Failure:
        GATE.set(None)  # shared by every decision waiting for it (each was admitted to wait): its own context
        headers = self._headers("discovery")
        if isinstance(headers, Failure):
            return headers
        headers.pop("Content-Type")
        headers.pop("X-Request-ID")
        answer: RawAnswer | Failure
        try:
            # Its own bound: a hung PDP must not keep the shared fetch (and so every later request) waiting.
            async with asyncio.timeout(self._discovery_timeout):
                answer = await self._transport.get(metadata_url(self.base_url), headers)
        except TimeoutError:
            answer = Failure(Reason.PDP_TIMEOUT, "timeout", True, "no metadata answer in time")
        result = parse_metadata(answer, self.base_url)
        if isinstance(result, Endpoints):
            cache = answer.cache_control if isinstance(answer, RawAnswer) else None
            self._endpoints = result
            self._expires = self._clock() + ttl_of(cache, self._default_ttl)
        else:
            self._endpoints = None  # never fall back to stale or default endpoints
        return result

    def _parts(self, document: dict[str, Any]) -> Parts | Verdict | Failure:
        try:
            return map_document(document, self._mappings.get(document["route"]["name"]))
        except AmbiguousMapping as exc:
            return Failure(Reason.REQUEST_AMBIGUOUS, UNSENT, False, f"mapping: {exc}")
        except MappingError as mapping_error:
            return Verdict(False, Reason.PDP_UNDEFINED, note=f"mapping: {mapping_error}")

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        # Everything built from the caller's data first: what cannot be built is denied before the PDP is asked.
        parts = self._parts(document)
        if not isinstance(parts, Parts):
            return parts
        body = encode(_member(parts))
        if isinstance(body, Failure):
            return body
        headers = self._headers(request_id)
        if isinstance(headers, Failure):
            return headers
        endpoints = await self.endpoints()
        if isinstance(endpoints, Failure):
            return endpoints
        answer = await self._transport.post(endpoints.evaluation, body, headers)
        return parse_evaluation(answer, request_id)

    async def ask_many(
        self, documents: Sequence[dict[str, Any]], request_id: str, concurrency: int = BATCH_CONCURRENCY
    ) -> list[Verdict | Failure]:
        """One result per document, in order: one exchange with the batch endpoint (execute_all) when the PDP has
        one, else each on its own, at most `concurrency` at a time."""
        mapped = [self._parts(d) for d in documents]
        todo = [(i, p) for i, p in enumerate(mapped) if isinstance(p, Parts)]
        results: list[Verdict | Failure] = [
            Verdict(False, Reason.PDP_UNDEFINED) if isinstance(p, Parts) else p for p in mapped
        ]
        if not todo:
            return results
        members = [_member(p) for _, p in todo]
        body = encode({"options": {"evaluations_semantic": "execute_all"}, "evaluations": members})
        if isinstance(body, Failure):  # one message's data cannot be carried: the batch is not sent at all
            return [body if isinstance(m, Parts) else r for m, r in zip(mapped, results, strict=True)]
        headers = self._headers(request_id)
        if isinstance(headers, Failure):
            return [headers] * len(documents)
        endpoints = await self.endpoints()
        if isinstance(endpoints, Failure):
            return [endpoints if isinstance(mapped[i], Parts) else r for i, r in enumerate(results)]
        if endpoints.evaluations is None or not _distinct(p for _, p in todo):
            # Cerbos 0.55 groups a batch by subject id and resource and decides each group on its first item's
            # properties, whatever the actions: items that are not distinct that way are asked one by one.
            answers = await ask_each(self.ask, [(i, documents[i]) for i, _ in todo], request_id, concurrency)
            for (i, _), verdict in zip(todo, answers, strict=True):
                results[i] = verdict
            return results
        answer = await self._transport.post(endpoints.evaluations, body, headers)
        for (i, _), verdict in zip(todo, parse_evaluations(answer, request_id, len(todo)), strict=True):
            results[i] = verdict
        return results

    async def close(self) -> None:
        task = self._discovery
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._transport.close()
