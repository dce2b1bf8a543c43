"""YAML configuration into typed, frozen objects. Every problem is reported as `file: key.path: message`.

All problems are collected, not just the first, so one `pep check` run shows everything to fix. Keys that
belong to capabilities this version does not have are refused by name rather than silently ignored: a config
that asks for credential injection must not start a proxy that does not inject.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

from pep.authority import CONNECT_DEFAULT_PORT, DEFAULT_PORTS, split_authority

ROUTE_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
ATTRIBUTE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Written by the PDP client on every decision request (pep/pdp/transport.py, pep/pdp/http1.py): not a credential's.
_PDP_CLIENT_HEADERS: Final = frozenset({"host", "content-length", "transfer-encoding", "content-type", "x-request-id"})
_PREFIX_OK: Final = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*\Z")

NOT_YET: Final = "is not supported by this version of failclosed-pep"
MIB: Final = 1024 * 1024


class ConfigError(Exception):
    """The config cannot be used. `problems` holds one `file: key.path: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


# Asymmetric JWS algorithms only: `none` and the HMAC family are never accepted (an HMAC key is a shared secret,
# and an HMAC "verified" with a public key is the classic algorithm-confusion forgery).
DEFAULT_JWT_ALGORITHMS: Final = ("RS256", "ES256", "EdDSA")
JWT_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """Verified bearer tokens: who may issue them, for whom, and where the signing keys come from."""

    issuers: tuple[str, ...]
    audiences: tuple[str, ...]
    jwks_file: str | None = None
    jwks_url: str | None = None  # https only
    jwks_ca_file: str | None = None  # CA bundle for jwks_url (default: the system's)
    algorithms: tuple[str, ...] = ()  # set by the parser: DEFAULT_JWT_ALGORITHMS unless configured
    header: str = "authorization"  # lower-cased; `authorization` and `proxy-authorization` carry `Bearer <token>`
    leeway_ms: int = 30000
    claims: tuple[str, ...] = ()  # copied into `subject.claims` when present in the token
    cache_size: int = 10000  # verified tokens remembered (by hash) until they expire; 0: none
    jwks_timeout_ms: int = 2000
    jwks_min_refresh_ms: int = 10000  # no two fetches of jwks_url closer than this (unknown `kid` floods)
    jwks_cache_ms: int = 300000  # how long keys are fresh when the answer has no Cache-Control max-age
    jwks_max_stale_ms: int = 3600000  # keys kept while refetching fails, past their freshness; then dropped


@dataclass(frozen=True, slots=True)
class MtlsConfig:
    """Client certificates on the agent-facing listener; the peer's spiffe:// URI SAN is `subject.workload`."""

    ca_file: str  # the trust bundle client certificates must chain to
    cert_file: str  # the listener's own certificate chain
    key_file: str


@dataclass(frozen=True, slots=True)
class Identity:
    workload: str | None = None
    agent_header: str | None = None  # lower-cased
    attributes: tuple[tuple[str, str], ...] = ()  # static facts about the workload, `subject.attributes`
    jwt: JwtConfig | None = None
    mtls: MtlsConfig | None = None


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 5
    open_ms: int = 5000
    half_open_probes: int = 1


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS to the PDP: a CA bundle to trust, and optionally a client certificate (mTLS)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class PdpAuth:
    """A header the PEP sends to the PDP, its value read from a file (`format` holds `{}` for the value)."""

    value_file: str
    header: str = "authorization"
    format: str = "Bearer {}"


@dataclass(frozen=True, slots=True)
class PdpConfig:
    kind: str
    url: str = ""  # opa: the data path; authzen: the PDP base URL
    timeout_ms: int = 250
    retries: int = 1
    max_in_flight: int = 512
    max_response_bytes: int = 1048576
    breaker: BreakerConfig = BreakerConfig()
    tls: TlsConfig | None = None
    auth: PdpAuth | None = None
    policies: str | None = None  # cedar: a .cedar file or a directory of them
    entities: str | None = None  # cedar: an entities JSON file


@dataclass(frozen=True, slots=True)
class DecisionLogConfig:
    sink: str = "stdout"  # stdout | file | none
    path: str | None = None
    include_arguments: bool = False
    required: bool = False
    max_pending_bytes: int = 16 * MIB  # lines queued or being written; over it a line is dropped (counted)


@dataclass(frozen=True, slots=True)
class RouteMapping:
    """Per-route changes to the default AuthZEN/Cedar mapping. Values are literals or `$dotted.path` references
    into the `pep/v1` document. `None` keeps the default; properties given here replace the default ones."""

    subject_type: str | None = None
    subject_properties: tuple[tuple[str, str], ...] | None = None
    action: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    resource_properties: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class OAuthClientConfig:
    """The PEP as an OAuth client of an authorization server or OpenID Provider; its credential from a file."""

    client_id: str
    method: str = "client_secret_basic"  # client_secret_basic | client_secret_post | private_key_jwt
    secret_file: str | None = None
    key_file: str | None = None  # private_key_jwt: a PEM private key
    key_alg: str = "ES256"
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class JitCredential:
    """A route credential obtained per request after the allow (RFC 8693 token exchange, or client credentials)."""

    kind: str  # token_exchange | client_credentials
    token_endpoint: str
    client: OAuthClientConfig
    audiences: tuple[str, ...] = ()  # the route's maximum: a PDP may pick one of them, the first by default
    resources: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()  # the route's maximum: a PDP may ask for fewer, never more
    subject_token_type: str = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a type name, not a secret
    actor_token_file: str | None = None
    actor_token_type: str = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
    tls: TlsConfig | None = None
    timeout_ms: int = 2000
    expiry_margin_ms: int = 30000
    breaker: BreakerConfig = BreakerConfig()


@dataclass(frozen=True, slots=True)
class Credential:
    """The upstream credential a route injects on allowed requests: exactly one of value_file and value_env, or
    `jit` (obtained per request from an OAuth token endpoint)."""

    header: str  # lower-cased
    format: str = "{}"
    value_file: str | None = None
    value_env: str | None = None
    jit: JitCredential | None = None


@dataclass(frozen=True, slots=True)
class RouteApproval:
    """How a route waits for a person when the PDP answers `approval_required`."""

    mode: str  # hold: the request waits (up to hold_ms) | ticket: denied at once with a sealed ticket to retry with
    hold_ms: int = 60000


@dataclass(frozen=True, slots=True)
class ApprovalsConfig:
    """The approval engine: an OpenID Provider asked through CIBA (poll mode), and the ticket keys."""

    issuer: str
    backchannel_authentication_endpoint: str
    token_endpoint: str
    jwks_uri: str
    client: OAuthClientConfig
    scopes: tuple[str, ...] = ()  # asked for besides `openid`
    approver_claim: str = "sub"  # the ID token claim that must equal the approver the PDP named
    tls: TlsConfig | None = None
    timeout_ms: int = 5000  # each exchange with the OP
    requested_expiry_ms: int = 300000  # how long the approver has (and a ticket lives)
    min_poll_interval_ms: int = 1000
    binding_message_max: int = 64
    ticket_key_files: tuple[str, ...] = ()  # the first seals, all open (rotation)
    elicitation_url: str | None = None  # MCP -32042: where the user sees the pending approval; `{id}` is replaced
    breaker: BreakerConfig = BreakerConfig()
    max_held: int = 100  # hold mode: requests waiting for a person at once (per process); more: approval_unavailable
    max_pending_per_caller: int = 10  # approvals one caller may have waiting for a person (per process); more: refused


# MCP routes: the most messages a JSON-RPC batch may hold. Each message is its own PDP decision, so the bound keeps
# one body from becoming thousands of PDP calls under one deadline.
DEFAULT_MAX_BATCH_MESSAGES: Final = 16
# Members and elements (at any depth) one MCP body may hold: a PDP's time grows with the values in its input (the
# arguments are in it twice), and one caller's input that takes longer than the deadline to decide would count
# against the breaker as a PDP timeout. Cerbos 0.55 took over 250 ms (the default deadline) for 240,000.
DEFAULT_MAX_JSON_VALUES: Final = 10_000
MAX_BATCH_MESSAGES_LIMIT: Final = 1000


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    path_prefix: str
    upstream: str
    strip_prefix: bool = False
    protocol: str = "http"
    max_body_bytes: int | None = None
    timeout_ms: int = 30000
    keep_caller_credentials: bool = False
    mapping: RouteMapping | None = None
    deny_status: int = 200  # mcp routes: the JSON-RPC denial in a 200 (every SDK reads it), or 403
    credential: Credential | None = None
    filter_tools_list: bool = False  # mcp routes: remove the tools the PDP denies from tools/list answers
    filter_prompts_list: bool = False  # mcp routes: the same for prompts/list
    filter_resources_list: bool = False  # mcp routes: the same for resources/list and resources/templates/list
    host: str | None = None  # forward-proxy mode: the authority the request must name (lower-cased)
    tunnel: bool = False  # CONNECT to `host` is decided and tunnelled to the upstream's host:port
    require_identity: bool = False  # a verified token is required (identity.jwt)
    decide_answer_tool_calls: bool = True  # openai routes: the tools a model answer calls are decided
    allow_path_parameters: bool = False  # `;` in a path segment is data to this upstream, not a parameter to drop
    max_batch_messages: int = DEFAULT_MAX_BATCH_MESSAGES  # mcp routes: more messages in a batch are body_too_large
    max_json_values: int = DEFAULT_MAX_JSON_VALUES  # mcp routes: a body with more JSON values is body_too_large
    approval: RouteApproval | None = None  # what approval_required means on this route (needs `approvals`)


OTLP_ENDPOINT: Final = "http://127.0.0.1:4318/v1/traces"


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Spans through the OpenTelemetry SDK (the `otel` extra). Without this key the PEP records no spans."""

    exporter: str = "otlp"  # otlp (HTTP/protobuf) | console (stderr)
    endpoint: str = OTLP_ENDPOINT
    service_name: str = "failclosed-pep"
    sample_ratio: float = 1.0  # for traces the PEP starts; a caller's sampled flag is followed


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    listen: Address
    admin_listen: Address
    identity: Identity
    pdp: PdpConfig
    decision_log: DecisionLogConfig
    routes: tuple[RouteConfig, ...]
    workers: int = 1  # processes sharing `listen` (SO_REUSEPORT); a supervisor serves `admin_listen`
    shutdown_grace_ms: int = 25000  # SIGTERM: in-flight requests may finish within this, then are closed
    tracing: TracingConfig | None = None
    approvals: ApprovalsConfig | None = None
    # Keys for the tokens the PEP seals (pep/seal.py): the first seals, every one opens. Without them each process
    # makes its own at start (a supervisor hands its workers one), so tokens do not outlive a restart.
    seal_key_files: tuple[str, ...] = ()
    # Agent-facing connections open at once (per process); one more is closed at once. Keeps file descriptors and
    # memory for the PDP and upstream connections when a caller opens connections without end.
    max_connections: int = 4096


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Reader:
    """Reads one mapping level at a time, recording problems with their key paths."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def mapping(
        self, value: Any, path: str, known: set[str], not_yet: frozenset[str] = frozenset()
    ) -> Mapping[str, Any] | None:
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {_kind(value)}")
            return None
        for key in value:
            sub = _join(path, str(key))
            if key in not_yet:
                self.error(sub, NOT_YET)
            elif key not in known:
                self.error(sub, f"unknown key (expected one of: {', '.join(sorted(known))})")
        return value

    def string(
        self, m: Mapping[str, Any], key: str, path: str, *, required: bool = False, default: str | None = None
    ) -> str | None:
        if key not in m:
            if required:
                self.error(_join(path, key), "is required")
            return default
        value = m[key]
        if not isinstance(value, str) or not value:
            self.error(_join(path, key), f"must be a non-empty string, got {_kind(value)}")
            return default
        return value

    def string_map(
        self, m: Mapping[str, Any], key: str, path: str, reserved: frozenset[str] = frozenset()
    ) -> tuple[tuple[str, str], ...] | None:
        """A mapping of names to strings, in the order written; None when the key is absent."""
        if key not in m:
            return None
        where = _join(path, key)
        value = m[key]
        if not isinstance(value, dict):
            self.error(where, f"must be a mapping of names to strings, got {_kind(value)}")
            return None
        pairs: list[tuple[str, str]] = []
        for name, item in value.items():
            if not isinstance(name, str) or not ATTRIBUTE_NAME.match(name):
                self.error(where, f"{name!r} is not a valid name ([A-Za-z_][A-Za-z0-9_]*)")
            elif name in reserved:
                self.error(f"{where}.{name}", "is a reserved name")
            elif not isinstance(item, str):
                self.error(f"{where}.{name}", f"must be a string, got {_kind(item)}")
            else:
                pairs.append((name, item))
        return tuple(pairs)

    def integer(self, m: Mapping[str, Any], key: str, path: str, default: int, lo: int, hi: int) -> int:
        if key not in m:
            return default
        value = m[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(_join(path, key), f"must be an integer, got {_kind(value)}")
            return default
        if not lo <= value <= hi:
            self.error(_join(path, key), f"must be between {lo} and {hi}, got {value}")
            return default
        return value

    def boolean(self, m: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        if key not in m:
            return default
        value = m[key]
        if not isinstance(value, bool):
            self.error(_join(path, key), f"must be true or false, got {_kind(value)}")
            return default
        return value

    def choice(
        self,
        m: Mapping[str, Any],
        key: str,
        path: str,
        default: str | None,
        allowed: tuple[str, ...],
        later: tuple[str, ...] = (),
    ) -> str | None:
        value = self.string(m, key, path, required=default is None, default=default)
        if value is None:
            return None
        if value in later:
            self.error(_join(path, key), f"{value!r} {NOT_YET}")
            return None
        if value not in allowed:
            self.error(_join(path, key), f"must be one of {', '.join(allowed)}, got {value!r}")
            return None
        return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def parse_address(text: str) -> Address:
    """`host:port` or `[v6]:port`; port 0 asks the OS for a free port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"must look like host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return Address(host, port)


def _http_url(r: _Reader, value: str | None, path: str, *, allow_path: bool = True) -> str | None:
    if value is None:
        return None
    try:
        parts = urlsplit(value)
    except ValueError as exc:  # e.g. an unclosed `[` in an IPv6 host
        r.error(path, f"is not a valid URL ({exc}): {value!r}")
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        r.error(path, f"must be an http:// or https:// URL with a host, got {value!r}")
        return None
    if parts.username or parts.password:
        r.error(path, "must not carry user credentials (use a credential file)")
        return None
    if parts.query or parts.fragment or "?" in value or "#" in value:  # an empty `?` would swallow the path
        r.error(path, "must not have a query or a fragment")
        return None
    if not allow_path and parts.path not in ("", "/"):
        r.error(path, "must not have a path")
        return None
    try:
        _ = parts.port
    except ValueError:
        r.error(path, f"has an invalid port: {value!r}")
        return None
    return value


def _address(r: _Reader, m: Mapping[str, Any], key: str, default: str | None) -> Address | None:
    text = r.string(m, key, "", required=default is None, default=default)
    if text is None:
        return None
    try:
        return parse_address(text)
    except ValueError as exc:
        r.error(key, str(exc))
        return None


def _identity(r: _Reader, value: Any) -> Identity:
    m = r.mapping(value, "identity", {"workload", "agent_header", "attributes", "jwt", "mtls"})
    if m is None:
        return Identity()
    header = r.string(m, "agent_header", "identity")
    if header is not None and not HEADER_NAME.match(header):
        r.error("identity.agent_header", f"is not a valid header name: {header!r}")
        header = None
    reserved = frozenset({"workload", "agent", "unverified_agent", "claims", "id"})
    attributes = r.string_map(m, "attributes", "identity", reserved=reserved)
    jwt = _jwt(r, m["jwt"]) if "jwt" in m else None
    if jwt is not None and header is not None and header.lower() == jwt.header:
        r.error("identity.agent_header", "must differ from identity.jwt.header")
    mtls = None
    mtls_keys = {"ca_file", "cert_file", "key_file"}
    if "mtls" in m and (t := r.mapping(m["mtls"], "identity.mtls", mtls_keys)) is not None:
        ca, cert, key = (r.string(t, k, "identity.mtls", required=True) for k in ("ca_file", "cert_file", "key_file"))
        mtls = MtlsConfig(ca, cert, key) if ca and cert and key else None
    return Identity(
        workload=r.string(m, "workload", "identity"),
        agent_header=header and header.lower(),
        attributes=attributes or (),
        jwt=jwt,
        mtls=mtls,
    )


_JWT_KEYS: Final = {
    "issuers",
    "audiences",
    "jwks_file",
    "jwks_url",
    "jwks_ca_file",
    "algorithms",
    "header",
    "leeway_ms",
    "claims",
    "cache_size",
    "jwks_timeout_ms",
    "jwks_min_refresh_ms",
    "jwks_cache_ms",
    "jwks_max_stale_ms",
}


def _strings(r: _Reader, m: Mapping[str, Any], key: str, path: str, *, required: bool) -> tuple[str, ...] | None:
    """A non-empty list of non-empty strings (None when absent, or with the problem recorded)."""
    where = _join(path, key)
    if key not in m:
        if required:
            r.error(where, "is required")
        return None
    value = m[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        r.error(where, f"must be a non-empty list of non-empty strings, got {_kind(value)}")
        return None
    return tuple(value)


def _jwt(r: _Reader, value: Any) -> JwtConfig | None:
    path = "identity.jwt"
    m = r.mapping(value, path, _JWT_KEYS)
    if m is None:
        return None
    issuers = _strings(r, m, "issuers", path, required=True)
    audiences = _strings(r, m, "audiences", path, required=True)
    algorithms = _strings(r, m, "algorithms", path, required=False) or DEFAULT_JWT_ALGORITHMS
    for alg in algorithms:
        if alg.lower() == "none":
            r.error(f"{path}.algorithms", "must not contain none: an unsigned token proves nothing")
        elif alg.upper().startswith("HS"):
            r.error(f"{path}.algorithms", f"{alg} is an HMAC algorithm; only asymmetric signatures are verified")
        elif alg not in JWT_ALGORITHMS:
            r.error(f"{path}.algorithms", f"{alg!r} is not one of {', '.join(JWT_ALGORITHMS)}")
    claims = _strings(r, m, "claims", path, required=False) or ()
    jwks_file = r.string(m, "jwks_file", path)
    jwks_url = r.string(m, "jwks_url", path)
    if (jwks_file is None) == (jwks_url is None):
        r.error(path, "needs exactly one of jwks_file and jwks_url")
    if jwks_url is not None:
        jwks_url = _http_url(r, jwks_url, f"{path}.jwks_url")
        if jwks_url is not None and not jwks_url.startswith("https://"):
            r.error(f"{path}.jwks_url", "must be an https:// URL (signing keys are fetched over TLS)")
            jwks_url = None
    ca_file = r.string(m, "jwks_ca_file", path)
    if ca_file is not None and "jwks_url" not in m:
        r.error(f"{path}.jwks_ca_file", "is only used with jwks_url")
    header = r.string(m, "header", path, default="authorization") or "authorization"
    if not HEADER_NAME.match(header):
        r.error(f"{path}.header", f"is not a valid header name: {header!r}")
    ms = 86_400_000
    cfg = JwtConfig(
        issuers=issuers or (),
        audiences=audiences or (),
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        jwks_ca_file=ca_file,
        algorithms=algorithms,
        header=header.lower(),
        leeway_ms=r.integer(m, "leeway_ms", path, 30000, 0, 600_000),
        claims=claims,
        cache_size=r.integer(m, "cache_size", path, 10000, 0, 10_000_000),
        jwks_timeout_ms=r.integer(m, "jwks_timeout_ms", path, 2000, 1, 60_000),
        jwks_min_refresh_ms=r.integer(m, "jwks_min_refresh_ms", path, 10000, 0, ms),
        jwks_cache_ms=r.integer(m, "jwks_cache_ms", path, 300000, 1000, ms),
        jwks_max_stale_ms=r.integer(m, "jwks_max_stale_ms", path, 3600000, 0, 7 * ms),
    )
    return cfg if issuers and audiences and (jwks_file or jwks_url) else None


_PDP_KEYS: Final = {
    "kind",
    "url",
    "timeout_ms",
    "retries",
    "max_in_flight",
    "max_response_bytes",
    "breaker",
    "tls",
    "auth",
    "policies",
    "entities",
}
_KIND_KEYS: Final = {
    "opa": {"url", "tls", "auth"},
    "authzen": {"url", "tls", "auth"},
    "cedar": {"policies", "entities"},
}


def _pdp(r: _Reader, value: Any) -> PdpConfig | None:
    m = r.mapping(value, "pdp", _PDP_KEYS)
    if m is None:
        return None
    kind = r.choice(m, "kind", "pdp", None, ("opa", "authzen", "cedar"))
    if kind is not None:
        for key in sorted(({"url", "tls", "auth", "policies", "entities"} - _KIND_KEYS[kind]) & set(m)):
            r.error(f"pdp.{key}", f"is not used with kind {kind}")
    remote = kind in ("opa", "authzen")
    url = _http_url(r, r.string(m, "url", "pdp", required=remote), "pdp.url")
    if url and kind == "authzen":
        url = url.rstrip("/")
    breaker = BreakerConfig()
    if "breaker" in m:
        b = r.mapping(m["breaker"], "pdp.breaker", {"failure_threshold", "open_ms", "half_open_probes"})
        if b is not None:
            breaker = BreakerConfig(
                failure_threshold=r.integer(b, "failure_threshold", "pdp.breaker", 5, 1, 1000),
                open_ms=r.integer(b, "open_ms", "pdp.breaker", 5000, 1, 3_600_000),
                half_open_probes=r.integer(b, "half_open_probes", "pdp.breaker", 1, 1, 1000),
            )
    tls = None
    if "tls" in m and (t := r.mapping(m["tls"], "pdp.tls", {"ca_file", "cert_file", "key_file"})) is not None:
        tls = TlsConfig(
            ca_file=r.string(t, "ca_file", "pdp.tls"),
            cert_file=r.string(t, "cert_file", "pdp.tls"),
            key_file=r.string(t, "key_file", "pdp.tls"),
        )
        if (tls.cert_file is None) != (tls.key_file is None):
            r.error("pdp.tls", "cert_file and key_file go together")
    auth = None
    if "auth" in m and (a := r.mapping(m["auth"], "pdp.auth", {"header", "format", "value_file"})) is not None:
        header = r.string(a, "header", "pdp.auth", default="authorization") or "authorization"
        fmt = r.string(a, "format", "pdp.auth", default="Bearer {}") or "Bearer {}"
        value_file = r.string(a, "value_file", "pdp.auth", required=True)
        if not HEADER_NAME.match(header):
            r.error("pdp.auth.header", f"is not a valid header name: {header!r}")
        elif header.lower() in _PDP_CLIENT_HEADERS:  # a second one would frame or route the request anew
            r.error("pdp.auth.header", f"is a header the PDP client writes itself: {header!r}")
        if fmt.count("{}") != 1:
            r.error("pdp.auth.format", "must hold {} exactly once, where the value goes")
        if value_file is not None:
            auth = PdpAuth(value_file=value_file, header=header.lower(), format=fmt)
    policies = r.string(m, "policies", "pdp", required=kind == "cedar")
    cfg = PdpConfig(
        kind=kind or "",
        url=url or "",
        timeout_ms=r.integer(m, "timeout_ms", "pdp", 250, 1, 60_000),
        retries=r.integer(m, "retries", "pdp", 1, 0, 10),
        max_in_flight=r.integer(m, "max_in_flight", "pdp", 512, 1, 1_000_000),
        max_response_bytes=r.integer(m, "max_response_bytes", "pdp", 1048576, 64, 64 * 1048576),
        breaker=breaker,
        tls=tls,
        auth=auth,
        policies=policies,
        entities=r.string(m, "entities", "pdp"),
    )
    ok = kind is not None and (url if remote else policies)
    return cfg if ok else None


def _tracing(r: _Reader, value: Any) -> TracingConfig | None:
    m = r.mapping(value, "tracing", {"exporter", "endpoint", "service_name", "sample_ratio"})
    if m is None:
        return None
    exporter = r.choice(m, "exporter", "tracing", "otlp", ("otlp", "console")) or "otlp"
    endpoint = _http_url(r, r.string(m, "endpoint", "tracing", default=OTLP_ENDPOINT), "tracing.endpoint")
    if "endpoint" in m and exporter != "otlp":
        r.error("tracing.endpoint", "is only used with exporter: otlp")
    ratio = m.get("sample_ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        r.error("tracing.sample_ratio", f"must be a number from 0 to 1, got {ratio!r}")
        ratio = 1.0
    return TracingConfig(
        exporter=exporter,
        endpoint=endpoint or OTLP_ENDPOINT,
        service_name=r.string(m, "service_name", "tracing", default="failclosed-pep") or "failclosed-pep",
        sample_ratio=float(ratio),
    )


def _decision_log(r: _Reader, value: Any) -> DecisionLogConfig:
    m = r.mapping(value, "decision_log", {"sink", "path", "include_arguments", "required", "max_pending_bytes"})
    if m is None:
        return DecisionLogConfig()
    sink = r.choice(m, "sink", "decision_log", "stdout", ("stdout", "file", "none")) or "stdout"
    path = r.string(m, "path", "decision_log", required=sink == "file")
    if path is not None and sink != "file":
        r.error("decision_log.path", "is only used with sink: file")
    required = r.boolean(m, "required", "decision_log", False)
    if required and sink == "none":
        r.error("decision_log.required", "needs a sink to write to (stdout or file), not none")
    return DecisionLogConfig(
        sink=sink,
        path=path,
        include_arguments=r.boolean(m, "include_arguments", "decision_log", False),
        required=required,
        max_pending_bytes=r.integer(m, "max_pending_bytes", "decision_log", 16 * MIB, MIB, 1024 * MIB),
    )


_ROUTE_KEYS: Final = {
    "name",
    "match",
    "upstream",
    "strip_prefix",
    "protocol",
    "max_body_bytes",
    "timeout_ms",
    "keep_caller_credentials",
    "mapping",
    "deny_status",
    "filter_tools_list",
    "filter_prompts_list",
    "filter_resources_list",
    "credential",
    "tunnel",
    "require_identity",
    "decide_answer_tool_calls",
    "allow_path_parameters",
    "max_batch_messages",
    "max_json_values",
    "approval",
}


def _route(r: _Reader, value: Any, path: str) -> RouteConfig | None:
    m = r.mapping(value, path, _ROUTE_KEYS)
    if m is None:
        return None
    name = r.string(m, "name", path, required=True)
    if name is not None and not ROUTE_NAME.match(name):
        r.error(f"{path}.name", f"must match [a-z0-9][a-z0-9_-]*, got {name!r}")
        name = None
    prefix = None
    host = None
    match_ok = False
    if "match" not in m:
        r.error(f"{path}.match", "is required")
    else:
        mm = r.mapping(m["match"], f"{path}.match", {"path_prefix", "host"})
        if mm is not None:
            match_ok = True
            if "host" not in mm and "path_prefix" not in mm:
                r.error(f"{path}.match.path_prefix", "is required unless match.host is given")
                match_ok = False
            host = _match_host(r, r.string(mm, "host", f"{path}.match"), f"{path}.match.host")
            if "host" in mm and host is None:
                match_ok = False
            prefix = r.string(mm, "path_prefix", f"{path}.match", default="/" if "host" in mm else None)
            if prefix is not None and not _PREFIX_OK.match(prefix):
                r.error(
                    f"{path}.match.path_prefix",
                    f"must start with / and hold only unreserved path characters, got {prefix!r}",
                )
                prefix = None
            elif prefix is not None:
                prefix = _prefix(r, prefix, f"{path}.match.path_prefix", m.get("allow_path_parameters") is True)
    upstream = _http_url(r, r.string(m, "upstream", path, required=True), f"{path}.upstream")
    if upstream is not None and (problem := _path_shape(urlsplit(upstream).path)):
        r.error(f"{path}.upstream", f"its path must not contain {problem}")
        upstream = None
    protocol = r.choice(m, "protocol", path, "http", ("http", "mcp", "openai")) or "http"
    # Routes that read bodies always have a limit; plain HTTP routes only when one is set.
    max_body = None if protocol == "http" else 1048576
    if "max_body_bytes" in m:
        max_body = r.integer(m, "max_body_bytes", path, 1048576, 0, 1 << 40)
    deny_status = 200
    if "deny_status" in m:
        deny_status = r.integer(m, "deny_status", path, 200, 200, 403)
        if deny_status not in (200, 403):
            r.error(f"{path}.deny_status", f"must be 200 or 403, got {deny_status}")
        elif deny_status == 200 and protocol != "mcp":
            r.error(f"{path}.deny_status", "200 is only for protocol: mcp (a JSON-RPC error carries the denial)")
    for key in ("filter_tools_list", "filter_prompts_list", "filter_resources_list"):
        if m.get(key) is True and protocol != "mcp":
            r.error(f"{path}.{key}", "is only for protocol: mcp")
    if "decide_answer_tool_calls" in m and protocol != "openai":
        r.error(f"{path}.decide_answer_tool_calls", "is only for protocol: openai")
    max_batch = r.integer(m, "max_batch_messages", path, DEFAULT_MAX_BATCH_MESSAGES, 1, MAX_BATCH_MESSAGES_LIMIT)
    if "max_batch_messages" in m and protocol != "mcp":
        r.error(f"{path}.max_batch_messages", "is only for protocol: mcp (JSON-RPC batches)")
    max_values = r.integer(m, "max_json_values", path, DEFAULT_MAX_JSON_VALUES, 1, 10_000_000)
    if "max_json_values" in m and protocol != "mcp":
        r.error(f"{path}.max_json_values", "is only for protocol: mcp")
    tunnel = r.boolean(m, "tunnel", path, False)
    if tunnel and "match" in m and isinstance(m["match"], dict) and "host" not in m["match"]:
        r.error(f"{path}.tunnel", "needs match.host (CONNECT is matched on host:port)")
    elif tunnel and host is not None and upstream:
        _tunnel_upstream(r, host, upstream, path)
    route = RouteConfig(
        name=name or "",
        path_prefix=prefix or "",
        upstream=upstream or "",
        strip_prefix=r.boolean(m, "strip_prefix", path, False),
        protocol=protocol,
        max_body_bytes=max_body,
        timeout_ms=r.integer(m, "timeout_ms", path, 30000, 1, 86_400_000),
        keep_caller_credentials=r.boolean(m, "keep_caller_credentials", path, False),
        mapping=_mapping(r, m["mapping"], f"{path}.mapping") if "mapping" in m else None,
        deny_status=deny_status,
        filter_tools_list=r.boolean(m, "filter_tools_list", path, False),
        filter_prompts_list=r.boolean(m, "filter_prompts_list", path, False),
        filter_resources_list=r.boolean(m, "filter_resources_list", path, False),
        credential=_credential(r, m["credential"], f"{path}.credential") if "credential" in m else None,
        host=host,
        tunnel=tunnel,
        require_identity=r.boolean(m, "require_identity", path, False),
        decide_answer_tool_calls=r.boolean(m, "decide_answer_tool_calls", path, True),
        allow_path_parameters=r.boolean(m, "allow_path_parameters", path, False),
        max_batch_messages=max_batch,
        max_json_values=max_values,
        approval=_route_approval(r, m["approval"], f"{path}.approval") if "approval" in m else None,
    )
    if route.approval is not None:
        if tunnel:
            r.error(f"{path}.approval", "is not for tunnels (a CONNECT carries no request to approve)")
        elif protocol == "http" and max_body is None:
            r.error(f"{path}.approval", "needs max_body_bytes on an http route (the approved body is read and bound)")
    jit = route.credential.jit if route.credential is not None else None
    if jit is not None and tunnel:
        r.error(f"{path}.credential.kind", "is not for tunnels (a CONNECT carries no header to set a token in)")
    if jit is not None and jit.kind == "token_exchange" and route.keep_caller_credentials:
        problem = "cannot go with a token_exchange credential: the caller's token would reach the upstream"
        r.error(f"{path}.keep_caller_credentials", problem)
    if jit is not None and jit.kind == "token_exchange" and not route.require_identity:
        r.error(
            f"{path}.credential.kind", "token_exchange needs require_identity: true (the caller's token is exchanged)"
        )
    return route if name and prefix and upstream and match_ok else None


def _route_approval(r: _Reader, value: Any, path: str) -> RouteApproval | None:
    m = r.mapping(value, path, {"mode", "hold_ms"})
    if m is None:
        return None
    mode = r.choice(m, "mode", path, None, ("hold", "ticket"))
    hold_ms = r.integer(m, "hold_ms", path, 60000, 1, 3_600_000)
    if "hold_ms" in m and mode == "ticket":
        r.error(f"{path}.hold_ms", "is only used with mode: hold")
    return RouteApproval(mode, hold_ms) if mode is not None else None


def _path_shape(path: str) -> str | None:
    """What a configured path must not hold, as requests may not: dot segments, empty segments, `/;`."""
    if any(seg in (".", "..") for seg in path.split("/")):
        return "dot segments"
    if "//" in path or "/;" in path:
        return "empty segments (// or /;)"
    return None


def _prefix(r: _Reader, prefix: str, path: str, parameters: bool) -> str | None:
    """A path prefix holds no segment a request may not hold: requests with them are refused before routing, and a
    `;` only matches on a route that accepts path parameters."""
    if problem := _path_shape(prefix):
        r.error(path, f"must not contain {problem}")
        return None
    if ";" in prefix and not parameters:
        r.error(path, "must not contain ; (a path parameter) unless the route has allow_path_parameters: true")
        return None
    return prefix


def _match_host(r: _Reader, value: str | None, path: str) -> str | None:
    """`host` or `host:port`, lower-cased; no scheme, user info, path or query."""
    if value is None:
        return None
    if split_authority(value) is None:
        r.error(path, f"must be a host or host:port (no scheme, path or user info), got {value!r}")
        return None
    return value.lower()


def _tunnel_upstream(r: _Reader, host: str, upstream: str, path: str) -> None:
    """A tunnel goes to the upstream's host:port, which must be the host:port CONNECT names."""
    parts = urlsplit(upstream)
    wanted = split_authority(host)
    assert wanted is not None
    target = (wanted[0], wanted[1] or CONNECT_DEFAULT_PORT)
    actual = ((parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(parts.scheme, 0))
    if actual != target:
        r.error(f"{path}.upstream", f"must name the tunnel's host and port {target[0]}:{target[1]} (tunnel: true)")


_JIT_KEYS: Final = {
    "kind",
    "token_endpoint",
    "client_id",
    "client_auth",
    "client_secret_file",
    "client_key_file",
    "client_key_alg",
    "client_key_id",
    "audience",
    "resource",
    "scopes",
    "subject_token_type",
    "actor_token_file",
    "actor_token_type",
    "tls",
    "timeout_ms",
    "expiry_margin_ms",
    "breaker",
}
_CLIENT_AUTH: Final = ("client_secret_basic", "client_secret_post", "private_key_jwt")
CLIENT_KEY_ALGORITHMS: Final = ("RS256", "PS256", "ES256", "ES384", "EdDSA")
_TOKEN_TYPES: Final = (
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:access_token",
    "urn:ietf:params:oauth:token-type:id_token",
)
_SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+\Z")  # RFC 6749 3.3


def _credential(r: _Reader, value: Any, path: str) -> Credential | None:
    if isinstance(value, dict) and "kind" in value:
        return _jit_credential(r, value, path)
    m = r.mapping(value, path, {"header", "format", "value_file", "value_env"})
    if m is None:
        return None
    header = r.string(m, "header", path, required=True)
    fmt = r.string(m, "format", path, default="{}") or "{}"
    value_file = r.string(m, "value_file", path)
    value_env = r.string(m, "value_env", path)
    if header is not None and not HEADER_NAME.match(header):
        r.error(f"{path}.header", f"is not a valid header name: {header!r}")
        header = None
    if fmt.count("{}") != 1:
        r.error(f"{path}.format", "must hold {} exactly once, where the value goes")
    if (value_file is None) == (value_env is None):
        r.error(path, "needs exactly one of value_file and value_env (secrets are never inline)")
        return None
    if header is None:
        return None
    return Credential(header.lower(), fmt, value_file, value_env)


def _oauth_client(r: _Reader, m: Mapping[str, Any], path: str) -> OAuthClientConfig | None:
    """`client_id`, `client_auth` and the file its credential is in, shared by approvals and JIT credentials."""
    client_id = r.string(m, "client_id", path, required=True)
    method = r.choice(m, "client_auth", path, "client_secret_basic", _CLIENT_AUTH) or "client_secret_basic"
    secret_file = r.string(m, "client_secret_file", path)
    key_file = r.string(m, "client_key_file", path)
    key_alg = r.choice(m, "client_key_alg", path, "ES256", CLIENT_KEY_ALGORITHMS) or "ES256"
    key_id = r.string(m, "client_key_id", path)
    ok = True
    if method == "private_key_jwt":
        for key in ("client_secret_file",):
            if key in m:
                r.error(_join(path, key), "is not used with client_auth: private_key_jwt")
        if key_file is None:
            r.error(_join(path, "client_key_file"), "is required with client_auth: private_key_jwt")
            ok = False
    else:
        for key in ("client_key_file", "client_key_alg", "client_key_id"):
            if key in m:
                r.error(_join(path, key), f"is only used with client_auth: private_key_jwt, not {method}")
        if secret_file is None:
            r.error(_join(path, "client_secret_file"), f"is required with client_auth: {method}")
            ok = False
    if client_id is None or not ok:
        return None
    return OAuthClientConfig(client_id, method, secret_file, key_file, key_alg, key_id)


def _tls(r: _Reader, m: Mapping[str, Any], path: str) -> TlsConfig | None:
    if "tls" not in m or (t := r.mapping(m["tls"], _join(path, "tls"), {"ca_file", "cert_file", "key_file"})) is None:
        return None
    where = _join(path, "tls")
    tls = TlsConfig(r.string(t, "ca_file", where), r.string(t, "cert_file", where), r.string(t, "key_file", where))
    if (tls.cert_file is None) != (tls.key_file is None):
        r.error(where, "cert_file and key_file go together")
    return tls


def _breaker(r: _Reader, m: Mapping[str, Any], path: str) -> BreakerConfig:
    if "breaker" not in m:
        return BreakerConfig()
    where = _join(path, "breaker")
    b = r.mapping(m["breaker"], where, {"failure_threshold", "open_ms", "half_open_probes"})
    if b is None:
        return BreakerConfig()
    return BreakerConfig(
        failure_threshold=r.integer(b, "failure_threshold", where, 5, 1, 1000),
        open_ms=r.integer(b, "open_ms", where, 5000, 1, 3_600_000),
        half_open_probes=r.integer(b, "half_open_probes", where, 1, 1, 1000),
    )


def _one_or_more(r: _Reader, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    """A string or a non-empty list of strings (an audience, a resource)."""
    if key not in m:
        return ()
    value = m[key]
    if isinstance(value, str) and value:
        return (value,)
    found = _strings(r, m, key, path, required=False)
    return found or ()


def _scopes(r: _Reader, m: Mapping[str, Any], path: str) -> tuple[str, ...]:
    scopes = _strings(r, m, "scopes", path, required=False) or ()
    for scope in scopes:
        if not _SCOPE_TOKEN.match(scope):
            r.error(_join(path, "scopes"), f"{scope!r} is not a scope name (no spaces, quotes or backslashes)")
    if len(set(scopes)) != len(scopes):
        r.error(_join(path, "scopes"), "holds a scope twice")
    return scopes


def _jit_credential(r: _Reader, value: dict[str, Any], path: str) -> Credential | None:
    m = r.mapping(value, path, _JIT_KEYS | {"header", "format"})
    if m is None:
        return None
    kind = r.choice(m, "kind", path, None, ("token_exchange", "client_credentials"))
    header = r.string(m, "header", path, default="authorization") or "authorization"
    fmt = r.string(m, "format", path, default="Bearer {}") or "Bearer {}"
    if not HEADER_NAME.match(header):
        r.error(f"{path}.header", f"is not a valid header name: {header!r}")
    if fmt.count("{}") != 1:
        r.error(f"{path}.format", "must hold {} exactly once, where the token goes")
    endpoint = _secret_bearing_url(r, r.string(m, "token_endpoint", path, required=True), f"{path}.token_endpoint")
    client = _oauth_client(r, m, path)
    audiences = _one_or_more(r, m, "audience", path)
    resources = _one_or_more(r, m, "resource", path)
    for resource in resources:
        parts = urlsplit(resource)
        if not parts.scheme or parts.fragment or "#" in resource:
            r.error(f"{path}.resource", f"{resource!r} is not an absolute URI without a fragment (RFC 8707)")
    if kind == "token_exchange" and not audiences and not resources:
        r.error(path, "token_exchange needs an audience or a resource (what the token is for)")
    subject_type = r.choice(m, "subject_token_type", path, _TOKEN_TYPES[0], _TOKEN_TYPES) or _TOKEN_TYPES[0]
    actor_type = r.choice(m, "actor_token_type", path, _TOKEN_TYPES[0], _TOKEN_TYPES) or _TOKEN_TYPES[0]
    if kind == "client_credentials":
        for key in ("subject_token_type", "actor_token_file", "actor_token_type"):
            if key in m:
                r.error(f"{path}.{key}", "is only used with kind: token_exchange")
    if "actor_token_type" in m and "actor_token_file" not in m:
        r.error(f"{path}.actor_token_type", "is only used with actor_token_file")
    jit = JitCredential(
        kind=kind or "",
        token_endpoint=endpoint or "",
        client=client or OAuthClientConfig(""),
        audiences=audiences,
        resources=resources,
        scopes=_scopes(r, m, path),
        subject_token_type=subject_type,
        actor_token_file=r.string(m, "actor_token_file", path),
        actor_token_type=actor_type,
        tls=_tls(r, m, path),
        timeout_ms=r.integer(m, "timeout_ms", path, 2000, 1, 60_000),
        expiry_margin_ms=r.integer(m, "expiry_margin_ms", path, 30000, 0, 3_600_000),
        breaker=_breaker(r, m, path),
    )
    if kind is None or endpoint is None or client is None:
        return None
    return Credential(header.lower(), fmt, jit=jit)


_APPROVALS_KEYS: Final = {
    "issuer",
    "backchannel_authentication_endpoint",
    "token_endpoint",
    "jwks_uri",
    "client_id",
    "client_auth",
    "client_secret_file",
    "client_key_file",
    "client_key_alg",
    "client_key_id",
    "scopes",
    "approver_claim",
    "tls",
    "timeout_ms",
    "requested_expiry_ms",
    "min_poll_interval_ms",
    "binding_message_max",
    "ticket_key_files",
    "elicitation_url",
    "breaker",
    "max_held",
    "max_pending_per_caller",
}


def _secret_bearing_url(r: _Reader, value: str | None, path: str) -> str | None:
    """An authorization server endpoint: client secrets, callers' tokens and the keys that prove an approval cross
    it, so it is https://, or plain http:// only to this machine (a loopback address or `localhost`)."""
    url = _http_url(r, value, path)
    if url is None or url.startswith("https://"):
        return url
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        r.error(path, "must be an https:// URL (secrets and signing keys cross it), or http:// on this machine")
        return None
    return url


def _approvals(r: _Reader, value: Any) -> ApprovalsConfig | None:
    path = "approvals"
    m = r.mapping(value, path, _APPROVALS_KEYS)
    if m is None:
        return None
    urls = {"issuer": _http_url(r, r.string(m, "issuer", path, required=True), f"{path}.issuer")} | {
        key: _secret_bearing_url(r, r.string(m, key, path, required=True), f"{path}.{key}")
        for key in ("backchannel_authentication_endpoint", "token_endpoint", "jwks_uri")
    }
    client = _oauth_client(r, m, path)
    scopes = _scopes(r, m, path)
    if "openid" in scopes:
        r.error(f"{path}.scopes", "need not name openid (it is always asked for)")
    claim = r.string(m, "approver_claim", path, default="sub") or "sub"
    elicitation = r.string(m, "elicitation_url", path)
    if elicitation is not None:
        checked = _http_url(r, elicitation.replace("{id}", "ID"), f"{path}.elicitation_url")
        if checked is not None and not checked.startswith("https://"):
            r.error(f"{path}.elicitation_url", "must be an https:// URL (an MCP client opens it for its user)")
            elicitation = None
        elif checked is None:
            elicitation = None
    keys = _strings(r, m, "ticket_key_files", path, required=False) or ()
    cfg = ApprovalsConfig(
        issuer=urls["issuer"] or "",
        backchannel_authentication_endpoint=urls["backchannel_authentication_endpoint"] or "",
        token_endpoint=urls["token_endpoint"] or "",
        jwks_uri=urls["jwks_uri"] or "",
        client=client or OAuthClientConfig(""),
        scopes=scopes,
        approver_claim=claim,
        tls=_tls(r, m, path),
        timeout_ms=r.integer(m, "timeout_ms", path, 5000, 1, 60_000),
        requested_expiry_ms=r.integer(m, "requested_expiry_ms", path, 300000, 1000, 86_400_000),
        min_poll_interval_ms=r.integer(m, "min_poll_interval_ms", path, 1000, 1, 60_000),
        binding_message_max=r.integer(m, "binding_message_max", path, 64, 12, 512),
        ticket_key_files=keys,
        elicitation_url=elicitation,
        breaker=_breaker(r, m, path),
        max_held=r.integer(m, "max_held", path, 100, 1, 100_000),
        max_pending_per_caller=r.integer(m, "max_pending_per_caller", path, 10, 1, 100_000),
    )
    return cfg if all(urls.values()) and client is not None else None


def _mapping(r: _Reader, value: Any, path: str) -> RouteMapping | None:
    m = r.mapping(value, path, {"subject", "action", "resource"})
    if m is None:
        return None
    subject = r.mapping(m.get("subject", {}), f"{path}.subject", {"type", "properties"}) or {}
    action = r.mapping(m.get("action", {}), f"{path}.action", {"name"}) or {}
    resource = r.mapping(m.get("resource", {}), f"{path}.resource", {"type", "id", "properties"}) or {}
    return RouteMapping(
        subject_type=r.string(subject, "type", f"{path}.subject"),
        subject_properties=r.string_map(subject, "properties", f"{path}.subject"),
        action=r.string(action, "name", f"{path}.action"),
        resource_type=r.string(resource, "type", f"{path}.resource"),
        resource_id=r.string(resource, "id", f"{path}.resource"),
        resource_properties=r.string_map(resource, "properties", f"{path}.resource"),
    )


_TOP_KEYS: Final = {
    "version",
    "listen",
    "admin_listen",
    "identity",
    "pdp",
    "decision_log",
    "routes",
    "workers",
    "shutdown_grace_ms",
    "tracing",
    "approvals",
    "seal_key_files",
    "max_connections",
}


def parse(data: Any, source: str) -> Config:
    """Validate an already-loaded YAML document. Raises ConfigError with every problem found."""
    r = _Reader(source)
    m = r.mapping(data, "", _TOP_KEYS)
    if m is None:
        raise ConfigError(r.problems)
    if "version" not in m:
        r.error("version", "is required (version: 1)")
    elif type(m["version"]) is not int or m["version"] != 1:
        r.error("version", f"must be 1, got {m['version']!r}")
    listen = _address(r, m, "listen", None)
    admin = _address(r, m, "admin_listen", "127.0.0.1:9901")
    if listen and admin and listen == admin and listen.port != 0:
        r.error("admin_listen", "must differ from listen: the admin endpoints are never served on the proxy port")
    identity = _identity(r, m["identity"]) if "identity" in m else Identity()
    workers = r.integer(m, "workers", "", 1, 1, 64)
    grace = r.integer(m, "shutdown_grace_ms", "", 25000, 0, 3_600_000)
    max_connections = r.integer(m, "max_connections", "", 4096, 1, 1_000_000)
    tracing = _tracing(r, m["tracing"]) if "tracing" in m else None
    seal_keys = _string_list(r, m, "seal_key_files")
    pdp = None
    if "pdp" not in m:
        r.error("pdp", "is required")
    else:
        pdp = _pdp(r, m["pdp"])
    log = _decision_log(r, m["decision_log"]) if "decision_log" in m else DecisionLogConfig()
    routes: list[RouteConfig] = []
    raw_routes = m.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        r.error("routes", "must be a list with at least one route")
    else:
        indexed: list[tuple[int, RouteConfig]] = []  # the index in the file, for key paths
        for i, raw in enumerate(raw_routes):
            route = _route(r, raw, f"routes[{i}]")
            if route is not None:
                indexed.append((i, route))
                routes.append(route)
        names: dict[str, int] = {}
        prefixes: dict[tuple[str | None, str], int] = {}
        tunnels: dict[tuple[str, int], int] = {}
        for i, route in indexed:
            mixed = identity.jwt is not None and not route.require_identity  # callers with and without a token
            if mixed and route.mapping is not None and route.mapping.subject_type is not None:
                r.error(
                    f"routes[{i}].mapping.subject.type",
                    "would give callers with a verified token and callers without one the same type (the type "
                    "is what tells them apart): set require_identity: true on this route, or leave the type",
                )
            if route.name in names:
                r.error(f"routes[{i}].name", f"duplicates the name of routes[{names[route.name]}]")
            names.setdefault(route.name, i)
            key = (route.host, route.path_prefix)
            if key in prefixes:
                what = "prefix" if route.host is None else "host and prefix"
                r.error(f"routes[{i}].match.path_prefix", f"duplicates the {what} of routes[{prefixes[key]}]")
            prefixes.setdefault(key, i)
            if route.tunnel and route.host is not None and (parts := split_authority(route.host)) is not None:
                target = (parts[0], parts[1] or CONNECT_DEFAULT_PORT)
                if target in tunnels:
                    r.error(f"routes[{i}].tunnel", f"duplicates the tunnel of routes[{tunnels[target]}]")
                tunnels.setdefault(target, i)
    if pdp is not None and pdp.kind == "opa":
        for i, raw in enumerate(raw_routes if isinstance(raw_routes, list) else []):
            if isinstance(raw, dict) and "mapping" in raw:
                r.error(f"routes[{i}].mapping", "is only used with pdp.kind authzen or cedar (OPA gets the document)")
    if not (isinstance(m.get("identity"), dict) and "jwt" in m["identity"]):
        for i, raw in enumerate(raw_routes if isinstance(raw_routes, list) else []):
            if isinstance(raw, dict) and raw.get("require_identity") is True:
                r.error(f"routes[{i}].require_identity", "needs identity.jwt (where verified tokens come from)")
    approvals = _approvals(r, m["approvals"]) if "approvals" in m else None
    for i, raw in enumerate(raw_routes if isinstance(raw_routes, list) else []):
        wanted = raw.get("approval") if isinstance(raw, dict) else None
        if not isinstance(wanted, dict):
            continue
        if "approvals" not in m:
            r.error(f"routes[{i}].approval", "needs the approvals section (the OpenID Provider that asks the approver)")
        elif (
            wanted.get("mode") == "ticket"
            and isinstance(m["approvals"], dict)
            and not m["approvals"].get("ticket_key_files")
        ):
            r.error(f"routes[{i}].approval.mode", "ticket needs approvals.ticket_key_files (tickets are sealed)")
    if r.problems or listen is None or admin is None or pdp is None:
        raise ConfigError(r.problems or [f"{source}: invalid configuration"])
    return Config(
        source,
        listen,
        admin,
        identity,
        pdp,
        log,
        tuple(routes),
        workers,
        grace,
        tracing,
        approvals,
        seal_keys,
        max_connections,
    )


def _string_list(r: _Reader, m: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """A non-empty list of non-empty strings, or () when the key is absent."""
    if key not in m:
        return ()
    value = m[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        r.error(key, f"must be a non-empty list of file paths, got {_kind(value)}")
        return ()
    return tuple(value)


def load(path: str | Path) -> Config:
    """Read and validate a config file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as yaml_error:
        mark = getattr(yaml_error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(yaml_error, "problem", None) or str(yaml_error)
        raise ConfigError([f"{source}: {where}{problem}"]) from None
    return parse(data, source)
