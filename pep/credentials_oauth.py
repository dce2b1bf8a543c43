"""Just-in-time upstream credentials: a short-lived token from an OAuth authorization server, per decision.

Instead of one long-lived secret from a file, a route's credential can be obtained after the allow:
- `token_exchange` (RFC 8693): the caller's verified token as `subject_token`, for the route's audience (or
  resource) and scopes, with the PEP's own token as `actor_token` when one is configured;
- `client_credentials` (RFC 6749 4.4, with an RFC 8707 resource indicator): the PEP's own token for the upstream.

The route configures the maximum (its audiences or resources, its scopes); the PDP may narrow it on an allow
(`CredentialNarrowing`: one of the route's audiences, a subset of its scopes) and never widen it: anything outside
the maximum is `obligation_unsupported`, and nothing is fetched.

Fail-closed: the authorization server unreachable, slow, answering an error or something malformed, a token
without the required fields, a token type other than Bearer, a `scope` wider than asked, an exchange that
issued something other than an access token: `credential_unavailable`, and the request is not forwarded. There is
no fallback to another credential, a stale token or the caller's own.

A token is reused only for the same subject token (by its SHA-256, never the token), actor, audience and scopes,
and only until its `expires_in` minus `expiry_margin_s` (a token without `expires_in`, or one that expires within
the margin, is used once and not kept). Concurrent requests for the same key share one fetch (but not a token
for one request: each of them then fetches its own). The token endpoint
has its own breaker: only the server's failures count against it; a request the PEP cannot build (no caller
token on a token-exchange route, an unreadable client secret) is refused without asking.

Tokens never reach logs, metrics or errors: `Credential` hides its value from `repr`, and descriptions name files,
endpoints and OAuth error codes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from pep.breaker import Breaker, Permit, Transition
from pep.config import Credential as RouteCredential
from pep.decision import CredentialNarrowing, Reason
from pep.oauth.client_auth import ClientAuth, ClientAuthConfig, ClientAuthError
from pep.oauth.endpoint import Endpoint, OAuthError, Reply, Unavailable
from pep.pdp.transport import tls_context
from pep.secret_file import FileSecret

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - names, not secrets
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
KINDS = ("token_exchange", "client_credentials")
_TOKEN = re.compile(r"[\x21-\x7e]{1,16384}\Z")  # what a header value may carry, and nothing else


@dataclass(frozen=True, slots=True)
class OAuthCredentialConfig:
    kind: str  # token_exchange | client_credentials
    token_endpoint: str
    client: ClientAuthConfig
    audiences: tuple[str, ...] = ()  # RFC 8693 `audience` values the route may have (the first by default)
    resources: tuple[str, ...] = ()  # RFC 8707 `resource` URIs (used when no audience is configured)
    scopes: tuple[str, ...] = ()  # the most the route may have; empty: no `scope` parameter at all
    header: str = "authorization"
    format: str = "Bearer {}"
    subject_token_type: str = JWT_TOKEN_TYPE
    actor_token_file: str | None = None
    actor_token_type: str = JWT_TOKEN_TYPE
    timeout_s: float = 2.0
    expiry_margin_s: float = 30.0
    max_cached: int = 10_000
    breaker: tuple[int, float, int] = (5, 5.0, 1)  # failure_threshold, open seconds, half-open probes


def source_config(credential: RouteCredential) -> OAuthCredentialConfig:
    """The runtime settings of a route's `credential` with a `kind` (config keys in milliseconds)."""
    jit = credential.jit
    assert jit is not None, "a static credential has no token endpoint"
    b = jit.breaker
    return OAuthCredentialConfig(
        kind=jit.kind,
        token_endpoint=jit.token_endpoint,
        client=jit.client,
        audiences=jit.audiences,
        resources=jit.resources,
        scopes=jit.scopes,
        header=credential.header,
        format=credential.format,
        subject_token_type=jit.subject_token_type,
        actor_token_file=jit.actor_token_file,
        actor_token_type=jit.actor_token_type,
        timeout_s=jit.timeout_ms / 1000,
        expiry_margin_s=jit.expiry_margin_ms / 1000,
        breaker=(b.failure_threshold, b.open_ms / 1000, b.half_open_probes),
    )


