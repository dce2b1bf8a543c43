"""pep.config: valid configs and their defaults, and every refusal as `file: key.path: message`."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from pep import cli
from pep.config import (
    Address,
    BreakerConfig,
    Config,
    ConfigError,
    DecisionLogConfig,
    Identity,
    load,
    parse,
)

SRC = "f.yaml"

Mutation = Callable[[dict[str, Any]], object]


def minimal() -> dict[str, Any]:
    return {
        "version": 1,
        "listen": "127.0.0.1:8080",
        "pdp": {"kind": "opa", "url": "http://127.0.0.1:8181/v1/data/pep/authz"},
        "routes": [{"name": "crm", "match": {"path_prefix": "/crm/"}, "upstream": "https://crm.internal:8443/api/"}],
    }


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, SRC)
    assert info.value.problems, "a ConfigError always names at least one problem"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def mutated(mutation: Mutation) -> dict[str, Any]:
    data = minimal()
    mutation(data)
    return data


def route0(c: dict[str, Any]) -> dict[str, Any]:
    route: dict[str, Any] = c["routes"][0]
    return route


def second_route(**extra: Any) -> Mutation:
    def mutate(c: dict[str, Any]) -> None:
        c["routes"].append({"name": "two", "match": {"path_prefix": "/two"}, "upstream": "http://h", **extra})

    return mutate


FULL_YAML = """\
version: 1
listen: 127.0.0.1:8080
admin_listen: 127.0.0.1:9911
identity:
  workload: spiffe://cluster.local/ns/agents/sa/support-bot
  agent_header: X-Agent-ID
pdp:
  kind: opa
  url: http://127.0.0.1:8181/v1/data/pep/authz
  timeout_ms: 100
  retries: 2
  max_in_flight: 64
  max_response_bytes: 4096
  breaker: {failure_threshold: 3, open_ms: 1000, half_open_probes: 2}
decision_log: {sink: file, path: /var/log/pep/decisions.jsonl, include_arguments: true, required: true}
routes:
  - name: crm
    match: {path_prefix: /crm/}
    upstream: https://crm.internal:8443/api/
    strip_prefix: true
    protocol: http
    max_body_bytes: 2048
    timeout_ms: 5000
    keep_caller_credentials: true
  - name: mcp-tools_2
    match: {path_prefix: /mcp}
    upstream: http://127.0.0.1:9000/mcp
