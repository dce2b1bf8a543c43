"""Whether an upstream answer can be read as the agent's SDK will read it: media type, charset, content coding.

Pure (header values in, a verdict out). An answer the PEP decides must be read in exactly the bytes and text the
client reads: UTF-8 only (a `charset` naming anything else, UTF-16 or EBCDIC, makes the SDKs decode text the PEP
would not see), identity coding only (every value of every `Content-Encoding` field counts: `identity` then
`gzip` is gzip), and one `Content-Type` (clients join or pick repeated ones differently).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import Final


def parameters(content_type: str) -> tuple[str, str | None]:
    """(media type lower-cased, charset lower-cased or None).

    A repeated charset comes back as both values joined with `,`, which names no charset: readers differ on which
    copy counts (Express takes the first), and a `;` inside a quoted parameter hides one copy from some of them."""
    media, _, params = content_type.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "charset":
            value = value.strip().strip('"').lower()
            charset = value if charset is None else f"{charset},{value}"
    return media.strip().lower(), charset


def utf8(charset: str) -> bool:
    try:
        return codecs.lookup(charset).name == "utf-8"
    except LookupError:
        return False


def problem(content_types: Sequence[str], encodings: Sequence[str]) -> str | None:
    """Why an answer with these `Content-Type` and `Content-Encoding` field values cannot be read, or None."""
    return _read(content_types, encodings)[0]


def _read(content_types: Sequence[str], encodings: Sequence[str]) -> tuple[str | None, str]:
    """`problem`, and the media type (lower-cased; empty without a Content-Type) when there is none: the
    Content-Type is parsed once for both."""
    if len(content_types) > 1:
        return "a repeated Content-Type", ""
    for value in encodings:
        for coding in value.split(","):
            if coding.strip().lower() not in ("", "identity"):
                return f"content-encoding {', '.join(encodings)[:64]!r}", ""
    if not content_types:
        return None, ""
    content_type = content_types[0]
    if ";" not in content_type:  # no parameter, so no charset (most answers)
        return None, content_type.strip().lower()
    media_type, charset = parameters(content_type)
    if charset is not None and not utf8(charset):
        return f"charset {charset[:32]!r}", media_type
    return None, media_type


def is_event_stream(content_type: str) -> bool:
    return parameters(content_type)[0] == "text/event-stream"


# The statuses httpx takes for a redirect when a Location comes with them: followed, or handed back unread.
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


def mcp_reads(status: int, located: bool) -> bool:
    """Whether the 2.x MCP SDK client reads messages from an answer with this status (`located`: it has a
    Location). Every 2xx, and every 3xx httpx does not take for a redirect (300, 304, a 307 without Location):
    the client only turns real redirects away, then parses the body by its Content-Type. From 400 on it keeps
    a JSON-RPC error alone."""
    return 200 <= status < 300 or (300 <= status < 400 and not (located and status in REDIRECTS))


def answer_mode(
    status: int,
    content_types: Sequence[str],
    encodings: Sequence[str],
    unreadable: Callable[[str], None],
    read: bool | None = None,
) -> str:
    """How an answer gate reads an upstream answer: "pass" for a status the client reads no result, tool call or
    server request from (`read` False; by default anything but 2xx), "unreadable" (told to `unreadable` first)
    when its media cannot be read, else "events" for an event stream or "whole"."""
    if not (200 <= status < 300 if read is None else read):
        return "pass"
    found, media_type = _read(content_types, encodings)
    if found is not None:
        unreadable(found)
        return "unreadable"
    return "events" if media_type == "text/event-stream" else "whole"
