"""`pep explain`: what the PEP would decide about one request, without a socket and without forwarding anything.

The same facts the proxy builds (integrity checks, route, body inspection, the `pep/v1` document) are built from
a URL, headers and a body file, and the config's real PDP is asked through the decision engine, so the deadline,
the retries and the answer classification are the ones `pep run` applies. The output is one JSON object: the
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

from pep import attributes, integrity
from pep.config import HEADER_NAME, Config
from pep.credentials import CredentialSource
from pep.decision import Allow, Deny, Reason
from pep.engine import Check, Engine, Outcome, combine
from pep.headers import end_to_end
from pep.identity import Refusal as IdentityRefusal
from pep.identity.subject import Identifier, build_identity
from pep.ids import request_id
from pep.metrics import Metrics
from pep.pdp import BATCH_CONCURRENCY, Failure, Pdp, Verdict
from pep.pdp.cedar import CedarLoadError
from pep.protocols import Inspected, Refused, dispatch, mcp_replies
from pep.protocols.mcp_tokens import for_caller
from pep.routing import Route, RouteTable
from pep.seal import Sealer

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_CONFIG = 2

_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)\Z", re.DOTALL)
_BAD_VALUE = re.compile(r"[\x00\r\n]")


class UsageError(Exception):
    """The command line does not describe a request (a bad URL, header or body file)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the agent would send it to the PEP's listener."""

    method: str
    scheme: str
    path: str  # raw, as sent
    query: str  # raw, without the `?`
    fragment: bool  # the URL carried a `#`: the proxy refuses such a target
    headers: CIMultiDict[str]  # Host included
    body: IO[bytes] | None  # read only once a route says how much may be read


def parse_request(
    url: str, method: str | None, header_args: Sequence[str], body: IO[bytes] | None, default_host: str
) -> Request:
    """The request for `URL` (absolute, or a path sent to the listener). The method defaults to GET, or POST with a
    body (as curl does). Host comes from the URL's authority unless a Host header is given."""
    match = _ABSOLUTE.match(url)
    if match is not None:
        scheme, authority, rest = match.group(1).lower(), match.group(2), match.group(3)
        authority = authority.rpartition("@")[2]  # user info is never part of Host
        if not authority:
            raise UsageError(f"URL {url!r} has no host")
    elif url.startswith("/"):
        scheme, authority, rest = "http", default_host, url
    else:
        raise UsageError(f"URL {url!r} must be absolute (http://host/path) or a path (/path)")
    target, hash_sign, _ = rest.partition("#")
    path, _, query = target.partition("?")
    method = method if method is not None else ("POST" if body is not None else "GET")
    if not HEADER_NAME.match(method):
        raise UsageError(f"method {method!r} is not an HTTP token")
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
    return Request(method, scheme, path or "/", query, bool(hash_sign), headers, body)


@dataclass(frozen=True, slots=True)
class Facts:
    """What the proxy would know when it asks the PDP, or why it would not ask."""

    route: Route | None
    upstream_url: str | None
    refused: Refused | None = None
    check: Check | None = None
    inspected: Inspected | None = None


def _read(body: IO[bytes] | None, limit: int | None) -> bytes | None:
    """The body, at most one byte over `limit` (enough to know it is too large)."""
    if body is None:
        return None
    try:
        return body.read() if limit is None else body.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read the body: {exc}") from None


def _inspect(route: Route, request: Request, body: bytes | None) -> Inspected | Refused:
    """The proxy's protocol rules (`protocols.dispatch`), on bytes already read."""
    early = dispatch.before_body(route.config, request.method, request.path, request.headers, bool(body))
    if early is not None:
        return early
    limit = dispatch.read_limit(route.config)
    if body is not None and len(body) > limit:  # a form body on a route without max_body_bytes
        return Refused(Reason.BODY_TOO_LARGE, f"body over {limit} bytes")
    return dispatch.parse(route.config, request.method, request.path, request.headers, body or b"")


