"""pep.breaker.Breaker: every transition, on a fake clock, plus a stateful model check.

Most tests admit a permit as soon as it is acquired (`permit`), as a call that goes out at once; the tests of
`admit` and `release` separate the two, as a call that waits (for a connection, a discovery) does."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pep.breaker import Breaker, Permit, State


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[State, State]] = []

    def __call__(self, old: State, new: State) -> None:
        self.calls.append((old, new))


def make(threshold: int = 3, open_s: float = 5.0, probes: int = 1) -> tuple[Breaker, FakeClock, Recorder]:
    clock = FakeClock()
    recorder = Recorder()
    return Breaker(threshold, open_s, probes, clock=clock, on_transition=recorder), clock, recorder


def state(b: Breaker) -> State:
    """The state, read through a call so that mypy does not narrow the property between reads."""
    return b.state


def permit(b: Breaker) -> Permit:
    """A permit for a call that goes out at once: acquired and admitted."""
    p = b.acquire()
    assert p is not None
    assert b.admit(p)
    return p


def fail_n(b: Breaker, n: int) -> None:
    for _ in range(n):
        b.failure(permit(b))


def open_breaker(b: Breaker) -> None:
    fail_n(b, b.failure_threshold)
    assert state(b) is State.OPEN


def test_invalid_settings_are_refused() -> None:
    for args in ((0, 1.0, 1), (1, 1.0, 0), (1, -1.0, 1)):
        with pytest.raises(ValueError, match="invalid breaker settings"):
            Breaker(*args)


def test_starts_closed_and_hands_out_plain_permits() -> None:
    b, _, rec = make()
    assert state(b) is State.CLOSED
    for _ in range(100):
        p = permit(b)
        assert p.probe is False
    assert rec.calls == []


def test_opens_at_exactly_the_threshold_of_consecutive_failures() -> None:
    b, _, rec = make(threshold=3)
    fail_n(b, 2)
    assert state(b) is State.CLOSED
    assert b.failures == 2
    fail_n(b, 1)
    assert state(b) is State.OPEN
    assert rec.calls == [(State.CLOSED, State.OPEN)]


def test_threshold_one_opens_on_the_first_failure() -> None:
    b, _, _ = make(threshold=1)
    fail_n(b, 1)
    assert state(b) is State.OPEN


def test_success_resets_the_count() -> None:
    b, _, rec = make(threshold=3)
    fail_n(b, 2)
    b.success(permit(b))
    assert b.failures == 0
    fail_n(b, 2)
    assert state(b) is State.CLOSED
    fail_n(b, 1)
    assert state(b) is State.OPEN
    assert rec.calls == [(State.CLOSED, State.OPEN)]


def test_concurrent_closed_permits_count_their_failures() -> None:
    b, _, _ = make(threshold=3)
    permits = [permit(b) for _ in range(3)]
    for p in permits:
        b.failure(p)
    assert state(b) is State.OPEN


def test_open_denies_until_open_s_has_elapsed() -> None:
    b, clock, _ = make(open_s=5.0)
    open_breaker(b)
    for _ in range(10):
        assert b.acquire() is None
    clock.advance(4.999)
    assert b.acquire() is None
    assert state(b) is State.OPEN
    clock.advance(0.001)
    assert state(b) is State.HALF_OPEN  # reported as half-open before anyone asks
    p = b.acquire()
    assert p is not None
    assert p.probe is True


def test_half_open_hands_out_exactly_the_probe_count() -> None:
    b, clock, rec = make(probes=3)
    open_breaker(b)
    clock.advance(5.0)
    probes = [b.acquire() for _ in range(3)]
    assert all(p is not None and p.probe for p in probes)
    for _ in range(10):
        assert b.acquire() is None
    assert state(b) is State.HALF_OPEN
    assert rec.calls == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN)]


def test_probe_success_closes() -> None:
    b, clock, rec = make()
    open_breaker(b)
    clock.advance(5.0)
    b.success(permit(b))
    assert state(b) is State.CLOSED
    assert b.failures == 0
    assert permit(b).probe is False
    assert rec.calls == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]
    fail_n(b, 2)
    assert state(b) is State.CLOSED  # the count started again from zero


def test_probe_failure_reopens_with_a_fresh_timer() -> None:
    b, clock, rec = make(open_s=5.0)
    open_breaker(b)
    clock.advance(5.0)
    probe = permit(b)
    clock.advance(3.0)  # the probe took a while
    b.failure(probe)
    assert state(b) is State.OPEN
    clock.advance(4.9)  # 7.9 s after the first opening, 4.9 s after the second
    assert b.acquire() is None
    clock.advance(0.1)
    assert permit(b).probe
    assert rec.calls == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
    ]


def test_first_probe_result_decides_and_later_ones_are_ignored() -> None:
    b, clock, _ = make(probes=2)
    open_breaker(b)
    clock.advance(5.0)
    first, second = permit(b), permit(b)
    b.success(first)
    assert state(b) is State.CLOSED
    b.failure(second)  # from the half-open period that has ended
    assert state(b) is State.CLOSED
    assert b.failures == 0


def test_stale_closed_permits_are_ignored_after_opening() -> None:
    b, clock, rec = make(threshold=2)
    slow = permit(b)
    open_breaker(b)
    b.success(slow)  # a slow call admitted while closed cannot close the circuit
    assert state(b) is State.OPEN
    clock.advance(5.0)
    probe = permit(b)
    b.failure(slow)
    b.success(slow)
    assert state(b) is State.HALF_OPEN
    b.failure(probe)
    assert state(b) is State.OPEN
    assert rec.calls[-1] == (State.HALF_OPEN, State.OPEN)


def test_stale_probe_permits_are_ignored_after_closing() -> None:
    b, clock, _ = make(threshold=2, probes=2)
    open_breaker(b)
    clock.advance(5.0)
    first, late = permit(b), permit(b)
    b.success(first)
    b.failure(late)
    b.failure(late)
    assert state(b) is State.CLOSED
    assert b.failures == 0


def test_stale_permits_from_an_earlier_closed_period_do_not_count() -> None:
    b, clock, _ = make(threshold=2)
    old = [permit(b) for _ in range(3)]
    open_breaker(b)
    clock.advance(5.0)
    b.success(permit(b))
    assert state(b) is State.CLOSED
    for p in old:
        b.failure(p)
    assert state(b) is State.CLOSED
    assert b.failures == 0


def test_open_s_zero_goes_straight_to_half_open() -> None:
    b, _, _ = make(open_s=0.0)
    fail_n(b, b.failure_threshold)
    assert state(b) is State.HALF_OPEN
    assert permit(b).probe
    assert b.acquire() is None


def test_state_values_are_the_gauge_values() -> None:
    assert (int(State.CLOSED), int(State.HALF_OPEN), int(State.OPEN)) == (0, 1, 2)


# --- a permit is for an immediate call ---------------------------------------------------------------------------


def test_only_an_admitted_permit_counts() -> None:
    b, _, _ = make(threshold=1)
    waiting = b.acquire()
    assert waiting is not None
    b.failure(waiting)  # never admitted: the call did not go out, so it says nothing about the PDP
    b.success(waiting)
    assert state(b) is State.CLOSED
    assert b.failures == 0


def test_a_permit_that_waited_past_the_opening_is_refused() -> None:
    """Admitted while closed, still waiting (for a pool connection) when the circuit opens: the call must not go out,
    and it cannot count either way."""
    b, clock, _ = make(threshold=2, open_s=5.0)
    waiting = b.acquire()
    assert waiting is not None
    open_breaker(b)
    assert b.admit(waiting) is False
    clock.advance(5.0)
    assert state(b) is State.HALF_OPEN
    assert b.admit(waiting) is False  # not a probe: half-open admits only the probes it handed out
    probe = b.acquire()
    assert probe is not None
    assert b.acquire() is None  # the waiting permit did not take the probe's place
    assert b.admit(probe) is True
    b.failure(waiting)
    b.success(waiting)
    assert state(b) is State.HALF_OPEN  # only the probe decides
    b.failure(probe)
    assert state(b) is State.OPEN


def test_exactly_the_probes_go_out_from_the_moment_of_opening() -> None:
    """Many permits acquired while closed, each waiting; the circuit opens and goes half-open and open again: none
    of them is admitted, only the probes of each half-open period are."""
    b, clock, _ = make(threshold=1, open_s=1.0, probes=2)
    waiting = [b.acquire() for _ in range(50)]
    open_breaker(b)
    sent = 0
    for _ in range(3):
        clock.advance(1.0)
        probes = [b.acquire(), b.acquire()]
        assert b.acquire() is None
        for p in waiting:
            assert p is not None
            assert b.admit(p) is False
        for p in probes:
            assert p is not None
            sent += b.admit(p)
        b.failure(probes[0])  # type: ignore[arg-type]
        assert state(b) is State.OPEN
    assert sent == 6


def test_an_older_permit_is_admitted_again_once_the_circuit_has_closed() -> None:
    b, clock, _ = make(threshold=1, open_s=1.0)
    waiting = b.acquire()
    assert waiting is not None
    open_breaker(b)
    clock.advance(1.0)
    b.success(permit(b))
    assert state(b) is State.CLOSED
    assert b.admit(waiting) is True  # closed again: it is an ordinary call of the current period
    assert waiting.probe is False
    b.failure(waiting)
    assert state(b) is State.OPEN  # and it counts


def test_a_released_probe_gives_its_place_to_the_next_request() -> None:
    b, clock, rec = make(threshold=1, open_s=1.0)
    open_breaker(b)
    clock.advance(1.0)
    probe = b.acquire()
    assert probe is not None
    assert probe.probe
    assert b.acquire() is None
    b.release(probe)  # the request could not be built, or its caller went away: nothing about the PDP
    assert state(b) is State.HALF_OPEN
    assert b.admit(probe) is False  # spent
    b.release(probe)  # twice changes nothing
    again = b.acquire()
    assert again is not None
    assert again.probe
    assert b.acquire() is None
    assert b.admit(again)
    b.success(again)
    assert state(b) is State.CLOSED
    assert rec.calls[-1] == (State.HALF_OPEN, State.CLOSED)


def test_releasing_a_closed_permit_changes_nothing() -> None:
    b, _, rec = make(threshold=1)
    p = b.acquire()
    assert p is not None
    b.release(p)
    b.failure(p)
    assert state(b) is State.CLOSED
    assert b.admit(p) is False
    assert rec.calls == []


# --- stateful model check -------------------------------------------------------------------------------------


class BreakerMachine(RuleBasedStateMachine):
    """Drive the breaker at random and compare it with a plain reference model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.transitions: list[tuple[State, State]] = []
        self.breaker = Breaker(1, 1.0, 1)
        self.permits: list[Permit] = []
        # the model
        self.threshold = 1
        self.open_s = 1.0
        self.probes = 1
        self.m_state = State.CLOSED
        self.m_failures = 0
        self.m_opened_at = 0.0
        self.m_probes_given = 0  # probe permits handed out in the current half-open period
        self.m_epoch = 0
        self.epochs: dict[int, int] = {}  # id(permit) -> model epoch when it was handed out (or last renewed)
        self.admitted: set[int] = set()  # id(permit) of permits whose call went out
        self.m_probes: dict[int, bool] = {}  # id(permit) -> a probe (in the model)
        self.in_flight_probes: set[int] = set()  # admitted probes of the current half-open period, not yet ended

    @initialize(threshold=st.integers(1, 4), open_s=st.sampled_from([0.0, 0.5, 1.0, 2.0]), probes=st.integers(1, 3))
    def setup(self, threshold: int, open_s: float, probes: int) -> None:
        self.threshold, self.open_s, self.probes = threshold, open_s, probes
        self.breaker = Breaker(
            threshold, open_s, probes, clock=self.clock, on_transition=lambda o, n: self.transitions.append((o, n))
        )

    def _move(self, new: State) -> None:
        self.m_state = new
        self.m_epoch += 1
        self.in_flight_probes.clear()  # a new period: earlier probes no longer count
        if new is State.CLOSED:
            self.m_failures = 0

    @rule()
    def acquire(self) -> None:
        if self.m_state is State.OPEN and self.clock.now - self.m_opened_at >= self.open_s:
            self._move(State.HALF_OPEN)
            self.m_probes_given = 0
        expect_permit = self.m_state is State.CLOSED or (
            self.m_state is State.HALF_OPEN and self.m_probes_given < self.probes
        )
        p = self.breaker.acquire()
        if not expect_permit:
            assert p is None
            return
        assert p is not None
        assert p.probe is (self.m_state is State.HALF_OPEN)
        if p.probe:
            self.m_probes_given += 1
        self.epochs[id(p)] = self.m_epoch
        self.m_probes[id(p)] = p.probe
        self.permits.append(p)

    @precondition(lambda self: bool(self.permits))
    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        p = self.permits[data.draw(st.integers(0, len(self.permits) - 1))]
        current = self.epochs[id(p)] == self.m_epoch
        expect = current or self.m_state is State.CLOSED
        assert self.breaker.admit(p) is expect
        if not expect:
            return
        if not current:  # renewed as a plain permit of the closed period
            self.epochs[id(p)] = self.m_epoch
            self.m_probes[id(p)] = False
        assert p.probe is self.m_probes[id(p)]
        # The point of admit: while not closed, only a probe of the current half-open period goes out.
        assert self.m_state is State.CLOSED or (self.m_state is State.HALF_OPEN and p.probe)
        self.admitted.add(id(p))
        if p.probe:
            self.in_flight_probes.add(id(p))
            assert len(self.in_flight_probes) <= self.probes

    @precondition(lambda self: bool(self.permits))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        p = self.permits.pop(data.draw(st.integers(0, len(self.permits) - 1)))
        current = self.epochs.pop(id(p)) == self.m_epoch
        self.admitted.discard(id(p))
        self.in_flight_probes.discard(id(p))
        if self.m_probes.pop(id(p)) and current and self.m_state is State.HALF_OPEN:
            self.m_probes_given -= 1
        self.breaker.release(p)

    @precondition(lambda self: bool(self.permits))
    @rule(data=st.data(), ok=st.booleans())
    def report(self, data: st.DataObject, ok: bool) -> None:
        p = self.permits.pop(data.draw(st.integers(0, len(self.permits) - 1)))
        current = self.epochs.pop(id(p)) == self.m_epoch and id(p) in self.admitted
        self.admitted.discard(id(p))
        self.in_flight_probes.discard(id(p))
        self.m_probes.pop(id(p))
        if ok:
            self.breaker.success(p)
            if current and p.probe:
                self._move(State.CLOSED)
            elif current and self.m_state is State.CLOSED:
                self.m_failures = 0
        else:
            self.breaker.failure(p)
            if current and (p.probe or self.m_failures + 1 >= self.threshold):
                self.m_opened_at = self.clock.now
                self._move(State.OPEN)
            elif current:
                self.m_failures += 1

    @rule(seconds=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def same_state(self) -> None:
        model = self.m_state
        if model is State.OPEN and self.clock.now - self.m_opened_at >= self.open_s:
            model = State.HALF_OPEN
        assert self.breaker.state is model
        if self.m_state is State.CLOSED:
            assert self.breaker.failures == self.m_failures
            assert self.m_failures < self.threshold

    @invariant()
    def no_permits_while_open(self) -> None:
        if self.m_state is State.OPEN and self.clock.now - self.m_opened_at < self.open_s:
            assert self.breaker.acquire() is None

    @invariant()
    def bounded_probes(self) -> None:
        assert self.m_probes_given <= self.probes
        live_probes = [p for p in self.permits if p.probe and self.epochs[id(p)] == self.m_epoch]
        assert len(live_probes) <= self.probes

    @invariant()
    def transitions_change_state(self) -> None:
        assert all(old is not new for old, new in self.transitions)
        for (_, a), (b, _) in zip(self.transitions, self.transitions[1:], strict=False):
            assert a is b


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBreakerMachine = BreakerMachine.TestCase
