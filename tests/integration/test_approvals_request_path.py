"""Approvals on the request path, through a running PEP against the real OpenID Provider (tests/support/op.py):
a request the PDP says needs a person is forwarded only after the person approved and the PDP, asked again with
the approval in its input, allowed it; every other ending (declined, nobody answered, the OP down, a bad ticket)
is a denial with nothing forwarded."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.authzen_pdp import AuthzenTestPdp
from tests.support.observe import metric as metric_value
from tests.support.op import OpenIdProvider, approvals_section
from tests.support.policy_pdp import PolicyPdp
from tests.support.process import cedar_config, ensure_stopped, read_line, start_pep
from tests.support.token_upstream import TokenCheckingUpstream
from tests.support.upstream import RecordingUpstream

TICKET = "x-pep-approval-ticket"
BODY = b'{"order": "A-1", "amount": 500}'


class RefundPolicy(PolicyPdp):
    """Refunds need alice's approval; with an approval in the input they are allowed. Everything else: allow."""

    def decide(self, doc: dict[str, Any]) -> Any:
        if doc["route"]["name"] not in ("refunds", "models", "payouts"):
            return True
        if doc.get("approval", {}).get("approver") == "alice" and self.after_approval != "again":
            return {"allow": True} if self.after_approval == "allow" else {"allow": "yes"}
        return {"allow": False, "approval": {"approver": "alice", "message": "Refund over 100"}}

    after_approval = "allow"  # "malformed": a broken answer the second time; "again": asks for approval again


@pytest.fixture
async def pdp() -> AsyncIterator[RefundPolicy]:
    policy = RefundPolicy()
    await policy.start()
    yield policy
    await policy.stop()


@pytest.fixture
async def start(
    tmp_path: Path, op: OpenIdProvider, pdp: RefundPolicy, upstream: RecordingUpstream
) -> AsyncIterator[Any]:
    """`await start(mode, hold_ms=..., **approvals)`: a PEP with a `refunds` route in that approval mode."""

    def build(mode: str, hold_ms: int | None, more: dict[str, Any], pdp_section: dict[str, Any] | None) -> Any:
        def config(log: Path) -> dict[str, Any]:
            cfg = base_config(pdp.url, upstream.url, log)
            if pdp_section is not None:
                cfg["pdp"] = pdp_section
            approval: dict[str, Any] = {"mode": mode}
            if hold_ms is not None:
                approval["hold_ms"] = hold_ms
            cfg["routes"].insert(
                0,
                {
                    "name": "refunds",
                    "match": {"path_prefix": "/refunds"},
                    "upstream": upstream.url,
                    "max_body_bytes": 65536,
                    "approval": approval,
                },
            )
            cfg["routes"].insert(
                0,
                {
                    "name": "models",
                    "match": {"path_prefix": "/v1"},
                    "upstream": upstream.url,
                    "protocol": "openai",
                    "max_body_bytes": 65536,
                    "approval": approval,
                },
            )
            cfg["approvals"] = approvals_section(op, tmp_path, **more)
            return cfg

        return config

    starters: list[PepStarter] = []

    async def go(
        mode: str, hold_ms: int | None = None, pdp_section: dict[str, Any] | None = None, **more: Any
    ) -> RunningPep:
        work = tmp_path / f"pep-{len(starters)}"
        work.mkdir()
        starter = PepStarter(work, build(mode, hold_ms, more, pdp_section), "approvals.yaml")
        starters.append(starter)
        running: RunningPep = await starter()
        return running

    yield go
    for starter in starters:
        await starter.close()


async def post(
    pep: RunningPep, body: bytes = BODY, agent: str = "agent-7", ticket: str | None = None, path: str = "/refunds/1"
) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = {"content-type": "application/json", "x-agent-id": agent}
    if ticket is not None:
        headers[TICKET] = ticket
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
        s.post(pep.url + path, data=body, headers=headers) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, orjson.loads(await r.read())


