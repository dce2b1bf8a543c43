"""`record`: a slotted dataclass that is frozen for the type checker, and plain at run time.

A frozen dataclass's `__init__` sets every field through `object.__setattr__` (a call per field), several times
per request on the hot path (the Check, its Outcome, the Admission, the request's facts). mypy still refuses
every assignment to a field (`frozen_default`), so the code keeps the guarantee the decorator existed for; only
the run-time check, and the `__hash__` frozen instances had (none of these classes is hashed), are gone.
Security-relevant values (`Allow`, `Deny`) stay truly frozen: they are never built through this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def record(cls: type[T]) -> type[T]:
    """`@dataclass(frozen=True, slots=True)` for mypy; `@dataclass(slots=True)` at run time."""
    return dataclass(slots=True)(cls)
