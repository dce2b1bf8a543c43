"""Header hygiene, both ways: what the caller may send on, what the upstream may send back, what a PDP may add.

Pure functions over header pairs, so they can be property-tested without sockets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

from pep.http1.fields import KEEP_FIELDS, keep_fields

# RFC 9110 7.6.1 plus the legacy Proxy-Connection; Proxy-Authenticate/-Authorization are single-hop by definition.
HOP_BY_HOP: Final[frozenset[str]] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "trailer",
    }
)

# Credentials the caller may hold that never reach the PDP, and never the upstream unless a route keeps them.
CALLER_CREDENTIALS: Final[frozenset[str]] = frozenset({"authorization", "cookie", "proxy-authorization"})

# What a TLS-terminating proxy tells its upstream about the client's certificate, and RFC 9440 (3, 4) says such a
# proxy must remove from its clients' requests: RFC 9440's own, Envoy's and Istio's XFCC, Traefik's, ingress-nginx's,
# AWS ALB's and Azure App Service's. The PEP terminates the agents' TLS and sets none of them (the certificate it
# verified is `subject.workload`), so a caller's copy is a claim to a certificate nobody verified.
CLIENT_CERTIFICATE: Final[frozenset[str]] = frozenset(
    {
        "client-cert",
        "client-cert-chain",
        "x-forwarded-client-cert",
        "x-forwarded-tls-client-cert",
        "x-forwarded-tls-client-cert-info",
        "ssl-client-cert",
        "ssl-client-verify",
        "ssl-client-subject-dn",
        "ssl-client-issuer-dn",
        "x-amzn-mtls-clientcert",
        "x-amzn-mtls-clientcert-leaf",
        "x-amzn-mtls-clientcert-serial-number",
        "x-amzn-mtls-clientcert-issuer",
        "x-amzn-mtls-clientcert-subject",
        "x-amzn-mtls-clientcert-validity",
        "x-arr-clientcert",
    }
)

# Set by the PEP alone: a caller's copy is dropped, and a PDP obligation may not set them either. The client
# certificate fields are the PEP's alone to set, as the TLS terminator, though it sets none.
PEP_OWNED: Final[frozenset[str]] = CLIENT_CERTIFICATE | frozenset(
    {
        "x-request-id",
        "x-pep-decision-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        # What Rack (trusting a loopback proxy), ingress-nginx and others read as the scheme the client used, beside
        # the PEP's X-Forwarded-Proto: a caller's `X-Forwarded-Ssl: on` would make such an upstream believe https.
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-forwarded-protocol",
        "x-forwarded-by",
        "x-real-ip",
        "forwarded",
        "traceparent",  # kept or started by the PEP (pep/trace.py), then set on the upstream request
        "tracestate",
        "x-pep-approval-ticket",  # a retry's approval ticket (pep/approvals/binding.py): read by the PEP alone
    }
)

# Who the user is, as an authenticating proxy in front of an upstream tells it (oauth2-proxy's pass_user_headers,
# and those that copy it): an upstream behind such a proxy takes them as the user it acts for. The PEP verifies no
# such thing, so a caller's copy is an identity nobody checked, never forwarded and never shown to the PDP (which
# decides on `subject`). A PDP obligation may set them: then they say what the PDP decided.
PROXY_IDENTITY: Final[frozenset[str]] = frozenset(
    {
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "x-forwarded-access-token",
    }
)

# Framing is the PEP's business: it is recomputed for whatever body is forwarded.
FRAMING: Final[frozenset[str]] = frozenset({"content-length", "host", "expect"})

# X-Forwarded-Method: the original method as Traefik's forward auth tells an auth server (beside X-Forwarded-Uri).
METHOD_OVERRIDE: Final[frozenset[str]] = frozenset(
    {"x-http-method-override", "x-http-method", "x-method-override", "x-forwarded-method"}
)
# Headers that frameworks, middlewares and proxies behind the PEP take as the real path or URL: the upstream would
# serve a path the policy never saw. X-Original-URL and X-Rewrite-URL: Symfony, Zend/Laminas, IIS URL Rewrite;
# X-Original-URI: the nginx auth_request convention; X-Forwarded-Uri: Traefik (forward auth), read by auth
# servers; X-Forwarded-Path and X-Forwarded-Url: other gateways' spellings; X-Envoy-Original-Path: Envoy;
# X-Replaced-Path: Traefik's ReplacePath; X-Original-Path, X-Override-URL, X-HTTP-Path-Override: seen in
# middlewares. (X-Forwarded-Prefix, which Spring prepends to the path, is the PEP's own: a caller's is dropped.)
PATH_OVERRIDE: Final[frozenset[str]] = frozenset(
    {
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "x-forwarded-uri",
        "x-forwarded-path",
        "x-forwarded-url",
        "x-envoy-original-path",
        "x-replaced-path",
        "x-original-path",
        "x-override-url",
        "x-http-path-override",
    }
)

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Header names the sender listed in `Connection` (lower-cased): they end at this hop."""
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], also_drop: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """The header pairs that may cross this hop: hop-by-hop, Connection-named and `also_drop` removed."""
    named = connection_named(headers)
    drop = HOP_BY_HOP | named | also_drop if named else HOP_BY_HOP | also_drop
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


