"""pep.pdp.opa.parse_answer: only an exact, well-formed allow allows; every other answer is classified."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.decision import Reason
from pep.pdp import Failure, Verdict
from pep.pdp.answer import is_json_content_type
from pep.pdp.opa import parse_answer
from pep.pdp.transport import RawAnswer

JSON_CT = "application/json"


def answer(body: bytes | str, status: int = 200, content_type: str = JSON_CT, oversize: bool = False) -> RawAnswer:
    raw = body.encode() if isinstance(body, str) else body
    return RawAnswer(status=status, content_type=content_type, body=raw, oversize=oversize)


def verdict(raw: RawAnswer) -> Verdict:
    result = parse_answer(raw)
    assert isinstance(result, Verdict), result
    return result


def failure(raw: RawAnswer) -> Failure:
    result = parse_answer(raw)
    assert isinstance(result, Failure), result
    return result


# --- allow ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '{"result":true}',
        '{"result": true, "decision_id": "abc"}',
        '{"result":{"allow":true}}',
        '{"result":{"allow":true,"other":[1,2],"deny":true}}',  # other keys are ignored
        '{"result":{"allow":true,"headers":null}}',
        '{"result":{"allow":true,"headers":{}}}',
    ],
)
def test_exact_allow_shapes_allow(body: str) -> None:
    v = verdict(answer(body))
    assert v.allow is True
    assert v.reason is Reason.ALLOWED
    assert v.headers == ()


def test_allow_with_headers_and_reason() -> None:
    v = verdict(answer('{"result":{"allow":true,"headers":{"x-tenant":"acme","x-b":""},"reason":"ok by rule 7"}}'))
    assert v.allow is True
    assert v.headers == (("x-tenant", "acme"), ("x-b", ""))
    assert v.note == "ok by rule 7"


def test_reason_is_truncated_and_non_strings_dropped() -> None:
    v = verdict(answer(orjson.dumps({"result": {"allow": True, "reason": "r" * 1000}})))
    assert v.note == "r" * 256
    v = verdict(answer('{"result":{"allow":true,"reason":{"code":1}}}'))
    assert v.note is None


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        " application/json ",
        "application/vnd.x+json",
        "application/problem+json; charset=utf-8",
    ],
)
def test_json_content_types_are_accepted(content_type: str) -> None:
    assert is_json_content_type(content_type)
    assert verdict(answer('{"result":true}', content_type=content_type)).allow


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (answer('{"result":true}', status=500), Reason.PDP_ERROR_STATUS),
        (answer('{"result":true}', status=302), Reason.PDP_ERROR_STATUS),
        (answer('{"result":true}', oversize=True), Reason.PDP_MALFORMED),
        (answer('{"result":true}', content_type="text/plain"), Reason.PDP_MALFORMED),
        (answer('{"result":true}', content_type=""), Reason.PDP_MALFORMED),
        (
            RawAnswer(200, JSON_CT, b'{"result":true}', oversize=False, undecodable=True),
            Reason.PDP_MALFORMED,
        ),
    ],
)
def test_the_usual_allow_bytes_allow_only_in_a_readable_answer(raw: RawAnswer, reason: Reason) -> None:
    """`{"result":true}` is known without a parse, but never without the checks every answer passes."""
    assert failure(raw).reason is reason


# --- deny, undefined ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["{}", '{"result":{}}', '{"decision_id":"x"}', '{"result":{"reason":"no rule"}}'])
def test_undefined(body: str) -> None:
    v = verdict(answer(body))
    assert v.allow is False
    assert v.reason is Reason.PDP_UNDEFINED


@pytest.mark.parametrize(
    "body",
    [
        '{"result":false}',
        '{"result":{"allow":false}}',
        '{"result":{"allow":false,"headers":{"x-a":"1"}}}',
        '{"result":{"allow":false,"headers":"garbage"}}',
    ],
)
def test_policy_denied(body: str) -> None:
    v = verdict(answer(body))
    assert v.allow is False
    assert v.reason is Reason.POLICY_DENIED
    assert v.headers == ()


def test_deny_keeps_its_reason_note() -> None:
    v = verdict(answer('{"result":{"allow":false,"reason":"tool send_email is not allowed"}}'))
    assert v.reason is Reason.POLICY_DENIED
    assert v.note == "tool send_email is not allowed"


# --- malformed ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '{"result":"true"}',
        '{"result":1}',
        '{"result":0}',
        '{"result":null}',
        '{"result":[true]}',
        '{"result":"allow"}',
        '{"result":{"allow":"yes"}}',
        '{"result":{"allow":"true"}}',
        '{"result":{"allow":1}}',
        '{"result":{"allow":1.0}}',
        '{"result":{"allow":null}}',
        '{"result":{"allow":[true]}}',
        '{"result":{"allow":{"value":true}}}',
        '{"result":{"allow":true,"headers":"x-a: 1"}}',
        '{"result":{"allow":true,"headers":[["x-a","1"]]}}',
        '{"result":{"allow":true,"headers":{"x-a":1}}}',
        '{"result":{"allow":true,"headers":{"x-a":["1"]}}}',
        '{"result":{"allow":true,"headers":{"x-a":null}}}',
    ],
)
def test_wrong_types_are_malformed(body: str) -> None:
    f = failure(answer(body))
    assert f.reason is Reason.PDP_MALFORMED
    assert f.outcome == "error"
    assert f.retryable is False


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"true",
        b"[]",
        b'[{"result":true}]',
        b"null",
        b'"{\\"result\\":true}"',
        b'{"result":true,"result":false}',
        b'{"result":false,"result":true}',
        b'{"result":{"allow":false,"allow":true}}',
        b'{"result":true} {"result":true}',
        b'{"result":true}x',
        b'{"result":true',
        b'{"result":True}',
        b'{"result":NaN}',
        b'{"result":true,"x":"\xff"}',
        b"\xef\xbb\xbf" + b'{"result":true}',
    ],
)
def test_not_one_strict_json_object_is_malformed(body: bytes) -> None:
    assert failure(answer(body)).reason is Reason.PDP_MALFORMED


@pytest.mark.parametrize(
    "content_type",
    ["", "text/plain", "text/json", "application/jsonx", "application/x-json", "application/json-seq", "json", "*/*"],
)
def test_wrong_or_missing_content_type_is_malformed(content_type: str) -> None:
    f = failure(answer('{"result":true}', content_type=content_type))
    assert f.reason is Reason.PDP_MALFORMED
    assert not is_json_content_type(content_type)


def test_oversize_is_malformed_even_with_an_allow_prefix() -> None:
    f = failure(answer('{"result":true}', oversize=True))
    assert f.reason is Reason.PDP_MALFORMED
    assert f.retryable is False


# --- status ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status", [100, 199, 300, 301, 302, 304, 307, 308, 400, 401, 403, 404, 409, 429, 500, 501, 505]
)
def test_non_2xx_is_an_error_status_not_retried(status: int) -> None:
    f = failure(answer('{"result":true}', status=status))
    assert f.reason is Reason.PDP_ERROR_STATUS
    assert f.outcome == "error"
    assert f.retryable is False
    assert str(status) in f.detail


@pytest.mark.parametrize("status", [502, 503, 504])
def test_502_503_504_are_retryable(status: int) -> None:
    f = failure(answer('{"result":true}', status=status))
    assert f.reason is Reason.PDP_ERROR_STATUS
    assert f.retryable is True


def test_500_with_an_allow_body_is_not_an_allow() -> None:
    f = failure(answer('{"result":{"allow":true}}', status=500))
    assert f.reason is Reason.PDP_ERROR_STATUS


@pytest.mark.parametrize("status", [200, 201, 203, 299])
def test_any_2xx_is_read(status: int) -> None:
    assert verdict(answer('{"result":true}', status=status)).allow


def test_204_without_body_is_malformed() -> None:
    assert failure(answer(b"", status=204)).reason is Reason.PDP_MALFORMED


# --- property: nothing but the exact shapes allows -----------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 10)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "true", "allow", "yes"]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["result", "allow", "headers", "reason", "x"]), children, max_size=4)
    ),
    max_leaves=12,
)
TOP = (
    JSON
    | st.fixed_dictionaries({"result": JSON})
    | st.fixed_dictionaries({"result": st.fixed_dictionaries({"allow": JSON})})
)


def is_documented_allow(value: Any) -> bool:
    if not isinstance(value, dict) or "result" not in value:
        return False
    result = value["result"]
    if result is True:
        return True
    return isinstance(result, dict) and result.get("allow") is True


@given(TOP)
def test_only_documented_allow_shapes_allow(value: Any) -> None:
    result = parse_answer(answer(orjson.dumps(value)))
    if isinstance(result, Verdict) and result.allow:
        assert is_documented_allow(value), value
        assert result.reason is Reason.ALLOWED
    if not is_documented_allow(value):
        assert not (isinstance(result, Verdict) and result.allow)


@given(TOP, st.integers(100, 599).filter(lambda s: not 200 <= s < 300))
def test_no_status_but_2xx_ever_allows(value: Any, status: int) -> None:
    result = parse_answer(answer(orjson.dumps(value), status=status))
    assert isinstance(result, Failure)
    assert result.reason is Reason.PDP_ERROR_STATUS
