"""A resource server on a real socket that accepts only access tokens its authorization server issued.

It does what an API behind the PEP does with a just-in-time credential: fetches the authorization server's JWKS
over HTTP (its `jwks_uri`), verifies the bearer token's signature, issuer, expiry and audience, and requires a
scope. Every request it sees is kept with the verified claims (or why they were refused), so a test proves both
what arrived and that nothing did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import orjson
from aiohttp import web
from multidict import CIMultiDict

from tests.support.loopback import LoopbackServer


@dataclass
class Seen:
    method: str
    target: str
    headers: CIMultiDict[str]
    claims: dict[str, Any] | None  # the verified token's claims; None: refused (`problem` says why)
    problem: str | None = None


@dataclass
class TokenCheckingUpstream(LoopbackServer):
    """Accepts `Authorization: Bearer <JWT>` signed by a key of `jwks_uri`, from `issuer`, for `audience`, with
    `scope` among its scopes; answers 200 with the claims, else 401."""

    jwks_uri: str = ""
    issuer: str = ""
    audience: str = ""
    scope: str = ""
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def start(self) -> None:
        await self.serve(web.ServerRunner(web.Server(self._handle), access_log=None))

    async def _keys(self) -> jwt.PyJWKSet:
        # Fetched for every request: a test may restart the authorization server, and this one is cheap.
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.jwks_uri) as resp:
            return jwt.PyJWKSet.from_dict(await resp.json(content_type=None))

    async def _verify(self, authorization: str | None) -> dict[str, Any] | str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "no bearer token"
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            keys = await self._keys()
            key = next((k for k in keys.keys if k.key_id == kid), None)
            if key is None:
                return "no key of the authorization server signed it"
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["ES256", "RS256", "PS256", "EdDSA"],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "aud", "iss"]},
            )
        except (jwt.PyJWTError, aiohttp.ClientError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if self.scope not in str(claims.get("scope", "")).split():
            return f"scope {self.scope} missing"
        return claims

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        await request.read()
        verified = await self._verify(request.headers.get("Authorization"))
        claims = verified if isinstance(verified, dict) else None
        problem = verified if isinstance(verified, str) else None
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), claims, problem))
        if claims is None:
            return web.json_response({"error": "invalid_token", "detail": problem}, status=401)
        return web.Response(body=orjson.dumps({"sub": claims.get("sub")}), content_type="application/json")