async def metric(pep: RunningPep, name: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(pep.admin_url + "/metrics") as r:
        text = await r.text()
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            found[labels[len(name) :]] = float(value)
    return found


# --- hold mode ---------------------------------------------------------------------------------------------------


async def test_hold_forwards_once_after_the_person_approves_with_the_approval_in_the_second_input(
    start: Any, op: OpenIdProvider, pdp: RefundPolicy, upstream: RecordingUpstream
) -> None:
    pep = await start("hold", hold_ms=5000)
    waiting = asyncio.create_task(post(pep))
    seen = await op.wait_ciba()
    assert seen["login_hint"] == "alice"
    assert seen["binding_message"].startswith("Refund over 100 #")
    await asyncio.sleep(0.2)
    assert upstream.seen == []  # nothing forwarded while the person has not answered
    await op.approve(seen["auth_req_id"])
    status, _, _ = await waiting
    assert status == 200
    assert [(u.method, u.target, u.body) for u in upstream.seen] == [("POST", "/refunds/1", BODY)]
    assert [d.get("approval") is None for d in pdp.inputs] == [True, False]
    approval = pdp.inputs[1]["approval"]
    assert approval["approver"] == "alice"
    assert set(approval) == {"approver", "approved_at", "id"}
    entries = await pep.log_entries()
    assert [(e["decision"], e["reason"]) for e in entries] == [("allow", "allowed")]
    assert entries[0]["approval"]["id"] == approval["id"]
    assert entries[0]["attempts"] == 2
    counted = await metric(pep, "pep_approvals_total")
    assert counted['{result="requested"}'] == 1
    assert counted['{result="granted"}'] == 1


def authzen_refunds(request: dict[str, Any]) -> Any:
    """An AuthZEN PDP's requestable denial (the Access Request and Approval Profile) for the refunds route."""
    if request["resource"]["properties"].get("route") != "refunds":
        return {"decision": True}
    if (request.get("context") or {}).get("approval", {}).get("approver") == "alice":
        return {"decision": True}
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 600))
    access_request = {"approver": "alice", "expires_at": expires, "display": {"description": "Refund over 100"}}
    return {"decision": False, "context": {"access_request": access_request}}


async def test_an_authzen_requestable_denial_is_approved_and_asked_again_with_context_approval(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream
) -> None:
    az = AuthzenTestPdp(decide=authzen_refunds)
    await az.start()
    try:
        pep = await start("hold", hold_ms=5000, pdp_section={"kind": "authzen", "url": az.url, "timeout_ms": 500})
        waiting = asyncio.create_task(post(pep))
        seen = await op.wait_ciba()
        assert seen["binding_message"].startswith("Refund over 100 #")
        await op.approve(seen["auth_req_id"])
        assert (await waiting)[0] == 200
    finally:
        await az.stop()
    contexts = [e.body.get("context") or {} for e in az.evaluations]
    assert ["approval" in c for c in contexts] == [False, True]
    assert set(contexts[1]["approval"]) == {"approver", "approved_at", "id"}
    assert [u.body for u in upstream.seen] == [BODY]


@pytest.mark.parametrize(("second", "reason"), [("malformed", "pdp_malformed"), ("again", "policy_denied")])
async def test_an_approval_is_not_an_allow_the_second_answer_decides(
    start: Any, op: OpenIdProvider, pdp: RefundPolicy, upstream: RecordingUpstream, second: str, reason: str
) -> None:
    pdp.after_approval = second
    pep = await start("hold", hold_ms=5000)
    waiting = asyncio.create_task(post(pep))
    await op.approve((await op.wait_ciba())["auth_req_id"])
    status, headers, _ = await waiting
    assert (status, headers["x-pep-reason"]) == (403, reason)
    assert [d.get("approval") is None for d in pdp.inputs] == [True, False]
    assert len(await op.ciba_requests()) == 1  # never a second round
    assert upstream.seen == []
    entry = (await pep.log_entries())[-1]
    assert (entry["reason"], entry["approval"]["result"]) == (reason, "granted")


@pytest.mark.parametrize("answer", ["deny", "nobody"])
async def test_hold_declined_or_unanswered_is_denied_and_nothing_is_forwarded(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream, answer: str
) -> None:
    pep = await start("hold", hold_ms=1500 if answer == "nobody" else 8000)  # room for a loaded machine
    waiting = asyncio.create_task(post(pep))
    seen = await op.wait_ciba()
    if answer == "deny":
        await op.deny(seen["auth_req_id"])
    status, headers, body = await waiting
    reason = "approval_denied" if answer == "deny" else "approval_timeout"
    assert (status, headers["x-pep-reason"], body["error"]["reason"]) == (403, reason, reason)
    assert "approval" not in body["error"]
    assert upstream.seen == []
    assert [e["reason"] for e in await pep.log_entries()] == [reason]