"""


# --- valid configs ------------------------------------------------------------------------------------------


def test_minimal_config_gets_the_documented_defaults() -> None:
    cfg = parse(minimal(), SRC)
    assert isinstance(cfg, Config)
    assert cfg.source == SRC
    assert cfg.listen == Address("127.0.0.1", 8080)
    assert cfg.admin_listen == Address("127.0.0.1", 9901)
    assert cfg.identity == Identity()
    assert cfg.pdp.kind == "opa"
    assert cfg.pdp.url == "http://127.0.0.1:8181/v1/data/pep/authz"
    assert cfg.pdp.timeout_ms == 250
    assert cfg.pdp.retries == 1
    assert cfg.pdp.max_in_flight == 512
    assert cfg.pdp.max_response_bytes == 1048576
    assert cfg.pdp.breaker == BreakerConfig(failure_threshold=5, open_ms=5000, half_open_probes=1)
    assert cfg.decision_log == DecisionLogConfig(sink="stdout", path=None, include_arguments=False, required=False)
    (route,) = cfg.routes
    assert route.name == "crm"
    assert route.path_prefix == "/crm/"
    assert route.upstream == "https://crm.internal:8443/api/"
    assert route.protocol == "http"
    assert route.strip_prefix is False
    assert route.timeout_ms == 30000
    assert route.max_body_bytes is None  # no limit on http routes unless set
    assert route.keep_caller_credentials is False
    assert route.allow_path_parameters is False
    assert route.max_batch_messages == 16
    assert route.max_json_values == 10_000


@pytest.mark.parametrize("value", [1, 1000])
def test_max_batch_messages_on_mcp_routes(value: int) -> None:
    cfg = parse(mutated(lambda c: route0(c).update(protocol="mcp", max_batch_messages=value)), SRC)
    assert cfg.routes[0].max_batch_messages == value


def test_full_config_file_is_read_as_written(tmp_path: Path) -> None:
    path = tmp_path / "pep.yaml"
    path.write_text(FULL_YAML, encoding="utf-8")
    cfg = load(path)
    assert cfg.source == str(path)
    assert cfg.admin_listen == Address("127.0.0.1", 9911)
    assert cfg.identity == Identity(
        workload="spiffe://cluster.local/ns/agents/sa/support-bot", agent_header="x-agent-id"
    )
    assert (cfg.pdp.timeout_ms, cfg.pdp.retries, cfg.pdp.max_in_flight, cfg.pdp.max_response_bytes) == (
        100,
        2,
        64,
        4096,
    )
    assert cfg.pdp.breaker == BreakerConfig(3, 1000, 2)
    assert cfg.decision_log == DecisionLogConfig("file", "/var/log/pep/decisions.jsonl", True, True)
    crm, mcp = cfg.routes
    assert crm.strip_prefix is True
    assert crm.max_body_bytes == 2048
    assert crm.timeout_ms == 5000
    assert crm.keep_caller_credentials is True
    assert mcp.name == "mcp-tools_2"
    assert mcp.path_prefix == "/mcp"
    assert mcp.strip_prefix is False
    assert mcp.timeout_ms == 30000


def test_config_objects_are_frozen() -> None:
    cfg = parse(minimal(), SRC)
    with pytest.raises(AttributeError):
        cfg.pdp.timeout_ms = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:0", Address("127.0.0.1", 0)),
        ("localhost:8080", Address("localhost", 8080)),
        ("[::1]:8080", Address("::1", 8080)),
        ("0.0.0.0:65535", Address("0.0.0.0", 65535)),
    ],
)
def test_listen_addresses(listen: str, expected: Address) -> None:
    assert parse(mutated(lambda c: c.update(listen=listen)), SRC).listen == expected


def test_address_str_and_loopback() -> None:
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("127.0.0.1", 80)) == "127.0.0.1:80"
    assert Address("::1", 80).is_loopback
    assert Address("127.0.0.2", 80).is_loopback
    assert Address("localhost", 80).is_loopback
    assert not Address("10.0.0.1", 80).is_loopback
    assert not Address("example.com", 80).is_loopback


def test_decision_log_sinks() -> None:
    cfg = parse(mutated(lambda c: c.update(decision_log={"sink": "none"})), SRC)
    assert cfg.decision_log.sink == "none"
    cfg = parse(mutated(lambda c: c.update(decision_log={"sink": "file", "path": "/tmp/d.jsonl"})), SRC)
    assert cfg.decision_log.path == "/tmp/d.jsonl"
    assert cfg.decision_log.max_pending_bytes == 16 * 1024 * 1024
    cfg = parse(mutated(lambda c: c.update(decision_log={"max_pending_bytes": 1024 * 1024 * 1024})), SRC)
    assert cfg.decision_log.max_pending_bytes == 1024 * 1024 * 1024


def test_boundary_values_are_accepted() -> None:
    def edges(c: dict[str, Any]) -> None:
        c["pdp"].update(timeout_ms=1, retries=0, max_in_flight=1, max_response_bytes=64)
        c["pdp"]["breaker"] = {"failure_threshold": 1, "open_ms": 1, "half_open_probes": 1}
        route0(c).update(timeout_ms=86_400_000, max_body_bytes=0)

    cfg = parse(mutated(edges), SRC)
    assert cfg.pdp.retries == 0
    assert cfg.routes[0].max_body_bytes == 0


def test_partial_breaker_keeps_other_defaults() -> None:
    cfg = parse(mutated(lambda c: c["pdp"].update(breaker={"open_ms": 100})), SRC)
    assert cfg.pdp.breaker == BreakerConfig(failure_threshold=5, open_ms=100, half_open_probes=1)


# --- errors: one per case, with its exact key path -----------------------------------------------------------

ERROR_CASES: list[tuple[str, Mutation, str]] = [
    # unknown keys, at every level
    ("unknown-top", lambda c: c.update(extra=1), "extra: unknown key"),
    ("unknown-pdp", lambda c: c["pdp"].update(timeout=1), "pdp.timeout: unknown key"),
    ("unknown-breaker", lambda c: c["pdp"].update(breaker={"open_s": 5}), "pdp.breaker.open_s: unknown key"),
    ("unknown-route1", second_route(prefix="/x"), "routes[1].prefix: unknown key"),
    ("unknown-match", lambda c: route0(c)["match"].update(regex=".*"), "routes[0].match.regex: unknown key"),
    ("unknown-identity", lambda c: c.update(identity={"user": "x"}), "identity.user: unknown key"),
    ("unknown-log", lambda c: c.update(decision_log={"format": "json"}), "decision_log.format: unknown key"),
    # wrong types
    ("bool-int", lambda c: c["pdp"].update(timeout_ms=True), "pdp.timeout_ms: must be an integer, got a boolean"),
    ("str-int", lambda c: c["pdp"].update(retries="1"), "pdp.retries: must be an integer, got a string"),
    ("float-int", lambda c: route0(c).update(timeout_ms=1.5), "routes[0].timeout_ms: must be an integer, got a number"),
    ("null-int", lambda c: c["pdp"].update(max_in_flight=None), "pdp.max_in_flight: must be an integer, got nothing"),
    (
        "bool-breaker",
        lambda c: c["pdp"].update(breaker={"half_open_probes": False}),
        "pdp.breaker.half_open_probes: must be an integer, got a boolean",
    ),
    ("str-bool", lambda c: route0(c).update(strip_prefix="true"), "routes[0].strip_prefix: must be true or false"),
    ("int-bool", lambda c: route0(c).update(keep_caller_credentials=1), "routes[0].keep_caller_credentials: must be"),
    ("int-str", lambda c: c.update(listen=8080), "listen: must be a non-empty string, got an integer"),
    ("empty-str", lambda c: c["pdp"].update(url=""), "pdp.url: must be a non-empty string"),
    ("list-str", lambda c: route0(c).update(upstream=["http://h"]), "routes[0].upstream: must be a non-empty string"),
    ("pdp-not-mapping", lambda c: c.update(pdp="opa"), "pdp: must be a mapping, got a string"),
    ("breaker-not-mapping", lambda c: c["pdp"].update(breaker=5), "pdp.breaker: must be a mapping, got an integer"),
    ("route-not-mapping", lambda c: c["routes"].append("x"), "routes[1]: must be a mapping, got a string"),
    ("match-not-mapping", lambda c: route0(c).update(match="/x"), "routes[0].match: must be a mapping, got a string"),
    ("routes-not-list", lambda c: c.update(routes={"name": "x"}), "routes: must be a list with at least one route"),
    ("routes-empty", lambda c: c.update(routes=[]), "routes: must be a list with at least one route"),
    ("identity-not-mapping", lambda c: c.update(identity="x"), "identity: must be a mapping"),
    # out of range
    ("timeout-0", lambda c: c["pdp"].update(timeout_ms=0), "pdp.timeout_ms: must be between 1 and 60000, got 0"),
    ("timeout-big", lambda c: c["pdp"].update(timeout_ms=60_001), "pdp.timeout_ms: must be between 1 and 60000"),
    ("retries-neg", lambda c: c["pdp"].update(retries=-1), "pdp.retries: must be between 0 and 10, got -1"),
    ("retries-big", lambda c: c["pdp"].update(retries=11), "pdp.retries: must be between 0 and 10, got 11"),
    ("inflight-0", lambda c: c["pdp"].update(max_in_flight=0), "pdp.max_in_flight: must be between"),
    ("resp-small", lambda c: c["pdp"].update(max_response_bytes=63), "pdp.max_response_bytes: must be between"),
    ("open-0", lambda c: c["pdp"].update(breaker={"open_ms": 0}), "pdp.breaker.open_ms: must be between"),
    (
        "threshold-0",
        lambda c: c["pdp"].update(breaker={"failure_threshold": 0}),
        "pdp.breaker.failure_threshold: must be between",
    ),
    ("probes-0", lambda c: c["pdp"].update(breaker={"half_open_probes": 0}), "pdp.breaker.half_open_probes: must be"),
    ("route-timeout-0", lambda c: route0(c).update(timeout_ms=0), "routes[0].timeout_ms: must be between"),
    ("body-neg", lambda c: route0(c).update(max_body_bytes=-1), "routes[0].max_body_bytes: must be between"),
    ("port-big", lambda c: c.update(listen="127.0.0.1:65536"), "listen: port 65536 is out of range"),
    ("no-port", lambda c: c.update(listen="127.0.0.1"), "listen: must look like host:port"),
    ("no-host", lambda c: c.update(listen=":8080"), "listen: must look like host:port"),
    ("bad-port", lambda c: c.update(admin_listen="127.0.0.1:http"), "admin_listen: must look like host:port"),
    ("same-admin", lambda c: c.update(admin_listen="127.0.0.1:8080"), "admin_listen: must differ from listen"),
    # version
    ("version-2", lambda c: c.update(version=2), "version: must be 1, got 2"),
    ("version-str", lambda c: c.update(version="1"), "version: must be 1, got '1'"),
    ("version-bool", lambda c: c.update(version=True), "version: must be 1, got True"),
    # route names
    ("name-upper", lambda c: route0(c).update(name="CRM"), "routes[0].name: must match [a-z0-9][a-z0-9_-]*"),
    ("name-dash", lambda c: route0(c).update(name="-crm"), "routes[0].name: must match"),
    ("name-dot", lambda c: route0(c).update(name="crm.v1"), "routes[0].name: must match"),
    ("name-space", lambda c: route0(c).update(name="crm api"), "routes[0].name: must match"),
    ("name-unmatched", lambda c: route0(c).update(name="_unmatched"), "routes[0].name: must match"),
    ("name-newline", lambda c: route0(c).update(name="crm\n"), "routes[0].name: must match"),
    ("name-int", lambda c: route0(c).update(name=7), "routes[0].name: must be a non-empty string"),
    # missing required keys
    ("no-version", lambda c: c.pop("version"), "version: is required"),
    ("no-listen", lambda c: c.pop("listen"), "listen: is required"),
    ("no-pdp", lambda c: c.pop("pdp"), "pdp: is required"),
    ("no-kind", lambda c: c["pdp"].pop("kind"), "pdp.kind: is required"),
    ("no-url", lambda c: c["pdp"].pop("url"), "pdp.url: is required"),
    ("no-routes", lambda c: c.pop("routes"), "routes: must be a list with at least one route"),
    ("no-name", lambda c: route0(c).pop("name"), "routes[0].name: is required"),
    ("no-match", lambda c: route0(c).pop("match"), "routes[0].match: is required"),
    ("no-upstream", lambda c: route0(c).pop("upstream"), "routes[0].upstream: is required"),
    ("no-prefix", lambda c: route0(c).update(match={}), "routes[0].match.path_prefix: is required"),
    ("file-no-path", lambda c: c.update(decision_log={"sink": "file"}), "decision_log.path: is required"),
    # bad choices and paths
    ("pdp-kind", lambda c: c["pdp"].update(kind="xacml"), "pdp.kind: must be one of opa, authzen, cedar, got 'xacml'"),
    ("sink", lambda c: c.update(decision_log={"sink": "syslog"}), "decision_log.sink: must be one of"),
    ("path-stdout", lambda c: c.update(decision_log={"path": "/x"}), "decision_log.path: is only used with sink: file"),
    (
        "log-bytes-small",
        lambda c: c.update(decision_log={"max_pending_bytes": 65536}),
        "decision_log.max_pending_bytes: must be between 1048576 and 1073741824, got 65536",
    ),
    (
        "log-bytes-text",
        lambda c: c.update(decision_log={"max_pending_bytes": "16MiB"}),
        "decision_log.max_pending_bytes: must be an integer",
    ),
    (
        "required-nowhere",
        lambda c: c.update(decision_log={"sink": "none", "required": True}),
        "decision_log.required: needs a sink to write to (stdout or file), not none",
    ),
    ("protocol", lambda c: route0(c).update(protocol="grpc"), "routes[0].protocol: must be one of http"),
    ("agent-header", lambda c: c.update(identity={"agent_header": "x agent"}), "identity.agent_header: is not a valid"),
    ("prefix-relative", lambda c: route0(c).update(match={"path_prefix": "crm"}), "routes[0].match.path_prefix: must"),
    ("prefix-space", lambda c: route0(c).update(match={"path_prefix": "/a b"}), "routes[0].match.path_prefix: must"),
    ("prefix-pct", lambda c: route0(c).update(match={"path_prefix": "/a%2fb"}), "routes[0].match.path_prefix: must"),
    ("prefix-query", lambda c: route0(c).update(match={"path_prefix": "/a?b"}), "routes[0].match.path_prefix: must"),
    ("prefix-bslash", lambda c: route0(c).update(match={"path_prefix": "/a\\b"}), "routes[0].match.path_prefix: must"),
    (
        "prefix-dotdot",
        lambda c: route0(c).update(match={"path_prefix": "/a/../b"}),
        "routes[0].match.path_prefix: must not contain dot segments",
    ),
    (
        "prefix-dot",
        lambda c: route0(c).update(match={"path_prefix": "/./"}),
        "routes[0].match.path_prefix: must not contain dot segments",
    ),
    (
        "prefix-empty-segment",
        lambda c: route0(c).update(match={"path_prefix": "/a//b"}),
        "routes[0].match.path_prefix: must not contain empty segments (// or /;)",
    ),
    (
        "prefix-leading-double-slash",
        lambda c: route0(c).update(match={"path_prefix": "//crm/"}),
        "routes[0].match.path_prefix: must not contain empty segments",
    ),
    (
        "prefix-parameter",
        lambda c: route0(c).update(match={"path_prefix": "/crm;v=1/"}),
        "routes[0].match.path_prefix: must not contain ; (a path parameter) unless the route has allow_path_parameters",
    ),
    (
        "prefix-empty-before-parameter",
        lambda c: route0(c).update(match={"path_prefix": "/crm/;v=1"}, allow_path_parameters=True),
        "routes[0].match.path_prefix: must not contain empty segments (// or /;)",
    ),
    (
        "allow-path-parameters-not-bool",
        lambda c: route0(c).update(allow_path_parameters="yes"),
        "routes[0].allow_path_parameters: must be",
    ),
    (
        "upstream-empty-segment",
        lambda c: route0(c).update(upstream="https://crm.internal//api/"),
        "routes[0].upstream: its path must not contain empty segments (// or /;)",
    ),
    (
        "upstream-dot-segment",
        lambda c: route0(c).update(upstream="https://crm.internal/api/../admin"),
        "routes[0].upstream: its path must not contain dot segments",
    ),
    # URLs
    ("url-no-scheme", lambda c: c["pdp"].update(url="127.0.0.1:8181/v1/data"), "pdp.url: must be an http:// or https"),
    ("url-ftp", lambda c: c["pdp"].update(url="ftp://h/x"), "pdp.url: must be an http:// or https://"),
    ("url-no-host", lambda c: c["pdp"].update(url="http:///x"), "pdp.url: must be an http:// or https://"),
    ("url-userinfo", lambda c: c["pdp"].update(url="http://u:p@h/x"), "pdp.url: must not carry user credentials"),
    ("url-user", lambda c: route0(c).update(upstream="http://u@h/x"), "routes[0].upstream: must not carry user"),
    ("url-query", lambda c: c["pdp"].update(url="http://h/x?a=1"), "pdp.url: must not have a query or a fragment"),
    ("url-fragment", lambda c: route0(c).update(upstream="http://h/x#f"), "routes[0].upstream: must not have a query"),
    ("url-empty-query", lambda c: route0(c).update(upstream="http://h/x?"), "routes[0].upstream: must not have a"),
    ("url-empty-frag", lambda c: route0(c).update(upstream="http://h/x#"), "routes[0].upstream: must not have a"),
    ("url-port", lambda c: route0(c).update(upstream="http://h:99999/"), "routes[0].upstream: has an invalid port"),
    ("url-port-text", lambda c: route0(c).update(upstream="http://h:x/"), "routes[0].upstream: has an invalid port"),
    ("url-bad-ipv6", lambda c: route0(c).update(upstream="http://[::1/x"), "routes[0].upstream: is not a valid URL"),
    # keys that belong to another PDP kind
    ("cedar-url", lambda c: c["pdp"].update(kind="cedar", policies="/p"), "pdp.url: is not used with kind cedar"),
    ("cedar-needs-policies", lambda c: c.update(pdp={"kind": "cedar"}), "pdp.policies: is required"),
    ("opa-policies", lambda c: c["pdp"].update(policies="/p"), "pdp.policies: is not used with kind opa"),
    (
        "opa-mapping",
        lambda c: route0(c).update(mapping={"action": {"name": "call"}}),
        "routes[0].mapping: is only used with pdp.kind authzen or cedar",
    ),
    ("tls-half", lambda c: c["pdp"].update(tls={"cert_file": "/c"}), "pdp.tls: cert_file and key_file go together"),
    ("auth-format", lambda c: c["pdp"].update(auth={"value_file": "/t", "format": "x"}), "pdp.auth.format: must hold"),
    ("auth-file", lambda c: c["pdp"].update(auth={"header": "x-key"}), "pdp.auth.value_file: is required"),
    (
        "auth-framing",
        lambda c: c["pdp"].update(auth={"header": "Content-Length", "value_file": "/t"}),
        "pdp.auth.header: is a header the PDP client writes itself: 'Content-Length'",
    ),
    (
        "auth-host",
        lambda c: c["pdp"].update(auth={"header": "host", "value_file": "/t"}),
        "pdp.auth.header: is a header the PDP client writes itself",
    ),
    ("attr-name", lambda c: c.update(identity={"attributes": {"a-b": "x"}}), "identity.attributes: 'a-b' is not"),
    ("attr-reserved", lambda c: c.update(identity={"attributes": {"agent": "x"}}), "identity.attributes.agent: is a"),
    ("attr-type", lambda c: c.update(identity={"attributes": {"n": 1}}), "identity.attributes.n: must be a string"),
    # keys of later capabilities: refused by name
    (
        "tracing-exporter",
        lambda c: c.update(tracing={"exporter": "jaeger"}),
        "tracing.exporter: must be one of otlp, console",
    ),
    (
        "tracing-ratio",
        lambda c: c.update(tracing={"sample_ratio": 2}),
        "tracing.sample_ratio: must be a number from 0 to 1",
    ),
    (
        "tracing-endpoint",
        lambda c: c.update(tracing={"exporter": "console", "endpoint": "http://x:4318/v1/traces"}),
        "tracing.endpoint: is only used with exporter: otlp",
    ),
    ("grace-negative", lambda c: c.update(shutdown_grace_ms=-1), "shutdown_grace_ms: must be between 0 and 3600000"),
    ("workers-zero", lambda c: c.update(workers=0), "workers: must be between 1 and 64, got 0"),
    (
        "max-connections-zero",
        lambda c: c.update(max_connections=0),
        "max_connections: must be between 1 and 1000000, got 0",
    ),
    ("workers-text", lambda c: c.update(workers="2"), "workers: must be an integer, got a string"),
    (
        "jwt-audiences",
        lambda c: c.update(identity={"jwt": {"issuers": ["https://i"], "jwks_file": "/x"}}),
        "identity.jwt.audiences: is required",
    ),
    ("mtls-cert", lambda c: c.update(identity={"mtls": {"ca_file": "/x"}}), "identity.mtls.cert_file: is required"),
    ("cred-no-value", lambda c: route0(c).update(credential={"header": "x"}), "routes[0].credential: needs exactly"),
    (
        "cred-both",
        lambda c: route0(c).update(credential={"header": "x", "value_file": "/f", "value_env": "E"}),
        "routes[0].credential: needs exactly one",
    ),
    (
        "cred-format",
        lambda c: route0(c).update(credential={"header": "x", "format": "Bearer", "value_env": "E"}),
        "routes[0].credential.format: must hold",
    ),
    (
        "cred-header",
        lambda c: route0(c).update(credential={"header": "x y", "value_env": "E"}),
        "routes[0].credential.header: is not a valid header name",
    ),
    ("tunnel-without-host", lambda c: route0(c).update(tunnel=True), "routes[0].tunnel: needs match.host"),
    ("tunnel-not-bool", lambda c: route0(c).update(tunnel="yes"), "routes[0].tunnel: must be true or false"),
    (
        "identity-needs-jwt",
        lambda c: route0(c).update(require_identity=True),
        "routes[0].require_identity: needs identity.jwt",
    ),
    ("filter-http", lambda c: route0(c).update(filter_tools_list=True), "routes[0].filter_tools_list: is only for"),
    ("batch-http", lambda c: route0(c).update(max_batch_messages=8), "routes[0].max_batch_messages: is only for"),
    ("values-http", lambda c: route0(c).update(max_json_values=8), "routes[0].max_json_values: is only for"),
    (
        "values-zero",
        lambda c: route0(c).update(protocol="mcp", max_json_values=0),
        "routes[0].max_json_values: must be between 1 and 10000000, got 0",
    ),
    (
        "batch-zero",
        lambda c: route0(c).update(protocol="mcp", max_batch_messages=0),
        "routes[0].max_batch_messages: must be between 1 and 1000, got 0",
    ),
    (
        "batch-huge",
        lambda c: route0(c).update(protocol="mcp", max_batch_messages=1001),
        "routes[0].max_batch_messages: must be between 1 and 1000, got 1001",
    ),
    (
        "batch-text",
        lambda c: route0(c).update(protocol="mcp", max_batch_messages="16"),
        "routes[0].max_batch_messages: must be an integer",
    ),
    ("deny-status-http", lambda c: route0(c).update(deny_status=200), "routes[0].deny_status: 200 is only for"),
    ("filter-prompts-http", lambda c: route0(c).update(filter_prompts_list=True), "routes[0].filter_prompts_list"),
    ("filter-resources-http", lambda c: route0(c).update(filter_resources_list=True), "routes[0].filter_resources"),
    ("seal-keys-empty", lambda c: c.update(seal_key_files=[]), "seal_key_files: must be a non-empty list"),
    ("seal-keys-not-strings", lambda c: c.update(seal_key_files=[1]), "seal_key_files: must be a non-empty list"),
    ("deny-status-value", lambda c: route0(c).update(protocol="mcp", deny_status=401), "routes[0].deny_status: must"),
    (
        "host-scheme",
        lambda c: route0(c)["match"].update(host="http://api.example.com"),
        "routes[0].match.host: must be",
    ),
    ("host-path", lambda c: route0(c)["match"].update(host="api.example.com/x"), "routes[0].match.host: must be"),
    ("host-userinfo", lambda c: route0(c)["match"].update(host="u@api.example.com"), "routes[0].match.host: must be"),
    ("host-bad-port", lambda c: route0(c)["match"].update(host="api.example.com:0"), "routes[0].match.host: must be"),
    ("host-empty", lambda c: route0(c)["match"].update(host=""), "routes[0].match.host: must be a non-empty"),
    (
        "tunnel-upstream-elsewhere",
        lambda c: c["routes"][0].update(
            match={"host": "api.example.com:8443"}, upstream="https://other:8443", tunnel=True
        ),
        "routes[0].upstream: must name the tunnel's host and port api.example.com:8443",
    ),
]


@pytest.mark.parametrize(("mutation", "expected"), [pytest.param(m, e, id=i) for i, m, e in ERROR_CASES])
def test_error_names_file_and_key_path(mutation: Mutation, expected: str) -> None:
    found = problems(mutated(mutation))
    wanted = f"{SRC}: {expected}"
    assert any(p.startswith(wanted) for p in found), f"{wanted!r} not in {found!r}"
    for p in found:
        assert p.startswith(f"{SRC}: "), p
        assert "\n" not in p  # one line per problem


def test_unknown_key_lists_the_expected_keys() -> None:
    (problem,) = problems(mutated(lambda c: c["pdp"].update(urls="x")))
    assert problem.startswith("f.yaml: pdp.urls: unknown key (expected one of: ")
    assert "breaker" in problem
    assert "timeout_ms" in problem


def test_top_level_must_be_a_mapping() -> None:
    assert problems([1, 2]) == ["f.yaml: must be a mapping, got a list"]
    assert problems(None) == ["f.yaml: must be a mapping, got nothing"]


def test_require_identity_without_a_token_source_is_refused() -> None:
    found = problems(mutated(lambda c: route0(c).update(require_identity=True)))
    assert found == ["f.yaml: routes[0].require_identity: needs identity.jwt (where verified tokens come from)"]


def test_host_routes_forward_proxy_mode() -> None:
    def hosts(c: dict[str, Any]) -> None:
        c["routes"].append({"name": "api", "match": {"host": "API.Example.com"}, "upstream": "https://api.example.com"})
        c["routes"].append(
            {
                "name": "api-tunnel",
                "match": {"host": "api.example.com:443", "path_prefix": "/v1"},
                "upstream": "https://api.example.com",
                "tunnel": True,
            }
        )
        c["routes"].append({"name": "v6", "match": {"host": "[::1]:8080"}, "upstream": "http://[::1]:8080"})

    cfg = parse(mutated(hosts), SRC)
    crm, api, tunnel, v6 = cfg.routes
    assert (crm.host, crm.tunnel) == (None, False)
    assert (api.host, api.path_prefix, api.tunnel) == ("api.example.com", "/", False)
    assert (tunnel.host, tunnel.path_prefix, tunnel.tunnel) == ("api.example.com:443", "/v1", True)
    assert v6.host == "[::1]:8080"


def test_host_routes_duplicates() -> None:
    def dup(c: dict[str, Any]) -> None:
        c["routes"].append({"name": "a", "match": {"host": "h.example"}, "upstream": "http://h.example"})
        c["routes"].append({"name": "b", "match": {"host": "h.example", "path_prefix": "/"}, "upstream": "http://h"})
        c["routes"].append({"name": "c", "match": {"path_prefix": "/"}, "upstream": "http://h"})  # no host: distinct
        c["routes"].append(
            {"name": "t1", "match": {"host": "t.example"}, "upstream": "https://t.example", "tunnel": True}
        )
        c["routes"].append(
            {
                "name": "t2",
                "match": {"host": "t.example:443", "path_prefix": "/x"},
                "upstream": "https://t.example",
                "tunnel": True,
            }
        )

    assert problems(mutated(dup)) == [
        "f.yaml: routes[2].match.path_prefix: duplicates the host and prefix of routes[1]",
        "f.yaml: routes[5].tunnel: duplicates the tunnel of routes[4]",
    ]


def test_duplicate_route_names_and_prefixes() -> None:
    def dup(c: dict[str, Any]) -> None:
        c["routes"].append({"name": "crm", "match": {"path_prefix": "/other"}, "upstream": "http://h"})
        c["routes"].append({"name": "third", "match": {"path_prefix": "/crm/"}, "upstream": "http://h"})

    found = problems(mutated(dup))
    assert found == [
        "f.yaml: routes[1].name: duplicates the name of routes[0]",
        "f.yaml: routes[2].match.path_prefix: duplicates the prefix of routes[0]",
    ]


def test_duplicate_key_paths_count_invalid_routes_too() -> None:
    """The index in a duplicate error is the route's position in the file, also after an invalid route."""

    def dup(c: dict[str, Any]) -> None:
        c["routes"].insert(0, {"name": "BAD", "match": {"path_prefix": "/bad"}, "upstream": "http://h"})
        c["routes"].append({"name": "crm", "match": {"path_prefix": "/crm/"}, "upstream": "http://h"})

    found = problems(mutated(dup))
    assert found == [
        "f.yaml: routes[0].name: must match [a-z0-9][a-z0-9_-]*, got 'BAD'",
        "f.yaml: routes[2].name: duplicates the name of routes[1]",
        "f.yaml: routes[2].match.path_prefix: duplicates the prefix of routes[1]",
    ]


