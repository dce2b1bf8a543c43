"""The decision request (`HttpTransport.ask`) is `post(url, body, request_headers(...))` byte for byte.

`ask` builds its head's constant part once per URL and this request's fields as bytes, where `post` takes a
dict: both are sent to a loopback server that records the raw bytes, with and without a trace and a credential,
and must match exactly; what cannot be framed must fail the same way, with nothing sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pep.pdp import Failure
from pep.pdp.transport import HttpTransport, RawAnswer, request_headers
from pep.secret_file import FileSecret
from pep.trace import CURRENT, Trace

ANSWER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"result":true}'
BODY = b'{"input":{"a":1}}'


class Recorder(asyncio.Protocol):
    """Answers each whole request (head and Content-Length body) and keeps its bytes."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.seen.append(self.buf[: end + 4 + length])
            self.buf = self.buf[end + 4 + length :]
            self.transport.write(ANSWER)


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[bytes]]]:
    seen: list[bytes] = []
    srv = await asyncio.get_running_loop().create_server(lambda: Recorder(seen), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1/data/pep/authz?x=1", seen
    srv.close()
    await srv.wait_closed()


def secret(tmp_path: Path, text: str) -> FileSecret:
    path = tmp_path / "token"
    path.write_text(text, encoding="utf-8")
    return FileSecret(str(path), "Bearer {}")


def same(answer: RawAnswer | Failure) -> RawAnswer | Failure:
    return answer


def read(answer: RawAnswer | Failure) -> tuple[object, ...]:
    """An answer's fields (an answer is a plain value class: equal answers are equal field by field)."""
    if isinstance(answer, Failure):
        return (answer,)
    fields = (answer.content_type, answer.body, answer.oversize, answer.undecodable, answer.request_id)
    return (answer.status, *fields, answer.cache_control)


@pytest.mark.parametrize("traced", [False, True], ids=["no-trace", "trace"])
@pytest.mark.parametrize("state", [None, "k=v"], ids=["no-state", "state"])
@pytest.mark.parametrize("credential", [False, True], ids=["no-auth", "auth"])
async def test_ask_sends_what_post_sends(
    server: tuple[str, list[bytes]], tmp_path: Path, traced: bool, state: str | None, credential: bool
) -> None:
    url, seen = server
    auth = secret(tmp_path, "tok\n") if credential else None
    transport = HttpTransport(1 << 20, 4)
    token = CURRENT.set(Trace("a" * 32, "b" * 16, "01", state, remote=True) if traced else None)
    try:
        headers = request_headers("r-1", auth, "x-pdp-auth")
        assert not isinstance(headers, Failure)
        by_post = await transport.post(url, BODY, headers)
        by_ask = await transport.ask(url, BODY, "r-1", auth, "x-pdp-auth", same)
        assert read(by_ask) == read(by_post)
        assert isinstance(by_ask, RawAnswer)
        assert by_ask.body == b'{"result":true}'
    finally:
        CURRENT.reset(token)
        await transport.close()
    assert len(seen) == 2
    assert seen[0] == seen[1]
    assert (b"traceparent: 00-" in seen[0]) is traced
    assert (b"x-pdp-auth: Bearer tok\r\n" in seen[0]) is credential


@pytest.mark.parametrize(
    ("request_id", "token"),
    [
        pytest.param("r-\u20ac", "tok", id="request-id-not-latin-1"),
        pytest.param("r-1", "t\u20acken", id="credential-not-latin-1"),
        pytest.param("r-1", "t\x01ken", id="credential-control-character"),
        pytest.param("r-1", None, id="credential-missing"),
    ],
)
async def test_ask_fails_as_post_does_and_sends_nothing(
    server: tuple[str, list[bytes]], tmp_path: Path, request_id: str, token: str | None
) -> None:
    url, seen = server
    auth = secret(tmp_path, token) if token is not None else FileSecret(str(tmp_path / "absent"), "Bearer {}")
    transport = HttpTransport(1 << 20, 4)
    try:
        headers = request_headers(request_id, auth, "authorization")
        by_post = headers if isinstance(headers, Failure) else await transport.post(url, BODY, headers)
        by_ask = await transport.ask(url, BODY, request_id, auth, "authorization", same)
        assert isinstance(by_ask, Failure)
        assert read(by_ask) == read(by_post)
    finally:
        await transport.close()
    assert seen == []
