"""The lanes' board and the ledger together: whatever happens (arrivals, routing to main or
forks, coalesced turns, successes, failures, pinned retries, shutdown), the ledger's
state and the lanes' contents never disagree (DESIGN.md section 8, "One owner")."""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

import attrs
import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from parall_bridge.events import EventOrigin, ParallEvent
from parall_bridge.gateway.lanes import Board, Lane
from parall_bridge.gateway.ledger import Ledger, TurnEntry, TurnState, WorkState
from parall_bridge.routing import DefaultRoutingStrategy, Route
from parall_bridge.runtime import SessionRef

KEYS = [f"msg_{i}" for i in range(10)]
CHATS = ["cht_a", "cht_b", "cht_c"]
MAX_ATTEMPTS = 3
WORKER: Any = object()
"""Stands for a lane's worker task: the board only asks whether there is one."""


def event(key: str, chat: str) -> ParallEvent:
    return ParallEvent.message(
        chat_id=chat, message_id=key, sender_id="usr_ada", sender_name="Ada", text=key
    )


def new_board(ledger: Ledger, max_forks: int = 2) -> Board:
    return Board(ledger, DefaultRoutingStrategy(max_forks), SessionRef("main"), max_forks)


@attrs.define
class Running:
    lane: Lane
    entry: TurnEntry
    target: str


