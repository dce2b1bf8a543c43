"""Authorities (`host`, `host:port`, `[v6]:port`) as the router compares them: pure, no aiohttp types."""

from __future__ import annotations

import re
from typing import Final

_AUTHORITY: Final = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::([0-9]{1,5}))?\Z")
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
CONNECT_DEFAULT_PORT: Final = 443  # a host route without a port tunnels to 443 only


def split_authority(text: str) -> tuple[str, int | None] | None:
    """Lower-cased host (IPv6 without brackets) and the explicit port, or None when `text` is not an authority.

    No scheme, user info, path, query or whitespace; a port is 1-65535."""
    m = _AUTHORITY.match(text.lower())
    if m is None:
        return None
    host, port_text = m.group(1), m.group(2)
    if host.startswith("["):
        host = host[1:-1]
        if ":" not in host:
            return None
    elif host.strip(".") == "":
        return None
    port = int(port_text) if port_text is not None else None
    if port is not None and not 1 <= port <= 65535:
        return None
    return host, port


def resolve_authority(text: str, default_port: int | None) -> tuple[str, int] | None:
    """Host and effective port: the explicit port, else `default_port` (None: a port is required)."""
    parts = split_authority(text)
    if parts is None:
        return None
    host, port = parts
    if port is None:
        if default_port is None:
            return None
        port = default_port
    return host, port


def format_authority(host: str, port: int) -> str:
    return f"{format_host(host)}:{port}"


def format_host(host: str) -> str:
    """A host as an authority spells it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host