async def facts(
    config: Config, routes: RouteTable, request: Request, identifier: Identifier, peer_id: str | None = None
) -> Facts:
    """The proxy's path from a request to a `Check`, in its order; the first refusal ends it.

    `peer_id` stands in for the SPIFFE ID of a client certificate on an mTLS listener."""
    path, query, headers, method = request.path, request.query, request.headers, request.method
    if method == "CONNECT":
        return Facts(None, None, Refused(Reason.NO_ROUTE, "explain does not decide CONNECT (tunnels: host:port)"))
    if request.fragment:
        return Facts(None, None, Refused(Reason.REQUEST_AMBIGUOUS, "fragment in the request target"))
    problem = integrity.request_problem(method, path, query, headers)
    if problem:
        return Facts(None, None, Refused(Reason.REQUEST_AMBIGUOUS, problem))
    route = routes.match(path, headers.get("Host"), request.scheme)
    if route is None:
        return Facts(None, None, Refused(Reason.NO_ROUTE, "no route matches the path"))
    upstream_url = route.upstream_url(path, query)
    if not route.config.allow_path_parameters and (problem := integrity.parameter_problem(path)):
        return Facts(route, upstream_url, Refused(Reason.REQUEST_AMBIGUOUS, problem))
    limit = route.config.max_body_bytes
    body = _read(request.body, limit)
    if limit is not None and body is not None and len(body) > limit:
        return Facts(route, upstream_url, Refused(Reason.BODY_TOO_LARGE, f"body over {limit} bytes"))
    peercert = {"subjectAltName": (("URI", peer_id),)} if peer_id else None
    subject = await identifier.subject(headers, lambda: peercert, route.config.require_identity)
    if isinstance(subject, IdentityRefusal):
        return Facts(route, upstream_url, Refused(subject.reason, subject.detail))
    credential = route.config.credential
    if credential is not None and CredentialSource(credential).value() is None:
        # Only whether the value is there: it is never read into the report.
        refused = Refused(Reason.CREDENTIAL_UNAVAILABLE, "the route's credential is missing or empty")
        return Facts(route, upstream_url, refused)
    inspected = _inspect(route, request, body)
    if isinstance(inspected, Refused):
        return Facts(route, upstream_url, inspected)
    if route.config.protocol == "mcp":
        # Replies and resumptions carry tokens a running PEP sealed: they open here only with its seal_key_files.
        tokens = for_caller(_sealer(config), route.name, subject, headers)
        route_config = route.config
        inspected, _ = mcp_replies.prepare(
            method, headers, inspected, tokens, route_config.filter_tools_list, route_config.max_batch_messages
        )
        if isinstance(inspected, Refused):
            return Facts(route, upstream_url, inspected)
    rid = request_id(headers.get("X-Request-ID"))
    document = attributes.document(
        request_id=rid,
        method=method,
        scheme=request.scheme,
        host=headers.get("Host", ""),
        path=path,
        query=query,
        headers=attributes.header_map(end_to_end(headers, route.policy_drop)),
        body_bytes=len(body) if body is not None else 0,
        route=route,
        upstream_url=upstream_url,
        subject=subject,
    )
    documents = [attributes.with_facts(document, m) for m in inspected.messages]
    check = Check(
        documents[0],
        rid,
        route.name,
        method,
        upstream_url,
        route.obligation_forbidden,
        more=tuple(documents[1:]),
        body=inspected.body,
    )
    return Facts(route, upstream_url, None, check, inspected)


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
        found = await facts(config, RouteTable(config.routes, token_header), request, identifier, peer_id)
    finally:
        if keys is not None:
            await keys.close()
    route_name = found.route.name if found.route is not None else None
    if found.check is None:
        refused = found.refused
        assert refused is not None
        return {
            "document": None,
            "pdp": None,
            "decision": "deny",
            "reason": refused.reason.value,
            "detail": refused.detail,
            "route": route_name,
            "upstream_url": found.upstream_url,
        }
    check = found.check
    outcome, recorder = await ask(config, check)
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
    report.update(route=route_name, upstream_url=found.upstream_url)
    credential = found.route.config.credential if found.route is not None else None
    if credential is not None:
        report["credential_header"] = credential.header  # set by the PEP on the upstream request; never its value
    return report


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
