"""Which protocol rule applies to a request on a route: the pure part, shared by the proxy and `pep explain`.

`before_body` answers everything that needs no body; when it returns None, the body must be read (within the
route's limit) and given to `parse`.
"""

from __future__ import annotations

from collections.abc import Mapping

from pep.config import RouteConfig
from pep.decision import Reason
from pep.protocols import PLAIN, Inspected, Refused, mcp, openai


def encoding_problem(headers: Mapping[str, str]) -> Refused | None:
    """A Content-Encoding other than identity on an inspected route: the PEP would decide on other bytes."""
    encoding = headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        return Refused(Reason.BODY_UNREADABLE, f"content-encoding {encoding[:32]!r} on an inspected route")
    return None


def before_body(
    route: RouteConfig, method: str, path: str, headers: Mapping[str, str], has_body: bool
) -> Inspected | Refused | None:
    if route.filter_tools_list and "Last-Event-ID" in headers:
        # A resumed stream may replay a tools/list answer that would then bypass the filter.
        return Refused(Reason.REQUEST_AMBIGUOUS, "Last-Event-ID on a route that filters tools/list")
    if route.protocol == "mcp":
        if method != "POST":
            if has_body:
                # Only POST bodies are read; a body elsewhere would reach the upstream undecided.
                return Refused(Reason.REQUEST_AMBIGUOUS, f"a body on an MCP {method} request")
            return Inspected((mcp.http_action(method),), None)
        return encoding_problem(headers)
    if route.protocol == "openai":
        call = openai.classify(method, path)
        if call is None:
            return PLAIN
        if isinstance(call, Refused):
            return call
        if not call.read:
            # The PEP cannot see which model this runs: decided on the endpoint, the body streams through.
            return Inspected((openai.unread_message(call),), None)
        return encoding_problem(headers)
    return PLAIN


def parse(route: RouteConfig, headers: Mapping[str, str], body: bytes, path: str | None = None) -> Inspected | Refused:
    """The messages of a body that `before_body` asked to read (`path`: the request's, for model calls)."""
    if route.protocol == "mcp":
        return mcp.inspect(body, headers)
    call = openai.classify("POST", path) if path is not None else None
    if isinstance(call, Refused):
        return call
    getall = getattr(headers, "getall", None)  # a repeated Content-Type: the upstream may parse by the other
    if getall is not None and len(getall("Content-Type", ())) > 1:
        return Refused(Reason.REQUEST_AMBIGUOUS, "a repeated Content-Type header")
    return openai.inspect(body, call, headers.get("Content-Type"))
