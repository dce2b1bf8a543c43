"""Answer streams as they arrive, against fuzz/oracles.py (shared with the atheris harness fuzz/fuzz_answers.py):
the SSE reader gives the events an independent reading by the EventSource field rules gives, whatever the
chunking, refuses what is not UTF-8, and a response read from an event passes only with the pending id, once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.oracles import check_answer_stream

FIELDS = st.sampled_from(
    [
        b"data: ",
        b"data:",
        b"data",
        b"id: ",
        b"id:",
        b"event: ",
        b"event:message",
        b"retry: ",
        b": ",
        b"\xef\xbb\xbf",
        b"",
        b"Data: ",
    ]
)
VALUES = st.sampled_from(
    [
        b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}',
        b'{"jsonrpc":"2.0","id":"1","result":{}}',
        b'{"jsonrpc":"2.0","id":2,"result":{}}',
        b'{"jsonrpc":"2.0","method":"ping","id":5}',
        b'{"jsonrpc":"2.0","id":1,"result":{"Tools":[]}}',
        b"[DONE]",
        b"12",
        b"a\x00b",
        b"\xff",
        "é".encode(),
        b"",
    ]
)
ENDS = st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n\r\n", b"\r\r", b""])
STREAMS = st.lists(st.tuples(FIELDS, VALUES, ENDS), max_size=8).map(
    lambda parts: b"".join(a + b + c for a, b, c in parts)
)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 255), STREAMS | st.binary(max_size=64))
def test_answer_streams(size: int, stream: bytes) -> None:
    check_answer_stream(size % 64 + 1, stream)