@dataclass(frozen=True, slots=True)
class Credential:
    """The header to set on the forwarded request. The value is never shown."""

    header: str
    value: str = field(repr=False)
    expires_at: float | None = None  # monotonic seconds; None: used once


@dataclass(frozen=True, slots=True)
class CredentialRefusal:
    reason: Reason  # credential_unavailable | obligation_unsupported
    detail: str


@dataclass(frozen=True, slots=True)
class Target:
    """What one token is asked for: the audience or resource, and the scopes."""

    parameter: str | None  # "audience" | "resource" | None (client credentials without either)
    value: str | None
    scopes: tuple[str, ...]


def _unavailable(detail: str) -> CredentialRefusal:
    return CredentialRefusal(Reason.CREDENTIAL_UNAVAILABLE, detail)


def narrow(cfg: OAuthCredentialConfig | None, narrowing: CredentialNarrowing | None) -> Target | CredentialRefusal:
    """Pure: the route's maximum, narrowed by the PDP; wider than the maximum is `obligation_unsupported`."""
    if cfg is None:
        if narrowing is not None:
            return CredentialRefusal(Reason.OBLIGATION_UNSUPPORTED, "a credential narrowing on a route without one")
        return _unavailable("no just-in-time credential on this route")
    choices = [("audience", a) for a in cfg.audiences] + [("resource", r) for r in cfg.resources]
    parameter, value = choices[0] if choices else (None, None)
    scopes = cfg.scopes
    if narrowing is not None:
        if narrowing.audience is not None:
            chosen = [c for c in choices if c[1] == narrowing.audience]
            if not chosen:
                outside = "the PDP asked for an audience outside the route's"
                return CredentialRefusal(Reason.OBLIGATION_UNSUPPORTED, outside)
            parameter, value = chosen[0]
        if narrowing.scopes is not None:
            if not narrowing.scopes:
                # No `scope` parameter means the server's default scopes, which may be wider than the route's.
                return CredentialRefusal(Reason.OBLIGATION_UNSUPPORTED, "the PDP narrowed the scopes to none")
            wider = sorted(set(narrowing.scopes) - set(cfg.scopes))
            if wider:
                return CredentialRefusal(Reason.OBLIGATION_UNSUPPORTED, "the PDP asked for scopes outside the route's")
            scopes = tuple(s for s in cfg.scopes if s in narrowing.scopes)
    return Target(parameter, value, scopes)


def describe(cfg: OAuthCredentialConfig, narrowing: CredentialNarrowing | None) -> dict[str, object]:
    """Pure: the token a request would be given (kind, audience or resource, scopes), or why none, without
    fetching: what `pep explain` shows."""
    target = narrow(cfg, narrowing)
    if isinstance(target, CredentialRefusal):
        return {"kind": cfg.kind, "refused": target.reason.value, "detail": target.detail}
    return {"kind": cfg.kind, target.parameter or "audience": target.value, "scopes": list(target.scopes)}


def read_token(reply: Reply, kind: str, target: Target, cfg: OAuthCredentialConfig) -> tuple[str, int | None] | str:
    """Pure: the access token and its `expires_in` from a token answer, or why it cannot be used."""
    body = reply.body
    token, token_type, expires_in = body.get("access_token"), body.get("token_type"), body.get("expires_in")
    if not isinstance(token, str) or not _TOKEN.match(token):
        return "the token answer has no usable access_token"
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        return "the token answer's token_type is not Bearer"
    if kind == "token_exchange" and body.get("issued_token_type", ACCESS_TOKEN_TYPE) != ACCESS_TOKEN_TYPE:
        return "the exchange issued something other than an access token"
    if expires_in is not None and (isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0):
        return "the token answer's expires_in is not a positive integer"
    granted = body.get("scope")
    if granted is not None:
        if not isinstance(granted, str):
            return "the token answer's scope is not a string"
        if set(granted.split()) - set(target.scopes):
            return "the server granted scopes wider than asked"
    value = cfg.format.replace("{}", token, 1)
    return value, expires_in