def test_allow_path_parameters_is_read_and_permits_a_parameter_in_the_prefix() -> None:
    data = minimal()
    route0(data).update(match={"path_prefix": "/crm;v=1/"}, allow_path_parameters=True)
    (route,) = parse(data, SRC).routes
    assert route.allow_path_parameters is True
    assert route.path_prefix == "/crm;v=1/"


def test_prefixes_differing_by_a_trailing_slash_are_distinct() -> None:
    cfg = parse(mutated(second_route()), SRC)
    assert [r.path_prefix for r in cfg.routes] == ["/crm/", "/two"]


def test_several_errors_are_reported_at_once() -> None:
    def broken(c: dict[str, Any]) -> None:
        c["version"] = 2
        c["bogus"] = True
        c["pdp"]["timeout_ms"] = "fast"
        c["pdp"]["breaker"] = {"open_ms": -5}
        route0(c)["name"] = "Bad Name"
        route0(c)["match"]["path_prefix"] = "nope"
        c["routes"].append({"name": "two", "match": {"host": "http://x"}, "upstream": "ftp://h"})

    found = problems(mutated(broken))
    paths = [p.split(": ")[1] for p in found]
    assert sorted(paths) == sorted(
        [
            "bogus",
            "version",
            "pdp.timeout_ms",
            "pdp.breaker.open_ms",
            "routes[0].name",
            "routes[0].match.path_prefix",
            "routes[1].match.host",
            "routes[1].upstream",
        ]
    )


