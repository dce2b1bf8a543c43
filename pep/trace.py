"""W3C Trace Context: the caller's `traceparent`/`tracestate` kept, or a trace started, for the PDP and upstream.

Without `tracing` in the config the PEP takes part in no trace itself: a valid `traceparent` goes on to the PDP
and the upstream unchanged, so their spans hang under the caller's; a missing or invalid one is replaced by a
new trace (and its `tracestate` dropped, as the spec asks), so the PDP request, the upstream request and the
decision log line share one trace id. A `tracestate` goes on only when it follows the spec's grammar: it is
caller data copied into the PDP request, so it must never be able to break that request. The cost is a header
lookup or two and, for a new trace, two random ids. With `tracing` (pep/otel.py) the PEP's own span becomes the
parent of what it sends on.

The request's trace lives in a ContextVar: the PDP client and the upstream forwarder run in the handler's
task (or tasks it creates, which copy the context), so nothing has to be threaded through their signatures.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextvars import ContextVar
from random import getrandbits
from typing import Any, Final, Protocol

from multidict import CIMultiDictProxy

_HEX_LOWER: Final = re.compile(r"[0-9a-f]+\Z")
_INVALID_TRACE: Final = "0" * 32
_INVALID_SPAN: Final = "0" * 16
MAX_TRACESTATE: Final = 512  # the spec's minimum a vendor must propagate; longer lists are truncated by members
MAX_MEMBERS: Final = 32
# Trace Context level 1, 3.3.1.3: a key is a simple key or `tenant@system`; a value is printable ASCII without
# `,` and `=`, at most 256 characters, not ending in a space. Nothing outside ASCII can pass, so a kept tracestate
# always fits in a header (a caller's `é` or a byte that is not UTF-8 once made building the PDP request fail).
_KEY: Final = re.compile(r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})\Z")
_VALUE: Final = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\Z")
_OWS: Final = " \t"
_LOWEST_BITS: Final = 1 << 64 | 1  # of a new trace id (the top 128 of 192 random bits) and of its parent id (the rest)


class Trace:
    """One request's position in a trace: the trace id, the span the PEP's requests hang under, flags."""

    __slots__ = ("flags", "parent_id", "remote", "span", "state", "trace_id")

    def __init__(self, trace_id: str, parent_id: str, flags: str, state: str | None, remote: bool) -> None:
        self.remote = remote  # the caller's trace (else started here)
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.flags = flags
        self.state = state
        self.span: Any = None  # the PEP's own span, when tracing is on

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"

    def headers(self) -> dict[str, str]:
        """What the PDP request and the upstream request carry."""
        out = {"traceparent": self.traceparent}
        if self.state:
            out["tracestate"] = self.state
        return out

    def fields(self) -> list[tuple[bytes, bytes]]:
        """`headers()` as the fields of the upstream request: both values are ASCII (checked, or made here)."""
        out = [(b"traceparent", f"00-{self.trace_id}-{self.parent_id}-{self.flags}".encode("ascii"))]
        if self.state:
            out.append((b"tracestate", self.state.encode("ascii")))
        return out


CURRENT: Final[ContextVar[Trace | None]] = ContextVar("pep_trace", default=None)


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a valid `traceparent`, else None (W3C Trace Context level 1, 3.2)."""
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version, trace_id, parent_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if version == "ff" or not _HEX_LOWER.match(version):
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":  # a later version may append fields, after a dash
        return None
    if not (_HEX_LOWER.match(trace_id) and _HEX_LOWER.match(parent_id) and _HEX_LOWER.match(flags)):
        return None
    if trace_id == _INVALID_TRACE or parent_id == _INVALID_SPAN:
        return None
    return trace_id, parent_id, flags


def parse_tracestate(values: Iterable[str]) -> str | None:
    """The caller's `tracestate` fields as one list to send on, or None when there is none or it is invalid.

    W3C Trace Context level 1, 3.3.1: repeated fields are one comma-separated list; empty members are skipped;
    every other member is `key=value` in the spec's character sets, keys are unique, at most 32 members. An
    invalid list is dropped whole (the spec's "MUST NOT attempt to propagate"), never sent on in part; so is a
    valid one longer than 512 characters, rather than a list cut in the middle.
    """
    members: list[str] = []
    keys: set[str] = set()
    for field in values:
        for raw in field.split(","):
            member = raw.strip(_OWS)
            if not member:
                continue
            key, sep, value = member.partition("=")
            if not sep or not _KEY.match(key) or not _VALUE.match(value) or key in keys:
                return None
            keys.add(key)
            members.append(member)
    if not members or len(members) > MAX_MEMBERS:
        return None
    state = ",".join(members)
    return state if len(state) <= MAX_TRACESTATE else None


def from_headers(headers: CIMultiDictProxy[str]) -> Trace:
    """The caller's trace when it sent exactly one valid `traceparent`, else a new one (not sampled: the PEP
    recorded nothing that a sampled flag would promise)."""
    parents = headers.getall("traceparent", ())
    found = parse_traceparent(parents[0]) if len(parents) == 1 else None
    if found is None:
        # Random ids (W3C asks for randomness, not secrecy): the PRNG, seeded from the OS, costs no syscall. Both
        # are drawn as one number, each id's lowest bit set (an id of zeros is invalid), and formatted once (as
        # bytes to hex: compiled, a format spec goes through `str.format`, about three times slower).
        ids = (getrandbits(192) | _LOWEST_BITS).to_bytes(24, "big").hex()
        return Trace(ids[:32], ids[32:], "00", None, False)
    trace_id, parent_id, flags = found
    return Trace(trace_id, parent_id, flags, parse_tracestate(headers.getall("tracestate", ())), remote=True)


class Spans(Protocol):
    """What the proxy needs of span recording (pep/otel.py); None when tracing is off."""

    def start(self, trace: Trace, method: str) -> None: ...

    def finish(self, trace: Trace, attributes: dict[str, Any], status: int | None) -> None: ...
