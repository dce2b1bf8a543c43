"""A sans-IO HTTP/1.1 core: bytes in, events out, one explicit state per connection, no sockets and no asyncio.

`RequestReader` reads a client's requests for the listener, `ResponseReader` a server's answers for the PDP and
upstream clients, and `writer` serializes heads and bodies. llhttp (httptools) checks each head's syntax in C;
the readers find message boundaries and decide framing themselves, with the PEP's stricter rules on top.

Why not h11, which has this shape already: it is pure Python, about five times the instructions of this core per
request (bench/http1_core.py), and more lenient than the PEP's rules (obs-fold, bare LF, any HTTP/1.x or 2.0
version, duplicate equal Content-Length, Content-Length beside Transfer-Encoding). It stays as the independent
reader the core is tested against.
"""

from pep.http1.errors import BodyTooLarge, LocalProtocolError, ProtocolError
from pep.http1.events import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Fields,
    Framing,
    InformationalResponse,
    Request,
    Response,
    Signal,
    TargetForm,
)
from pep.http1.limits import DEFAULT_LIMITS, Limits
from pep.http1.request_reader import RequestReader, RequestState
from pep.http1.response_reader import ResponseReader, ResponseState
from pep.http1.writer import LAST_CHUNK, BodyWriter, RequestStart, WriterState, chunk, request_head, response_head

__all__ = [
    "DEFAULT_LIMITS",
    "LAST_CHUNK",
    "NEED_DATA",
    "PAUSED",
    "BodyTooLarge",
    "BodyWriter",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Event",
    "Fields",
    "Framing",
    "InformationalResponse",
    "Limits",
    "LocalProtocolError",
    "ProtocolError",
    "Request",
    "RequestReader",
    "RequestStart",
    "RequestState",
    "Response",
    "ResponseReader",
    "ResponseState",
    "Signal",
    "TargetForm",
    "WriterState",
    "chunk",
    "request_head",
    "response_head",
]