def test_parse_does_not_modify_its_input() -> None:
    data = minimal()
    before = copy.deepcopy(data)
    parse(data, SRC)
    assert data == before


# --- YAML files -----------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pep.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


def test_yaml_duplicate_top_level_key_is_refused(tmp_path: Path) -> None:
    text = FULL_YAML + "listen: 0.0.0.0:80\n"
    (problem,) = load_problems(write(tmp_path, text))
    assert problem.startswith(f"{tmp_path / 'pep.yaml'}: line ")
    assert "duplicate key 'listen'" in problem


def test_yaml_duplicate_nested_key_is_refused(tmp_path: Path) -> None:
    text = FULL_YAML.replace("  retries: 2\n", "  retries: 2\n  retries: 0\n")
    (problem,) = load_problems(write(tmp_path, text))
    assert "duplicate key 'retries'" in problem
    assert ": line 12: " in problem  # the second `retries`


def test_yaml_duplicate_key_in_flow_mapping_is_refused(tmp_path: Path) -> None:
    text = FULL_YAML.replace("open_ms: 1000,", "open_ms: 1000, open_ms: 1,")
    (problem,) = load_problems(write(tmp_path, text))
    assert "duplicate key 'open_ms'" in problem


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    (problem,) = load_problems(write(tmp_path, "version: 1\nlisten: [unclosed\n"))
    assert problem.startswith(f"{tmp_path / 'pep.yaml'}: line ")


