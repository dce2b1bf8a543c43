"""The upstream's own address never reaches the agent: `Location`, `Content-Location` and `Refresh` values, and
the targets of `Link` (RFC 8288: pagination's `rel="next"`, which clients follow as they follow a redirect), that
name the route's upstream origin are rewritten to the route's path on the PEP, as nginx's `proxy_redirect
default` does.

Left as they are, they tell the agent where the upstream listens, and a client that follows them (or a developer
told by an SDK to "use this URL") goes around the PEP. The rewritten value is a path (`/mcp/session`), never an
absolute URL: the agent resolves it against the address it called, so it stays on the PEP through whatever name,
port or TLS terminator it used, and no caller-supplied `Host` is echoed back. A value naming another route's
upstream (services behind one PEP redirect to each other by their own addresses) gets that route's path the same
way. Values naming any other origin, and relative references, are left alone: they reveal no upstream, and what
they lead to goes through the PEP (or elsewhere) like any other request.
"""

from __future__ import annotations

import functools
import re
from typing import Final
from urllib.parse import SplitResult, urlsplit

from pep.authority import DEFAULT_PORTS, format_host
from pep.routing import Route

Fields = list[tuple[bytes, bytes]]
_URL_FIELDS: Final = frozenset({b"location", b"content-location", b"refresh", b"link"})
# A cheap first look at each answer field, before any lower-casing: Date, Vary and ETag have Link's length, not
# its initial.
_URL_FIELD_LENGTHS: Final = frozenset(len(n) for n in _URL_FIELDS)
_URL_FIELD_INITIALS: Final = frozenset(n[0] for n in _URL_FIELDS)
# The schemes of URLs that name a host and port a client connects to, with their default port (ws: RFC 6455).
_DEFAULT_PORTS: Final = {**DEFAULT_PORTS, "ws": 80, "wss": 443}
Origin = tuple[str, str, int | None]  # scheme, host (as compared), effective port
# `Refresh: 5; url=https://…` (a de facto standard that browsers and some clients follow like a redirect).
# Read as HTML's declarative refresh reads it (browsers, and clients that copy them): a delay of digits and dots,
# then `;`, `,` or whitespace alone, an optional `url=`, an optional quote that need not be closed (what follows
# a closing quote is not part of the URL).
_REFRESH: Final = re.compile(r"(?is)(\s*(?=[\d.])[\d.]*(?:\s*[;,]\s*|\s+)(?:url\s*=\s*)?)(['\"]?)(.*)\Z")


def _origin(scheme: str, host: str | None, port: int | None) -> Origin:
    scheme = scheme.lower()
    return scheme, _host(host or ""), port or _DEFAULT_PORTS.get(scheme)


def _host(host: str) -> str:
    """A host as the upstream is sent it, compared: lower-cased, a DNS name's trailing dot gone (the same name),
    and a non-ASCII name in its IDNA form (the Host the PEP sends, which an app writes into its URLs)."""
    host = host.lower().rstrip(".") or host
    if not host.isascii():
        try:
            return host.encode("idna").decode("ascii")
        except UnicodeError:
            return host
    return host


def _upstream_origin(route: Route) -> Origin:
    return _origin_of(route.upstream)


@functools.lru_cache(maxsize=1024)
def _origin_of(upstream: str) -> Origin:
    """A configured upstream URL's origin, worked out once (answers name one often, and another route's every
    time a peer is looked for)."""
    up = urlsplit(upstream)
    return _origin(up.scheme, up.hostname, up.port)


def public_reference(value: str, route: Route) -> str:
    """`value` with the upstream's origin replaced by the route's path on the PEP; unchanged when it does not
    name the upstream (another origin, or a relative reference). A URL naming another route's upstream (one
    service redirecting to another behind the same PEP) gets that route's path the same way."""
    try:
        ref = urlsplit(value.strip())
        if ref.netloc:
            own = _upstream_origin(route)
            named = _origin(ref.scheme or own[0], ref.hostname, ref.port)
            if named != own:
                return _peer_reference(value, ref, named, route, own)
        elif ref.scheme or not ref.path.startswith("/"):
            return value  # `mailto:…`, `urn:…`, or a relative path: nothing of the upstream's address in it
    except ValueError:  # an unparsable port or host: not recognisably the upstream's, and not a URL to follow
        return value
    return _own_reference(value, ref, route)


def _own_reference(value: str, ref: SplitResult, route: Route) -> str:
    """A reference to the route's own upstream (a URL naming it, or a path on it) as the agent gets it."""
    path = route.public_path(ref.path or "/")
    if path is None:
        if not ref.netloc:
            return value  # a path on the upstream that no PEP path leads to: it names no address
        path = ref.path or "/"  # the origin goes; what is left is a path the PEP decides like any other
    query = f"?{ref.query}" if ref.query else ""
    fragment = f"#{ref.fragment}" if ref.fragment else ""
    return f"{path}{query}{fragment}"


