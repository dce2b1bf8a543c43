"""`pep explain`: what the PEP would decide about one request, without a socket and without forwarding anything.

A URL, headers and a body file become the request's facts, and the proxy's own admission pipeline
(pep/admission.py: integrity checks, route, identity, credential, body inspection, the `pep/v1` document) runs
on them; the config's real PDP is asked through the decision engine, so the deadline, the retries and the answer
classification are the ones `pep run` applies. The output is one JSON object: the
document(s), the PDP's answer and the decision. Credentials never appear in it: the document drops them as the
proxy does, and nothing about the PDP's own credential is shown.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import orjson
from multidict import CIMultiDict

from pep import approval_step
from pep.admission import Admission, Refusal, RequestFacts, admit
from pep.config import HEADER_NAME, Config
from pep.credentials import CredentialSource
from pep.credentials_oauth import describe, source_config
from pep.decision import Allow, Deny, Reason
from pep.engine import Check, Engine, Outcome, combine
from pep.identity import Refusal as IdentityRefusal
from pep.identity.subject import Identifier, build_identity
from pep.ids import request_id
from pep.metrics import Metrics
from pep.pdp import BATCH_CONCURRENCY, Failure, Pdp, Verdict
from pep.pdp.cedar import CedarLoadError
from pep.protocols import Refused
from pep.routing import Route, RouteTable
from pep.seal import Sealer

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_CONFIG = 2

_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)\Z", re.DOTALL)
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")  # a request target has no space or control character


class UsageError(Exception):
    """The command line does not describe a request (a bad URL, header or body file)."""


# The most `--body` explain reads: the body is read whole, as the announced length a caller would send.
BODY_CAP = 64 * 1048576


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the agent would send it to the PEP's listener."""

    method: str
    target: str  # the request target as sent: a path (origin form), an absolute URL, or CONNECT's host:port
    headers: CIMultiDict[str]  # Host included
    body: bytes | None  # the whole body (`--body`), or None


def parse_request(
    url: str, method: str | None, header_args: Sequence[str], body: IO[bytes] | None, default_host: str
) -> Request:
    """The request for `URL`. A path is sent to the listener as it is (Host: `default_host`); an absolute URL is
    sent as the target, as a client that uses the PEP as its HTTP proxy sends it (Host: its authority), so a Host
    header that names another authority makes it ambiguous, as on the wire; with CONNECT, URL is `host:port`.
    The method defaults to GET, or POST with a body (as curl does). A Host header given with `-H` wins."""
    method = method if method is not None else ("POST" if body is not None else "GET")
    if not HEADER_NAME.match(method):
        raise UsageError(f"method {method!r} is not an HTTP token")
    match = _ABSOLUTE.match(url)
    if method == "CONNECT":
        if match is not None or url.startswith("/") or not url or _BAD_TARGET.search(url):
            raise UsageError(f"URL {url!r}: a CONNECT target is host:port")
        authority = url
    elif match is not None:
        authority = match.group(2).rpartition("@")[2]  # user info is never part of Host
        if not authority:
            raise UsageError(f"URL {url!r} has no host")
    elif url.startswith("/"):
        authority = default_host
    else:
        raise UsageError(f"URL {url!r} must be absolute (http://host/path) or a path (/path)")
    if _BAD_TARGET.search(url):
        raise UsageError(f"URL {url!r} has a space or a control character")
    headers: CIMultiDict[str] = CIMultiDict()
    for arg in header_args:
        name, colon, value = arg.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not HEADER_NAME.match(name):
            raise UsageError(f"header {arg.split(':', 1)[0]!r} must look like NAME:VALUE")
        if _BAD_VALUE.search(value):
            raise UsageError(f"header {name!r} has a CR, LF or NUL in its value")
        headers.add(name, value)
    if "Host" not in headers:
        headers["Host"] = authority
    return Request(method, url, headers, _read(body))


def _read(body: IO[bytes] | None) -> bytes | None:
    """The whole body, as a caller would send it with its Content-Length."""
    if body is None:
        return None
    try:
        data = body.read(BODY_CAP + 1)
    except OSError as exc:
        raise UsageError(f"cannot read the body: {exc}") from None
    if len(data) > BODY_CAP:
        raise UsageError(f"the body is over {BODY_CAP} bytes")
    return data


@dataclass(frozen=True, slots=True)
class _Setup:
    """The admission's view of the config (`admission.Setup`)."""

    routes: RouteTable
    credentials: dict[str, CredentialSource]
    sealer: Sealer


