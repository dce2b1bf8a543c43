"""pep.pdp.authzen, the pure parts: the metadata URL and lifetime, and every way a metadata document, a decision,
an evaluation answer or a batch answer is read (README "AuthZEN", AuthZEN 1.0 sections 3 to 9)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.cache_control import ttl_of
from pep.decision import Reason
from pep.pdp import Failure, Verdict
from pep.pdp.authzen import (
    DEFAULT_TTL_S,
    Endpoints,
    metadata_url,
    parse_decision,
    parse_evaluation,
    parse_evaluations,
    parse_metadata,
)
from pep.pdp.transport import RawAnswer

BASE = "https://pdp.example.com"
JSON_CT = "application/json"


def raw(
    body: Any,
    *,
    status: int = 200,
    content_type: str = JSON_CT,
    request_id: str | None = None,
    cache_control: str | None = None,
) -> RawAnswer:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return RawAnswer(status, content_type, data, False, False, request_id, cache_control)


def metadata(base: str = BASE, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "policy_decision_point": base,
        "access_evaluation_endpoint": f"{base}/access/v1/evaluation",
        "access_evaluations_endpoint": f"{base}/access/v1/evaluations",
        "search_subject_endpoint": f"{base}/access/v1/search/subject",
        "capabilities": ["urn:example:unknown"],
    }
    for key, value in overrides.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def verdict(result: Verdict | Failure) -> Verdict:
    assert isinstance(result, Verdict), result
    return result


def failure(result: object) -> Failure:
    assert isinstance(result, Failure), result
    return result


# --- metadata_url (RFC 8615: the well-known segment goes between the authority and the path) ------------------


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("https://pdp.example.com", "https://pdp.example.com/.well-known/authzen-configuration"),
        ("https://pdp.example.com/", "https://pdp.example.com/.well-known/authzen-configuration"),
        ("http://127.0.0.1:8181", "http://127.0.0.1:8181/.well-known/authzen-configuration"),
        ("https://pdp.example.com/tenant1", "https://pdp.example.com/.well-known/authzen-configuration/tenant1"),
        ("https://pdp.example.com/tenant1/", "https://pdp.example.com/.well-known/authzen-configuration/tenant1"),
        ("https://pdp.example.com:8443/a/b", "https://pdp.example.com:8443/.well-known/authzen-configuration/a/b"),
    ],
)
def test_metadata_url_inserts_the_well_known_segment(base: str, url: str) -> None:
    assert metadata_url(base) == url


# --- ttl_of ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "ttl"),
    [
        (None, DEFAULT_TTL_S),
        ("", DEFAULT_TTL_S),
        ("max-age=60", 60.0),
        ("Max-Age=60", 60.0),
        ("public, max-age=5", 5.0),
        ("max-age=0", 0.0),
        ("no-store", 0.0),
        ("no-cache", 0.0),
        ("private, no-cache", 0.0),
        ("NO-STORE", 0.0),
        # no-store / no-cache win wherever they appear: the PDP said not to reuse the document.
        ("max-age=60, no-store", 0.0),
        ("max-age=60, no-cache", 0.0),
        ("no-store, max-age=60", 0.0),
        # Directives that say nothing about the lifetime, and values that cannot be read: the default.
        ("public", DEFAULT_TTL_S),
        ("must-revalidate", DEFAULT_TTL_S),
        ("max-age", DEFAULT_TTL_S),
        ("max-age=", DEFAULT_TTL_S),
        ("max-age=abc", DEFAULT_TTL_S),
        ("max-age=-5", DEFAULT_TTL_S),
        ("max-age=1.5", DEFAULT_TTL_S),
        ("max-age=\u00b2", DEFAULT_TTL_S),  # str.isdigit() is true for these, float() refuses or misreads them
        ("max-age=\u0663", DEFAULT_TTL_S),
        ("max-age=7, max-age=60", 7.0),
        (";;,,==", DEFAULT_TTL_S),
    ],
)
def test_ttl_of(header: str | None, ttl: float) -> None:
    assert ttl_of(header, DEFAULT_TTL_S) == ttl


def test_ttl_of_uses_the_given_default() -> None:
    assert ttl_of(None, 7.0) == 7.0
    assert ttl_of("max-age=garbage", 7.0) == 7.0
    assert ttl_of("max-age=9", 7.0) == 9.0


@given(st.text(max_size=60))
def test_ttl_of_never_raises_and_stays_in_bounds(header: str) -> None:
    ttl = ttl_of(header, DEFAULT_TTL_S)
    assert ttl >= 0.0
    if "max-age" not in header.lower():
        assert ttl in (0.0, DEFAULT_TTL_S)


# --- parse_metadata ------------------------------------------------------------------------------------------


def test_valid_metadata_gives_both_endpoints() -> None:
    result = parse_metadata(raw(metadata()), BASE)
    assert result == Endpoints(f"{BASE}/access/v1/evaluation", f"{BASE}/access/v1/evaluations")


def test_metadata_without_a_batch_endpoint_has_none() -> None:
    result = parse_metadata(raw(metadata(access_evaluations_endpoint=None)), BASE)
    assert result == Endpoints(f"{BASE}/access/v1/evaluation", None)


@pytest.mark.parametrize(
    ("configured", "announced"),
    [(BASE, BASE + "/"), (BASE + "/", BASE), (BASE + "/tenant1", BASE + "/tenant1/")],
)
def test_a_trailing_slash_on_either_side_is_tolerated(configured: str, announced: str) -> None:
    doc = metadata(announced, access_evaluation_endpoint=f"{BASE}/e", access_evaluations_endpoint=None)
    assert parse_metadata(raw(doc), configured) == Endpoints(f"{BASE}/e", None)


def test_endpoints_may_sit_on_another_path_of_the_same_origin() -> None:
    doc = metadata(
        access_evaluation_endpoint="https://PDP.example.com/v2/eval",
        access_evaluations_endpoint="https://pdp.example.com/v2/evals",
    )
    assert parse_metadata(raw(doc), BASE) == Endpoints(
        "https://PDP.example.com/v2/eval", "https://pdp.example.com/v2/evals"
    )


@pytest.mark.parametrize(
    "announced",
    [
        "https://evil.example.com",
        "http://pdp.example.com",  # another scheme
        "https://pdp.example.com:8443",
        "https://pdp.example.com/tenant2",
        "",
        None,
        42,
        ["https://pdp.example.com"],
    ],
)
def test_policy_decision_point_mismatch_is_malformed(announced: Any) -> None:
    doc = metadata()
    if announced is None:
        del doc["policy_decision_point"]
    else:
        doc["policy_decision_point"] = announced
    result = failure(parse_metadata(raw(doc), BASE))
    assert result.reason is Reason.PDP_MALFORMED
    assert "policy_decision_point" in result.detail


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("access_evaluation_endpoint", "https://evil.example.com/access/v1/evaluation"),
        ("access_evaluation_endpoint", "http://pdp.example.com/access/v1/evaluation"),
        ("access_evaluation_endpoint", "https://pdp.example.com:444/access/v1/evaluation"),
        ("access_evaluation_endpoint", "/access/v1/evaluation"),  # relative: not on the PDP's origin
        ("access_evaluation_endpoint", 7),
        ("access_evaluations_endpoint", "https://evil.example.com/access/v1/evaluations"),
        ("access_evaluations_endpoint", ["https://pdp.example.com/x"]),
    ],
)
def test_an_endpoint_on_another_origin_is_malformed(key: str, value: Any) -> None:
    result = failure(parse_metadata(raw(metadata(**{key: value})), BASE))
    assert result.reason is Reason.PDP_MALFORMED
    assert key in result.detail


@pytest.mark.parametrize("value", [None, "null"])
def test_missing_access_evaluation_endpoint_is_malformed(value: str | None) -> None:
    doc = metadata(access_evaluation_endpoint=None)
    if value == "null":
        doc["access_evaluation_endpoint"] = None
    result = failure(parse_metadata(raw(doc), BASE))
    assert result.reason is Reason.PDP_MALFORMED
    assert "access_evaluation_endpoint" in result.detail


@pytest.mark.parametrize(
    "answer",
    [
        raw(metadata(), status=500),
        raw(metadata(), status=404),
        raw(metadata(), status=302),
        raw(metadata(), status=503),
        raw(b"<html>ok</html>", content_type="text/html"),
        raw(orjson.dumps(metadata()), content_type="text/plain"),
        raw(b"not json"),
        raw(b"[1]"),
        raw(b'{"policy_decision_point":"a","policy_decision_point":"b"}'),
        RawAnswer(200, JSON_CT, b"", True),  # oversize
    ],
)
def test_an_unreadable_metadata_answer_is_unreachable(answer: RawAnswer) -> None:
    result = failure(parse_metadata(answer, BASE))
    assert result.reason is Reason.PDP_UNREACHABLE
    # Retried like an evaluation would be: only 502/503/504 (and transport errors, below).
    assert result.retryable is (answer.status in (502, 503, 504))
    assert result.detail.startswith("discovery: ")


def test_a_transport_failure_during_discovery_is_unreachable_with_its_outcome() -> None:
    sent = Failure(Reason.PDP_UNREACHABLE, "unreachable", True, "ClientConnectorError: refused")
    result = failure(parse_metadata(sent, BASE))
    assert result.reason is Reason.PDP_UNREACHABLE
    assert result.outcome == "unreachable"
    assert "refused" in result.detail


# --- parse_decision ------------------------------------------------------------------------------------------


def test_decision_true_allows() -> None:
    v = verdict(parse_decision({"decision": True}))
    assert v.allow is True
    assert v.reason is Reason.ALLOWED
    assert v.headers == ()


@pytest.mark.parametrize(
    "obj",
    [
        {"decision": True, "context": {}},
        {"decision": True, "context": {"obligations": []}},
        {"decision": True, "context": {"reason": "rule 7"}, "extra": [1, 2]},
        {"decision": True, "evaluations": [{"decision": False}]},  # unknown members are ignored
    ],
)
def test_other_allow_shapes(obj: dict[str, Any]) -> None:
    assert verdict(parse_decision(obj)).allow is True


@pytest.mark.parametrize(
    ("context", "note"),
    [
        (None, None),
        ({}, None),
        ({"reason": "tool not allowed"}, "tool not allowed"),
        ({"reason_admin": {"403": "Request failed policy C076E82F"}}, '{"403":"Request failed policy C076E82F"}'),
        ({"reason_user": {"403": "Contact your administrator"}}, '{"403":"Contact your administrator"}'),
        ({"reason": "x" * 1000}, "x" * 256),
        ({"metadata": {"response_time": 60}}, None),
    ],
)
def test_decision_false_is_policy_denied_with_the_context_reason(context: Any, note: str | None) -> None:
    obj: dict[str, Any] = {"decision": False}
    if context is not None:
        obj["context"] = context
    v = verdict(parse_decision(obj))
    assert v.allow is False
    assert v.reason is Reason.POLICY_DENIED
    assert v.note == note


@pytest.mark.parametrize("obj", [{}, {"context": {"reason": "x"}}, {"Decision": True}, {"evaluations": []}])
def test_missing_decision_is_undefined(obj: dict[str, Any]) -> None:
    v = verdict(parse_decision(obj))
    assert v.allow is False
    assert v.reason is Reason.PDP_UNDEFINED


@pytest.mark.parametrize("value", ["true", "True", 1, 0, 1.0, None, [True], {"value": True}, "false"])
def test_decision_of_another_type_is_malformed(value: Any) -> None:
    assert failure(parse_decision({"decision": value})).reason is Reason.PDP_MALFORMED


@pytest.mark.parametrize("obj", [True, None, "decision", 1, [{"decision": True}]])
def test_a_decision_that_is_not_an_object_is_malformed(obj: Any) -> None:
    assert failure(parse_decision(obj)).reason is Reason.PDP_MALFORMED


@pytest.mark.parametrize("context", ["ok", 1, True, ["reason"]])
@pytest.mark.parametrize("decision", [True, False])
def test_a_context_that_is_not_an_object_is_malformed(context: Any, decision: bool) -> None:
    assert failure(parse_decision({"decision": decision, "context": context})).reason is Reason.PDP_MALFORMED


@pytest.mark.parametrize(
    "obligations",
    [
        [{"id": "o1", "type": "notification", "properties": {}}],
        [{"id": "o2", "type": "step-up"}],
        {"log": True},
        "log-it",
    ],
)
def test_obligations_with_an_allow_are_unsupported(obligations: Any) -> None:
    v = verdict(parse_decision({"decision": True, "context": {"obligations": obligations}}))
    assert v.allow is False
    assert v.reason is Reason.OBLIGATION_UNSUPPORTED


def test_obligations_with_a_deny_stay_a_policy_deny() -> None:
    v = verdict(parse_decision({"decision": False, "context": {"obligations": [{"id": "o1"}]}}))
    assert v.reason is Reason.POLICY_DENIED


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DECISION_OBJECTS = st.fixed_dictionaries(
    {},
    optional={
        "decision": JSON_VALUES,
        "context": JSON_VALUES
        | st.fixed_dictionaries({}, optional={"obligations": JSON_VALUES, "reason": JSON_VALUES}),
    },
)


@given(JSON_VALUES | DECISION_OBJECTS)
def test_only_an_exact_true_without_obligations_allows(obj: Any) -> None:
    result = parse_decision(obj)
    expected = (
        isinstance(obj, dict)
        and obj.get("decision") is True
        and (obj.get("context") is None or isinstance(obj.get("context"), dict))
        # absent, null or an empty list: anything else (`{}`, `0`, `""`) is not "no obligations", and denies
        and (obj.get("context") or {}).get("obligations") in (None, [])
    )
    allowed = isinstance(result, Verdict) and result.allow
    assert allowed == expected
    if isinstance(result, Verdict):
        assert (result.reason is Reason.ALLOWED) == result.allow


# --- parse_evaluation (X-Request-ID) -------------------------------------------------------------------------


def test_an_echoed_request_id_that_matches_is_accepted() -> None:
    assert verdict(parse_evaluation(raw({"decision": True}, request_id="rid-1"), "rid-1")).allow is True


def test_a_missing_echo_is_accepted() -> None:
    assert verdict(parse_evaluation(raw({"decision": True}), "rid-1")).allow is True


@pytest.mark.parametrize("echoed", ["rid-2", "", "RID-1", "rid-1 x"])
def test_an_echoed_request_id_that_differs_is_malformed(echoed: str) -> None:
    result = failure(parse_evaluation(raw({"decision": True}, request_id=echoed), "rid-1"))
    assert result.reason is Reason.PDP_MALFORMED
    assert "X-Request-ID" in result.detail


def test_evaluation_status_and_transport_failures_pass_through() -> None:
    assert failure(parse_evaluation(raw({"decision": True}, status=500), "r")).reason is Reason.PDP_ERROR_STATUS
    sent = Failure(Reason.PDP_UNREACHABLE, "unreachable", True, "reset")
    assert parse_evaluation(sent, "r") is sent
    assert failure(parse_evaluation(raw(b'{"decision":true}', content_type="text/plain"), "r")).reason is (
        Reason.PDP_MALFORMED
    )
    assert failure(parse_evaluation(raw(b'{"decision":false,"decision":true}'), "r")).reason is Reason.PDP_MALFORMED


# --- parse_evaluations (execute_all) --------------------------------------------------------------------------


def reasons(results: list[Verdict | Failure]) -> list[str]:
    return [("allow" if r.allow else r.reason.value) if isinstance(r, Verdict) else r.reason.value for r in results]


def test_batch_results_come_back_in_order() -> None:
    body = {
        "evaluations": [
            {"decision": True},
            {"decision": False, "context": {"reason": "no"}},
            {},
            {"decision": "true"},
            {"decision": True, "context": {"obligations": [{"id": "x"}]}},
        ]
    }
    results = parse_evaluations(raw(body, request_id="b"), "b", 5)
    assert reasons(results) == ["allow", "policy_denied", "pdp_undefined", "pdp_malformed", "obligation_unsupported"]
    assert verdict(results[1]).note == "no"


def test_a_top_level_decision_in_a_batch_answer_is_ignored() -> None:
    results = parse_evaluations(raw({"decision": True, "evaluations": [{"decision": False}]}), "b", 1)
    assert reasons(results) == ["policy_denied"]


def test_fewer_results_deny_the_missing_ones_as_undefined() -> None:
    results = parse_evaluations(raw({"evaluations": [{"decision": True}]}), "b", 3)
    assert reasons(results) == ["allow", "pdp_undefined", "pdp_undefined"]
    assert all(not r.allow for r in results[1:] if isinstance(r, Verdict))


def test_an_empty_result_list_denies_every_item() -> None:
    assert reasons(parse_evaluations(raw({"evaluations": []}), "b", 2)) == ["pdp_undefined"] * 2


def test_more_results_than_requests_make_all_malformed() -> None:
    results = parse_evaluations(raw({"evaluations": [{"decision": True}] * 3}), "b", 2)
    assert reasons(results) == ["pdp_malformed"] * 2


@pytest.mark.parametrize("value", [None, {"0": {"decision": True}}, "[]", True])
def test_evaluations_that_are_not_a_list_make_all_malformed(value: Any) -> None:
    body: dict[str, Any] = {"decision": True}
    if value is not None:
        body["evaluations"] = value
    assert reasons(parse_evaluations(raw(body), "b", 2)) == ["pdp_malformed"] * 2


def test_batch_echo_mismatch_and_errors_apply_to_every_item() -> None:
    body = {"evaluations": [{"decision": True}, {"decision": True}]}
    assert reasons(parse_evaluations(raw(body, request_id="other"), "b", 2)) == ["pdp_malformed"] * 2
    assert reasons(parse_evaluations(raw(body, status=503), "b", 2)) == ["pdp_error_status"] * 2
    sent = Failure(Reason.PDP_UNREACHABLE, "unreachable", True, "reset")
    assert parse_evaluations(sent, "b", 2) == [sent, sent]


@pytest.mark.parametrize("obligations", [[{"type": "step-up"}], {}, {"x": 1}, 0, False, "log"])
def test_any_obligations_but_none_or_an_empty_list_deny(obligations: object) -> None:
    verdict = parse_decision({"decision": True, "context": {"obligations": obligations}})
    assert isinstance(verdict, Verdict)
    assert verdict.allow is False
    assert verdict.reason is Reason.OBLIGATION_UNSUPPORTED


@pytest.mark.parametrize("obligations", [None, []])
def test_no_obligations_allow(obligations: object) -> None:
    verdict = parse_decision({"decision": True, "context": {"obligations": obligations}})
    assert isinstance(verdict, Verdict)
    assert verdict.allow is True