@pytest.mark.parametrize("fault", ["stopped", "frozen", "status", "malformed"])
async def test_hold_with_the_op_down_is_approval_unavailable(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream, fault: str
) -> None:
    pep = await start("hold", hold_ms=3000)
    if fault == "stopped":
        await op.stop()
    elif fault == "frozen":
        op.freeze()
    elif fault == "status":
        await op.fault("status", status=503, body="down")
    else:
        await op.fault("malformed", body="{not json")
    try:
        status, headers, _ = await post(pep)
    finally:
        if fault == "frozen":
            op.resume()
    assert (status, headers["x-pep-reason"]) == (403, "approval_unavailable")
    assert upstream.seen == []
    assert (await metric(pep, "pep_approvals_total"))['{result="unavailable"}'] == 1


async def test_hold_refuses_past_max_held(start: Any, op: OpenIdProvider, upstream: RecordingUpstream) -> None:
    pep = await start("hold", hold_ms=3000, max_held=1)
    waiting = asyncio.create_task(post(pep))
    seen = await op.wait_ciba()
    status, headers, _ = await post(pep, body=b'{"order": "A-2"}')  # a second one while the first is held
    assert (status, headers["x-pep-reason"]) == (403, "approval_unavailable")
    assert await gauge(pep, "pep_approvals_held") == 1
    await op.approve(seen["auth_req_id"])
    assert (await waiting)[0] == 200
    assert [u.body for u in upstream.seen] == [BODY]
    assert len(await op.ciba_requests()) == 1  # the refused one never reached the OP