class OAuthCredentialSource:
    """One route's just-in-time credential: the token endpoint, its breaker, and the cache of tokens."""

    def __init__(
        self,
        cfg: OAuthCredentialConfig,
        endpoint: Endpoint,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Transition | None = None,
        on_fetch: Callable[[str], None] | None = None,
    ) -> None:
        if cfg.kind not in KINDS:
            raise ValueError(f"unknown credential kind {cfg.kind!r}")
        self.cfg = cfg
        self.header = cfg.header
        self.route_config: RouteCredential | None = None  # what `for_route` built it from (a reload keeps equal ones)
        self._endpoint = endpoint
        self._clock = clock
        self._auth = ClientAuth(cfg.client)
        self._actor = FileSecret(cfg.actor_token_file) if cfg.actor_token_file is not None else None
        threshold, open_s, probes = cfg.breaker
        self.breaker = Breaker(threshold, open_s, probes, clock, on_transition or (lambda _o, _n: None))
        self._cache: OrderedDict[tuple[str, ...], Credential] = OrderedDict()
        self._inflight: dict[tuple[str, ...], asyncio.Task[Credential | CredentialRefusal]] = {}
        self._on_fetch = on_fetch or (lambda _result: None)
        self._owns_endpoint = False

    @classmethod
    def for_route(
        cls,
        credential: RouteCredential,
        on_transition: Transition | None = None,
        on_fetch: Callable[[str], None] | None = None,
    ) -> OAuthCredentialSource:
        """The source of a route's `credential` with a `kind`, over an endpoint of its own (its `tls`), closed
        with it. Raises OSError or ssl.SSLError for unusable TLS files."""
        jit = credential.jit
        assert jit is not None, "a static credential has no token endpoint"
        tls = jit.tls
        context = tls_context(tls.ca_file, tls.cert_file, tls.key_file) if tls is not None else None
        source = cls(source_config(credential), Endpoint(context), on_transition=on_transition, on_fetch=on_fetch)
        source.route_config = credential
        source._owns_endpoint = True
        return source

    def problem(self) -> str | None:
        """What stops every fetch now (the client's credential file, the actor token file), for `pep check`."""
        auth = self._auth.problem()
        if auth is not None:
            return f"client: {auth}"
        if self._actor is not None and self._actor.value() is None:
            return f"actor_token_file: {self._actor.path!r} is missing, unreadable or empty"
        return None

    def describe(self, narrowing: CredentialNarrowing | None) -> dict[str, object]:
        """What a request would get, without fetching (for `pep explain`)."""
        return describe(self.cfg, narrowing)

    async def obtain(
        self, subject_token: str | None, narrowing: CredentialNarrowing | None, budget_s: float
    ) -> Credential | CredentialRefusal:
        """The credential for one allowed request, within `budget_s` (what is left of its deadline)."""
        target = narrow(self.cfg, narrowing)
        if isinstance(target, CredentialRefusal):
            return target
        if self.cfg.kind == "token_exchange" and not subject_token:
            return _unavailable("token exchange needs the caller's verified token, and there is none")
        actor = None
        if self._actor is not None:
            actor = self._actor.value()
            if actor is None:
                return _unavailable(f"actor_token_file: {self._actor.path!r} is missing, unreadable or empty")
        key = self._key(subject_token, actor, target)
        cached = self._cache.get(key)
        if cached is not None:
            if cached.expires_at is not None and self._clock() < cached.expires_at:
                self._cache.move_to_end(key)
                return cached
            del self._cache[key]
        if budget_s <= 0:
            return _unavailable("no time left in the request's deadline")
        task = self._inflight.get(key)
        shared = task is not None
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key, subject_token, actor, target))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        try:
            async with asyncio.timeout(budget_s):
                # Shielded: a request whose deadline passes leaves the fetch running for the others waiting on it.
                got = await asyncio.shield(task)
                if shared and isinstance(got, Credential) and got.expires_at is None:
                    # A token for one request went to the request that fetched it: this one fetches its own.
                    got = await self._fetch(key, subject_token, actor, target)
                return got
        except TimeoutError:
            return _unavailable("the request's deadline passed while the token was fetched")

    def _key(self, subject_token: str | None, actor: str | None, target: Target) -> tuple[str, ...]:
        digest = hashlib.sha256(subject_token.encode()).hexdigest() if subject_token else "-"
        actor_digest = hashlib.sha256(actor.encode()).hexdigest() if actor else "-"
        return (digest, actor_digest, target.parameter or "-", target.value or "-", " ".join(target.scopes))

    def _form(self, subject_token: str | None, actor: str | None, target: Target) -> dict[str, str]:
        cfg = self.cfg
        form: dict[str, str] = {}
        if cfg.kind == "token_exchange":
            assert subject_token is not None
            form.update(
                grant_type=TOKEN_EXCHANGE,
                subject_token=subject_token,
                subject_token_type=cfg.subject_token_type,
                requested_token_type=ACCESS_TOKEN_TYPE,
            )
            if actor is not None:
                form.update(actor_token=actor, actor_token_type=cfg.actor_token_type)
        else:
            form["grant_type"] = "client_credentials"
        if target.parameter is not None and target.value is not None:
            form[target.parameter] = target.value
        if target.scopes:
            form["scope"] = " ".join(target.scopes)
        return form

    async def _fetch(
        self, key: tuple[str, ...], subject_token: str | None, actor: str | None, target: Target
    ) -> Credential | CredentialRefusal:
        cfg = self.cfg
        form = self._form(subject_token, actor, target)
        headers: dict[str, str] = {}
        try:
            self._auth.apply(form, headers, cfg.token_endpoint)
        except ClientAuthError as exc:
            return _unavailable(f"client authentication: {exc}")
        permit = self.breaker.acquire()
        if permit is None:
            return _unavailable("the token endpoint's circuit is open")
        # The exchange starts now, with nothing awaited in between: the permit counts (pep/breaker.py `admit`).
        self.breaker.admit(permit)
        result: Credential | CredentialRefusal | None = None
        counts = True
        try:
            answer = await self._endpoint.post_form(cfg.token_endpoint, form, headers, cfg.timeout_s)
            result, counts = self._read(answer, target)
            if isinstance(result, Credential):
                self._store(key, result)
            return result
        finally:
            self._report(permit, result, counts)

    def _read(
        self, answer: Reply | OAuthError | Unavailable, target: Target
    ) -> tuple[Credential | CredentialRefusal, bool]:
        """The outcome, and whether it counts against the server (True: a failure, if it is a refusal)."""
        if isinstance(answer, Unavailable):
            return _unavailable(f"token endpoint: {answer.kind}: {answer.detail}"), True
        if isinstance(answer, OAuthError):
            # The server answered: it works, and refused this request (invalid_grant, invalid_scope, ...).
            return _unavailable(f"token endpoint refused: {answer.error}"), False
        read = read_token(answer, self.cfg.kind, target, self.cfg)
        if isinstance(read, str):
            return _unavailable(read), True
        value, expires_in = read
        expires_at = None
        if expires_in is not None and expires_in > self.cfg.expiry_margin_s:
            expires_at = self._clock() + expires_in - self.cfg.expiry_margin_s
        return Credential(self.cfg.header, value, expires_at), True

    def _report(self, permit: Permit, result: Credential | CredentialRefusal | None, counts: bool) -> None:
        if isinstance(result, Credential) or (isinstance(result, CredentialRefusal) and not counts):
            self.breaker.success(permit)
            self._on_fetch("success" if isinstance(result, Credential) else "refused")
        else:  # a failure, or cancelled (the source closed)
            self.breaker.failure(permit)
            self._on_fetch("error")

    def _store(self, key: tuple[str, ...], credential: Credential) -> None:
        if credential.expires_at is None:
            return
        self._cache[key] = credential
        self._cache.move_to_end(key)
        while len(self._cache) > self.cfg.max_cached:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._cache.clear()
        if self._owns_endpoint:
            await self._endpoint.close()
