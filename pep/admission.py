"""One admission pipeline: a request's facts in; the `Check` to ask the PDP about, or the refusal that ends the
request before any PDP is asked, out.

`pep run` (pep/proxy.py) and `pep explain` (pep/explain.py) both drive this one pipeline, so what explain
prints is what the proxy does. It is pure but for two async steps the drivers inject, because only there do
they differ: who the caller is (the proxy reads the connection's client certificate, explain takes
`--peer-spiffe-id`) and how the body is read (the proxy from the socket, under its deadline, after a
`100 Continue`; explain from a file). A refusal carries its `Reason` (and a detail for the log), never a message
that is matched later.

The order (README, "Request integrity"): a CONNECT goes its own way (`_connect`); otherwise the target is split
(a fragment, an asterisk form and an absolute form that disagrees with Host are ambiguous), the checks that need
no route, the route, path parameters, the announced length against the route's limit, the subject, the route's
credential, the protocol's inspection of the body (read only where it decides something), MCP replies opened,
then the document(s) and the `Check`.

What comes after the decision belongs to the drivers: a `Deny` with `approval_required` on a route with `approval`
goes to the approval step (pep/approval_step.py; such a route's body is read whole here, so the approval binds
the exact bytes forwarded), and a just-in-time credential is fetched after an allow, before anything is
forwarded (pep/credentials_oauth.py). `settle` is where an allow this admission cannot carry out becomes a denial.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from pep import attributes, integrity
from pep.authority import resolve_authority
from pep.credentials import CredentialSource
from pep.decision import Allow, Deny, Reason
from pep.engine import Check, Outcome
from pep.identity import Refusal as IdentityRefusal
from pep.protocols import PLAIN, Inspected, Refused, dispatch, mcp_replies
from pep.protocols.mcp_tokens import Resumption, Tokens, for_caller
from pep.routing import Route, RouteTable
from pep.seal import Sealer

Headers = CIMultiDictProxy[str] | CIMultiDict[str]
# Who the caller is on this route: the subject, or why there is none.
Identify = Callable[[Route], Awaitable[dict[str, Any] | IdentityRefusal]]
# The whole body, at most `limit` bytes, or why it cannot be read.
ReadBody = Callable[[int], Awaitable[bytes | Refused]]


class RequestFacts:
    """What the pipeline knows about a request before it reads anything: its head, as sent."""

    method: Final[str]
    target: Final[str]  # as sent: origin-form, absolute-form, authority-form (CONNECT) or `*`
    headers: Final[Headers]
    scheme: Final[str]  # the listener connection's: `https` on a TLS listener, else `http`
    content_length: Final[int | None]  # the announced length (None: chunked, or no body)
    has_body: Final[bool]  # the head announces a body (a Content-Length above 0, or chunked)
    request_id: Final[str]

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers,
        scheme: str,
        content_length: int | None,
        has_body: bool,
        request_id: str,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.scheme = scheme
        self.content_length = content_length
        self.has_body = has_body
        self.request_id = request_id


class Setup(Protocol):
    """What one config decides about admissions (the proxy's Runtime; explain builds its own)."""

    @property
    def routes(self) -> RouteTable: ...

    @property
    def credentials(self) -> Mapping[str, CredentialSource]: ...

    @property
    def sealer(self) -> Sealer: ...


class Refusal:
    """The request ends before any PDP is asked. `route` and `upstream_url` once known; `challenge` the
    `WWW-Authenticate` of a 401; `drop_session`: the client certificate no longer passes (end its TLS session)."""

    reason: Final[Reason]
    detail: Final[str]
    route: Final[Route | None]
    upstream_url: Final[str | None]
    challenge: Final[str | None]
    drop_session: Final[bool]

    def __init__(
        self,
        reason: Reason,
        detail: str,
        route: Route | None = None,
        upstream_url: str | None = None,
        challenge: str | None = None,
        drop_session: bool = False,
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.route = route
        self.upstream_url = upstream_url
        self.challenge = challenge
        self.drop_session = drop_session


class Admission:
    """Everything the PDP is asked about, and what an allow is bound to and forwarded with."""

    route: Final[Route]
    upstream_url: Final[str]
    path: Final[str]  # raw, as sent (the document's `request.path`)
    query: Final[str]  # raw, without `?`
    subject: Final[dict[str, Any]]
    inspected: Final[Inspected]  # the messages decided and the exact body bytes an allow forwards (None: streamed)
    check: Final[Check]  # its documents are the policy input
    credential: Final[tuple[str, str] | None]  # (header, value) the PEP sets upstream on an allow
    tokens: Final[Tokens | None]  # MCP routes: the caller's sealed tokens for relayed server ids
    resume: Final[Resumption | None]  # an MCP GET resuming a stream (its Last-Event-ID opened)
    replaced: Final[tuple[tuple[str, str], ...]]  # caller headers forwarded with another value

    def __init__(
        self,
        route: Route,
        upstream_url: str,
        path: str,
        query: str,
        subject: dict[str, Any],
        inspected: Inspected,
        check: Check,
        credential: tuple[str, str] | None = None,
        tokens: Tokens | None = None,
        resume: Resumption | None = None,
        replaced: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.route = route
        self.upstream_url = upstream_url
        self.path = path
        self.query = query
        self.subject = subject
        self.inspected = inspected
        self.check = check
        self.credential = credential
        self.tokens = tokens
        self.resume = resume
        self.replaced = replaced

    def with_credential(self, credential: tuple[str, str]) -> Admission:
        """This admission with the credential obtained after the allow (a just-in-time token)."""
        return Admission(
            self.route,
            self.upstream_url,
            self.path,
            self.query,
            self.subject,
            self.inspected,
            self.check,
            credential,
            self.tokens,
            self.resume,
            self.replaced,
        )

    @property
    def document(self) -> dict[str, Any]:
        return self.check.document

    def settle(self, outcome: Outcome) -> Outcome:
        """What the PDP's decision means for this request: header obligations cannot be applied inside a
        tunnel, so a CONNECT allow that needs them is not one."""
        allow = outcome.decision
        if self.check.method == "CONNECT" and isinstance(allow, Allow) and allow.headers:
            detail = "header obligations cannot be applied to a tunnel"
            deny = Deny(Reason.OBLIGATION_UNSUPPORTED, allow.decision_id, detail)
            return outcome.overruled(deny, detail)
        return outcome


def split_target(facts: RequestFacts) -> tuple[str, str] | Refusal:
    """The raw path and query of an origin- or absolute-form target; an absolute form must name the host and
    port of the Host header (default ports are the connection scheme's), and no user info."""
    target = facts.target
    if "#" in target:
        return Refusal(Reason.REQUEST_AMBIGUOUS, "fragment in the request target")
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    if target == "*":
        return Refusal(Reason.REQUEST_AMBIGUOUS, "asterisk-form target")
    try:
        url = URL(target, encoded=True)
        absolute = url.absolute and url.host is not None
    except (ValueError, TypeError):
        absolute = False
    if not absolute or not _authority_matches(url.with_scheme(facts.scheme), facts.headers.get("Host")):
        return Refusal(Reason.REQUEST_AMBIGUOUS, "absolute-form target disagrees with Host")
    if "@" in url.raw_authority:
        # RFC 9110 4.2.4: an error, and the shape that leads a reader taking what precedes `@` for the host astray.
        return Refusal(Reason.REQUEST_AMBIGUOUS, "user info in the request target")
    return url.raw_path, url.raw_query_string


def target_path(method: str, target: str) -> str:
    """The raw path a decision log line shows for a request refused before its document was built: an origin
    form up to its query, an absolute form's path, nothing for CONNECT (as its document), else the target."""
    if method == "CONNECT":
        return ""
    if target.startswith("/"):
        return target.partition("?")[0].partition("#")[0]
    try:
        return URL(target, encoded=True).raw_path
    except (ValueError, TypeError):
        return target


def _authority_matches(target: URL, host_header: str | None) -> bool:
    if host_header is None or target.host is None:
        return False
    try:
        host = URL.build(scheme=target.scheme or "http", authority=host_header)
    except (ValueError, TypeError):
        return False
    return (target.host.lower(), target.port) == ((host.host or "").lower(), host.port)


async def admit(facts: RequestFacts, setup: Setup, identify: Identify, read_body: ReadBody) -> Admission | Refusal:
    """The pipeline (see the module docstring); the first refusal ends it."""
    if facts.method == "CONNECT":
        return await _connect(facts, setup, identify)
    split = split_target(facts)
    if isinstance(split, Refusal):
        return split
    path, query = split
    method, headers = facts.method, facts.headers
    problem = integrity.request_problem(method, path, query, headers)
    if problem is None and facts.has_body:  # (without a body, `body_problem` finds none)
        problem = integrity.body_problem(method, True)
    if problem:
        return Refusal(Reason.REQUEST_AMBIGUOUS, problem)
    host = headers.get("Host")
    route = setup.routes.match(path, host, facts.scheme)
    if route is None:
        return Refusal(Reason.NO_ROUTE, "no route matches the path")
    upstream_url = route.upstream_url(path, query)
    config = route.config
    if problem := integrity.alias_problem(headers, route.reserved_names):
        return Refusal(Reason.REQUEST_AMBIGUOUS, problem, route, upstream_url)
    # (`parameter_problem` finds none without a `;` or a `%` in the path: the usual path is not passed to it.)
    if (
        not config.allow_path_parameters
        and ("%" in path or ";" in path)
        and (problem := integrity.parameter_problem(path))
    ):
        return Refusal(Reason.REQUEST_AMBIGUOUS, problem, route, upstream_url)
    length, limit = facts.content_length, config.max_body_bytes
    if limit is not None and length is not None and length > limit:
        return Refusal(Reason.BODY_TOO_LARGE, f"content-length {length} > {limit}", route, upstream_url)
    subject = await identify(route)
    if isinstance(subject, IdentityRefusal):
        return Refusal(subject.reason, subject.detail, route, upstream_url, subject.challenge, subject.drop_session)
    # With `identity.jwt` (the subject has an `id`), a second bearer token in the query is refused: the upstream
    # may act as its holder. (Form bodies: below, once read.)
    bearer = "id" in subject
    if bearer and query and (problem := integrity.bearer_token_field(query)):
        return Refusal(Reason.REQUEST_AMBIGUOUS, problem, route, upstream_url)
    credential = None
    source = setup.credentials.get(route.name)
    if source is not None:
        value = source.value()
        if value is None:
            # Named by path only: the value never appears in a log.
            detail = "the route's credential is missing or empty"
            return Refusal(Reason.CREDENTIAL_UNAVAILABLE, detail, route, upstream_url)
        credential = (source.header, value)
    # The protocol's rules on the head (a plain route streams its body after the allow), else on the body.
    early = dispatch.before_body(config, method, path, headers, facts.has_body)
    if early is None:
        inspected = await _inspect(facts, route, path, read_body)
    elif config.approval is not None and isinstance(early, Inspected) and early.body is None and facts.has_body:
        # An approval is for the exact bytes forwarded (pep/approvals/binding.py): read whole, an allow carries them.
        read = await read_body(dispatch.read_limit(config))
        inspected = read if isinstance(read, Refused) else Inspected(early.messages, read, early.batch, early.value)
    else:
        inspected = early
    if isinstance(inspected, Refused):
        return Refusal(inspected.reason, inspected.detail, route, upstream_url)
    form = inspected.body if bearer and method == "POST" and dispatch.is_form(headers) else None
    if form and (problem := integrity.bearer_token_field(form.decode("latin-1"))):
        return Refusal(Reason.REQUEST_AMBIGUOUS, f"{problem} in the form body", route, upstream_url)
    tokens = resume = None
    replaced: tuple[tuple[str, str], ...] = ()
    if config.protocol == "mcp":
        tokens = for_caller(setup.sealer, route.name, subject, headers)
        prepared, resume = mcp_replies.prepare(
            method, headers, inspected, tokens, config.filter_tools_list, config.max_batch_messages
        )
        if isinstance(prepared, Refused):
            return Refusal(prepared.reason, prepared.detail, route, upstream_url)
        inspected = prepared
        if resume is not None:
            replaced = (("Last-Event-ID", resume.event_id),)
    body = inspected.body
    if body is not None:
        body_bytes: int | None = len(body)
    else:
        body_bytes = length if length is not None or facts.has_body else 0
    try:
        document = attributes.document(
            request_id=facts.request_id,
            method=method,
            scheme=facts.scheme,
            host="" if host is None else host,
            path=path,
            query=query,
            headers=attributes.policy_headers(headers, route.policy_hidden),
            body_bytes=body_bytes,
            route=route,
            upstream_url=upstream_url,
            subject=subject,
        )
    except UnicodeDecodeError:  # the query's percent-encoded bytes are not UTF-8 (`attributes.query_map`)
        detail = "percent-encoded bytes in the query that are not UTF-8"
        return Refusal(Reason.REQUEST_AMBIGUOUS, detail, route, upstream_url)
    except (attributes.AmbiguousField, attributes.AmbiguousQuery) as exc:
        return Refusal(Reason.REQUEST_AMBIGUOUS, str(exc), route, upstream_url)
    messages = inspected.messages
    message = messages[0]
    first = document if message.key is None else attributes.with_facts(document, message)
    more = tuple(attributes.with_facts(document, m) for m in messages[1:]) if len(messages) > 1 else ()
    narrowable = config.credential is not None and config.credential.jit is not None  # the PDP may narrow its token
    check = Check(
        first, facts.request_id, route.name, method, upstream_url, route.obligation_forbidden, more, body, narrowable
    )
    return Admission(route, upstream_url, path, query, subject, inspected, check, credential, tokens, resume, replaced)


async def _inspect(facts: RequestFacts, route: Route, path: str, read_body: ReadBody) -> Inspected | Refused:
    """The route's protocol rules where they need the body (`dispatch.before_body` decided nothing on the head):
    it is read whole, bounded. A Content-Encoding other than identity is refused where the body is read: the PEP
    would decide on bytes the upstream decodes into something else."""
    config, method, headers = route.config, facts.method, facts.headers
    if (problem := dispatch.encoding_problem(headers)) is not None:
        return problem
    limit = dispatch.read_limit(config)
    length = facts.content_length
    if length is not None and length > limit:
        return Refused(Reason.BODY_TOO_LARGE, f"content-length {length} > {limit}")
    body = await read_body(limit)
    if isinstance(body, Refused):
        return body
    return dispatch.parse(config, method, path, headers, body)


async def _connect(facts: RequestFacts, setup: Setup, identify: Identify) -> Admission | Refusal:
    """CONNECT host:port: decided once, on the authority, by a `tunnel: true` route for it.

    The policy input has `request.method` CONNECT, `request.host` the target as sent, `request.path` empty,
    and `route.upstream_url` the host:port the tunnel would go to (the route's upstream)."""
    target, headers = facts.target, facts.headers
    named = resolve_authority(target, None)
    if named is None:
        return Refusal(Reason.REQUEST_AMBIGUOUS, "a CONNECT target must be host:port")
    host_header = headers.get("Host")
    if host_header is not None and resolve_authority(host_header, None) != named:
        return Refusal(Reason.REQUEST_AMBIGUOUS, "CONNECT target disagrees with Host")
    problem = integrity.override_header(headers)
    if problem:
        return Refusal(Reason.REQUEST_AMBIGUOUS, problem)
    route = setup.routes.tunnel(target)
    if route is None or route.tunnel_target is None:
        return Refusal(Reason.NO_ROUTE, f"no tunnel route for {target}")
    upstream_url = route.tunnel_target
    subject = await identify(route)
    if isinstance(subject, IdentityRefusal):
        return Refusal(subject.reason, subject.detail, route, upstream_url, subject.challenge, subject.drop_session)
    try:
        policy_headers = attributes.policy_headers(headers, route.policy_hidden)
    except attributes.AmbiguousField as exc:
        return Refusal(Reason.REQUEST_AMBIGUOUS, str(exc), route, upstream_url)
    document = attributes.document(
        request_id=facts.request_id,
        method="CONNECT",
        scheme=facts.scheme,
        host=target,
        path="",
        query="",
        headers=policy_headers,
        body_bytes=None,
        route=route,
        upstream_url=upstream_url,
        subject=subject,
    )
    check = Check(document, facts.request_id, route.name, "CONNECT", upstream_url, route.obligation_forbidden)
    return Admission(route, upstream_url, "", "", subject, PLAIN, check)
