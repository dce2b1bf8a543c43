"""Token signing keys from a JWKS file or URL, with the caching, refetch and rate limit rules of `identity.jwt`.

A key is only ever used with an algorithm that fits its type (RSA for RS*/PS*, the named curve for ES*, an
Edwards curve for EdDSA) and that the config allows; symmetric (`oct`) keys and keys not meant for signatures
are never loaded. PyJWT checks the same again when it verifies.

Freshness (jwks_url): keys are fresh for the answer's Cache-Control max-age (else `jwks_cache_ms`). Once stale, the
next lookup refetches; while refetching fails, the last good keys stay in use for up to `jwks_max_stale_ms`,
then they are dropped and tokens are refused `identity_unavailable`. A `kid` the keys do not hold triggers a
refetch (key rotation), at most once per `jwks_min_refresh_ms`, so a flood of made-up `kid`s cannot become a
flood of fetches. One fetch runs at a time; every lookup waiting for it shares its result.

A key that comes back unchanged (same JWK, same algorithm) from a re-read or a refetch is the same `PyJWK` object,
so "the key that verified this token is still in the set" is an identity check (see `tokens.TokenVerifier`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Final, NoReturn

import aiohttp
import orjson
from jwt import PyJWK
from jwt.exceptions import PyJWKError, PyJWTError
from mypy_extensions import mypyc_attr

from pep.cache_control import ttl_of
from pep.config import JwtConfig
from pep.secret_file import Stamp, file_stamp

MAX_JWKS_BYTES: Final = 1 << 20
CHECK_S: Final = 1.0  # a jwks_file is looked at (one stat) at most this often

_EC_CURVES: Final = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_OKP_CURVES: Final = frozenset({"Ed25519", "Ed448"})


class KeysError(Exception):
    """A key set that cannot be used; the message names what is wrong, never key material."""


def fits(jwk: dict[str, Any], alg: str) -> bool:
    """Whether a public JWK may verify signatures made with `alg`."""
    kty = jwk.get("kty")
    if alg.startswith(("RS", "PS")):
        return kty == "RSA"
    if alg in _EC_CURVES:
        return kty == "EC" and jwk.get("crv") == _EC_CURVES[alg]
    if alg == "EdDSA":
        return kty == "OKP" and jwk.get("crv") in _OKP_CURVES
    return False


class KeySet:
    """Public keys by (kid, alg). A token without a `kid` may use the only key that fits its algorithm."""

    __slots__ = ("_by_jwk", "_by_kid", "_unnamed", "kids")

    def __init__(
        self,
        keys: dict[tuple[str, str], PyJWK],
        unnamed: dict[str, PyJWK],
        kids: frozenset[str],
        by_jwk: dict[bytes, PyJWK] | None = None,
    ) -> None:
        self._by_kid = keys
        self._unnamed = unnamed
        self.kids = kids
        self._by_jwk = by_jwk or {}  # canonical JWK + alg -> key: what a later parse may reuse

    @classmethod
    def parse(cls, raw: bytes, algorithms: tuple[str, ...], previous: KeySet | None = None) -> KeySet:
        """The usable keys of a JWK Set. A key identical to one of `previous` (same JWK and algorithm) is reused."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise KeysError("is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise KeysError('is not a JWK Set (an object with a "keys" list)')
        by_kid: dict[tuple[str, str], PyJWK] = {}
        fitting: dict[str, list[PyJWK]] = {}
        kids: set[str] = set()
        by_jwk: dict[bytes, PyJWK] = {}
        known = previous._by_jwk if previous is not None else {}
        for jwk in data["keys"]:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or "d" in jwk:
                continue  # encryption keys are not for us; a private key in a public set is not trusted
            kid = jwk.get("kid")
            canonical = orjson.dumps(jwk, option=orjson.OPT_SORT_KEYS)
            for alg in algorithms:
                if not fits(jwk, alg) or jwk.get("alg", alg) != alg:
                    continue
                same = canonical + b" " + alg.encode()
                key = known.get(same)
                if key is None:
                    try:
                        key = PyJWK(jwk, algorithm=alg)
                    except (PyJWKError, PyJWTError, ValueError, TypeError):  # e.g. InvalidKeyError: bad coordinates
                        continue
                by_jwk[same] = key
                fitting.setdefault(alg, []).append(key)
                if isinstance(kid, str):
                    by_kid[kid, alg] = key
                    kids.add(kid)
        if not fitting:
            raise KeysError(f"holds no usable public signing key for {', '.join(algorithms)}")
        unnamed = {alg: keys[0] for alg, keys in fitting.items() if len(keys) == 1}
        return cls(by_kid, unnamed, frozenset(kids), by_jwk)

    def get(self, kid: str | None, alg: str) -> PyJWK | None:
        if kid is None:
            return self._unnamed.get(alg)
        return self._by_kid.get((kid, alg))


class Lookup:
    """The outcome of asking for a key: the key, or why there is none (`unknown`: the keys hold no such kid)."""

    __slots__ = ("key", "problem")

    def __init__(self, key: PyJWK | None, problem: str | None) -> None:
        self.key = key
        self.problem = problem  # None with key None: no key fits the token (identity_invalid)


@mypyc_attr(allow_interpreted_subclasses=True)
class KeySource(ABC):
    """Where keys come from. `lookup` never raises, and is asked for every token, remembered ones too: it is
    where a source notices that its keys changed (a file looked at again, a URL refetched once stale) or can no
    longer be had (an unusable file, a URL stale past `jwks_max_stale_ms`)."""

    @abstractmethod
    async def lookup(self, kid: str | None, alg: str) -> Lookup:
        """The key for (kid, alg) in the current usable set, or why there is none."""

    async def start(self) -> None:
        """Load or fetch once at start (a URL that is down is not fatal: tokens are refused until it is up)."""
        return None  # the default: nothing to load

    async def close(self) -> None:
        """Release what the source holds."""
        return None  # the default: nothing held