def listener_scheme(config: Config) -> str:
    """The scheme of the listener's connections: TLS when it asks for client certificates (identity.mtls)."""
    return "https" if config.identity.mtls is not None else "http"


def request_facts(config: Config, request: Request) -> RequestFacts:
    """What the listener would know of the request's head."""
    body = request.body
    return RequestFacts(
        method=request.method,
        target=request.target,
        headers=request.headers,
        scheme=listener_scheme(config),
        content_length=len(body) if body else None,
        has_body=bool(body),
        request_id=request_id(request.headers.get("X-Request-ID")),
    )


async def admission(
    config: Config, routes: RouteTable, request: Request, identifier: Identifier, peer_id: str | None = None
) -> Admission | Refusal:
    """The proxy's admission pipeline (pep/admission.py) for `request`. `peer_id` stands in for the SPIFFE ID of
    a client certificate on an mTLS listener."""
    peercert = {"subjectAltName": (("URI", peer_id),)} if peer_id else None
    headers = request.headers

    async def identify(route: Route) -> dict[str, Any] | IdentityRefusal:
        return await identifier.subject(headers, lambda: peercert, route.config.require_identity)

    async def read_body(limit: int) -> bytes | Refused:
        body = request.body or b""
        if len(body) > limit:  # pragma: no cover - the announced length was checked against the same limit
            return Refused(Reason.BODY_TOO_LARGE, f"body over {limit} bytes")
        return body

    # Replies and resumptions carry tokens a running PEP sealed: they open here only with its seal_key_files.
    credentials = {
        r.name: CredentialSource(r.credential)
        for r in config.routes
        if r.credential is not None and r.credential.jit is None
    }
    setup = _Setup(routes, credentials, _sealer(config))
    return await admit(request_facts(config, request), setup, identify, read_body)


def _sealer(config: Config) -> Sealer:
    return Sealer.from_files(config.seal_key_files) if config.seal_key_files else Sealer([secrets.token_bytes(32)])


class _Recorder(Pdp):
    """The configured PDP, keeping each document's answer of the last attempt. The engine sees the same PDP, and
    a batch goes to the PDP's own `ask_many` (one exchange with an AuthZEN batch endpoint)."""

    def __init__(self, pdp: Pdp, documents: Sequence[dict[str, Any]]) -> None:
        self.remote = pdp.remote
        self._pdp = pdp
        self._index = {id(d): i for i, d in enumerate(documents)}
        self.answers: list[Verdict | Failure | None] = [None] * len(documents)

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        i = self._index.get(id(document), 0)
        self.answers[i] = None  # an attempt cut by the deadline leaves no answer
        result = await self._pdp.ask(document, request_id)
        self.answers[i] = result
        return result

    async def ask_many(
        self, documents: Sequence[dict[str, Any]], request_id: str, concurrency: int = BATCH_CONCURRENCY
    ) -> list[Verdict | Failure]:
        self.answers = [None] * len(self.answers)
        results = await self._pdp.ask_many(documents, request_id, concurrency)
        self.answers = list(results)
        return results

    async def close(self) -> None:
        await self._pdp.close()


def answer_dict(answer: Verdict | Failure) -> dict[str, Any]:
    """A PDP answer for the output. Obligation headers are listed by name only: their values may be secrets."""
    if isinstance(answer, Failure):
        return {"allow": False, "reason": answer.reason.value, "outcome": answer.outcome, "detail": answer.detail}
    out: dict[str, Any] = {"allow": answer.allow, "reason": answer.reason.value, "note": answer.note}
    if answer.headers:
        out["headers"] = [name.lower() for name, _ in answer.headers]
    return out


def pdp_info(config: Config) -> dict[str, Any]:
    """Where the decision comes from; never the PDP credential."""
    pdp = config.pdp
    if pdp.kind == "cedar":
        return {"kind": "cedar", "policies": pdp.policies, "entities": pdp.entities}
    return {"kind": pdp.kind, "url": pdp.url}


async def ask(config: Config, check: Check) -> tuple[Outcome, _Recorder]:
    """One decision by the config's PDP through the engine. The PDP client is closed before returning."""
    from pep.app import build_pdp

    pdp = build_pdp(config)
    recorder = _Recorder(pdp, check.documents)
    engine = Engine(recorder, config.pdp, Metrics(tuple(r.name for r in config.routes)))
    try:
        outcome = await engine.decide(check)
    finally:
        await engine.pdp.close()
    return outcome, recorder


