"""The PDP client's HTTP/1.1 reader (pep/pdp/http1.py) for any bytes a server may send, read by read, with or
without the server closing the connection afterwards. Checked by fuzz/oracles.py (`check_exchange`):

- the exchange ends in an Answer, an ExchangeError or nothing yet, and no other exception escapes the
  connection's callbacks into the event loop;
- a 2xx Answer comes only from a complete, valid response as h11 (an independent parser) reads the same bytes,
  and carries that response's status, content type, X-Request-ID and body.

Responses are generated whole (interim 1xx answers, any framing, encodings, sizes around the limit) and then
damaged: cut short, extended, or with a byte changed.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import zlib
from collections.abc import Callable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fuzz.oracles import Exchange, check_exchange, examples, exchange
from pep.pdp.http1 import ExchangeError

LIMIT = 64


def run(chunks: list[bytes], eof: bool) -> None:
    result = asyncio.run(exchange(chunks, eof, LIMIT))
    event("answer" if result.answer else "error" if result.error else "pending" if result.pending else "escaped")
    check_exchange(b"".join(chunks), eof, LIMIT, result)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, str]:
    """A well-formed response (maybe after 1xx answers), and its framing."""
    head = b""
    for _ in range(draw(st.integers(0, 2))):
        status = draw(st.sampled_from([100, 102, 103]))
        extra = draw(
            st.lists(
                st.sampled_from([b"Link: </a>\r\n", b"Content-Type: application/json\r\n", b"X-Request-ID: r\r\n"]),
                max_size=2,
            )
        )
        head += b"HTTP/1.1 %d Interim\r\n" % status + b"".join(extra) + b"\r\n"
    status = draw(st.sampled_from([200, 200, 201, 299, 302, 404, 500, 503]))
    body = draw(st.sampled_from([b'{"result":true}', b'{"decision":false}', b"", b"x" * (LIMIT + 1)]))
    headers = draw(
        st.lists(
            st.sampled_from(
                [
                    b"Content-Type: application/json\r\n",
                    b"Content-Type: text/plain\r\n",
                    b"X-Request-ID: rid-1\r\n",
                    b"Cache-Control: max-age=5\r\n",
                    b"Connection: close\r\n",
                    b"Connection: keep-alive\r\n",
                ]
            ),
            max_size=3,
        )
    )
    encoding = draw(st.sampled_from(["identity", "identity", "gzip", "deflate", "br"]))
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    if encoding in ("gzip", "deflate"):
        # after the one stream: nothing, a second gzip member (another answer), or other bytes
        body += draw(st.sampled_from([b"", b"", gzip.compress(b'{"result":false}'), b"\0\0", b"garbage"]))
    if encoding != "identity":
        fields = draw(st.sampled_from([[encoding], [encoding, "identity"], ["identity", encoding], [encoding] * 2]))
        headers += [b"Content-Encoding: %s\r\n" % e.encode() for e in fields]
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if framing == "length":
        headers.append(b"Content-Length: %d\r\n" % len(body))
        payload = body
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked\r\n")
        cut = draw(st.integers(0, len(body)))
        parts = [p for p in (body[:cut], body[cut:]) if p]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    else:
        payload = body
    return head + b"HTTP/1.1 %d Final\r\n" % status + b"".join(headers) + b"\r\n" + payload, framing


@st.composite
def reads(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """The bytes as the socket might deliver them: in one read or split anywhere."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [b""]


@settings(max_examples=examples(300), deadline=None)
@given(responses(), st.booleans(), st.data())
def test_a_whole_response_gives_its_answer(response: tuple[bytes, str], eof: bool, data: st.DataObject) -> None:
    raw, framing = response
    chunks = data.draw(reads(raw))
    result = asyncio.run(exchange(chunks, eof, LIMIT))
    check_exchange(raw, eof, LIMIT, result)
    if framing == "close" and not eof:
        assert result.pending or (result.answer is not None and result.answer.oversize), (raw, result)
    else:
        assert result.answer is not None, (raw, result)


@settings(max_examples=examples(300), deadline=None)
@given(responses(), st.booleans(), st.data())
def test_a_cut_response_never_gives_a_2xx_answer(response: tuple[bytes, str], eof: bool, data: st.DataObject) -> None:
    raw, framing = response
    cut = raw[: data.draw(st.integers(0, len(raw) - 1))]
    result = asyncio.run(exchange(data.draw(reads(cut)), eof, LIMIT))
    check_exchange(cut, eof, LIMIT, result)
    if framing != "close" and result.answer is not None:
        # only an answer already known to be over the limit is reported before its end (and is never allowed)
        assert result.answer.oversize or not 200 <= result.answer.status < 300, (cut, result)


