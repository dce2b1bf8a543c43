"""OpenID CIBA Core 1.0, poll mode: ask a person to approve on their own device, and read their answer.

`start` sends the backchannel authentication request (`login_hint` = the approver, `binding_message` = what they
approve, `requested_expiry`); `poll` asks the token endpoint once; `wait` polls until an answer or the caller's
deadline, honouring the OP's `interval` (CIBA's default 5 s when the OP gives none, never below
`min_interval_s`) and adding 5 s on every `slow_down` (CIBA 7.3, RFC 8628 3.5).

**What proves that the approver, not someone else, approved.** The token endpoint, called with this client's own
authentication and the `auth_req_id` only the PEP holds, returns an ID token. The PEP verifies it: signed with a
key from the OP's JWKS (`jwks_uri`, fetched over the same verified TLS; never `none` or HMAC), `iss` equal to the
configured issuer, `aud` holding this client (and `azp` this client when there are several audiences), unexpired,
and the configured claim (`approver_claim`, default `sub`) equal to the approver the PDP named (and not marked
unverified by the OP: `email_verified: false` for `email`). So the OP has
authenticated that person for this request; the approver named by the PDP is the `login_hint` the OP resolved,
and the claim check catches an OP that resolved it to someone else.

Outcomes: `Approved`, or `NotApproved` with `approval_denied` (the person declined: `access_denied`),
`approval_timeout` (`expired_token`, or the deadline came first), `approval_invalid` (`invalid_grant`: the
`auth_req_id` is unknown or already redeemed; redemption is single-use at the OP) or `approval_unavailable`
(unreachable, slow, an error status, a malformed answer, an ID token that does not verify, an OAuth error that
means the PEP or the OP is misconfigured). The OP has its own circuit breaker (`pep.breaker`): transport failures,
timeouts, error statuses and malformed answers count against it; OAuth answers (pending, denied, expired) do not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import jwt
import orjson

from pep.breaker import Breaker, Transition
from pep.config import JWT_ALGORITHMS, ApprovalsConfig
from pep.decision import Reason
from pep.identity.keys import KeysError, KeySet
from pep.oauth.client_auth import ClientAuth, ClientAuthConfig, ClientAuthError
from pep.oauth.endpoint import Answer, Endpoint, OAuthError, Reply, Unavailable

GRANT_TYPE = "urn:openid:params:grant-type:ciba"
DEFAULT_INTERVAL_S = 5.0  # CIBA 7.3: when the OP sends no interval
SLOW_DOWN_S = 5.0  # CIBA 11 / RFC 8628 3.5: every slow_down adds this much
MAX_AUTH_REQ_ID = 1024
JWKS_CACHE_S = 300.0
JWKS_MIN_REFETCH_S = 10.0
ID_TOKEN_LEEWAY_S = 30

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CibaConfig:
    issuer: str
    backchannel_endpoint: str
    token_endpoint: str
    jwks_uri: str
    client: ClientAuthConfig
    scope: str = "openid"
    approver_claim: str = "sub"
    timeout_s: float = 5.0  # each exchange with the OP
    min_interval_s: float = 1.0
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA", "PS256")
    breaker: tuple[int, float, int] = (5, 5.0, 1)  # failure_threshold, open seconds, half-open probes


def ciba_config(approvals: ApprovalsConfig) -> CibaConfig:
    """The runtime settings of the `approvals` section (config keys in milliseconds)."""
    b = approvals.breaker
    return CibaConfig(
        issuer=approvals.issuer,
        backchannel_endpoint=approvals.backchannel_authentication_endpoint,
        token_endpoint=approvals.token_endpoint,
        jwks_uri=approvals.jwks_uri,
        client=approvals.client,
        scope=" ".join(("openid", *approvals.scopes)),
        approver_claim=approvals.approver_claim,
        timeout_s=approvals.timeout_ms / 1000,
        min_interval_s=approvals.min_poll_interval_ms / 1000,
        breaker=(b.failure_threshold, b.open_ms / 1000, b.half_open_probes),
    )


@dataclass(frozen=True, slots=True)
class Started:
    auth_req_id: str
    expires_at: float  # seconds since the epoch: the OP's expiry of the request
    interval_s: float


@dataclass(frozen=True, slots=True)
class Pending:
    interval_s: float


@dataclass(frozen=True, slots=True)
class Approved:
    approver: str
    approved_at: float  # seconds since the epoch (`auth_time` when the OP sends it)


@dataclass(frozen=True, slots=True)
class NotApproved:
    reason: Reason
    detail: str


def _unavailable(detail: str) -> NotApproved:
    return NotApproved(Reason.APPROVAL_UNAVAILABLE, detail)


def read_started(answer: Answer, now: float, default_interval_s: float, min_interval_s: float) -> Started | NotApproved:
    """Pure: the backchannel authentication answer (CIBA 7.3 and 13)."""
    if isinstance(answer, Unavailable):
        return _unavailable(f"backchannel request: {answer.kind}: {answer.detail}")
    if isinstance(answer, OAuthError):
        if answer.error == "access_denied":
            return NotApproved(Reason.APPROVAL_DENIED, "the OP refused to ask the approver (access_denied)")
        return _unavailable(f"backchannel request refused: {answer.error}")
    body = answer.body
    auth_req_id, expires_in, interval = body.get("auth_req_id"), body.get("expires_in"), body.get("interval")
    if not isinstance(auth_req_id, str) or not 0 < len(auth_req_id) <= MAX_AUTH_REQ_ID:
        return _unavailable("backchannel answer without a usable auth_req_id")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
        return _unavailable("backchannel answer without a positive integer expires_in")
    if interval is None:
        interval = default_interval_s
    elif isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        return _unavailable("backchannel answer with an interval that is not a non-negative integer")
    return Started(auth_req_id, now + expires_in, max(float(interval), min_interval_s))


def read_poll(answer: Answer, interval_s: float, slow_down_s: float = SLOW_DOWN_S) -> Pending | Reply | NotApproved:
    """Pure: a token endpoint answer to a CIBA poll. A `Reply` still needs its ID token verified."""
    if isinstance(answer, Unavailable):
        return _unavailable(f"token endpoint: {answer.kind}: {answer.detail}")
    if isinstance(answer, Reply):
        return answer
    match answer.error:
        case "authorization_pending":
            return Pending(interval_s)
        case "slow_down":
            return Pending(interval_s + slow_down_s)
        case "access_denied":
            return NotApproved(Reason.APPROVAL_DENIED, "the approver declined")
        case "expired_token":
            return NotApproved(Reason.APPROVAL_TIMEOUT, "the backchannel request expired before anyone approved")
        case "invalid_grant":
            return NotApproved(Reason.APPROVAL_INVALID, "the auth_req_id is unknown to the OP or already redeemed")
        case other:
            return _unavailable(f"token endpoint refused the poll: {other}")


class IdTokens:
    """Verifies the ID token of a CIBA grant against the OP's JWKS (cached, refetched on an unknown `kid`)."""

    def __init__(self, cfg: CibaConfig, endpoint: Endpoint, clock: Callable[[], float] = time.time) -> None:
        self._cfg = cfg
        self._endpoint = endpoint
        self._clock = clock
        self._algorithms = tuple(a for a in cfg.algorithms if a in JWT_ALGORITHMS)
        self._keys: KeySet | None = None
        self._fetched = float("-inf")
        self._attempted = float("-inf")

    async def _key_set(self, kid: str | None) -> KeySet | str:
        now = self._clock()
        stale = now - self._fetched >= JWKS_CACHE_S
        unknown = self._keys is not None and kid is not None and kid not in self._keys.kids
        if (self._keys is None or stale or unknown) and now - self._attempted >= JWKS_MIN_REFETCH_S:
            self._attempted = now
            answer = await self._endpoint.get_json(self._cfg.jwks_uri, self._cfg.timeout_s)
            if isinstance(answer, Reply):
                try:
                    self._keys, self._fetched = KeySet.parse(orjson.dumps(answer.body), self._algorithms), now
                except KeysError as exc:
                    return f"jwks_uri {exc}"
            elif self._keys is None:
                detail = answer.detail if isinstance(answer, Unavailable) else answer.error
                return f"jwks_uri could not be fetched: {detail}"
        return self._keys if self._keys is not None else "jwks_uri has not been fetched yet"

    async def verify(self, id_token: Any, approver: str) -> Approved | str:
        """The approval the ID token proves, or why it proves nothing (never quoting the token)."""
        if not isinstance(id_token, str) or id_token.count(".") != 2:
            return "the token answer has no ID token"
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            return "the ID token is malformed"
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self._algorithms or (kid is not None and not isinstance(kid, str)):
            return f"the ID token's algorithm {str(alg)[:16]!r} is not accepted"
        keys = await self._key_set(kid)
        if isinstance(keys, str):
            return keys
        key = keys.get(kid, alg)
        if key is None:
            return "no key of the OP's JWKS fits the ID token"
        cfg = self._cfg
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key,
                algorithms=[alg],
                audience=cfg.client.client_id,
                issuer=cfg.issuer,
                leeway=ID_TOKEN_LEEWAY_S,
                options={"require": ["iss", "aud", "exp", "iat", "sub"]},
            )
        except jwt.PyJWTError as exc:
            return f"the ID token does not verify ({type(exc).__name__})"
        audience = claims.get("aud")
        if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != cfg.client.client_id:
            return "the ID token has several audiences and another authorized party"
        if claims.get(cfg.approver_claim) != approver:
            return f"the ID token's {cfg.approver_claim} is not the approver the policy named"
        # OIDC's `email_verified` / `phone_number_verified`: an address anyone may put on their own account proves
        # nothing until the OP has verified it. Absent, the OP's resolution of the login hint stands.
        verified = claims.get(f"{cfg.approver_claim}_verified", True)
        if verified is not True:
            return f"the ID token's {cfg.approver_claim} is not verified ({cfg.approver_claim}_verified)"
        auth_time = claims.get("auth_time")
        approved_at = float(auth_time) if isinstance(auth_time, int) and not isinstance(auth_time, bool) else None
        return Approved(approver, approved_at if approved_at is not None else self._clock())