async def gauge(pep: RunningPep, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(pep.admin_url + "/metrics") as r:
        return metric_value(await r.text(), name)


async def test_the_op_circuit_opens_and_is_exported(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream
) -> None:
    breaker = {"failure_threshold": 1, "open_ms": 60000, "half_open_probes": 1}
    pep = await start("hold", hold_ms=3000, breaker=breaker)
    assert await gauge(pep, "pep_approvals_circuit_state") == 0
    await op.fault("status", status=500, body="boom")
    assert (await post(pep))[1]["x-pep-reason"] == "approval_unavailable"
    assert await gauge(pep, "pep_approvals_circuit_state") == 2
    await op.fault("none")
    before = (await op.stats())["paths"]
    assert before  # the first request did reach the OP
    assert (await post(pep))[1]["x-pep-reason"] == "approval_unavailable"  # the open circuit asks nobody
    assert (await op.stats())["paths"] == before
    assert upstream.seen == []


async def test_a_caller_who_leaves_while_held_gets_nothing_forwarded_even_once_approved(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream
) -> None:
    """The answer would reach nobody (an agent that left would retry and ask again): the hold ends with the
    connection, and a late approval forwards nothing."""
    pep = await start("hold", hold_ms=6000)
    leaving = asyncio.create_task(post(pep))
    seen = await op.wait_ciba()
    assert await gauge(pep, "pep_approvals_held") == 1
    leaving.cancel()  # the client closes its connection
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    for _ in range(100):
        if await gauge(pep, "pep_approvals_held") == 0:
            break
        await asyncio.sleep(0.02)
    assert await gauge(pep, "pep_approvals_held") == 0
    await op.approve(seen["auth_req_id"])
    await asyncio.sleep(0.5)
    assert upstream.seen == []


def rewrite(source: Path, **sections: dict[str, Any]) -> None:
    raw = yaml.safe_load(source.read_text())
    for name, changes in sections.items():
        raw[name].update(changes)
    source.write_text(yaml.safe_dump(raw))


async def test_a_request_held_across_a_reload_finishes_on_its_own_config(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream
) -> None:
    """A reload that replaces the approval engine (and the PDP client) while a request is held: the held request
    keeps the runtime it started with until it is done, so the approval still counts (nothing is cut short)."""
    pep = await start("hold", hold_ms=6000)
    waiting = asyncio.create_task(post(pep))
    seen = await op.wait_ciba()
    rewrite(Path(pep.server.config.source), approvals={"timeout_ms": 700}, pdp={"timeout_ms": 300})
    assert await pep.server.reload_config("test")
    await asyncio.sleep(2.0)  # longer than the old PDP deadline plus a second
    await op.approve(seen["auth_req_id"])
    assert (await waiting)[0] == 200
    assert len(upstream.seen) == 1


# --- approval, then a just-in-time credential ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("broker", ["up", "stopped"])
async def test_a_credential_is_obtained_only_after_the_allow_that_followed_the_approval(
    tmp_path: Path, op: OpenIdProvider, pdp: RefundPolicy, broker: str
) -> None:
    """A route needing both: no token is asked for while the person has not answered; after the approval and
    the PDP's second allow, a fresh client-credentials token from the real OP is the only credential the upstream
    sees (it verifies it against the OP's keys). The broker down at that moment: credential_unavailable, the
    approval spent, nothing forwarded."""
    crm = TokenCheckingUpstream(jwks_uri=op.jwks_uri, issuer=op.issuer, audience="crm", scope="crm.read")
    await crm.start()
    token_endpoint = op.token_endpoint if broker == "up" else f"http://127.0.0.1:{free_port()}/token"
    credential = {
        "kind": "client_credentials",
        "resource": "https://crm.example/api",
        "scopes": ["crm.read"],
        "token_endpoint": token_endpoint,
        "client_id": "pep",
        "client_secret_file": str(op.clients["pep"].secret_file),
        "timeout_ms": 500,
    }

    def config(log: Path) -> dict[str, Any]:
        cfg = base_config(pdp.url, crm.url, log)
        route = {"name": "payouts", "match": {"path_prefix": "/payouts"}, "upstream": crm.url, "max_body_bytes": 4096}
        cfg["routes"].insert(0, {**route, "credential": credential, "approval": {"mode": "hold", "hold_ms": 8000}})
        cfg["approvals"] = approvals_section(op, tmp_path)
        return cfg

    starter = PepStarter(tmp_path, config, "payouts.yaml")
    try:
        pep = await starter()
        waiting = asyncio.create_task(post(pep, path="/payouts/1"))
        seen = await op.wait_ciba()
        await asyncio.sleep(0.2)
        assert (await op.stats())["grants"].get("client_credentials", 0) == 0  # nothing fetched before approval
        await op.approve(seen["auth_req_id"])
        status, headers, _ = await waiting
        entry = (await pep.log_entries())[-1]
        grants = (await op.stats())["grants"].get("client_credentials", 0)
    finally:
        await starter.close()
        await crm.stop()
    assert entry["approval"]["result"] == "granted"
    if broker == "up":
        assert status == 200
        assert grants == 1
        [forwarded] = crm.seen
        assert forwarded.claims is not None, forwarded.problem
        assert (forwarded.claims["aud"], forwarded.claims["scope"]) == ("crm", "crm.read")
        assert entry["reason"] == "allowed"
    else:
        assert (status, headers["x-pep-reason"], entry["reason"]) == (
            403,
            "credential_unavailable",
            "credential_unavailable",
        )
        assert crm.seen == []
    assert [d.get("approval") is None for d in pdp.inputs] == [True, False]


# --- ticket mode -------------------------------------------------------------------------------------------------


async def test_ticket_retry_after_approval_is_forwarded_once_and_the_ticket_never_reaches_anyone(
    start: Any, op: OpenIdProvider, pdp: RefundPolicy, upstream: RecordingUpstream
) -> None:
    pep = await start("ticket")
    status, headers, body = await post(pep)
    assert (status, headers["x-pep-reason"]) == (403, "approval_required")
    pending = body["error"]["approval"]
    ticket = pending["ticket"]
    assert int(headers.get("retry-after", 0)) >= 1, headers
    assert pending["code"] in (await op.wait_ciba())["binding_message"]
    # Not yet approved: the same answer again, nothing forwarded.
    status, headers, body = await post(pep, ticket=ticket)
    assert (status, headers["x-pep-reason"], body["error"]["approval"]["ticket"]) == (403, "approval_required", ticket)
    await op.approve((await op.wait_ciba())["auth_req_id"])
    await asyncio.sleep(body["error"]["approval"]["retry_after_ms"] / 1000)  # as an agent waits for the next poll
    status, _, _ = await post(pep, ticket=ticket)
    assert status == 200
    assert len(upstream.seen) == 1
    forwarded = upstream.seen[0]
    assert TICKET not in forwarded.headers
    assert all(TICKET not in d["request"]["headers"] for d in pdp.inputs)
    assert pdp.inputs[-1]["approval"]["approver"] == "alice"
    # Used once: the same ticket again is approval_invalid, nothing more forwarded.
    status, headers, _ = await post(pep, ticket=ticket)
    assert (status, headers["x-pep-reason"]) == (403, "approval_invalid")
    assert len(upstream.seen) == 1
    log = (await pep.log_entries())[-1]
    assert log["reason"] == "approval_invalid"
    assert ticket not in pep.log_path.read_text()


@pytest.mark.parametrize("other", ["body", "caller", "path", "forged", "two"])
async def test_a_ticket_with_another_request_or_caller_or_forged_is_approval_invalid(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream, other: str
) -> None:
    pep = await start("ticket")
    _, _, body = await post(pep)
    ticket = body["error"]["approval"]["ticket"]
    await op.approve((await op.wait_ciba())["auth_req_id"])
    if other == "body":
        answer = await post(pep, body=b'{"order": "A-1", "amount": 5000}', ticket=ticket)
    elif other == "caller":
        answer = await post(pep, agent="agent-8", ticket=ticket)
    elif other == "path":
        answer = await post(pep, ticket=ticket, path="/refunds/2")
    elif other == "forged":
        answer = await post(pep, ticket=ticket[:-4] + ("AAAA" if not ticket.endswith("AAAA") else "BBBB"))
    else:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                pep.url + "/refunds/1",
                data=BODY,
                headers=[
                    ("content-type", "application/json"),
                    ("x-agent-id", "agent-7"),
                    (TICKET, ticket),
                    (TICKET, ticket),
                ],
            ) as r,
        ):
            answer = (r.status, dict(r.headers), {})
    assert (answer[0], answer[1]["x-pep-reason"]) == (403, "approval_invalid")
    assert upstream.seen == []
    # The approval was not spent on the wrong request: the right one still goes through, once.
    assert (await post(pep, ticket=ticket))[0] == 200
    assert len(upstream.seen) == 1


