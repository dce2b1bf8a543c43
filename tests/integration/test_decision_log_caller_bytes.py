"""Caller bytes that are not UTF-8 in a logged field still give a decision log line, and the right denial.

The agent header is logged as `subject.agent`. A byte that is not UTF-8 in it (decoded with surrogateescape, as
every header is) made the line's encoding raise: the request was answered `internal_error` and no line recorded
the decision. It is `request_ambiguous` (JSON cannot carry it to the PDP), and its line is written.
"""

from __future__ import annotations

from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp
from tests.support.raw_client import raw_get
from tests.support.upstream import RecordingUpstream


async def send(pep: RunningPep, extra: bytes) -> tuple[int, str | None]:
    return await raw_get(pep.port, extra=extra)


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
