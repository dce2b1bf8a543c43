"""What the PEP gives the agent in place of the server's ids, so that what comes back says what it answers.

A client's reply to a server request names only the request's id, and a resumed stream only the last event id it
saw. To decide a reply by the method it answers, and to read a resumed stream as the stream it continues, the PEP
replaces three kinds of server ids in what it relays with sealed tokens (`pep.seal`, AES-256-GCM):
- the id of a server-to-client request (`elicitation/create`, `sampling/createMessage`, ...): the reply carries
  the token as its id; the PEP opens it and forwards the server's own id;
- the keys of a 2026-07-28 `InputRequiredResult`'s `inputRequests`: the retry carries them in `inputResponses`;
- SSE event ids: a `GET` with `Last-Event-ID` carries one; it says which requests' answers the stream resumes.

Each token holds the server's value, what it belongs to (the method; the requests still unanswered), and is bound
to the route, the caller (the subject's principal) and the `Mcp-Session-Id` it was issued under: a token from
another route, caller or session does not open, and neither does a forged, expired or unknown one. A reply or a
resumption whose token does not open is refused, never forwarded as an unknown reply. Tokens open in any process
holding the key (`seal_key_files`, or the key a supervisor hands its workers), so a reply may come back on another
connection or to another worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pep.pdp.mapping import principal
from pep.seal import Sealer, Unsealed

TOKEN_TTL_S: Final = (
    86400.0  # how long a relayed id stays answerable (a server request waiting on a person, a resumption)
)
_REQUEST: Final = "mcp/request-id"
_INPUT: Final = "mcp/input-key"
_EVENT: Final = "mcp/event-id"


@dataclass(frozen=True, slots=True)
class Resumption:
    """What a sealed event id says about the stream it came from."""

    event_id: str  # the server's own event id, for its `Last-Event-ID`
    pending: tuple[tuple[Any, str], ...] | None  # (request id, method) unanswered then; None for a GET stream
    version: str | None  # the MCP protocol version of the request


class Tokens:
    """Seals and opens tokens for one route, caller and session. `now` is the wall clock (seconds)."""

    __slots__ = ("_bound", "_now", "_sealer")

    def __init__(
        self, sealer: Sealer, route: str, subject: str, session: str | None, now: Callable[[], float] = time.time
    ) -> None:
        self._sealer = sealer
        self._bound: dict[str, str | None] = {"r": route, "s": subject, "c": session}
        self._now = now

    def _seal(self, purpose: str, payload: dict[str, Any]) -> str:
        return self._sealer.seal(purpose, {**self._bound, "p": payload}, self._now() + TOKEN_TTL_S)

    def _open(self, purpose: str, token: Any) -> dict[str, Any] | str:
        if not isinstance(token, str):
            return "not a token the PEP issued"
        opened = self._sealer.open(purpose, token)
        if not isinstance(opened, Unsealed):
            return f"a token that does not open ({opened.value})"
        data = opened.data
        for key, value in self._bound.items():
            if data.get(key) != value:
                return {"r": "a token from another route", "s": "a token issued to another caller"}.get(
                    key, "a token from another session"
                )
        payload = data.get("p")
        return payload if isinstance(payload, dict) else "a token that does not open (forged)"

    def request_id(self, rpc_id: Any, method: str) -> str:
        return self._seal(_REQUEST, {"i": rpc_id, "m": method})

    def open_request_id(self, token: Any) -> tuple[Any, str] | str:
        """(the server's request id, its method), or why the token does not open."""
        payload = self._open(_REQUEST, token)
        if isinstance(payload, str):
            return payload
        return payload.get("i"), str(payload.get("m"))

    def input_key(self, key: str, method: str) -> str:
        return self._seal(_INPUT, {"k": key, "m": method})

    def open_input_key(self, token: Any) -> tuple[str, str] | str:
        """(the server's input request key, its method), or why the token does not open."""
        payload = self._open(_INPUT, token)
        if isinstance(payload, str):
            return payload
        return str(payload.get("k")), str(payload.get("m"))

    def event_id(self, event_id: str, pending: list[tuple[Any, str]] | None, version: str | None) -> str:
        return self._seal(_EVENT, {"e": event_id, "q": pending, "v": version})

    def open_event_id(self, token: str) -> Resumption | str:
        payload = self._open(_EVENT, token)
        if isinstance(payload, str):
            return payload
        pending = payload.get("q")
        version = payload.get("v")
        return Resumption(
            str(payload.get("e")),
            None if pending is None else tuple((p[0], str(p[1])) for p in pending),
            version if isinstance(version, str) else None,
        )


def for_caller(sealer: Sealer, route: str, subject: dict[str, Any], headers: Mapping[str, str]) -> Tokens:
    """The tokens of one caller (the principal the PDP sees: a verified user, the workload, or anonymous) on one
    MCP route and session."""
    kind, name = principal({"subject": subject})
    return Tokens(sealer, route, f"{kind}:{name}", headers.get("Mcp-Session-Id"))
