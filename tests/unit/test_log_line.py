"""A decision log line is bounded whatever the caller sent: strings cut, big fields trimmed, cuts named."""

from __future__ import annotations

from typing import Any

import orjson

from pep.log_line import FIELD_BUDGET, FIELD_MAX, encode

MIB = 1024 * 1024


def entry(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "time": "2026-01-01T00:00:00.000Z",
        "request_id": "r1",
        "decision_id": "d1",
        "route": "mcp",
        "method": "POST",
        "path": "/mcp",
        "subject": {"workload": "spiffe://test/agent", "agent": "bot"},
        "mcp_method": "tools/call",
        "mcp_name": "search",
        "decision": "deny",
        "reason": "policy_denied",
        "pdp_ms": 0.5,
        "attempts": 1,
        "circuit": "closed",
        "trace_id": "0" * 32,
    }
    return {**base, **fields}


def test_a_small_line_is_written_as_is() -> None:
    e = entry(arguments={"q": "x" * 100})
    assert encode(e) == orjson.dumps(e) + b"\n"


def test_a_huge_tool_name_is_cut_and_named() -> None:
    line = encode(entry(mcp_name="n" * MIB, path="/mcp/" + "p" * 5000, detail="d" * 3000))
    out = orjson.loads(line)
    assert out["mcp_name"] == "n" * FIELD_MAX
    assert out["path"] == "/mcp/" + "p" * (FIELD_MAX - 5)
    assert out["detail"] == "d" * FIELD_MAX
    assert out["truncated"] == ["path", "mcp_name", "detail"]
    assert (out["decision"], out["reason"], out["decision_id"]) == ("deny", "policy_denied", "d1")  # never cut
    assert len(line) < 4 * FIELD_MAX


def test_every_caller_string_is_cut_wherever_it_is() -> None:
    huge = "z" * MIB
    e = entry(
        method="M" * 5000,
        subject={"workload": "spiffe://test/agent", "agent": huge, "claims": {"sub": huge}},
        model=huge,
        arguments={"to": huge, huge: 1, "nested": [{"deep": huge}]},
        messages=[{"mcp_method": "tools/call", "mcp_name": huge, "reason": "allowed"}] * 3,
        filtered={"kept": [huge], "removed": [huge]},
    )
    line = encode(e)
    out = orjson.loads(line)
    assert out["truncated"] == ["method", "subject", "model", "arguments", "messages", "filtered"]
    assert out["subject"]["agent"] == "z" * FIELD_MAX
    assert out["arguments"]["nested"][0]["deep"] == "z" * FIELD_MAX
    assert "z" * FIELD_MAX in out["arguments"]  # a key too
    assert len(line) < 12 * FIELD_BUDGET


def test_many_small_values_are_bounded_per_field() -> None:
    args = {f"k{i}": i for i in range(100_000)}
    line = encode(entry(arguments=args, messages=[{"mcp_name": "a"}] * 100_000))
    out = orjson.loads(line)
    assert out["truncated"] == ["arguments", "messages"]
    assert 0 < len(out["arguments"]) < FIELD_BUDGET // 8
    assert list(out["arguments"]) == [f"k{i}" for i in range(len(out["arguments"]))]  # the first ones, in order
    assert 0 < len(out["messages"]) < FIELD_BUDGET // 8
    assert len(line) < 4 * FIELD_BUDGET


def test_deep_nesting_is_cut_too() -> None:
    deep: Any = "bottom"
    for _ in range(1000):  # deeper than orjson itself serialises
        deep = [deep]
    out = orjson.loads(encode(entry(arguments={"a": deep})))
    assert out["truncated"] == ["arguments"]
    assert "bottom" not in orjson.dumps(out).decode()


def test_a_string_that_is_not_utf8_is_written_escaped() -> None:
    """A header byte that is not UTF-8 (the agent header, decoded with surrogateescape) made `encode` raise."""
    e = entry(subject={"workload": "spiffe://test/agent", "agent": "bot\udcff", "k\ud800": "é"})
    line = encode(e)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert orjson.loads(line)["subject"] == {"workload": "spiffe://test/agent", "agent": "bot\\udcff", "k\\ud800": "é"}
