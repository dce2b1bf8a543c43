"""Request integrity, first layer: targets two parsers could read differently end in `request_ambiguous`.

Pure functions of the request line, headers and form fields. The PEP decides on, and forwards, the raw path as
sent; these checks refuse the paths an upstream might decode or normalise into something the policy never saw,
and the headers and fields with which an upstream framework would serve another path or method.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Container, Iterable
from typing import Final
from urllib.parse import unquote, unquote_to_bytes

from pep.headers import (
    CALLER_CREDENTIALS,
    FRAMING,
    HOP_BY_HOP,
    METHOD_OVERRIDE,
    PATH_OVERRIDE,
    PEP_OWNED,
    PROXY_IDENTITY,
)

_OVERRIDES: Final = METHOD_OVERRIDE | PATH_OVERRIDE
# Percent-encodings of `.`, `/`, `\`, NUL and control characters, also behind encoded percents (`%252f`).
_ENCODED: Final = re.compile(r"%(?:25)*(2e|2f|5c|[01][0-9a-f]|7f)", re.IGNORECASE)
# Every `%` with what follows it: a well-formed escape has two hex digits.
_ESCAPE: Final = re.compile(r"%([0-9a-fA-F]{2})?")
# RFC 3986 2.3: encoding these changes nothing for a normalising server, but a `/%61dmin` would miss an
# `/admin` route here and be served as /admin there. Well-behaved clients never encode them.
_UNRESERVED: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")
# What a percent-decoded segment must not hold: separators and control characters.
_DECODED_BAD: Final = re.compile(r"[\x00-\x1f\x7f/\\]")
# More layers of percent-encoding than this in one segment is refused outright.
_MAX_DECODES: Final = 4
# The form field Rails (Rack), Laravel, Symfony and Spring's HiddenHttpMethodFilter take as the method of a POST.
_METHOD_FIELD: Final = "_method"
# RFC 6750's query parameter and form field for a bearer token (Rails' Doorkeeper and others read them by default).
_BEARER_FIELD: Final = "access_token"
# How PHP reads a field name: leading spaces dropped, ` ` and `.` read as `_`, the name ends at `[` (an array).
_PHP_NAME: Final = str.maketrans(" .", "__")


def path_problem(path: str) -> str | None:
    """Why this raw path (without the query) is ambiguous, or None. Path parameters (`;`) are the route's
    business (`parameter_problem`), except where they hide a dot or an empty segment (`/..;/`, `/;x/`)."""
    if not path.startswith("/"):
        return "the path does not start with /"
    # Outside visible ASCII (printable ASCII but the space), plus `\` and `#` (a fragment is never sent; a
    # backslash is a separator to some servers). Four C scans: a regex search cost three times as much.
    if not (path.isascii() and path.isprintable()) or " " in path or "\\" in path or "#" in path:
        return "backslash, fragment, control or non-ASCII character in the path"
    if "//" in path:
        # nginx (merge_slashes, its default), Tomcat and Spring read `/a//b` as `/a/b`: a rule on `/a/b` would
        # not see it. A leading `//` is also a network-path reference to a URL parser (`//host/path`).
        return "empty path segment (//) in the path"
    if "/;" in path:
        return "empty path segment with parameters (/;) in the path"
    if "%" in path:
        for m in _ESCAPE.finditer(path):
            pair = m.group(1)
            if pair is None:
                return "malformed percent-encoding in the path"
            if chr(int(pair, 16)) in _UNRESERVED:
                return f"percent-encoded unreserved character %{pair} in the path"
        if encoded := _ENCODED.search(path):
            return f"encoded {encoded.group(0).lower()!r} in the path"
    elif "." not in path:
        return None
    for segment in path.split("/"):
        if segment and _is_dot_segment(segment):
            return "dot segment in the path"
        if "%" in segment and (problem := _decoding_problem(segment)):
            return problem
    return None


def _is_dot_segment(segment: str) -> bool:
    """`.` and `..`, raw or percent-encoded in any case, encoded percents included (`%252e`).

    Path parameters are ignored: servlet containers drop `;...` before normalising, so `..;x` is `..` to them.
    """
    segment = segment.partition(";")[0]
    if len(segment) > 2 and "%" not in segment:
        return False
    s = segment.lower()
    while "%25" in s:
        s = s.replace("%25", "%")
    return s.replace("%2e", ".") in (".", "..")


def _decoding_problem(segment: str) -> str | None:
    """Decode a segment as often as an upstream might. Encoded hex digits (`%2%65` is `%2e`, then `.`;
    `%%32%66` is `%2f`, then `/`) must not reveal a dot segment, a separator or a control character.
    """
    for _ in range(_MAX_DECODES + 1):
        decoded = unquote(segment)
        if decoded == segment:
            return None
        if _DECODED_BAD.search(decoded):
            return "percent-encoded separator or control character in the path"
        if decoded.partition(";")[0] in (".", ".."):
            return "dot segment in the path"
        if any(m.group(1) and chr(int(m.group(1), 16)) in _UNRESERVED for m in _ESCAPE.finditer(decoded)):
            return "percent-encoded unreserved character behind an encoded percent in the path"
        segment = decoded
    return "percent-encoding nested too deeply in the path"


def parameter_problem(path: str) -> str | None:
    """Why a path with path parameters is ambiguous: `;`, raw or percent-encoded at any layer, or None.

    Tomcat, Jetty and Spring serve `/a;x/b` as `/a/b` (they drop `;...` from each segment before routing), so a
    rule on `/a/b` would not see it. Routes whose upstream keeps `;` as data accept it (`allow_path_parameters`).
    """
    if ";" in path:
        return "path parameter (;) in the path"
    if "%" in path:
        for segment in path.split("/"):
            if "%" in segment and any(";" in layer for layer in _layers(segment)):
                return "percent-encoded ; in the path"
    return None


def _layers(segment: str) -> list[str]:
    """The segment decoded again and again while that changes it, at most _MAX_DECODES + 1 times."""
    layers = [segment]
    for _ in range(_MAX_DECODES + 1):
        decoded = unquote(layers[-1])
        if decoded == layers[-1]:
            break
        layers.append(decoded)
    return layers


def query_problem(query: str) -> str | None:
    """The query is forwarded as sent; refused are characters that cannot be sent as they are (outside visible
    ASCII, and `#`, as `path_problem` checks them, without a regex), and a raw `;`: Rack 2 (Rails up to 7.0) and
    Python before 3.9.2 split fields there, Go drops the field holding it, others keep it as data, so
    `tenant=acme&x=1;tenant=evil` would be `tenant: [acme]` to the policy and `tenant=evil` to Rails. Clients
    encode a literal one (`%3B`)."""
    if query and (not (query.isascii() and query.isprintable()) or " " in query or "#" in query):
        return "fragment, control or non-ASCII character in the query"
    if ";" in query:
        return "a ; in the query (some upstreams split fields there)"
    return None


def method_override_field(fields: str) -> str | None:
    """A `_method` field among `name=value` pairs (a query or an urlencoded form), as any framework reads it.

    Names are percent-decoded (`+` is a space), split on `&` and `;` (older Rack), compared without case, and
    read as PHP reads them (`.method` and ` _method` are `_method` there); `_method[x]` counts too.
    """
    if "method" not in fields.lower() and "%" not in fields:
        return None
    name = _field_named(fields, _METHOD_FIELD)
    return f"method-override field {name[:64]!r}" if name is not None else None


def bearer_token_field(fields: str) -> str | None:
    """An `access_token` field (RFC 6750 2.2, 2.3: a bearer token in a form body or the query), read as
    `method_override_field` reads `_method`. Where the PEP verifies the caller's token (`identity.jwt`), an
    upstream that also takes tokens there could act as the holder of this one, not the subject decided on."""
    if "token" not in fields.lower() and "%" not in fields:
        return None
    name = _field_named(fields, _BEARER_FIELD)
    return f"a bearer token field {name[:64]!r} besides the verified identity" if name is not None else None


def field_variable(name: str) -> str:
    """The variable PHP, Rack or qs stores a (decoded) field under: its name up to a NUL, leading spaces dropped,
    ` ` and `.` read as `_` (PHP), up to a `[` (an array or object)."""
    return name.partition("\x00")[0].lstrip(" ").translate(_PHP_NAME).partition("[")[0]


def _field_named(fields: str, wanted: str) -> str | None:
    """The first name (as sent) among `name=value` pairs that a framework reads as `wanted` (lower case)."""
    for pair in re.split("[&;]", fields):
        name = pair.partition("=")[0]
        decoded = unquote_to_bytes(name.replace("+", " ").encode("utf-8", "surrogatepass")).decode("latin-1")
        if field_variable(decoded).lower() == wanted:
            return name
    return None


def request_problem(method: str, path: str, query: str, headers: Collection[str]) -> str | None:
    """Every check that needs no route, in the order the proxy and `pep explain` apply them."""
    problem = path_problem(path) or query_problem(query) or override_header(headers)
    if problem is None and method == "POST":
        # Rails, Laravel, Symfony and Spring override only a POST; Laravel, Symfony and Spring read the query too.
        problem = method_override_field(query)
    return problem


# Methods whose content has no defined semantics (RFC 9110 9.3.1, 9.3.2; TRACE must have none, 9.3.8): an upstream
# may leave such a body unread and take its bytes for the next request on the connection, which then runs undecided.
BODILESS_METHODS: Final = frozenset({"GET", "HEAD", "TRACE"})


def body_problem(method: str, has_body: bool) -> str | None:
    """Why a request's body is ambiguous: a body on a GET, HEAD or TRACE (an empty one is no body)."""
    if has_body and method in BODILESS_METHODS:
        return f"a body on a {method} request (an upstream may read it as another request)"
    return None


