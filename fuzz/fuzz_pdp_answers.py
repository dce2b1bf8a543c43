"""atheris harness: the PDP answer readers (pep/pdp/answer.py, opa.py `parse_answer`, authzen.py
`parse_evaluation` and `parse_evaluations`).

Input: three bytes that choose how the answer arrived, then its body.
- byte 0: the status (mostly 200; also other 2xx, 1xx, 3xx, 4xx, 5xx and 0);
- byte 1: the content type (mostly application/json; also parameters, other cases, +json types, text types);
- byte 2: oversize (bits 0 and 1 both set), undecodable (bits 2 and 3), the echoed X-Request-ID (bits 4-5: none,
  the one sent, another, empty), the number of evaluations in a batch (bits 6-7: 1-4);
- the rest: the body bytes, read by all three.
Oracles (fuzz/oracles.py): allow exactly on the documented shapes, OPA `{"result": true}` or `{"result": {"allow":
true, ...}}` (headers an object of strings), AuthZEN `{"decision": true, ...}` without obligations, and only
for a 2xx answer with a JSON content type whose body the standard library reads as one strict JSON object (no
duplicate keys, nothing after it); every other answer is a deny with the reason the README gives ("PDPs"); a
batch answer is one result per evaluation, a missing one undefined.
"""

from __future__ import annotations

from atheris.function_hooks import enabled_hooks
from atheris.import_hook import instrument_imports

from fuzz.harness import run

enabled_hooks.add("RegEx")
enabled_hooks.add("str")
with instrument_imports(include=["pep"]):
    from fuzz import oracles
    from pep.pdp import authzen, opa
    from pep.pdp.transport import RawAnswer

STATUSES = (200,) * 16 + (201, 204, 299, 0, 100, 199, 300, 302, 304, 400, 404, 500, 502, 503, 504, 999)
CONTENT_TYPES = ("application/json",) * 8 + oracles.ODD_CONTENT_TYPES
REQUEST_IDS = (None, "rid-1", "rid-2", "")


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    a, b, c = data[0], data[1], data[2]
    answer = RawAnswer(
        status=STATUSES[a % len(STATUSES)],
        content_type=CONTENT_TYPES[b % len(CONTENT_TYPES)],
        body=data[3:],
        oversize=c & 3 == 3,
        undecodable=c & 12 == 12,
        request_id=REQUEST_IDS[(c >> 4) & 3],
    )
    oracles.check_opa(answer, opa.parse_answer(answer))
    oracles.check_authzen(answer, "rid-1", authzen.parse_evaluation(answer, "rid-1"))
    count = (c >> 6) + 1
    oracles.check_authzen_batch(answer, "rid-1", count, authzen.parse_evaluations(answer, "rid-1", count))


if __name__ == "__main__":
    run(test_one_input)