async def test_an_expired_ticket_is_denied(start: Any, op: OpenIdProvider, upstream: RecordingUpstream) -> None:
    pep = await start("ticket", requested_expiry_ms=1000)
    _, _, body = await post(pep)
    ticket = body["error"]["approval"]["ticket"]
    await asyncio.sleep(1.3)
    status, headers, _ = await post(pep, ticket=ticket)
    assert (status, headers["x-pep-reason"]) == (403, "approval_invalid")
    assert upstream.seen == []


async def test_a_declined_ticket_is_denied(start: Any, op: OpenIdProvider, upstream: RecordingUpstream) -> None:
    """With the default expiry: a 1 s one (as above) can run out under load before the decline is read, and the
    answer is then `approval_timeout`, a denial too but not the one this test is about."""
    pep = await start("ticket")
    _, _, body = await post(pep, body=b'{"order": "A-3"}')
    await op.deny((await op.wait_ciba(1))["auth_req_id"])
    status, headers, _ = await post(pep, body=b'{"order": "A-3"}', ticket=body["error"]["approval"]["ticket"])
    assert (status, headers["x-pep-reason"]) == (403, "approval_denied")
    assert upstream.seen == []


async def test_a_ticket_works_after_a_restart_with_the_same_key_file(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream
) -> None:
    first = await start("ticket")
    _, _, body = await post(first)
    ticket = body["error"]["approval"]["ticket"]
    await first.server.stop()
    await op.approve((await op.wait_ciba())["auth_req_id"])
    second = await start("ticket")  # a new process state, the same ticket key file
    assert (await post(second, ticket=ticket))[0] == 200
    assert (await post(second, ticket=ticket))[1]["x-pep-reason"] == "approval_invalid"
    assert len(upstream.seen) == 1


async def test_a_retry_the_pdp_allows_outright_does_not_touch_the_ticket(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream
) -> None:
    pep = await start("ticket")
    status, _, _ = await post(pep, path="/tools/x", ticket="whatever")
    assert status == 200
    assert TICKET not in upstream.seen[0].headers
    assert await op.ciba_requests() == []


async def test_a_model_call_waiting_for_approval_gets_the_ticket_in_the_openai_error(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream
) -> None:
    pep = await start("ticket")
    chat = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "refund it"}]})
    status, headers, body = await post(pep, body=chat, path="/v1/chat/completions")
    assert (status, headers["x-pep-reason"], headers["x-should-retry"]) == (403, "approval_required", "false")
    assert body["error"]["code"] == "approval_required"
    ticket = body["error"]["approval"]["ticket"]
    await op.approve((await op.wait_ciba())["auth_req_id"])
    assert (await post(pep, body=chat, path="/v1/chat/completions", ticket=ticket))[0] == 200
    assert [u.target for u in upstream.seen] == ["/v1/chat/completions"]
    assert upstream.seen[0].body == chat


