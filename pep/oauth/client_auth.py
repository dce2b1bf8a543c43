"""Client authentication at an authorization server, from files: `client_secret_basic`, `client_secret_post`
(RFC 6749 2.3.1) or `private_key_jwt` (RFC 7523, OpenID Connect Core 9).

A secret file is re-read when it changes (`pep.secret_file`); a private key file too (one `stat` at most once a
second). What is wrong is named by the file, never by its content.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from urllib.parse import quote

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from pep.config import OAuthClientConfig
from pep.secret_file import CHECK_S, FileSecret, Stamp, file_stamp

METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")
KEY_ALGORITHMS = ("RS256", "PS256", "ES256", "ES384", "EdDSA")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_TTL_S = 60


ClientAuthConfig = OAuthClientConfig  # the config's shape is this module's input


class ClientAuthError(Exception):
    """The client's credential cannot be used now; the message names the file, never its content."""


class _KeyFile:
    """A PEM private key, re-read when the file changes."""

    def __init__(self, path: str, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        self._checked = float("-inf")
        self._stamp: Stamp | None = None
        self._key: object | None = None

    def key(self) -> object:
        now = self._clock()
        if now - self._checked >= CHECK_S:
            self._checked = now
            stamp = file_stamp(self.path)
            if stamp is None:
                self._stamp, self._key = None, None
            elif stamp != self._stamp:
                try:
                    with open(self.path, "rb") as f:
                        self._key = load_pem_private_key(f.read(), password=None)
                    self._stamp = stamp
                except (OSError, ValueError, TypeError):
                    self._stamp, self._key = None, None
        if self._key is None:
            raise ClientAuthError(f"{self.path!r} is missing or not an unencrypted PEM private key")
        return self._key


class ClientAuth:
    """Adds the client's authentication to a form POST."""

    def __init__(self, config: ClientAuthConfig, clock: Callable[[], float] = time.time) -> None:
        if config.method not in METHODS:
            raise ValueError(f"unknown client authentication method {config.method!r}")
        self.config = config
        self._clock = clock
        self._secret = FileSecret(config.secret_file) if config.secret_file is not None else None
        self._key = _KeyFile(config.key_file, time.monotonic) if config.key_file is not None else None

    def problem(self) -> str | None:
        """Why the credential cannot be used now (for `pep check` and logs), or None."""
        try:
            self._credential()
        except ClientAuthError as exc:
            return str(exc)
        return None

    def _credential(self) -> str | object:
        if self._secret is not None:
            value = self._secret.value()
            if value is None:
                raise ClientAuthError(f"{self._secret.path!r} is missing, unreadable or empty")
            return value
        assert self._key is not None
        return self._key.key()

    def apply(self, form: dict[str, str], headers: dict[str, str], audience: str) -> None:
        """Authenticate the request to `audience` (the endpoint's URL). Raises ClientAuthError."""
        cfg = self.config
        credential = self._credential()
        if cfg.method == "client_secret_basic":
            assert isinstance(credential, str)
            pair = f"{quote(cfg.client_id, safe='')}:{quote(credential, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        elif cfg.method == "client_secret_post":
            assert isinstance(credential, str)
            form["client_id"] = cfg.client_id
            form["client_secret"] = credential
        else:
            now = int(self._clock())
            claims = {
                "iss": cfg.client_id,
                "sub": cfg.client_id,
                "aud": audience,
                "iat": now,
                "exp": now + ASSERTION_TTL_S,
                "jti": secrets.token_urlsafe(16),
            }
            extra = {"kid": cfg.key_id} if cfg.key_id else None
            try:
                assertion = jwt.encode(claims, credential, algorithm=cfg.key_alg, headers=extra)  # type: ignore[arg-type]
            except (jwt.PyJWTError, ValueError, TypeError):
                raise ClientAuthError(f"{self._key.path if self._key else '?'!r} does not sign {cfg.key_alg}") from None
            form["client_id"] = cfg.client_id
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = assertion
