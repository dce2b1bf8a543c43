"""atheris harness: the answer readers (pep/protocols/sse.py and mcp_answer.py), what every MCP answer and every
model answer stream is read with before anything of it reaches the agent.

Input: one byte that chooses the chunk size (1-64: how the stream arrives in pieces), then the stream's bytes.
Oracles (fuzz/oracles.py): the events are those of a second, independent reading by the WHATWG EventSource field
rules, whatever the chunking; a stream that is not UTF-8 is unreadable; each event's data that is JSON is read as
an answer to one pending request (id 1), and a response passes only with exactly that id, once.
"""

from __future__ import annotations

from atheris.function_hooks import enabled_hooks
from atheris.import_hook import instrument_imports

from fuzz.harness import run

enabled_hooks.add("RegEx")
enabled_hooks.add("str")
with instrument_imports(include=["pep"]):
    from fuzz import oracles


def test_one_input(data: bytes) -> None:
    if data:
        oracles.check_answer_stream(data[0] % 64 + 1, data[1:])


if __name__ == "__main__":
    run(test_one_input)
