"""Through a running PEP: a PDP's "approval required" on a route without `approval` (nobody to ask), an approval
malformed or joined to an allow, a credential narrowing the route cannot carry out, and a route whose token
endpoint cannot be reached all deny, and the upstream sees nothing. (Approvals that are asked for:
test_approvals_request_path.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import PepStarter, RunningPep
from tests.support.fault_pdp import FaultPdp, Mode
from tests.support.jwt_keys import claims, ec_key, write_jwks
from tests.support.upstream import RecordingUpstream

APPROVAL = b'{"result":{"allow":false,"approval":{"approver":"alice","message":"Refund over 100"}}}'


def mcp_route(upstream: RecordingUpstream) -> dict[str, Any]:
    return {
        "name": "mcp",
        "match": {"path_prefix": "/mcp"},
        "upstream": upstream.url,
        "protocol": "mcp",
        "deny_status": 200,
    }


CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "refund", "arguments": {"n": 500}}}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (APPROVAL, "approval_required"),
        (b'{"result":{"allow":true,"approval":{"approver":"alice"}}}', "pdp_malformed"),
        (b'{"result":{"allow":false,"approval":{"approver":"alice","quorum":2}}}', "pdp_malformed"),
        (b'{"result":{"allow":true,"credential":{"scopes":["crm.admin"],"lifetime":60}}}', "pdp_malformed"),
    ],
)
async def test_approvals_that_cannot_be_asked_for_deny_and_forward_nothing(
    make_pep: PepStarter, fault_pdp: FaultPdp, upstream: RecordingUpstream, body: bytes, reason: str
) -> None:
    pep: RunningPep = await make_pep(mutate=lambda c: c["routes"].append(mcp_route(upstream)))
    fault_pdp.set(Mode(body=body))
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    async with aiohttp.ClientSession() as s:
        async with s.post(pep.url + "/tools/refunds", data=b"{}") as r:
            assert r.status == 403
            assert r.headers["x-pep-reason"] == reason
        async with s.post(pep.url + "/mcp", data=orjson.dumps(CALL), headers=headers) as r:
            assert r.status == 200
            answer = orjson.loads(await r.read())
    assert answer["id"] == 7
    assert answer["error"]["data"]["reason"] == reason
    assert upstream.seen == []
    assert [e["reason"] for e in await pep.log_entries()] == [reason, reason]


async def test_a_credential_narrowing_the_route_cannot_carry_out_is_not_forwarded(
    make_pep: PepStarter, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep()
    fault_pdp.set(Mode(body=b'{"result":{"allow":true,"credential":{"scopes":["crm.read"]}}}'))
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x") as r:
        assert r.status == 403
        assert r.headers["x-pep-reason"] == "obligation_unsupported"
    assert upstream.seen == []


@pytest.mark.parametrize("kind", ["token_exchange", "client_credentials"])
async def test_a_jit_credential_route_whose_token_endpoint_is_unreachable_denies_credential_unavailable(
    make_pep: PepStarter, tmp_path: Path, upstream: RecordingUpstream, kind: str
) -> None:
    secret = tmp_path / "as-secret"
    secret.write_text("s3cret")
    credential: dict[str, Any] = {
        "kind": kind,
        "token_endpoint": "http://127.0.0.1:9/token",
        "client_id": "pep",
        "client_secret_file": str(secret),
        "audience": "crm",
        "scopes": ["crm.read"],
    }

    def mutate(c: dict[str, Any]) -> None:
        c["identity"]["jwt"] = {"issuers": ["https://id"], "audiences": ["pep"], "jwks_file": str(jwks)}
        c["routes"].append(
            {
                "name": "crm",
                "match": {"path_prefix": "/crm"},
                "upstream": upstream.url,
                "credential": credential,
                "require_identity": kind == "token_exchange",
            }
        )

    key = ec_key("k")
    jwks = write_jwks(tmp_path / "jwks.json", key)
    pep: RunningPep = await make_pep(mutate=mutate)
    token = key.sign(claims(iss="https://id", aud="pep", sub="alice"))
    async with aiohttp.ClientSession() as s:
        async with s.get(pep.url + "/crm/x", headers={"authorization": f"Bearer {token}"}) as r:
            assert r.status == 403
            assert r.headers["x-pep-reason"] == "credential_unavailable"
        async with s.get(pep.url + "/tools/x") as r:  # other routes are not affected
            assert r.status == 200
    assert [u.target for u in upstream.seen] == ["/tools/x"]
