"""Every way a PDP can answer, misanswer or not answer: only an explicit, well-formed allow reaches the upstream.

Each case runs a fresh PEP against the byte-level fault PDP and a recording upstream, and checks the answer the
caller gets (status, headers, JSON body), what the PDP and the upstream received, the decision log line and the
metrics, against the README, "PDPs" (how an answer becomes a reason).
"""

from __future__ import annotations

import asyncio
import gzip
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningPep
from tests.support.fault_pdp import MODES, FaultPdp, Mode
from tests.support.observe import LOG_KEYS, metric
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]

HEX_ID = re.compile(r"[0-9a-f]{32}\Z")
PDP_OUTCOMES = ("ok", "error", "timeout", "unreachable")


@dataclass(frozen=True)
class Expect:
    """What one request in a mode must produce with the default `retries: 1`."""

    reason: str
    pdp_requests: int  # requests the fault PDP records
    attempts: int  # the decision log's `attempts`
    outcome: str  # the `pep_pdp_request_duration_seconds` label of every attempt


def _deny(reason: str, outcome: str, attempts: int = 1, pdp_requests: int | None = None) -> Expect:
    return Expect(reason, attempts if pdp_requests is None else pdp_requests, attempts, outcome)


# Every mode of the shared fault PDP that must deny, with its reason (README, "PDPs"), with retries: 1.
DENY_CASES: dict[str, Expect] = {
    # Well-formed answers that are not an allow.
    "deny": _deny("policy_denied", "ok"),
    "deny_object": _deny("policy_denied", "ok"),
    "slow_deny": _deny("policy_denied", "ok"),
    "undefined": _deny("pdp_undefined", "ok"),
    "undefined_allow": _deny("pdp_undefined", "ok"),
    # Allow-looking values of the wrong type.
    "string_true": _deny("pdp_malformed", "error"),
    "one": _deny("pdp_malformed", "error"),
    "allow_yes": _deny("pdp_malformed", "error"),
    "result_null": _deny("pdp_malformed", "error"),
    "result_list": _deny("pdp_malformed", "error"),
    # Non-2xx: never followed, never read as an allow; only 502/503/504 are retried.
    "status_400": _deny("pdp_error_status", "error"),
    "status_404": _deny("pdp_error_status", "error"),
    "status_500": _deny("pdp_error_status", "error"),
    "status_500_allow": _deny("pdp_error_status", "error"),
    "status_503": _deny("pdp_error_status", "error", attempts=2),
    "redirect": _deny("pdp_error_status", "error"),
    # 2xx, but not one valid JSON object with a JSON content type under max_response_bytes.
    "not_json": _deny("pdp_malformed", "error"),
    "html": _deny("pdp_malformed", "error"),
    "truncated": _deny("pdp_malformed", "error"),
    "array": _deny("pdp_malformed", "error"),
    "wrong_content_type": _deny("pdp_malformed", "error"),
    "no_content_type": _deny("pdp_malformed", "error"),
    "duplicate_keys": _deny("pdp_malformed", "error"),
    "duplicate_nested": _deny("pdp_malformed", "error"),
    "trailing_data": _deny("pdp_malformed", "error"),
    "huge": _deny("pdp_malformed", "error"),
    # The connection failed before a complete answer: retried once (a transport error).
    "short_body": _deny("pdp_unreachable", "unreachable", attempts=2),
    "close": _deny("pdp_unreachable", "unreachable", attempts=2),
    "reset": _deny("pdp_unreachable", "unreachable", attempts=2),
    "refuse": _deny("pdp_unreachable", "unreachable", attempts=2, pdp_requests=0),
    # The deadline passed first: a timeout is never retried.
    "hang": _deny("pdp_timeout", "timeout"),
}

ALLOW_MODES: tuple[str, ...] = ("allow", "allow_object", "allow_with_header", "slow_allow")


def _obligation(headers: Any) -> Mode:
    return Mode(body=orjson.dumps({"result": {"allow": True, "headers": headers}}))


