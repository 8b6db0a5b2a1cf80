"""The ledger on its own (DESIGN.md section 1): dedupe, acks, late dispatch rows,
retries, dead-lettering and boundedness all read and write this one structure."""

from __future__ import annotations

from datetime import UTC, datetime

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from parall_bridge.events import EventOrigin, ParallEvent
from parall_bridge.gateway.ledger import (
    MAX_RETRY_DELAY,
    AckPlan,
    Claim,
    Ledger,
    Verdict,
    WorkState,
)
from parall_bridge.models import Task, TaskStatus

LIVE = EventOrigin.LIVE
CATCH_UP = EventOrigin.CATCH_UP
DISPATCH_NEW = EventOrigin.DISPATCH_NEW
IN_FLIGHT = frozenset({WorkState.CLAIMED, WorkState.QUEUED, WorkState.RUNNING})


def make_ledger(
    *,
    capacity: int = 100,
    max_attempts: int = 3,
    retry_base: float = 60.0,
    ack_dead: bool = True,
) -> Ledger:
    return Ledger(
        capacity=capacity, max_attempts=max_attempts, retry_base=retry_base, ack_dead=ack_dead
    )


def message(key: str) -> ParallEvent:
    return ParallEvent.message(
        chat_id="cht_1", message_id=key, sender_id="usr_1", sender_name="Ada", text=key
    )


def claim(
    ledger: Ledger,
    key: str,
    *,
    origin: EventOrigin = LIVE,
    now: float = 0.0,
    dispatch_id: str | None = None,
) -> Claim:
    return ledger.claim(
        key,
        source_type="message",
        source_id=key,
        origin=origin,
        now=now,
        dispatch_id=dispatch_id,
    )


def start(
    ledger: Ledger,
    key: str,
    *,
    origin: EventOrigin = LIVE,
    now: float = 0.0,
    dispatch_id: str | None = None,
) -> Claim:
    """Claim, queue and run ``key``."""
    result = claim(ledger, key, origin=origin, now=now, dispatch_id=dispatch_id)
    assert result.verdict is Verdict.CLAIMED
    ledger.queued(key, message(key))
    ledger.running(key)
    return result


def state_of(ledger: Ledger, key: str) -> WorkState | None:
    record = ledger.get(key)
    return record.state if record is not None else None


# --- construction and reading -----------------------------------------------------------------


