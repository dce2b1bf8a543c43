"""The `approvals` section, route `approval` and just-in-time `credential` kinds: read as written, every mistake
refused with its key path, and `pep check` reading the files they name (ticket keys, client secrets and keys)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from pep.cli import EXIT_CONFIG, main
from pep.config import (
    ApprovalsConfig,
    BreakerConfig,
    ConfigError,
    Credential,
    JitCredential,
    OAuthClientConfig,
    RouteApproval,
    TlsConfig,
    parse,
)
from pep.seal import new_key_text

SRC = "f.yaml"
JWT = "urn:ietf:params:oauth:token-type:jwt"


def base(tmp_path: Path | None = None) -> dict[str, Any]:
    files = tmp_path or Path("/etc/pep")
    return {
        "version": 1,
        "listen": "127.0.0.1:8080",
        "identity": {"jwt": {"issuers": ["https://id"], "audiences": ["pep"], "jwks_file": "/etc/pep/jwks.json"}},
        "pdp": {"kind": "opa", "url": "http://127.0.0.1:8181/v1/data/pep/authz"},
        "approvals": {
            "issuer": "https://op.example",
            "backchannel_authentication_endpoint": "https://op.example/backchannel",
            "token_endpoint": "https://op.example/token",
            "jwks_uri": "https://op.example/jwks",
            "client_id": "failclosed-pep",
            "client_secret_file": str(files / "op-secret"),
            "ticket_key_files": [str(files / "ticket.key")],
        },
        "routes": [
            {
                "name": "mcp",
                "match": {"path_prefix": "/mcp"},
                "upstream": "http://127.0.0.1:9000/mcp",
                "protocol": "mcp",
                "require_identity": True,
                "approval": {"mode": "hold", "hold_ms": 120000},
                "credential": {
                    "kind": "token_exchange",
                    "token_endpoint": "https://as.example/token",
                    "client_id": "pep",
                    "client_secret_file": str(files / "as-secret"),
                    "audience": "crm",
                    "scopes": ["crm.read", "crm.write"],
                },
            },
            {
                "name": "refunds",
                "match": {"path_prefix": "/refunds"},
                "upstream": "http://127.0.0.1:9001",
                "max_body_bytes": 65536,
                "approval": {"mode": "ticket"},
                "credential": {
                    "kind": "client_credentials",
                    "token_endpoint": "http://127.0.0.1:9100/token",
                    "client_id": "pep",
                    "client_auth": "private_key_jwt",
                    "client_key_file": str(files / "pep.key.pem"),
                    "resource": ["https://refunds.example/api"],
                    "scopes": ["refunds.write"],
                    "header": "x-api-token",
                    "format": "{}",
                    "timeout_ms": 800,
                    "expiry_margin_ms": 10000,
                    "breaker": {"failure_threshold": 2},
                },
            },
        ],
    }


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, SRC)
    return info.value.problems


def test_a_full_config_is_read_as_written() -> None:
    cfg = parse(base(), SRC)
    assert cfg.approvals == ApprovalsConfig(
        issuer="https://op.example",
        backchannel_authentication_endpoint="https://op.example/backchannel",
        token_endpoint="https://op.example/token",
        jwks_uri="https://op.example/jwks",
        client=OAuthClientConfig("failclosed-pep", "client_secret_basic", "/etc/pep/op-secret"),
        ticket_key_files=("/etc/pep/ticket.key",),
    )
    mcp, refunds = cfg.routes
    assert mcp.approval == RouteApproval("hold", 120000)
    assert mcp.credential == Credential(
        "authorization",
        "Bearer {}",
        jit=JitCredential(
            "token_exchange",
            "https://as.example/token",
            OAuthClientConfig("pep", "client_secret_basic", "/etc/pep/as-secret"),
            audiences=("crm",),
            scopes=("crm.read", "crm.write"),
        ),
    )
    assert refunds.approval == RouteApproval("ticket")
    assert refunds.credential == Credential(
        "x-api-token",
        "{}",
        jit=JitCredential(
            "client_credentials",
            "http://127.0.0.1:9100/token",
            OAuthClientConfig("pep", "private_key_jwt", key_file="/etc/pep/pep.key.pem"),
            resources=("https://refunds.example/api",),
            scopes=("refunds.write",),
            timeout_ms=800,
            expiry_margin_ms=10000,
            breaker=BreakerConfig(failure_threshold=2),
        ),
    )
    assert mcp.credential.jit.subject_token_type == JWT  # type: ignore[union-attr]


def test_approvals_options() -> None:
    data = base()
    data["approvals"].update(
        scopes=["email"],
        approver_claim="email",
        tls={"ca_file": "/etc/pep/ca.pem"},
        timeout_ms=1500,
        requested_expiry_ms=60000,
        min_poll_interval_ms=500,
        binding_message_max=20,
        elicitation_url="https://approvals.example/pending/{id}",
        breaker={"open_ms": 1000},
        max_held=3,
    )
    approvals = parse(data, SRC).approvals
    assert approvals is not None
    assert (approvals.scopes, approvals.approver_claim, approvals.tls) == (
        ("email",),
        "email",
        TlsConfig("/etc/pep/ca.pem"),
    )
    assert (approvals.timeout_ms, approvals.requested_expiry_ms, approvals.min_poll_interval_ms) == (1500, 60000, 500)
    assert approvals.binding_message_max == 20
    assert approvals.elicitation_url == "https://approvals.example/pending/{id}"
    assert approvals.breaker == BreakerConfig(open_ms=1000)
    assert approvals.max_held == 3
    assert parse(base(), SRC).approvals.max_held == 100  # type: ignore[union-attr]


def mutate(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(base())
    change(data)
    return data


def a(data: dict[str, Any]) -> dict[str, Any]:
    approvals: dict[str, Any] = data["approvals"]
    return approvals


def cred(data: dict[str, Any], i: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = data["routes"][i]["credential"]
    return found


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("approvals"), "routes[0].approval: needs the approvals section"),
        (lambda d: a(d).pop("ticket_key_files"), "routes[1].approval.mode: ticket needs approvals.ticket_key_files"),
        (lambda d: d["routes"][1]["approval"].update(hold_ms=5), "routes[1].approval.hold_ms: is only used with mode"),
        (lambda d: d["routes"][0].update(approval={"mode": "later"}), "routes[0].approval.mode: must be one of"),
        (lambda d: d["routes"][0].update(approval={}), "routes[0].approval.mode: is required"),
        (lambda d: d["routes"][0].update(approval={"mode": "hold", "hold_ms": 0}), "routes[0].approval.hold_ms"),
        (lambda d: d["routes"][1].pop("max_body_bytes"), "routes[1].approval: needs max_body_bytes on an http route"),
        (lambda d: a(d).pop("jwks_uri"), "approvals.jwks_uri: is required"),
        (lambda d: a(d).update(issuer="op.example"), "approvals.issuer: must be an http:// or https:// URL"),
        (lambda d: a(d).update(token_endpoint="https://u:p@op/token"), "approvals.token_endpoint: must not carry"),
        (lambda d: a(d).update(jwks_uri="http://op.example/jwks"), "approvals.jwks_uri: must be an https:// URL"),
        (lambda d: a(d).update(token_endpoint="http://10.0.0.5/t"), "approvals.token_endpoint: must be an https://"),
        (
            lambda d: a(d).update(backchannel_authentication_endpoint="http://op.example/bc"),
            "approvals.backchannel_authentication_endpoint: must be an https:// URL",
        ),
        (lambda d: cred(d).update(token_endpoint="http://as.example/t"), "routes[0].credential.token_endpoint: must"),
        (lambda d: a(d).pop("client_id"), "approvals.client_id: is required"),
        (lambda d: a(d).pop("client_secret_file"), "approvals.client_secret_file: is required with client_auth"),
        (lambda d: a(d).update(client_auth="private_key_jwt"), "approvals.client_secret_file: is not used with"),
        (lambda d: a(d).update(client_auth="tls_client_auth"), "approvals.client_auth: must be one of"),
        (lambda d: a(d).update(client_key_file="/k"), "approvals.client_key_file: is only used with client_auth"),
        (lambda d: a(d).update(scopes=["openid"]), "approvals.scopes: need not name openid"),
        (lambda d: a(d).update(scopes=["a b"]), "approvals.scopes: 'a b' is not a scope name"),
        (lambda d: a(d).update(elicitation_url="http://x/{id}"), "approvals.elicitation_url: must be an https://"),
        (lambda d: a(d).update(binding_message_max=5), "approvals.binding_message_max: must be between 12 and 512"),
        (lambda d: a(d).update(ticket_key_files="/k"), "approvals.ticket_key_files: must be a non-empty list"),
        (lambda d: a(d).update(tls={"cert_file": "/c"}), "approvals.tls: cert_file and key_file go together"),
        (lambda d: a(d).update(poll=1), "approvals.poll: unknown key"),
        (lambda d: a(d).update(max_held=0), "approvals.max_held: must be between 1 and 100000"),
        (lambda d: a(d).update(max_held="many"), "approvals.max_held: must be an integer"),
        (lambda d: a(d).update(max_pending_per_caller=0), "approvals.max_pending_per_caller: must be between 1"),
        (lambda d: cred(d).update(kind="vault"), "routes[0].credential.kind: must be one of"),
        (lambda d: cred(d).update(kind=None), "routes[0].credential.kind: must be a non-empty string"),
        (lambda d: d["routes"][0].pop("require_identity"), "routes[0].credential.kind: token_exchange needs"),
        (lambda d: cred(d).pop("audience"), "routes[0].credential: token_exchange needs an audience or a resource"),
        (lambda d: cred(d).update(value_file="/s"), "routes[0].credential.value_file: unknown key"),
        (lambda d: cred(d).pop("token_endpoint"), "routes[0].credential.token_endpoint: is required"),
        (lambda d: cred(d).update(scopes=["x", "x"]), "routes[0].credential.scopes: holds a scope twice"),
        (lambda d: cred(d).update(scopes=[]), "routes[0].credential.scopes: must be a non-empty list"),
        (lambda d: cred(d).update(format="Bearer"), "routes[0].credential.format: must hold {} exactly once"),
        (lambda d: cred(d).update(subject_token_type="saml"), "routes[0].credential.subject_token_type: must be"),
        (lambda d: cred(d).update(actor_token_type=JWT), "routes[0].credential.actor_token_type: is only used with"),
        (lambda d: cred(d, 1).update(actor_token_file="/t"), "routes[1].credential.actor_token_file: is only used"),
        (lambda d: cred(d, 1).update(resource="crm"), "routes[1].credential.resource: 'crm' is not an absolute URI"),
        (lambda d: cred(d, 1).pop("client_key_file"), "routes[1].credential.client_key_file: is required with"),
        (lambda d: cred(d, 1).update(client_key_alg="HS256"), "routes[1].credential.client_key_alg: must be one of"),
        (lambda d: cred(d, 1).update(timeout_ms=0), "routes[1].credential.timeout_ms: must be between 1 and 60000"),
        (
            lambda d: d["routes"].append(
                {
                    "name": "egress",
                    "match": {"host": "api.example.com:443"},
                    "upstream": "https://api.example.com",
                    "tunnel": True,
                    "approval": {"mode": "hold"},
                }
            ),
            "routes[2].approval: is not for tunnels",
        ),
    ],
)
def test_mistakes_are_refused_with_their_key_path(change: Any, expected: str) -> None:
    found = problems(mutate(change))
    assert any(p.startswith(f"{SRC}: {expected}") for p in found), found


# --- pep check: the files -------------------------------------------------------------------------------------


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    data["pdp"] = {"kind": "cedar", "policies": str(tmp_path / "p.cedar")}
    (tmp_path / "p.cedar").write_text("permit(principal, action, resource);")
    data["identity"]["jwt"]["jwks_file"] = str(tmp_path / "jwks.json")
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def good_files(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from tests.support.jwt_keys import ec_key, write_jwks

    write_jwks(tmp_path / "jwks.json", ec_key("k"))
    for name in ("op-secret", "as-secret"):
        (tmp_path / name).write_text("s3cret\n")
        (tmp_path / name).chmod(0o600)
    (tmp_path / "ticket.key").write_text(new_key_text())
    (tmp_path / "ticket.key").chmod(0o400)
    key = ec_key("pep").private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "pep.key.pem").write_bytes(key)
    (tmp_path / "pep.key.pem").chmod(0o600)


def run_check(tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = write(tmp_path, data)
    code = main(["check", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_accepts_good_files_and_has_nothing_to_say_about_jit_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good_files(tmp_path)
    code, out, err = run_check(tmp_path, base(tmp_path), capsys)
    assert (code, out) == (0, "ok\n"), err
    assert "credential" not in err  # obtained per request: nothing is missing at start


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: (p / "ticket.key").unlink(), "approvals.ticket_key_files[0]: "),
        (lambda p: (p / "ticket.key").write_text("short"), "does not hold a 32-byte key"),
        (lambda p: (p / "op-secret").unlink(), "approvals.client_secret_file: "),
        (lambda p: (p / "as-secret").write_text("\n"), "routes[0].credential.client_secret_file: "),
        (lambda p: (p / "pep.key.pem").write_text("nope"), "routes[1].credential.client_key_file: "),
    ],
)
def test_check_refuses_unusable_files_with_their_key_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, expected: str
) -> None:
    good_files(tmp_path)
    if (tmp_path / "ticket.key").exists():
        (tmp_path / "ticket.key").chmod(0o600)
    damage(tmp_path)
    code, out, err = run_check(tmp_path, base(tmp_path), capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    assert expected in err
    assert "s3cret" not in err


def test_check_warns_about_a_key_file_every_user_can_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good_files(tmp_path)
    (tmp_path / "ticket.key").chmod(0o644)
    code, out, err = run_check(tmp_path, base(tmp_path), capsys)
    assert (code, out) == (0, "ok\n"), err
    assert "approvals.ticket_key_files[0]: " in err
    assert "is readable by every user (mode 0644)" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "[::1]", "localhost"])
def test_plain_http_is_only_for_an_authorization_server_on_this_machine(host: str) -> None:
    """Client secrets, callers' tokens and the keys that prove an approval cross these links: over TLS, or not
    off the machine at all."""
    data = base()
    for key in ("backchannel_authentication_endpoint", "token_endpoint", "jwks_uri"):
        data["approvals"][key] = f"http://{host}:9000/{key}"
    data["routes"][0]["credential"]["token_endpoint"] = f"http://{host}:9100/token"
    cfg = parse(data, SRC)
    assert cfg.approvals is not None
    assert cfg.approvals.jwks_uri == f"http://{host}:9000/jwks_uri"
