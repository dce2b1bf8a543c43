"""`pep explain` with verified identity (issue 6): a bearer token given with `-H` is verified with the config's keys
and shows as `subject.id`/`subject.claims`; on an mTLS config `--peer-spiffe-id` stands in for the client
certificate's SPIFFE ID. A refused identity is reported with its reason, and the raw token never appears in the
output. The PDP is the embedded Cedar one (allow everything), so only identity can deny."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from pep.cli import main
from pep.explain import EXIT_ALLOW, EXIT_DENY
from tests.support.spiffe_pki import SPIFFE_ID, JwtAuthority, SpiffePki

ISSUER = "https://issuer.test"
AUDIENCE = "failclosed-pep"
STATIC_WORKLOAD = "spiffe://test/agent"
URL = "http://127.0.0.1:8080/tools/search?q=1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SpiffePki:
    return SpiffePki.create(tmp_path_factory.mktemp("spiffe"))


@pytest.fixture
def authority(tmp_path: Path) -> JwtAuthority:
    return JwtAuthority(tmp_path / "jwks.json", ISSUER, AUDIENCE)


def write_config(tmp_path: Path, identity: dict[str, Any], **route: Any) -> Path:
    policies = tmp_path / "policies.cedar"
    policies.write_text("permit(principal, action, resource);\n")
    config = {
        "version": 1,
        "listen": "127.0.0.1:8080",
        "identity": {"workload": STATIC_WORKLOAD, **identity},
        "pdp": {"kind": "cedar", "policies": str(policies)},
        "decision_log": {"sink": "none"},
        "routes": [
            {"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": "http://127.0.0.1:9000/", **route}
        ],
    }
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def explain(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    code = main(["explain", "-c", str(config), *args])
    out, err = capsys.readouterr()
    return code, orjson.loads(out) if out else {}, out + err


def jwt_config(tmp_path: Path, authority: JwtAuthority) -> Path:
    return write_config(tmp_path, {"jwt": authority.jwt_config(claims=["department"])}, require_identity=True)


# --- tokens --------------------------------------------------------------------------------------------------------


def test_a_valid_token_is_the_subject(
    tmp_path: Path, authority: JwtAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    token = authority.mint("user-42", azp="support-bot", department="support", email="u42@example.com")
    code, report, output = explain(capsys, jwt_config(tmp_path, authority), "-H", f"authorization: Bearer {token}", URL)
    assert code == EXIT_ALLOW, output
    assert report["decision"] == "allow"
    subject = report["document"]["subject"]
    assert subject == {
        "workload": STATIC_WORKLOAD,
        "agent": "support-bot",
        "id": "user-42",
        "claims": {"department": "support"},  # only the configured claims
    }
    assert "authorization" not in report["document"]["request"]["headers"]
    assert token not in output
    assert token.rsplit(".", 1)[1] not in output  # not even the signature


@pytest.mark.parametrize(
    ("case", "reason", "detail"),
    [
        ("expired", "identity_invalid", "expired"),
        ("forged", "identity_invalid", "signature"),
        ("wrong-audience", "identity_invalid", "audience"),
        ("missing", "identity_missing", "no bearer token"),
    ],
)
def test_a_refused_token_is_reported_with_its_reason(
    tmp_path: Path,
    authority: JwtAuthority,
    capsys: pytest.CaptureFixture[str],
    case: str,
    reason: str,
    detail: str,
) -> None:
    tokens = {
        "expired": authority.mint(exp=1_000_000_000, iat=999_999_000, nbf=999_999_000),
        "forged": authority.forger().mint(),
        "wrong-audience": authority.mint(aud="someone-else"),
    }
    token = tokens.get(case)
    headers = ["-H", f"authorization: Bearer {token}"] if token is not None else []
    code, report, output = explain(capsys, jwt_config(tmp_path, authority), *headers, URL)
    assert code == EXIT_DENY, output
    assert report["decision"] == "deny"
    assert report["reason"] == reason
    assert detail in report["detail"]
    assert report["document"] is None  # refused before a policy input exists: nothing was asked
    assert report["pdp"] is None
    if token is not None:
        assert token not in output
        assert token.rsplit(".", 1)[1] not in output


# --- mTLS: --peer-spiffe-id -------------------------------------------------------------------------------------


def mtls_config(tmp_path: Path, pki: SpiffePki) -> Path:
    return write_config(tmp_path, {"mtls": pki.mtls_config()})


def test_peer_spiffe_id_is_the_workload_on_an_mtls_config(
    tmp_path: Path, pki: SpiffePki, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, output = explain(capsys, mtls_config(tmp_path, pki), "--peer-spiffe-id", SPIFFE_ID, URL)
    assert code == EXIT_ALLOW, output
    assert report["document"]["subject"]["workload"] == SPIFFE_ID


@pytest.mark.parametrize("peer", [None, "https://example.org/ns/agents/sa/bot", "spiffe://example.org/a/../b"])
def test_without_a_valid_peer_spiffe_id_an_mtls_config_is_identity_invalid(
    tmp_path: Path, pki: SpiffePki, capsys: pytest.CaptureFixture[str], peer: str | None
) -> None:
    args = ["--peer-spiffe-id", peer] if peer is not None else []
    code, report, output = explain(capsys, mtls_config(tmp_path, pki), *args, URL)
    assert code == EXIT_DENY, output
    assert report["reason"] == "identity_invalid"
    assert report["document"] is None


def test_peer_spiffe_id_and_a_token_together(
    tmp_path: Path, pki: SpiffePki, authority: JwtAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = {"mtls": pki.mtls_config(), "jwt": authority.jwt_config(claims=["department"])}
    config = write_config(tmp_path, identity, require_identity=True)
    token = authority.mint("user-42", department="sales")
    args = ["--peer-spiffe-id", SPIFFE_ID, "-H", f"authorization: Bearer {token}", URL]
    code, report, output = explain(capsys, config, *args)
    assert code == EXIT_ALLOW, output
    assert report["document"]["subject"] == {
        "workload": SPIFFE_ID,
        "agent": None,
        "id": "user-42",
        "claims": {"department": "sales"},
    }
    assert token not in output


def test_a_peer_id_without_mtls_in_the_config_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, {})
    assert main(["explain", "-c", str(config), "--peer-spiffe-id", SPIFFE_ID, URL]) == 2
    assert "--peer-spiffe-id needs identity.mtls" in capsys.readouterr().err