@pytest.mark.parametrize(("capacity", "attempts"), [(0, 1), (1, 0), (-1, 5)])
def test_bad_arguments(capacity: int, attempts: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        Ledger(capacity=capacity, max_attempts=attempts, retry_base=1.0)


def test_empty_ledger() -> None:
    ledger = make_ledger(ack_dead=False)
    assert len(ledger) == 0
    assert list(ledger) == []
    assert ledger.get("msg_1") is None
    assert ledger.by_source("message", "msg_1") is None
    assert ledger.counts() == {state.value: 0 for state in WorkState}
    assert ledger.dead_total == 0
    assert ledger.ack_dead is False
    assert ledger.due(1e9) == []
    assert ledger.next_retry_at() is None


def test_progress_on_an_unknown_key_is_a_key_error() -> None:
    ledger = make_ledger()
    with pytest.raises(KeyError):
        ledger.queued("msg_x", message("msg_x"))
    with pytest.raises(KeyError):
        ledger.running("msg_x")
    with pytest.raises(KeyError):
        ledger.succeeded("msg_x")
    with pytest.raises(KeyError):
        ledger.failed("msg_x", "boom", now=0.0)
    with pytest.raises(KeyError):
        ledger.dead_plan("msg_x")


# --- claim and dedupe --------------------------------------------------------------------------


def test_first_claim_owns_the_work() -> None:
    ledger = make_ledger()
    result = claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_1")
    assert result.verdict is Verdict.CLAIMED
    assert result.claimed
    record = result.record
    assert record is not None
    assert record is ledger.get("msg_1")
    assert (record.key, record.source_type, record.source_id) == ("msg_1", "message", "msg_1")
    assert record.origin is CATCH_UP
    assert record.state is WorkState.CLAIMED
    assert record.dispatch_ids == {"dsp_1"}
    assert record.attempts == 0
    assert len(ledger) == 1


@pytest.mark.parametrize("progress", ["claimed", "queued", "running"])
def test_second_claim_of_an_active_key(progress: str) -> None:
    ledger = make_ledger()
    claim(ledger, "msg_1")
    if progress in ("queued", "running"):
        ledger.queued("msg_1", message("msg_1"))
    if progress == "running":
        ledger.running("msg_1")
    again = claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_late")
    assert again.verdict is Verdict.ACTIVE
    assert not again.claimed
    assert again.record is ledger.get("msg_1")
    assert again.record is not None
    assert again.record.state.value == progress
    assert "dsp_late" in again.record.dispatch_ids


def test_second_claim_of_a_done_key() -> None:
    ledger = make_ledger()
    start(ledger, "msg_1")
    ledger.succeeded("msg_1")
    again = claim(ledger, "msg_1", origin=DISPATCH_NEW, dispatch_id="dsp_late")
    assert again.verdict is Verdict.DONE
    assert not again.claimed
    assert state_of(ledger, "msg_1") is WorkState.DONE


def test_second_claim_of_a_dead_key() -> None:
    ledger = make_ledger(max_attempts=1)
    start(ledger, "msg_1")
    assert ledger.failed("msg_1", "boom", now=0.0)
    again = claim(ledger, "msg_1", dispatch_id="dsp_late", now=1e9)
    assert again.verdict is Verdict.DEAD
    assert not again.claimed
    assert state_of(ledger, "msg_1") is WorkState.DEAD


def test_failed_not_yet_due_is_waiting_and_keeps_the_dispatch_id() -> None:
    ledger = make_ledger(retry_base=60.0)
    start(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_1")
    assert not ledger.failed("msg_1", "boom", now=100.0)
    waiting = claim(ledger, "msg_1", origin=CATCH_UP, now=159.9, dispatch_id="dsp_2")
    assert waiting.verdict is Verdict.WAITING
    assert not waiting.claimed
    record = ledger.get("msg_1")
    assert record is not None
    assert record.state is WorkState.FAILED
    assert record.dispatch_ids == {"dsp_1", "dsp_2"}


def test_failed_and_due_is_claimed_again_with_attempts_kept() -> None:
    ledger = make_ledger(retry_base=60.0)
    start(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_1")
    ledger.failed("msg_1", "boom", now=100.0)
    again = claim(ledger, "msg_1", origin=CATCH_UP, now=160.0, dispatch_id="dsp_2")
    assert again.verdict is Verdict.CLAIMED
    assert again.claimed
    record = again.record
    assert record is not None
    assert record.state is WorkState.CLAIMED
    assert record.attempts == 1
    assert record.last_error == "boom"
    assert record.dispatch_ids == {"dsp_1", "dsp_2"}
    assert record.event == message("msg_1")


def test_attach_remembers_a_row_of_an_in_flight_record() -> None:
    ledger = make_ledger()
    result = claim(ledger, "msg_1", origin=DISPATCH_NEW, dispatch_id="dsp_1")
    assert result.record is not None
    ledger.attach(result.record, "dsp_2")
    ledger.queued("msg_1", message("msg_1"))
    ledger.running("msg_1")
    assert ledger.succeeded("msg_1") == AckPlan(dispatch_ids=("dsp_1", "dsp_2"))


# --- release -----------------------------------------------------------------------------------


def test_release_forgets_a_never_run_record() -> None:
    ledger = make_ledger()
    claim(ledger, "msg_1", dispatch_id="dsp_1")
    ledger.release("msg_1")
    assert ledger.get("msg_1") is None
    assert ledger.by_source("message", "msg_1") is None
    assert len(ledger) == 0
    assert claim(ledger, "msg_1").verdict is Verdict.CLAIMED


def test_release_puts_a_previously_failed_record_back_to_failed() -> None:
    ledger = make_ledger(retry_base=10.0)
    start(ledger, "msg_1", origin=CATCH_UP)
    ledger.failed("msg_1", "boom", now=0.0)
    assert claim(ledger, "msg_1", origin=CATCH_UP, now=10.0).claimed
    ledger.release("msg_1")
    record = ledger.get("msg_1")
    assert record is not None
    assert record.state is WorkState.FAILED
    assert record.attempts == 1
    assert [r.key for r in ledger.due(10.0)] == ["msg_1"]


@pytest.mark.parametrize("progress", ["queued", "running", "done"])
def test_release_ignores_records_past_claimed(progress: str) -> None:
    ledger = make_ledger()
    claim(ledger, "msg_1")
    ledger.queued("msg_1", message("msg_1"))
    if progress in ("running", "done"):
        ledger.running("msg_1")
    if progress == "done":
        ledger.succeeded("msg_1")
    ledger.release("msg_1")
    assert state_of(ledger, "msg_1") == WorkState(progress)
    ledger.release("msg_unknown")


# --- acks -----------------------------------------------------------------------------------------


def test_live_success_is_acked_by_source_only() -> None:
    ledger = make_ledger()
    start(ledger, "msg_1", origin=LIVE)
    # A dispatch row learnt while the turn ran (dispatch.new, catch-up).
    assert claim(ledger, "msg_1", origin=DISPATCH_NEW, dispatch_id="dsp_1").verdict is (
        Verdict.ACTIVE
    )
    plan = ledger.succeeded("msg_1")
    assert plan == AckPlan(source=("message", "msg_1"))
    assert plan.dispatch_ids == ()
    assert plan
    record = ledger.get("msg_1")
    assert record is not None
    assert record.state is WorkState.DONE
    assert record.event is None


@pytest.mark.parametrize("origin", [CATCH_UP, DISPATCH_NEW])
def test_dispatch_row_success_is_acked_by_its_ids(origin: EventOrigin) -> None:
    ledger = make_ledger()
    start(ledger, "msg_1", origin=origin, dispatch_id="dsp_b")
    assert claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_a").verdict is (Verdict.ACTIVE)
    plan = ledger.succeeded("msg_1")
    assert plan.source is None
    assert sorted(plan.dispatch_ids) == ["dsp_a", "dsp_b"]


def test_ids_learnt_after_success_are_the_callers_to_ack() -> None:
    ledger = make_ledger()
    start(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_1")
    assert ledger.succeeded("msg_1") == AckPlan(dispatch_ids=("dsp_1",))
    late = claim(ledger, "msg_1", origin=DISPATCH_NEW, dispatch_id="dsp_2")
    assert late.verdict is Verdict.DONE
    # A second success would never ack the first row twice.
    record = ledger.get("msg_1")
    assert record is not None
    assert "dsp_1" not in record.dispatch_ids


def test_empty_ack_plan_is_false() -> None:
    assert not AckPlan()
    assert AckPlan(source=("message", "m"))
    assert AckPlan(dispatch_ids=("d",))


# --- failures, retries, dead letters --------------------------------------------------------------


def test_retry_delay_doubles_from_the_reconcile_interval_capped_at_ten_minutes() -> None:
    ledger = make_ledger(retry_base=60.0)
    assert MAX_RETRY_DELAY == 600.0
    assert [ledger.retry_delay(n) for n in range(1, 7)] == [60.0, 120.0, 240.0, 480.0, 600.0, 600.0]
    assert ledger.retry_delay(1000) == 600.0
    assert make_ledger(retry_base=5.0).retry_delay(3) == 20.0


def test_failure_schedules_a_retry() -> None:
    ledger = make_ledger(retry_base=60.0, max_attempts=5)
    start(ledger, "msg_1")
    assert ledger.failed("msg_1", "RuntimeError: boom", now=1000.0) is False
    record = ledger.get("msg_1")
    assert record is not None
    assert record.state is WorkState.FAILED
    assert record.attempts == 1
    assert record.last_error == "RuntimeError: boom"
    assert record.next_attempt_at == 1060.0
    assert record.event == message("msg_1")
    assert ledger.next_retry_at() == 1060.0
    assert ledger.due(1059.9) == []
    assert [r.key for r in ledger.due(1060.0)] == ["msg_1"]


def test_each_failure_waits_twice_as_long() -> None:
    ledger = make_ledger(retry_base=60.0, max_attempts=10)
    now = 0.0
    start(ledger, "msg_1")
    delays = []
    for _ in range(6):
        ledger.failed("msg_1", "boom", now=now)
        record = ledger.get("msg_1")
        assert record is not None
        assert record.next_attempt_at is not None
        delays.append(record.next_attempt_at - now)
        now = record.next_attempt_at
        assert claim(ledger, "msg_1", now=now).claimed
        ledger.queued("msg_1", message("msg_1"))
        ledger.running("msg_1")
    assert delays == [60.0, 120.0, 240.0, 480.0, 600.0, 600.0]


def test_due_and_next_retry_at_over_several_records() -> None:
    ledger = make_ledger(retry_base=10.0, max_attempts=5)
    for key in ("a", "b", "c"):
        start(ledger, key)
    ledger.failed("a", "x", now=100.0)  # due at 110
    ledger.failed("b", "x", now=50.0)  # due at 60
    ledger.succeeded("c")
    assert ledger.next_retry_at() == 60.0
    assert [r.key for r in ledger.due(60.0)] == ["b"]
    assert [r.key for r in ledger.due(200.0)] == ["a", "b"]
    assert claim(ledger, "b", now=60.0).claimed
    assert ledger.next_retry_at() == 110.0
    assert [r.key for r in ledger.due(200.0)] == ["a"]


def test_a_failed_record_without_its_event_is_not_due() -> None:
    ledger = make_ledger(retry_base=1.0)
    claim(ledger, "msg_1")
    ledger.running("msg_1")  # never queued: the ledger has no event to retry
    ledger.failed("msg_1", "x", now=0.0)
    assert ledger.due(100.0) == []
    assert ledger.next_retry_at() is None
    assert claim(ledger, "msg_1", now=100.0).claimed


def test_dead_exactly_on_the_last_attempt() -> None:
    ledger = make_ledger(retry_base=1.0, max_attempts=3)
    start(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_1")
    results = []
    now = 0.0
    for attempt in range(1, 4):
        results.append(ledger.failed("msg_1", f"boom {attempt}", now=now))
        if attempt < 3:
            now += 1000.0
            assert claim(ledger, "msg_1", now=now).claimed
            ledger.queued("msg_1", message("msg_1"))
            ledger.running("msg_1")
    assert results == [False, False, True]
    record = ledger.get("msg_1")
    assert record is not None
    assert record.state is WorkState.DEAD
    assert record.attempts == 3
    assert record.last_error == "boom 3"
    assert record.next_attempt_at is None
    assert ledger.dead_total == 1
    assert ledger.due(1e9) == []
    assert ledger.next_retry_at() is None
    assert ledger.dead_plan("msg_1") == AckPlan(dispatch_ids=("dsp_1",))
    assert record.event is None


def test_max_attempts_one_dies_on_the_first_failure() -> None:
    ledger = make_ledger(max_attempts=1)
    start(ledger, "msg_1", origin=LIVE)
    assert ledger.failed("msg_1", "boom", now=0.0) is True
    assert ledger.dead_plan("msg_1") == AckPlan(source=("message", "msg_1"))


def test_dead_plan_is_empty_when_dead_letters_are_not_acked() -> None:
    ledger = make_ledger(max_attempts=1, ack_dead=False)
    start(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_1")
    assert ledger.failed("msg_1", "boom", now=0.0)
    plan = ledger.dead_plan("msg_1")
    assert plan == AckPlan()
    assert not plan
    assert ledger.dead_total == 1
    assert claim(ledger, "msg_1", dispatch_id="dsp_2").verdict is Verdict.DEAD


def test_dead_total_counts_forgotten_records_too() -> None:
    ledger = make_ledger(capacity=3, max_attempts=1)
    for i in range(10):
        start(ledger, f"m{i}")
        ledger.failed(f"m{i}", "boom", now=0.0)
    assert ledger.dead_total == 10
    assert len(ledger) <= 3


def test_interrupted_does_not_count_an_attempt() -> None:
    ledger = make_ledger(retry_base=60.0)
    start(ledger, "msg_1")
    ledger.interrupted("msg_1", now=500.0)
    record = ledger.get("msg_1")
    assert record is not None
    assert record.state is WorkState.FAILED
    assert record.attempts == 0
    assert record.next_attempt_at == 500.0
    assert [r.key for r in ledger.due(500.0)] == ["msg_1"]
    assert claim(ledger, "msg_1", now=500.0).claimed


def test_interrupted_after_failures_keeps_the_count() -> None:
    ledger = make_ledger(retry_base=1.0, max_attempts=2)
    start(ledger, "msg_1")
    ledger.failed("msg_1", "boom", now=0.0)
    assert claim(ledger, "msg_1", now=10.0).claimed
    ledger.running("msg_1")
    ledger.interrupted("msg_1", now=10.0)
    assert claim(ledger, "msg_1", now=10.0).claimed
    ledger.running("msg_1")
    # Still one failure allowed before this one: the interruption did not count.
    assert ledger.failed("msg_1", "boom", now=10.0) is True


def test_interrupted_leaves_finished_and_unknown_records_alone() -> None:
    ledger = make_ledger(max_attempts=1)
    start(ledger, "done")
    ledger.succeeded("done")
    start(ledger, "dead")
    ledger.failed("dead", "x", now=0.0)
    ledger.interrupted("done", now=1.0)
    ledger.interrupted("dead", now=1.0)
    ledger.interrupted("unknown", now=1.0)
    assert state_of(ledger, "done") is WorkState.DONE
    assert state_of(ledger, "dead") is WorkState.DEAD
    assert ledger.get("unknown") is None


def test_success_after_failure_clears_the_retry() -> None:
    ledger = make_ledger(retry_base=1.0)
    start(ledger, "msg_1")
    ledger.failed("msg_1", "boom", now=0.0)
    assert claim(ledger, "msg_1", now=5.0).claimed
    ledger.running("msg_1")
    ledger.succeeded("msg_1")
    record = ledger.get("msg_1")
    assert record is not None
    assert record.next_attempt_at is None
    assert ledger.next_retry_at() is None
    assert ledger.due(1e9) == []


# --- counts and sources ---------------------------------------------------------------------------


def test_counts() -> None:
    ledger = make_ledger(max_attempts=2)
    claim(ledger, "claimed")
    claim(ledger, "queued")
    ledger.queued("queued", message("queued"))
    claim(ledger, "running")
    ledger.queued("running", message("running"))
    ledger.running("running")
    start(ledger, "done")
    ledger.succeeded("done")
    start(ledger, "failed")
    ledger.failed("failed", "x", now=0.0)
    start(ledger, "dead")
    ledger.failed("dead", "x", now=0.0)
    assert claim(ledger, "dead", now=1e9).claimed
    ledger.running("dead")
    ledger.failed("dead", "x", now=1e9)
    assert ledger.counts() == {
        "claimed": 1,
        "queued": 1,
        "running": 1,
        "done": 1,
        "failed": 1,
        "dead": 1,
    }
    assert sorted(r.key for r in ledger) == sorted(
        ["claimed", "queued", "running", "done", "failed", "dead"]
    )


def task_event(updated: datetime) -> ParallEvent:
    return ParallEvent.task(
        Task(id="tsk_1", title="t", status=TaskStatus.TODO, creator_id="usr_1", updated_at=updated)
    )


def test_by_source_of_task_versions_latest_wins() -> None:
    ledger = make_ledger()
    v1 = task_event(datetime(2026, 1, 1, tzinfo=UTC))
    v2 = task_event(datetime(2026, 1, 2, tzinfo=UTC))
    assert v1.key != v2.key
    for version in (v1, v2):
        result = ledger.claim(
            version.key,
            source_type=version.source_type,
            source_id=version.source_id,
            origin=LIVE,
            now=0.0,
        )
        assert result.claimed
    assert len(ledger) == 2
    latest = ledger.by_source("task_activity", "tsk_1")
    assert latest is not None
    assert latest.key == v2.key
    assert (latest.source_type, latest.source_id) == ("task_activity", "tsk_1")
    older = ledger.get(v1.key)
    assert older is not None
    assert older.state is WorkState.CLAIMED
    assert ledger.by_source("message", "tsk_1") is None
    ledger.queued(v2.key, v2)
    ledger.running(v2.key)
    assert ledger.succeeded(v2.key) == AckPlan(source=("task_activity", "tsk_1"))


# --- boundedness ----------------------------------------------------------------------------------


def test_many_finished_records_stay_bounded() -> None:
    capacity = 50
    ledger = make_ledger(capacity=capacity, max_attempts=1)
    running: list[str] = []
    for i in range(2000):
        key = f"m{i}"
        start(ledger, key)
        running.append(key)
        if len(running) > 5:  # a few turns in flight at any time
            done = running.pop(0)
            if i % 7 == 0:
                ledger.failed(done, "x", now=0.0)
            else:
                ledger.succeeded(done)
        assert len(ledger) <= capacity
        for key in running:
            assert state_of(ledger, key) is WorkState.RUNNING


def test_finished_records_are_forgotten_first_oldest_first() -> None:
    ledger = make_ledger(capacity=10, max_attempts=2, retry_base=1.0)
    # Two failed (waiting) records, the oldest of all.
    for key in ("f0", "f1"):
        start(ledger, key)
        ledger.failed(key, "x", now=0.0)
    # Six done records, then two in flight.
    for i in range(6):
        start(ledger, f"d{i}")
        ledger.succeeded(f"d{i}")
    claim(ledger, "c0")
    claim(ledger, "c1")
    assert len(ledger) == 10
    claim(ledger, "c2")  # one too many: the oldest done ones go, not the failed ones
    assert len(ledger) <= 10
    keys = {r.key for r in ledger}
    assert {"f0", "f1", "c0", "c1", "c2"} <= keys
    gone = {f"d{i}" for i in range(6)} - keys
    assert gone
    assert gone == {f"d{i}" for i in range(len(gone))}  # the oldest


def test_failed_records_go_only_when_no_finished_one_is_left() -> None:
    ledger = make_ledger(capacity=4, max_attempts=2, retry_base=1.0)
    for key in ("f0", "f1", "f2"):
        start(ledger, key)
        ledger.failed(key, "x", now=0.0)
    start(ledger, "d0")
    ledger.succeeded("d0")
    claim(ledger, "c0")
    keys = {r.key for r in ledger}
    assert keys == {"f0", "f1", "f2", "c0"}
    claim(ledger, "c1")  # nothing finished is left: the oldest failed one goes
    assert {r.key for r in ledger} == {"f1", "f2", "c0", "c1"}


def test_in_flight_records_are_never_evicted() -> None:
    ledger = make_ledger(capacity=5)
    for i in range(4):  # four in flight, and each new one: five at most
        claim(ledger, f"c{i}")
    ledger.queued("c0", message("c0"))
    ledger.queued("c1", message("c1"))
    ledger.running("c1")
    for i in range(30):
        start(ledger, f"d{i}")
        ledger.succeeded(f"d{i}")
    assert all(ledger.get(f"c{i}") is not None for i in range(4))
    assert len(ledger) <= 5


def test_a_claim_refreshes_the_age_of_a_record() -> None:
    ledger = make_ledger(capacity=3)
    for key in ("a", "b", "c"):
        start(ledger, key)
        ledger.succeeded(key)
    assert claim(ledger, "a", dispatch_id="dsp").verdict is Verdict.DONE  # "a" is recent now
    claim(ledger, "new")
    keys = {r.key for r in ledger}
    assert "b" not in keys
    assert {"a", "new"} <= keys


# --- a model-based check of random operation sequences --------------------------------------------

KEYS = [f"msg_{i}" for i in range(12)]
ORIGINS = [LIVE, CATCH_UP, DISPATCH_NEW]
CAPACITY = 5
MAX_ATTEMPTS = 3
RETRY_BASE = 10.0


@attrs.define
class Model:
    """What the ledger must hold for one key."""

    state: WorkState = WorkState.CLAIMED
    attempts: int = 0
    next_at: float | None = None
    queued_once: bool = False
    ran: bool = False
    interrupted: bool = False
    ids: set[str] = attrs.field(factory=set)


@settings(max_examples=80, stateful_step_count=50, deadline=None)
class LedgerMachine(RuleBasedStateMachine):
    """Random claims, progress, failures, releases and time, against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = make_ledger(
            capacity=CAPACITY, max_attempts=MAX_ATTEMPTS, retry_base=RETRY_BASE
        )
        self.model: dict[str, Model] = {}
        self.now = 0.0
        self.dead = 0
        self.next_id = 0
        self.bound = CAPACITY
        """The most records allowed: the capacity, or the work in flight at the last insert."""

    def keys_in(self, *states: WorkState) -> list[str]:
        return sorted(k for k, m in self.model.items() if m.state in states)

    def sync_evictions(self, new_key: str | None) -> None:
        """Records the ledger forgot: never in flight, finished ones first."""
        gone = [key for key in self.model if self.ledger.get(key) is None]
        evicted_failed = False
        for key in gone:
            state = self.model.pop(key).state
            assert state not in IN_FLIGHT, f"in-flight {key} ({state}) was evicted"
            evicted_failed |= state is WorkState.FAILED
        if evicted_failed:
            assert not self.keys_in(WorkState.DONE, WorkState.DEAD), "failed evicted first"
        if new_key is not None:
            assert self.ledger.get(new_key) is not None
            in_flight = sum(1 for record in self.ledger if record.state in IN_FLIGHT)
            self.bound = max(CAPACITY, in_flight)
            assert len(self.ledger) <= self.bound

    @rule(key=st.sampled_from(KEYS), origin=st.sampled_from(ORIGINS), with_id=st.booleans())
    def claim(self, key: str, origin: EventOrigin, with_id: bool) -> None:
        dispatch_id = None
        if with_id:
            self.next_id += 1
            dispatch_id = f"dsp_{self.next_id}"
        model = self.model.get(key)
        result = claim(self.ledger, key, origin=origin, now=self.now, dispatch_id=dispatch_id)
        if model is None:
            assert result.verdict is Verdict.CLAIMED
            self.model[key] = Model(ids={dispatch_id} if dispatch_id else set())
            self.sync_evictions(key)
            return
        assert len(self.ledger) == len(self.model)
        if model.state in IN_FLIGHT:
            assert result.verdict is Verdict.ACTIVE
        elif model.state is WorkState.DONE:
            assert result.verdict is Verdict.DONE
            return
        elif model.state is WorkState.DEAD:
            assert result.verdict is Verdict.DEAD
            return
        elif model.next_at is not None and self.now < model.next_at:
            assert result.verdict is Verdict.WAITING
        else:
            assert result.verdict is Verdict.CLAIMED
            model.state = WorkState.CLAIMED
        if dispatch_id:
            model.ids.add(dispatch_id)
        record = self.ledger.get(key)
        assert record is not None
        assert record.attempts == model.attempts

    @precondition(lambda self: bool(self.keys_in(WorkState.CLAIMED)))
    @rule(data=st.data())
    def queue(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.keys_in(WorkState.CLAIMED)))
        self.ledger.queued(key, message(key))
        self.model[key].state = WorkState.QUEUED
        self.model[key].queued_once = True

    @precondition(lambda self: bool(self.keys_in(WorkState.QUEUED)))
    @rule(data=st.data())
    def run(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.keys_in(WorkState.QUEUED)))
        self.ledger.running(key)
        self.model[key].state = WorkState.RUNNING
        self.model[key].ran = True

    @precondition(lambda self: bool(self.keys_in(WorkState.RUNNING)))
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.keys_in(WorkState.RUNNING)))
        model = self.model[key]
        plan = self.ledger.succeeded(key)
        assert plan, "a success always acks something"
        assert set(plan.dispatch_ids) <= model.ids
        if plan.source is None:
            assert set(plan.dispatch_ids) == model.ids, "every row learnt is acked"
        else:
            assert plan.source == ("message", key)
        model.state = WorkState.DONE
        model.next_at = None
        model.ids.clear()

    @precondition(lambda self: bool(self.keys_in(WorkState.RUNNING)))
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.keys_in(WorkState.RUNNING)))
        model = self.model[key]
        went_dead = self.ledger.failed(key, "boom", now=self.now)
        model.attempts += 1
        assert went_dead is (model.attempts == MAX_ATTEMPTS)
        if went_dead:
            self.dead += 1
            model.state = WorkState.DEAD
            model.next_at = None
            plan = self.ledger.dead_plan(key)
            assert plan
            model.ids.clear()
        else:
            model.state = WorkState.FAILED
            delay = min(MAX_RETRY_DELAY, RETRY_BASE * 2 ** (model.attempts - 1))
            model.next_at = self.now + delay

    @precondition(lambda self: bool(self.keys_in(WorkState.RUNNING)))
    @rule(data=st.data())
    def interrupt(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.keys_in(WorkState.RUNNING)))
        self.ledger.interrupted(key, now=self.now)
        model = self.model[key]
        model.state = WorkState.FAILED
        model.next_at = self.now
        model.interrupted = True

    @precondition(lambda self: bool(self.releasable()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.releasable()))
        model = self.model[key]
        self.ledger.release(key)
        if model.ran:
            model.state = WorkState.FAILED
        else:
            del self.model[key]
            assert self.ledger.get(key) is None

    def releasable(self) -> list[str]:
        # Never-run records, and records with a counted failure (an interrupted-only
        # record is left out: the spec does not say what releasing it means).
        return [
            key
            for key in self.keys_in(WorkState.CLAIMED)
            if not self.model[key].ran or self.model[key].attempts > 0
        ]

    @rule(seconds=st.sampled_from([0.5, 5.0, 10.0, 40.0, 700.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def bounded(self) -> None:
        # Past its capacity the ledger forgets what is not in flight; it can only hold
        # more than its capacity while more than that many records are in flight.
        assert len(self.ledger) <= self.bound

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert len(self.ledger) == len(self.model)
        for key, model in self.model.items():
            record = self.ledger.get(key)
            assert record is not None
            assert record.state is model.state
            assert record.attempts == model.attempts
        expected = {state.value: 0 for state in WorkState}
        for model in self.model.values():
            expected[model.state.value] += 1
        assert self.ledger.counts() == expected
        assert self.ledger.dead_total == self.dead

    @invariant()
    def retries(self) -> None:
        waiting = {
            key: m.next_at
            for key, m in self.model.items()
            if m.state is WorkState.FAILED and m.queued_once and m.next_at is not None
        }
        due = {key for key, at in waiting.items() if at <= self.now}
        assert {record.key for record in self.ledger.due(self.now)} == due
        assert self.ledger.next_retry_at() == (min(waiting.values()) if waiting else None)

    @invariant()
    def sources_are_bounded(self) -> None:
        for record in self.ledger:
            found = self.ledger.by_source(record.source_type, record.source_id)
            assert found is record
        assert len(self.ledger._by_source) <= len(self.ledger)


test_ledger_state_machine = LedgerMachine.TestCase


def test_release_keeps_a_record_that_was_dispatched_before() -> None:
    ledger = Ledger(capacity=10, max_attempts=3, retry_base=1.0)
    event = ParallEvent.message(
        chat_id="cht_1", message_id="msg_1", sender_id="u", sender_name="U", text="t"
    )
    claim = ledger.claim(
        "msg_1", source_type="message", source_id="msg_1", origin=EventOrigin.LIVE, now=0.0
    )
    assert claim.claimed
    ledger.queued("msg_1", event)
    ledger.running("msg_1")
    ledger.interrupted("msg_1", now=0.0)  # shutdown: no attempt counted
    again = ledger.claim(
        "msg_1", source_type="message", source_id="msg_1", origin=EventOrigin.LIVE, now=1.0
    )
    assert again.claimed
    ledger.release("msg_1")
    record = ledger.get("msg_1")
    assert record is not None
    assert record.state is WorkState.FAILED
    assert record.event is event


def test_a_newer_version_of_a_source_keeps_its_row_out_of_the_older_ones_ack() -> None:
    ledger = Ledger(capacity=10, max_attempts=3, retry_base=1.0)
    for key in ("tsk_1@v1", "tsk_1@v2"):
        claim = ledger.claim(
            key, source_type="task_activity", source_id="tsk_1", origin=EventOrigin.LIVE, now=0
        )
        assert claim.claimed
    ledger.attach(ledger.get("tsk_1@v1"), "dsp_1")  # type: ignore[arg-type]
    older = ledger.succeeded("tsk_1@v1")
    assert older.source is None  # by source would ack v2's row before v2 ran
    assert older.dispatch_ids == ("dsp_1",)
    newer = ledger.succeeded("tsk_1@v2")
    assert newer.source == ("task_activity", "tsk_1")
