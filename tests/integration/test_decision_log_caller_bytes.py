"""Caller bytes that are not UTF-8 in a logged field still give a decision log line, and the right denial.

The agent header is logged as `subject.agent`. A byte that is not UTF-8 in it (decoded with surrogateescape, as
every header is) made the line's encoding raise: the request was answered `internal_error` and no line recorded
the decision. It is `request_ambiguous` (JSON cannot carry it to the PDP), and its line is written.
"""

from __future__ import annotations

import asyncio

from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp
from tests.support.upstream import RecordingUpstream


async def send(pep: RunningPep, extra: bytes) -> tuple[int, str | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", pep.port)
    try:
        writer.write(b"GET /tools/x HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"Connection: close\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers.get("x-pep-reason")


async def test_an_agent_header_that_is_not_utf8_is_denied_and_logged(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    assert await send(pep, b"X-Request-ID: agent-bytes\r\nX-Agent-Id: bot\xff\r\n") == (403, "request_ambiguous")
    assert fault_pdp.requests == []
    assert upstream.seen == []
    (line,) = [e for e in await pep.log_entries() if e["request_id"] == "agent-bytes"]
    assert (line["decision"], line["reason"]) == ("deny", "request_ambiguous")
    assert line["subject"]["agent"] == "bot\\udcff"
    # The PEP goes on deciding.
    assert await send(pep, b"X-Agent-Id: bot\r\n") == (200, None)
