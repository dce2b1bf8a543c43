"""`pep explain` (README, "Running"): the policy input a request would produce, the PDP's answer and the
decision, printed as JSON without forwarding anything. Exit 0 for allow, 1 for deny, 2 for a config or usage error.

`pep.cli.main` runs its own event loop, so it is called in a worker thread while the fault PDP serves on the
test's loop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from pep.cli import main
from tests.support.fault_pdp import FaultPdp

REPO = Path(__file__).resolve().parents[2]
POLICIES = """
permit(principal, action == Action::"GET", resource == Route::"tools");
permit(principal, action == Action::"tools/call", resource == Tool::"search");
"""
SEARCH = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search","arguments":{"q":"refunds"}}}'
SHELL = b'{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"shell","arguments":{"cmd":"ls"}}}'


def write_config(tmp_path: Path, pdp: dict[str, Any], **route_changes: Any) -> Path:
    config = {
        "version": 1,
        "listen": "127.0.0.1:8080",
        "identity": {
            "workload": "spiffe://test/agent",
            "agent_header": "x-agent-id",
            "attributes": {"tenant": "acme"},
        },
        "pdp": pdp,
        "decision_log": {"sink": "none"},
        "routes": [
            {
                "name": "tools",
                "match": {"path_prefix": "/tools"},
                "upstream": "http://127.0.0.1:9000/api/",
                "strip_prefix": True,
                **route_changes,
            },
            {
                "name": "mcp",
                "match": {"path_prefix": "/mcp"},
                "upstream": "http://127.0.0.1:9001/mcp",
                "strip_prefix": True,
                "protocol": "mcp",
                "max_body_bytes": 4096,
            },
        ],
    }
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def cedar_config(tmp_path: Path) -> Path:
    policies = tmp_path / "policies.cedar"
    policies.write_text(POLICIES)
    return write_config(tmp_path, {"kind": "cedar", "policies": str(policies)})


def opa_config(tmp_path: Path, pdp: FaultPdp, **pdp_changes: Any) -> Path:
    return write_config(tmp_path, {"kind": "opa", "url": pdp.url, "timeout_ms": 250, "retries": 1, **pdp_changes})


async def explain(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    code = await asyncio.to_thread(main, ["explain", "-c", str(config), *args])
    out, err = capsys.readouterr()
    return code, orjson.loads(out) if out else {}, out + err


# --- allow, deny, outage ---------------------------------------------------------------------------------------


async def test_a_cedar_allow_prints_the_document_the_answer_and_the_upstream_url(
    cedar_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, _ = await explain(
        capsys,
        cedar_config,
        "-H",
        "x-agent-id: bob",
        "-H",
        "x-request-id: req-1",
        "http://pep.local:8080/tools/search?q=1",
    )
    assert code == 0
    assert report["decision"] == "allow"
    assert report["reason"] == "allowed"
    assert report["upstream_url"] == "http://127.0.0.1:9000/api/search?q=1"
    doc = report["document"]
    assert doc["version"] == "pep/v1"
    assert doc["request"] | {"time": None} == {
        "id": "req-1",
        "time": None,
        "method": "GET",
        "scheme": "http",
        "host": "pep.local:8080",
        "path": "/tools/search",
        "query": {"q": ["1"]},
        "headers": {"x-agent-id": "bob", "host": "pep.local:8080"},
        "body_bytes": 0,
    }
    assert doc["route"]["upstream_url"] == report["upstream_url"]
    assert doc["subject"] == {"workload": "spiffe://test/agent", "agent": "bob", "attributes": {"tenant": "acme"}}
    assert "documents" not in report
    pdp = report["pdp"]
    assert pdp["kind"] == "cedar"
    assert pdp["policies"].endswith("policies.cedar")
    assert pdp["answer"]["allow"] is True
    assert pdp["attempts"] == 1
    assert isinstance(pdp["pdp_ms"], float)


async def test_a_policy_deny_exits_1(cedar_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report, _ = await explain(capsys, cedar_config, "-X", "DELETE", "/tools/search")
    assert code == 1
    assert report["decision"] == "deny"
    assert report["reason"] == "policy_denied"
    assert report["pdp"]["answer"] == {"allow": False, "reason": "policy_denied", "note": None}
    assert report["document"]["request"]["method"] == "DELETE"
    assert report["document"]["request"]["host"] == "127.0.0.1:8080"  # a bare path goes to the listener


async def test_the_opa_pdp_gets_exactly_the_printed_document(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    fault_pdp.set("allow_object")
    code, report, _ = await explain(capsys, opa_config(tmp_path, fault_pdp), "http://127.0.0.1:8080/tools/x")
    assert code == 0
    assert report["pdp"] | {"pdp_ms": None} == {
        "kind": "opa",
        "url": fault_pdp.url,
        "answer": {"allow": True, "reason": "allowed", "note": "ok"},
        "attempts": 1,
        "pdp_ms": None,
    }
    assert len(fault_pdp.requests) == 1
    assert fault_pdp.requests[0].body == {"input": report["document"]}


async def test_an_opa_deny_and_an_undefined_answer(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    config = opa_config(tmp_path, fault_pdp)
    fault_pdp.set("deny_object")
    code, report, _ = await explain(capsys, config, "/tools/x")
    assert (code, report["reason"], report["detail"]) == (1, "policy_denied", "tool not allowed")
    assert report["pdp"]["answer"] == {"allow": False, "reason": "policy_denied", "note": "tool not allowed"}
    fault_pdp.set("undefined")
    code, report, _ = await explain(capsys, config, "/tools/x")
    assert (code, report["reason"]) == (1, "pdp_undefined")


async def test_pdp_down_is_a_deny_after_the_retry(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    config = opa_config(tmp_path, fault_pdp)
    await fault_pdp.apply("refuse")
    code, report, _ = await explain(capsys, config, "/tools/x")
    assert code == 1
    assert report["decision"] == "deny"
    assert report["reason"] == "pdp_unreachable"
    answer = report["pdp"]["answer"]
    assert (answer["allow"], answer["reason"], answer["outcome"]) == (False, "pdp_unreachable", "unreachable")
    assert report["pdp"]["attempts"] == 2  # retries: 1
    assert report["document"]["route"]["name"] == "tools"


async def test_a_pdp_that_does_not_answer_in_time(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    fault_pdp.set("hang")
    fault_pdp.hang_limit = 1.0
    code, report, _ = await explain(capsys, opa_config(tmp_path, fault_pdp, timeout_ms=100), "/tools/x")
    assert (code, report["reason"]) == (1, "pdp_timeout")
    assert report["pdp"]["answer"]["reason"] == "pdp_timeout"


async def test_obligation_headers_are_listed_by_name_only(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    fault_pdp.set("allow_with_header")
    code, report, text = await explain(capsys, opa_config(tmp_path, fault_pdp), "/tools/x")
    assert code == 0
    assert report["pdp"]["answer"]["headers"] == ["x-tenant"]
    assert "acme" not in text.replace('"tenant": "acme"', "")  # the subject attribute is the only acme


# --- refusals before the PDP -----------------------------------------------------------------------------------


async def test_no_route_never_asks_the_pdp(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, _ = await explain(capsys, opa_config(tmp_path, fault_pdp), "http://127.0.0.1:8080/admin/users")
    assert code == 1
    assert report == {
        "document": None,
        "pdp": None,
        "decision": "deny",
        "reason": "no_route",
        "detail": "no route matches the path",
        "route": None,
        "upstream_url": None,
    }
    assert fault_pdp.requests == []


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("/tools/../admin", []),
        ("/tools/%2e%2e/admin", []),
        ("/tools/a%2fb", []),
        ("/tools/x#frag", []),
        ("/tools/x", ["X-HTTP-Method-Override: DELETE"]),
        ("/tools/x", ["x-agent-id: a", "x-agent-id: b"]),
        ("/tools//admin", []),
        ("//tools/admin", []),
        ("http://127.0.0.1:8080//tools/admin", []),
        ("/tools/x", ["X-Forwarded-Uri: /tools/admin"]),
        ("/tools/x", ["X-Envoy-Original-Path: /tools/admin"]),
        # An absolute URL is the request target: a Host naming another authority is ambiguous, as `pep run` says.
        ("http://127.0.0.1:18080/tools/x", ["Host: other.example:1234"]),
    ],
)
async def test_request_ambiguous_never_asks_the_pdp(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str], url: str, headers: list[str]
) -> None:
    args = [a for h in headers for a in ("-H", h)]
    code, report, _ = await explain(capsys, opa_config(tmp_path, fault_pdp), *args, url)
    assert code == 1
    assert (report["reason"], report["pdp"], report["document"]) == ("request_ambiguous", None, None)
    assert fault_pdp.requests == []


@pytest.mark.parametrize("url", ["/tools/admin;x", "/tools/admin%3Bx", "/tools;v=1/x"])
async def test_path_parameters_are_refused_after_routing(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """As `pep run`: the route decides whether `;` is accepted, so a refusal names it (or no route matches)."""
    code, report, _ = await explain(capsys, opa_config(tmp_path, fault_pdp), url)
    assert code == 1
    expected = ("no_route", None) if url.startswith("/tools;") else ("request_ambiguous", "tools")
    assert (report["reason"], report["route"]) == expected
    assert (report["pdp"], report["document"]) == (None, None)
    assert fault_pdp.requests == []


async def test_a_route_with_allow_path_parameters_decides_them(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    pdp = {"kind": "opa", "url": fault_pdp.url, "timeout_ms": 250, "retries": 1}
    config = write_config(tmp_path, pdp, allow_path_parameters=True)
    code, report, _ = await explain(capsys, config, "/tools/x;v=1/y")
    assert (code, report["decision"]) == (0, "allow")
    assert report["document"]["request"]["path"] == "/tools/x;v=1/y"
    assert report["upstream_url"] == "http://127.0.0.1:9000/api/x;v=1/y"
    code, report, _ = await explain(capsys, config, "/tools/..;/admin")
    assert (code, report["reason"]) == (1, "request_ambiguous")
    assert len(fault_pdp.requests) == 1


@pytest.mark.parametrize(
    ("args", "body"),
    [
        (["-X", "POST", "/tools/x?_method=DELETE"], None),
        (["-X", "POST", "/tools/x?a=1&%5Fmethod=PUT"], None),
        (["/tools/x"], b"a=1&_method=DELETE"),
        (["-H", "Content-Type: application/x-www-form-urlencoded", "/tools/x"], b".method=DELETE"),
    ],
)
async def test_a_method_override_field_on_a_post_is_ambiguous(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str], args: list[str], body: bytes | None
) -> None:
    if body is not None:
        (tmp_path / "form").write_bytes(body)
        args = ["--body", str(tmp_path / "form"), *args]
    code, report, _ = await explain(capsys, opa_config(tmp_path, fault_pdp), *args)
    assert (code, report["reason"], report["pdp"]) == (1, "request_ambiguous", None)
    assert "method-override field" in report["detail"]
    assert fault_pdp.requests == []


async def test_a_form_body_is_decided_as_read_and_bounded(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    config = opa_config(tmp_path, fault_pdp)
    (tmp_path / "form").write_bytes(b"a=1&q=_method")
    code, report, _ = await explain(capsys, config, "--body", str(tmp_path / "form"), "/tools/x")
    assert (code, report["decision"]) == (0, "allow")
    assert report["document"]["request"]["body_bytes"] == 13
    (tmp_path / "big").write_bytes(b"a=" + b"x" * 1048576)
    code, report, _ = await explain(capsys, config, "--body", str(tmp_path / "big"), "/tools/x")
    assert (code, report["reason"], report["pdp"]) == (1, "body_too_large", None)
    # Not a form: streamed by `pep run`, so no limit applies without max_body_bytes.
    code, report, _ = await explain(
        capsys, config, "-H", "Content-Type: application/octet-stream", "--body", str(tmp_path / "big"), "/tools/x"
    )
    assert (code, report["decision"]) == (0, "allow")


async def test_a_body_over_the_route_limit(
    tmp_path: Path, cedar_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = tmp_path / "big.json"
    body.write_bytes(b"x" * 5000)
    code, report, _ = await explain(capsys, cedar_config, "--body", str(body), "/mcp")
    assert code == 1
    assert (report["reason"], report["pdp"], report["route"]) == ("body_too_large", None, "mcp")
    assert report["upstream_url"] == "http://127.0.0.1:9001/mcp"


async def test_an_unreadable_mcp_body(tmp_path: Path, cedar_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = tmp_path / "dup.json"
    body.write_bytes(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping"}')
    code, report, _ = await explain(capsys, cedar_config, "--body", str(body), "/mcp")
    assert (code, report["reason"], report["pdp"]) == (1, "body_unreadable", None)


async def test_a_reply_to_no_relayed_server_request(
    tmp_path: Path, cedar_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `pep run` refuses it: a client reply whose id is not a token the PEP relayed answers nothing known."""
    body = tmp_path / "reply.json"
    body.write_bytes(b'{"jsonrpc":"2.0","id":5,"result":{"action":"accept","content":{"api_key":"k"}}}')
    code, report, _ = await explain(capsys, cedar_config, "--body", str(body), "/mcp")
    assert (code, report["reason"], report["pdp"]) == (1, "request_ambiguous", None)


