"""The route table: longest whole-segment `path_prefix` wins, and the exact upstream URL for a request."""

from __future__ import annotations

from dataclasses import dataclass

from pep.config import RouteConfig
from pep.headers import obligation_forbidden, policy_drop_set, request_drop_set


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

    @classmethod
    def build(cls, cfg: RouteConfig) -> Route:
        credential = cfg.credential.header if cfg.credential is not None else None
        return cls(
            config=cfg,
            name=cfg.name,
            prefix=cfg.path_prefix,
            upstream=cfg.upstream,
            request_drop=request_drop_set(credential, cfg.keep_caller_credentials),
            policy_drop=policy_drop_set(credential),
            obligation_forbidden=obligation_forbidden(credential),
        )

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


class RouteTable:
    """Routes ordered longest prefix first, so the first match is the most specific."""

    __slots__ = ("routes",)

    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self.routes = tuple(sorted((Route.build(r) for r in routes), key=lambda r: -len(r.prefix)))

    def match(self, path: str) -> Route | None:
        for route in self.routes:
            if route.matches(path):
                return route
        return None
