"""The ledger on its own (DESIGN.md sections 1 and 8): dedupe, acks, late dispatch rows,
the turn journal, retries, dead-lettering, boundedness and what a store keeps of it all
read and write this one structure."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from parall_bridge.events import EventOrigin, ParallEvent, turn_id_of
from parall_bridge.gateway.ledger import (
    CRASH_ERROR,
    MAX_RETRY_DELAY,
    AckPlan,
    Claim,
    Ledger,
    Record,
    Restored,
    TurnEntry,
    TurnState,
    Verdict,
    WorkState,
)
from parall_bridge.models import Message, TextContent
from parall_bridge.state.base import SourceRow, StateBatch, StoredState, TurnRow

LIVE, CATCH_UP, DISPATCH_NEW = EventOrigin.LIVE, EventOrigin.CATCH_UP, EventOrigin.DISPATCH_NEW
CLAIMED, QUEUED, RUNNING, DONE, ACKED, FAILED, DEAD = WorkState
IN_FLIGHT = frozenset({CLAIMED, QUEUED, RUNNING})
T = TypeVar("T")
WALL = 1_700_000_000.0
"""The wall clock (seconds since the epoch) when the ledger's clock reads 0."""


def make_ledger(
    *, capacity: int = 100, max_attempts: int = 3, retry_base: float = 60.0, ack_dead: bool = True
) -> Ledger:
    return Ledger(
        capacity=capacity, max_attempts=max_attempts, retry_base=retry_base, ack_dead=ack_dead
    )


def message(key: str) -> ParallEvent:
    return ParallEvent.message(
        chat_id="cht_1", message_id=key, sender_id="usr_1", sender_name="Ada", text=key
    )


def delivery(key: str) -> Message:
    """A live ``message.new`` payload of ``key``."""
    return Message(
        id=key, chat_id="cht_1", sender_id="usr_1", message_type="text", content=TextContent(key)
    )


def claim(
    ledger: Ledger, key: str, *, origin: EventOrigin = LIVE, now: float = 0.0, **row: Any
) -> Claim:
    """Claim ``key``, the message of that id unless ``source_type``/``source_id`` say."""
    row = {"source_type": "message", "source_id": key, **row}
    return ledger.claim(key, origin=origin, now=now, **row)


def queue(ledger: Ledger, key: str, *, origin: EventOrigin = LIVE, ids: bool = False) -> None:
    """Claim a new ``key`` (with dispatch id ``dsp_<key>`` when ``ids``), offer its event
    and queue it."""
    assert claim(ledger, key, origin=origin, dispatch_id=f"dsp_{key}" if ids else None).claimed
    ledger.offer(key, message(key))
    ledger.queued(key)


def run(ledger: Ledger, *keys: str, origin: EventOrigin = LIVE, ids: bool = False) -> str:
    """Claim, queue and start one turn for new ``keys``; returns the turn id."""
    for key in keys:
        queue(ledger, key, origin=origin, ids=ids)
    return ledger.start_turn(keys, session_key="main").turn_id


def rerun(ledger: Ledger, keys: Sequence[str], *, turn_id: str | None = None) -> str:
    """Queue claimed ``keys`` (that hold their event) again and start their turn."""
    for key in keys:
        ledger.queued(key)
    return ledger.start_turn(keys, session_key="main", turn_id=turn_id).turn_id


def fail(ledger: Ledger, turn_id: str, *, now: float = 0.0, sent: bool = False) -> None:
    ledger.turn_failed(turn_id, "boom", now=now, sent=sent)


def succeed(ledger: Ledger, *keys: str, origin: EventOrigin = LIVE) -> list[AckPlan]:
    return ledger.turn_succeeded(run(ledger, *keys, origin=origin))


def record(ledger: Ledger, key: str) -> Record:
    found = ledger.get(key)
    assert found is not None, key
    return found


def entry_of(ledger: Ledger, turn_id: str) -> TurnEntry:
    found = ledger.turn(turn_id)
    assert found is not None, turn_id
    return found


def state_of(ledger: Ledger, key: str) -> WorkState | None:
    found = ledger.get(key)
    return found.state if found is not None else None


def shape(ledger: Ledger, key: str) -> tuple[WorkState, int, float | None, str | None, bool]:
    """A record's state, attempts, retry time, turn, and whether its acks are owed."""
    got = record(ledger, key)
    return got.state, got.attempts, got.next_attempt_at, got.turn_id, got.ack_pending


@attrs.define
class MemoryStore:
    """What a store keeps: the batches written, applied in order."""

    sources: dict[str, SourceRow] = attrs.field(factory=dict)
    turns: dict[str, TurnRow] = attrs.field(factory=dict)

    def write(self, batch: StateBatch) -> None:
        for key in batch.deleted_sources:
            self.sources.pop(key, None)
        for turn_id in batch.deleted_turns:
            self.turns.pop(turn_id, None)
        self.sources.update((row.key, row) for row in batch.sources)
        self.turns.update((row.turn_id, row) for row in batch.turns)

    def state(self) -> StoredState:
        return StoredState(
            sources=tuple(sorted(self.sources.values(), key=lambda row: row.order)),
            turns=tuple(sorted(self.turns.values(), key=lambda row: row.order)),
        )


def saved(ledger: Ledger, *, now: float = 0.0) -> StoredState:
    """What a store holds of a ledger whose changes were never taken before."""
    store = MemoryStore()
    store.write(ledger.changes(now=now, wall=WALL + now))
    return store.state()


def restart(
    state: StoredState, *, now: float = 0.0, wall: float = WALL, **options: Any
) -> tuple[Ledger, Restored]:
    """A fresh ledger restored from ``state``."""
    ledger = make_ledger(**options)
    return ledger, ledger.restore(state, now=now, wall=wall)


# --- construction and reading ---------------------------------------------------------------------


