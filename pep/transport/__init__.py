"""Transports on asyncio protocols (uvloop in production), on the sans-IO HTTP/1.1 core of `pep.http1`.

- `listener`: the agent-facing server. One protocol per connection feeds a RequestReader and hands each request
  head to the handler as an `Exchange` (head, header view, peer, TLS object, body stream, response writer),
  one at a time per connection; flow control both ways; idle, head and body deadlines; lingering close;
  graceful shutdown; CONNECT handed over to a tunnel.
- `pool`: keep-alive client connections per origin for upstreams and the PDP: reused only after a clean and
  complete exchange, never used to send a request twice, typed failures (`errors`).
- `tunnel`: CONNECT splices, with backpressure both ways and an idle timeout.

Imports go one way: this package uses `pep.http1` and nothing else of the PEP (no config, no proxy, no aiohttp).
"""

from pep.transport.body import BodyState, RequestBody
from pep.transport.errors import (
    BadResponse,
    BodyTimeout,
    ClientGone,
    ConnectFailed,
    ConnectTimeout,
    NotAdmitted,
    PoolTimeout,
    ResponseTooLarge,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from pep.transport.headers import encode_fields, header_view
from pep.transport.listener import (
    CONTINUE,
    DEFAULT_OPTIONS,
    ESTABLISHED,
    ConnectionInfo,
    ErrorAnswer,
    Exchange,
    Handler,
    Listener,
    ListenerOptions,
    ProtocolErrorHook,
    RequestLine,
    serve,
)
from pep.transport.pool import ClientResponse, Origin, Pool
from pep.transport.response import Response, ResponseState
from pep.transport.tunnel import Pipe, connect, splice

__all__ = [
    "CONTINUE",
    "DEFAULT_OPTIONS",
    "ESTABLISHED",
    "BadResponse",
    "BodyState",
    "BodyTimeout",
    "ClientGone",
    "ClientResponse",
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionInfo",
    "ErrorAnswer",
    "Exchange",
    "Handler",
    "Listener",
    "ListenerOptions",
    "NotAdmitted",
    "Origin",
    "Pipe",
    "Pool",
    "PoolTimeout",
    "ProtocolErrorHook",
    "RequestBody",
    "RequestLine",
    "Response",
    "ResponseState",
    "ResponseTooLarge",
    "UpstreamError",
    "UpstreamReset",
    "UpstreamTimeout",
    "connect",
    "encode_fields",
    "header_view",
    "serve",
    "splice",
]