# Local modes beyond the shared table: obligations the PEP must refuse, and more malformed shapes.
EXTRA_DENY: dict[str, tuple[Mode, Expect]] = {
    "obligation_connection": (_obligation({"connection": "x"}), _deny("obligation_unsupported", "ok")),
    "obligation_host": (_obligation({"host": "evil.example"}), _deny("obligation_unsupported", "ok")),
    "obligation_Host_mixed_case": (_obligation({"Host": "evil.example"}), _deny("obligation_unsupported", "ok")),
    "obligation_decision_id": (_obligation({"x-pep-decision-id": "forged"}), _deny("obligation_unsupported", "ok")),
    "obligation_transfer_encoding": (
        _obligation({"transfer-encoding": "chunked"}),
        _deny("obligation_unsupported", "ok"),
    ),
    "obligation_content_length": (_obligation({"content-length": "0"}), _deny("obligation_unsupported", "ok")),
    "obligation_request_id": (_obligation({"x-request-id": "forged"}), _deny("obligation_unsupported", "ok")),
    "obligation_forwarded_for": (_obligation({"x-forwarded-for": "10.0.0.1"}), _deny("obligation_unsupported", "ok")),
    "obligation_upgrade": (_obligation({"upgrade": "websocket"}), _deny("obligation_unsupported", "ok")),
    "obligation_bad_name": (_obligation({"x bad": "1"}), _deny("obligation_unsupported", "ok")),
    "obligation_crlf_value": (_obligation({"x-ok": "a\r\nx-evil: 1"}), _deny("obligation_unsupported", "ok")),
    "obligation_one_bad_of_two": (
        _obligation({"x-tenant": "acme", "connection": "close"}),
        _deny("obligation_unsupported", "ok"),
    ),
    "headers_not_object": (_obligation(["x-tenant"]), _deny("pdp_malformed", "error")),
    "header_value_not_string": (_obligation({"x-tenant": 1}), _deny("pdp_malformed", "error")),
    "status_204_empty": (Mode(status=204, body=b""), _deny("pdp_malformed", "error")),
    "status_502": (
        Mode(status=502, body=b"bad gateway", content_type="text/plain"),
        _deny("pdp_error_status", "error", 2),
    ),
    "status_504": (Mode(status=504, body=b'{"result":true}'), _deny("pdp_error_status", "error", 2)),
    "status_301_allow_body": (
        Mode(status=301, body=b'{"result":true}', extra_headers=(("Location", "/v1/data/allow"),)),
        _deny("pdp_error_status", "error"),
    ),
    # orjson alone would keep the last of these two keys ("result" spelled with an escape): true.
    "duplicate_escaped_key": (Mode(body=b'{"result":false,"\\u0072esult":true}'), _deny("pdp_malformed", "error")),
    "duplicate_key_in_headers": (
        Mode(body=b'{"result":{"allow":true,"headers":{"x-a":"1","x-a":"2"}}}'),
        _deny("pdp_malformed", "error"),
    ),
    # Content-Encoding the PEP never asked for: a small gzip body that inflates past max_response_bytes.
    "gzip_bomb": (
        Mode(
            body=gzip.compress(b'{"result":true,"pad":"' + b" " * (8 * 1024 * 1024) + b'"}'),
            extra_headers=(("Content-Encoding", "gzip"),),
        ),
        _deny("pdp_malformed", "error"),
    ),
    # A body that does not decode under its Content-Encoding is a malformed answer, not a transport error:
    # asked once. With a 503 status the status decides (retried, pdp_error_status).
    "gzip_corrupt": (
        Mode(body=b"\x1f\x8b\x08\x00not-gzip-at-all", extra_headers=(("Content-Encoding", "gzip"),)),
        _deny("pdp_malformed", "error"),
    ),
    "gzip_corrupt_503": (
        Mode(status=503, body=b"\x1f\x8b\x08\x00not-gzip", extra_headers=(("Content-Encoding", "gzip"),)),
        _deny("pdp_error_status", "error", 2),
    ),
    "allow_false_string": (Mode(body=b'{"result":{"allow":"false"}}'), _deny("pdp_malformed", "error")),
    "allow_null": (Mode(body=b'{"result":{"allow":null}}'), _deny("pdp_malformed", "error")),
    "not_utf8": (Mode(body=b'{"result":true,"x":"\xff"}'), _deny("pdp_malformed", "error")),
    "nan_constant": (Mode(body=b'{"result":true,"x":NaN}'), _deny("pdp_malformed", "error")),
    "empty_200": (Mode(body=b""), _deny("pdp_malformed", "error")),
    "problem_json_undefined": (Mode(body=b"{}", content_type="application/problem+json"), _deny("pdp_undefined", "ok")),
}


def all_deny_cases() -> dict[str, tuple[str | Mode, Expect]]:
    cases: dict[str, tuple[str | Mode, Expect]] = {name: (name, exp) for name, exp in DENY_CASES.items()}
    cases.update(EXTRA_DENY)
    return cases


