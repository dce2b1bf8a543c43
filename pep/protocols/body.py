"""Reading a request body that will be inspected: bounded, never decompressed, read once."""

from __future__ import annotations

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pep.decision import Reason
from pep.protocols import Refused

_CHUNK = 65536


async def read_body(request: web.BaseRequest, limit: int) -> bytes | Refused:
    """The whole body, or why not: over `limit` (`body_too_large`), encoded or broken (`body_unreadable`).

    A Content-Encoding other than identity is refused: the PEP would decide on bytes the upstream decodes into
    something else.
    """
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        return Refused(Reason.BODY_UNREADABLE, f"content-encoding {encoding[:32]!r} on an inspected route")
    length = request.content_length
    if length is not None and length > limit:
        return Refused(Reason.BODY_TOO_LARGE, f"content-length {length} > {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await request.content.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                return Refused(Reason.BODY_TOO_LARGE, f"body over {limit} bytes")
            chunks.append(chunk)
    except (OSError, ValueError, HttpProcessingError) as exc:
        return Refused(Reason.BODY_UNREADABLE, f"body could not be read: {type(exc).__name__}")
    return b"".join(chunks)
