"""Strict JSON reading for bytes that decide something: one object, valid UTF-8, no duplicate keys.

orjson validates the grammar and UTF-8 fast, but, like every JSON library, keeps the last of duplicate keys
silently. Two readers of the same bytes may then disagree (the PDP answer we act on vs. the one it meant), so
duplicates are refused. orjson's value proves their absence (`_no_duplicates`): a text that is orjson's own
writing of the value is a writing of objects without repeated keys; otherwise by counting: every pair of the
text has one `:` outside strings, so when the text has exactly as many `:` as orjson's value written out again
(its keys plus the colons inside its strings), no pair was dropped. Only when the counts differ (a duplicate, or
a colon written as an escape) does a second pass with the standard library's pair hook run, which finds the
duplicate or accepts the text.

Request bodies can also be read with `fold_keys`: keys equal under case folding (`name`/`Name`, `s`/U+017F) are
refused too, since readers such as Go's encoding/json bind both to one field and keep the last.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, Final

import orjson


class JsonError(ValueError):
    """The bytes are not one acceptable JSON value; the message says why (for logs, not for callers)."""


class FoldedKeys(JsonError):
    """Two keys of one object are equal under case folding: a case-insensitive reader sees one key there."""


class TooManyValues(JsonError):
    """More values (members and elements, at any depth) than the caller allowed: too costly to decide on."""


def fold(key: str) -> str:
    """The key as a case-insensitive reader compares it: Unicode full case folding (`str.casefold`).

    It equates every pair Go's encoding/json equates (simple folding, which maps U+017F to s and U+212A to k)
    and more (`ß` and `ss`), so refusing its collisions refuses Go's."""
    return key.lower() if key.isascii() else key.casefold()


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def _pairs_no_folded_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _pairs_no_duplicates(pairs)
    if len(obj) > 1 and len({fold(key) for key in obj}) != len(obj):
        seen: dict[str, str] = {}
        for key in obj:
            other = seen.setdefault(fold(key), key)
            if other != key:
                raise FoldedKeys(f"keys {other[:40]!r} and {key[:40]!r} are equal under case folding")
    return obj


def _no_constant(name: str) -> Any:
    raise JsonError(f"{name} is not JSON")


def _int64(text: str) -> int:
    # orjson reads integers outside i64/u64 as floats (100000000000000000001 becomes 1e+20): the policy would see
    # another number than a reader of exact integers, so such a number is refused rather than rounded.
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise JsonError(f"integer {text[:24]}... beyond 64 bits")
    return value


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_pairs_no_duplicates, parse_constant=_no_constant, parse_int=_int64
)
_FOLDING_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_pairs_no_folded_duplicates, parse_constant=_no_constant, parse_int=_int64
)
# A number of 19 digits or more may lie outside i64/u64 (-2**63 has 19 digits): those take the second pass, which
# checks the range; shorter ones are read exactly by orjson. A run of 19 digits is looked for in the text with
# every digit mapped to `1` and every other byte to `0` (two C passes): the regex `[0-9]{19}` took 40-70 µs on a
# 2 KB body, more than parsing it.
_DIGITS: Final = bytes(0x31 if 0x30 <= byte <= 0x39 else 0x30 for byte in range(256))
_NINETEEN_DIGITS: Final = b"1" * 19


def _long_number(data: bytes) -> bool:
    """`data` holds a run of at least 19 ASCII digits (`re.search(rb"[0-9]{19}", data)`, faster)."""
    return _NINETEEN_DIGITS in data.translate(_DIGITS)


Scan = Callable[[bytes, dict[str, Any] | list[Any], bool], tuple[bool, int, int, list[dict[str, Any]]] | None]


def _native_scan() -> Scan | None:
    try:
        from pep._jsonscan import scan  # optional: only `make native` builds it
    except ImportError:  # pure Python (PEP_PURE=1, or no build or a stale one: pep/native.py): the walk below
        return None
    return scan


# The scan in C when the request path is compiled: one pass over the bytes and one over orjson's value (per 2 KB
# MCP call, body and answer, the walk, orjson writing the value again and the digit search took 28k instructions;
# the scan takes 9k). The same facts without it: `_walk`, `_no_duplicates`, `_long_number`.
_SCAN: Final = _native_scan()


def loads(data: bytes, max_depth: int = 64, *, fold_keys: bool = False, max_values: int = 0) -> Any:
    """Parse one JSON value from `data`, refusing duplicate keys, trailing data and nesting over `max_depth`;
    with `fold_keys`, also keys of one object equal under case folding (`FoldedKeys`); with `max_values`, more
    members and elements than that in all (`TooManyValues`, once the value is otherwise acceptable)."""
    return read(data, max_depth, fold_keys, max_values, _SCAN)


