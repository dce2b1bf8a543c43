"""The pure parts of just-in-time credentials: the PDP's narrowing as OPA and AuthZEN send it, within the route's
maximum and never wider, and what a token answer must hold to be used."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pep.credentials_oauth import (
    ACCESS_TOKEN_TYPE,
    CredentialRefusal,
    OAuthCredentialConfig,
    Target,
    narrow,
    read_token,
)
from pep.decision import CredentialNarrowing, Reason
from pep.engine import combine
from pep.oauth.client_auth import ClientAuthConfig
from pep.oauth.endpoint import Reply
from pep.pdp import Failure, Verdict
from pep.pdp.authzen import parse_decision
from pep.pdp.opa import parse_answer
from pep.pdp.transport import RawAnswer

ROUTE = OAuthCredentialConfig(
    "token_exchange",
    "https://as/token",
    ClientAuthConfig("pep", "client_secret_basic", "/s"),
    audiences=("crm", "crm-admin"),
    resources=("https://crm.example/api",),
    scopes=("crm.read", "crm.write"),
)


def opa(result: Any) -> Verdict | Failure:
    return parse_answer(RawAnswer(200, "application/json", orjson.dumps({"result": result}), False))


def test_the_pdp_narrowing_from_opa_and_authzen() -> None:
    narrowing = {"audience": "crm", "scopes": ["crm.read"]}
    assert opa({"allow": True, "credential": narrowing}) == Verdict(
        True, Reason.ALLOWED, credential=CredentialNarrowing("crm", ("crm.read",))
    )
    with_headers = opa({"allow": True, "credential": {"scopes": []}, "headers": {"x-a": "1"}})
    assert with_headers == Verdict(True, Reason.ALLOWED, (("x-a", "1"),), credential=CredentialNarrowing(None, ()))
    assert parse_decision({"decision": True, "context": {"credential": narrowing}}) == Verdict(
        True, Reason.ALLOWED, credential=CredentialNarrowing("crm", ("crm.read",))
    )
    assert opa({"allow": False, "credential": "ignored on a deny"}) == Verdict(False, Reason.POLICY_DENIED)


@pytest.mark.parametrize(
    "credential",
    [
        "crm",
        [],
        {"audience": ""},
        {"audience": "a b"},
        {"audience": 5},
        {"scopes": "crm.read"},
        {"scopes": ["crm.read", "crm.read"]},
        {"scopes": ["crm read"]},
        {"scopes": [""]},
        {"scopes": [1]},
        {"scopes": ["s"] * 65},
        {"lifetime": 60},  # a condition the PEP would not carry out
    ],
)
def test_a_malformed_narrowing_is_pdp_malformed(credential: Any) -> None:
    for found in (
        opa({"allow": True, "credential": credential}),
        parse_decision({"decision": True, "context": {"credential": credential}}),
    ):
        assert isinstance(found, Failure), credential
        assert found.reason is Reason.PDP_MALFORMED


def test_narrowings_of_a_batch_must_agree() -> None:
    plain = Verdict(True, Reason.ALLOWED)
    read_only = Verdict(True, Reason.ALLOWED, credential=CredentialNarrowing(scopes=("crm.read",)))
    write_only = Verdict(True, Reason.ALLOWED, credential=CredentialNarrowing(scopes=("crm.write",)))
    assert combine([plain, read_only, plain]) == read_only
    disagree = combine([read_only, write_only])
    assert isinstance(disagree, Verdict)
    assert disagree.reason is Reason.OBLIGATION_UNSUPPORTED


def test_narrow_within_the_route_maximum() -> None:
    assert narrow(ROUTE, None) == Target("audience", "crm", ("crm.read", "crm.write"))
    assert narrow(ROUTE, CredentialNarrowing(scopes=("crm.write",))) == Target("audience", "crm", ("crm.write",))
    assert narrow(ROUTE, CredentialNarrowing("crm-admin")) == Target("audience", "crm-admin", ROUTE.scopes)
    by_resource = narrow(ROUTE, CredentialNarrowing("https://crm.example/api", ("crm.read",)))
    assert by_resource == Target("resource", "https://crm.example/api", ("crm.read",))
    only_resources = OAuthCredentialConfig(
        "client_credentials", "https://as/token", ROUTE.client, resources=("https://r",), scopes=()
    )
    assert narrow(only_resources, None) == Target("resource", "https://r", ())


@pytest.mark.parametrize(
    "narrowing",
    [
        CredentialNarrowing("payroll"),
        CredentialNarrowing(scopes=("crm.admin",)),
        CredentialNarrowing(scopes=("crm.read", "crm.admin")),
        CredentialNarrowing(scopes=()),  # no scope parameter would be the server's default, perhaps wider
    ],
)
def test_anything_wider_is_obligation_unsupported(narrowing: CredentialNarrowing) -> None:
    found = narrow(ROUTE, narrowing)
    assert isinstance(found, CredentialRefusal)
    assert found.reason is Reason.OBLIGATION_UNSUPPORTED


def test_a_narrowing_on_a_route_without_a_jit_credential_cannot_be_carried_out() -> None:
    found = narrow(None, CredentialNarrowing(scopes=("x",)))
    assert isinstance(found, CredentialRefusal)
    assert found.reason is Reason.OBLIGATION_UNSUPPORTED


TARGET = Target("audience", "crm", ("crm.read", "crm.write"))
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"access_token": "t0k", "token_type": "Bearer", "expires_in": 300}, ("Bearer t0k", 300)),
        ({"access_token": "t0k", "token_type": "bearer"}, ("Bearer t0k", None)),
        ({"access_token": "t0k", "token_type": "Bearer", "scope": "crm.read"}, ("Bearer t0k", None)),
        ({"access_token": "t", "token_type": "Bearer", "issued_token_type": ACCESS_TOKEN_TYPE}, ("Bearer t", None)),
        ({"token_type": "Bearer"}, "the token answer has no usable access_token"),
        ({"access_token": "", "token_type": "Bearer"}, "the token answer has no usable access_token"),
        ({"access_token": "a\r\nx-evil: 1", "token_type": "Bearer"}, "the token answer has no usable access_token"),
        ({"access_token": 5, "token_type": "Bearer"}, "the token answer has no usable access_token"),
        ({"access_token": "t"}, "the token answer's token_type is not Bearer"),
        ({"access_token": "t", "token_type": "N_A"}, "the token answer's token_type is not Bearer"),
        (
            {"access_token": "t", "token_type": "Bearer", "expires_in": 0},
            "the token answer's expires_in is not a positive integer",
        ),
        (
            {"access_token": "t", "token_type": "Bearer", "expires_in": 1.5},
            "the token answer's expires_in is not a positive integer",
        ),
        (
            {"access_token": "t", "token_type": "Bearer", "scope": "crm.admin"},
            "the server granted scopes wider than asked",
        ),
        (
            {"access_token": "t", "token_type": "Bearer", "scope": ["crm.read"]},
            "the token answer's scope is not a string",
        ),
        (
            {"access_token": "t", "token_type": "Bearer", "issued_token_type": ID_TOKEN_TYPE},
            "the exchange issued something other than an access token",
        ),
    ],
)
def test_read_token(body: dict[str, Any], expected: tuple[str, int | None] | str) -> None:
    assert read_token(Reply(200, body), "token_exchange", TARGET, ROUTE) == expected


async def test_the_allow_carries_the_narrowing_to_the_request_path() -> None:
    from pep.config import PdpConfig
    from pep.decision import Allow, Deny
    from pep.engine import Check, Engine
    from pep.metrics import Metrics
    from pep.pdp import Pdp
    from tests.support.documents import pep_document

    narrowing = CredentialNarrowing(scopes=("crm.read",))

    class Narrowing(Pdp):
        remote = True

        async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
            return Verdict(True, Reason.ALLOWED, credential=narrowing)

        async def close(self) -> None:
            return None

    engine = Engine(Narrowing(), PdpConfig(kind="opa", url="http://pdp"), Metrics(("r",)))
    check = Check(pep_document(), "rid", "r", "GET", "http://up/x", frozenset(), credential_narrowable=True)
    outcome = await engine.decide(check)
    assert isinstance(outcome.decision, Allow)
    assert outcome.decision.credential == narrowing
    plain_route = await engine.decide(Check(pep_document(), "rid", "r", "GET", "http://up/x", frozenset()))
    assert isinstance(plain_route.decision, Deny)
    assert plain_route.decision.reason is Reason.OBLIGATION_UNSUPPORTED