class FileKeys(KeySource):
    """A JWKS file, re-read when it changes (Kubernetes swaps a symlink). An unusable file refuses every token."""

    def __init__(self, path: str, algorithms: tuple[str, ...], clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._algorithms = algorithms
        self._clock = clock
        self._checked = float("-inf")
        self._stamp: Stamp | None = None
        self._keys: KeySet | None = None
        self._problem = "not loaded yet"

    def load(self) -> None:
        """Read the file now. Raises KeysError (with the reason) when it cannot be used."""
        self._checked = self._clock()
        stamp = file_stamp(self.path)
        if stamp is not None and stamp == self._stamp and self._keys is not None:
            return
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_JWKS_BYTES + 1)
        except OSError as exc:
            self._fail(f"cannot be read ({exc.strerror or exc})")
        if len(raw) > MAX_JWKS_BYTES:
            self._fail(f"is larger than {MAX_JWKS_BYTES} bytes")
        try:
            keys = KeySet.parse(raw, self._algorithms, self._keys)
        except KeysError as keys_error:
            self._fail(str(keys_error))
        self._stamp, self._keys, self._problem = stamp, keys, ""

    def _fail(self, problem: str) -> NoReturn:
        self._stamp, self._keys, self._problem = None, None, f"jwks_file {problem}"
        raise KeysError(self._problem)

    async def start(self) -> None:
        self.load()

    def refresh(self) -> None:
        """Look at the file now (SIGHUP)."""
        with contextlib.suppress(KeysError):  # the failure is kept as the reason tokens are refused
            self.load()

    async def lookup(self, kid: str | None, alg: str) -> Lookup:
        if self._clock() - self._checked >= CHECK_S:
            self.refresh()
        keys = self._keys
        if keys is None:
            return Lookup(None, self._problem)
        return Lookup(keys.get(kid, alg), None)


class UrlKeys(KeySource):
    """A JWKS URL fetched over TLS, cached per Cache-Control, refetched on an unknown `kid` (rate-limited)."""

    def __init__(
        self, url: str, cfg: JwtConfig, tls: ssl.SSLContext, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.url = url
        self._cfg = cfg
        self._tls = tls
        self._clock = clock
        self._keys: KeySet | None = None
        self._fresh_until = float("-inf")
        self._drop_at = float("-inf")
        self._attempted = float("-inf")
        self._problem = "not fetched yet"
        self._fetch: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.fetches: Callable[[bool], None] = lambda ok: None  # set by the owner to count fetches

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._tls, limit=2),
            timeout=aiohttp.ClientTimeout(total=self._cfg.jwks_timeout_ms / 1000),
            auto_decompress=True,
            trust_env=False,
        )
        await self._refetch(force=True)

    async def close(self) -> None:
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()
        if self._session is not None:
            await self._session.close()

    async def lookup(self, kid: str | None, alg: str) -> Lookup:
        now = self._clock()
        if now >= self._fresh_until:
            await self._refetch()
        keys = self._keys_now()
        if keys is not None and kid is not None and kid not in keys.kids:
            await self._refetch()  # perhaps rotated: a new key is published before tokens are signed with it
            keys = self._keys_now()
        if keys is None:
            return Lookup(None, self._problem)
        return Lookup(keys.get(kid, alg), None)

    def _keys_now(self) -> KeySet | None:
        if self._keys is not None and self._problem and self._clock() >= self._drop_at:
            self._keys = None  # stale for too long: refusing beats trusting keys that may have been revoked
            self._problem = f"jwks_url keys expired and could not be refreshed ({self._problem})"
        return self._keys

    async def _refetch(self, force: bool = False) -> None:
        """Fetch unless one ran too recently; wait for the running fetch if there is one."""
        if self._fetch is None or self._fetch.done():
            if not force and self._clock() - self._attempted < self._cfg.jwks_min_refresh_ms / 1000:
                return
            self._attempted = self._clock()
            self._fetch = asyncio.get_running_loop().create_task(self._do_fetch())
        # Shielded: a caller that goes away must not cancel the fetch the others wait for.
        await asyncio.shield(self._fetch)

    async def _do_fetch(self) -> None:
        ok = False
        try:
            raw, cache_control = await self._get()
            keys = KeySet.parse(raw, self._cfg.algorithms, self._keys)
        except KeysError as exc:
            self._problem = f"jwks_url {exc}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as client_error:
            self._problem = f"jwks_url could not be fetched ({type(client_error).__name__})"
        else:
            now = self._clock()
            ttl = ttl_of(cache_control, self._cfg.jwks_cache_ms / 1000)
            # A fetch per request is never wanted: no-cache and tiny max-ages wait for the refresh interval.
            ttl = max(ttl, self._cfg.jwks_min_refresh_ms / 1000)
            self._fresh_until = now + ttl
            self._drop_at = self._fresh_until + self._cfg.jwks_max_stale_ms / 1000
            self._keys, self._problem, ok = keys, "", True
        finally:
            self.fetches(ok)

    async def _get(self) -> tuple[bytes, str | None]:
        assert self._session is not None, "start() first"
        async with self._session.get(self.url, allow_redirects=False, headers={"accept": "application/json"}) as r:
            if r.status != 200:
                raise KeysError(f"answered HTTP {r.status}")
            raw = bytearray()
            while chunk := await r.content.read(MAX_JWKS_BYTES + 1 - len(raw)):
                raw += chunk
                if len(raw) > MAX_JWKS_BYTES:
                    raise KeysError(f"answer is larger than {MAX_JWKS_BYTES} bytes")
            return bytes(raw), r.headers.get("Cache-Control")
