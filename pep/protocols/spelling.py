"""Keys the PEP reads from a body must be spelled exactly: a case-insensitive upstream reads `Name` as `name`.

`strictjson` (with `fold_keys`) refuses two keys of one object that are equal under case folding. This catches
the single key that reads as a name the PEP reads without being it: the PEP would see no `name` where a Go
server (encoding/json) binds `Name` to its `name` field, and no `inputRequests` where the 2.x MCP SDK, whose
pydantic models also accept each field's Python name (`populate_by_name`), reads `input_requests`. Keys are
compared case folded and without underscores, which covers both readers.
"""

from __future__ import annotations

from collections.abc import Iterable

from pep.strictjson import fold


class Spelling:
    """The names the PEP reads from one kind of object."""

    __slots__ = ("_folded", "names")

    def __init__(self, *names: str) -> None:
        self.names = frozenset(names)
        self._folded = {loose(name): name for name in names}

    def problem(self, obj: Iterable[str], where: str) -> str | None:
        """Why `obj` (an object's keys, or a form's field names) is ambiguous (a key that reads as a read name
        without being it), or None."""
        for key in obj:
            if key not in self.names:
                expected = self._folded.get(loose(key))
                if expected is not None:
                    return f"{where}: key {key[:40]!r} is not spelled {expected!r}"
        return None


def loose(key: str) -> str:
    """A key as the loosest reader matches it: case folded (Go's encoding/json) and without underscores (pydantic
    with `populate_by_name` takes `input_requests` for `inputRequests`, and `meta` for `_meta`)."""
    return fold(key).replace("_", "")