class CibaClient:
    """One OP, one client registration, one breaker. `close()` the endpoint when done."""

    def __init__(
        self,
        cfg: CibaConfig,
        endpoint: Endpoint,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        slow_down_s: float = SLOW_DOWN_S,
        on_transition: Transition | None = None,
    ) -> None:
        self.cfg = cfg
        self._endpoint = endpoint
        self._auth = ClientAuth(cfg.client, clock)
        self._tokens = IdTokens(cfg, endpoint, clock)
        self._clock = clock
        self._monotonic = monotonic
        self._slow_down_s = slow_down_s
        threshold, open_s, probes = cfg.breaker
        self.breaker = Breaker(threshold, open_s, probes, monotonic, on_transition or (lambda _o, _n: None))

    async def close(self) -> None:
        await self._endpoint.close()

    async def _exchange(
        self, url: str, form: dict[str, str], budget_s: float, read: Callable[[Answer], Awaitable[_T]]
    ) -> _T | NotApproved:
        """One POST under the breaker, read by `read` while the permit is held.

        Counted against the OP: no answer, an error status, a malformed answer, and a well-formed answer that `read`
        finds unusable (a `Reply` read as `approval_unavailable`: a bad backchannel answer, an ID token that does not
        verify). Not counted: a timeout when the caller's budget was shorter than `timeout_s` (that is
        `approval_timeout`: the request's own time ran out), or the caller going away. Either releases the permit
        (a probe's place goes to the next request): counted as failures, a caller who took the half-open probe and
        went away, once per `open_s`, kept the circuit open for everyone."""
        headers: dict[str, str] = {}
        try:
            self._auth.apply(form, headers, url)
        except ClientAuthError as exc:  # the PEP's own credential file: the PEP's problem, not the OP's
            return _unavailable(f"client authentication: {exc}")
        permit = self.breaker.acquire()
        if permit is None:
            return _unavailable("the OP's circuit is open")
        # The exchange starts now, with nothing awaited in between: the permit counts (pep/breaker.py `admit`).
        self.breaker.admit(permit)
        timeout_s = min(budget_s, self.cfg.timeout_s)
        verdict = "neutral"
        try:
            answer = await self._endpoint.post_form(url, form, headers, timeout_s)
            if isinstance(answer, Unavailable) and answer.kind == "timeout" and timeout_s < self.cfg.timeout_s:
                # The caller's deadline came first, not the OP's: nobody approved in time, and the OP is not
                # blamed for it.
                return NotApproved(Reason.APPROVAL_TIMEOUT, "the time the request may wait ran out")
            result = await read(answer)
            if isinstance(answer, Unavailable):
                verdict = "failure"
            elif isinstance(result, NotApproved) and result.reason is Reason.APPROVAL_UNAVAILABLE:
                verdict = "failure" if isinstance(answer, Reply) else "success"
            else:
                verdict = "success"
            return result
        finally:
            if verdict == "success":
                self.breaker.success(permit)
            elif verdict == "failure":
                self.breaker.failure(permit)
            else:  # nothing learnt about the OP: a probe's place goes to the next request
                self.breaker.release(permit)

    async def start(
        self, approver: str, binding_message: str, requested_expiry_s: int, budget_s: float | None = None
    ) -> Started | NotApproved:
        """Ask the OP to ask `approver`; `requested_expiry_s` is how long the person has."""
        form = {
            "scope": self.cfg.scope,
            "login_hint": approver,
            "binding_message": binding_message,
            "requested_expiry": str(max(1, int(requested_expiry_s))),
        }

        async def read(answer: Answer) -> Started | NotApproved:
            return read_started(answer, self._clock(), DEFAULT_INTERVAL_S, self.cfg.min_interval_s)

        budget = self.cfg.timeout_s if budget_s is None else budget_s
        return await self._exchange(self.cfg.backchannel_endpoint, form, budget, read)

    async def poll(
        self, auth_req_id: str, approver: str, interval_s: float, budget_s: float | None = None
    ) -> Pending | Approved | NotApproved:
        """One poll of the token endpoint. Approved only with an ID token for `approver` (module docstring)."""
        form = {"grant_type": GRANT_TYPE, "auth_req_id": auth_req_id}

        async def read(answer: Answer) -> Pending | Approved | NotApproved:
            found = read_poll(answer, interval_s, self._slow_down_s)
            if not isinstance(found, Reply):
                return found
            verified = await self._tokens.verify(found.body.get("id_token"), approver)
            return _unavailable(verified) if isinstance(verified, str) else verified

        budget = self.cfg.timeout_s if budget_s is None else budget_s
        return await self._exchange(self.cfg.token_endpoint, form, budget, read)

    async def wait(self, started: Started, approver: str, deadline: float) -> Approved | NotApproved:
        """Poll until the person answers, the request expires, or `deadline` (monotonic clock) is too close for
        another poll: the last poll is the last one whose interval ends before the deadline."""
        interval = started.interval_s
        while True:
            if self._monotonic() + interval >= deadline:
                return NotApproved(Reason.APPROVAL_TIMEOUT, "nobody approved within the time the request may wait")
            if self._clock() + interval >= started.expires_at:
                return NotApproved(Reason.APPROVAL_TIMEOUT, "the backchannel request expires before the next poll")
            await asyncio.sleep(interval)
            result = await self.poll(started.auth_req_id, approver, interval, deadline - self._monotonic())
            if not isinstance(result, Pending):
                return result
            interval = max(result.interval_s, self.cfg.min_interval_s)