DENY_ALL = all_deny_cases()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def scrape(session: aiohttp.ClientSession, pep: RunningPep) -> str:
    async with session.get(pep.admin_url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def total(text: str, name: str, **labels: str) -> float:
    """The sum over all samples of `name` whose labels include `labels`."""
    found = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                found += float(s.value)
    return found


def check_deny_answer(status: int, headers: Any, body: Any, reason: str, rid: str) -> None:
    assert status == 403
    assert headers["x-pep-decision"] == "deny"
    assert headers["x-pep-reason"] == reason
    assert headers["x-request-id"] == rid
    assert headers["content-type"].startswith("application/json")
    assert isinstance(body, dict)
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"code", "reason", "message", "request_id"}
    assert err["code"] == "access_denied"
    assert err["reason"] == reason
    assert err["request_id"] == rid
    assert isinstance(err["message"], str)
    assert err["message"]


def test_every_shared_mode_is_classified() -> None:
    """A new fault mode must be given its expected outcome here, so none goes untested."""
    assert set(DENY_CASES) | set(ALLOW_MODES) == set(MODES)
    assert not set(DENY_CASES) & set(ALLOW_MODES)
    assert not set(EXTRA_DENY) & set(MODES)


@pytest.mark.parametrize("case", sorted(DENY_ALL))
async def test_fault_mode_denies_and_nothing_reaches_upstream(
    case: str,
    make_pep: PepFactory,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    mode, expect = DENY_ALL[case]
    pep: RunningPep = await make_pep()
    await fault_pdp.apply(mode)
    rid = f"fault-{case}"
    async with client.get(pep.url + "/tools/search?q=1", headers={"x-request-id": rid}) as r:
        status, headers = r.status, r.headers
        body = orjson.loads(await r.read())
    check_deny_answer(status, headers, body, expect.reason, rid)
    assert upstream.seen == []

    # What the PDP was asked: exactly the expected number of attempts, each for this request.
    assert len(fault_pdp.requests) == expect.pdp_requests
    for seen in fault_pdp.requests:
        assert seen.path == "/v1/data/pep/authz"
        assert seen.headers["x-request-id"] == rid
        assert isinstance(seen.body, dict)
        assert seen.body["input"]["request"]["id"] == rid
        assert seen.body["input"]["request"]["path"] == "/tools/search"

    entries = await pep.log_entries()
    assert len(entries) == 1
    entry = entries[0]
    assert set(entry) >= LOG_KEYS
    assert entry["decision"] == "deny"
    assert entry["reason"] == expect.reason
    assert entry["request_id"] == rid
    assert entry["route"] == "tools"
    assert entry["method"] == "GET"
    assert entry["path"] == "/tools/search"
    assert entry["attempts"] == expect.attempts
    assert HEX_ID.match(entry["decision_id"])
    assert isinstance(entry["pdp_ms"], float | int)

    text = await scrape(client, pep)
    assert metric(text, "pep_decisions_total", route="tools", decision="deny", reason=expect.reason) == 1
    assert total(text, "pep_decisions_total") == 1
    assert metric(text, "pep_decisions_total", route="tools", decision="allow", reason="allowed") == 0
    for outcome in PDP_OUTCOMES:
        want = expect.attempts if outcome == expect.outcome else 0
        got = metric(text, "pep_pdp_request_duration_seconds_count", outcome=outcome)
        assert got == want, f"outcome={outcome}"
    assert metric(text, "pep_pdp_in_flight") == 0


@pytest.mark.parametrize("mode", ALLOW_MODES)
async def test_allow_mode_reaches_upstream_exactly_once(
    mode: str,
    pep: RunningPep,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    fault_pdp.set(mode)
    rid = f"allow-{mode}"
    payload = b'{"exact":"body bytes"}\n'
    async with client.post(
        pep.url + "/tools/items?a=1&b=2",
        data=payload,
        headers={"x-request-id": rid, "x-pep-decision-id": "forged-by-caller", "content-type": "application/json"},
    ) as r:
        assert r.status == 200
        assert r.headers.get("x-pep-decision") != "deny"
        await r.read()

    assert len(fault_pdp.requests) == 1
    assert len(upstream.seen) == 1
    got = upstream.seen[0]
    assert got.method == "POST"
    assert got.target == "/tools/items?a=1&b=2"
    assert got.body == payload
    assert got.headers["x-request-id"] == rid
    assert got.headers.getall("x-pep-decision-id") == [got.headers["x-pep-decision-id"]]
    if mode == "allow_with_header":
        assert got.headers.getall("x-tenant") == ["acme"]
    else:
        assert "x-tenant" not in got.headers

    entries = await pep.log_entries()
    assert len(entries) == 1
    entry = entries[0]
    assert set(entry) >= LOG_KEYS
    assert entry["decision"] == "allow"
    assert entry["reason"] == "allowed"
    assert entry["request_id"] == rid
    assert entry["attempts"] == 1
    assert got.headers["x-pep-decision-id"] == entry["decision_id"]
    assert got.headers["x-pep-decision-id"] != "forged-by-caller"

    text = await scrape(client, pep)
    assert metric(text, "pep_decisions_total", route="tools", decision="allow", reason="allowed") == 1
    assert total(text, "pep_decisions_total") == 1
    assert metric(text, "pep_pdp_request_duration_seconds_count", outcome="ok") == 1


async def test_generated_request_id_when_caller_sends_none(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    fault_pdp.set("status_500")
    async with client.get(pep.url + "/tools/x") as r:
        rid = r.headers["x-request-id"]
        body = orjson.loads(await r.read())
        check_deny_answer(r.status, r.headers, body, "pdp_error_status", rid)
    assert HEX_ID.match(rid)
    assert fault_pdp.requests[0].headers["x-request-id"] == rid
    entries = await pep.log_entries()
    assert [e["request_id"] for e in entries] == [rid]
    assert upstream.seen == []


@pytest.mark.parametrize("retries", [0, 1, 2])
@pytest.mark.parametrize("mode", ["status_503", "close", "reset", "short_body", "refuse"])
async def test_retryable_failures_are_retried_within_budget(
    mode: str,
    retries: int,
    make_pep: PepFactory,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    def cfg(raw: dict[str, Any]) -> None:
        raw["pdp"]["retries"] = retries
        raw["pdp"]["timeout_ms"] = 2000

    pep: RunningPep = await make_pep(cfg)
    await fault_pdp.apply(mode)
    async with client.get(pep.url + "/tools/r") as r:
        assert r.status == 403
        reason = r.headers["x-pep-reason"]
    assert reason == DENY_CASES[mode].reason
    assert len(fault_pdp.requests) == (0 if mode == "refuse" else retries + 1)
    (entry,) = await pep.log_entries()
    assert entry["attempts"] == retries + 1
    text = await scrape(client, pep)
    assert metric(text, "pep_pdp_request_duration_seconds_count", outcome=DENY_CASES[mode].outcome) == retries + 1
    assert upstream.seen == []


@pytest.mark.parametrize(
    "mode", ["status_400", "status_404", "status_500", "redirect", "not_json", "huge", "deny", "undefined", "hang"]
)
async def test_non_retryable_answers_are_asked_once(
    mode: str,
    make_pep: PepFactory,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    def cfg(raw: dict[str, Any]) -> None:
        raw["pdp"]["retries"] = 3

    pep: RunningPep = await make_pep(cfg)
    fault_pdp.set(mode)
    async with client.get(pep.url + "/tools/once") as r:
        assert r.status == 403
        assert r.headers["x-pep-reason"] == DENY_CASES[mode].reason
    assert len(fault_pdp.requests) == 1
    (entry,) = await pep.log_entries()
    assert entry["attempts"] == 1
    assert upstream.seen == []


async def test_retry_after_503_can_still_allow(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """A retried attempt that allows is a real allow (attempts 2), and only it reaches the upstream."""
    fault_pdp.set("status_503")
    original = fault_pdp._act

    async def flip_after_first(writer: Any) -> bool:
        result = await original(writer)
        fault_pdp.set("allow")
        return result

    fault_pdp._act = flip_after_first  # type: ignore[method-assign]
    async with client.get(pep.url + "/tools/retry", headers={"x-request-id": "retry-then-allow"}) as r:
        assert r.status == 200
        await r.read()
    assert len(fault_pdp.requests) == 2
    (entry,) = await pep.log_entries()
    assert entry["decision"] == "allow"
    assert entry["attempts"] == 2
    assert len(upstream.seen) == 1
    assert upstream.seen[0].headers["x-pep-decision-id"] == entry["decision_id"]


@pytest.mark.parametrize(("size", "allowed"), [(64, True), (65, False)])
async def test_max_response_bytes_boundary(
    size: int,
    allowed: bool,
    make_pep: PepFactory,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    def cfg(raw: dict[str, Any]) -> None:
        raw["pdp"]["max_response_bytes"] = 64

    pep: RunningPep = await make_pep(cfg)
    prefix, suffix = b'{"result":true,"pad":"', b'"}'
    body = prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix
    assert len(body) == size
    fault_pdp.set(Mode(body=body))
    async with client.get(pep.url + "/tools/limit") as r:
        await r.read()
        if allowed:
            assert r.status == 200
        else:
            assert r.status == 403
            assert r.headers["x-pep-reason"] == "pdp_malformed"
    assert len(upstream.seen) == (1 if allowed else 0)


async def _body_chunks(total_bytes: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total_bytes:
        n = min(8192, total_bytes - sent)
        yield b"b" * n
        sent += n


@pytest.mark.parametrize("body_kind", ["small", "large", "chunked"])
@pytest.mark.parametrize("mode", ["deny", "undefined", "status_500", "not_json", "close", "hang", "refuse"])
async def test_denied_post_with_body_reaches_nobody_upstream(
    mode: str,
    body_kind: str,
    pep: RunningPep,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    await fault_pdp.apply(mode)
    data: Any
    if body_kind == "small":
        data = b'{"tool":"send_email","to":"everyone"}'
    elif body_kind == "large":
        data = b"z" * (512 * 1024)
    else:
        data = _body_chunks(200_000)
    async with client.post(
        pep.url + "/tools/send", data=data, headers={"x-request-id": f"post-{mode}-{body_kind}"}
    ) as r:
        body = orjson.loads(await r.read())
        check_deny_answer(r.status, r.headers, body, DENY_CASES[mode].reason, f"post-{mode}-{body_kind}")
    assert upstream.seen == []
    # The connection is still usable afterwards, and the PEP still answers.
    async with client.get(pep.url + "/tools/after") as r:
        assert r.status == 403
    assert upstream.seen == []


class PathPolicyPdp(FaultPdp):
    """Allows exactly the request paths in `allowed`, denies the rest (answers one request at a time)."""

    def __init__(self, allowed: frozenset[str]) -> None:
        super().__init__()
        self.allowed = allowed

    async def _act(self, writer: Any) -> bool:
        doc = self.requests[-1].body
        path = doc["input"]["request"]["path"] if isinstance(doc, dict) else None
        self.mode = MODES["allow"] if path in self.allowed else MODES["deny"]
        return await super()._act(writer)


SMUGGLED = b"GET /tools/smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked", "body-after-deny"])
async def test_denied_body_is_never_read_as_another_request(
    framing: str, make_pep: PepFactory, upstream: RecordingUpstream
) -> None:
    """The body of a denied POST, unread by the PEP, holds a request that policy would allow: it must stay a
    body (drained or the connection closed), never be parsed and forwarded as a request of its own."""
    policy = PathPolicyPdp(frozenset({"/tools/smuggled"}))
    await policy.start()
    try:

        def mutate(raw: dict[str, Any]) -> None:
            raw["pdp"]["url"] = policy.url

        pep: RunningPep = await make_pep(mutate)
        reader, writer = await asyncio.open_connection("127.0.0.1", pep.port)
        try:
            # Not a form (a form body is read before the decision): this body is left unread by a denial.
            head = "POST /tools/outer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            if framing == "chunked":
                raw = (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
                raw += f"{len(SMUGGLED):x}\r\n".encode() + SMUGGLED + b"\r\n0\r\n\r\n"
                writer.write(raw)
            else:
                writer.write((head + f"Content-Length: {len(SMUGGLED)}\r\n\r\n").encode())
                if framing == "content-length":
                    writer.write(SMUGGLED)
            await writer.drain()
            async with asyncio.timeout(5):
                status_line = await reader.readline()
            assert status_line.startswith(b"HTTP/1.1 403 ")
            if framing == "body-after-deny":
                writer.write(SMUGGLED)
                await writer.drain()
            # Whatever else comes back on this connection within a moment (nothing, or the connection closing).
            try:
                async with asyncio.timeout(0.5):
                    rest = await reader.read(65536)
                    while rest:
                        assert b"HTTP/1.1 200" not in rest
                        rest = await reader.read(65536)
            except TimeoutError:
                pass
        finally:
            writer.close()
        assert [json_path(s.body) for s in policy.requests] == ["/tools/outer"]
        assert upstream.seen == []

        # Control: the same bytes sent as a request of their own are allowed and forwarded.
        reader, writer = await asyncio.open_connection("127.0.0.1", pep.port)
        try:
            writer.write(SMUGGLED)
            await writer.drain()
            async with asyncio.timeout(5):
                assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()
        assert [s.target for s in upstream.seen] == ["/tools/smuggled"]
    finally:
        await policy.stop()


def json_path(body: Any) -> Any:
    return body["input"]["request"]["path"] if isinstance(body, dict) else body
