"""Circuit breaker for the PDP: a pure state machine with an injectable monotonic clock.

Written here rather than taken from a library: the asyncio breakers on PyPI (circuitbreaker, aiobreaker,
purgatory) let every waiting call through once half-open, and some use the wall clock. A PEP wants exactly
`half_open_probes` probes per half-open period and a fast deny for everyone else.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class State(enum.IntEnum):
    """Values are those of the `pep_circuit_state` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Permit:
    """A right to call the PDP. `probe` permits decide the half-open state; others only count in closed."""

    __slots__ = ("epoch", "probe")

    def __init__(self, probe: bool, epoch: int) -> None:
        self.probe = probe
        self.epoch = epoch


Transition = Callable[[State, State], None]


def _no_transition(_old: State, _new: State) -> None:
    return None


class Breaker:
    """Closed -> open after `failure_threshold` consecutive failures; open -> half-open after `open_s`;
    half-open -> closed on a probe's success, -> open on a probe's failure.

    Results of calls admitted in an earlier state (an older `epoch`) are ignored, so a slow call that started
    while closed cannot close or reopen the circuit after it has moved on.
    """

    __slots__ = (
        "_clock",
        "_epoch",
        "_failures",
        "_on_transition",
        "_opened_at",
        "_probes_left",
        "_state",
        "failure_threshold",
        "half_open_probes",
        "open_s",
    )

    def __init__(
        self,
        failure_threshold: int,
        open_s: float,
        half_open_probes: int,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Transition = _no_transition,
    ) -> None:
        if failure_threshold < 1 or half_open_probes < 1 or open_s < 0:
            raise ValueError("invalid breaker settings")
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.half_open_probes = half_open_probes
        self._clock = clock
        self._on_transition = on_transition
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probes_left = 0
        self._epoch = 0

    @property
    def state(self) -> State:
        """The state as of now: an open circuit whose time is up reports half-open."""
        if self._state is State.OPEN and self._clock() - self._opened_at >= self.open_s:
            return State.HALF_OPEN
        return self._state

    @property
    def failures(self) -> int:
        return self._failures

    def acquire(self) -> Permit | None:
        """A permit to call the PDP, or None: deny at once (`circuit_open`) without calling it."""
        state = self._state
        if state is State.CLOSED:
            return Permit(False, self._epoch)
        if state is State.OPEN:
            if self._clock() - self._opened_at < self.open_s:
                return None
            self._move(State.HALF_OPEN)
            self._probes_left = self.half_open_probes
        if self._probes_left <= 0:
            return None
        self._probes_left -= 1
        return Permit(True, self._epoch)

    def success(self, permit: Permit) -> None:
        """The PDP gave a well-formed answer (allow, deny or undefined)."""
        if permit.epoch != self._epoch:
            return
        if permit.probe:
            self._failures = 0
            self._move(State.CLOSED)
        elif self._state is State.CLOSED:
            self._failures = 0

    def failure(self, permit: Permit) -> None:
        """Timeout, transport error, error status, malformed answer, or a cancelled call."""
        if permit.epoch != self._epoch:
            return
        if permit.probe:
            self._open()
        elif self._state is State.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probes_left = 0
        self._move(State.OPEN)

    def _move(self, new: State) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        if new is State.CLOSED:
            self._failures = 0
        if old is not new:
            self._on_transition(old, new)
