"""`pep check` reads the files a config names (README, "Configuration"): Cedar policies and entities, the CA bundle
and client certificate for TLS to the PDP, the PDP token. Exit 2 with `file: key.path: what is wrong` lines on
stderr, or 0 and `ok` on stdout."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from pep.cli import EXIT_CONFIG, main
from pep.config import load
from pep.preflight import file_problems

Mutate = Callable[[dict[str, Any], Path], None]


def write_config(tmp_path: Path, pdp: dict[str, Any]) -> Path:
    config = {
        "version": 1,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "pdp": pdp,
        "routes": [{"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": "http://127.0.0.1:9"}],
    }
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def cedar_pdp(tmp_path: Path, text: str | None = "permit(principal, action, resource);") -> dict[str, Any]:
    policies = tmp_path / "policies.cedar"
    if text is not None:
        policies.write_text(text)
    return {"kind": "cedar", "policies": str(policies)}


def tls_files(tmp_path: Path, ca: trustme.CA) -> tuple[str, str, str]:
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert = ca.issue_cert("pep.test")
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return str(ca_file), str(cert_file), str(key_file)


# --- good configs --------------------------------------------------------------------------------------------


def test_a_good_cedar_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pdp = cedar_pdp(tmp_path)
    entities = tmp_path / "entities.json"
    entities.write_text(json.dumps([{"uid": {"type": "Company", "id": "acme"}, "attrs": {}, "parents": []}]))
    pdp["entities"] = str(entities)
    assert check(write_config(tmp_path, pdp), capsys) == (0, "ok\n", "")


def test_a_cedar_directory_and_an_empty_policy_file_are_fine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "policies"
    d.mkdir()
    (d / "a.cedar").write_text("")
    assert check(write_config(tmp_path, {"kind": "cedar", "policies": str(d)}), capsys) == (0, "ok\n", "")


def test_a_good_authzen_config_with_tls_and_a_token(
    tmp_path: Path, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_file, cert_file, key_file = tls_files(tmp_path, ca)
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    pdp = {
        "kind": "authzen",
        "url": "https://127.0.0.1:9443",
        "tls": {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file},
        "auth": {"value_file": str(token)},
    }
    code, out, err = check(write_config(tmp_path, pdp), capsys)
    assert (code, out, err) == (0, "ok\n", "")
    assert "t0ken" not in out + err


def test_an_opa_config_needs_no_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pdp = {"kind": "opa", "url": "http://127.0.0.1:8181/v1/data/pep/authz"}
    assert check(write_config(tmp_path, pdp), capsys) == (0, "ok\n", "")


# --- configs whose files cannot be used ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "permit(principal, action, resource) when {",
        "allow(principal, action, resource);",
        "permit(principal, action, resource)",  # no semicolon
    ],
)
def test_cedar_policies_that_do_not_parse(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    path = write_config(tmp_path, cedar_pdp(tmp_path, text))
    code, out, err = check(path, capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}: pdp.policies: ")
    assert str(tmp_path / "policies.cedar") in lines[0]


def test_missing_cedar_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, cedar_pdp(tmp_path, None))
    code, out, err = check(path, capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    assert err.startswith(f"{path}: pdp.policies: cannot read")


def test_a_policy_directory_without_cedar_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "policies"
    d.mkdir()
    (d / "notes.txt").write_text("permit(principal, action, resource);")
    code, _, err = check(write_config(tmp_path, {"kind": "cedar", "policies": str(d)}), capsys)
    assert code == EXIT_CONFIG
    assert "pdp.policies: no .cedar file" in err


@pytest.mark.parametrize("content", [None, "[", '[{"uid": {"type": "A"}}]'])
def test_unusable_cedar_entities(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None) -> None:
    pdp = cedar_pdp(tmp_path)
    entities = tmp_path / "entities.json"
    if content is not None:
        entities.write_text(content)
    pdp["entities"] = str(entities)
    code, _, err = check(write_config(tmp_path, pdp), capsys)
    assert code == EXIT_CONFIG
    assert ": pdp.entities: " in err


def test_a_missing_ca_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pdp = {"kind": "authzen", "url": "https://127.0.0.1:9443", "tls": {"ca_file": str(tmp_path / "missing-ca.pem")}}
    path = write_config(tmp_path, pdp)
    code, out, err = check(path, capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    assert err.startswith(f"{path}: pdp.tls: ")


def test_a_ca_file_that_is_not_a_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    pdp = {"kind": "opa", "url": "https://127.0.0.1:8181/v1/data/pep/authz", "tls": {"ca_file": str(bad)}}
    code, _, err = check(write_config(tmp_path, pdp), capsys)
    assert code == EXIT_CONFIG
    assert ": pdp.tls: " in err


def test_a_client_key_that_does_not_match(tmp_path: Path, ca: trustme.CA, capsys: pytest.CaptureFixture[str]) -> None:
    ca_file, cert_file, _ = tls_files(tmp_path, ca)
    other_key = tmp_path / "other.key"
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(other_key))
    pdp = {
        "kind": "authzen",
        "url": "https://127.0.0.1:9443",
        "tls": {"ca_file": ca_file, "cert_file": cert_file, "key_file": str(other_key)},
    }
    code, _, err = check(write_config(tmp_path, pdp), capsys)
    assert code == EXIT_CONFIG
    assert ": pdp.tls: " in err


@pytest.mark.parametrize("content", ["", "\n", "   \n\t", None])
def test_an_empty_or_missing_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
    pdp = {"kind": "authzen", "url": "http://127.0.0.1:9", "auth": {"value_file": str(token)}}
    path = write_config(tmp_path, pdp)
    code, out, err = check(path, capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    assert err.strip() == f"{path}: pdp.auth.value_file: {str(token)!r} is missing, unreadable or empty"


def test_every_problem_is_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pdp = {
        "kind": "opa",
        "url": "https://127.0.0.1:8181/v1/data/pep/authz",
        "tls": {"ca_file": str(tmp_path / "nope.pem")},
        "auth": {"value_file": str(tmp_path / "nope-token")},
    }
    path = write_config(tmp_path, pdp)
    assert len(file_problems(load(path))) == 2
    code, _, err = check(path, capsys)
    assert code == EXIT_CONFIG
    assert [line.split(": ")[1] for line in err.strip().splitlines()] == ["pdp.tls", "pdp.auth.value_file"]


def test_run_refuses_the_same_files_before_listening(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, cedar_pdp(tmp_path, "permit("))
    code = main(["run", "-c", str(path)])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    assert "pdp.policies" in err
    assert "proxy on" not in err


# --- warnings: what starts but denies at once -------------------------------------------------------------------


def test_a_route_credential_that_is_not_there_is_a_warning_not_a_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PEP_TEST_UNSET_KEY", raising=False)
    path = write_config(tmp_path, {"kind": "opa", "url": "http://127.0.0.1:8181/v1/data/pep/authz"})
    raw = yaml.safe_load(path.read_text())
    raw["routes"].append(
        {
            "name": "crm",
            "match": {"path_prefix": "/crm"},
            "upstream": "http://127.0.0.1:9",
            "credential": {"header": "authorization", "value_env": "PEP_TEST_UNSET_KEY"},
        }
    )
    path.write_text(yaml.safe_dump(raw))
    code, out, err = check(path, capsys)
    assert (code, out) == (0, "ok\n")
    assert err == (
        f"warning: {path}: routes[1].credential.value_env: PEP_TEST_UNSET_KEY is not set or empty: requests on"
        " route crm are denied (credential_unavailable)\n"
    )
    monkeypatch.setenv("PEP_TEST_UNSET_KEY", "k\x01ey")
    assert "holds a control character" in check(path, capsys)[2]
    monkeypatch.setenv("PEP_TEST_UNSET_KEY", "s3cret")
    assert check(path, capsys) == (0, "ok\n", "")


def test_tracing_without_the_otel_extra_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, {"kind": "opa", "url": "http://127.0.0.1:8181/v1/data/pep/authz"})
    raw = yaml.safe_load(path.read_text())
    raw["tracing"] = {"exporter": "otlp"}
    path.write_text(yaml.safe_dump(raw))
    assert check(path, capsys) == (0, "ok\n", "")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("opentelemetry") else real(name, *a)
    )
    code, out, err = check(path, capsys)
    assert (code, out) == (EXIT_CONFIG, "")
    assert err.startswith(f"{path}: tracing: needs the OpenTelemetry SDK")


def test_an_upstream_credential_file_every_user_can_read_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent on the same machine that can read the upstream's credential holds it, and can go around the PEP."""
    secret = tmp_path / "crm-token"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    path = write_config(tmp_path, {"kind": "opa", "url": "http://127.0.0.1:8181/v1/data/pep/authz"})
    raw = yaml.safe_load(path.read_text())
    raw["routes"].append(
        {
            "name": "crm",
            "match": {"path_prefix": "/crm"},
            "upstream": "http://127.0.0.1:9",
            "credential": {"header": "authorization", "format": "Bearer {}", "value_file": str(secret)},
        }
    )
    path.write_text(yaml.safe_dump(raw))
    code, out, err = check(path, capsys)
    assert (code, out) == (0, "ok\n")
    assert f"routes[1].credential.value_file: {str(secret)!r} is readable by every user (mode 0644)" in err
    assert "s3cret" not in err
    secret.chmod(0o600)
    assert check(path, capsys) == (0, "ok\n", "")
