"""A decision log entry as one bounded JSON line.

An entry carries the caller's data (path, tool and model names, arguments, the agent header, the PDP's note), and
a body may hold a 1 MiB tool name. Queued whole, a stalled log would pin megabytes per denied request, so every
string is cut to `FIELD_MAX` characters and every top-level field to about `FIELD_BUDGET` characters of data;
the top-level keys that were cut are listed in `truncated` (fixed names, never caller data). A string JSON cannot
carry (a lone surrogate: a header byte that is not UTF-8, such as the agent header's, decoded with surrogateescape)
is written with that character escaped as text (`\\udcff`), so the line is still written: without it the entry
raised, the request was answered `internal_error`, and no line said what had been decided.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

FIELD_MAX: Final = 1024  # characters of any one string (dict keys included)
FIELD_BUDGET: Final = 16384  # about this many characters per top-level field: strings by length, anything else as 8
MAX_DEPTH: Final = 16  # deeper objects and arrays are left out
_OTHER: Final = 8  # what a number, bool, null, key or container counts against the budget


def encode(entry: dict[str, Any]) -> bytes:
    """One JSON line (newline included) of at most a few hundred KiB, whatever the entry holds."""
    invalid = False
    try:
        line = orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        invalid = True  # nested beyond orjson's limit, or a string that is not UTF-8: the bounded copy is neither
    else:
        if len(line) <= FIELD_MAX:  # no string in it can be longer, no field over budget: nearly every line
            return line
    out: dict[str, Any] = {}
    truncated: list[str] = []
    for key, value in entry.items():
        cap = _Cap(invalid)
        out[key] = cap.value(value, 0)
        if cap.cut:
            truncated.append(key)
    if truncated:
        out["truncated"] = truncated
    return orjson.dumps(out, option=orjson.OPT_APPEND_NEWLINE)


class _Cap:
    """A bounded copy of one field's value; `cut` says whether anything was shortened or left out."""

    __slots__ = ("cut", "left", "unicode")

    def __init__(self, check_unicode: bool = False) -> None:
        self.left = FIELD_BUDGET
        self.cut = False
        self.unicode = check_unicode  # strings may hold lone surrogates (see the module docstring)

    def text(self, s: str) -> str:
        limit = min(FIELD_MAX, max(self.left, 0))
        if len(s) > limit:
            s = s[:limit]
            self.cut = True
        self.left -= len(s)
        if self.unicode and not s.isascii():
            s = s.encode("utf-8", "backslashreplace").decode("utf-8")
        return s

    def value(self, v: Any, depth: int) -> Any:
        if isinstance(v, str):
            return self.text(v)
        self.left -= _OTHER
        if not isinstance(v, dict | list | tuple):
            return v
        if depth >= MAX_DEPTH:
            self.cut = True
            return None
        return self._object(v, depth + 1) if isinstance(v, dict) else self._array(v, depth + 1)

    def _object(self, v: dict[Any, Any], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, x in v.items():
            key = str(k)
            if self.left < _OTHER + min(len(key), FIELD_MAX):  # not even the whole name fits any more
                self.cut = True
                break
            self.left -= _OTHER
            name = self.text(key)
            out[name] = self.value(x, depth)
        return out

    def _array(self, v: list[Any] | tuple[Any, ...], depth: int) -> list[Any]:
        items: list[Any] = []
        for x in v:
            if self.left <= 0:
                self.cut = True
                break
            items.append(self.value(x, depth))
        return items
