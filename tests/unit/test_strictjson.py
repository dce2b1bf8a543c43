"""pep.strictjson: one JSON value, valid UTF-8, no duplicate keys, nothing after it, bounded depth."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pep
from pep import strictjson
from pep.strictjson import FoldedKeys, JsonError, fold, loads, loads_object


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"result":true}', {"result": True}),
        (b'{"a":1,"b":{"c":[1,2,{"d":null}]}}', {"a": 1, "b": {"c": [1, 2, {"d": None}]}}),
        (b' \n{"a" : "x:y"}\t\r\n', {"a": "x:y"}),
        (b"[]", []),
        (b"true", True),
        (b"1.5", 1.5),
        (b'"\\u00e9"', "\u00e9"),
        ('{"k":"\u00e9\U0001f600"}'.encode(), {"k": "\u00e9\U0001f600"}),
        (b'{"a":{"b":1},"c":{"b":2}}', {"a": {"b": 1}, "c": {"b": 2}}),  # the same key in different objects
        (b'[{"a":1},{"a":2}]', [{"a": 1}, {"a": 2}]),
    ],
)
def test_valid_json(data: bytes, expected: Any) -> None:
    assert loads(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1,"a":2}',
        b'{"a":1,"a":1}',
        b'{"result":true,"result":false}',
        b'{"x":{"allow":false,"allow":true}}',
        b'[{"ok":1},{"a":1,"b":2,"a":3}]',
        b'{"a":[[[{"b":{"c":1,"c":2}}]]]}',
        b'{"a":1,"\\u0061":2}',  # the same key, once escaped
        b'{"\\u00e9":1,"\xc3\xa9":2}',
    ],
)
def test_duplicate_keys_at_any_depth_are_refused(data: bytes) -> None:
    with pytest.raises(JsonError, match="duplicate key"):
        loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1}{"a":2}',
        b'{"a":1} x',
        b'{"a":1},',
        b"true false",
        b"[] []",
        b'{"a":1}\x00',
    ],
)
def test_trailing_data_is_refused(data: bytes) -> None:
    with pytest.raises(JsonError):
        loads(data)


@pytest.mark.parametrize(
    "data",
    [b"NaN", b"Infinity", b"-Infinity", b'{"a":NaN}', b"[Infinity]", b'{"a":-Infinity}', b"1e400", b"[-1e999]"],
)
def test_non_finite_numbers_are_refused(data: bytes) -> None:
    with pytest.raises(JsonError):
        loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":"\xff"}',
        b'{"a":"\xc3"}',
        b'{"\xed\xa0\x80":1}',  # an encoded surrogate is not UTF-8
        b'{"a":"\xc0\xae"}',  # overlong `.`
        b'["\\ud800"]',  # a lone surrogate escape
        b"\xef\xbb\xbf{}",  # a byte order mark
        b"\xff\xfe{\x00}\x00",
    ],
)
def test_invalid_utf8_and_unpaired_surrogates_are_refused(data: bytes) -> None:
    with pytest.raises(JsonError):
        loads(data)


@pytest.mark.parametrize(
    "data",
    [b"", b" ", b"{", b'{"a":}', b"{'a':1}", b'{"a":1,}', b"[1,]", b"01", b'{"a":undefined}', b'"\x01"', b"//c\n{}"],
)
def test_invalid_grammar_is_refused(data: bytes) -> None:
    with pytest.raises(JsonError):
        loads(data)


def test_depth_limit() -> None:
    assert loads(b"[" * 64 + b"]" * 64) is not None
    with pytest.raises(JsonError, match="nested deeper than 64"):
        loads(b"[" * 65 + b"]" * 65)
    nested = b'{"a":' * 65 + b"1" + b"}" * 65
    with pytest.raises(JsonError):
        loads(nested)
    assert loads(b'{"a":' * 3 + b"1" + b"}" * 3, max_depth=3) == {"a": {"a": {"a": 1}}}
    with pytest.raises(JsonError):
        loads(b'{"a":' * 4 + b"1" + b"}" * 4, max_depth=3)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-9, 9) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=30,
)


@given(_VALUES, st.integers(1, 6))
def test_the_depth_limit_counts_containers_only(value: Any, limit: int) -> None:
    """The level-by-level walk refuses exactly the values nested deeper than the limit (scalars are depth 0)."""
    data = orjson.dumps(value)
    if _depth(value) > limit:
        with pytest.raises(JsonError, match="nested deeper"):
            loads(data, max_depth=limit)
    else:
        assert loads(data, max_depth=limit) == value


def test_very_deep_nesting_is_an_error_not_a_crash() -> None:
    for depth in (1000, 5000, 100_000):
        with pytest.raises(JsonError):
            loads(b"[" * depth + b"]" * depth)
        with pytest.raises(JsonError):
            loads(b'{"a":' * depth + b"1" + b"}" * depth)


def test_loads_object_requires_an_object() -> None:
    assert loads_object(b'{"a":1}') == {"a": 1}
    for data in (b"[]", b"true", b"null", b'"x"', b"1"):
        with pytest.raises(JsonError, match="expected a JSON object"):
            loads_object(data)
    with pytest.raises(JsonError):
        loads_object(b'{"a":1,"a":2}')


def test_json_error_is_a_value_error() -> None:
    assert issubclass(JsonError, ValueError)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)


@given(JSON)
def test_round_trip_of_any_json_value(value: Any) -> None:
    assert loads(orjson.dumps(value), max_depth=0) == value


@given(st.dictionaries(st.text(max_size=3), JSON, min_size=1, max_size=4), st.data())
def test_an_injected_duplicate_key_is_always_refused(obj: dict[str, Any], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(obj)))
    encoded = orjson.dumps(obj)
    duplicated = encoded[:-1] + b"," + orjson.dumps(key) + b":" + orjson.dumps(obj[key]) + b"}"
    with pytest.raises(JsonError, match="duplicate key"):
        loads(duplicated, max_depth=0)


# Duplicates are ruled out by counting colons (the text's against orjson's value written again): a colon
# written as an escape counts in the value only, and must not let a dropped pair through.
@pytest.mark.parametrize(
    "data",
    [
        b'{"k":"\\u003a","a":1,"a":2}',  # one escaped colon would make up for the dropped pair
        b'{"k":"\\u003A\\u003a","a":{"x":1},"a":{"y":2}}',  # the dropped value had a pair of its own
        b'{"a":"x:y","b":[{"c":"::"}],"a":"x:y"}',  # colons inside strings, and a duplicate
    ],
)
def test_duplicates_hidden_behind_colons_are_refused(data: bytes) -> None:
    with pytest.raises(JsonError, match="duplicate key"):
        loads(data)
    with pytest.raises(JsonError, match="duplicate key"):
        loads(data, fold_keys=True)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"k":"\\u003a","a":1}', {"k": ":", "a": 1}),  # an escaped colon alone is no duplicate
        (b'{"a:b":"c:d","e":[":",{"f:":":"}]}', {"a:b": "c:d", "e": [":", {"f:": ":"}]}),
    ],
)
def test_colons_in_strings_are_no_duplicates(data: bytes, expected: Any) -> None:
    assert loads(data) == expected
    assert loads(data, fold_keys=True) == expected


@pytest.mark.parametrize(
    "data",
    [
        b'{"cents":100000000000000000001}',  # 21 digits: beyond u64
        b'{"":-9999999929999999999}',  # 19 digits, below -2**63 (found by atheris)
        b"[18446744073709551616]",  # 2**64
        b'{"x":5e1555310311110}',  # beyond a double (found by atheris)
    ],
)
def test_numbers_a_parser_would_round_are_refused(data: bytes) -> None:
    with pytest.raises(JsonError):
        loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b'[1.5,{"n":[100000000000000000001]}]',  # beside a real float, deep down
        b'{"s":"12345678901234567890","n":-99999999999999999999}',
        b"18446744073709551616",  # the whole text
    ],
)
def test_wide_integers_are_refused_wherever_they_are(data: bytes) -> None:
    with pytest.raises(JsonError):
        loads(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"s":"12345678901234567890123"}', {"s": "12345678901234567890123"}),  # digits in a string
        (b'{"f":1.5,"s":"12345678901234567890123"}', {"f": 1.5, "s": "12345678901234567890123"}),
        (b"[1.0e2,18446744073709551615]", [100.0, 2**64 - 1]),
    ],
)
def test_long_digit_runs_that_are_no_wide_integer_are_read(data: bytes, expected: Any) -> None:
    assert loads(data) == expected


@pytest.mark.parametrize("number", [2**63 - 1, -(2**63), 2**64 - 1, 1234567890123456789])
def test_numbers_within_64_bits_are_read_exactly(number: int) -> None:
    assert loads(b'{"n":%d}' % number) == {"n": number}


# --- keys equal under case folding (request bodies: fold_keys) ------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"name":"search","Name":"shell"}',
        b'{"method":"ping","METHOD":"tools/call"}',
        b'{"a":{"b":[{"to":"x","To":"y"}]}}',  # at any depth
        '{"s":1,"\u017f":2}'.encode(),  # LONG S folds to s, as in Go
        '{"k":1,"\u212a":2}'.encode(),  # KELVIN SIGN folds to k
        '{"\u212a":1,"K":2}'.encode(),
        b'{"ma\\u00df":1,"MASS":2}',  # full folding: sharp s is ss (Go does not fold it; refusing more is safe)
        b'{"x":1,"n\\u0061me":2,"NAME":3}',
        '{"\u03c3":1,"\u03c2":2}'.encode(),  # Greek small sigma and final sigma
    ],
)
def test_keys_equal_under_case_folding_are_refused_on_request(data: bytes) -> None:
    with pytest.raises(FoldedKeys, match="equal under case folding"):
        loads(data, fold_keys=True)
    assert isinstance(loads(data), dict)  # without fold_keys (PDP answers) they are distinct keys


@pytest.mark.parametrize(
    "data",
    [
        b'{"name":"a","names":"b"}',
        b'{"a":{"Name":1},"b":{"name":2}}',  # the same folded key in different objects
        b'[{"ID":1},{"id":2}]',
        b'{"Name":"x"}',
        '{"\u0131":1,"i":2}'.encode(),  # dotless i does not fold to i (it upper-cases to I)
    ],
)
def test_distinct_keys_under_folding_are_accepted(data: bytes) -> None:
    assert loads(data, fold_keys=True) == loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"x":[{"y":{"Name":"a:b","name":1}}]}',  # deep, with colons in the values
        b'[1,{"ok":{"S":1}},{"s":2,"\\u017f":3}]',  # an escaped long s
    ],
)
def test_keys_equal_under_folding_are_refused_at_any_depth(data: bytes) -> None:
    with pytest.raises(FoldedKeys, match="equal under case folding"):
        loads(data, fold_keys=True)


def test_exact_duplicates_stay_duplicates_with_fold_keys() -> None:
    with pytest.raises(JsonError, match="duplicate key") as raised:
        loads(b'{"a":1,"a":2}', fold_keys=True)
    assert not isinstance(raised.value, FoldedKeys)


@pytest.mark.parametrize("key", ["name", "Method", "\u017fearch", "Stra\u00dfe", "\u212aey", "\u00e9t\u00e9"])
def test_fold_is_casefold(key: str) -> None:
    assert fold(key) == key.casefold()


# --- the scan in C (pep/_jsonscan.c) against the walk in Python ------------------------------------------------


def test_the_scan_in_c_is_what_a_compiled_build_uses() -> None:
    """With the request path compiled, `loads` takes its facts from the C scan (so the properties below compare
    it with the walk); pure Python has no scan and needs none."""
    assert (strictjson._SCAN is not None) == pep.COMPILED


_KEYS = st.sampled_from(["a", "b", "id", "Id", "ID", "name", "Name", "s", "\u017f", "k", "\u212a", "x:y", 'q"', "\\"])
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('ab:"\\\u00e9 \n'), max_size=4)
)
_NESTED = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=25,
)


def _written(value: Any, style: int) -> bytes:
    """`value` as different writers write it: compact, spaced, indented, and with non-ASCII escaped."""
    if style == 0:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()  # as orjson writes
    if style == 1:
        return json.dumps(value).encode()  # ", " and ": ", non-ASCII escaped (\u017f: an escaped key)
    if style == 2:
        return json.dumps(value, indent=2, ensure_ascii=False).encode()
    return json.dumps(value, separators=(",", ":")).encode()


def _outcome(data: bytes, max_depth: int, fold_keys: bool, max_values: int, native: bool) -> Any:
    try:
        return strictjson.read(data, max_depth, fold_keys, max_values, strictjson._SCAN if native else None)
    except FoldedKeys:
        return "folded"  # which of several folded pairs is named first may differ: the refusal may not
    except JsonError as error:
        return (type(error).__name__, str(error))


@given(_NESTED, st.integers(0, 3), st.data())
def test_the_scan_in_c_decides_as_the_walk_does(value: Any, style: int, data: st.DataObject) -> None:
    """For texts with repeated keys (as written, escaped, case-folded), long integers, colons and quotes in
    strings, several writers' spacing, depth limits and value limits: the same value or the same refusal."""
    text = _written(value, style)
    if isinstance(value, dict) and value and data.draw(st.booleans()):  # repeat a key, maybe written otherwise
        key = data.draw(st.sampled_from(sorted(value)))
        spelled = data.draw(
            st.sampled_from([json.dumps(key), json.dumps(key.upper()), json.dumps(key, ensure_ascii=False)])
        )
        text = text.rstrip()[:-1] + b"," + spelled.encode() + b":" + json.dumps(value[key]).encode() + b"}"
    max_depth = data.draw(st.sampled_from([0, 1, 2, 3, 64]))
    max_values = data.draw(st.sampled_from([0, 1, 5, 1000]))
    for fold_keys in (False, True):
        expected = _outcome(text, max_depth, fold_keys, max_values, native=False)
        assert _outcome(text, max_depth, fold_keys, max_values, native=True) == expected, text


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":"\\\\","a":1}',  # a string ending in an escaped backslash, then a duplicate
        b'{"a":"\\"","b":"\\\\\\"","a":2}',  # escaped quotes inside strings
        b'{"a":[{"b":1,"b":2}]}',
        b'{"a":1,"\\u0061":2}',
        b'[{"n":100000000000000000001}]',
        b'{"n":-9223372036854775809}',
        b"[" * 70 + b"]" * 70,
        b'{"a":' * 70 + b"1" + b"}" * 70,
        b'{"Name":1,"name":2}',
        b'{"\\u017f":1,"s":2}',
        b'{"\\u0053":1,"s":2}',  # an escaped upper-case S
    ],
)
def test_the_scan_in_c_refuses_as_the_walk_does(data: bytes) -> None:
    assert isinstance(_outcome(data, 64, True, 0, native=False), tuple | str)  # refused, on request at least
    for fold_keys in (False, True):
        assert _outcome(data, 64, fold_keys, 0, native=True) == _outcome(data, 64, fold_keys, 0, native=False)
