"""atheris harness: the PDP client's HTTP/1.1 reader (pep/pdp/http1.py, httptools underneath).

Input: one byte that says how the bytes arrive, then the bytes a server sends after the PEP's decision request.
- byte 0: whether the server closes the connection after them (bit 0), and into how many reads they are cut
  (bits 1-3: 1 to 8 reads of about equal size);
- the rest: the server's bytes.
Oracles (fuzz/oracles.py `check_exchange`): the exchange ends in an Answer, an ExchangeError or nothing yet, and
no other exception escapes the connection's callbacks into the event loop; a 2xx Answer (not over the size limit)
comes only from a complete, valid response as h11 reads the same bytes, and carries that response's status,
content type, X-Request-ID and body.
"""

from __future__ import annotations

import asyncio

from atheris.function_hooks import enabled_hooks
from atheris.import_hook import instrument_imports

from fuzz.harness import run

enabled_hooks.add("str")
with instrument_imports(include=["pep"]):
    from fuzz import oracles

LIMIT = 64  # small, so that answers over the PDP answer limit are common
LOOP = asyncio.new_event_loop()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    eof, reads, raw = bool(data[0] & 1), ((data[0] >> 1) & 7) + 1, data[1:]
    step = max(1, -(-len(raw) // reads))
    chunks = [raw[i : i + step] for i in range(0, len(raw), step)] or [b""]
    result = LOOP.run_until_complete(oracles.exchange(chunks, eof, LIMIT))
    oracles.check_exchange(raw, eof, LIMIT, result)


if __name__ == "__main__":
    run(test_one_input)
