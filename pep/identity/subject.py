"""The policy input's `subject`, from what is verified about the caller, or the reason there is none.

- `workload`: the peer's SPIFFE ID on an mTLS listener, else the configured `identity.workload`.
- `agent`: without `identity.jwt`, the agent header (believed on a loopback listener only). With `identity.jwt`,
  only a verified token's acting agent (see `tokens.acting_agent`), null without a token: a field that can hold
  a verified name never holds an unverified one.
- `unverified_agent` (present with both `identity.jwt` and `identity.agent_header`): the agent header when no
  token was presented, so a policy can still read it, under a name that says what it is.
- `id` and `claims` (present when `identity.jwt` is configured): the token's `sub` and its allow-listed claims,
  both null when no token was presented on a route that does not require one.
- `attributes`: the configured static facts about the workload.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from pep.config import Config, Identity
from pep.decision import Reason
from pep.identity import Refusal, missing
from pep.identity.keys import FileKeys, KeySource, UrlKeys
from pep.identity.spiffe import spiffe_id
from pep.identity.tokens import TokenVerifier, read_token

# The request's verified client certificate; a Refusal when it no longer passes (`ListenerTls.peer`); None: none.
PeerCert = Callable[[], dict[str, Any] | Refusal | None]


class Identifier:
    """Builds the subject of one request. Only the token check awaits (a JWKS fetch, at most)."""

    def __init__(self, identity: Identity, verifier: TokenVerifier | None, trust_agent_header: bool) -> None:
        self._identity = identity
        self._verifier = verifier
        self._token_header = verifier.cfg.header if verifier is not None else None
        self._agent_header = identity.agent_header if trust_agent_header else None
        self._mtls = identity.mtls is not None
        self._attributes = dict(identity.attributes) if identity.attributes else None
        self._unverified = verifier is not None and identity.agent_header is not None
        self.static = self.build(identity.workload, None)  # the subject when nothing varies per request

    def build(
        self,
        workload: str | None,
        agent: str | None,
        sub: str | None = None,
        claims: dict[str, Any] | None = None,
        unverified_agent: str | None = None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"workload": workload, "agent": agent}
        if self._verifier is not None:
            out["id"] = sub
            out["claims"] = claims
        if self._unverified:
            out["unverified_agent"] = unverified_agent
        if self._attributes is not None:
            out["attributes"] = self._attributes
        return out

    def unverified(self, peercert: PeerCert) -> dict[str, Any]:
        """The subject a decision log line shows for a request refused before its subject was built: the static
        one, except on an mTLS listener, where the configured workload is nobody's identity: there it is the
        peer's SPIFFE ID, or None when its certificate carries no valid one."""
        if not self._mtls:
            return self.static
        found = spiffe_id(peercert())
        return self.build(found if isinstance(found, str) else None, None)

    def presented_token(self, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str | None:
        """The caller's token as presented, for a just-in-time credential's token exchange once `subject` has
        verified it (the same headers give the same token). Never put into the subject, a log or an error."""
        if self._token_header is None:
            return None
        token = read_token(headers, self._token_header)
        return token if isinstance(token, str) else None

    async def subject(
        self, headers: CIMultiDictProxy[str] | CIMultiDict[str], peercert: PeerCert, token_required: bool
    ) -> dict[str, Any] | Refusal:
        agent = None
        if self._agent_header is not None:
            agents = headers.getall(self._agent_header, ())
            if len(agents) > 1:
                return Refusal(Reason.REQUEST_AMBIGUOUS, "more than one agent header")
            agent = agents[0] if agents else None
        workload = self._identity.workload
        if self._mtls:
            found = spiffe_id(peercert())
            if isinstance(found, Refusal):
                return found
            workload = found
        if self._verifier is None or self._token_header is None:
            return self.static if agent is None and not self._mtls else self.build(workload, agent)
        token = read_token(headers, self._token_header)
        if isinstance(token, Refusal):
            return token
        if token is None:
            if token_required:
                return missing("no bearer token was presented")
            return self.build(workload, None, unverified_agent=agent)
        verified = await self._verifier.verify(token)
        if isinstance(verified, Refusal):
            return verified
        return self.build(workload, verified.agent, verified.subject_id, verified.claims)


def build_identity(cfg: Config, on_fetch: Callable[[bool], None] | None = None) -> tuple[Identifier, KeySource | None]:
    """The subject builder for a config, and its key source to start and close (None without identity.jwt).

    `on_fetch` is told the result of every jwks_url fetch (a metric)."""
    jwt = cfg.identity.jwt
    keys: KeySource | None = None
    verifier = None
    if jwt is not None:
        if jwt.jwks_file is not None:
            keys = FileKeys(jwt.jwks_file, jwt.algorithms)
        else:
            assert jwt.jwks_url is not None
            url_keys = UrlKeys(jwt.jwks_url, jwt, ssl.create_default_context(cafile=jwt.jwks_ca_file))
            if on_fetch is not None:
                url_keys.fetches = on_fetch
            keys = url_keys
        verifier = TokenVerifier(jwt, keys)
    # The agent header is only believed from callers on this machine (a loopback listener).
    return Identifier(cfg.identity, verifier, cfg.listen.is_loopback), keys
