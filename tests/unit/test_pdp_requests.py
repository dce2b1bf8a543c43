"""Building a decision request from caller data: what cannot be built is denied before anything is sent.

Each PDP client is pointed at a real loopback server that counts connections: a request the PEP cannot carry
(`request_ambiguous`: JSON cannot hold a lone surrogate, orjson no integer beyond 64 bits, an object key must be a
string) never reaches it, and a good request right after does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pep.decision import Reason
from pep.pdp import Failure, encode
from pep.pdp.authzen import AuthzenPdp
from pep.pdp.opa import OpaPdp
from pep.pdp.transport import HttpTransport
from pep.secret_file import FileSecret
from tests.support.authzen_pdp import AuthzenTestPdp
from tests.support.documents import pep_document
from tests.support.fault_pdp import FaultPdp

CANNOT_CARRY = [
    pytest.param({"claims": {"n": 2**64}}, id="integer-beyond-64-bits"),
    pytest.param({"claims": {"n": -(2**63) - 1}}, id="integer-below-64-bits"),
    pytest.param({"claims": {"dept": "\ud800"}}, id="lone-surrogate"),  # a JSON claim "\ud800", as json reads it
    pytest.param({"agent": "caf\udcff"}, id="header-byte-not-utf8"),  # as aiohttp hands such a byte over
    pytest.param({"attributes": {1: "x"}}, id="key-not-a-string"),
]


def with_subject(change: dict[str, Any]) -> dict[str, Any]:
    doc = pep_document()
    doc["subject"] = {**doc["subject"], **change}
    return doc


@pytest.mark.parametrize("change", CANNOT_CARRY)
def test_encode_refuses_what_json_cannot_carry(change: dict[str, Any]) -> None:
    body = encode({"input": with_subject(change)})
    assert isinstance(body, Failure)
    assert (body.reason, body.retryable) == (Reason.REQUEST_AMBIGUOUS, False)
    assert body.detail.startswith("the policy input cannot be sent")


@pytest.fixture
async def opa() -> AsyncIterator[FaultPdp]:
    pdp = FaultPdp()
    await pdp.start()
    yield pdp
    await pdp.stop()


@pytest.mark.parametrize("change", CANNOT_CARRY)
async def test_opa_sends_nothing_it_cannot_build(opa: FaultPdp, change: dict[str, Any]) -> None:
    client = OpaPdp(opa.url, HttpTransport(1 << 20, 4))
    try:
        refused = await client.ask(with_subject(change), "r-1")
        assert isinstance(refused, Failure)
        assert refused.reason is Reason.REQUEST_AMBIGUOUS
        assert opa.requests == []
        assert (await client.ask(pep_document(), "r-2")).reason is Reason.ALLOWED
        assert len(opa.requests) == 1
    finally:
        await client.close()


@pytest.fixture
async def az() -> AsyncIterator[AuthzenTestPdp]:
    pdp = AuthzenTestPdp()
    await pdp.start()
    yield pdp
    await pdp.stop()


@pytest.mark.parametrize("change", CANNOT_CARRY)
async def test_authzen_sends_nothing_it_cannot_build_not_even_discovery(
    az: AuthzenTestPdp, change: dict[str, Any]
) -> None:
    """The subject's properties carry the claims and attributes (the default mapping)."""
    client = AuthzenPdp(az.url, HttpTransport(1 << 20, 4))
    try:
        for ask in (client.ask(with_subject(change), "r-1"), client.ask_many([with_subject(change)] * 2, "r-1")):
            refused = await ask
            for result in refused if isinstance(refused, list) else [refused]:
                assert isinstance(result, Failure)
                assert result.reason is Reason.REQUEST_AMBIGUOUS
        assert az.seen == []  # neither discovery nor an evaluation
        assert (await client.ask(pep_document(), "r-2")).reason is Reason.ALLOWED
        assert len(az.evaluations) == 1
    finally:
        await client.close()


async def test_an_approval_document_that_cannot_be_carried_sends_nothing(opa: FaultPdp, az: AuthzenTestPdp) -> None:
    """The PDP asked again after a person approved: the approval (OPA `input.approval`, AuthZEN `context.approval`)
    is built into the request like the rest, so one JSON cannot carry is `request_ambiguous` and nothing is sent."""
    doc = pep_document()
    doc["approval"] = {"approver": "caf\udcff", "approved_at": "2026-01-01T00:00:00Z", "id": "a-1"}
    clients = [OpaPdp(opa.url, HttpTransport(1 << 20, 4)), AuthzenPdp(az.url, HttpTransport(1 << 20, 4))]
    try:
        for client in clients:
            for refused in [await client.ask(doc, "r-1"), *await client.ask_many([doc, doc], "r-2")]:
                assert isinstance(refused, Failure)
                assert refused.reason is Reason.REQUEST_AMBIGUOUS
        assert opa.requests == []
        assert az.seen == []
    finally:
        for client in clients:
            await client.close()


async def test_a_credential_that_cannot_be_framed_is_the_peps_problem(opa: FaultPdp, tmp_path: Any) -> None:
    """`pdp.auth.value_file` holding a character outside Latin-1: every request is denied `internal_error` (the
    operator's file, named in the detail), nothing is sent, and it is not the PDP's failure."""
    secret = tmp_path / "token"
    secret.write_text("t\u20acken\n", encoding="utf-8")
    client = OpaPdp(opa.url, HttpTransport(1 << 20, 4), FileSecret(str(secret), "Bearer {}"))
    try:
        result = await client.ask(pep_document(), "r-1")
        assert isinstance(result, Failure)
        assert result.reason is Reason.INTERNAL_ERROR
        assert "authorization" in result.detail.lower()
        await asyncio.sleep(0)
        assert opa.requests == []
    finally:
        await client.close()
