"""Reading a request body that will be inspected: bounded, never decompressed, read once, within a deadline."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pep.decision import Reason
from pep.protocols import Refused
from pep.protocols.dispatch import encoding_problem

_CHUNK = 65536

# How long a caller may take to send a body: the whole body on routes that read it (mcp, openai), each chunk on
# routes that stream it (http). aiohttp bounds slow headers (its keep-alive timer) but not bodies. Read at each
# use, so tests can shrink it.
BODY_READ_TIMEOUT_S = 10.0
BODY_DEADLINE = "body read deadline"  # the detail of a denial for a body that stopped arriving


def end_connection(request: web.BaseRequest) -> None:
    """Close the caller's connection once the answer to this request is written.

    No further request is read from it, and the rest of a body that stopped arriving is not waited for either
    (aiohttp would otherwise keep reading it for up to its lingering time before closing).
    """
    request.protocol.close()
    # aiohttp's lingering read of an unfinished body gives up at once on a timeout; the body is not read again.
    request.content.set_exception(TimeoutError(BODY_DEADLINE))


async def read_body(request: web.BaseRequest, limit: int) -> bytes | Refused:
    """The whole body, or why not: over `limit` (`body_too_large`), encoded, broken or too slow
    (`body_unreadable`; a body that is not complete within BODY_READ_TIMEOUT_S also closes the connection).

    A Content-Encoding other than identity is refused: the PEP would decide on bytes the upstream decodes into
    something else.
    """
    if (problem := encoding_problem(request.headers)) is not None:
        return problem
    length = request.content_length
    if length is not None and length > limit:
        return Refused(Reason.BODY_TOO_LARGE, f"content-length {length} > {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            while chunk := await request.content.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    return Refused(Reason.BODY_TOO_LARGE, f"body over {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        end_connection(request)
        return Refused(Reason.BODY_UNREADABLE, BODY_DEADLINE)
    except (OSError, ValueError, HttpProcessingError) as exc:
        return Refused(Reason.BODY_UNREADABLE, f"body could not be read: {type(exc).__name__}")
    return b"".join(chunks)
