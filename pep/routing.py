"""The route table: longest whole-segment `path_prefix` wins, then a matching `host`; and the exact upstream URL.

Forward-proxy mode: a route with `match.host` matches only requests whose authority (the Host header, which an
absolute-form target must agree with) names that host and port, the scheme's default port when none is written.
CONNECT is matched separately (`RouteTable.tunnel`), on host:port, and only by routes with `tunnel: true`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pep.authority import CONNECT_DEFAULT_PORT, DEFAULT_PORTS, format_authority, resolve_authority, split_authority
from pep.config import RouteConfig
from pep.headers import HOP_BY_HOP, forward_drop_set, obligation_forbidden, policy_drop_set, request_drop_set


@dataclass(frozen=True, slots=True)
class Route:
    """A configured route with what is constant per route computed once."""

    config: RouteConfig
    name: str
    prefix: str
    upstream: str
    request_drop: frozenset[str]  # caller headers never forwarded
    policy_drop: frozenset[str]  # caller headers never shown to the PDP
    obligation_forbidden: frozenset[str]  # headers a PDP obligation may not set
    host: str | None = None  # match.host: lower-cased, IPv6 without brackets
    port: int | None = None  # match.host's explicit port (None: the scheme's default)
    tunnel_target: str | None = None  # tunnel routes: the upstream's host:port, where a CONNECT goes
    forward_drop: frozenset[bytes] = frozenset()  # caller fields never forwarded (hop-by-hop and framing too)
    policy_hidden: frozenset[str] = frozenset()  # policy_drop and the hop-by-hop names: what the PDP never sees
    forward_drop_unencoded: frozenset[bytes] = frozenset()  # forward_drop and Accept-Encoding (answers read whole)
    # caller headers the route drops, hides or reads (integrity.alias_problem)
    reserved_names: frozenset[str] = frozenset()
    list_filters: frozenset[str] = frozenset()  # MCP routes: the list answers filtered by policy (filter_*_list)
    # Every route of the table this route is in (itself too), filled by RouteTable: an upstream's answer may name
    # another route's upstream, which the agent must not learn either (pep/redirects.py).
    peers: list[Route] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def build(cls, cfg: RouteConfig, token_header: str | None = None, agent_header: str | None = None) -> Route:
        """`token_header` (identity.jwt.header) is a caller credential: never shown to the PDP, and not
        forwarded unless the route keeps caller credentials. `agent_header` (identity.agent_header) names the
        caller: another spelling of it is refused (`reserved_names`)."""
        credential = cfg.credential.header if cfg.credential is not None else None
        token = frozenset({token_header} if token_header else ())
        host: str | None = None
        port: int | None = None
        if cfg.host is not None:
            parts = split_authority(cfg.host)
            if parts is None:
                raise ValueError(f"route {cfg.name}: match.host {cfg.host!r} is not an authority")
            host, port = parts
        target = None
        if cfg.tunnel:
            up = urlsplit(cfg.upstream)
            target = format_authority((up.hostname or "").lower(), up.port or DEFAULT_PORTS.get(up.scheme, 443))
        policy_drop = policy_drop_set(credential) | token
        request_drop = request_drop_set(credential, cfg.keep_caller_credentials) | (
            frozenset() if cfg.keep_caller_credentials else token
        )
        forward_drop = forward_drop_set(request_drop)
        filters = {"tools/list"} if cfg.filter_tools_list else set()
        if cfg.filter_prompts_list:
            filters.add("prompts/list")
        if cfg.filter_resources_list:
            filters.update(("resources/list", "resources/templates/list"))
        return cls(
            config=cfg,
            name=cfg.name,
            prefix=cfg.path_prefix,
            upstream=cfg.upstream,
            request_drop=request_drop,
            policy_drop=policy_drop,
            obligation_forbidden=obligation_forbidden(credential),
            host=host,
            port=port,
            tunnel_target=target,
            forward_drop=forward_drop,
            forward_drop_unencoded=forward_drop | {b"accept-encoding"},
            policy_hidden=policy_drop | HOP_BY_HOP,
            reserved_names=request_drop | policy_drop | frozenset({agent_header} if agent_header else ()),
            list_filters=frozenset(filters),
        )

    def matches_authority(self, host: str, port: int, default_port: int) -> bool:
        """Routes without `match.host` match any authority; others the same host and (effective) port."""
        if self.host is None:
            return True
        return self.host == host and (self.port if self.port is not None else default_port) == port

    def matches(self, path: str) -> bool:
        """Whole segments: `/mcp` matches `/mcp` and `/mcp/x`, not `/mcpx`; `/crm/` matches `/crm/...`."""
        prefix = self.prefix
        if not path.startswith(prefix):
            return False
        return prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] == "/"

    def upstream_url(self, path: str, query: str) -> str:
        """The upstream joined with the rest of the raw path by exactly one `/`, the query as sent.

        Nothing is decoded or normalised. An empty remainder leaves the upstream URL exactly as written.
        """
        rest = path[len(self.prefix) :] if self.config.strip_prefix else path
        base = self.upstream
        if rest:
            if base.endswith("/") and rest.startswith("/"):
                url = base + rest[1:]
            elif base.endswith("/") or rest.startswith("/"):
                url = base + rest
            else:
                url = base + "/" + rest
        else:
            url = base
        return f"{url}?{query}" if query else url

    def public_path(self, upstream_path: str) -> str | None:
        """The PEP path whose upstream URL has this path: `upstream_url` backwards, or None when the path is not
        under the upstream's own path (no PEP path leads there)."""
        base = urlsplit(self.upstream).path
        trimmed = base.rstrip("/")
        if upstream_path in (base, trimmed):
            rest = ""
        elif upstream_path.startswith(trimmed + "/"):
            rest = upstream_path[len(trimmed) :]
        else:
            return None
        if not self.config.strip_prefix:
            return rest or "/"
        if not rest:
            return self.prefix
        return self.prefix.rstrip("/") + rest


class RouteTable:
    """Routes ordered longest prefix first, then host routes before the others: the first match is the most
    specific."""

    __slots__ = ("routes",)

    def __init__(
        self, routes: tuple[RouteConfig, ...], token_header: str | None = None, agent_header: str | None = None
    ) -> None:
        built = (Route.build(r, token_header, agent_header) for r in routes)
        self.routes = tuple(sorted(built, key=lambda r: (-len(r.prefix), r.host is None)))
        peers = list(self.routes)
        for route in self.routes:
            route.peers[:] = peers

    def match(self, path: str, authority: str | None = None, scheme: str = "http") -> Route | None:
        """The route for `path` on `authority` (the Host header; None or malformed: only routes without host)."""
        default_port = DEFAULT_PORTS.get(scheme, 80)
        named: tuple[str, int] | None = None
        resolved = False  # the authority is resolved only for a route with `match.host` (most routes have none)
        for route in self.routes:
            if not route.matches(path):
                continue
            if route.host is None:
                return route
            if not resolved:
                named, resolved = (resolve_authority(authority, default_port) if authority else None), True
            if named is not None and route.matches_authority(named[0], named[1], default_port):
                return route
        return None

    def tunnel(self, authority: str) -> Route | None:
        """The `tunnel: true` route for a CONNECT target `host:port` (the port is required)."""
        named = resolve_authority(authority, None)
        if named is None:
            return None
        for route in self.routes:
            if route.config.tunnel and route.matches_authority(named[0], named[1], CONNECT_DEFAULT_PORT):
                return route
        return None
