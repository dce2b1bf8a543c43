"""How much one message head may hold. A reader refuses more at the byte that crosses a limit, whatever the reads."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds per message. The line, field and count defaults are aiohttp's, which the listener applied until
    now; the head total bounds what one connection can make the PEP hold before it decides anything."""

    max_line_bytes: int = 8190  # the request line or status line, without its CRLF
    max_field_bytes: int = 8190  # one field line (name, colon, value), without its CRLF
    max_fields: int = 128  # field lines in one head, and in one trailer section
    max_head_bytes: int = 65536  # a whole head: first line, field lines, empty line (also a trailer section)
    max_chunk_line_bytes: int = 4096  # a chunk-size line with its extensions, without its CRLF
    max_informational: int = 8  # 1xx answers before the final one

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be at least 1")


DEFAULT_LIMITS: Final = Limits()
