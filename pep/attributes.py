"""The `pep/v1` policy input document, built from facts about one request (pure; no aiohttp types)."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from typing import Any, Final
from urllib.parse import parse_qs

from multidict import CIMultiDict, CIMultiDictProxy

from pep.headers import connection_named
from pep.integrity import field_variable
from pep.protocols import Message
from pep.routing import Route

VERSION: Final = "pep/v1"
Headers = CIMultiDictProxy[str] | CIMultiDict[str]


_second: Final[list[Any]] = [-1, ""]  # the last whole second formatted, reused within that second
# ".000Z" to ".999Z": the milliseconds looked up, not formatted per request.
_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


def rfc3339_now() -> str:
    """UTC with milliseconds, `2026-11-24T12:00:00.000Z`; formatted once per second, not per request."""
    return rfc3339(time.time())


def rfc3339(now: float) -> str:
    """`now` (seconds since the epoch) as `rfc3339_now` formats it."""
    sec = int(now)
    cached = _second
    if cached[0] != sec:
        cached[0], cached[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    day_second: str = cached[1]
    return day_second + _MILLIS[int((now - sec) * 1000)]


def header_map(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased names; repeated fields joined with `, ` as RFC 9110 5.3 allows."""
    out: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        prior = out.get(key)
        out[key] = value if prior is None else f"{prior}, {value}"
    return out


# Request fields RFC 9110 and 9111 define as lists (and W3C Baggage): sent twice, they mean their values joined with
# `, `, so the joined value the policy sees is what they say. Any other field sent twice is refused (RepeatedField).
LIST_FIELDS: Final[frozenset[str]] = frozenset(
    {
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "access-control-request-headers",
        "baggage",
        "cache-control",
        "if-match",
        "if-none-match",
        "pragma",
        "prefer",
        "via",
        "warning",
    }
)


class AmbiguousField(ValueError):
    """Fields the policy would see that upstreams read as one field with a value the policy does not show.

    A field sent more than once that is no list: readers disagree on its value (Go's `Header.Get`, Java's
    `getHeader` and Node for `user-agent` take the first; WSGI, Rack, PHP and Node for other names join them), and
    joined with `, ` it is the same to the policy as one field holding that text. Or two names that differ only in
    `_` for `-` (`X-Tenant`, `X_Tenant`): the policy sees two fields, a CGI-style upstream (WSGI, Rack, PHP) one
    variable, `HTTP_X_TENANT`, holding whichever came last or both. Either way the PDP would decide on a value some
    upstream never acts on."""


def _twins(names: Iterable[str]) -> str | None:
    """Two of these lower-cased names that are one once `_` is read as `-`, as a message, or None."""
    dashed: dict[str, str] = {}
    for name in names:
        key = name.replace("_", "-")
        other = dashed.setdefault(key, name)
        if other != name:
            return f"headers {other[:64]!r} and {name[:64]!r} are one field to CGI-style upstreams"
    return None


def policy_headers(headers: Headers, hidden: frozenset[str]) -> dict[str, str]:
    """`header_map(end_to_end(headers, …))` in one pass: the fields that cross this hop and that the PDP may see
    (`hidden`: a route's `policy_hidden`, the hop-by-hop names included), lower-cased, repeats of `LIST_FIELDS`
    joined. Raises AmbiguousField for a repeat of any other field, or for names spelled with `_` for `-` of
    another one."""
    named = connection_named(headers)
    if named and not named <= hidden:  # (`Connection: keep-alive` names a field hidden already)
        hidden = hidden | named
    out: dict[str, str] = {}
    underscored = False
    for name, value in headers.items():
        key = name.lower()
        if key in hidden:
            continue
        prior = out.get(key)
        if prior is None:
            out[key] = value
            if "_" in key:
                underscored = True
        elif key in LIST_FIELDS:
            out[key] = f"{prior}, {value}"
        else:
            raise AmbiguousField(f"header {key[:64]!r} sent more than once")
    if underscored and (twins := _twins(out)):
        raise AmbiguousField(twins)
    return out


class AmbiguousQuery(ValueError):
    """Two query field names the policy sees apart that PHP, Rack or qs (Express 4) read as one variable: `tenant`
    beside `tenant[]` or `tenant[0]` (one array there, `tenant: [acme, evil]` to qs, the last to PHP), `ten.ant`
    beside `ten_ant` (PHP reads `.` and ` ` as `_`), or a name ending at a NUL for PHP (`tenant%00x`). A mapping or
    rule on `tenant` would decide on one value while such an upstream acts on another."""


def _query_twins(names: Collection[str]) -> str | None:
    """Two names, not both bracketed (`a[x]`, `a[y]` are one object's keys everywhere), of one variable."""
    joined = "".join(names)
    if "[" not in joined and "." not in joined and " " not in joined and "\x00" not in joined:
        return None  # every name is its own variable (the usual query): no two can be one
    seen: dict[str, str] = {}
    for name in names:
        variable = field_variable(name)
        other = seen.setdefault(variable, name)
        if other != name and ("[" not in other or "[" not in name):
            return f"query fields {other[:64]!r} and {name[:64]!r} are one variable to PHP, Rack or qs"
    return None


def query_map(query: str) -> dict[str, list[str]]:
    """The query decoded into name -> values, blank values kept (the raw query is forwarded unchanged): what
    `parse_qs(query, keep_blank_values=True, errors="strict")` gives. A query with nothing to decode (no `%`, no
    `+`) is split here, without parse_qs's per-field unquoting (most queries; tested against parse_qs).

    Raises UnicodeDecodeError for percent-encoded bytes that are not UTF-8: parse_qs's default would show each
    as U+FFFD, so `%e9` and `%ff` would be one value to the policy and two (`é` and `ÿ` in Latin-1) upstream.
    Raises AmbiguousQuery for names that are one variable to PHP, Rack or qs (looked at only when the query holds
    `[`, `.` or an escape: what such a name needs)."""
    if not query:
        return {}
    if "%" in query or "+" in query:
        out = parse_qs(query, keep_blank_values=True, errors="strict")
    else:
        out = {}
        for field in query.split("&"):
            if field:
                name, _, value = field.partition("=")
                values = out.get(name)
                if values is None:
                    out[name] = [value]
                else:
                    values.append(value)
    named = len(out) > 1 and ("[" in query or "." in query or "%" in query or "+" in query)
    if named and (twins := _query_twins(out)):
        raise AmbiguousQuery(twins)
    return out


def document(
    *,
    request_id: str,
    method: str,
    scheme: str,
    host: str,
    path: str,
    query: str,
    headers: dict[str, str],
    body_bytes: int | None,
    route: Route,
    upstream_url: str,
    subject: dict[str, Any],
) -> dict[str, Any]:
    """The document sent to the PDP. `headers` must already exclude credentials and PEP-owned headers."""
    return {
        "version": VERSION,
        "request": {
            "id": request_id,
            "time": rfc3339(time.time()),
            "method": method,
            "scheme": scheme,
            "host": host,
            "path": path,
            "query": query_map(query),
            "headers": headers,
            "body_bytes": body_bytes,
        },
        "route": {
            "name": route.name,
            "protocol": route.config.protocol,
            "upstream": route.upstream,
            "upstream_url": upstream_url,
        },
        "subject": subject,
    }


def with_facts(document: dict[str, Any], message: Message) -> dict[str, Any]:
    """The document for one message: its `mcp` or `model` facts added (plain HTTP: the document itself)."""
    if message.key is None:
        return document
    return {**document, message.key: message.facts}
