"""pep.admission: the one pipeline from a request's facts to a Check or a typed refusal, with its two injected
steps (identity, body read) called only when the request gets that far."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import pytest
from multidict import CIMultiDict

from pep.admission import Admission, Refusal, RequestFacts, admit, split_target, target_path
from pep.config import PdpConfig, RouteConfig
from pep.credentials import CredentialSource
from pep.decision import Allow, Deny, Reason
from pep.engine import Engine
from pep.identity import Refusal as IdentityRefusal
from pep.identity import invalid
from pep.metrics import Metrics
from pep.pdp import Failure, Pdp, Verdict
from pep.protocols import Refused
from pep.routing import Route, RouteTable
from pep.seal import Sealer

SUBJECT = {"workload": "spiffe://test/agent", "agent": None}
CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{}}}'


@dataclass
class Setup:
    routes: RouteTable
    credentials: dict[str, CredentialSource] = field(default_factory=dict)
    sealer: Sealer = field(default_factory=lambda: Sealer([secrets.token_bytes(32)]))


@dataclass
class Steps:
    """The injected steps, recording whether they were called."""

    subject: dict[str, Any] | IdentityRefusal = field(default_factory=lambda: dict(SUBJECT))
    body: bytes | Refused = b""
    identified: list[str] = field(default_factory=list)
    read: list[int] = field(default_factory=list)

    async def identify(self, route: Route) -> dict[str, Any] | IdentityRefusal:
        self.identified.append(route.name)
        return self.subject

    async def read_body(self, limit: int) -> bytes | Refused:
        self.read.append(limit)
        return self.body


def setup() -> Setup:
    routes = (
        RouteConfig(name="tools", path_prefix="/tools", upstream="http://up/api/", strip_prefix=True),
        RouteConfig(name="mcp", path_prefix="/mcp", upstream="http://up/mcp", protocol="mcp", max_body_bytes=100),
        RouteConfig(name="egress", path_prefix="/", upstream="http://api", host="api.example.com"),
        RouteConfig(
            name="tunnel", path_prefix="/", upstream="https://api.example.com", host="api.example.com:443", tunnel=True
        ),
    )
    return Setup(RouteTable(routes))


def facts(
    target: str, method: str = "GET", body: bytes | None = None, scheme: str = "http", **fields: str
) -> RequestFacts:
    headers = CIMultiDict({"Host": "pep.test", **{k.replace("_", "-"): v for k, v in fields.items()}})
    length = len(body) if body else None
    return RequestFacts(method, target, headers, scheme, length, bool(body), "rid-1")


async def run(f: RequestFacts, steps: Steps | None = None) -> tuple[Admission | Refusal, Steps]:
    steps = steps or Steps()
    return await admit(f, setup(), steps.identify, steps.read_body), steps


# --- the target ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        ("/a/b?x=1", "pep.test", ("/a/b", "x=1")),
        ("http://api.example.com/a?b", "api.example.com", ("/a", "b")),
        ("http://api.example.com:80/a", "API.example.com", ("/a", "")),
        ("http://api.example.com", "api.example.com:80", ("/", "")),
        ("http://api.example.com/a", "other.example", Reason.REQUEST_AMBIGUOUS),
        ("http://api.example.com:8080/a", "api.example.com", Reason.REQUEST_AMBIGUOUS),
        ("/a#b", "pep.test", Reason.REQUEST_AMBIGUOUS),
        ("*", "pep.test", Reason.REQUEST_AMBIGUOUS),
        ("api.example.com/a", "api.example.com", Reason.REQUEST_AMBIGUOUS),
    ],
)
def test_a_target_splits_or_is_ambiguous(target: str, host: str, expected: object) -> None:
    found = split_target(facts(target, Host=host))
    if isinstance(expected, Reason):
        assert isinstance(found, Refusal)
        assert found.reason is expected
    else:
        assert found == expected


def test_default_ports_are_the_connection_scheme_s() -> None:
    """As aiohttp did: an absolute form's scheme is the caller's to write, the connection's is not."""
    assert split_target(facts("https://h/a", Host="h:80")) == ("/a", "")
    assert isinstance(split_target(facts("https://h/a", Host="h:443")), Refusal)
    assert split_target(facts("http://h/a", Host="h:443", scheme="https")) == ("/a", "")


def test_the_log_path_of_a_refused_request() -> None:
    assert target_path("GET", "/a/b?c#d") == "/a/b"
    assert target_path("GET", "http://h/x?y") == "/x"
    assert target_path("CONNECT", "h:443") == ""


# --- the order, and which steps run -------------------------------------------------------------------------------


