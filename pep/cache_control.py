"""HTTP caching of fetched metadata (AuthZEN discovery, JWKS): how long an answer may be reused."""

from __future__ import annotations


def ttl_of(cache_control: str | None, default: float) -> float:
    """Seconds the metadata may be reused: `max-age`, 0 for `no-store`/`no-cache`, else the default."""
    if not cache_control:
        return default
    max_age: float | None = None
    for token in cache_control.lower().split(","):
        name, _, value = token.strip().partition("=")
        value = value.strip()
        if name in ("no-store", "no-cache"):
            return 0.0  # wherever it appears, also after a max-age
        if name == "max-age" and max_age is None and value.isascii() and value.isdigit():  # not "²" or "٣"
            max_age = float(value)
    return default if max_age is None else max_age
