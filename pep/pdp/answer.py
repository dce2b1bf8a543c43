"""Reading a PDP's HTTP answer strictly: the rules OPA and AuthZEN share before their own fields are looked at."""

from __future__ import annotations

from typing import Any, Final

from pep import strictjson
from pep.decision import Reason
from pep.pdp import Failure
from pep.pdp.transport import RawAnswer

_RETRYABLE_STATUS: Final = frozenset({502, 503, 504})


# Content types already found to be JSON: a PDP sends the same one or two values on every answer, so one set
# lookup in C replaces the split, strip and lower-casing. Bounded: short values only, cleared when full.
_JSON_TYPES: Final[set[str]] = set()
_JSON_TYPES_MAX: Final = 64


def is_json_content_type(value: str) -> bool:
    """`application/json` or `application/*+json`, parameters allowed, case-insensitive."""
    if value in _JSON_TYPES:
        return True
    media = value.split(";", 1)[0].strip().lower()
    json = media == "application/json" or (
        media.startswith("application/") and media.endswith("+json") and len(media) > len("application/+json")
    )
    if json and len(value) <= 128:
        if len(_JSON_TYPES) >= _JSON_TYPES_MAX:
            _JSON_TYPES.clear()
        _JSON_TYPES.add(value)
    return json


def status_failure(status: int) -> Failure:
    """A non-2xx answer (redirects included): an error, retryable only for 502/503/504.

    A 4xx other than 408 is `refused`: the PDP is up, answered in time, and turned down this one request, often
    for what the caller put in it (Cerbos answers 429 to an input whose protobuf form is over 4 MiB, which a
    JSON array of small numbers reaches from a fraction of that, and 400 to values its schema rejects). Counted
    as a breaker failure, a few such requests would open the circuit for every caller; a PDP that answers in
    time needs no circuit to deny fast."""
    return Failure(
        Reason.PDP_ERROR_STATUS,
        "error",
        status in _RETRYABLE_STATUS,
        f"status {status}",
        400 <= status < 500 and status != 408,
    )


def malformed(detail: str) -> Failure:
    return Failure(Reason.PDP_MALFORMED, "error", False, detail)


def answer_problem(answer: RawAnswer) -> Failure | None:
    """Why the answer's body cannot be read as its decision at all: status, size, encoding, content type."""
    if not 200 <= answer.status < 300:
        return status_failure(answer.status)
    if answer.oversize:
        return malformed("answer larger than pdp.max_response_bytes")
    if answer.undecodable:
        return malformed("answer body could not be decoded (Content-Encoding)")
    if answer.content_type not in _JSON_TYPES and not is_json_content_type(answer.content_type):
        return malformed(f"content type {answer.content_type[:64]!r} is not JSON")
    return None


def read_object(answer: RawAnswer) -> dict[str, Any] | Failure:
    """The answer's JSON object, or why there is none: status, size, encoding, content type, strict JSON."""
    problem = answer_problem(answer)
    if problem is not None:
        return problem
    try:
        return strictjson.loads_object(answer.body)
    except strictjson.JsonError as exc:
        return malformed(str(exc)[:200])
