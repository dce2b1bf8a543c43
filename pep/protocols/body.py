"""Reading a request body that will be inspected: bounded, never decompressed, read once, within a deadline."""

from __future__ import annotations

from typing import Final

from pep.decision import Reason
from pep.http1 import BodyTooLarge, ProtocolError
from pep.protocols import Refused
from pep.transport import BodyTimeout, ClientGone, RequestBody

# How long a caller may take to send a body: the whole body on routes that read it (mcp, openai), each chunk on
# routes that stream it (http). Read at each use (and by the listener when it starts), so tests can shrink it.
BODY_READ_TIMEOUT_S = 10.0
BODY_DEADLINE: Final = "body read deadline"  # the detail of a denial for a body that stopped arriving


async def read_body(body: RequestBody, limit: int) -> bytes | Refused:
    """The whole body, or why not: over `limit` (`body_too_large`), broken or too slow (`body_unreadable`; a body
    that is not complete within BODY_READ_TIMEOUT_S ends the connection after the answer, as any body that could
    not be read to its end does: where the next request would begin is unknown).

    A Content-Encoding other than identity was refused before (pep/admission.py): the PEP would decide on bytes
    the upstream decodes into something else.
    """
    try:
        return await body.read_all(limit, BODY_READ_TIMEOUT_S)
    except BodyTooLarge:
        return Refused(Reason.BODY_TOO_LARGE, f"body over {limit} bytes")
    except BodyTimeout:
        return Refused(Reason.BODY_UNREADABLE, BODY_DEADLINE)
    except (ProtocolError, ClientGone) as exc:
        return Refused(Reason.BODY_UNREADABLE, f"body could not be read: {type(exc).__name__}")