def _pdp_section(config: Config, outcome: Outcome, recorder: _Recorder, batch: bool) -> dict[str, Any]:
    section = pdp_info(config)
    answers = recorder.answers
    answer: dict[str, Any] | None
    if outcome.attempts == 0:
        answer = None  # refused by the engine before the PDP was asked
    elif all(a is not None for a in answers):
        answer = answer_dict(combine([a for a in answers if a is not None]))
    else:  # the deadline passed before (every) answer arrived
        decision = outcome.decision
        reason = decision.reason if isinstance(decision, Deny) else Reason.PDP_TIMEOUT
        answer = {"allow": False, "reason": reason.value, "outcome": "timeout", "detail": outcome.note}
    section["answer"] = answer
    if batch:
        section["answers"] = [answer_dict(a) if a is not None else None for a in answers]
    section["attempts"] = outcome.attempts
    section["pdp_ms"] = outcome.pdp_ms
    return section


async def explain(config: Config, request: Request, peer_id: str | None = None) -> dict[str, Any]:
    """The report `pep explain` prints."""
    identifier, keys = build_identity(config)
    token_header = config.identity.jwt.header if config.identity.jwt is not None else None
    try:
        if keys is not None:
            await keys.start()
        found = await admission(
            config, RouteTable(config.routes, token_header, config.identity.agent_header), request, identifier, peer_id
        )
    finally:
        if keys is not None:
            await keys.close()
    route_name = found.route.name if found.route is not None else None
    if isinstance(found, Refusal):
        return {
            "document": None,
            "pdp": None,
            "decision": "deny",
            "reason": found.reason.value,
            "detail": found.detail,
            "route": route_name,
            "upstream_url": found.upstream_url,
        }
    check = found.check
    outcome, recorder = await ask(config, check)
    outcome = found.settle(outcome)
    jit = _jit_credential(found, outcome)
    if isinstance(jit, Deny):
        outcome = outcome.overruled(jit, jit.detail)
    batch = len(check.documents) > 1
    report: dict[str, Any] = {"document": check.document}
    if batch:
        report["documents"] = list(check.documents)
    decision = outcome.decision
    report["pdp"] = _pdp_section(config, outcome, recorder, batch)
    if isinstance(decision, Allow):
        report.update(decision="allow", reason=Reason.ALLOWED.value)
    else:
        report.update(decision="deny", reason=decision.reason.value, detail=decision.detail or None)
        if outcome.approval is not None:  # approval_required: who `pep run` would ask, and how the request waits
            report["approval"] = approval_step.describe(found, outcome.approval)
    report.update(route=route_name, upstream_url=found.upstream_url)
    credential = found.route.config.credential
    if credential is not None:
        report["credential_header"] = credential.header  # set by the PEP on the upstream request; never its value
    if isinstance(jit, dict):
        report["credential"] = jit
    return report


def _jit_credential(found: Admission, outcome: Outcome) -> dict[str, object] | Deny | None:
    """On an allow, the just-in-time credential the request would get (never fetched here), or the denial
    `pep run` would turn the allow into: a narrowing outside the route's maximum."""
    credential = found.route.config.credential
    allow = outcome.decision
    if credential is None or credential.jit is None or not isinstance(allow, Allow):
        return None
    described = describe(source_config(credential), allow.credential)
    if "refused" in described:
        return Deny(Reason(str(described["refused"])), allow.decision_id, str(described["detail"]))
    return described


def dumps(report: dict[str, Any]) -> str:
    try:
        return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits in a tool argument, for one
        return json.dumps(report, indent=2, ensure_ascii=False)


def run(
    config: Config,
    url: str,
    method: str | None,
    headers: Sequence[str],
    body_file: str | None,
    peer_id: str | None = None,
) -> int:
    """`pep explain`: prints the report; 0 for allow, 1 for deny, 2 when the request or the PDP cannot be set up."""
    if peer_id is not None and config.identity.mtls is None:
        print(
            "pep explain: --peer-spiffe-id needs identity.mtls in the config (no listener asks for one)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    body: IO[bytes] | None = None
    try:
        if body_file == "-":
            body = sys.stdin.buffer
        elif body_file is not None:
            body = open(body_file, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        print(f"pep explain: --body: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        request = parse_request(url, method, headers, body, str(config.listen))
        report = asyncio.run(explain(config, request, peer_id))
    except UsageError as exc:
        print(f"pep explain: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (CedarLoadError, OSError, ssl.SSLError) as exc:
        print(f"{config.source}: pdp: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if body is not None and body_file != "-":
            body.close()
    print(dumps(report))
    return EXIT_ALLOW if report["decision"] == "allow" else EXIT_DENY
