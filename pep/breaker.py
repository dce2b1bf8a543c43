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
    """A right to call the PDP at once. `probe` permits decide the half-open state; others only count in closed.

    `admitted` is set by `Breaker.admit`, right before the call's first byte: only an admitted permit's result
    says anything about the PDP.
    """

    __slots__ = ("admitted", "epoch", "probe")

    def __init__(self, probe: bool, epoch: int) -> None:
        self.probe = probe
        self.epoch = epoch
        self.admitted = False


Transition = Callable[[State, State], None]


def _no_transition(_old: State, _new: State) -> None:
    return None


class Breaker:
    """Closed -> open after `failure_threshold` consecutive failures; open -> half-open after `open_s`;
    half-open -> closed on a probe's success, -> open on a probe's failure.

    Results of calls admitted in an earlier state (an older `epoch`) are ignored, so a slow call that started
    while closed cannot close or reopen the circuit after it has moved on.

    A permit is for an immediate call: `acquire` hands it out, `admit` confirms it right before the first byte
    goes out (nothing awaited in between), and only then do `success` and `failure` count. A permit that waited
    meanwhile (for a pool connection, a discovery, a retry) while the circuit opened is refused there, so from the
    moment the circuit opens no call but the probes reaches the PDP. `release` ends a permit that says nothing
    about the PDP (never sent, a request that could not be built, a caller gone): a probe's place is given back.
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

    def admit(self, permit: Permit) -> bool:
        """Right before the call's first byte, with nothing awaited in between: whether the permit still holds.

        A permit of the current state holds. An older one holds only if the circuit is closed now (it becomes a
        plain permit of the current state); otherwise, or once released, the call must not be made.
        """
        if permit.epoch != self._epoch:
            if self._state is not State.CLOSED or permit.epoch < 0:
                return False
            permit.epoch, permit.probe = self._epoch, False
        permit.admitted = True
        return True

    def release(self, permit: Permit) -> None:
        """The permit ends without a result about the PDP: neither a success nor a failure. A probe of the
        current half-open period gives its place to the next request."""
        if permit.probe and permit.epoch == self._epoch and self._state is State.HALF_OPEN:
            self._probes_left += 1
        permit.epoch = -1  # spent: nothing more counts for it

    def success(self, permit: Permit) -> None:
        """The PDP gave a well-formed answer (allow, deny or undefined) to an admitted call."""
        if not permit.admitted or permit.epoch != self._epoch:
            return
        if permit.probe:
            self._failures = 0
            self._move(State.CLOSED)
        elif self._state is State.CLOSED:
            self._failures = 0

    def failure(self, permit: Permit) -> None:
        """An admitted call timed out, failed in transport, or got an error status or a malformed answer."""
        if not permit.admitted or permit.epoch != self._epoch:
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
