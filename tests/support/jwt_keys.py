"""Signing keys, tokens and a JWKS server for the identity tests, all made here and now: nothing is checked in.

- `rsa_key`/`ec_key`/`ed_key` generate RS256 / ES256 / EdDSA keys (`cryptography`) with a `kid`; `public_jwk`
  exports the public half with PyJWT's `to_jwk`, `sign` mints a token with `jwt.encode`.
- `unsigned_token` and `hmac_token` craft what PyJWT refuses to: `alg: none`, and HS256 keyed with public bytes.
- `JwksServer` serves a key set over HTTPS on 127.0.0.1 with a certificate from a throwaway CA (trustme). The test
  changes what it answers (`keys`, `status`, `body`, `cache_control`, `hang`, `split`), stops and restarts it, and reads
  `requests` (how many GETs arrived).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from pep.admin import bound_address

ISSUER = "https://issuer.test"
AUDIENCE = "failclosed-pep"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class SigningKey:
    """A private key with the `kid` and `alg` its tokens name."""

    kid: str
    alg: str
    private: PrivateKey

    def public_jwk(self, **extra: Any) -> dict[str, Any]:
        """The public key as a JWK with `kid`, `use: sig` and `alg` (override or add members with `extra`)."""
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        jwk = {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg, **extra}
        return {k: v for k, v in jwk.items() if v is not None}

    def private_jwk(self) -> dict[str, Any]:
        """The whole key, `d` included: what must never be trusted in a public key set."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(self.private, as_dict=True)
        elif isinstance(self.private, ec.EllipticCurvePrivateKey):
            jwk = ECAlgorithm.to_jwk(self.private, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(self.private, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], *, kid: str | None = "", **headers: Any) -> str:
        """A token over `claims`. `kid` defaults to this key's; None leaves it out; another value names that."""
        head = dict(headers)
        named = self.kid if kid == "" else kid
        if named is not None:
            head["kid"] = named
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=head)

    def sign_raw(self, header: bytes, payload: bytes) -> str:
        """A token whose header and claims are exactly these JSON bytes (what `jwt.encode` would not write),
        validly signed."""
        signing_input = f"{b64url(header)}.{b64url(payload)}"
        signature = jwt.get_algorithm_by_name(self.alg).sign(signing_input.encode("ascii"), self.private)
        return f"{signing_input}.{b64url(signature)}"


def rsa_key(kid: str = "rsa-1") -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str = "ec-1") -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def ed_key(kid: str = "ed-1") -> SigningKey:
    return SigningKey(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


def jwks(*keys: SigningKey | dict[str, Any]) -> dict[str, Any]:
    """A JWK Set of the keys' public halves (a dict is taken as a JWK as it is)."""
    return {"keys": [k if isinstance(k, dict) else k.public_jwk() for k in keys]}


def write_jwks(path: Path, *keys: SigningKey | dict[str, Any]) -> Path:
    path.write_text(json.dumps(jwks(*keys)))
    return path


def claims(now: float | None = None, ttl: int = 300, **overrides: Any) -> dict[str, Any]:
    """Claims that pass: issuer, audience, subject, issued now, expiring in `ttl` s. A None override removes."""
    at = int(time.time() if now is None else now)
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": at, "exp": at + ttl}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def raw_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token written by hand: any header, any payload, any signature bytes."""
    return f"{segment(header)}.{segment(payload)}.{b64url(signature)}"


def unsigned_token(payload: dict[str, Any], alg: str = "none", **headers: Any) -> str:
    """`alg: none`: a header, a payload and an empty signature, as an attacker writes it by hand."""
    return raw_token({"alg": alg, "typ": "JWT", **headers}, payload)


def hmac_token(payload: dict[str, Any], secret: bytes, **headers: Any) -> str:
    """HS256 keyed with `secret`: the algorithm-confusion forgery when `secret` is a public key's PEM bytes."""
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT', **headers})}.{segment(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@dataclass
class JwksServer:
    """A JWKS endpoint at `https://127.0.0.1:{port}/jwks.json`.

    Answers `body` if set, else `{"keys": keys}` as JSON, with `status` and `cache_control`; with `hang` set it
    never answers (until stopped). `stop()` closes the listener (connections are refused), `start()` opens it again
    on the same port."""

    ca: trustme.CA
    keys: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    body: bytes | None = None
    cache_control: str | None = "max-age=300"
    hang: bool = False
    split: bool = False  # send the body in two writes, the second a moment later (as a slow network would)
    requests: int = 0
    port: int = 0
    _runner: web.BaseRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/jwks.json"

    def publish(self, *keys: SigningKey | dict[str, Any]) -> None:
        self.keys = jwks(*keys)["keys"]

    async def start(self) -> None:
        self._release = asyncio.Event()
        server = web.Server(self._handle, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=server_tls(self.ca))
        await site.start()
        self.port = bound_address(site)[1]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests += 1
        if self.hang:
            await self._release.wait()
            return web.Response(status=503)
        headers = {"Cache-Control": self.cache_control} if self.cache_control is not None else {}
        body = self.body if self.body is not None else json.dumps({"keys": self.keys}).encode()
        if not self.split:
            return web.Response(status=self.status, body=body, headers=headers, content_type="application/json")
        response = web.StreamResponse(status=self.status, headers={**headers, "Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        half = len(body) // 2
        with contextlib.suppress(ConnectionError):  # the client may stop reading after the first part
            await response.write(body[:half])
            await asyncio.sleep(0.05)
            await response.write(body[half:])
            await response.write_eof()
        return response


def write_ca(ca: trustme.CA, path: Path) -> str:
    ca.cert_pem.write_to_path(str(path))
    return str(path)
