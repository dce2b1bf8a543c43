"""atheris harness: the sans-IO HTTP/1.1 core (pep/http1), its request reader and its response reader, against
h11 as the independent reader.

Input: two bytes that say how the bytes are read, then the bytes a peer sends.
- byte 0: bit 0, which reader (0: requests, as the listener reads them; 1: the answer to one request, as the
  PDP and upstream clients read it); bit 1, whether the peer closes the connection after the bytes; bits 2-4,
  into how many reads they are cut (1 to 8); bits 5-6, the method of the request a response answers (GET,
  HEAD, POST, CONNECT); bit 7, tiny limits (so that every limit is reached often);
- byte 1: the body limit in bytes (255: none);
- the rest: the peer's bytes.
Oracles (fuzz/http1_oracles.py): only ProtocolError leaves a reader, with a server (or client) status hint; the
reading is the same in one read and in the cuts, with bodies taken whole (`take_body`) or read as events; every
message handed out is the one h11 reads from the same bytes (line, fields, body, trailers, end, keep-alive);
bytes after an answer are an error exactly when h11 sees some; a body limit is reported only for a longer body.
"""

from __future__ import annotations

from pathlib import Path

from atheris.function_hooks import enabled_hooks
from atheris.import_hook import instrument_imports

from fuzz.harness import load_built, run

enabled_hooks.add("str")
with instrument_imports(include=["pep"]):
    from fuzz import http1_oracles as oracles
    from pep.http1 import Limits, head

# The readers find heads and split field lines with the C of a compiled build (pep/http1/_fieldlines.c), as they
# do in `pep run`: held to h11 here. The pure-Python twins are held to the C by tests/unit/test_http1_fieldlines.py.
_FIELDLINES = load_built(Path(head.__file__).parent, "pep.http1._fieldlines")
head.__dict__.update(BOUNDS=_FIELDLINES.bounds, SPLIT_LINES=_FIELDLINES.split)  # (Final in the source: for pep run)

METHODS = (b"GET", b"HEAD", b"POST", b"CONNECT")
TINY = Limits(
    max_line_bytes=40,
    max_field_bytes=40,
    max_fields=4,
    max_head_bytes=160,
    max_chunk_line_bytes=12,
    max_informational=1,
)


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, limit, raw = data[0], data[1], data[2:]
    eof, reads, method = bool(flags & 2), ((flags >> 2) & 7) + 1, METHODS[(flags >> 5) & 3]
    limits = TINY if flags & 0x80 else None
    max_body = None if limit == 255 else limit
    chunks = oracles.cut(raw, reads)
    if flags & 1:
        whole = oracles.read_response([raw], eof, method, limits, max_body)
        oracles.check_same_for_any_cut(whole, oracles.read_response(chunks, eof, method, limits, max_body), raw, chunks)
        taken = oracles.read_response(chunks, eof, method, limits, max_body, take=True)
        oracles.check_same_for_any_cut(whole, taken, raw, chunks)
        oracles.check_response(raw, eof, method, whole, max_body)
    else:
        whole = oracles.read_requests([raw], eof, limits, max_body)
        oracles.check_same_for_any_cut(whole, oracles.read_requests(chunks, eof, limits, max_body), raw, chunks)
        taken = oracles.read_requests(chunks, eof, limits, max_body, take=True)
        oracles.check_same_for_any_cut(whole, taken, raw, chunks)
        oracles.check_requests(raw, eof, whole, max_body)


if __name__ == "__main__":
    run(test_one_input)
