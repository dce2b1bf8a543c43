"""atheris harness: the body readers (pep/protocols/dispatch.py on a route of each protocol, mcp.py and openai.py
behind it, and pep/strictjson.py).

Input: three bytes that choose the request, then the body.
- byte 0: the route's protocol (bits 0-1: mcp, openai, http, mcp), `filter_tools_list` (bit 2), whether the
  request has a body (bit 3), the method (bits 5-7);
- byte 1: which headers are sent (bit 0 MCP-Protocol-Version, 1 Mcp-Method, 2 Mcp-Name, 3 Content-Encoding,
  4 Last-Event-ID, 5 a second Mcp-Method) and the path (bits 6-7);
- byte 2: the header values (two bits each);
- byte 0 bit 4 and byte 2 bit 1: strictjson's depth limit (0 for none, 1, 2 or 64);
- byte 2 bit 0: strictjson's fold_keys, for the C scan's comparison;
- the rest: the body, given to the route's reader, to each reader on its own, and to strictjson.
Oracles (fuzz/oracles.py): an Inspected or a Refused with a reason from the closed set, never an exception; a body
the protocol decides on is always read; what is accepted is what the standard library reads strictly from the
same bytes (duplicate keys anywhere refused, same values and types), and strictjson decides the same with the C
scan of a compiled build as without it; a JSON-RPC batch is one message per element,
each with that element's facts; mirrored MCP headers agree with the body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atheris.function_hooks import enabled_hooks
from atheris.import_hook import instrument_imports

from fuzz.harness import load_built, run

enabled_hooks.add("RegEx")
enabled_hooks.add("str")
with instrument_imports(include=["pep"]):
    from multidict import CIMultiDict

    from fuzz import oracles
    from pep import strictjson
    from pep.config import RouteConfig
    from pep.protocols import dispatch, mcp, openai


def _c_scan() -> strictjson.Scan:
    """The C scan of a compiled build (pep/_jsonscan.c): it must answer as the walk does."""
    scan: strictjson.Scan = load_built(Path(strictjson.__file__).parent, "pep._jsonscan").scan
    return scan


C_SCAN = _c_scan()
PROTOCOLS = ("mcp", "openai", "http", "mcp")
METHODS = ("POST", "POST", "POST", "GET", "DELETE", "PUT", "PATCH", "OPTIONS")
PATHS = ("/mcp", "/v1/chat/completions", "/v1/models", "/v1/chat;x/completions/")
VERSIONS = ("2025-03-26", "2025-06-18", "2026-07-28", "")
MCP_METHODS = ("tools/call", "initialize", "=?base64?dG9vbHMvY2FsbA==?=", "ping")
MCP_NAMES = ("t", "f", "=?base64?dA==?=", "")
ENCODINGS = ("gzip", "identity", " Identity ", "")
ROUTES = {
    (protocol, filtering): RouteConfig(
        name="r",
        path_prefix="/",
        upstream="http://127.0.0.1:9/",
        protocol=protocol,
        max_body_bytes=1 << 20 if protocol != "http" else None,
        filter_tools_list=filtering,
    )
    for protocol in ("mcp", "openai", "http")
    for filtering in (False, True)
}


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    a, b, c = data[0], data[1], data[2]
    body = data[3:]
    protocol, filtering, has_body, method = PROTOCOLS[a & 3], bool(a & 4), bool(a & 8), METHODS[a >> 5]
    path = PATHS[b >> 6]
    headers: CIMultiDict[str] = CIMultiDict()
    if b & 1:
        headers.add("MCP-Protocol-Version", VERSIONS[c & 3])
    if b & 2:
        headers.add("Mcp-Method", MCP_METHODS[(c >> 2) & 3])
    if b & 4:
        headers.add("Mcp-Name", MCP_NAMES[(c >> 4) & 3])
    if b & 8:
        headers.add("Content-Encoding", ENCODINGS[c >> 6])
    if b & 16:
        headers.add("Last-Event-ID", "1")
    if b & 32:
        headers.add("Mcp-Method", "ping")
    route = ROUTES[protocol, filtering]
    early = dispatch.before_body(route, method, path, headers, has_body)
    oracles.check_dispatch(protocol, filtering, method, path, headers, has_body, early)
    if early is None:
        parsed = dispatch.parse(route, method, path, headers, body)
        if protocol == "mcp":
            oracles.check_mcp(body, headers, parsed)
        elif protocol == "openai" and oracles.invokes_model(method, path):
            oracles.check_model_call(body, headers, parsed)
        else:
            oracles.check_form(body, parsed, unread_model=protocol == "openai")
    # each reader on its own, whatever the route
    oracles.check_mcp(body, headers, mcp.inspect(body, headers))
    oracles.check_openai(body, openai.inspect(body))
    depth = (0, 1, 2, 64)[(a >> 4) & 1 | (c & 2)]
    value: Any = None
    error: Exception | None = None
    try:
        value = strictjson.loads(body, depth)
    except strictjson.JsonError as exc:
        error = exc
    oracles.check_strict(body, depth, value, error)
    fold = bool(c & 1)
    oracles.check_scan(body, strictjson.read, depth, fold, C_SCAN)


if __name__ == "__main__":
    run(test_one_input)