@settings(max_examples=60, stateful_step_count=60, deadline=None)
class BoardMachine(RuleBasedStateMachine):
    """Random traffic through a ledger and a board, with the lanes' workers played by hand
    the way :class:`~parall_bridge.gateway.lanes.Lanes` plays them."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(capacity=8, max_attempts=MAX_ATTEMPTS, retry_base=5.0)
        self.board = new_board(self.ledger)
        self.running: dict[int, Running] = {}
        self.chat_of: dict[str, str] = {}
        self.now = 0.0
        self.closed = False

    # --- what Lanes does ----------------------------------------------------------------

    def place(self, keys: tuple[str, ...]) -> None:
        route, lane = self.board.place(keys)
        if route is Route.NEW_FORK or (lane is self.board.main and lane.worker is None):
            lane.worker = WORKER

    def idle_lanes_with_work(self) -> list[Lane]:
        return [
            lane
            for lane in self.board.lanes
            if lane.worker is not None and id(lane) not in self.running and lane.queue
        ]

    def lane_done(self, lane: Lane) -> None:
        """A worker whose queue is empty stops (a fork is released)."""
        if lane.queue:
            return
        lane.worker = None
        if lane.is_fork:
            del self.board.forks[lane.target or ""]
        else:
            lane.target = None

    # --- rules --------------------------------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(key=st.sampled_from(KEYS), chat=st.sampled_from(CHATS))
    def arrive(self, key: str, chat: str) -> None:
        chat = self.chat_of.setdefault(key, chat)
        claim = self.ledger.claim(
            key, source_type="message", source_id=key, origin=EventOrigin.LIVE, now=self.now
        )
        if not claim.claimed:
            return
        record = claim.record
        assert record is not None
        if record.event is None:
            self.ledger.offer(key, event(key, chat))
        self.place((key,))

    @precondition(lambda self: bool(self.idle_lanes_with_work()))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        lane = data.draw(st.sampled_from(self.idle_lanes_with_work()))
        keys = self.board.take_batch(lane)
        assert keys
        targets = {self.board.target_of(key) for key in keys}
        assert len(targets) == 1, "a turn is about one target"
        target = targets.pop()
        record = self.ledger.get(keys[0])
        journaled = self.ledger.turn(record.turn_id) if record and record.turn_id else None
        entry = self.ledger.start_turn(
            keys,
            session_key=lane.session.key,
            turn_id=journaled.turn_id if journaled else None,
        )
        if not lane.is_fork:
            lane.target = target
        self.running[id(lane)] = Running(lane, entry, target)

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "fail", "fail_sent", "interrupt"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        run = data.draw(st.sampled_from(list(self.running.values())))  # in start order
        del self.running[id(run.lane)]
        turn_id = run.entry.turn_id
        if outcome == "ok":
            for plan in self.ledger.turn_succeeded(turn_id):
                if data.draw(st.booleans()):
                    self.ledger.acked(plan)
        elif outcome == "interrupt":
            self.ledger.turn_interrupted(turn_id, now=self.now)
        else:
            self.ledger.turn_failed(turn_id, "boom", now=self.now, sent=outcome == "fail_sent")
        self.lane_done(run.lane)

    @rule(seconds=st.sampled_from([1.0, 5.0, 20.0, 100.0]))
    def retry(self, seconds: float) -> None:
        self.now += seconds
        if self.closed:
            assert not self.running
            return
        for unit in self.ledger.take_due(self.now):
            self.place(unit)

    @precondition(lambda self: not self.closed)
    @rule()
    def shutdown(self) -> None:
        for run in self.running.values():
            self.ledger.turn_interrupted(run.entry.turn_id, now=self.now)
        self.running.clear()
        self.board.clear()
        for lane in self.board.lanes:
            lane.worker = None
        self.ledger.shutdown(now=self.now)
        self.closed = True

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def queues_are_the_queued_records(self) -> None:
        queued = [key for lane in self.board.lanes for key in lane.queue]
        assert len(queued) == len(set(queued)), "a key queued twice"
        in_ledger = {r.key for r in self.ledger if r.state is WorkState.QUEUED}
        assert set(queued) == in_ledger

    @invariant()
    def mains_target_count_is_its_queue(self) -> None:
        counted = Counter(self.board.target_of(key) for key in self.board.main.queue)
        assert self.board.main_targets() == counted

    @invariant()
    def running_records_are_the_running_turns(self) -> None:
        running = {key for run in self.running.values() for key in run.entry.keys}
        in_ledger = {r.key for r in self.ledger if r.state is WorkState.RUNNING}
        assert running == in_ledger
        journal = {e.turn_id for e in self.ledger.journal if e.state is TurnState.RUNNING}
        assert journal == {run.entry.turn_id for run in self.running.values()}

    @invariant()
    def nothing_is_claimed_between_steps(self) -> None:
        # Every claim is placed (or refused) in the same step: none is left in between.
        assert not [r.key for r in self.ledger if r.state is WorkState.CLAIMED]

    @invariant()
    def one_turn_per_target(self) -> None:
        targets = [run.target for run in self.running.values()]
        assert len(targets) == len(set(targets))

    @invariant()
    def a_target_lives_on_one_lane(self) -> None:
        for target, fork in self.board.forks.items():
            assert fork.target == target
            assert all(self.board.target_of(key) == target for key in fork.queue)
            assert target not in {self.board.target_of(key) for key in self.board.main.queue}
            main_run = self.running.get(id(self.board.main))
            assert main_run is None or main_run.target != target

    @invariant()
    def journaled_records_point_at_their_turn(self) -> None:
        for record in self.ledger:
            if record.turn_id is not None:
                journaled = self.ledger.turn(record.turn_id)
                assert journaled is not None
                assert record.key in journaled.keys
        for entry in self.ledger.journal:
            for key in entry.keys:
                member = self.ledger.get(key)
                assert member is not None
                assert member.turn_id == entry.turn_id

    @invariant()
    def closed_means_nothing_in_flight(self) -> None:
        if self.closed:
            in_flight = {WorkState.CLAIMED, WorkState.QUEUED, WorkState.RUNNING}
            assert not [r.key for r in self.ledger if r.state in in_flight]
            assert all(e.state is not TurnState.RUNNING for e in self.ledger.journal)


test_board_state_machine = BoardMachine.TestCase


def test_a_pinned_turn_is_taken_whole_and_newer_events_of_its_chat_wait() -> None:
    """A failed turn that sent a reply runs again with exactly its sources, in order; an
    event of the same chat that came meanwhile is not coalesced into it."""
    ledger = Ledger(capacity=20, max_attempts=3, retry_base=1.0)
    board = new_board(ledger, max_forks=0)
    for key in ("msg_1", "msg_2"):
        ledger.claim(key, source_type="message", source_id=key, origin=EventOrigin.LIVE, now=0)
        ledger.offer(key, event(key, "cht_a"))
        board.place((key,))
        board.main.worker = WORKER  # the main worker starts with the first
    first = board.take_batch(board.main)
    assert first == ["msg_1"]  # the lane's opening event runs alone
    ledger.turn_succeeded(ledger.start_turn(first, session_key="main").turn_id)
    second = board.take_batch(board.main)
    entry = ledger.start_turn(second, session_key="main")
    ledger.turn_failed(entry.turn_id, "boom", now=0.0, sent=True)
    ledger.claim("msg_3", source_type="message", source_id="msg_3", origin=EventOrigin.LIVE, now=0)
    ledger.offer("msg_3", event("msg_3", "cht_a"))
    board.place(("msg_3",))
    (unit,) = ledger.take_due(10.0)
    assert unit == ("msg_2",)
    board.place(unit)
    assert list(board.main.queue) == ["msg_3", "msg_2"]
    assert board.take_batch(board.main) == ["msg_3"]  # the pinned key is not swept in
    assert board.take_batch(board.main) == ["msg_2"]
    assert cast(Any, ledger.turn(entry.turn_id)).keys == ("msg_2",)
