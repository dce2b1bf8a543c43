"""Which protocol rule applies to a request on a route: the pure part, shared by the proxy and `pep explain`.

`before_body` answers everything that needs no body; when it returns None, the body must be read (within the
route's limit) and given to `parse`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from pep import integrity
from pep.config import RouteConfig
from pep.decision import Reason
from pep.protocols import PLAIN, Inspected, Refused, mcp, media, openai

# The most a form body is read on a route without `max_body_bytes` (plain http routes): it is read whole, to find
# a `_method` field, where the body of any other plain request is streamed.
FORM_BODY_LIMIT: Final = 1048576


def encoding_problem(headers: Mapping[str, str]) -> Refused | None:
    """A Content-Encoding other than identity on a body read to be decided: the PEP would decide on other bytes.
    Every value of every field counts, as for answers (`identity` then `gzip` is gzip): an upstream may read any
    copy."""
    if "Content-Encoding" not in headers:  # (most requests: one lookup)
        return None
    for encoding in _values(headers, "Content-Encoding"):
        for coding in encoding.split(","):
            if coding.strip().lower() not in ("", "identity"):
                return Refused(Reason.BODY_UNREADABLE, f"content-encoding {encoding[:32]!r} on an inspected route")
    return None


def text_problem(headers: Mapping[str, str]) -> Refused | None:
    """A body on an mcp or openai route whose text the upstream may read otherwise than the PEP (UTF-8).

    A `charset` other than UTF-8: Express's JSON parser (under the TypeScript MCP SDK's servers) decodes a body by
    its charset, UTF-7 included, where the ASCII `+ACI-` is a quote, so `{"model":"ok","user":"+ACI-,+ACI-model
    +ACI-:+ACI-evil"}` names `evil` to it. A repeated Content-Type: readers pick different copies."""
    types = _values(headers, "Content-Type")
    if len(types) > 1:
        return Refused(Reason.REQUEST_AMBIGUOUS, "a repeated Content-Type header")
    if not types or ";" not in types[0]:  # no parameter, so no charset (most requests)
        return None
    if (charset := media.parameters(types[0])[1]) is not None and not media.utf8(charset):
        return Refused(Reason.BODY_UNREADABLE, f"charset {charset[:32]!r} on an inspected route")
    return None


def _values(headers: Mapping[str, str], name: str) -> Sequence[str]:
    """Every value of the header `name` (one per field)."""
    getall = getattr(headers, "getall", None)  # (a multidict: faster than an isinstance check on its ABC)
    if getall is not None:
        values: Sequence[str] = getall(name, ())
        return values
    return [headers[name]] if name in headers else []


def before_body(
    route: RouteConfig, method: str, path: str, headers: Mapping[str, str], has_body: bool
) -> Inspected | Refused | None:
    if route.protocol == "mcp":
        if "Last-Event-ID" in headers and (method != "GET" or _repeated(headers, "Last-Event-ID")):
            # Only a GET resumes a stream (with an event id the PEP relayed, opened by the proxy): anywhere else
            # a server might replay an answer as the answer to this request.
            return Refused(Reason.REQUEST_AMBIGUOUS, f"Last-Event-ID on an MCP {method} (or more than one)")
        if method != "POST":
            if has_body:
                # Only POST bodies are read; a body elsewhere would reach the upstream undecided.
                return Refused(Reason.REQUEST_AMBIGUOUS, f"a body on an MCP {method} request")
            return Inspected((mcp.http_action(method),), None)
        return encoding_problem(headers) or text_problem(headers)
    if route.protocol == "openai":
        call = openai.classify(method, path)
        if isinstance(call, Refused):
            return call
        if call is not None and call.read:
            return encoding_problem(headers) or text_problem(headers)
        if call is not None and not (has_body and is_form(headers)):
            # The PEP cannot see which model this runs: decided on the endpoint, the body streams through.
            return Inspected((openai.unread_message(call),), None)
    if method == "POST" and has_body and is_form(headers):
        return None  # read, for `parse` to look for a `_method` field
    return PLAIN


def _repeated(headers: Mapping[str, str], name: str) -> bool:
    getall = getattr(headers, "getall", None)
    return getall is not None and len(getall(name, ())) > 1


def is_form(headers: Mapping[str, str]) -> bool:
    """A body an upstream framework may read as urlencoded form fields: Content-Type
    application/x-www-form-urlencoded (any parameters, any case), or none at all (Rack reads a POST without one as
    a form). Every Content-Type field counts, since an upstream may read another one than the PEP."""
    values = _values(headers, "Content-Type")
    return not values or any(not v.strip() or "x-www-form-urlencoded" in v.lower() for v in values)


def read_limit(route: RouteConfig) -> int:
    """How many body bytes may be read to decide: the route's `max_body_bytes`, else (plain http routes, which read
    only form bodies) FORM_BODY_LIMIT."""
    return route.max_body_bytes if route.max_body_bytes is not None else FORM_BODY_LIMIT


def parse(route: RouteConfig, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Inspected | Refused:
    """The messages of a body that `before_body` asked to read."""
    if route.protocol == "mcp":
        return mcp.inspect(body, headers, route.max_batch_messages, route.max_json_values)
    call = openai.classify(method, path) if route.protocol == "openai" else None
    if isinstance(call, Refused):
        return call
    if call is not None and call.read:
        getall = getattr(headers, "getall", None)  # a repeated Content-Type: the upstream may parse by the other
        if getall is not None and len(getall("Content-Type", ())) > 1:
            return Refused(Reason.REQUEST_AMBIGUOUS, "a repeated Content-Type header")
        if is_form(headers) and (problem := integrity.method_override_field(body.decode("latin-1"))):
            return Refused(Reason.REQUEST_AMBIGUOUS, f"{problem} in a model call body a framework may read as a form")
        return openai.inspect(body, call, headers.get("Content-Type"))
    # A form body: forwarded as read unless a framework would take a field of it as the method. On an openai route
    # it is an unread model call (a `_method` field would make it another request than the one decided).
    if problem := integrity.method_override_field(body.decode("latin-1")):
        return Refused(Reason.REQUEST_AMBIGUOUS, f"{problem} in the form body")
    return Inspected((openai.unread_message(call),) if call is not None else PLAIN.messages, body)
