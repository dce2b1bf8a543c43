"""Config of just-in-time credentials beyond what tests/unit/test_config_approvals.py covers: where they cannot be."""

from __future__ import annotations

import pytest

from pep.config import ConfigError, parse


def test_a_just_in_time_credential_is_refused_on_a_tunnel_with_its_key_path() -> None:
    raw = {
        "version": 1,
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
    with pytest.raises(ConfigError) as err:
        parse(raw, "pep.yaml")
    assert any("routes[0].credential.kind: is not for tunnels" in p for p in err.value.problems), err.value.problems