def public_links(value: str, route: Route) -> str:
    """A `Link` field value with each link's `<target>` passed through `public_reference`. Only a `<` that opens a
    link (at the start, or after the comma that ends the previous one) starts a target: one inside a quoted
    parameter (`title="a, <b>"`) is text."""
    out: list[str] = []
    i, n = 0, len(value)
    quoted = False
    opens = True  # at the start of a link-value (nothing but spaces since the start or a comma)
    while i < n:
        c = value[i]
        if quoted:
            if c == "\\" and i + 1 < n:
                out.append(value[i : i + 2])
                i += 2
                continue
            quoted = c != '"'
        elif c == '"':
            quoted, opens = True, False
        elif c == "<" and opens:
            end = value.find(">", i + 1)
            if end < 0:
                out.append(value[i:])
                break
            out.append(f"<{public_reference(value[i + 1 : end], route)}>")
            i, opens = end + 1, False
            continue
        elif c == ",":
            opens = True
        elif not c.isspace():
            opens = False
        out.append(c)
        i += 1
    return "".join(out)


def public_value(name: str, value: str, route: Route) -> str:
    """The value of a `Location`, `Content-Location`, `Refresh` or `Link` field (`name` lower-cased) as the agent
    gets it."""
    if name == "link":
        return public_links(value, route)
    if name != "refresh":
        return public_reference(value, route)
    m = _REFRESH.match(value)
    if m is None:
        return value
    lead, quote, url = m.groups()
    tail = ""
    if quote and quote in url:
        url, rest = url.split(quote, 1)
        tail = quote + rest
    return f"{lead}{quote}{public_reference(url, route)}{tail}"


def rewrite(fields: Fields, route: Route) -> Fields:
    """The fields of an upstream answer with every one that can carry the upstream's address rewritten, in
    place and order; `fields` itself when there is none (the usual case: nothing is copied)."""
    out: Fields | None = None
    for i, (name, value) in enumerate(fields):
        if len(name) not in _URL_FIELD_LENGTHS or name[0] | 0x20 not in _URL_FIELD_INITIALS:
            continue
        key = name.lower()
        if key not in _URL_FIELDS:
            continue
        text = value.decode("utf-8", "surrogateescape")
        public = public_value(key.decode("ascii"), text, route)
        if public != text:
            if out is None:
                out = list(fields)
            out[i] = (name, public.encode("utf-8", "surrogateescape"))
    return fields if out is None else out


def _peer_reference(value: str, ref: SplitResult, named: Origin, route: Route, own: Origin) -> str:
    """An absolute URL of another origin: the path of the route whose upstream it names (the first that has a PEP
    path for it; else the path alone), or as it is. A route with `match.host` (forward-proxy mode) is reached by
    that host through the PEP: a URL naming its upstream becomes `http://` + that host + its path, and one whose
    upstream is that very host (tunnels always are) is not looked at: its address is no secret.

    An origin named exactly wins; then the route's own upstream, then another route's, named by its host and port
    under another scheme: an app behind a TLS terminator (Django's `SECURE_SSL_REDIRECT`, a proxy fix that trusts
    `X-Forwarded-Proto` but not `X-Forwarded-Host`) redirects to `https://` + the Host it was sent, which is its
    own address, and a client told to follow that goes to the upstream's socket, around the PEP."""
    others = [(p, _upstream_origin(p)) for p in route.peers if p is not route]
    others = [(p, origin) for p, origin in others if _hidden(p, origin)]
    peers = [p for p, origin in others if origin == named]
    if not peers:
        if _same_address(named, own):
            return _own_reference(value, ref, route)
        peers = [p for p, origin in others if _same_address(named, origin)]
        if not peers:
            return value
    found = next(((p, path) for p in peers if (path := p.public_path(ref.path or "/"))), None)
    peer, path = found if found is not None else (peers[0], ref.path or "/")
    query = f"?{ref.query}" if ref.query else ""
    fragment = f"#{ref.fragment}" if ref.fragment else ""
    if peer.host is not None:
        port = f":{peer.port}" if peer.port is not None and peer.port != _DEFAULT_PORTS["http"] else ""
        return f"http://{format_host(peer.host)}{port}{path}{query}{fragment}"
    return f"{path}{query}{fragment}"


def _hidden(peer: Route, upstream: Origin) -> bool:
    """Whether the agent could learn `peer`'s upstream from a URL naming it: a path route's always, a
    forward-proxy route's when it is another host than the one the agent reaches the route by."""
    return peer.host is None or _host(peer.host) != upstream[1]


def _same_address(named: Origin, upstream: Origin) -> bool:
    """`named` is the upstream's host and port whatever its scheme: the same port, or each scheme's own default
    (`https://svc.internal/x` names `http://svc.internal`, which a framework writes from the Host it was sent)."""
    scheme, host, port = named
    if port is None or host != upstream[1]:
        return False
    return port == upstream[2] or (
        port == _DEFAULT_PORTS.get(scheme) and upstream[2] == _DEFAULT_PORTS.get(upstream[0])
    )