async def test_an_admission_carries_the_check_and_what_forwarding_needs() -> None:
    found, steps = await run(facts("/tools/x?q=1", X_Request_ID="caller"))
    assert isinstance(found, Admission)
    assert (found.route.name, found.upstream_url, found.path, found.query) == (
        "tools",
        "http://up/api/x?q=1",
        "/tools/x",
        "q=1",
    )
    assert found.check.document["request"]["path"] == "/tools/x"
    assert found.check.document["request"]["body_bytes"] == 0
    assert found.check.document["subject"] == SUBJECT
    assert steps.identified == ["tools"]
    assert steps.read == []  # a plain route streams its body after the allow


async def test_refusals_before_routing_call_no_step() -> None:
    found, steps = await run(facts("/tools/../admin"))
    assert isinstance(found, Refusal)
    assert (found.reason, found.route) == (Reason.REQUEST_AMBIGUOUS, None)
    found, steps = await run(facts("/nowhere"))
    assert isinstance(found, Refusal)
    assert found.reason is Reason.NO_ROUTE
    assert steps.identified == []
    assert steps.read == []


async def test_an_announced_length_over_the_limit_is_refused_before_identity() -> None:
    found, steps = await run(facts("/mcp", "POST", CALL * 2, Content_Type="application/json"))
    assert isinstance(found, Refusal)
    assert (found.reason, found.route.name if found.route else None) == (Reason.BODY_TOO_LARGE, "mcp")
    assert steps.identified == []
    assert steps.read == []


async def test_an_identity_refusal_keeps_its_challenge() -> None:
    found, steps = await run(facts("/mcp", "POST", CALL), Steps(subject=invalid("bad signature")))
    assert isinstance(found, Refusal)
    assert found.reason is Reason.IDENTITY_INVALID
    assert found.challenge is not None
    assert "invalid_token" in found.challenge
    assert steps.read == []  # the body of an unidentified caller is never read


async def test_an_inspected_body_is_read_once_within_the_route_limit_and_bound_into_the_check() -> None:
    steps = Steps(body=CALL)
    found, _ = await run(facts("/mcp", "POST", CALL, Content_Type="application/json"), steps)
    assert isinstance(found, Admission)
    assert steps.read == [100]
    assert found.check.body == CALL
    assert found.check.document["mcp"]["name"] == "search"
    assert found.tokens is not None


async def test_a_body_the_reader_refuses_is_a_typed_refusal() -> None:
    steps = Steps(body=Refused(Reason.BODY_UNREADABLE, "body read deadline"))
    found, _ = await run(facts("/mcp", "POST", CALL, Content_Type="application/json"), steps)
    assert isinstance(found, Refusal)
    assert (found.reason, found.detail) == (Reason.BODY_UNREADABLE, "body read deadline")


async def test_an_encoded_body_is_refused_before_it_is_read() -> None:
    found, steps = await run(facts("/mcp", "POST", CALL, Content_Encoding="gzip"))
    assert isinstance(found, Refusal)
    assert found.reason is Reason.BODY_UNREADABLE
    assert steps.read == []


# --- CONNECT -------------------------------------------------------------------------------------------------------


async def test_connect_is_decided_on_its_authority() -> None:
    found, _ = await run(facts("api.example.com:443", "CONNECT", Host="api.example.com:443"))
    assert isinstance(found, Admission)
    assert (found.route.name, found.upstream_url) == ("tunnel", "api.example.com:443")
    assert found.check.document["request"]["path"] == ""
    found, _ = await run(facts("api.example.com:443", "CONNECT", Host="other:443"))
    assert isinstance(found, Refusal)
    assert found.reason is Reason.REQUEST_AMBIGUOUS
    found, _ = await run(facts("api.example.com:8443", "CONNECT", Host="api.example.com:8443"))
    assert isinstance(found, Refusal)
    assert found.reason is Reason.NO_ROUTE


class AllowingPdp(Pdp):
    remote = False

    def __init__(self, headers: tuple[tuple[str, str], ...]) -> None:
        self.headers = headers

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        return Verdict(True, Reason.ALLOWED, self.headers)

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(("headers", "reason"), [((("x-a", "1"),), Reason.OBLIGATION_UNSUPPORTED), ((), None)])
async def test_a_tunnel_allow_with_header_obligations_settles_as_a_denial(
    headers: tuple[tuple[str, str], ...], reason: Reason | None
) -> None:
    found, _ = await run(facts("api.example.com:443", "CONNECT", Host="api.example.com:443"))
    assert isinstance(found, Admission)
    engine = Engine(AllowingPdp(headers), PdpConfig(kind="cedar"), Metrics(("tunnel",)))
    decided = await engine.decide(found.check)
    assert isinstance(decided.decision, Allow)
    settled = found.settle(decided)
    if reason is None:
        assert settled is decided
    else:
        assert isinstance(settled.decision, Deny)
        assert settled.decision.reason is reason
