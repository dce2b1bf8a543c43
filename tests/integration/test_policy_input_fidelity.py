"""The policy input shows what the upstream will act on, or the request is refused: caller data that two readers
could take for different things never reaches the PDP as one of them (README, "The policy input document").

Driven through a running PEP with raw request bytes (a client library would re-encode them), against the OPA-shaped
test PDP, whose recorded inputs are what the policy saw.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp, Mode
from tests.support.raw_client import raw_get
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]


async def send(pep: RunningPep, target: bytes, extra: bytes = b"") -> tuple[int, str | None]:
    return await raw_get(pep.port, target, extra)


@pytest.mark.parametrize("query", [b"n=caf%e9", b"n=caf%ff", b"n=%c0%ae", b"%ff=1", b"a=1&n=%ED%A0%80"])
async def test_a_query_byte_that_is_not_utf8_is_refused_not_replaced(
    query: bytes, pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """Shown as U+FFFD, `caf%e9` and `caf%ff` were one value to the policy, while a Latin-1 upstream reads `café`
    and `cafÿ`: a rule against one could not see it."""
    assert await send(pep, b"/tools/x?" + query) == (403, "request_ambiguous")
    assert fault_pdp.requests == []
    assert upstream.seen == []
    entries = await pep.log_entries()
    assert entries[-1]["detail"] == "percent-encoded bytes in the query that are not UTF-8"


async def test_a_query_in_utf8_is_decoded_for_the_policy(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    assert await send(pep, b"/tools/x?n=caf%C3%A9&m=a+b") == (200, None)
    assert fault_pdp.requests[0].body["input"]["request"]["query"] == {"n": ["café"], "m": ["a b"]}
    assert [u.target for u in upstream.seen] == ["/tools/x?n=caf%C3%A9&m=a+b"]


@pytest.mark.parametrize(
    "fields",
    [
        b"X-Tenant: evil\r\nX-Tenant: acme\r\n",
        b"X-Tenant: evil\r\nx-tenant: acme\r\n",  # one name to every reader, whatever its case
        b"User-Agent: evil\r\nUser-Agent: acme\r\n",  # Node keeps the first user-agent, joins other names
        b"Content-Type: text/plain\r\nContent-Type: application/json\r\n",
        b"X-Tenant: acme\r\nX-Other: 1\r\nX-Tenant: \r\n",
    ],
)
async def test_a_field_sent_twice_is_refused_not_joined(
    fields: bytes, pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """Joined, `X-Tenant: evil` + `X-Tenant: acme` was `"evil, acme"` to the policy: a rule against `evil` did not
    match it, while Go, Java and aiohttp upstreams read `evil`. And one field holding `evil, acme` looked the same."""
    assert await send(pep, b"/tools/x", fields) == (403, "request_ambiguous")
    assert fault_pdp.requests == []
    assert upstream.seen == []
    entries = await pep.log_entries()
    assert entries[-1]["detail"].endswith("sent more than once")


async def test_a_list_field_sent_twice_is_joined_and_one_field_with_commas_passes(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    fields = b"Accept: text/html\r\nAccept: application/json\r\nX-Tenant: evil, acme\r\n"
    assert await send(pep, b"/tools/x", fields) == (200, None)
    headers = fault_pdp.requests[0].body["input"]["request"]["headers"]
    assert headers["accept"] == "text/html, application/json"
    assert headers["x-tenant"] == "evil, acme"
    assert upstream.seen[0].headers.getall("Accept") == ["text/html", "application/json"]


async def test_a_field_the_route_hides_from_the_policy_may_repeat(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """Cookies (caller credentials, never shown to the PDP) decide nothing: forwarded as sent."""

    def hide(raw: dict[str, Any]) -> None:
        raw["routes"][0]["keep_caller_credentials"] = True

    pep = await make_pep(hide)
    assert await send(pep, b"/tools/x", b"Cookie: a=1\r\nCookie: b=2\r\n") == (200, None)
    assert "cookie" not in fault_pdp.requests[0].body["input"]["request"]["headers"]
    assert upstream.seen[0].headers.getall("Cookie") == ["a=1", "b=2"]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


def _cgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answers the one variable a CGI-style reader makes of `X-Tenant`, `X_Tenant` and `x_tenant` alike."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ.get("HTTP_X_TENANT", "").encode()]


@pytest.fixture
def cgi_upstream() -> Iterator[str]:
    """The standard library's WSGI server (a real CGI-style reader), on a free loopback port."""
    server: WSGIServer = make_server("127.0.0.1", 0, _cgi_app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def fetch(pep: RunningPep, target: bytes, extra: bytes) -> tuple[int, bytes]:
    """One GET; the status and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", pep.port)
    try:
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"Connection: close\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "fields",
    [
        b"X-Tenant: acme\r\nX_Tenant: evil\r\n",
        b"X_Tenant: evil\r\nX-Tenant: acme\r\n",
        b"X-Tenant: acme\r\nx_tenant: evil\r\n",
        b"X-Ten_ant: acme\r\nX_Ten-ant: evil\r\n",
    ],
)
async def test_two_spellings_of_one_cgi_name_are_refused(
    fields: bytes, make_pep: PepFactory, fault_pdp: FaultPdp, cgi_upstream: str
) -> None:
    """The policy saw `x-tenant: acme` (and an `x_tenant` it had no rule for); WSGI's reader made both one
    `HTTP_X_TENANT`, here `acme,evil`: the upstream acted on a value the PDP was never asked about."""

    def to_cgi(raw: dict[str, Any]) -> None:
        raw["routes"][0]["upstream"] = cgi_upstream

    pep = await make_pep(to_cgi)
    assert await send(pep, b"/tools/x", fields) == (403, "request_ambiguous")
    assert fault_pdp.requests == []
    entries = await pep.log_entries()
    assert "are one field to CGI-style upstreams" in entries[-1]["detail"]
    # One spelling alone is what the policy sees, by its own name.
    assert await fetch(pep, b"/tools/x", b"X-Tenant: acme\r\n") == (200, b"acme")
    assert fault_pdp.requests[-1].body["input"]["request"]["headers"]["x-tenant"] == "acme"


@pytest.mark.parametrize(
    "field",
    [
        b"X-Forwarded-Ssl: on",  # Rack, trusting its loopback proxy, reads the request as https
        b"X-Forwarded-Scheme: https",
        b"X-Forwarded-Protocol: https",
        b"X-Forwarded-User: admin",  # oauth2-proxy's pass_user_headers: the user the upstream acts for
        b"X-Forwarded-Email: admin@acme.example",
        b"X-Forwarded-Groups: admins",
        b"X-Forwarded-Preferred-Username: admin",
        b"X-Forwarded-Access-Token: forged",
    ],
)
async def test_proxy_asserted_fields_from_the_caller_reach_neither_pdp_nor_upstream(
    field: bytes, pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """The README promised every `x-forwarded-*` was the PEP's; these crossed, to an upstream that trusts them from
    the proxy in front of it, while the PDP decided on the verified `subject`."""
    assert await send(pep, b"/tools/x", field + b"\r\n") == (200, None)
    name = field.split(b":")[0].decode().lower()
    assert name not in fault_pdp.requests[0].body["input"]["request"]["headers"]
    assert name not in upstream.seen[0].headers
    assert upstream.seen[0].headers["X-Forwarded-Proto"] == "http"


async def test_a_pdp_obligation_may_say_who_the_user_is(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    fault_pdp.set(Mode(body=b'{"result":{"allow":true,"headers":{"X-Forwarded-User":"alice"}}}'))
    assert await send(pep, b"/tools/x", b"X-Forwarded-User: admin\r\n") == (200, None)
    assert upstream.seen[0].headers.getall("X-Forwarded-User") == ["alice"]


async def test_x_forwarded_method_is_a_method_override(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """Traefik's forward auth tells an auth server the original method in it, as it tells the path in
    X-Forwarded-Uri (refused already)."""
    assert await send(pep, b"/tools/x", b"X-Forwarded-Method: DELETE\r\n") == (403, "request_ambiguous")
    assert fault_pdp.requests == []
    assert upstream.seen == []