# Fields the PEP sets, drops, refuses or reads, whatever the route: with `_` for `-` in a name, a CGI-style upstream
# (Rack, WSGI, PHP: `X_Forwarded_For` and `X-Forwarded-For` are both HTTP_X_FORWARDED_FOR there) would read the
# caller's field as the one the PEP acted on.
RESERVED_NAMES: Final = (
    HOP_BY_HOP
    | PEP_OWNED
    | PROXY_IDENTITY
    | FRAMING
    | CALLER_CREDENTIALS
    | METHOD_OVERRIDE
    | PATH_OVERRIDE
    | {"content-length", "content-type", "content-encoding", "mcp-method", "mcp-name", "last-event-id"}
)


def alias_problem(names: Iterable[str], reserved: Container[str] = RESERVED_NAMES) -> str | None:
    """The first field name spelled with `_` for `-` whose dashed form is `reserved`: refused rather than forwarded,
    since an upstream that maps both spellings to one variable would take it for the PEP's own (or the one it
    dropped or refused)."""
    for name in names:
        if "_" in name:
            dashed = name.lower().replace("_", "-")
            if dashed in reserved or dashed in RESERVED_NAMES:
                return f"header {name!r} is another spelling of {dashed!r}"
    return None


def override_header(names: Collection[str]) -> str | None:
    """The first method- or path-override header present (`names` may be a case-insensitive header map)."""
    if _OVERRIDES.isdisjoint(map(str.lower, names)):
        return None  # (the usual request: one pass over its names, not a lookup per override name)
    for name in METHOD_OVERRIDE:
        if name in names:
            return f"method-override header {name!r}"
    for name in PATH_OVERRIDE:
        if name in names:
            return f"path-override header {name!r}"
    return None
