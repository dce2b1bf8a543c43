"""PDP answers as they arrive (status, content type, raw body bytes, echoed request id), against fuzz/oracles.py
(shared with the atheris harness fuzz/fuzz_pdp_answers.py).

test_opa_answer.py and test_authzen.py already show that no decoded JSON value but the exact allow shapes allows.
Here the bytes themselves vary: duplicate keys (`{"result":false,"result":true}`), trailing data, a byte-order
mark, NaN, whitespace, truncation, any status and content type. For all of them: OPA allows only on
`{"result": true}` or `{"result": {"allow": true, ...}}`, AuthZEN only on `{"decision": true, ...}` without
obligations, each with the reason the README gives ("PDPs"), and a batch answer is one result per evaluation.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fuzz.oracles import (
    ODD_CONTENT_TYPES,
    authzen_expected,
    check_authzen,
    check_authzen_batch,
    check_opa,
    examples,
    opa_expected,
)
from pep.decision import Reason
from pep.pdp import authzen, opa
from pep.pdp.transport import RawAnswer

LEAF = st.none() | st.booleans() | st.integers(-2, 2) | st.sampled_from(["", "true", "allow", 1.0, 0.0])
JSON = st.recursive(
    LEAF,
    lambda inner: (
        st.lists(inner, max_size=2)
        | st.dictionaries(st.sampled_from(["result", "allow", "decision", "x", "headers"]), inner, max_size=2)
    ),
    max_leaves=6,
)
HEADERS = st.dictionaries(st.sampled_from(["x-a", "host", "X-Tenant"]), st.sampled_from(["1", "t"]) | JSON, max_size=2)
# README "Approvals": who approves (a non-empty printable string of at most 256 characters, no surrounding space),
# a message of at most 1024 characters, an RFC 3339 date-time with seconds and an offset.
APPROVER = st.sampled_from(["alice", "alice@example.com", "", " alice", "a\nb", "x" * 257, "\u00e9ve"]) | JSON
MESSAGE = st.sampled_from(["m", "", "m" * 1025]) | JSON
APPROVAL = st.fixed_dictionaries({"approver": APPROVER}, optional={"message": MESSAGE, "quorum": st.just(2)}) | JSON
EXPIRES = st.sampled_from(
    [
        "2026-04-30T20:25:00Z",
        "2026-04-30t20:25:00.5+02:00",
        "2026-04-30T20:25:00-23:59",
        "2026-04-30T20:25:00+24:00",
        "2026-13-30T20:25:00Z",
        "2026-02-29T00:00:00Z",
        "2028-02-29T00:00:00Z",
        "2026-04-30T24:00:00Z",
        "2026-04-30T23:59:60Z",
        "2026-04-30T20:25Z",
        "2026-04-30T20:25:00",
        "2026-04-30 20:25:00Z",
        "0000-01-01T00:00:00Z",
    ]
)
ACCESS_REQUEST = (
    st.fixed_dictionaries(
        {"approver": APPROVER},
        optional={
            "expires_at": EXPIRES | EXPIRES | JSON,
            "display": st.fixed_dictionaries({}, optional={"title": MESSAGE, "description": MESSAGE}) | JSON,
            "template": st.just("t"),
        },
    )
    | JSON
)
SCOPE = st.sampled_from(["crm.read", "crm.write", "", "a b", "x" * 257, "\u00e9"]) | JSON
NARROWING = (
    st.fixed_dictionaries(
        {},
        optional={
            "audience": SCOPE,
            "scopes": st.lists(SCOPE, max_size=3) | JSON,
            "lifetime": st.just(60),
        },
    )
    | JSON
)
NEAR_OPA = st.fixed_dictionaries({"result": st.booleans()}) | st.fixed_dictionaries(
    {
        "result": st.fixed_dictionaries(
            {"allow": st.booleans()},
            optional={
                "headers": st.dictionaries(st.sampled_from(["x-a", "x-b"]), st.just("v")),
                "reason": st.just("r"),
                "approval": APPROVAL,
                "credential": NARROWING,
            },
        )
    }
)
WILD_OPA = st.fixed_dictionaries(
    {},
    optional={
        "result": st.booleans()
        | JSON
        | st.fixed_dictionaries(
            {}, optional={"allow": st.booleans() | JSON, "headers": HEADERS | JSON, "reason": st.text(max_size=3)}
        ),
        "decision_id": st.text(max_size=3),
    },
)
OPA = NEAR_OPA | NEAR_OPA | WILD_OPA
CONTEXT = st.fixed_dictionaries(
    {},
    optional={
        "obligations": st.just([]) | st.none() | JSON,
        "reason": JSON,
        "reason_user": JSON,
        "access_request": ACCESS_REQUEST,
        "credential": NARROWING,
    },
)
NEAR_DECISION = st.fixed_dictionaries(
    {"decision": st.booleans()},
    optional={
        "context": st.fixed_dictionaries(
            {},
            optional={
                "obligations": st.just([]),
                "reason": st.just("r"),
                "access_request": ACCESS_REQUEST,
                "credential": NARROWING,
            },
        )
    },
)
DECISION = NEAR_DECISION | st.fixed_dictionaries(
    {}, optional={"decision": st.booleans() | JSON, "context": CONTEXT | JSON}
)
AUTHZEN = (
    NEAR_DECISION
    | DECISION
    | st.fixed_dictionaries({"evaluations": st.lists(NEAR_DECISION, max_size=4)})
    | st.fixed_dictionaries({}, optional={"evaluations": st.lists(DECISION | JSON, max_size=3) | JSON})
)
# Mostly what a working PDP sends, so that the JSON itself is what varies most.
USUAL_CONTENT_TYPE = st.just("application/json")
CONTENT_TYPES = USUAL_CONTENT_TYPE | USUAL_CONTENT_TYPE | USUAL_CONTENT_TYPE | st.sampled_from(ODD_CONTENT_TYPES)
STATUSES = (
    st.just(200)
    | st.just(200)
    | st.just(200)
    | st.sampled_from([201, 204, 299, 0, 100, 199, 300, 302, 400, 404, 500, 502, 503, 504])
)


@st.composite
def raw_json(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    """A JSON object as a PDP might send it, sometimes with something wrong that a lax reader would accept."""
    value = draw(values)
    data = orjson.dumps(value)
    how = draw(st.sampled_from(["as is"] * 12 + ["spaced", "duplicate", "trailing", "bom", "nan", "cut", "byte"]))
    if how == "spaced":
        return b"\n " + data.replace(b":", b" : ").replace(b",", b" ,\r\n") + b" \t"
    if how == "duplicate" and isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        other = draw(JSON | st.booleans())
        # the earlier copy holds the other value: a last-wins reader sees the real one, a first-wins reader not
        return b"{" + orjson.dumps(key) + b":" + orjson.dumps(other) + b"," + data[1:]
    if how == "trailing":
        return data + draw(st.sampled_from([b"x", b"{}", b"\x00", b" true", b"\n\n"]))
    if how == "bom":
        return b"\xef\xbb\xbf" + data
    if how == "nan" and isinstance(value, dict):
        return b'{"nan":NaN,' + data[1:] if len(data) > 2 else b'{"nan":NaN}'
    if how == "cut" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "byte" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    return data


@st.composite
def answers(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> RawAnswer:
    return RawAnswer(
        status=draw(STATUSES),
        content_type=draw(CONTENT_TYPES),
        body=draw(st.binary(max_size=16)) if draw(st.integers(0, 9)) == 0 else draw(raw_json(values)),
        oversize=draw(st.booleans()) and draw(st.booleans()) and draw(st.booleans()),
        undecodable=draw(st.booleans()) and draw(st.booleans()) and draw(st.booleans()),
        request_id=draw(st.sampled_from([None, None, "rid-1", "rid-2", ""])),
    )


@settings(max_examples=examples(500), deadline=None)
@given(answers(OPA))
def test_opa_allows_only_on_the_exact_shapes_whatever_the_bytes(answer: RawAnswer) -> None:
    event(f"expected {opa_expected(answer)}")
    check_opa(answer, opa.parse_answer(answer))


@pytest.mark.parametrize(
    "body",
    [
        b'{"0\\ude70x":{"reason_admin":{"en":"no"}}}',  # found by the pdp_answers fuzzer (a lone low surrogate)
        b'{"result":true,"x":"\\ud800"}',  # a lone high surrogate beside an allow
        b'{"result":{"allow":true,"headers":{"x":"\\udfff"}}}',
    ],
)
def test_an_answer_with_a_lone_surrogate_is_malformed_as_strict_json_refuses_it(body: bytes) -> None:
    """RFC 8259's grammar allows a lone surrogate escape, I-JSON does not, and strict JSON (the README) refuses it:
    the oracle's reference refuses it too, so the expected reason is `pdp_malformed`, whatever else is there."""
    answer = RawAnswer(200, "application/json", body, False)
    assert opa_expected(answer) is Reason.PDP_MALFORMED
    check_opa(answer, opa.parse_answer(answer))


@settings(max_examples=examples(500), deadline=None)
@given(answers(AUTHZEN))
def test_authzen_allows_only_on_decision_true_whatever_the_bytes(answer: RawAnswer) -> None:
    event(f"expected {authzen_expected(answer, 'rid-1')}")
    check_authzen(answer, "rid-1", authzen.parse_evaluation(answer, "rid-1"))


@settings(max_examples=examples(300), deadline=None)
@given(answers(AUTHZEN), st.integers(1, 4))
def test_an_authzen_batch_is_one_result_per_evaluation(answer: RawAnswer, count: int) -> None:
    check_authzen_batch(answer, "rid-1", count, authzen.parse_evaluations(answer, "rid-1", count))
