"""OPA's REST Data API: `POST {url}` with `{"input": DOC}`; allow only on `result: true` or `result.allow: true`."""

from __future__ import annotations

from typing import Any

import orjson

from pep import strictjson
from pep.decision import Reason
from pep.pdp import ALLOWED, DENIED, UNDEFINED, Failure, Verdict
from pep.pdp.transport import HttpTransport, RawAnswer

_RETRYABLE_STATUS = frozenset({502, 503, 504})
_NOTE_MAX = 256


def is_json_content_type(value: str) -> bool:
    """`application/json` or `application/*+json`, parameters allowed, case-insensitive."""
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json") and len(media) > len("application/+json")
    )


def status_failure(status: int) -> Failure:
    """A non-2xx answer (redirects included): an error, retryable only for 502/503/504."""
    return Failure(Reason.PDP_ERROR_STATUS, "error", status in _RETRYABLE_STATUS, f"status {status}")


def malformed(detail: str) -> Failure:
    return Failure(Reason.PDP_MALFORMED, "error", False, detail)


def parse_answer(answer: RawAnswer) -> Verdict | Failure:
    """Classify one OPA answer. Pure: the whole strictness of the OPA contract lives here."""
    if not 200 <= answer.status < 300:
        return status_failure(answer.status)
    if answer.oversize:
        return malformed("answer larger than pdp.max_response_bytes")
    if answer.undecodable:
        return malformed("answer body could not be decoded (Content-Encoding)")
    if not is_json_content_type(answer.content_type):
        return malformed(f"content type {answer.content_type[:64]!r} is not JSON")
    try:
        obj = strictjson.loads_object(answer.body)
    except strictjson.JsonError as exc:
        return malformed(str(exc)[:200])
    if "result" not in obj:
        return UNDEFINED
    result = obj["result"]
    if result is True:
        return ALLOWED
    if result is False:
        return DENIED
    if not isinstance(result, dict):
        return malformed(f"result is a {type(result).__name__}, not a boolean or an object")
    if "allow" not in result:
        return UNDEFINED
    allow = result["allow"]
    if not isinstance(allow, bool):
        return malformed(f"result.allow is a {type(allow).__name__}, not a boolean")
    note = result.get("reason")
    note = note[:_NOTE_MAX] if isinstance(note, str) else None
    if not allow:
        return Verdict(False, Reason.POLICY_DENIED, note=note) if note else DENIED
    headers = result.get("headers")
    if headers is None:
        return Verdict(True, Reason.ALLOWED, note=note) if note else ALLOWED
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return malformed("result.headers is not an object of strings")
    return Verdict(True, Reason.ALLOWED, tuple(headers.items()), note)


class OpaPdp:
    """One attempt against an OPA data path over the shared keep-alive pool."""

    def __init__(self, url: str, transport: HttpTransport) -> None:
        self.url = url
        self._transport = transport

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        body = orjson.dumps({"input": document})
        headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
        answer = await self._transport.post(self.url, body, headers)
        if isinstance(answer, Failure):
            return answer
        return parse_answer(answer)

    async def close(self) -> None:
        await self._transport.close()
