"""What a run sends, when, and what it breaks: the request mix, the two profiles and the chaos schedules.

Everything here is data and pure functions, shared by the harness and the load process: both derive the same
sequence of requests from the same seed, so the load process only has to report what happened to request `i`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CERBOS = "cerbos"  # the PEP deciding with the real Cerbos PDP (AuthZEN)
FAULT = "fault"  # the PEP deciding with the fault PDP (OPA shapes)
PEPS = (CERBOS, FAULT)

# What an allowed request must come back as (the upstream's behaviour for its path).
ECHO = "echo"  # 200, the upstream's JSON echo, complete
BIG = "big"  # 200, exactly `size` body bytes
SSE_FULL = "sse_full"  # 200, a complete event stream
SSE_DROP = "sse_drop"  # the client reads `events` events, then drops the connection
TRUNCATED = "truncated"  # 200 and part of the body, then the connection ends (upstream reset after the status line)
UPSTREAM_RESET = "upstream_reset"  # 502, x-pep-upstream-error: reset
UPSTREAM_TIMEOUT = "upstream_timeout"  # 504, x-pep-upstream-error: timeout
UPSTREAM_CONNECT = "upstream_connect"  # 502, x-pep-upstream-error: connect
PASSED_503 = "pass_503"  # the upstream's own 503, passed through (not a PEP failure)

BIG_BYTES = 8 * 1024 * 1024
SSE_DROP_AFTER = 3  # events the client reads before it drops an SSE stream
FAULT_ROUTE_TIMEOUT_MS = 300  # the `faults` and `deadend` routes' timeout_ms (small on purpose)


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of request. `may_allow`: whether an allow is legitimate at all (Cerbos's policies decide it;
    on the fault PEP it depends on the PDP's mode). `fixed_reason`: a denial decided before any PDP is asked."""

    name: str
    pep: str
    method: str
    target: str  # `{i}` is replaced by the request's index
    weight: int  # per mille of the whole load
    allowed: str = ECHO
    may_allow: bool = True
    fixed_reason: str | None = None
    body: bytes | None = None

    def path(self, i: int) -> str:
        return self.target.format(i=i).split("?", 1)[0]

    def raw_target(self, i: int) -> str:
        return self.target.format(i=i)


_JSON = b'{"q":"reliability","n":1}'

KINDS: tuple[Kind, ...] = (
    # The Cerbos PEP: the shipped policies (config/policies/cerbos) allow search, lookup_order and same-tenant
    # orders; shell is denied outright, send_email without a company address is not allowed.
    Kind("cerbos_search", CERBOS, "GET", "/tools/search?q={i}", 170),
    Kind("cerbos_search_post", CERBOS, "POST", "/tools/search", 80, body=_JSON),
    Kind("cerbos_lookup", CERBOS, "GET", "/tools/lookup_order?id={i}", 50),
    Kind("cerbos_order", CERBOS, "GET", "/orders/{i}?tenant=acme", 70),
    Kind("cerbos_order_other_tenant", CERBOS, "GET", "/orders/{i}?tenant=other", 40, may_allow=False),
    Kind("cerbos_shell", CERBOS, "POST", "/tools/shell", 50, may_allow=False, body=_JSON),
    Kind("cerbos_send_email", CERBOS, "POST", "/tools/send_email", 20, may_allow=False, body=_JSON),
    Kind("cerbos_no_route", CERBOS, "GET", "/nowhere/{i}", 10, may_allow=False, fixed_reason="no_route"),
    Kind(
        "cerbos_ambiguous",
        CERBOS,
        "GET",
        "/tools/search/%2e%2e/shell",
        10,
        may_allow=False,
        fixed_reason="request_ambiguous",
    ),
    # The fault PEP: allowed or not by the fault PDP's current mode.
    Kind("fault_get", FAULT, "GET", "/tools/item/{i}", 200),
    Kind("fault_post", FAULT, "POST", "/tools/item", 120, body=_JSON),
    Kind("fault_no_route", FAULT, "GET", "/other/{i}", 10, may_allow=False, fixed_reason="no_route"),
    # Upstream faults, on the route `faults` (strip_prefix, timeout_ms 300) and `deadend` (nothing listens).
    Kind("up_reset_head", FAULT, "POST", "/faults/reset?length=5000", 15, UPSTREAM_RESET, body=_JSON),
    Kind("up_reset_body", FAULT, "GET", "/faults/reset?length=300000", 10, TRUNCATED),
    Kind("up_drop_post", FAULT, "POST", "/faults/drop", 15, UPSTREAM_RESET, body=_JSON),
    Kind("up_drop_get", FAULT, "GET", "/faults/drop?i={i}", 10, UPSTREAM_RESET),
    Kind("up_hang", FAULT, "POST", "/faults/hang", 15, UPSTREAM_TIMEOUT, body=_JSON),
    Kind("up_slow_late", FAULT, "GET", "/faults/slow?ms=800", 10, UPSTREAM_TIMEOUT),
    Kind("up_slow_ok", FAULT, "POST", "/faults/slow?ms=30", 20, ECHO, body=_JSON),
    Kind("up_big", FAULT, "GET", f"/faults/big?bytes={BIG_BYTES}", 3, BIG),
    Kind("up_sse_drop", FAULT, "GET", "/faults/sse?n=40&gap_ms=25", 20, SSE_DROP),
    Kind("up_sse_full", FAULT, "GET", "/faults/sse?n=5&gap_ms=10&done=1", 20, SSE_FULL),
    Kind("up_status_503", FAULT, "POST", "/faults/status/503", 15, PASSED_503, body=_JSON),
    Kind("up_connect", FAULT, "POST", "/deadend/x", 17, UPSTREAM_CONNECT, body=_JSON),
)
BY_NAME = {k.name: k for k in KINDS}
assert sum(k.weight for k in KINDS) == 1000, "weights are per mille"