def read(data: bytes, max_depth: int, fold_keys: bool, max_values: int, scan: Scan | None) -> Any:
    """`loads`, with the C scan or (`scan` None) without it: the same answer either way (a property test holds
    them to it)."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JsonError(f"invalid JSON: {exc}") from None
    kind = type(value)
    facts = scan(data, value, fold_keys) if scan is not None and (kind is dict or kind is list) else None
    if facts is not None:
        # (An integer beyond 64 bits is written with 19 bytes or more: the scan sends those to the second pass.)
        second, depth, values, suspects = facts
        exceeded = bool(max_depth) and depth > max_depth
        folded = _folded(suspects) if suspects else None
    elif (kind is dict or kind is list) and not fold_keys and not max_values and len(data) < 2 * max_depth + 2:
        # Too short to nest deeper than the limit (each level takes an opening and a closing byte), and nothing
        # else to count (PDP and most MCP answers): no walk. A run of 19 digits anywhere takes the second pass,
        # as a float beside one would (it refuses only integers beyond 64 bits, which orjson read as floats).
        exceeded, folded, values = False, None, 0
        second = not _no_duplicates(value, data) or _long_number(data)
    elif kind is dict or kind is list:
        # (A single key cannot collide, so folding only matters where an object has two keys: the walk looks at
        # those alone.)
        exceeded, floats, folded, values = _walk(value, max_depth, fold_keys)
        # orjson reads an integer beyond 64 bits as a float: without a float in the value, there is none.
        second = not _no_duplicates(value, data) or (floats and _long_number(data))
    else:
        exceeded, folded, values = False, None, 0
        second = kind is float and _long_number(data)
    if second:
        try:
            (_FOLDING_DECODER if fold_keys else _DECODER).decode(data.decode("utf-8"))
        except RecursionError:
            raise JsonError("nested too deeply") from None
        except json.JSONDecodeError as json_decode_error:  # pragma: no cover - orjson accepted it already
            raise JsonError(f"invalid JSON: {json_decode_error}") from None
    # Folded keys, found on orjson's objects: their keys are the text's, now that duplicates are ruled out (a
    # duplicate is reported first, as the second pass's hook reports it).
    if folded is not None:
        _pairs_no_folded_duplicates(list(folded.items()))
    if exceeded:
        raise JsonError(f"nested deeper than {max_depth}")
    if max_values and values > max_values:
        raise TooManyValues(f"{values} values, over {max_values}")
    return value


def loads_object(data: bytes, max_depth: int = 64, *, fold_keys: bool = False) -> dict[str, Any]:
    """Like `loads`, but the value must be a JSON object."""
    value = loads(data, max_depth, fold_keys=fold_keys)
    if not isinstance(value, dict):
        raise JsonError(f"expected a JSON object, got {type(value).__name__}")
    return value


# What every escape of a colon (`\\u003a`, `\\u003A`) starts with (and those of `0`-`9`, `;`-`?`, rare in keys
# and values: they only cost the second pass).
_ESCAPED_COLON: Final = b"\\u003"


def _no_duplicates(value: dict[str, Any] | list[Any], data: bytes) -> bool:
    """True when orjson's `value` kept every pair of `data`; False when that is not proven (take the second pass).

    Most bodies are written as orjson writes them (compact, the SDKs' own writers): when `orjson.dumps(value)` is
    `data` itself, `data` is the writing of a value whose objects cannot repeat a key. Otherwise colons are
    counted. In JSON a `:` is either a pair's separator or inside a string. Without escaped colons, each `:`
    inside a string of `data` is one `:` inside a string of `value`, and orjson writes strings' colons unescaped,
    so `orjson.dumps(value)` has one `:` per pair kept plus one per colon in the strings kept. `data` has one per
    pair written plus one per colon in every string written, the dropped pairs' too: the counts are equal only if
    no pair was dropped, i.e. no object repeats a key. An escaped colon adds to `value`'s count only, so it could
    hide a dropped pair: such texts take the second pass. A duplicate needs two keys in one object, so at least
    two colons: the common PDP answer `{"result":true}` has one."""
    try:
        written = orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254): the second pass decides
        return data.count(b":") < 2
    if written == data:
        return True
    colons = data.count(b":")
    if colons < 2:
        return True
    if b"\\" in data and _ESCAPED_COLON in data:  # (a byte is found by memchr, faster than the 6-byte search)
        return False
    return written.count(b":") == colons


def _walk(
    value: dict[str, Any] | list[Any], limit: int, fold_keys: bool
) -> tuple[bool, bool, dict[str, Any] | None, int]:
    """One pass over the containers of `value`, level by level: whether it nests deeper than `limit` (0: none),
    whether it holds a float (unknown once the limit stops the walk: True), with `fold_keys` the first object
    whose keys are equal under case folding, and how many members and elements its containers hold. Without
    `fold_keys` the walk stops at the limit; with it, it goes on (orjson nests at most 1024 deep), as the second
    pass's hook would see every object."""
    level: list[Any] = [value]
    depth = 1
    exceeded = floats = False
    values = 0
    objects: list[dict[str, Any]] = []  # with fold_keys: those with two keys or more, in the order walked
    while level:
        if limit and depth > limit:
            if not fold_keys:
                return True, True, None, values
            exceeded = True
        inner: list[Any] = []
        for item in level:
            values += len(item)
            if type(item) is dict:
                if fold_keys and len(item) > 1:
                    objects.append(item)
                children: Iterable[Any] = item.values()
            else:
                children = item
            for child in children:
                kind = type(child)
                if kind is dict or kind is list:
                    inner.append(child)
                elif kind is float:
                    floats = True
        level = inner
        depth += 1
    return exceeded, floats, _folded(objects) if objects else None, values


def _folded(objects: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first of `objects` with two keys equal under case folding, or None.

    fold() is str.casefold (it lowers ASCII the same way): one C pass over the keys. Keys that are all their own
    folding (`"".join(keys)` is: casefold maps each character on its own, and a character that folds to something
    else never folds to something starting with itself) cannot collide: one join of every object's keys rules
    out most bodies at once, and only other objects build the set of their folded keys."""
    every = "".join(chain.from_iterable(objects))
    if every.casefold() == every:
        return None
    for item in objects:
        keys = "".join(item)
        if keys.casefold() != keys and len(set(map(str.casefold, item))) != len(item):
            return item
    return None