def test_yaml_python_tags_are_refused(tmp_path: Path) -> None:
    (problem,) = load_problems(write(tmp_path, "version: !!python/object/apply:os.getcwd []\n"))
    assert problem.startswith(str(tmp_path / "pep.yaml"))


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    (problem,) = load_problems(tmp_path / "absent.yaml")
    assert problem.startswith(f"{tmp_path / 'absent.yaml'}: cannot read: ")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\nlisten: \xff\n")
    (problem,) = load_problems(bad)
    assert problem.startswith(f"{bad}: cannot read: ")


def test_empty_file(tmp_path: Path) -> None:
    assert load_problems(write(tmp_path, "")) == [f"{tmp_path / 'pep.yaml'}: must be a mapping, got nothing"]


def test_yaml_errors_carry_key_paths(tmp_path: Path) -> None:
    text = FULL_YAML.replace("match: {path_prefix: /mcp}", "match: {path_prefix: mcp}")
    assert load_problems(write(tmp_path, text)) == [
        f"{tmp_path / 'pep.yaml'}: routes[1].match.path_prefix: must start with / and hold only unreserved path "
        "characters, got 'mcp'"
    ]


# --- the CLI --------------------------------------------------------------------------------------------------


def test_cli_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The decision log's directory must exist where the check runs, as where `pep run` starts.
    yaml_text = FULL_YAML.replace("/var/log/pep/decisions.jsonl", str(tmp_path / "decisions.jsonl"))
    assert cli.main(["check", "-c", str(write(tmp_path, yaml_text))]) == 0
    out, err = capsys.readouterr()
    assert out == "ok\n"
    assert err == ""
    assert not (tmp_path / "decisions.jsonl").exists()  # checked, not created


def test_cli_check_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, FULL_YAML.replace("open_ms: 1000", "open_ms: soon").replace("name: crm", "name: CRM"))
    assert cli.main(["check", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2
    assert f"{path}: pdp.breaker.open_ms: must be an integer, got a string" in lines
    assert any(line.startswith(f"{path}: routes[0].name: ") for line in lines)


def test_cli_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_requires_a_command_and_a_config() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["check"])
    assert info.value.code == 2


def test_console_entry_point_is_cli_main() -> None:
    (entry,) = entry_points(group="console_scripts", name="pep")
    assert entry.load() is cli.main


def test_cli_module_runs_in_a_subprocess(tmp_path: Path) -> None:
    broken = write(tmp_path, FULL_YAML.replace("retries: 2", "retries: 99"))
    proc = subprocess.run(
        [sys.executable, "-m", "pep", "check", "-c", str(broken)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"{broken}: pdp.retries: must be between 0 and 10, got 99\n"