# --- MCP bodies ------------------------------------------------------------------------------------------------


async def test_an_mcp_call_puts_its_facts_in_the_document(
    tmp_path: Path, cedar_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = tmp_path / "call.json"
    body.write_bytes(SEARCH)
    code, report, _ = await explain(capsys, cedar_config, "--body", str(body), "http://127.0.0.1:8080/mcp")
    assert code == 0
    doc = report["document"]
    assert doc["request"]["method"] == "POST"  # POST by default with a body
    assert doc["request"]["body_bytes"] == len(SEARCH)
    assert doc["mcp"] == {
        "method": "tools/call",
        "name": "search",
        "arguments": {"q": "refunds"},
        "protocol_version": None,
        "direction": "client_to_server",
    }
    assert report["upstream_url"] == "http://127.0.0.1:9001/mcp"

    body.write_bytes(SHELL)
    code, report, _ = await explain(capsys, cedar_config, "--body", str(body), "/mcp")
    assert (code, report["reason"], report["document"]["mcp"]["name"]) == (1, "policy_denied", "shell")


async def test_a_batch_prints_every_document_and_every_answer(
    tmp_path: Path, cedar_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = tmp_path / "batch.json"
    body.write_bytes(b"[" + SEARCH + b"," + SHELL + b"]")
    code, report, _ = await explain(capsys, cedar_config, "--body", str(body), "/mcp")
    assert code == 1
    assert [d["mcp"]["name"] for d in report["documents"]] == ["search", "shell"]
    assert report["document"] == report["documents"][0]
    assert [a["allow"] for a in report["pdp"]["answers"]] == [True, False]
    assert report["pdp"]["answer"]["allow"] is False


async def test_mirrored_mcp_headers_that_disagree_with_the_body(
    tmp_path: Path, cedar_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = tmp_path / "call.json"
    body.write_bytes(SEARCH)
    code, report, _ = await explain(capsys, cedar_config, "-H", "Mcp-Name: shell", "--body", str(body), "/mcp")
    assert (code, report["reason"], report["pdp"]) == (1, "request_ambiguous", None)


# --- secrets ---------------------------------------------------------------------------------------------------


async def test_credentials_never_appear_in_the_output(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "pdp-token"
    token.write_text("pdp-secret-token\n")
    config = opa_config(tmp_path, fault_pdp, auth={"value_file": str(token)})
    headers = ["authorization: Bearer secret", "Cookie: session=secret", "Proxy-Authorization: Basic secret"]
    args = [a for h in headers for a in ("-H", h)]
    code, report, text = await explain(capsys, config, *args, "-H", "x-trace: visible", "/tools/x")
    assert code == 0
    assert report["document"]["request"]["headers"] == {"x-trace": "visible", "host": "127.0.0.1:8080"}
    assert "secret" not in text
    assert "pdp-secret-token" not in text
    # The PDP itself did get the PEP's credential, and not the caller's.
    seen = fault_pdp.requests[0]
    assert seen.headers["authorization"] == "Bearer pdp-secret-token"
    assert b"secret" not in orjson.dumps(seen.body)


async def test_a_route_credential_is_named_never_shown(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "api-key"
    secret.write_text("upstream-secret\n")
    credential = {"header": "x-api-key", "format": "{}", "value_file": str(secret)}
    config = write_config(tmp_path, {"kind": "opa", "url": fault_pdp.url}, credential=credential)
    code, report, text = await explain(capsys, config, "-H", "X-Api-Key: caller-secret", "/tools/x")
    assert code == 0
    assert report["credential_header"] == "x-api-key"
    assert report["document"]["request"]["headers"] == {"host": "127.0.0.1:8080"}
    assert "secret" not in text
    assert b"secret" not in orjson.dumps(fault_pdp.requests[0].body)

    secret.write_text("")  # unavailable: denied before the PDP, as the proxy does
    code, report, text = await explain(capsys, config, "/tools/x")
    assert (code, report["reason"], report["pdp"]) == (1, "credential_unavailable", None)
    assert len(fault_pdp.requests) == 1


async def test_connect_is_decided_on_host_and_port(
    tmp_path: Path, fault_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `pep run` decides a CONNECT: once, on host:port, by a `tunnel: true` route; header obligations cannot
    be carried into a tunnel."""
    tunnel = {"name": "egress", "match": {"host": "api.example.com:443"}, "upstream": "https://api.example.com"}
    config = opa_config(tmp_path, fault_pdp)
    raw = yaml.safe_load(config.read_text())
    raw["routes"].append({**tunnel, "tunnel": True})
    config.write_text(yaml.safe_dump(raw))
    fault_pdp.set("allow")
    code, report, _ = await explain(capsys, config, "-X", "CONNECT", "api.example.com:443")
    assert (code, report["decision"], report["route"]) == (0, "allow", "egress")
    request = report["document"]["request"]
    assert (request["method"], request["host"], request["path"]) == ("CONNECT", "api.example.com:443", "")
    assert report["upstream_url"] == "api.example.com:443"
    fault_pdp.set("allow_with_header")
    code, report, _ = await explain(capsys, config, "-X", "CONNECT", "api.example.com:443")
    assert (code, report["reason"]) == (1, "obligation_unsupported")
    code, report, _ = await explain(capsys, config, "-X", "CONNECT", "other.example:443")
    assert (code, report["reason"], report["pdp"]) == (1, "no_route", None)
    code, report, _ = await explain(capsys, config, "-X", "CONNECT", "-H", "Host: x.example:443", "api.example.com:443")
    assert (code, report["reason"], report["pdp"]) == (1, "request_ambiguous", None)


# --- errors ----------------------------------------------------------------------------------------------------


async def test_config_and_usage_errors_exit_2(
    tmp_path: Path, cedar_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\n")
    code, _, text = await explain(capsys, bad, "/tools/x")
    assert code == 2
    assert "listen" in text
    usage = (
        ["-H", "no-colon", "/tools/x"],
        ["--body", str(tmp_path / "missing"), "/tools/x"],
        ["tools/x"],
        ["/tools/a b"],
        ["-X", "CONNECT", "/tools/x"],
    )
    for args in usage:
        code, report, text = await explain(capsys, cedar_config, *args)
        assert (code, report) == (2, {}), args
        assert text.startswith("pep explain: "), text


def test_a_real_process(cedar_config: Path, tmp_path: Path) -> None:
    body = tmp_path / "call.json"
    body.write_bytes(SEARCH)
    argv = [sys.executable, "-m", "pep", "explain", "-c", str(cedar_config), "-H", "authorization: Bearer secret"]
    done = subprocess.run(
        [*argv, "--body", str(body), "http://127.0.0.1:8080/mcp"],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert b"secret" not in done.stdout + done.stderr
    report = orjson.loads(done.stdout)
    assert (report["decision"], report["document"]["mcp"]["name"]) == ("allow", "search")
    denied = subprocess.run([*argv, "-X", "POST", "/tools/x"], cwd=REPO, capture_output=True, timeout=60, check=False)
    assert denied.returncode == 1
    assert orjson.loads(denied.stdout)["reason"] == "policy_denied"


# --- approvals ---------------------------------------------------------------------------------------------------

APPROVAL_POLICIES = """
permit(principal, action == Action::"tools/call", resource == Tool::"refund");
@approval("alice@example.com")
@approval_message("Refund over 100")
forbid(principal, action == Action::"tools/call", resource == Tool::"refund") unless { context has approval };
"""
REFUND = b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"refund","arguments":{"amount":500}}}'


async def test_an_approval_required_answer_shows_who_would_be_asked_and_asks_nobody(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `pep run` would: approval_required on a route with `approval`; explain contacts no OpenID Provider (the
    configured one does not exist) and says who would be asked, how the request would wait, and its code."""
    policies = tmp_path / "policies.cedar"
    policies.write_text(APPROVAL_POLICIES)
    secret = tmp_path / "op-secret"
    secret.write_text("s3cret")
    path = write_config(tmp_path, {"kind": "cedar", "policies": str(policies)})
    raw = yaml.safe_load(path.read_text())
    raw["routes"][1]["approval"] = {"mode": "hold", "hold_ms": 5000}
    raw["approvals"] = {
        "issuer": "http://127.0.0.1:9",
        "backchannel_authentication_endpoint": "http://127.0.0.1:9/backchannel",
        "token_endpoint": "http://127.0.0.1:9/token",
        "jwks_uri": "http://127.0.0.1:9/jwks",
        "client_id": "pep",
        "client_secret_file": str(secret),
    }
    path.write_text(yaml.safe_dump(raw))
    body = tmp_path / "refund.json"
    body.write_bytes(REFUND)
    code, report, _ = await explain(capsys, path, "--body", str(body), "/mcp")
    assert (code, report["decision"], report["reason"]) == (1, "deny", "approval_required")
    approval = report["approval"]
    assert approval.pop("code").isalnum()
    assert approval == {"approver": "alice@example.com", "message": "Refund over 100", "mode": "hold", "hold_ms": 5000}
    assert "approval" not in report["document"]