# --- workers -------------------------------------------------------------------------------------------------------

WORKERS_UP = re.compile(r"(\d+) workers on 127\.0\.0\.1:(\d+), admin on 127\.0\.0\.1:(\d+)")
APPROVAL_POLICY = """permit (principal, action == Action::"POST", resource);
@approval("alice")
forbid (principal, action == Action::"POST", resource) unless { context has approval };
"""
SPREAD = 12  # tickets issued and redeemed on fresh connections: the kernel spreads them over both workers


async def fresh_post(url: str, body: bytes, ticket: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json", **({TICKET: ticket} if ticket else {})}
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as s,
        s.post(url, data=body, headers=headers) as r,
    ):
        return r.status, orjson.loads(await r.read())


async def test_tickets_work_across_workers(tmp_path: Path, op: OpenIdProvider, upstream: RecordingUpstream) -> None:
    """`pep run` with `workers: 2`: a ticket sealed by one worker opens in the other (the shared key file); each
    worker both issues and redeems some, so some tickets cross (all of them on one worker: 1 in 2**11 runs)."""
    route = {
        "name": "refunds",
        "match": {"path_prefix": "/refunds"},
        "upstream": upstream.url,
        "max_body_bytes": 4096,
        "approval": {"mode": "ticket"},
    }
    path = cedar_config(tmp_path, upstream.url, APPROVAL_POLICY, workers=2, approvals=approvals_section(op, tmp_path))
    raw = yaml.safe_load(path.read_text())
    raw["routes"] = [route]
    path.write_text(yaml.safe_dump(raw))
    proc = await start_pep("run", "-c", str(path))
    try:
        assert proc.stderr is not None
        m = WORKERS_UP.search(await read_line(proc.stderr, "workers on", 30))
        assert m is not None
        url, admin = f"http://127.0.0.1:{m.group(2)}/refunds/x", f"http://127.0.0.1:{m.group(3)}"
        bodies = [orjson.dumps({"order": n}) for n in range(SPREAD)]
        tickets = []
        for body in bodies:
            status, answer = await fresh_post(url, body)
            assert (status, answer["error"]["reason"]) == (403, "approval_required")
            tickets.append(answer["error"]["approval"]["ticket"])
        for asked in await op.ciba_requests():
            await op.approve(asked["auth_req_id"])
        assert [(await fresh_post(url, b, t))[0] for b, t in zip(bodies, tickets, strict=True)] == [200] * SPREAD
        async with aiohttp.ClientSession() as s, s.get(admin + "/metrics") as r:
            text = await r.text()
        issued = [metric_value(text, "pep_approvals_total", result="requested", worker=w) for w in "01"]
        granted = [metric_value(text, "pep_approvals_total", result="granted", worker=w) for w in "01"]
        assert sum(issued) == sum(granted) == SPREAD
        assert min(issued) > 0, issued
        assert min(granted) > 0, granted
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
        await ensure_stopped(proc)
    assert sorted(u.body for u in upstream.seen) == sorted(bodies)


class DeskPolicy(PolicyPdp):
    """The approver depends on a header the binding does not cover: the EU desk needs bob, the rest alice. Any
    approval lifts the denial (the README's `unless { context has approval }` pattern)."""

    def decide(self, doc: dict[str, Any]) -> Any:
        if doc["route"]["name"] != "refunds" or doc.get("approval") is not None:
            return True
        approver = "bob" if doc["request"]["headers"].get("x-desk") == "eu" else "alice"
        return {"allow": False, "approval": {"approver": approver, "message": "Refund over 100"}}


