"""A request body as the handler reads it: chunks as they arrive, with backpressure and read deadlines.

Bytes wait in the core's RequestReader buffer, which is also the only buffer: the connection stops reading
from the socket while it holds more than its high-water mark, and reads again when the handler takes them (or
waits for more). So a handler that does not read leaves the client blocked on a full TCP window, with memory
bounded by the mark; one that reads gets each chunk without another copy.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Final, Protocol

from pep.http1 import BodyTooLarge, Data, EndOfMessage, Fields, ProtocolError, Request, RequestReader
from pep.transport.errors import BodyTimeout


class BodySource(Protocol):
    """What a body needs from its connection (the listener's protocol)."""

    @property
    def reader(self) -> RequestReader: ...

    async def wait_body(self, seconds: float) -> None:
        """Until bytes or the end arrive; raises BodyTimeout after `seconds`, ClientGone if the client left."""

    def body_taken(self) -> None:
        """The handler took buffered bytes: read from the socket again if below the mark."""

    def body_failed(self) -> None:
        """The body broke HTTP/1.1 or a limit: the connection ends after the answer."""


class BodyState(enum.Enum):
    OPEN = "open"  # more may come
    DONE = "done"  # EndOfMessage was read (b"" from here on)
    FAILED = "failed"  # a read raised: the body cannot be read on


_OPEN: Final = BodyState.OPEN
_DONE: Final = BodyState.DONE
_FAILED: Final = BodyState.FAILED


class RequestBody:
    """One request's body. `read()` gives the next chunk (b"" at the end); `read_all(limit, within_s)` the
    whole body for inspection. Each wait for bytes is bounded by `chunk_s` (BodyTimeout)."""

    __slots__ = ("_pending", "_source", "_state", "chunk_s", "length", "trailers")

    def __init__(self, source: BodySource, request: Request, chunk_s: float) -> None:
        self._source = source
        self._state = _OPEN
        self._pending: deque[bytes] | None = None  # chunks read ahead when the answer started (see `settle`)
        self.chunk_s = chunk_s
        self.length = request.content_length  # None: chunked or no body
        self.trailers: Fields = []

    @property
    def state(self) -> BodyState:
        return self._state

    @property
    def complete(self) -> bool:
        """EndOfMessage has been read from the wire (chunks may still wait in `read`)."""
        return self._state is _DONE

    async def read(self) -> bytes:
        pending = self._pending
        if pending:
            return pending.popleft()
        if self._state is not _OPEN:
            if self._state is _DONE:
                return b""
            raise ProtocolError("the body could not be read")
        body = self._take()
        if body is not None:
            return body
        return await self._next(self.chunk_s)

    def _take(self) -> bytes | None:
        """The rest of the body if it is all here (RequestReader.take_body): the body is then complete."""
        body = self._source.reader.take_body()
        if body is not None:
            self._state = _DONE
            self._source.body_taken()
        return body

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def read_all(self, limit: int, within_s: float) -> bytes:
        """The whole body, at most `limit` bytes (BodyTooLarge, status hint 413, as soon as that is known: at
        once for a Content-Length), complete within `within_s` seconds (BodyTimeout)."""
        if self.length is not None and self.length > limit:
            self._fail()
            raise BodyTooLarge(f"Content-Length {self.length} over {limit} bytes", 413)
        pending = self._pending
        if not pending:
            if self._state is _OPEN:
                body = self._take()
                if body is not None:
                    return body  # within the limit: a Content-Length body, checked above
        elif self._state is _DONE and len(pending) == 1:  # `settle` took the whole body: what the loop would give
            chunk = pending.popleft()
            if len(chunk) > limit:
                self._fail()
                raise BodyTooLarge(f"body over {limit} bytes", 413)
            return chunk
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        chunks: list[bytes] = []
        size = 0
        while True:
            if self._pending:
                chunk = self._pending.popleft()
            elif self._state is not _OPEN:
                if self._state is _FAILED:
                    raise ProtocolError("the body could not be read")
                break
            else:
                left = deadline - loop.time()
                if left <= 0:
                    self._fail()
                    raise BodyTimeout("the body was not complete within its deadline")
                chunk = await self._next(min(self.chunk_s, left))
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                self._fail()
                raise BodyTooLarge(f"body over {limit} bytes", 413)
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _next(self, seconds: float) -> bytes:
        source = self._source
        reader = source.reader
        while True:
            try:
                event = reader.next_event()
            except ProtocolError:
                self._fail()
                raise
            kind = type(event)
            if kind is Data:
                source.body_taken()
                return event.data  # type: ignore[union-attr]
            if kind is EndOfMessage:
                self._state = _DONE
                self.trailers = event.trailers  # type: ignore[union-attr]
                source.body_taken()
                return b""
            try:
                await source.wait_body(seconds)
            except BaseException:
                self._fail()
                raise

    def settle(self) -> bool:
        """The answer is starting: read what is already buffered of the body (kept for `read`), and say whether
        the body is complete. If it is not, the connection must close after the answer: where the next request
        begins is unknown until the rest of this body has been read."""
        if self._state is not _OPEN:
            return self._state is _DONE
        reader = self._source.reader
        body = reader.take_body()
        if body is not None:
            if body:
                if self._pending is None:
                    self._pending = deque()
                self._pending.append(body)
            self._state = _DONE
            self._source.body_taken()
            return True
        while True:
            try:
                event = reader.next_event()
            except ProtocolError:
                self._fail()
                return False
            kind = type(event)
            if kind is Data:
                if self._pending is None:
                    self._pending = deque()
                self._pending.append(event.data)  # type: ignore[union-attr]
            elif kind is EndOfMessage:
                self._state = _DONE
                self.trailers = event.trailers  # type: ignore[union-attr]
                self._source.body_taken()
                return True
            else:  # NEED_DATA: the rest is not here (the socket stays paused if it was)
                return False

    def _fail(self) -> None:
        if self._state is _OPEN:
            self._state = _FAILED
            self._source.body_failed()