def request_drop_set(credential_header: str | None, keep_caller_credentials: bool) -> frozenset[str]:
    """Caller headers never forwarded on a route (besides hop-by-hop ones).

    Content-Length stays: the parser has checked it and the body is forwarded unchanged, so the upstream sees
    the same framing the caller chose (a chunked request stays chunked).
    """
    drop = set(PEP_OWNED | PROXY_IDENTITY | FRAMING - {"content-length"})
    if not keep_caller_credentials:
        drop |= CALLER_CREDENTIALS
    if credential_header:
        drop.add(credential_header.lower())
    return frozenset(drop)


def policy_drop_set(credential_header: str | None) -> frozenset[str]:
    """Headers never shown to the PDP: credentials (always) and what the PEP sets itself."""
    drop = set(CALLER_CREDENTIALS | PEP_OWNED | PROXY_IDENTITY | FRAMING - {"host"})
    if credential_header:
        drop.add(credential_header.lower())
    return frozenset(drop)


def obligation_forbidden(credential_header: str | None) -> frozenset[str]:
    """Header names a PDP obligation may not set: hop-by-hop, framing, PEP-owned and the route's credential."""
    forbidden = set(HOP_BY_HOP | FRAMING | PEP_OWNED)
    if credential_header:
        forbidden.add(credential_header.lower())
    return frozenset(forbidden)


def obligation_problem(pairs: Iterable[tuple[str, str]], forbidden: frozenset[str]) -> str | None:
    """Why these PDP-requested headers cannot be applied, or None when all of them can."""
    for name, value in pairs:
        if not _TOKEN.match(name):
            return f"header name {name[:64]!r} is not a valid token"
        if name.lower() in forbidden:
            return f"header {name.lower()!r} may not be set by the PDP"
        if _BAD_VALUE.search(value):
            return f"header {name.lower()!r} has a control character in its value"
    return None


# The same hygiene on fields as the transport reads and writes them (bytes, in order): nothing is decoded, and
# the field tuples that cross are the ones received, not copies.
Fields = list[tuple[bytes, bytes]]
_CONNECTION: Final = b"connection"
_NONE_NAMED: Final[frozenset[bytes]] = frozenset()


def _names(names: Iterable[str]) -> frozenset[bytes]:
    return frozenset(n.lower().encode("latin-1") for n in names)


HOP_BY_HOP_FIELDS: Final = _names(HOP_BY_HOP)
# The fields that say what the PEP did (pep/responses.py): on a relayed answer they would be the upstream's word.
PEP_ANSWER_FIELDS: Final = frozenset(
    {b"x-pep-decision", b"x-pep-reason", b"x-pep-upstream-error", b"x-pep-decision-id"}
)
# What never crosses towards the caller: hop-by-hop fields, the framing the writer sets for what it sends, the PEP's
# own fields, and Alt-Svc (RFC 7838): the upstream's offer of another endpoint for the origin the caller called,
# which through HTTP_PROXY is the upstream itself (HTTP/3 to it is QUIC, around the PEP) and otherwise one the PEP
# does not serve.
ANSWER_DROP: Final = HOP_BY_HOP_FIELDS | PEP_ANSWER_FIELDS | {b"content-length", b"alt-svc"}


def forward_drop_set(request_drop: frozenset[str]) -> frozenset[bytes]:
    """A route's `request_drop` as field names, with hop-by-hop fields and Content-Length (the pool writes the
    framing of the body it sends: the caller's length for a streamed body, the decided bytes' for a read one)."""
    return HOP_BY_HOP_FIELDS | _names(request_drop) | {b"content-length"}


def connection_named_fields(fields: Fields) -> frozenset[bytes]:
    """`connection_named` on fields: the names listed in `Connection` (lower-cased)."""
    named: set[bytes] | None = None
    for name, value in fields:
        if len(name) == 10 and name.lower() == _CONNECTION:
            if named is None:
                named = set()
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(named) if named else _NONE_NAMED


def end_to_end_fields(fields: Fields, drop: frozenset[bytes]) -> Fields:
    """`end_to_end` on fields: those whose name is not in `drop` (which holds the hop-by-hop names already) nor
    named in `Connection`, in order. One pass (`KEEP_FIELDS`, in C when compiled); the names a `Connection` field
    lists (it may come after them) are taken out of what was kept in a second pass, only when one of them is not
    in `drop` already (the usual `Connection: keep-alive` needs none: Keep-Alive is hop-by-hop)."""
    found = KEEP_FIELDS(fields, drop)
    kept, connection = found if found is not None else keep_fields(fields, drop)
    if not connection:
        return kept
    named: set[bytes] = set()
    for value in connection:
        if b"," in value:
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
        elif token := value.strip().lower():
            named.add(token)
    if named and not drop.issuperset(named):
        kept = [field for field in kept if field[0].lower() not in named]
    return kept


def first_field(fields: Fields, name: bytes) -> bytes | None:
    """The value of the first field called `name` (lower-case), without building a header view for one lookup."""
    size = len(name)
    for key, value in fields:
        if len(key) == size and key.lower() == name:
            return value
    return None