def sequence(total: int, seed: int) -> list[Kind]:
    """The kind of each request of a run, drawn by weight from `seed` (the same list in every process)."""
    rng = random.Random(seed)
    return rng.choices(KINDS, weights=[k.weight for k in KINDS], k=total)


def request_id(i: int) -> str:
    return f"rel-{i:07d}"


def warm_id(name: str) -> str:
    return f"warm-{name}"


# The fault PDP's modes (tests/support/fault_pdp.py MODES) by what the PEP must make of them.
ALLOW_MODES = frozenset({"allow", "allow_object", "slow_allow"})
HEALTHY_MODES = ALLOW_MODES | {"deny", "deny_object", "undefined", "undefined_allow", "slow_deny"}


@dataclass(frozen=True, slots=True)
class Profile:
    """Seconds from the load's start. `early` and `last` are the windows compared for memory, fds and tasks;
    chaos runs in [chaos_from, chaos_to); the PDPs are healthy outside it."""

    name: str
    rate: float
    duration: float
    early: tuple[float, float]
    chaos_from: float
    chaos_to: float
    last: tuple[float, float]
    cerbos_steps: tuple[tuple[str, float], ...]  # (action, seconds to wait after it), cycled
    fault_steps: tuple[tuple[str, float], ...]  # (mode, seconds it lasts), cycled
    pool_drain_s: float  # after the load: wait this long for the PEPs' idle upstream connections to close (0: no)


SMOKE = Profile(
    name="smoke",
    rate=300.0,
    duration=22.0,
    early=(2.0, 4.5),
    chaos_from=4.5,
    chaos_to=18.5,
    last=(19.5, 22.0),
    cerbos_steps=(("kill", 1.5), ("start", 2.0), ("freeze", 1.5), ("resume", 2.0), ("restart", 2.0)),
    fault_steps=(
        ("refuse", 1.5),
        ("allow", 2.0),
        ("hang", 1.5),
        ("slow_allow", 2.0),
        ("status_500", 1.5),
        ("allow_object", 2.0),
        ("not_json", 1.5),
        ("allow", 2.0),
    ),
    pool_drain_s=0.0,
)

FULL = Profile(
    name="full",
    rate=300.0,
    duration=300.0,
    early=(30.0, 60.0),
    chaos_from=60.0,
    chaos_to=270.0,
    last=(275.0, 300.0),
    cerbos_steps=(
        ("kill", 3.0),
        ("start", 6.0),
        ("freeze", 3.0),
        ("resume", 6.0),
        ("stop", 2.0),
        ("start", 6.0),
        ("restart", 6.0),
    ),
    fault_steps=(
        ("refuse", 3.0),
        ("allow", 3.0),
        ("hang", 3.0),
        ("slow_allow", 3.0),
        ("reset", 3.0),
        ("deny", 3.0),
        ("not_json", 3.0),
        ("allow", 3.0),
        ("status_500", 3.0),
        ("undefined", 3.0),
        ("truncated", 3.0),
        ("allow_object", 3.0),
        ("close", 3.0),
        ("allow", 3.0),
        ("status_503", 3.0),
        ("deny_object", 3.0),
        ("short_body", 3.0),
        ("allow", 3.0),
        ("string_true", 3.0),
        ("allow", 3.0),
        ("html", 3.0),
        ("slow_allow", 3.0),
        ("duplicate_keys", 3.0),
        ("allow", 3.0),
        ("wrong_content_type", 3.0),
        ("allow", 3.0),
        ("huge", 3.0),
        ("allow", 3.0),
        ("redirect", 3.0),
        ("allow", 3.0),
    ),
    pool_drain_s=70.0,
)

PROFILES = {p.name: p for p in (SMOKE, FULL)}

# The PEPs' PDP settings (both): the decision deadline, one retry, and a breaker that cycles quickly.
PDP_TIMEOUT_MS = 250
# pep/engine.py: a deadline noticed half of it late or more is the PEP's own stall, not counted against the PDP;
# its pdp_timeout lines say so in their detail.
STALLED_DETAIL = "while the PEP was held up"
FAILURE_THRESHOLD = 5
OPEN_MS = 1000
HALF_OPEN_PROBES = 1
