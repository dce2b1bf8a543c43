"""Keys the PEP reads from a body must be spelled exactly: a case-insensitive upstream reads `Name` as `name`.

`strictjson` (with `fold_keys`) refuses two keys of one object that are equal under case folding. This catches
the single key that folds to a name the PEP reads without being it: the PEP would see no `name` where a Go
server (encoding/json) binds `Name` to its `name` field.
"""

from __future__ import annotations

from collections.abc import Iterable

from pep.strictjson import fold


class Spelling:
    """The names the PEP reads from one kind of object."""

    __slots__ = ("_folded", "_folds", "names")

    def __init__(self, *names: str) -> None:
        self.names = frozenset(names)
        self._folded = {fold(name): name for name in names}
        self._folds = frozenset(self._folded)

    def problem(self, obj: Iterable[str], where: str) -> str | None:
        """Why `obj` (an object's keys, or a form's field names) is ambiguous (a key that folds to a read name
        without being it), or None."""
        # Most objects are decided in C: every key a read name, or none folding to one (`fold` is `str.casefold`:
        # it lowers ASCII the same way).
        if self.names.issuperset(obj) or self._folds.isdisjoint(map(str.casefold, obj)):
            return None
        for key in obj:
            if key not in self.names:
                expected = self._folded.get(fold(key))
                if expected is not None:
                    return f"{where}: key {key[:40]!r} is not spelled {expected!r}"
        return None
