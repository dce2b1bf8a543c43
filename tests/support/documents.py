"""`pep/v1` policy input documents built by hand, for tests of the PDP clients and the mapping."""

from __future__ import annotations

from typing import Any


def pep_document(
    *,
    method: str = "GET",
    path: str = "/tools/search",
    query: dict[str, list[str]] | None = None,
    subject: dict[str, Any] | None = None,
    mcp: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    protocol: str = "http",
    route: str = "tools",
    request_id: str = "rid-1",
) -> dict[str, Any]:
    """A document as `pep.attributes.document` makes it, plus `mcp` / `model` members when given."""
    d: dict[str, Any] = {
        "version": "pep/v1",
        "request": {
            "id": request_id,
            "time": "2026-01-01T00:00:00.000Z",
            "method": method,
            "scheme": "http",
            "host": "127.0.0.1:8080",
            "path": path,
            "query": {"q": ["1"]} if query is None else query,
            "headers": {"user-agent": "t", "x-tenant": "acme"},
            "body_bytes": None,
        },
        "route": {"name": route, "protocol": protocol, "upstream": "http://u/", "upstream_url": "http://u/x"},
        "subject": {"workload": "spiffe://test/agent", "agent": None} if subject is None else subject,
    }
    if mcp is not None:
        d["mcp"] = mcp
    if model is not None:
        d["model"] = model
    return d