async def test_a_ticket_approved_by_one_person_is_invalid_where_the_policy_now_names_another(
    start: Any, op: OpenIdProvider, pdp: RefundPolicy, upstream: RecordingUpstream, monkeypatch: Any
) -> None:
    monkeypatch.setattr(RefundPolicy, "decide", DeskPolicy.decide)
    pep = await start("ticket")
    _, _, body = await post(pep)  # no desk header: alice is asked
    ticket = body["error"]["approval"]["ticket"]
    asked = await op.wait_ciba()
    assert asked["login_hint"] == "alice"
    await op.approve(asked["auth_req_id"])
    headers = {"content-type": "application/json", "x-agent-id": "agent-7", "x-desk": "eu", TICKET: ticket}
    async with aiohttp.ClientSession() as s, s.post(pep.url + "/refunds/1", data=BODY, headers=headers) as r:
        status, reason = r.status, r.headers.get("x-pep-reason")
    # The policy names bob for this request: alice's approval is not his.
    assert (status, reason) == (403, "approval_invalid")
    assert upstream.seen == []
    assert [d.get("approval") for d in pdp.inputs] == [None, None]  # the PDP never saw alice's approval
    # Not spent on the wrong request: the request alice approved still goes through, once.
    assert (await post(pep, ticket=ticket))[0] == 200
    assert len(upstream.seen) == 1


async def test_retrying_without_the_ticket_does_not_ask_the_approver_again(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream
) -> None:
    """An agent that drops its ticket and sends the same call again (an SDK retry loop, or one hoping a tired
    person taps "approve" on the tenth prompt) gets the pending ticket back: one prompt per request."""
    pep = await start("ticket")
    tickets = set()
    for _ in range(5):
        status, headers, body = await post(pep)
        assert (status, headers["x-pep-reason"]) == (403, "approval_required")
        tickets.add(body["error"]["approval"]["ticket"])
    assert len(await op.ciba_requests()) == 1
    assert len(tickets) == 1
    # Another request is asked about on its own.
    await post(pep, body=b'{"order": "A-2", "amount": 500}')
    assert len(await op.ciba_requests()) == 2
    # Once the person's answer is read, the request is asked about afresh: declined is not pending.
    await op.deny((await op.wait_ciba())["auth_req_id"])
    assert (await post(pep, ticket=tickets.pop()))[1]["x-pep-reason"] == "approval_denied"
    status, headers, body = await post(pep)
    assert (status, headers["x-pep-reason"]) == (403, "approval_required")
    assert len(await op.ciba_requests()) == 3
    assert upstream.seen == []


async def test_one_caller_cannot_flood_the_approver_with_distinct_requests(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream
) -> None:
    """Varying the body makes every request a new one: past max_pending_per_caller, a caller's requests are
    refused at once, without a prompt, while others are still asked about."""
    pep = await start("ticket")  # max_pending_per_caller: 10 by default
    reasons = [(await post(pep, body=orjson.dumps({"order": n, "amount": 500})))[1]["x-pep-reason"] for n in range(12)]
    assert reasons == ["approval_required"] * 10 + ["approval_unavailable"] * 2
    assert len(await op.ciba_requests()) == 10
    assert (await post(pep, agent="agent-8"))[1]["x-pep-reason"] == "approval_required"
    assert len(await op.ciba_requests()) == 11
    # Once an answer is read, the caller has room again.
    _, _, first = await post(pep, body=orjson.dumps({"order": 0, "amount": 500}))
    await op.deny((await op.wait_ciba())["auth_req_id"])
    ticket = first["error"]["approval"]["ticket"]
    assert (await post(pep, body=orjson.dumps({"order": 0, "amount": 500}), ticket=ticket))[1]["x-pep-reason"] == (
        "approval_denied"
    )
    assert (await post(pep, body=b'{"order": 9}'))[1]["x-pep-reason"] == "approval_required"
    assert upstream.seen == []


async def test_an_agent_retrying_faster_than_the_interval_does_not_poll_the_op_faster(
    start: Any, op: OpenIdProvider, upstream: RecordingUpstream
) -> None:
    """CIBA's client (the PEP) must wait the interval between polls; an agent hammering its retry must not make
    the PEP poll faster (an OP answers that with slow_down, then may throttle the PEP's client for everyone)."""
    pep = await start("ticket", min_poll_interval_ms=3000)
    _, _, body = await post(pep)
    ticket = body["error"]["approval"]["ticket"]
    answers = [await post(pep, ticket=ticket) for _ in range(5)]
    assert {(a[0], a[1]["x-pep-reason"], a[2]["error"]["approval"]["ticket"]) for a in answers} == {
        (403, "approval_required", ticket)
    }
    assert all(int(a[1]["retry-after"]) >= 1 for a in answers)
    assert (await op.stats())["grants"].get("urn:openid:params:grant-type:ciba", 0) == 1
    assert upstream.seen == []
