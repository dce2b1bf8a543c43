"""Config of just-in-time credentials beyond what tests/unit/test_config_approvals.py covers: where they cannot be."""

from __future__ import annotations

from typing import Any

import pytest

from pep.config import ConfigError, parse


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse(raw, "pep.yaml")
    return err.value.problems


def test_a_just_in_time_credential_is_refused_on_a_tunnel_with_its_key_path() -> None:
    raw: dict[str, Any] = {
        "version": 1,
        "listen": "127.0.0.1:8080",
        "pdp": {"kind": "opa", "url": "http://127.0.0.1:8181/v1/data/pep/authz"},
        "routes": [
            {
                "name": "egress",
                "match": {"host": "api.example.com:443"},
                "upstream": "https://api.example.com:443",
                "tunnel": True,
                "credential": {
                    "kind": "client_credentials",
                    "token_endpoint": "https://as.example/token",
                    "client_id": "pep",
                    "client_secret_file": "/run/secrets/as",
                },
            }
        ],
    }
    found = problems(raw)
    assert any("routes[0].credential.kind: is not for tunnels" in p for p in found), found


def test_a_token_exchange_route_cannot_forward_the_callers_own_token_too() -> None:
    raw: dict[str, Any] = {
        "version": 1,
        "listen": "127.0.0.1:8080",
        "pdp": {"kind": "opa", "url": "http://127.0.0.1:8181/v1/data/pep/authz"},
        "identity": {"jwt": {"issuers": ["https://id"], "audiences": ["pep"], "jwks_file": "/run/jwks.json"}},
        "routes": [
            {
                "name": "crm",
                "match": {"path_prefix": "/crm"},
                "upstream": "https://crm.internal",
                "require_identity": True,
                "keep_caller_credentials": True,
                "credential": {
                    "kind": "token_exchange",
                    "token_endpoint": "https://as.example/token",
                    "client_id": "pep",
                    "client_secret_file": "/run/secrets/as",
                    "audience": "crm",
                },
            }
        ],
    }
    found = problems(raw)
    assert any(p.startswith("pep.yaml: routes[0].keep_caller_credentials: cannot go with") for p in found), found
    raw["routes"][0]["keep_caller_credentials"] = False
    parse(raw, "pep.yaml")