@settings(max_examples=examples(300), deadline=None)
@given(responses(), st.booleans(), st.data())
def test_a_damaged_response_gives_an_answer_an_error_or_nothing(
    response: tuple[bytes, str], eof: bool, data: st.DataObject
) -> None:
    raw, _ = response
    i = data.draw(st.integers(0, len(raw) - 1))
    how = data.draw(st.sampled_from(["replace", "insert", "delete", "append"]))
    byte = bytes([data.draw(st.sampled_from([0, 10, 13, 32, 48, 58, 127, 255]) | st.integers(0, 255))])
    more = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-ID: rid-2\r\nX: y\r\n"
    damaged = {
        "append": raw + more[: data.draw(st.integers(1, len(more)))],
        "replace": raw[:i] + byte + raw[i + 1 :],
        "insert": raw[:i] + byte + raw[i:],
        "delete": raw[:i] + raw[i + 1 :],
    }
    run(data.draw(reads(damaged[how])), eof)


@settings(max_examples=examples(200), deadline=None)
@given(
    st.sampled_from([b"", b"HTTP/1.1 ", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 200 OK\r\n"]),
    st.binary(max_size=48),
    st.booleans(),
)
def test_any_bytes_give_an_answer_an_error_or_nothing(prefix: bytes, data: bytes, eof: bool) -> None:
    run([prefix + data], eof)


# --- found by these properties -------------------------------------------------------------------------------


def one(data: bytes, eof: bool = True) -> Exchange:
    # Not through check_exchange: the oracle counts these known bugs instead of failing (fuzz/oracles.py KNOWN_BUGS)
    return asyncio.run(exchange([data], eof, LIMIT))


def test_an_upgrade_answer_fails_the_exchange_without_escaping() -> None:
    result = one(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert result.escaped is None
    assert isinstance(result.error, ExchangeError)


def test_interim_headers_do_not_carry_over_to_the_final_answer() -> None:
    result = one(
        b"HTTP/1.1 100 Continue\r\nContent-Type: application/json\r\nX-Request-ID: r\r\n\r\n"
        b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"result":true}'
    )
    assert result.answer is not None
    assert (result.answer.status, result.answer.content_type, result.answer.request_id) == (200, "", None)


def test_bytes_after_the_answer_do_not_change_it() -> None:
    result = one(
        b'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 15\r\n\r\n{"result":true}'
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-ID: other\r\nX: y\r\n",
        eof=False,
    )
    assert result.answer is not None
    assert (result.answer.content_type, result.answer.request_id) == ("text/plain", None)


COMPRESS: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "deflate": zlib.compress}


@pytest.mark.parametrize("after", [b"second", b"garbage", b"\0"], ids=["second-stream", "garbage", "padding"])
@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_anything_after_the_one_compressed_stream_is_undecodable(coding: str, after: bytes) -> None:
    """Read only up to the end of the first member, `gzip(allow) + gzip(deny)` was an allow, while the same bytes
    uncompressed, `{"result":true}{"result":false}`, are `pdp_malformed` (trailing data). Within LIMIT on the wire."""
    compress = COMPRESS[coding]
    body = compress(b'{"result":true}') + (compress(b"{}") if after == b"second" else after)
    assert len(body) <= LIMIT
    result = one(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
        % (coding.encode(), len(body))
        + body
    )
    assert result.answer is not None
    assert result.answer.undecodable
    assert result.answer.body == b""


@pytest.mark.parametrize(
    ("fields", "decoded"),
    [
        pytest.param([b"gzip"], True, id="gzip"),
        pytest.param([b"gzip", b"identity"], True, id="gzip-then-identity"),
        pytest.param([b" GZIP "], True, id="case-and-space"),
        pytest.param([b"gzip", b"gzip"], False, id="repeated-gzip"),
        pytest.param([b"gzip, gzip"], False, id="gzip-twice-in-one-field"),
        pytest.param([b"gzip, br"], False, id="gzip-and-br"),
        pytest.param([b"identity", b"deflate"], False, id="identity-then-deflate-on-gzip-bytes"),
    ],
)
def test_repeated_content_encoding_fields_are_one_list(fields: list[bytes], decoded: bool) -> None:
    """The last field alone used to count. Several codings are not undone (the client asks for none)."""
    body = gzip.compress(b'{"result":true}')
    head = b"".join(b"Content-Encoding: %s\r\n" % f for f in fields)
    result = one(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n" % (head, len(body)) + body
    )
    assert result.answer is not None
    assert result.answer.undecodable is not decoded
    assert result.answer.body == (b'{"result":true}' if decoded else b"")


def test_a_compressed_answer_larger_than_the_limit_once_decoded_is_oversize() -> None:
    body = gzip.compress(b" " * (LIMIT * 1000) + b"{}")  # a few hundred bytes on the wire
    assert len(body) < LIMIT * 4
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
    result = one(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert result.answer is not None
    assert result.answer.oversize
    assert result.answer.body == b""


def test_an_unknown_transfer_coding_is_not_read_as_the_body() -> None:
    result = one(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: x-custom, chunked\r\n\r\n"
        b'f\r\n{"result":true}\r\n0\r\n\r\n'
    )
    assert result.answer is None or result.answer.undecodable