@pytest.mark.parametrize(("capacity", "attempts"), [(0, 1), (1, 0), (-1, 5)])
def test_bad_arguments(capacity: int, attempts: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        Ledger(capacity=capacity, max_attempts=attempts, retry_base=1.0)


def test_empty_ledger() -> None:
    ledger = make_ledger(ack_dead=False, max_attempts=4)
    assert (len(ledger), list(ledger), ledger.journal) == (0, [], [])
    assert ledger.get("msg_1") is ledger.by_source("message", "msg_1") is None
    assert ledger.turn("t") is None
    assert ledger.counts() == {state.value: 0 for state in WorkState}
    assert (ledger.dead_total, ledger.ack_dead, ledger.max_attempts) == (0, False, 4)
    assert (ledger.take_due(1e9), ledger.next_retry_at(), ledger.version) == ([], None, 0)
    assert not ledger.dirty
    assert not ledger.changes(now=0.0, wall=WALL)


def test_unknown_keys_and_turns_that_are_not_running_are_refused() -> None:
    ledger = make_ledger()
    for call in (
        lambda: ledger.offer("msg_x", message("msg_x")),
        lambda: ledger.queued("msg_x"),
        lambda: ledger.start_turn(["msg_x"], session_key="main"),
        lambda: ledger.event("msg_x"),
    ):
        with pytest.raises(KeyError):
            call()
    claim(ledger, "msg_1")
    with pytest.raises(KeyError, match="holds no event"):
        ledger.event("msg_1")
    pinned = run(ledger, "msg_2")
    fail(ledger, pinned, sent=True)
    for turn_id in ("t_unknown", pinned):
        with pytest.raises(RuntimeError, match="is not running"):
            ledger.turn_succeeded(turn_id)
        with pytest.raises(RuntimeError, match="is not running"):
            ledger.turn_failed(turn_id, "x", now=0.0, sent=False)
        with pytest.raises(RuntimeError, match="is not running"):
            ledger.turn_interrupted(turn_id, now=0.0)


# --- claim and dedupe -----------------------------------------------------------------------------


def test_first_claim_owns_the_work() -> None:
    ledger = make_ledger()
    result = claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_1")
    assert (result.verdict, result.claimed) == (Verdict.CLAIMED, True)
    got = record(ledger, "msg_1")
    assert result.record is got
    assert (got.key, got.source_type, got.source_id) == ("msg_1", "message", "msg_1")
    assert shape(ledger, "msg_1") == (CLAIMED, 0, None, None, False)
    assert (got.origin, got.dispatch_ids, got.event, len(ledger)) == (CATCH_UP, {"dsp_1"}, None, 1)


@pytest.mark.parametrize("progress", ["claimed", "queued", "running"])
def test_second_claim_of_an_active_key(progress: str) -> None:
    ledger = make_ledger()
    claim(ledger, "msg_1")
    if progress != "claimed":
        ledger.offer("msg_1", message("msg_1"))
        ledger.queued("msg_1")
    if progress == "running":
        ledger.start_turn(["msg_1"], session_key="main")
    again = claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_late")
    assert (again.verdict, again.claimed) == (Verdict.ACTIVE, False)
    assert again.record is ledger.get("msg_1")
    assert state_of(ledger, "msg_1") == WorkState(progress)
    assert "dsp_late" in record(ledger, "msg_1").dispatch_ids


@pytest.mark.parametrize("outcome", ["done", "acked", "dead"])
def test_second_claim_of_a_settled_or_dead_key(outcome: str) -> None:
    """A late row of a settled or dead record is the caller's to ack (``ack_row``): the
    record does not take it, and nothing changes."""
    ledger = make_ledger(max_attempts=1)
    turn_id = run(ledger, "msg_1")
    if outcome == "dead":
        fail(ledger, turn_id)
    else:
        [plan] = ledger.turn_succeeded(turn_id)
        if outcome == "acked":
            ledger.acked(plan)
    version = ledger.version
    again = claim(ledger, "msg_1", origin=DISPATCH_NEW, dispatch_id="dsp_late", now=1e9)
    assert again.verdict is (Verdict.DEAD if outcome == "dead" else Verdict.DONE)
    assert not again.claimed
    assert state_of(ledger, "msg_1") == WorkState(outcome)
    assert "dsp_late" not in record(ledger, "msg_1").dispatch_ids
    assert ledger.version == version


def test_a_failed_record_waits_for_its_retry_time_then_is_claimed_again() -> None:
    ledger = make_ledger(retry_base=60.0)
    fail(ledger, run(ledger, "msg_1", origin=CATCH_UP, ids=True), now=100.0)
    waiting = claim(ledger, "msg_1", origin=CATCH_UP, now=159.9, dispatch_id="dsp_2")
    assert (waiting.verdict, waiting.claimed) == (Verdict.WAITING, False)
    assert state_of(ledger, "msg_1") is FAILED
    assert claim(ledger, "msg_1", origin=CATCH_UP, now=160.0, dispatch_id="dsp_3").claimed
    got = record(ledger, "msg_1")
    assert (got.state, got.attempts, got.last_error) == (CLAIMED, 1, "boom")
    assert (got.dispatch_ids, got.event) == ({"dsp_msg_1", "dsp_2", "dsp_3"}, message("msg_1"))


def test_a_claim_of_an_in_flight_record_remembers_its_row() -> None:
    ledger = make_ledger()
    result = claim(ledger, "msg_1", origin=DISPATCH_NEW, dispatch_id="dsp_1")
    assert result.record is not None
    version = ledger.version
    assert claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_2").verdict is Verdict.ACTIVE
    assert ledger.version > version
    version = ledger.version
    claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_2")  # known already: no change
    assert ledger.version == version
    ledger.offer("msg_1", message("msg_1"))
    [plan] = ledger.turn_succeeded(rerun(ledger, ["msg_1"]))
    assert (plan.source, plan.dispatch_ids) == (None, ("dsp_1", "dsp_2"))


def test_offer_and_queue_need_a_claimed_record_with_its_event() -> None:
    ledger = make_ledger()
    claim(ledger, "msg_1")
    with pytest.raises(RuntimeError, match="cannot queue"):
        ledger.queued("msg_1")  # no event yet
    event = message("msg_1")
    ledger.offer("msg_1", event)
    version = ledger.version
    ledger.offer("msg_1", event)  # the same event: nothing changes
    assert ledger.version == version
    assert ledger.event("msg_1") is event
    ledger.queued("msg_1")
    with pytest.raises(RuntimeError, match="cannot offer"):
        ledger.offer("msg_1", event)
    with pytest.raises(RuntimeError, match="cannot queue"):
        ledger.queued("msg_1")


# --- hold and release -----------------------------------------------------------------------------


def test_release_forgets_a_never_run_record() -> None:
    ledger = make_ledger()
    claim(ledger, "msg_1", dispatch_id="dsp_1")
    assert ledger.release("msg_1") is None
    assert ledger.get("msg_1") is ledger.by_source("message", "msg_1") is None
    assert len(ledger) == 0
    assert claim(ledger, "msg_1").verdict is Verdict.CLAIMED


@pytest.mark.parametrize("before", ["failed", "interrupted", "offered"])
def test_release_keeps_a_record_that_ran_or_holds_its_event(before: str) -> None:
    """It waits to run again: after a failure, an interruption (no attempt counted), or
    once its event is built (lanes that close release what they do not queue)."""
    ledger = make_ledger(retry_base=10.0)
    if before == "offered":
        claim(ledger, "msg_1")
        ledger.offer("msg_1", message("msg_1"))
    else:
        turn_id = run(ledger, "msg_1")
        if before == "failed":
            fail(ledger, turn_id)
        else:
            ledger.turn_interrupted(turn_id, now=0.0)
        assert ledger.take_due(10.0) == [("msg_1",)]
    ledger.release("msg_1")
    assert shape(ledger, "msg_1")[:2] == (FAILED, int(before == "failed"))
    assert ledger.event("msg_1") == message("msg_1")
    assert ledger.take_due(10.0) == [("msg_1",)]


@pytest.mark.parametrize("progress", ["queued", "running", "done"])
def test_release_ignores_records_past_claimed(progress: str) -> None:
    ledger = make_ledger()
    queue(ledger, "msg_1")
    if progress != "queued":
        turn_id = ledger.start_turn(["msg_1"], session_key="main").turn_id
        if progress == "done":
            ledger.turn_succeeded(turn_id)
    assert ledger.release("msg_1") is None
    assert state_of(ledger, "msg_1") == WorkState(progress)
    assert ledger.release("msg_unknown") is None


def test_hold_keeps_a_live_delivery_while_the_row_is_fetched() -> None:
    ledger = make_ledger()
    held = delivery("msg_1")
    assert not ledger.hold("msg_1", held)  # unknown
    claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_1")
    assert ledger.hold("msg_1", held)
    assert ledger.release("msg_1") is held  # the fetch failed: route it from here
    assert ledger.get("msg_1") is None
    claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_1")
    assert ledger.hold("msg_1", held)
    ledger.offer("msg_1", message("msg_1"))
    assert not ledger.hold("msg_1", held)  # it has its event now
    ledger.queued("msg_1")
    assert ledger.release("msg_1") is None  # queued: the held delivery is dropped
    assert record(ledger, "msg_1").held is None


# --- acks -----------------------------------------------------------------------------------------


def test_live_success_is_acked_by_source_only() -> None:
    ledger = make_ledger()
    turn_id = run(ledger, "msg_1", origin=LIVE)
    # A dispatch row learnt while the turn ran (dispatch.new, catch-up).
    assert claim(ledger, "msg_1", origin=DISPATCH_NEW, dispatch_id="dsp_1").verdict is (
        Verdict.ACTIVE
    )
    [plan] = ledger.turn_succeeded(turn_id)
    assert plan == AckPlan("msg_1", source=("message", "msg_1"), version=plan.version)
    assert shape(ledger, "msg_1") == (DONE, 0, None, None, True)
    assert record(ledger, "msg_1").event is None


@pytest.mark.parametrize("origin", [CATCH_UP, DISPATCH_NEW])
def test_dispatch_row_success_is_acked_by_its_ids(origin: EventOrigin) -> None:
    ledger = make_ledger()
    turn_id = run(ledger, "msg_1", origin=origin, ids=True)
    assert claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_a").verdict is Verdict.ACTIVE
    [plan] = ledger.turn_succeeded(turn_id)
    assert (plan.source, plan.dispatch_ids) == (None, ("dsp_a", "dsp_msg_1"))


def test_acked_settles_the_record_and_forgets_the_rows_acked() -> None:
    """An ack by source covers every row; an ack by ids only those."""
    ledger = make_ledger()
    by_source, by_ids = ledger.turn_succeeded(run(ledger, "live", origin=LIVE, ids=True)) + (
        ledger.turn_succeeded(run(ledger, "row", origin=CATCH_UP, ids=True))
    )
    assert (by_source.source, by_ids.dispatch_ids) == (("message", "live"), ("dsp_row",))
    record(ledger, "row").dispatch_ids.add("dsp_other")  # a row learnt once the plan was made
    ledger.acked(by_source)
    ledger.acked(by_ids)
    assert shape(ledger, "live") == shape(ledger, "row") == (ACKED, 0, None, None, False)
    assert record(ledger, "live").dispatch_ids == set()
    assert record(ledger, "row").dispatch_ids == {"dsp_other"}


def test_acked_of_an_unknown_forgotten_or_acked_key_is_a_no_op() -> None:
    ledger = make_ledger(capacity=1)
    [plan] = succeed(ledger, "msg_1")
    version = ledger.version
    ledger.acked(AckPlan("msg_unknown", source=("message", "msg_unknown")))
    ledger.acked(AckPlan(dispatch_ids=("dsp_1",)))  # no key
    assert ledger.version == version
    ledger.acked(plan)
    version = ledger.version
    ledger.acked(plan)  # twice
    assert ledger.version == version
    [plan2] = succeed(ledger, "msg_2")
    claim(ledger, "msg_3")  # past the capacity: msg_2 (its acks owed) is forgotten
    ledger.acked(plan2)
    assert ledger.get("msg_2") is None


def test_ack_row_acks_one_row_on_its_own() -> None:
    ledger = make_ledger()
    succeed(ledger, "msg_1")
    assert ledger.ack_row("dsp_9") == AckPlan(None, dispatch_ids=("dsp_9",), version=ledger.version)
    assert not AckPlan()
    assert not AckPlan("msg_1")  # nothing to ack
    assert AckPlan(source=("message", "m"))
    assert AckPlan(dispatch_ids=("d",))


TASK: dict[str, Any] = {"source_type": "task_activity", "source_id": "tsk_1"}


def task_version(ledger: Ledger, key: str, *, dispatch_id: str | None = None) -> None:
    """Claim a version of task ``tsk_1`` and give it its event."""
    assert claim(ledger, key, **TASK, dispatch_id=dispatch_id).claimed
    ledger.offer(key, message(key))


def test_by_source_finds_the_latest_version_of_a_task() -> None:
    ledger = make_ledger()
    task_version(ledger, "tsk_1@v1")
    task_version(ledger, "tsk_1@v2")
    assert ledger.by_source("task_activity", "tsk_1") is ledger.get("tsk_1@v2")
    assert ledger.by_source("message", "tsk_1") is None
    assert state_of(ledger, "tsk_1@v1") is CLAIMED


def test_a_newer_version_of_a_source_keeps_its_row_out_of_the_older_ones_ack() -> None:
    ledger = make_ledger()
    task_version(ledger, "tsk_1@v1", dispatch_id="dsp_1")
    task_version(ledger, "tsk_1@v2")
    [older] = ledger.turn_succeeded(rerun(ledger, ["tsk_1@v1"]))
    assert older.source is None  # by source would ack v2's row before v2 ran
    assert older.dispatch_ids == ("dsp_1",)
    [newer] = ledger.turn_succeeded(rerun(ledger, ["tsk_1@v2"]))
    assert newer.source == ("task_activity", "tsk_1")


def test_a_released_newer_version_keeps_its_row_out_of_the_older_ones_ack() -> None:
    """Released (its fetch failed, or a filter dropped it), the newer version is still
    remembered (waiting), so the older one's success does not ack its row by source."""
    ledger = make_ledger()
    task_version(ledger, "tsk_1@v1", dispatch_id="dsp_1")
    turn_id = rerun(ledger, ["tsk_1@v1"])
    assert claim(ledger, "tsk_1@v2", **TASK, dispatch_id="dsp_2").claimed
    ledger.release("tsk_1@v2")
    assert state_of(ledger, "tsk_1@v2") is FAILED
    assert ledger.by_source("task_activity", "tsk_1") is ledger.get("tsk_1@v2")
    [plan] = ledger.turn_succeeded(turn_id)
    assert (plan.source, plan.dispatch_ids) == (None, ("dsp_1",))


def test_an_older_version_with_nothing_to_ack_is_acked_at_once() -> None:
    """No row of its own, and the source's ack belongs to the newer version: nothing is
    owed, so no plan, and the record is settled as acked."""
    ledger = make_ledger()
    task_version(ledger, "tsk_1@v1")
    task_version(ledger, "tsk_1@v2")
    assert ledger.turn_succeeded(rerun(ledger, ["tsk_1@v1"])) == []
    assert shape(ledger, "tsk_1@v1") == (ACKED, 0, None, None, False)


# --- dismiss --------------------------------------------------------------------------------------


def test_dismiss_an_unknown_live_key_settles_it_and_acks_by_source() -> None:
    ledger = make_ledger()
    plan = ledger.dismiss("msg_1", source_type="message", source_id="msg_1", origin=LIVE)
    assert plan == AckPlan("msg_1", source=("message", "msg_1"), version=ledger.version)
    assert shape(ledger, "msg_1") == (DONE, 0, None, None, True)
    assert claim(ledger, "msg_1").verdict is Verdict.DONE


def test_dismiss_a_claimed_dispatch_row_acks_it_by_id() -> None:
    ledger = make_ledger()
    claim(ledger, "msg_1", origin=CATCH_UP, dispatch_id="dsp_1")
    assert ledger.hold("msg_1", delivery("msg_1"))
    plan = ledger.dismiss(
        "msg_1", source_type="message", source_id="msg_1", origin=CATCH_UP, dispatch_id="dsp_2"
    )
    assert plan == AckPlan("msg_1", dispatch_ids=("dsp_1", "dsp_2"), version=ledger.version)
    assert shape(ledger, "msg_1") == (DONE, 0, None, None, True)
    assert record(ledger, "msg_1").held is None
    ledger.acked(plan)
    assert state_of(ledger, "msg_1") is ACKED


@pytest.mark.parametrize("progress", ["queued", "running"])
def test_dismiss_refuses_a_queued_or_running_key(progress: str) -> None:
    ledger = make_ledger()
    queue(ledger, "msg_1")
    if progress == "running":
        ledger.start_turn(["msg_1"], session_key="main")
    with pytest.raises(RuntimeError, match="cannot dismiss"):
        ledger.dismiss("msg_1", source_type="message", source_id="msg_1", origin=LIVE)
    assert state_of(ledger, "msg_1") == WorkState(progress)


# --- turns ----------------------------------------------------------------------------------------


def test_start_turn_derives_the_id_from_the_keys_in_order() -> None:
    ledger = make_ledger()
    queue(ledger, "b")
    queue(ledger, "a")
    entry = ledger.start_turn(["b", "a"], session_key="fork:cht_1", prefix="[Fork]")
    assert entry.turn_id == turn_id_of(["b", "a"]) != turn_id_of(["a", "b"])
    assert (entry.keys, entry.session_key, entry.prefix) == (("b", "a"), "fork:cht_1", "[Fork]")
    assert (entry.attempt, entry.state, ledger.turn(entry.turn_id)) == (1, TurnState.RUNNING, entry)
    assert ledger.journal == [entry]
    assert shape(ledger, "a") == shape(ledger, "b") == (RUNNING, 0, None, entry.turn_id, False)


def test_start_turn_without_keys_or_with_a_given_id() -> None:
    ledger = make_ledger()
    first = ledger.start_turn([], session_key="main", prefix="[Fork result]")
    second = ledger.start_turn([], session_key="main")
    assert first.turn_id.startswith("s")
    assert first.turn_id != second.turn_id
    assert first.keys == ()
    queue(ledger, "a")
    given = ledger.start_turn(["a"], session_key="main", turn_id="t_given")
    assert given.turn_id == record(ledger, "a").turn_id == "t_given"
    assert ledger.journal == [first, second, given]


@pytest.mark.parametrize("progress", ["claimed", "running", "done", "failed"])
def test_start_turn_refuses_keys_that_are_not_queued(progress: str) -> None:
    ledger = make_ledger()
    queue(ledger, "ok")
    if progress == "claimed":
        claim(ledger, "msg_1")
    else:
        turn_id = run(ledger, "msg_1")
        if progress == "done":
            ledger.turn_succeeded(turn_id)
        elif progress == "failed":
            fail(ledger, turn_id)
    version = ledger.version
    with pytest.raises(RuntimeError, match="cannot run 'msg_1'"):
        ledger.start_turn(["ok", "msg_1"], session_key="main")
    assert (ledger.version, state_of(ledger, "ok")) == (version, QUEUED)
    assert ledger.turn(turn_id_of(["ok", "msg_1"])) is None


def test_start_turn_refuses_a_journaled_id_run_again_with_other_keys() -> None:
    ledger = make_ledger()
    turn_id = run(ledger, "a")
    ledger.turn_interrupted(turn_id, now=0.0)
    queue(ledger, "b")
    with pytest.raises(RuntimeError, match="runs again with other sources"):
        ledger.start_turn(["b"], session_key="main", turn_id=turn_id)
    assert state_of(ledger, "b") is QUEUED
    entry = entry_of(ledger, turn_id)
    assert (entry.keys, entry.state, entry.attempt) == (("a",), TurnState.INTERRUPTED, 1)


def test_turn_succeeded_settles_its_records_and_leaves_the_journal() -> None:
    ledger = make_ledger()
    turn_id = run(ledger, "a", "b", origin=CATCH_UP, ids=True)
    version = ledger.version
    plans = ledger.turn_succeeded(turn_id)
    assert [(p.key, p.dispatch_ids) for p in plans] == [("a", ("dsp_a",)), ("b", ("dsp_b",))]
    assert all(version < plan.version <= ledger.version for plan in plans)
    assert (ledger.turn(turn_id), ledger.journal) == (None, [])
    assert shape(ledger, "a") == shape(ledger, "b") == (DONE, 0, None, None, True)
    assert record(ledger, "a").event is None
    ledger.acked(plans[0])
    assert (state_of(ledger, "a"), state_of(ledger, "b")) == (ACKED, DONE)


def test_turn_failed_schedules_a_retry() -> None:
    ledger = make_ledger(retry_base=60.0, max_attempts=5)
    turn_id = run(ledger, "msg_1")
    failure = ledger.turn_failed(turn_id, "RuntimeError: boom", now=1000.0, sent=False)
    assert (failure.attempts, failure.dead, failure.acks, failure.retrying) == (1, (), (), True)
    assert shape(ledger, "msg_1") == (FAILED, 1, 1060.0, None, False)
    assert record(ledger, "msg_1").last_error == "RuntimeError: boom"
    assert ledger.event("msg_1") == message("msg_1")
    assert ledger.journal == []  # a first run that sent nothing: not pinned
    assert ledger.next_retry_at() == 1060.0
    assert ledger.take_due(1059.9) == []
    assert ledger.take_due(1060.0) == [("msg_1",)]
    assert state_of(ledger, "msg_1") is CLAIMED


def test_a_failed_turn_that_sent_stays_pinned_with_one_retry_time() -> None:
    """Its records wait together, for the retry time of the most tried one; a claim of
    one of them waits too, even once due (it runs only with its turn)."""
    ledger = make_ledger(retry_base=10.0, max_attempts=5)
    fail(ledger, run(ledger, "a"))
    assert ledger.take_due(100.0) == [("a",)]
    ledger.queued("a")
    queue(ledger, "b")
    turn_id = ledger.start_turn(["a", "b"], session_key="main").turn_id
    failure = ledger.turn_failed(turn_id, "boom", now=100.0, sent=True)
    assert (failure.attempts, failure.dead, failure.retrying) == (2, (), True)
    entry = entry_of(ledger, turn_id)
    assert (entry.state, entry.keys) == (TurnState.PINNED, ("a", "b"))
    assert shape(ledger, "a") == (FAILED, 2, 120.0, turn_id, False)
    assert shape(ledger, "b") == (FAILED, 1, 120.0, turn_id, False)
    assert ledger.next_retry_at() == 120.0
    waiting = claim(ledger, "b", origin=CATCH_UP, now=1000.0, dispatch_id="dsp_1")
    assert waiting.verdict is Verdict.WAITING
    assert (state_of(ledger, "b"), record(ledger, "b").dispatch_ids) == (FAILED, {"dsp_1"})


@pytest.mark.parametrize("first", ["failed after sending", "interrupted"])
def test_a_turn_running_again_stays_pinned_when_it_fails_without_sending(first: str) -> None:
    """An earlier run may have sent: its replies keep their keys only if it stays pinned."""
    ledger = make_ledger(retry_base=1.0)
    turn_id = run(ledger, "a", "b")
    if first == "interrupted":
        ledger.turn_interrupted(turn_id, now=0.0)
    else:
        fail(ledger, turn_id, sent=True)
    assert ledger.take_due(100.0) == [("a", "b")]
    rerun(ledger, ["a", "b"], turn_id=turn_id)
    fail(ledger, turn_id, now=100.0, sent=False)
    entry = entry_of(ledger, turn_id)
    assert (entry.state, entry.attempt) == (TurnState.PINNED, 2)
    tries = 1 if first == "interrupted" else 2
    assert shape(ledger, "b") == (FAILED, tries, 100.0 + 2 ** (tries - 1), turn_id, False)


def test_take_due_runs_a_pinned_turn_whole_and_in_order() -> None:
    ledger = make_ledger(retry_base=10.0)
    turn_id = run(ledger, "b", "a")
    fail(ledger, turn_id, sent=True)
    assert ledger.take_due(9.9) == []
    assert ledger.take_due(10.0) == [("b", "a")]
    assert (state_of(ledger, "a"), state_of(ledger, "b")) == (CLAIMED, CLAIMED)
    assert ledger.take_due(1e9) == []
    assert rerun(ledger, ["b", "a"]) == turn_id  # derived again: the same id
    entry = entry_of(ledger, turn_id)
    assert (entry.attempt, entry.state) == (2, TurnState.RUNNING)
    ledger.turn_succeeded(turn_id)
    assert ledger.journal == []


def test_take_due_claims_single_keys_and_turns_oldest_first() -> None:
    ledger = make_ledger(retry_base=10.0, max_attempts=5)
    fail(ledger, run(ledger, "a"), now=100.0)  # due at 110
    fail(ledger, run(ledger, "b"), now=50.0)  # due at 60
    fail(ledger, run(ledger, "c", "d"), now=0.0, sent=True)  # due at 10, pinned
    succeed(ledger, "e")
    assert ledger.next_retry_at() == 10.0
    assert ledger.take_due(60.0) == [("b",), ("c", "d")]
    assert ledger.next_retry_at() == 110.0
    assert ledger.take_due(200.0) == [("a",)]
    assert ledger.next_retry_at() is None


# A failed record that holds its event and has no retry time (released once built, the
# survivors of a turn that crashed the process, claimed or queued rows restored) is due
# at once for take_due, and next_retry_at() says so: the reconciler sleeps until it.
def test_next_retry_at_reports_a_record_due_at_once() -> None:
    ledger = make_ledger()
    claim(ledger, "msg_1")
    ledger.offer("msg_1", message("msg_1"))
    ledger.release("msg_1")
    retry_at = ledger.next_retry_at()
    assert retry_at is not None
    assert ledger.take_due(retry_at) == [("msg_1",)]


def test_take_due_unpins_a_turn_that_cannot_run_as_it_was() -> None:
    """A pinned turn one of whose records was settled meanwhile: the others run alone."""
    ledger = make_ledger(retry_base=10.0)
    turn_id = run(ledger, "a", "b")
    fail(ledger, turn_id, sent=True)
    ledger.dismiss("b", source_type="message", source_id="b", origin=LIVE)
    assert ledger.take_due(100.0) == [("a",)]  # unpinned and claimed in the same call
    assert ledger.journal == []
    assert record(ledger, "a").turn_id is None
    assert ledger.take_due(100.0) == []


def test_start_turn_refuses_keys_of_another_journaled_turn() -> None:
    """A pinned record runs only with its own turn: mixed into another batch, that turn
    would stay journaled forever."""
    ledger = make_ledger(retry_base=10.0)
    pinned = run(ledger, "a")
    fail(ledger, pinned, sent=True)
    assert ledger.take_due(100.0) == [("a",)]
    ledger.queued("a")
    queue(ledger, "b")
    with pytest.raises(RuntimeError, match=f"belongs to turn {pinned}"):
        ledger.start_turn(["a", "b"], session_key="main")
    assert ledger.start_turn(["a"], session_key="main", turn_id=pinned).attempt == 2


def test_when_some_records_go_dead_the_survivors_are_unpinned() -> None:
    ledger = make_ledger(retry_base=10.0, max_attempts=2)
    fail(ledger, run(ledger, "a", ids=True, origin=CATCH_UP))
    assert ledger.take_due(10.0) == [("a",)]
    ledger.queued("a")
    queue(ledger, "b")
    turn_id = ledger.start_turn(["a", "b"], session_key="main").turn_id
    failure = ledger.turn_failed(turn_id, "boom", now=100.0, sent=True)
    assert (failure.attempts, failure.dead, failure.retrying) == (2, (message("a"),), True)
    assert [(plan.key, plan.dispatch_ids) for plan in failure.acks] == [("a", ("dsp_a",))]
    assert ledger.journal == []
    assert shape(ledger, "a") == (DEAD, 2, None, None, True)
    assert shape(ledger, "b") == (FAILED, 1, 110.0, None, False)  # its own retry time


# --- retries and dead letters ---------------------------------------------------------------------


def test_retry_delay_doubles_capped_at_ten_minutes() -> None:
    ledger = make_ledger(retry_base=60.0)
    assert MAX_RETRY_DELAY == 600.0
    assert [ledger.retry_delay(n) for n in range(1, 7)] == [60.0, 120.0, 240.0, 480.0, 600.0, 600.0]
    assert (ledger.retry_delay(1000), ledger.retry_delay(0)) == (600.0, 60.0)
    assert make_ledger(retry_base=5.0).retry_delay(3) == 20.0


def test_each_failure_waits_twice_as_long() -> None:
    ledger = make_ledger(retry_base=60.0, max_attempts=10)
    now = 0.0
    turn_id = run(ledger, "msg_1")
    delays = []
    for _ in range(6):
        fail(ledger, turn_id, now=now)
        next_at = record(ledger, "msg_1").next_attempt_at
        assert next_at is not None
        delays.append(next_at - now)
        now = next_at
        assert ledger.take_due(now) == [("msg_1",)]
        turn_id = rerun(ledger, ["msg_1"])
    assert delays == [60.0, 120.0, 240.0, 480.0, 600.0, 600.0]


def test_dead_exactly_on_the_last_attempt() -> None:
    ledger = make_ledger(retry_base=1.0, max_attempts=3)
    turn_id = run(ledger, "msg_1", origin=CATCH_UP, ids=True)
    failures = []
    for attempt in range(1, 4):
        failures.append(ledger.turn_failed(turn_id, f"boom {attempt}", now=0.0, sent=False))
        if attempt < 3:
            assert ledger.take_due(1000.0) == [("msg_1",)]
            turn_id = rerun(ledger, ["msg_1"])
    assert [(f.attempts, f.dead, f.retrying) for f in failures] == [
        (1, (), True),
        (2, (), True),
        (3, (message("msg_1"),), False),
    ]
    [plan] = failures[-1].acks
    assert (plan.key, plan.source, plan.dispatch_ids) == ("msg_1", None, ("dsp_msg_1",))
    assert shape(ledger, "msg_1") == (DEAD, 3, None, None, True)
    assert (record(ledger, "msg_1").last_error, record(ledger, "msg_1").event) == ("boom 3", None)
    assert (ledger.dead_total, ledger.take_due(1e9), ledger.next_retry_at()) == (1, [], None)
    ledger.acked(plan)
    assert shape(ledger, "msg_1") == (DEAD, 3, None, None, False)


@pytest.mark.parametrize("ack_dead", [True, False])
def test_dead_letters_are_acked_only_when_ack_dead(ack_dead: bool) -> None:
    ledger = make_ledger(max_attempts=1, ack_dead=ack_dead)
    failure = ledger.turn_failed(run(ledger, "msg_1"), "boom", now=0.0, sent=True)
    assert failure.dead == (message("msg_1"),)
    assert [plan.source for plan in failure.acks] == ([("message", "msg_1")] if ack_dead else [])
    assert shape(ledger, "msg_1") == (DEAD, 1, None, None, ack_dead)
    assert (ledger.journal, ledger.dead_total) == ([], 1)  # nothing left to run: not pinned
    assert claim(ledger, "msg_1", dispatch_id="dsp_2").verdict is Verdict.DEAD


def test_dead_total_counts_forgotten_records_too() -> None:
    ledger = make_ledger(capacity=3, max_attempts=1)
    for i in range(10):
        fail(ledger, run(ledger, f"m{i}"))
    assert ledger.dead_total == 10
    assert len(ledger) <= 3


def test_interruption_does_not_count_an_attempt() -> None:
    ledger = make_ledger(retry_base=60.0)
    turn_id = run(ledger, "a", "b")
    ledger.turn_interrupted(turn_id, now=500.0)
    entry = entry_of(ledger, turn_id)
    assert entry.state is TurnState.INTERRUPTED
    assert shape(ledger, "a") == shape(ledger, "b") == (FAILED, 0, 500.0, turn_id, False)
    assert ledger.take_due(500.0) == [("a", "b")]  # it runs again whole
    rerun(ledger, ["a", "b"], turn_id=turn_id)
    assert entry.attempt == 2


def test_interrupted_after_failures_keeps_the_count() -> None:
    ledger = make_ledger(retry_base=1.0, max_attempts=2)
    fail(ledger, run(ledger, "msg_1"))
    assert ledger.take_due(10.0) == [("msg_1",)]
    turn_id = rerun(ledger, ["msg_1"])
    ledger.turn_interrupted(turn_id, now=10.0)
    assert ledger.take_due(10.0) == [("msg_1",)]
    turn_id = rerun(ledger, ["msg_1"], turn_id=turn_id)
    # Still one failure allowed before this one: the interruption did not count.
    assert ledger.turn_failed(turn_id, "boom", now=10.0, sent=False).dead == (message("msg_1"),)


# --- shutdown -------------------------------------------------------------------------------------


def test_shutdown_settles_what_is_in_flight() -> None:
    ledger = make_ledger()
    turn_id = run(ledger, "running")
    claim(ledger, "fetching")
    assert ledger.hold("fetching", delivery("fetching"))
    queue(ledger, "queued")
    claim(ledger, "offered")
    ledger.offer("offered", message("offered"))
    succeed(ledger, "done")
    # The claims and the queued event (the running turn's event is not counted).
    assert ledger.shutdown(now=50.0) == 3
    assert entry_of(ledger, turn_id).state is TurnState.INTERRUPTED
    assert ledger.get("fetching") is None
    assert shape(ledger, "running") == (FAILED, 0, 50.0, turn_id, False)
    assert shape(ledger, "queued") == shape(ledger, "offered") == (FAILED, 0, 50.0, None, False)
    assert state_of(ledger, "done") is DONE
    assert all(got.held is None and got.state not in IN_FLIGHT for got in ledger)
    assert ledger.shutdown(now=60.0) == 0


# --- counts and boundedness -----------------------------------------------------------------------


def test_counts() -> None:
    ledger = make_ledger(max_attempts=2)
    claim(ledger, "claimed")
    queue(ledger, "queued")
    run(ledger, "running")
    succeed(ledger, "done")
    [plan] = succeed(ledger, "acked")
    ledger.acked(plan)
    fail(ledger, run(ledger, "failed"))
    fail(ledger, run(ledger, "dead"))
    assert ledger.take_due(1e9) == [("failed",), ("dead",)]
    ledger.release("failed")
    fail(ledger, rerun(ledger, ["dead"]))
    assert ledger.counts() == {state.value: 1 for state in WorkState}
    assert sorted(got.key for got in ledger) == sorted(state.value for state in WorkState)


def test_eviction_order_acked_then_owed_then_failed_never_in_flight_or_journaled() -> None:
    ledger = make_ledger(capacity=10, max_attempts=3)  # evicts down to 9
    for key in ("f0", "f1"):
        fail(ledger, run(ledger, key))
    succeed(ledger, "o0")
    succeed(ledger, "o1")
    [plan] = succeed(ledger, "a0")
    ledger.acked(plan)
    fail(ledger, run(ledger, "p0"), sent=True)  # pinned
    run(ledger, "r0")
    for key in ("c0", "c1", "c2"):
        claim(ledger, key)

    def kept() -> set[str]:
        return {got.key for got in ledger}

    claim(ledger, "c3")  # the acked one, then the oldest owed one
    assert kept() == {"f0", "f1", "o1", "p0", "r0", "c0", "c1", "c2", "c3"}
    claim(ledger, "c4")
    claim(ledger, "c5")  # the last owed one, then the oldest failed one
    assert kept() == {"f1", "p0", "r0"} | {f"c{i}" for i in range(6)}
    for key in ("c6", "c7", "c8"):  # nothing left to forget but in flight and journaled ones
        claim(ledger, key)
    assert kept() == {"p0", "r0"} | {f"c{i}" for i in range(9)}


def test_a_record_whose_acks_are_being_sent_is_never_forgotten() -> None:
    ledger = make_ledger(capacity=3)  # evicts down to 3
    sending = {}
    for key in ("s0", "s1", "s2"):
        [plan] = succeed(ledger, key)
        ledger.ack_sending(plan)  # the writer took them
        sending[key] = plan
    claim(ledger, "c0")
    # Over capacity, and still kept: forgotten, a catch-up listing their rows before the
    # acks went out would run them again.
    assert {got.key for got in ledger} == {"s0", "s1", "s2", "c0"}
    ledger.ack_failed(sending["s0"])  # left to reconciliation: may be forgotten now
    ledger.acked(sending["s1"])
    claim(ledger, "c1")
    assert {got.key for got in ledger} == {"s2", "c0", "c1"}


def test_a_claim_refreshes_the_age_of_a_record() -> None:
    ledger = make_ledger(capacity=3)
    for key in ("a", "b", "c"):
        succeed(ledger, key)
    assert claim(ledger, "a", dispatch_id="dsp").verdict is Verdict.DONE  # "a" is recent now
    claim(ledger, "new")
    assert {got.key for got in ledger} == {"a", "c", "new"}


# --- versions and changes -------------------------------------------------------------------------


def test_version_bumps_on_every_transition() -> None:
    ledger = make_ledger(retry_base=1.0)
    turn_id = turn_id_of(["a"])
    plans: list[AckPlan] = []
    steps: list[Callable[[], object]] = [
        lambda: claim(ledger, "a", origin=CATCH_UP),
        lambda: claim(ledger, "a", dispatch_id="dsp_1"),
        lambda: ledger.offer("a", message("a")),
        lambda: ledger.queued("a"),
        lambda: ledger.start_turn(["a"], session_key="main"),
        lambda: fail(ledger, turn_id, sent=True),
        lambda: ledger.take_due(10.0),
        lambda: ledger.queued("a"),
        lambda: ledger.start_turn(["a"], session_key="main", turn_id=turn_id),
        lambda: ledger.turn_interrupted(turn_id, now=10.0),
        lambda: ledger.take_due(10.0),
        lambda: rerun(ledger, ["a"], turn_id=turn_id),
        lambda: plans.extend(ledger.turn_succeeded(turn_id)),
        lambda: ledger.acked(plans[0]),
        lambda: claim(ledger, "b"),
        lambda: ledger.release("b"),
        lambda: ledger.dismiss("c", source_type="message", source_id="c", origin=LIVE),
        lambda: claim(ledger, "d"),
        lambda: ledger.shutdown(now=20.0),
    ]
    for step in steps:
        version = ledger.version
        step()
        assert ledger.version > version
    version = ledger.version
    # Reading, and claims that change nothing, do not.
    claim(ledger, "a")
    ledger.ack_row("dsp_9")
    ledger.counts()
    ledger.take_due(1e9)
    ledger.next_retry_at()
    assert ledger.version == version


def test_changes_gives_the_rows_of_what_changed_once() -> None:
    ledger = make_ledger(retry_base=60.0)
    turn_id = run(ledger, "msg_1", origin=CATCH_UP, ids=True)
    fail(ledger, turn_id, now=100.0, sent=True)
    assert ledger.dirty
    batch = ledger.changes(now=100.0, wall=WALL)
    assert not ledger.dirty
    assert (batch.deleted_sources, batch.deleted_turns, batch.meta) == ((), (), None)
    [row] = batch.sources
    assert row.event is not None
    assert json.loads(row.event)["message_id"] == "msg_1"
    assert row == SourceRow(
        key="msg_1",
        source_type="message",
        source_id="msg_1",
        origin="catch_up",
        state="failed",
        attempts=1,
        next_attempt_at=WALL + 60.0,  # the wall clock's time of the ledger's 160.0
        last_error="boom",
        dispatch_ids=("dsp_msg_1",),
        ack_pending=False,
        turn_id=turn_id,
        event=row.event,
        order=record(ledger, "msg_1").order,
    )
    order = entry_of(ledger, turn_id).order
    assert batch.turns == (TurnRow(turn_id, ("msg_1",), "main", "", 1, "pinned", order),)
    assert not ledger.changes(now=100.0, wall=WALL)  # nothing the second time


def test_changes_drops_settled_events_forgotten_records_and_ended_turns() -> None:
    ledger = make_ledger()
    turn_id = run(ledger, "a")
    claim(ledger, "b")
    ledger.changes(now=0.0, wall=WALL)
    ledger.turn_succeeded(turn_id)
    ledger.release("b")
    batch = ledger.changes(now=0.0, wall=WALL)
    [row] = batch.sources
    assert (row.key, row.state, row.event, row.ack_pending, row.turn_id) == (
        "a",
        "done",
        None,
        True,
        None,
    )
    assert (batch.deleted_sources, batch.turns, batch.deleted_turns) == (("b",), (), (turn_id,))


def test_remark_marks_a_batch_that_was_not_written_again() -> None:
    ledger = make_ledger()
    turn_id = run(ledger, "a")
    claim(ledger, "b")
    ledger.release("b")
    lost = ledger.changes(now=0.0, wall=WALL)
    assert not ledger.dirty
    ledger.remark(lost)
    assert ledger.dirty
    ledger.turn_succeeded(turn_id)  # written as the ledger holds it now
    again = ledger.changes(now=0.0, wall=WALL)
    assert [(row.key, row.state) for row in again.sources] == [("a", "done")]
    assert (again.deleted_sources, again.turns, again.deleted_turns) == (("b",), (), (turn_id,))


# --- restore --------------------------------------------------------------------------------------


def test_restore_brings_records_back_on_the_new_clock() -> None:
    old = make_ledger(retry_base=60.0, max_attempts=2)
    fail(old, run(old, "dead"))
    assert old.take_due(1000.0) == [("dead",)]
    old.acked(old.turn_failed(rerun(old, ["dead"]), "boom", now=0.0, sent=False).acks[0])
    [plan] = succeed(old, "acked")
    old.acked(plan)
    fail(old, run(old, "failed", origin=CATCH_UP, ids=True), now=100.0)  # due at 160
    # Stored at 100.0 (wall WALL + 100); restarted 50 s later on a clock now reading 10.0.
    new, restored = restart(saved(old, now=100.0), now=10.0, wall=WALL + 150.0, max_attempts=2)
    assert restored == Restored()
    assert [(got.key, got.state) for got in new] == [
        ("dead", DEAD),
        ("acked", ACKED),
        ("failed", FAILED),
    ]
    assert new.dead_total == 1
    assert shape(new, "failed") == (FAILED, 1, 20.0, None, False)
    got = record(new, "failed")
    assert (got.origin, got.last_error, got.dispatch_ids) == (CATCH_UP, "boom", {"dsp_failed"})
    assert (got.event, new.by_source("message", "failed")) == (message("failed"), got)
    assert new.take_due(19.9) == []
    assert new.take_due(20.0) == [("failed",)]
    assert claim(new, "acked").verdict is Verdict.DONE
    assert claim(new, "dead").verdict is Verdict.DEAD
    claim(new, "new")
    assert record(new, "new").order > max(got.order for got in new if got.key != "new")


@pytest.mark.parametrize("ack_dead", [True, False])
def test_restore_returns_the_acks_owed(ack_dead: bool) -> None:
    old = make_ledger(max_attempts=1)
    succeed(old, "done")
    [plan] = succeed(old, "acked")
    old.acked(plan)
    fail(old, run(old, "dead", origin=CATCH_UP, ids=True))
    new, restored = restart(saved(old), max_attempts=1, ack_dead=ack_dead)
    expected = [AckPlan("done", source=("message", "done"))]
    if ack_dead:
        expected.append(AckPlan("dead", dispatch_ids=("dsp_dead",)))
    assert [attrs.evolve(plan, version=0) for plan in restored.acks] == expected
    assert (restored.resume, restored.dead) == ((), ())
    for plan in restored.acks:
        new.acked(plan)
    assert state_of(new, "done") is ACKED


@pytest.mark.parametrize("crashed", [True, False])
def test_restore_resumes_a_crashed_or_interrupted_turn_first(crashed: bool) -> None:
    """A turn found running (the process died during it) counts an attempt; one that
    shutdown interrupted does not. Both run again first, with the same id."""
    old = make_ledger()
    turn_id = run(old, "a", "b", origin=CATCH_UP, ids=True)
    if not crashed:
        old.shutdown(now=0.0)
    new, restored = restart(saved(old))
    assert (restored.acks, restored.dead) == ((), ())
    [entry] = restored.resume
    assert (entry.turn_id, entry.keys) == (turn_id, ("a", "b"))
    assert (entry.state, entry.attempt, new.journal) == (TurnState.INTERRUPTED, 1, [entry])
    tries = int(crashed)
    assert shape(new, "a") == (CLAIMED, tries, None if crashed else 0.0, turn_id, False)
    assert record(new, "b").last_error == (CRASH_ERROR if crashed else None)
    assert record(new, "b").dispatch_ids == {"dsp_b"}
    assert rerun(new, entry.keys, turn_id=entry.turn_id) == turn_id
    assert entry.attempt == 2
    assert len(new.turn_succeeded(turn_id)) == 2


def test_restore_after_a_crash_gives_up_at_max_attempts() -> None:
    old = make_ledger(max_attempts=2, retry_base=1.0)
    fail(old, run(old, "a"))
    assert old.take_due(10.0) == [("a",)]
    old.queued("a")
    queue(old, "b")
    old.start_turn(["a", "b"], session_key="main")
    new, restored = restart(saved(old), now=500.0, wall=WALL + 500.0, max_attempts=2)
    assert restored.dead == (((message("a"),), CRASH_ERROR),)
    assert ([plan.key for plan in restored.acks], restored.resume) == (["a"], ())
    assert (new.journal, new.dead_total) == ([], 1)
    assert shape(new, "a") == (DEAD, 2, None, None, True)
    assert shape(new, "b") == (FAILED, 1, None, None, False)
    assert new.take_due(500.0) == [("b",)]


def test_restore_keeps_a_pinned_turn_waiting() -> None:
    old = make_ledger(retry_base=60.0)
    turn_id = run(old, "a", "b")
    fail(old, turn_id, sent=True)  # due at 60
    new, restored = restart(saved(old))
    assert restored == Restored()
    [entry] = new.journal
    assert (entry.turn_id, entry.state) == (turn_id, TurnState.PINNED)
    assert shape(new, "a") == shape(new, "b") == (FAILED, 1, 60.0, turn_id, False)
    assert claim(new, "a", now=100.0).verdict is Verdict.WAITING
    assert new.take_due(59.0) == []
    assert new.take_due(60.0) == [("a", "b")]


def test_restore_of_claimed_and_queued_rows() -> None:
    """Taken by the previous run and never run: an event waits to run again at once; a
    claim still being fetched is forgotten (its row brings it back)."""
    old = make_ledger()
    claim(old, "fetching")
    queue(old, "queued")
    claim(old, "offered")
    old.offer("offered", message("offered"))
    claim(old, "tried")
    rows = tuple(
        attrs.evolve(row, attempts=1) if row.key == "tried" else row for row in saved(old).sources
    )
    new, _ = restart(StoredState(sources=rows))
    assert [got.key for got in new] == ["queued", "offered", "tried"]
    assert {got.state for got in new} == {FAILED}
    assert new.take_due(0.0) == [("queued",), ("offered",)]  # "tried" has no event to run
    assert claim(new, "tried").claimed
    assert new.changes(now=0.0, wall=WALL).deleted_sources == ("fetching",)


def test_restore_drops_a_turn_whose_record_is_missing() -> None:
    old = make_ledger()
    turn_id = run(old, "a", "b")
    state = saved(old)
    new, restored = restart(attrs.evolve(state, sources=state.sources[:1]))
    assert (restored, new.journal) == (Restored(), [])
    assert shape(new, "a") == (FAILED, 0, 0.0, None, False)
    assert new.changes(now=0.0, wall=WALL).deleted_turns == (turn_id,)


def test_restore_resumes_a_turn_without_events_until_it_crashed_max_attempts_times() -> None:
    old = make_ledger()
    entry = old.start_turn([], session_key="main", prefix="[Fork result]\n")
    state = saved(old)
    new, restored = restart(state)
    [resumed] = restored.resume
    assert (resumed.turn_id, resumed.keys, resumed.prefix) == (entry.turn_id, (), "[Fork result]\n")
    assert new.start_turn([], session_key="main", turn_id=entry.turn_id).attempt == 2
    crashed = attrs.evolve(state, turns=(attrs.evolve(state.turns[0], attempt=3),))
    new, restored = restart(crashed, max_attempts=3)
    assert (restored, new.journal) == (Restored(), [])


def test_restore_refuses_a_non_empty_ledger() -> None:
    busy, journaled = make_ledger(), make_ledger()
    claim(busy, "a")
    journaled.start_turn([], session_key="main")
    for ledger in (busy, journaled):
        with pytest.raises(RuntimeError, match="needs an empty ledger"):
            ledger.restore(StoredState(), now=0.0, wall=WALL)


def test_restore_writes_everything_back() -> None:
    old = make_ledger()
    pinned = run(old, "p")
    fail(old, pinned, sent=True)
    crashed = run(old, "r")
    succeed(old, "d")
    claim(old, "fetching")
    new, _ = restart(saved(old))
    batch = new.changes(now=0.0, wall=WALL)
    assert sorted(row.key for row in batch.sources) == ["d", "p", "r"]
    assert batch.deleted_sources == ("fetching",)
    assert {row.turn_id: row.state for row in batch.turns} == {
        pinned: "pinned",
        crashed: "interrupted",
    }
    assert not new.changes(now=0.0, wall=WALL)


# --- a model-based check of random operation sequences --------------------------------------------

KEYS = [f"msg_{i}" for i in range(7)]
CAPACITY = 4
MAX_ATTEMPTS = 2
RETRY_BASE = 10.0
YES_NO = (False, True)
_CHOICES: dict[tuple[object, ...], st.SearchStrategy[Any]] = {}


def pick(data: st.DataObject, items: Sequence[T], label: str) -> T:
    """One of ``items``, drawn (the strategies are kept: making them costs the most)."""
    choices = tuple(items)
    if choices not in _CHOICES:
        if len(_CHOICES) > 1000:
            _CHOICES.clear()
        _CHOICES[choices] = st.sampled_from(choices)
    return cast(T, data.draw(_CHOICES[choices], label=label))


@attrs.define
class Model:
    """What the ledger must hold for one key."""

    state: WorkState = CLAIMED
    attempts: int = 0
    next_at: float | None = None
    event: bool = False
    turn: str | None = None
    ack_pending: bool = False
    ids: set[str] = attrs.field(factory=set)

    def settle(self, state: WorkState) -> None:
        self.state, self.ack_pending, self.event = state, True, False
        self.turn = self.next_at = None


@attrs.define
class Entry:
    """What the journal must hold for one turn."""

    keys: tuple[str, ...]
    state: TurnState = TurnState.RUNNING
    attempt: int = 1


def evictable(model: Model) -> int:
    """Which records are forgotten first: 1 settled and acked, 2 owed, 3 waiting; 0 never."""
    if not model.ack_pending and model.state in (ACKED, DEAD):
        return 1
    if model.state in (DONE, DEAD):
        return 2
    return 3 if model.state is FAILED and model.turn is None else 0


@settings(max_examples=100, stateful_step_count=50, deadline=None, report_multiple_bugs=False)
class LedgerMachine(RuleBasedStateMachine):
    """Random claims, turns and their outcomes, acks, releases, time, writes to a store and
    restarts (after a shutdown, or a crash back to the last write), against a model.

    One rule draws each operation among those possible, weighted: Hypothesis switches
    whole rules off for a run (swarm testing), which here mostly left runs with no claims
    or no turns.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ledger = self.new_ledger()
        self.model: dict[str, Model] = {}
        self.journal: dict[str, Entry] = {}
        self.queue: list[tuple[tuple[str, ...], str | None]] = []
        """Queued units in order: one key, or a journaled turn's keys with its id."""
        self.plans: list[AckPlan] = []
        self.store = MemoryStore()
        self.kept: tuple[dict[str, Model], dict[str, Entry]] = ({}, {})
        """The model as the store holds it."""
        self.now = 0.0
        self.dead = 0
        self.ids = 0
        self.bound = CAPACITY

    @staticmethod
    def new_ledger() -> Ledger:
        return make_ledger(capacity=CAPACITY, max_attempts=MAX_ATTEMPTS, retry_base=RETRY_BASE)

    def keys_in(self, state: WorkState) -> list[str]:
        return sorted(key for key, model in self.model.items() if model.state is state)

    def running(self) -> list[str]:
        """The running turns, oldest first (not by id: a wake-up's is random)."""
        return [t for t, entry in self.journal.items() if entry.state is TurnState.RUNNING]

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        ops = ["claim"] * 6 + ["tick", "take_due"] * 3 + ["flush"] * 2 + ["restart"]
        ops += ["queue_one", "release"] if self.keys_in(CLAIMED) else []
        ops += ["start"] * 6 if self.queue else ["wake_up"]
        ops += ["succeed", "fail", "fail", "interrupt"] * 2 if self.running() else []
        ops += ["acked"] * 3 if self.plans else []
        getattr(self, pick(data, ops, "operation"))(data)

    def forgotten(self) -> None:
        """Records the ledger forgot past its capacity: never in flight nor journaled, acked
        ones first, then owed ones, then waiting ones."""
        classes = [evictable(self.model.pop(k)) for k in list(self.model) if not self.ledger.get(k)]
        assert all(classes)
        assert not [m for m in self.model.values() if 0 < evictable(m) < max(classes, default=0)]
        self.bound = max(CAPACITY, sum(1 for m in self.model.values() if not evictable(m)))

    def claim(self, data: st.DataObject) -> None:
        """A delivery or a dispatch row; when claimed, maybe built and queued at once."""
        key = pick(data, KEYS, "key")
        self.ids += 1
        dispatch_id = f"dsp_{self.ids}" if pick(data, YES_NO, "with id") else None
        origin = pick(data, (LIVE, CATCH_UP), "origin")
        result = claim(self.ledger, key, origin=origin, now=self.now, dispatch_id=dispatch_id)
        model = self.model.get(key)
        if model is None:
            model = self.model[key] = Model(ids={dispatch_id} if dispatch_id else set())
            self.forgotten()
            expected = Verdict.CLAIMED
        elif model.state in IN_FLIGHT:
            expected = Verdict.ACTIVE
        elif model.state in (DONE, ACKED, DEAD):
            expected = Verdict.DEAD if model.state is DEAD else Verdict.DONE
        elif model.turn is not None or (model.next_at or 0.0) > self.now:
            expected = Verdict.WAITING
        else:
            expected = Verdict.CLAIMED
            model.state = CLAIMED
        assert result.verdict is expected
        if dispatch_id and expected not in (Verdict.DONE, Verdict.DEAD):
            model.ids.add(dispatch_id)
        if expected is Verdict.CLAIMED and pick(data, YES_NO, "queue it"):
            self.build_and_queue(key)

    def queue_one(self, data: st.DataObject) -> None:
        self.build_and_queue(pick(data, self.keys_in(CLAIMED), "key"))

    def build_and_queue(self, key: str) -> None:
        if not self.model[key].event:
            self.ledger.offer(key, message(key))
            self.model[key].event = True
        self.queue_whole((key,), None)

    def queue_whole(self, keys: tuple[str, ...], turn_id: str | None) -> None:
        for key in keys:
            self.ledger.queued(key)
            self.model[key].state = QUEUED
        self.queue.append((keys, turn_id))

    def start(self, data: st.DataObject) -> None:
        """A journaled turn runs whole, or some free queued keys in queue order."""
        journaled = [unit for unit in self.queue if unit[1] is not None]
        free = [unit[0][0] for unit in self.queue if unit[1] is None]
        given: str | None = None
        if journaled and (not free or pick(data, YES_NO, "journaled")):
            keys, given = pick(data, journaled, "unit")
            self.queue.remove((keys, given))
        else:
            chosen = {key for key in free if pick(data, YES_NO, key)} or {free[0]}
            keys = tuple(key for key in free if key in chosen)
            self.queue = [unit for unit in self.queue if not chosen & set(unit[0])]
        self.started(self.ledger.start_turn(keys, session_key="main", turn_id=given), given)

    def wake_up(self, data: st.DataObject) -> None:
        """A turn without events (fork results for an idle main session)."""
        self.started(self.ledger.start_turn([], session_key="main"), None)

    def started(self, entry: TurnEntry, given: str | None) -> None:
        if given is not None:
            assert entry.turn_id == given
            self.journal[given].state = TurnState.RUNNING
            self.journal[given].attempt += 1
        else:
            keys = entry.keys
            assert entry.turn_id == turn_id_of(keys) if keys else entry.turn_id.startswith("s")
            self.journal[entry.turn_id] = Entry(keys)
        for key in entry.keys:
            self.model[key].state = RUNNING
            self.model[key].turn = entry.turn_id

    def succeed(self, data: st.DataObject) -> None:
        turn_id = pick(data, self.running(), "turn")
        entry = self.journal.pop(turn_id)
        version = self.ledger.version
        plans = self.ledger.turn_succeeded(turn_id)
        assert [plan.key for plan in plans] == list(entry.keys)
        for plan, key in zip(plans, entry.keys, strict=True):
            model = self.model[key]
            assert version < plan.version <= self.ledger.version
            if plan.source is None:
                assert set(plan.dispatch_ids) == model.ids != set()
            else:
                assert plan.source == ("message", key)
            model.settle(DONE)
        self.plans += plans

    def fail(self, data: st.DataObject) -> None:
        turn_id = pick(data, self.running(), "turn")
        sent = pick(data, YES_NO, "sent")
        entry = self.journal[turn_id]
        failure = self.ledger.turn_failed(turn_id, "boom", now=self.now, sent=sent)
        members = [self.model[key] for key in entry.keys]
        if len(entry.keys) > 1 and not sent and entry.attempt == 1:
            # A coalesced turn that sent nothing: split in two halves, pinned, due at
            # once, no attempt counted.
            assert failure.split
            assert failure.retrying
            assert failure.dead == ()
            del self.journal[turn_id]
            half = len(entry.keys) // 2
            for part in (entry.keys[:half], entry.keys[half:]):
                piece = turn_id_of(part)
                self.journal[piece] = Entry(part, state=TurnState.PINNED, attempt=0)
                for key in part:
                    model = self.model[key]
                    model.state, model.turn, model.next_at = FAILED, piece, self.now
            return
        assert not failure.split
        for model in members:
            model.attempts += 1
        attempts = max((model.attempts for model in members), default=0)
        dead = [key for key in entry.keys if self.model[key].attempts >= MAX_ATTEMPTS]
        waiting = [model for model in members if model.attempts < MAX_ATTEMPTS]
        pinned = (sent or entry.attempt > 1) and bool(waiting) and not dead  # ran before
        assert (failure.attempts, failure.retrying) == (attempts, bool(waiting))
        assert [event.message_id for event in failure.dead] == dead
        assert [plan.key for plan in failure.acks] == dead
        for key in dead:
            self.model[key].settle(DEAD)
            self.dead += 1
        for model in waiting:
            model.state = FAILED
            model.turn = turn_id if pinned else None
            tries = attempts if pinned else model.attempts
            model.next_at = self.now + min(MAX_RETRY_DELAY, RETRY_BASE * 2 ** (tries - 1))
        if pinned:
            entry.state = TurnState.PINNED
        else:
            del self.journal[turn_id]
        self.plans += failure.acks

    def interrupt(self, data: st.DataObject) -> None:
        turn_id = pick(data, self.running(), "turn")
        self.ledger.turn_interrupted(turn_id, now=self.now)
        self.interrupted(turn_id)

    def interrupted(self, turn_id: str) -> None:
        entry = self.journal[turn_id]
        entry.state = TurnState.INTERRUPTED
        for key in entry.keys:
            self.model[key].state, self.model[key].next_at = FAILED, self.now

    def acked(self, data: st.DataObject) -> None:
        plan = pick(data, self.plans, "plan")
        self.plans.remove(plan)
        self.ledger.acked(plan)
        model = self.model.get(plan.key) if plan.key is not None else None
        if model is not None and model.ack_pending:
            model.ack_pending = False
            model.ids = set() if plan.source else model.ids - set(plan.dispatch_ids)
            model.state = ACKED if model.state is DONE else model.state

    def take_due(self, data: st.DataObject) -> None:
        """Everything due is claimed and queued (a pinned turn's records as one unit)."""
        expected: list[tuple[str, ...]] = []
        for got in self.ledger:  # oldest first
            model = self.model[got.key]
            due = model.state is FAILED and model.event and (model.next_at or 0.0) <= self.now
            if due and not any(got.key in unit for unit in expected):
                expected.append(self.journal[model.turn].keys if model.turn else (got.key,))
        assert self.ledger.take_due(self.now) == expected
        for keys in expected:
            turn_id = self.model[keys[0]].turn
            assert all(
                self.model[k].state is FAILED and self.model[k].turn == turn_id for k in keys
            )
            self.queue_whole(keys, turn_id)

    def release(self, data: st.DataObject) -> None:
        key = pick(data, self.keys_in(CLAIMED), "key")
        model = self.model[key]
        held = delivery(key)
        assert self.ledger.hold(key, held) is not model.event
        assert self.ledger.release(key) is (None if model.event else held)
        if model.attempts == 0 and not model.event:
            del self.model[key]
        else:
            model.state = FAILED

    def tick(self, data: st.DataObject) -> None:
        self.now += pick(data, (0.5, 10.0, 40.0, 700.0), "seconds")

    def flush(self, data: st.DataObject) -> None:
        """The changes are written to the store, or the write fails and they are marked
        again."""
        batch = self.ledger.changes(now=self.now, wall=WALL + self.now)
        if pick(data, YES_NO, "lost"):
            self.ledger.remark(batch)
        else:
            self.write(batch)

    def write(self, batch: StateBatch) -> None:
        """Write ``batch``: the store then holds exactly what the ledger holds."""
        self.store.write(batch)
        self.kept = copy.deepcopy((self.model, self.journal))
        assert set(self.store.sources) == {got.key for got in self.ledger}
        for got in self.ledger:
            row = self.store.sources[got.key]
            at = None if got.next_attempt_at is None else WALL + got.next_attempt_at
            stored = (row.state, row.attempts, row.next_attempt_at, row.turn_id, row.ack_pending)
            assert stored == (got.state.value, got.attempts, at, got.turn_id, got.ack_pending)
            ids, has_event = tuple(sorted(got.dispatch_ids)), got.event is not None
            assert (row.dispatch_ids, row.event is not None) == (ids, has_event)
        assert {e.turn_id: (e.keys, e.state.value, e.attempt) for e in self.ledger.journal} == {
            row.turn_id: (row.keys, row.state, row.attempt) for row in self.store.turns.values()
        }

    def restart(self, data: st.DataObject) -> None:
        """A new process restores what the store holds: everything after a shutdown, or what
        the last write left after a crash."""
        if pick(data, YES_NO, "clean"):
            for turn_id in self.running():
                self.interrupted(turn_id)
            settled = [key for key, model in self.model.items() if model.state in IN_FLIGHT]
            for key in settled:
                model = self.model[key]
                if not model.event and model.attempts == 0:
                    del self.model[key]
                else:
                    model.state, model.next_at = FAILED, self.now
            assert self.ledger.shutdown(now=self.now) == len(settled)
            self.write(self.ledger.changes(now=self.now, wall=WALL + self.now))
        self.model, self.journal = copy.deepcopy(self.kept)
        acks, resume, dead = self.restored()
        self.ledger = self.new_ledger()
        restored = self.ledger.restore(self.store.state(), now=self.now, wall=WALL + self.now)
        assert sorted(str(plan.key) for plan in restored.acks) == acks
        assert [entry.turn_id for entry in restored.resume] == resume
        assert [tuple(e.message_id for e in events) for events, _ in restored.dead] == dead
        self.plans += restored.acks
        self.queue.clear()
        self.forgotten()
        for entry in restored.resume:  # they run again first
            self.queue_whole(entry.keys, entry.turn_id)

    def restored(self) -> tuple[list[str], list[str], list[tuple[str, ...]]]:
        """The model once restored: returns the acks owed, turns resumed, events given up."""
        for key, model in list(self.model.items()):
            if model.state in (CLAIMED, QUEUED) and not model.event and not model.attempts:
                del self.model[key]
            elif model.state in (CLAIMED, QUEUED):
                model.state = FAILED
        self.dead = len(self.keys_in(DEAD))
        resume: list[str] = []
        dead: list[tuple[str, ...]] = []
        for turn_id, entry in list(self.journal.items()):
            members = [self.model[key] for key in entry.keys if key in self.model]
            if len(members) < len(entry.keys) or not all(m.event for m in members):
                del self.journal[turn_id]
                for model in members:
                    model.turn = None
                continue
            if entry.state is TurnState.PINNED:
                continue
            if entry.state is TurnState.RUNNING:  # a crash: an attempt for each event
                for model in members:
                    model.attempts += 1
                gone = tuple(k for k in entry.keys if self.model[k].attempts >= MAX_ATTEMPTS)
                if gone or (not entry.keys and entry.attempt >= MAX_ATTEMPTS):
                    del self.journal[turn_id]
                    dead += [gone] if gone else []
                    self.dead += len(gone)
                    for key, model in zip(entry.keys, members, strict=True):
                        if key in gone:
                            model.settle(DEAD)
                        else:
                            model.state, model.turn, model.next_at = FAILED, None, None
                    continue
            entry.state = TurnState.INTERRUPTED
            for model in members:
                model.state = CLAIMED
            resume.append(turn_id)
        return sorted(k for k, m in self.model.items() if m.ack_pending), resume, dead

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert {got.key for got in self.ledger} == set(self.model)
        for got in self.ledger:
            m = self.model[got.key]
            facts = (got.state, got.attempts, got.turn_id, got.ack_pending, got.dispatch_ids)
            assert facts == (m.state, m.attempts, m.turn, m.ack_pending, m.ids), got.key
            assert (got.event is not None) is m.event
            assert got.state is not FAILED or got.next_attempt_at == m.next_at
        assert self.ledger.counts() == {s.value: len(self.keys_in(s)) for s in WorkState}
        assert self.ledger.dead_total == self.dead
        # Past its capacity the ledger forgets what is neither in flight nor journaled.
        assert len(self.ledger) <= self.bound

    @invariant()
    def journal_agrees(self) -> None:
        assert {e.turn_id: (e.keys, e.state, e.attempt) for e in self.ledger.journal} == {
            turn_id: (e.keys, e.state, e.attempt) for turn_id, e in self.journal.items()
        }
        for got in self.ledger:
            entry = self.ledger.turn(got.turn_id) if got.turn_id is not None else None
            assert got.turn_id is None or (entry is not None and got.key in entry.keys)
        for entry in self.ledger.journal:
            assert all(record(self.ledger, key).turn_id == entry.turn_id for key in entry.keys)
        running = {k for e in self.ledger.journal if e.state is TurnState.RUNNING for k in e.keys}
        assert running == {got.key for got in self.ledger if got.state is RUNNING}

    @invariant()
    def retries_and_sources(self) -> None:
        times = [m.next_at for m in self.model.values() if m.state is FAILED and m.event]
        due = [-math.inf if at is None else at for at in times]  # None: due at once
        assert self.ledger.next_retry_at() == min(due, default=None)
        for got in self.ledger:
            assert self.ledger.by_source(got.source_type, got.source_id) is got


# A failure takes Hypothesis minutes to shrink to a short sequence: it must not time out first.
test_ledger_state_machine = pytest.mark.timeout(600)(LedgerMachine.TestCase)


# --- a poison event fails alone (the hardening issue, item 5) ---------------------------------


def test_a_coalesced_turn_that_sent_nothing_is_split_in_halves_without_an_attempt() -> None:
    ledger = make_ledger(retry_base=10.0)
    for key in ("a", "b", "c"):
        queue(ledger, key)
    entry = ledger.start_turn(["a", "b", "c"], session_key="main")
    failure = ledger.turn_failed(entry.turn_id, "boom", now=5.0, sent=False)
    assert (failure.split, failure.retrying, failure.attempts, failure.dead) == (True, True, 0, ())
    assert ledger.turn(entry.turn_id) is None
    halves = [(e.keys, e.state) for e in ledger.journal]
    assert halves == [(("a",), TurnState.PINNED), (("b", "c"), TurnState.PINNED)]
    for key in ("a", "b", "c"):
        got = record(ledger, key)
        assert (got.state, got.attempts, got.next_attempt_at) == (FAILED, 0, 5.0)
    assert ledger.next_retry_at() == 5.0
    assert ledger.take_due(5.0) == [("a",), ("b", "c")]  # at once, each half whole, in order


def test_split_halves_shrink_to_the_poison_event_which_alone_counts_attempts() -> None:
    ledger = make_ledger(retry_base=10.0, max_attempts=2)
    for key in ("a", "poison", "c", "d"):
        queue(ledger, key)
    first = ledger.start_turn(["a", "poison", "c", "d"], session_key="main")
    assert ledger.turn_failed(first.turn_id, "boom", now=0.0, sent=False).split
    units = ledger.take_due(0.0)
    assert units == [("a", "poison"), ("c", "d")]
    for unit in units:
        for key in unit:
            ledger.queued(key)
    # "c", "d" succeed; "a", "poison" fail again and split once more
    ledger.turn_succeeded(ledger.start_turn(["c", "d"], session_key="main").turn_id)
    pair = ledger.start_turn(["a", "poison"], session_key="main")
    assert ledger.turn_failed(pair.turn_id, "boom", now=1.0, sent=False).split
    assert ledger.take_due(1.0) == [("a",), ("poison",)]
    ledger.queued("a")
    ledger.queued("poison")
    ledger.turn_succeeded(ledger.start_turn(["a"], session_key="main").turn_id)
    alone = ledger.start_turn(["poison"], session_key="main")
    failure = ledger.turn_failed(alone.turn_id, "boom", now=2.0, sent=False)
    assert (failure.split, failure.attempts) == (False, 1)  # its own failure counts
    assert [record(ledger, key).attempts for key in ("a", "c", "d")] == [0, 0, 0]
    assert [record(ledger, key).state for key in ("a", "c", "d")] == [DONE, DONE, DONE]


def test_a_coalesced_turn_that_replied_is_retried_whole_not_split() -> None:
    ledger = make_ledger(retry_base=10.0)
    queue(ledger, "a")
    queue(ledger, "b")
    entry = ledger.start_turn(["a", "b"], session_key="main")
    failure = ledger.turn_failed(entry.turn_id, "boom", now=0.0, sent=True)
    assert (failure.split, failure.attempts) == (False, 1)
    assert [(e.turn_id, e.keys) for e in ledger.journal] == [(entry.turn_id, ("a", "b"))]
