"""Header hygiene as a whole, for any caller headers and any route: what reaches the upstream (pep/upstream.py
`request_fields`, with an Allow from the real engine carrying PDP obligation headers) and what reaches the PDP (the
admission's `header_map(end_to_end(headers, route.policy_drop))`).

- Hop-by-hop headers and the headers the caller named in `Connection` never cross.
- PEP-owned headers (x-request-id, x-pep-decision-id, x-forwarded-*, forwarded, ...) never come from the caller:
  each one present is the PEP's own value, once.
- Caller credentials (authorization, cookie, proxy-authorization, the identity token header, the route's
  credential header) never reach the policy input, and reach the upstream only where the route keeps them; the
  route's credential header carries the PEP's value alone.
- Framing is the forwarder's: Content-Length is written by the pool for the body it sends (the caller's value
  for a streamed body, the decided bytes' length for an inspected one), never copied from the caller.
- Everything else the caller sent crosses unchanged and in order.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from fuzz.oracles import examples
from pep import attributes
from pep.config import BreakerConfig, Credential, PdpConfig, RouteConfig
from pep.decision import Allow, Reason
from pep.engine import Check, Engine
from pep.headers import CALLER_CREDENTIALS, HOP_BY_HOP, PEP_OWNED, end_to_end
from pep.metrics import Metrics
from pep.pdp import Failure, Pdp, Verdict
from pep.routing import Route
from pep.upstream import request_fields

PEER = "10.1.2.3"
NAMES = sorted(
    HOP_BY_HOP
    | PEP_OWNED
    | CALLER_CREDENTIALS
    | {"host", "content-length", "expect", "x-api-key", "x-token", "x-obligation", "x-a", "accept", "user-agent"}
)
OBLIGATION_NAMES = ["x-obligation", "x-a", "accept", "x-api-key"]


class AllowWith(Pdp):
    """A PDP that allows and asks for these obligation headers."""

    remote = True

    def __init__(self, headers: tuple[tuple[str, str], ...]) -> None:
        self.headers = headers

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        return Verdict(True, Reason.ALLOWED, self.headers)

    async def close(self) -> None:
        return None


@st.composite
def any_case(draw: st.DrawFn, names: list[str]) -> str:
    name = draw(st.sampled_from(names))
    upper = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if u else c for c, u in zip(name, upper, strict=True))


@st.composite
def caller_headers(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Pairs with values unique to the caller (`caller:N`), and Connection headers naming other headers."""
    pairs: list[tuple[str, str]] = []
    for i in range(draw(st.integers(0, 14))):
        name = draw(any_case(NAMES))
        if name.lower() == "host":
            pairs.append((name, f"host-{i}"))  # the PEP's x-forwarded-host is derived from it
        elif name.lower() == "connection":
            tokens = draw(st.lists(any_case(NAMES), max_size=3))
            pairs.append((name, ", ".join([*tokens, f"caller-{i}"])))
        else:
            pairs.append((name, f"caller:{i}:"))
    return pairs


async def decide_and_build(
    pairs: list[tuple[str, str]], route: Route, obligations: tuple[tuple[str, str], ...], credential: str | None
) -> tuple[Allow | None, CIMultiDict[str]]:
    config = PdpConfig(kind="opa", url="http://127.0.0.1:1/", breaker=BreakerConfig())
    engine = Engine(AllowWith(obligations), config, Metrics((route.name,)))
    check = Check({}, "rid-1", route.name, "POST", "http://up/x", route.obligation_forbidden)
    decision = (await engine.decide(check)).decision
    if not isinstance(decision, Allow):
        return None, CIMultiDict()
    cred = (route.config.credential.header, credential) if route.config.credential and credential else None
    fields = [(n.encode(), v.encode()) for n, v in pairs]
    host = CIMultiDict(pairs).get("Host")
    out = request_fields(fields, b"up", PEER, "http", host.encode() if host else None, decision, route, cred)
    return decision, CIMultiDict((n.decode(), v.decode()) for n, v in out)


@settings(max_examples=examples(150), deadline=None)
@given(
    pairs=caller_headers(),
    credential_header=st.sampled_from([None, "x-api-key", "authorization"]),
    token_header=st.sampled_from([None, "x-token"]),
    keep=st.booleans(),
    obligations=st.lists(st.tuples(st.sampled_from(OBLIGATION_NAMES), st.just("pdp")), max_size=2),
)
def test_what_crosses_to_the_upstream_and_to_the_pdp(
    pairs: list[tuple[str, str]],
    credential_header: str | None,
    token_header: str | None,
    keep: bool,
    obligations: list[tuple[str, str]],
) -> None:
    credential = Credential(header=credential_header, value_env="X") if credential_header else None
    cfg = RouteConfig(
        name="r", path_prefix="/", upstream="http://up/", keep_caller_credentials=keep, credential=credential
    )
    route = Route.build(cfg, token_header)
    sent = CIMultiDict(pairs)
    named = {t.strip().lower() for v in sent.getall("Connection", ()) for t in v.split(",") if t.strip()}
    credentials = set(CALLER_CREDENTIALS) | ({token_header} if token_header else set())
    secret = credentials | ({credential_header} if credential_header else set())

    # --- the policy input
    policy = attributes.header_map(end_to_end(sent, route.policy_drop))
    for name in policy:
        assert name == name.lower()
        assert name not in secret, (name, pairs)
        assert name not in HOP_BY_HOP | PEP_OWNED, (name, pairs)
        assert name not in named, (name, pairs)
    secret_values = {v for k, v in pairs if k.lower() in secret}
    assert not any(s in v for s in secret_values for v in policy.values()), (policy, pairs)

    # --- the upstream request
    allow, out = asyncio.run(decide_and_build(pairs, route, tuple(obligations), "pep-secret"))
    if allow is None:  # an obligation naming the credential header: denied (obligation_unsupported), nothing sent
        assert credential_header in {n for n, _ in obligations}
        return
    never_from_caller = HOP_BY_HOP | named | PEP_OWNED | {"host", "expect", "content-length"}
    assert out.getall("Host") == ["up"]  # the upstream's, never the caller's
    if not keep:
        never_from_caller |= credentials
    if credential_header:
        never_from_caller |= {credential_header}
    for name, value in out.items():
        lower = name.lower()
        assert lower not in HOP_BY_HOP, (name, pairs)
        assert not value.startswith("host-") or lower == "x-forwarded-host", (name, value)
        if value.startswith("caller:"):
            assert lower not in never_from_caller, (name, value, pairs)
            assert (name, value) in pairs
    for name in PEP_OWNED:
        values = out.getall(name, [])
        assert len(values) <= 1, (name, values)
        assert not any(v.startswith("caller") for v in values), (name, values, pairs)
    assert out.getall("x-request-id") == [allow.request_id]
    assert out.getall("x-pep-decision-id") == [allow.decision_id]
    assert out.getall("x-forwarded-for") == [PEER]
    assert out.getall("x-forwarded-host", []) == ([sent["Host"]] if "Host" in sent else [])
    if credential_header:
        assert out.getall(credential_header) == ["pep-secret"]
    overridden = {n for n, _ in obligations} | ({credential_header} if credential_header else set())
    for name in overridden - {credential_header}:
        assert out.getall(name) == ["pdp"]
    expected = [(k, v) for k, v in pairs if k.lower() not in never_from_caller | overridden]
    assert [(k, v) for k, v in out.items() if v.startswith("caller:")] == expected
