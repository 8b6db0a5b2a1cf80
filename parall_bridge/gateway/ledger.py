"""The ledger: the one owner of every message's and task's state, and of the turn journal.

One :class:`Record` per message or task version: where it came from (live,
``dispatch.new``, catch-up), where it is (claimed, queued, running, done,
acked, failed, dead), its dispatch ids, its attempts and retry time. One
:class:`TurnEntry` per turn that started and has not completed (the journal):
its sources in order, its session, its attempt. Every transition happens here
and answers with what to do next as plain values (:class:`AckPlan`,
:class:`Failure`, the units to retry); lanes, sources and the writer hold keys
and act on those plans, and none keeps a copy of an event's state (kombu's
``QoS`` plays the same role for unacknowledged deliveries).

The ledger is synchronous and does no I/O: every decision is made and
recorded in one step, with no ``await`` between a check and the state change
it guards. It is bounded: past its capacity it forgets the oldest settled
records first, and never a record whose work is in flight or journaled.

Its transitions are what a :class:`~parall_bridge.StateStore` persists: each
mutation bumps :attr:`Ledger.version` and marks what changed, and
:meth:`Ledger.changes` turns that into a :class:`~parall_bridge.state.StateBatch`.
:meth:`Ledger.restore` rebuilds a ledger from what a store kept.
"""

from __future__ import annotations

import enum
import logging
import math
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import attrs

from .._retry import exponential_delay
from ..events import EventOrigin, ParallEvent, turn_id_of
from ..models import Message
from ..state._codec import decode_event, encode_event
from ..state.base import SourceRow, StateBatch, StoredState, TurnRow

__all__ = [
    "MAX_RETRY_DELAY",
    "AckPlan",
    "Claim",
    "Failure",
    "Ledger",
    "Record",
    "Restored",
    "TurnEntry",
    "TurnState",
    "Verdict",
    "WorkState",
]

_log = logging.getLogger("parall_bridge.gateway.ledger")

MAX_RETRY_DELAY: Final = 600.0
"""Cap of the delay before a failed event is retried (10 minutes)."""
CRASH_ERROR: Final = "the process stopped during this turn"
"""The error recorded on the events of a turn found interrupted by a crash at start."""


class WorkState(enum.StrEnum):
    """Where a message or task is in the gateway."""

    CLAIMED = "claimed"
    """Taken for processing (being fetched or normalised); nobody else dispatches it."""
    QUEUED = "queued"
    """Waiting in a lane's queue."""
    RUNNING = "running"
    """Its turn is running."""
    DONE = "done"
    """Settled (its turn succeeded, or it needs none); its acks are not confirmed yet."""
    ACKED = "acked"
    """Settled and acked on the platform."""
    FAILED = "failed"
    """Its turn failed (or was interrupted); it runs again once its retry time has come."""
    DEAD = "dead"
    """It failed ``max_attempts`` times and was given up on."""


IN_FLIGHT: Final = frozenset({WorkState.CLAIMED, WorkState.QUEUED, WorkState.RUNNING})
SETTLED: Final = frozenset({WorkState.DONE, WorkState.ACKED})


class Verdict(enum.Enum):
    """What :meth:`Ledger.claim` found."""

    CLAIMED = "claimed"
    """The caller owns it now and must dispatch it (or :meth:`Ledger.release` it)."""
    ACTIVE = "active"
    """Already claimed, queued or running; a dispatch id given was attached."""
    DONE = "done"
    """Already settled; a dispatch id given must be acked now (a late row)."""
    DEAD = "dead"
    """Dead-lettered; a dispatch id given must be acked if dead letters are acked."""
    WAITING = "waiting"
    """Failed and waiting for its retry time; a dispatch id given was attached."""


class TurnState(enum.StrEnum):
    """Where a journaled turn is."""

    RUNNING = "running"
    """It is running (found so at start: the process died during it)."""
    INTERRUPTED = "interrupted"
    """Shutdown cancelled it: it runs again first at the next start, no attempt counted."""
    PINNED = "pinned"
    """It failed after sending: it is retried with the same sources, so its replies keep
    their idempotency keys."""


@attrs.define(eq=False)
class Record:
    """The ledger's record of one message or task version."""

    key: str
    source_type: str
    source_id: str
    origin: EventOrigin
    state: WorkState = WorkState.CLAIMED
    event: ParallEvent | None = None
    dispatch_ids: set[str] = attrs.field(factory=set)
    attempts: int = 0
    next_attempt_at: float | None = None
    last_error: str | None = None
    turn_id: str | None = None
    """The journaled turn it belongs to (running, interrupted, or pinned)."""
    ack_pending: bool = False
    """Settled or dead, and its acks are not confirmed yet."""
    ack_queued: bool = False
    """Its acks were handed to the writer and have not ended yet (not kept in the store):
    such a record is never forgotten, or a catch-up listing its row meanwhile would run
    it again."""
    held: Message | None = None
    """A live delivery of it that arrived while its dispatch row was being fetched."""
    order: int = 0
    event_json: str | None = attrs.field(default=None, repr=False)
    """The event as stored (encoded once)."""


@attrs.define(eq=False)
class TurnEntry:
    """A journaled turn: started and not completed."""

    turn_id: str
    keys: tuple[str, ...]
    session_key: str
    prefix: str = ""
    attempt: int = 0
    state: TurnState = TurnState.RUNNING
    order: int = 0


@attrs.frozen
class Claim:
    """The answer of :meth:`Ledger.claim`."""

    verdict: Verdict
    record: Record | None = None

    @property
    def claimed(self) -> bool:
        """Whether the caller owns the work now."""
        return self.verdict is Verdict.CLAIMED


@attrs.frozen
class AckPlan:
    """Acks to send: by source and/or by dispatch ids.

    Attributes:
        key: the record these acks settle (``None`` for a row acked on its own).
        source: ``(source_type, source_id)`` to ack by source.
        dispatch_ids: rows to ack by id.
        version: the ledger version that must be durable before the acks go out.
    """

    key: str | None = None
    source: tuple[str, str] | None = None
    dispatch_ids: tuple[str, ...] = ()
    version: int = 0

    def __bool__(self) -> bool:
        return self.source is not None or bool(self.dispatch_ids)


@attrs.frozen
class Failure:
    """What a failed turn leads to (:meth:`Ledger.turn_failed`).

    Attributes:
        attempts: the highest attempt count among the turn's events.
        dead: the events that were given up on now.
        acks: the acks that settle them (when dead letters are acked).
        retrying: some of the turn's events wait for a retry.
        split: the turn's events were split in two halves, each retried at once as a
            turn of its own (no attempt counted).
    """

    attempts: int = 0
    dead: tuple[ParallEvent, ...] = ()
    acks: tuple[AckPlan, ...] = ()
    retrying: bool = False
    split: bool = False


@attrs.frozen
class Restored:
    """What a restart must do before anything new (:meth:`Ledger.restore`).

    Attributes:
        acks: settled sources whose acks were not confirmed: ack them, no turn.
        resume: journaled turns to run again first, oldest first; their records are
            claimed for the caller.
        dead: events given up on at start (their turn crashed the process
            ``max_attempts`` times), each group with the error.
    """

    acks: tuple[AckPlan, ...] = ()
    resume: tuple[TurnEntry, ...] = ()
    dead: tuple[tuple[tuple[ParallEvent, ...], str], ...] = ()


class Ledger:
    """The state of every message and task the gateway has seen, and its turn journal.

    Args:
        capacity: most records kept (settled ones are forgotten first).
        max_attempts: failed turns before a record goes dead.
        retry_base: delay before the first retry, doubled per attempt, capped
            at :data:`MAX_RETRY_DELAY`.
        ack_dead: whether dead records' dispatch rows are acked.
    """

    def __init__(
        self,
        *,
        capacity: int,
        max_attempts: int,
        retry_base: float,
        ack_dead: bool = True,
    ) -> None:
        if capacity < 1 or max_attempts < 1:
            raise ValueError("capacity and max_attempts must be >= 1")
        self._records: OrderedDict[str, Record] = OrderedDict()
        # Every remembered version of a source, oldest first (a task assigned again has
        # several): the last one is the source's latest.
        self._by_source: dict[tuple[str, str], dict[str, None]] = {}
        self._turns: dict[str, TurnEntry] = {}
        self._capacity = capacity
        self._max_attempts = max_attempts
        self._retry_base = retry_base
        self._ack_dead = ack_dead
        self._dead_total = 0
        self._order = 0
        self._version = 0
        self._dirty_records: set[str] = set()
        self._dirty_turns: set[str] = set()
        self.on_change: Callable[[], None] | None = None
        """Called after each transition (the persister's wake-up)."""

    # --- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records.values()))

    def get(self, key: str) -> Record | None:
        """The record of ``key``, if remembered."""
        return self._records.get(key)

    def event(self, key: str) -> ParallEvent:
        """The event of a record that has one (queued, running, or waiting to run again)."""
        event = self._require(key).event
        if event is None:
            raise KeyError(f"ledger record {key!r} holds no event")
        return event

    def by_source(self, source_type: str, source_id: str) -> Record | None:
        """The latest record of a dispatch source, if remembered."""
        versions = self._by_source.get((source_type, source_id))
        return self._records.get(next(reversed(versions))) if versions else None

    def turn(self, turn_id: str) -> TurnEntry | None:
        """The journal entry of a turn, if it is journaled."""
        return self._turns.get(turn_id)

    @property
    def journal(self) -> list[TurnEntry]:
        """The journaled turns, oldest first."""
        return sorted(self._turns.values(), key=lambda entry: entry.order)

    def counts(self) -> dict[str, int]:
        """How many records are in each state."""
        counts = Counter(record.state.value for record in self._records.values())
        return {state.value: counts.get(state.value, 0) for state in WorkState}

    @property
    def dead_total(self) -> int:
        """Records dead-lettered since the ledger was made (even if since forgotten): the
        one count of dead letters."""
        return self._dead_total

    @property
    def ack_dead(self) -> bool:
        """Whether dead records' dispatch rows are acked."""
        return self._ack_dead

    @property
    def max_attempts(self) -> int:
        """Failed turns before a record goes dead."""
        return self._max_attempts

    @property
    def version(self) -> int:
        """Bumped by every transition; a store is durable up to a version."""
        return self._version

    # --- claiming ----------------------------------------------------------------

    def claim(
        self,
        key: str,
        *,
        source_type: str,
        source_id: str,
        origin: EventOrigin,
        now: float,
        dispatch_id: str | None = None,
    ) -> Claim:
        """Take ``key`` for processing unless it is in flight, settled, dead, or not yet
        due (a record of a pinned turn is due only with its turn: :meth:`take_due`).

        A ``dispatch_id`` is attached to a record in flight or waiting; for a settled
        or dead one (``DONE``/``DEAD``) the caller acks it instead (:meth:`ack_row`).
        """
        record = self._records.get(key)
        if record is None:
            record = Record(key=key, source_type=source_type, source_id=source_id, origin=origin)
            if dispatch_id:
                record.dispatch_ids.add(dispatch_id)
            self._insert(record)
            self._changed(record)
            return Claim(Verdict.CLAIMED, record)
        self._refresh(record)
        if record.state in SETTLED:
            return Claim(Verdict.DONE, record)
        if record.state is WorkState.DEAD:
            return Claim(Verdict.DEAD, record)
        if dispatch_id and dispatch_id not in record.dispatch_ids:
            record.dispatch_ids.add(dispatch_id)
            self._changed(record)
        if record.state in IN_FLIGHT:
            return Claim(Verdict.ACTIVE, record)
        # FAILED
        if (record.next_attempt_at is not None and now < record.next_attempt_at) or (
            record.turn_id is not None
        ):
            return Claim(Verdict.WAITING, record)
        record.state = WorkState.CLAIMED
        record.origin = origin if record.origin is EventOrigin.LIVE else record.origin
        self._changed(record)
        return Claim(Verdict.CLAIMED, record)

    def hold(self, key: str, message: Message) -> bool:
        """Keep a live delivery of a record whose dispatch row is being fetched (claimed,
        no event yet), in case that fetch fails; returns whether it was kept."""
        record = self._records.get(key)
        if record is None or record.state is not WorkState.CLAIMED or record.event is not None:
            return False
        record.held = message
        return True

    def release(self, key: str) -> Message | None:
        """The claimed work is dropped without a turn (filtered, or its fetch failed).

        A record that never ran is forgotten (a later delivery may claim it again);
        one that did (it failed, or shutdown interrupted it) goes back to waiting, as
        does a version of a source with another version remembered (a task assigned
        again), so the older one's success never acks this one's row by source.
        Returns the live delivery held meanwhile (:meth:`hold`), if any: it was not
        dispatched. A no-op, returning ``None``, once the record is past claimed.
        """
        record = self._records.get(key)
        if record is None:
            return None
        held, record.held = record.held, None
        if record.state is not WorkState.CLAIMED:
            return None
        others = len(self._by_source.get((record.source_type, record.source_id), {})) > 1
        if record.attempts == 0 and record.event is None and not others:
            self._forget(record)
        else:
            record.state = WorkState.FAILED
            self._changed(record)
        return held

    def dismiss(
        self,
        key: str,
        *,
        source_type: str,
        source_id: str,
        origin: EventOrigin,
        dispatch_id: str | None = None,
    ) -> AckPlan:
        """Settle a source that needs no turn (deleted, sent by the agent, nothing to
        read): it is done, and the acks are returned.

        The caller owns the record (it claimed it) or the ledger does not know it.
        """
        record = self._taken(key, source_type, source_id, origin, dispatch_id, doing="dismiss")
        return self._settle(record, WorkState.DONE)

    def fetch_failed(
        self,
        key: str,
        error: str,
        *,
        source_type: str,
        source_id: str,
        origin: EventOrigin,
        now: float,
        dispatch_id: str | None = None,
    ) -> Failure:
        """A source could not be read for a reason that is not transient (too large, never
        decodes): it counts an attempt, as a failed turn does, and waits its retry time
        (its row is fetched again then, not on every pass), or goes dead at
        ``max_attempts`` (the returned acks settle it when dead letters are acked).

        The caller owns the record (it claimed it) or the ledger does not know it.
        """
        record = self._taken(
            key, source_type, source_id, origin, dispatch_id, doing="fail the fetch of"
        )
        record.attempts += 1
        record.last_error = error
        if record.attempts >= self._max_attempts:
            plan = self._dead(record)
            return Failure(attempts=record.attempts, acks=(plan,) if plan else ())
        record.state = WorkState.FAILED
        record.next_attempt_at = now + self.retry_delay(record.attempts)
        self._changed(record)
        return Failure(attempts=record.attempts, retrying=True)

    def ack_covers(self, key: str, dispatch_id: str) -> bool:
        """Whether the acks already planned for ``key`` (settled, acks owed) cover the
        row ``dispatch_id``: a catch-up that lists it again meanwhile sends nothing."""
        record = self._records.get(key)
        if record is None or record.state is not WorkState.DONE:
            return False
        plan = self._plan(record)
        return plan.source is not None or dispatch_id in plan.dispatch_ids

    def _taken(
        self,
        key: str,
        source_type: str,
        source_id: str,
        origin: EventOrigin,
        dispatch_id: str | None,
        *,
        doing: str,
    ) -> Record:
        """The record the caller owns (made if the ledger does not know it), with the
        row attached and the live delivery held meanwhile dropped; one queued or running
        is refused (``doing`` names the refused operation)."""
        record = self._records.get(key)
        if record is None:
            record = Record(key=key, source_type=source_type, source_id=source_id, origin=origin)
            self._insert(record)
        elif record.state in (WorkState.QUEUED, WorkState.RUNNING):
            raise RuntimeError(f"cannot {doing} {key!r}: it is {record.state}")
        if dispatch_id:
            record.dispatch_ids.add(dispatch_id)
        record.held = None
        return record

    def ack_row(self, dispatch_id: str) -> AckPlan:
        """The ack of one dispatch row that settles no record of its own (a late row of a
        settled or dead record, or a row whose source is gone)."""
        return AckPlan(dispatch_ids=(dispatch_id,), version=self._version)

    # --- progress ----------------------------------------------------------------

    def offer(self, key: str, event: ParallEvent) -> None:
        """The event of a claimed record, once built (its owner queues it next)."""
        record = self._require(key)
        if record.state is not WorkState.CLAIMED:
            raise RuntimeError(f"cannot offer {key!r}: it is {record.state}")
        if record.event is not event:
            record.event = event
            record.event_json = None
            self._changed(record)

    def queued(self, key: str) -> None:
        """The claimed record, which holds its event, waits in a lane's queue."""
        record = self._require(key)
        if record.state is not WorkState.CLAIMED or record.event is None:
            raise RuntimeError(f"cannot queue {key!r}: it is {record.state}, event {record.event}")
        record.state = WorkState.QUEUED
        self._changed(record)

    def start_turn(
        self,
        keys: Sequence[str],
        *,
        session_key: str,
        prefix: str = "",
        turn_id: str | None = None,
    ) -> TurnEntry:
        """A turn starts for the queued ``keys`` (in order): they are running, and the turn
        is journaled. Its id derives from the keys (random for a turn without any,
        unless ``turn_id`` is given: a journaled turn running again keeps its id)."""
        keys = tuple(keys)
        records = [self._require(key) for key in keys]
        if turn_id is None:
            turn_id = turn_id_of(keys) if keys else f"s{uuid.uuid4().hex[:24]}"
        for record in records:
            if record.state is not WorkState.QUEUED:
                raise RuntimeError(f"cannot run {record.key!r}: it is {record.state}")
            if record.turn_id is not None and record.turn_id != turn_id:
                raise RuntimeError(
                    f"cannot run {record.key!r}: it belongs to turn {record.turn_id}"
                )
        entry = self._turns.get(turn_id)
        if entry is None:
            self._order += 1
            entry = TurnEntry(
                turn_id=turn_id,
                keys=keys,
                session_key=session_key,
                prefix=prefix,
                order=self._order,
            )
            self._turns[turn_id] = entry
        elif entry.keys != keys:
            raise RuntimeError(f"turn {turn_id} runs again with other sources")
        entry.attempt += 1
        entry.state = TurnState.RUNNING
        entry.session_key = session_key
        self._turn_changed(entry)
        for record in records:
            record.state = WorkState.RUNNING
            record.turn_id = turn_id
            self._changed(record)
        return entry

    def turn_succeeded(self, turn_id: str) -> list[AckPlan]:
        """The turn succeeded: its records are done and it leaves the journal; returns the
        acks to send (each once the transition is durable).

        A live event is acked by source (which covers every row that exists); one
        found through dispatch rows is acked by their ids. When a newer version of
        the same source is known (a task assigned again), only the ids are acked, so
        the newer version's row stays pending until it ran.
        """
        entry = self._end_turn(turn_id)
        plans = []
        for key in entry.keys:
            record = self._records.get(key)
            if record is not None:
                record.turn_id = None
                plans.append(self._settle(record, WorkState.DONE))
        return [plan for plan in plans if plan]

    def turn_failed(self, turn_id: str, error: str, *, now: float, sent: bool) -> Failure:
        """The turn failed (it raised, or timed out): each event counts an attempt and waits
        for a retry, or goes dead at ``max_attempts``.

        A turn that ``sent`` something stays journaled, pinned: its events run again
        together, in the same order, so its replies keep their keys. So does a turn
        running again (a pinned retry, or one resumed after a crash): an earlier run
        may have sent. When some of its events go dead, the others are unpinned (the
        turn cannot run as it was).

        A coalesced turn that sent nothing counts no attempt: its events are split in
        two halves, each pinned as a turn of its own and due at once, so a poison event
        fails alone in the end (a single event's failure is its own) and never takes
        an innocent one's attempts with it.
        """
        entry = self._end_turn(turn_id, keep=True)
        records = [self._records[key] for key in entry.keys if key in self._records]
        if len(records) > 1 and not sent and entry.attempt == 1:
            return self._split(entry, records, error, now=now)
        dead: list[ParallEvent] = []
        acks: list[AckPlan] = []
        attempts = 0
        for record in records:
            record.attempts += 1
            record.last_error = error
            attempts = max(attempts, record.attempts)
            if record.attempts >= self._max_attempts:
                if record.event is not None:
                    dead.append(record.event)
                acks.append(self._dead(record))
            else:
                record.state = WorkState.FAILED
            self._changed(record)
        waiting = [record for record in records if record.state is WorkState.FAILED]
        pinned = (sent or entry.attempt > 1) and bool(waiting) and not dead
        retry_at = now + self.retry_delay(attempts)
        for record in waiting:
            record.next_attempt_at = retry_at if pinned else now + self.retry_delay(record.attempts)
            record.turn_id = turn_id if pinned else None
        if pinned:
            entry.state = TurnState.PINNED
            self._turn_changed(entry)
        else:
            self._drop_turn(entry)
        return Failure(
            attempts=attempts,
            dead=tuple(dead),
            acks=tuple(plan for plan in acks if plan),
            retrying=bool(waiting),
        )

    def _split(
        self, entry: TurnEntry, records: Sequence[Record], error: str, *, now: float
    ) -> Failure:
        self._drop_turn(entry)
        half = len(records) // 2
        for part in (records[:half], records[half:]):
            keys = tuple(record.key for record in part)
            self._order += 1
            piece = TurnEntry(
                turn_id=turn_id_of(keys),
                keys=keys,
                session_key=entry.session_key,
                state=TurnState.PINNED,
                order=self._order,
            )
            self._turns[piece.turn_id] = piece
            self._turn_changed(piece)
            for record in part:
                record.state = WorkState.FAILED
                record.last_error = error
                record.next_attempt_at = now
                record.turn_id = piece.turn_id
                self._changed(record)
        return Failure(
            attempts=max(record.attempts for record in records), retrying=True, split=True
        )

    def turn_interrupted(self, turn_id: str, *, now: float) -> None:
        """Shutdown cancelled the turn: no attempt is counted, nothing is acked, and it
        stays journaled (a durable store runs it again first at the next start)."""
        entry = self._end_turn(turn_id, keep=True)
        entry.state = TurnState.INTERRUPTED
        self._turn_changed(entry)
        for key in entry.keys:
            record = self._records.get(key)
            if record is not None and record.state is WorkState.RUNNING:
                record.state = WorkState.FAILED
                record.next_attempt_at = now
                self._changed(record)

    def acked(self, plan: AckPlan) -> None:
        """The acks of ``plan`` reached the platform: its record is acked."""
        record = self._records.get(plan.key) if plan.key is not None else None
        if record is None or not record.ack_pending:
            return
        record.ack_pending = record.ack_queued = False
        if plan.source is not None:
            record.dispatch_ids.clear()  # an ack by source covers every row
        else:
            record.dispatch_ids.difference_update(plan.dispatch_ids)
        if record.state is WorkState.DONE:
            record.state = WorkState.ACKED
        self._changed(record)

    def ack_sending(self, plan: AckPlan) -> None:
        """The writer took the acks of ``plan``: until they end (:meth:`acked`,
        :meth:`ack_failed`) its record is not forgotten, however full the ledger."""
        record = self._records.get(plan.key) if plan.key is not None else None
        if record is not None and record.ack_pending:
            record.ack_queued = True

    def ack_failed(self, plan: AckPlan) -> None:
        """The acks of ``plan`` did not go out (left to reconciliation or the next
        start): its record may be forgotten again if the ledger is full."""
        record = self._records.get(plan.key) if plan.key is not None else None
        if record is not None:
            record.ack_queued = False

    # --- retries -----------------------------------------------------------------

    def retry_delay(self, attempts: int) -> float:
        """Delay before retry number ``attempts``: the base, doubled per attempt, capped at
        :data:`MAX_RETRY_DELAY` (the retry module's exponential schedule)."""
        return exponential_delay(attempts, base=self._retry_base, maximum=MAX_RETRY_DELAY)

    def take_due(self, now: float) -> list[tuple[str, ...]]:
        """Claim every failed record whose retry time has come, oldest first: each unit is
        one record's key, or a pinned turn's keys in order (they run together)."""
        units: list[tuple[str, ...]] = []
        for record in list(self._records.values()):
            if not self._due(record, now):
                continue
            entry = self._turns.get(record.turn_id) if record.turn_id is not None else None
            members = [self._records.get(key) for key in entry.keys] if entry else []
            if record.turn_id is not None and (
                entry is None
                or not all(
                    member is not None and member.state is WorkState.FAILED and member.event
                    for member in members
                )
            ):
                # The turn cannot run as it was: its records run on their own, from now.
                self._unpin(record)
                entry = None
            if entry is None:
                record.state = WorkState.CLAIMED
                self._changed(record)
                units.append((record.key,))
                continue
            for member in members:
                assert member is not None
                member.state = WorkState.CLAIMED
                self._changed(member)
            units.append(entry.keys)
        return units

    def next_retry_at(self) -> float | None:
        """When the next failed record becomes due, if any (``-inf`` when one is due at
        once: it has no retry time, as a released record that never failed)."""
        times = [
            -math.inf if record.next_attempt_at is None else record.next_attempt_at
            for record in self._records.values()
            if record.state is WorkState.FAILED and record.event is not None
        ]
        return min(times) if times else None

    # --- shutdown and restart ----------------------------------------------------

    def shutdown(self, *, now: float) -> int:
        """Settle every record still in flight once the lanes are closed: a claim never
        dispatched is forgotten, a queued event waits to run again (due at once, no
        attempt counted), a turn still running is interrupted. Returns how many
        records it settled."""
        for entry in list(self._turns.values()):
            if entry.state is TurnState.RUNNING:
                self.turn_interrupted(entry.turn_id, now=now)
        settled = 0
        for record in list(self._records.values()):
            record.held = None
            if record.state not in IN_FLIGHT:
                continue
            settled += 1
            if record.event is None and record.attempts == 0:
                self._forget(record)
            else:
                record.state = WorkState.FAILED
                record.next_attempt_at = now
                self._changed(record)
        return settled

    def restore(self, state: StoredState, *, now: float, wall: float) -> Restored:
        """Rebuild the ledger from what a store kept of a previous run (a new ledger only).

        Settled records whose acks were not confirmed are returned to ack; a journaled
        turn found running (the process died during it) counts an attempt for each of
        its events, and goes dead at ``max_attempts``, else it is returned to run
        again first, as is one that shutdown interrupted; events claimed or queued
        but never run wait to run again at once.
        """
        if self._records or self._turns:
            raise RuntimeError("restore() needs an empty ledger")
        for row in state.sources:
            record = self._record_of(row, now=now, wall=wall)
            if record is not None:
                self._records[record.key] = record
                self._index(record)
                self._order = max(self._order, record.order)
                if record.state is WorkState.DEAD:
                    self._dead_total += 1
        resume: list[TurnEntry] = []
        dead: list[tuple[tuple[ParallEvent, ...], str]] = []
        for turn in state.turns:
            entry = TurnEntry(
                turn_id=turn.turn_id,
                keys=tuple(turn.keys),
                session_key=turn.session_key,
                prefix=turn.prefix,
                attempt=turn.attempt,
                state=_turn_state(turn.state),
                order=turn.order,
            )
            self._order = max(self._order, entry.order)
            self._turns[entry.turn_id] = entry
            records = [self._records.get(key) for key in entry.keys]
            if any(record is None or record.event is None for record in records):
                _log.warning("journaled turn %s lost its events: dropped", entry.turn_id)
                self._drop_turn(entry)
                for record in records:
                    if record is not None:
                        self._unpin(record)
                continue
            members = [record for record in records if record is not None]
            if entry.state is TurnState.PINNED:
                for record in members:
                    record.state = WorkState.FAILED
                    record.turn_id = entry.turn_id
                continue
            if entry.state is TurnState.RUNNING:
                went_dead = self._crashed(entry, members)
                if went_dead:
                    dead.append(went_dead)
                    continue
                if not entry.keys and entry.attempt >= self._max_attempts:
                    _log.warning(
                        "turn %s crashed the process %d times: dropped",
                        entry.turn_id,
                        entry.attempt,
                    )
                    self._drop_turn(entry)
                    continue
            # To run again first; a crash's attempt is counted now, not at a later start.
            entry.state = TurnState.INTERRUPTED
            for record in members:
                record.state = WorkState.CLAIMED
                record.turn_id = entry.turn_id
            resume.append(entry)
        for record in self._records.values():
            if record.state is WorkState.RUNNING or (
                record.turn_id is not None and record.turn_id not in self._turns
            ):
                # Running without a journaled turn (cannot happen when a batch is one
                # transaction): it waits to run again.
                record.turn_id = None
                record.state = WorkState.FAILED
                record.next_attempt_at = now
        acks = [
            self._plan(record)
            for record in self._records.values()
            if record.ack_pending and (record.state is not WorkState.DEAD or self._ack_dead)
        ]
        while len(self._records) > self._capacity and self._evict():
            pass
        # Written back whole at the first flush: rows changed or dropped here included.
        self._dirty_records = {row.key for row in state.sources} | set(self._records)
        self._dirty_turns = {turn.turn_id for turn in state.turns} | set(self._turns)
        self._version += 1
        return Restored(
            acks=tuple(plan for plan in acks if plan), resume=tuple(resume), dead=tuple(dead)
        )

    # --- persistence -------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """Whether something changed since the last :meth:`changes`."""
        return bool(self._dirty_records or self._dirty_turns)

    def changes(self, *, now: float, wall: float) -> StateBatch:
        """What changed since the last call, as rows for a store (``now`` is the clock the
        ledger is given, ``wall`` the same instant in seconds since the epoch)."""
        sources: list[SourceRow] = []
        deleted: list[str] = []
        for key in self._dirty_records:
            record = self._records.get(key)
            if record is None:
                deleted.append(key)
            else:
                sources.append(self._row(record, now=now, wall=wall))
        turns: list[TurnRow] = []
        deleted_turns: list[str] = []
        for turn_id in self._dirty_turns:
            entry = self._turns.get(turn_id)
            if entry is None:
                deleted_turns.append(turn_id)
            else:
                turns.append(
                    TurnRow(
                        turn_id=entry.turn_id,
                        keys=entry.keys,
                        session_key=entry.session_key,
                        prefix=entry.prefix,
                        attempt=entry.attempt,
                        state=entry.state.value,
                        order=entry.order,
                    )
                )
        self._dirty_records = set()
        self._dirty_turns = set()
        return StateBatch(
            sources=tuple(sources),
            deleted_sources=tuple(deleted),
            turns=tuple(turns),
            deleted_turns=tuple(deleted_turns),
        )

    def remark(self, batch: StateBatch) -> None:
        """A batch from :meth:`changes` was not written: its rows are marked again (and
        written as the ledger then holds them)."""
        self._dirty_records.update(row.key for row in batch.sources)
        self._dirty_records.update(batch.deleted_sources)
        self._dirty_turns.update(row.turn_id for row in batch.turns)
        self._dirty_turns.update(batch.deleted_turns)

    # --- internals ---------------------------------------------------------------

    def _changed(self, record: Record) -> None:
        self._version += 1
        self._dirty_records.add(record.key)
        if self.on_change is not None:
            self.on_change()

    def _turn_changed(self, entry: TurnEntry) -> None:
        self._version += 1
        self._dirty_turns.add(entry.turn_id)
        if self.on_change is not None:
            self.on_change()

    def _refresh(self, record: Record) -> None:
        """A claim makes a record recent again (evicted last)."""
        self._records.move_to_end(record.key)
        self._order += 1
        record.order = self._order

    def _due(self, record: Record, now: float) -> bool:
        return (
            record.state is WorkState.FAILED
            and record.event is not None
            and (record.next_attempt_at is None or record.next_attempt_at <= now)
        )

    def _end_turn(self, turn_id: str, *, keep: bool = False) -> TurnEntry:
        entry = self._turns.get(turn_id)
        if entry is None or entry.state is not TurnState.RUNNING:
            raise RuntimeError(f"turn {turn_id} is not running")
        if not keep:
            self._drop_turn(entry)
        return entry

    def _drop_turn(self, entry: TurnEntry) -> None:
        self._turns.pop(entry.turn_id, None)
        self._turn_changed(entry)
        for key in entry.keys:
            record = self._records.get(key)
            if record is not None and record.turn_id == entry.turn_id:
                record.turn_id = None
                self._changed(record)

    def _unpin(self, record: Record) -> None:
        turn_id, record.turn_id = record.turn_id, None
        self._changed(record)
        entry = self._turns.get(turn_id) if turn_id is not None else None
        if entry is not None:
            self._drop_turn(entry)

    def _crashed(
        self, entry: TurnEntry, records: Sequence[Record]
    ) -> tuple[tuple[ParallEvent, ...], str] | None:
        """A turn found running at start: each event counts an attempt. Returns the events
        given up on (the others run again on their own) when some reach the limit."""
        dead: list[ParallEvent] = []
        for record in records:
            record.attempts += 1
            record.last_error = CRASH_ERROR
            if record.attempts >= self._max_attempts and record.event is not None:
                dead.append(record.event)
        if not dead:
            return None
        self._drop_turn(entry)
        for record in records:
            if record.attempts >= self._max_attempts:
                self._dead(record)
            else:
                record.state = WorkState.FAILED
                record.next_attempt_at = None
        return tuple(dead), CRASH_ERROR

    def _dead(self, record: Record) -> AckPlan:
        self._dead_total += 1
        if not self._ack_dead:
            record.state = WorkState.DEAD
            record.event = record.event_json = None
            record.next_attempt_at = None
            record.turn_id = None
            self._changed(record)
            return AckPlan()
        return self._settle(record, WorkState.DEAD)

    def _settle(self, record: Record, state: WorkState) -> AckPlan:
        record.state = state
        record.event = record.event_json = None
        record.next_attempt_at = None
        record.turn_id = None
        plan = self._plan(record)
        # Nothing to ack (an older task version whose newer one keeps the source): owed
        # nothing; a row of it found later is acked by id (a late row).
        record.ack_pending = bool(plan)
        if not plan and state is WorkState.DONE:
            record.state = WorkState.ACKED
        self._changed(record)
        # The acks wait until this very transition is durable.
        return attrs.evolve(plan, version=self._version)

    def _plan(self, record: Record) -> AckPlan:
        ids = tuple(sorted(record.dispatch_ids))
        source = (record.source_type, record.source_id)
        versions = self._by_source.get(source, {})
        if versions and next(reversed(versions)) != record.key:
            # A newer version of this source (a task assigned again) is in the ledger: an
            # ack by source would ack its row too, before it ran. Only this one's ids.
            return AckPlan(record.key, dispatch_ids=ids, version=self._version)
        if record.origin is EventOrigin.LIVE or not ids:
            return AckPlan(record.key, source=source, version=self._version)
        return AckPlan(record.key, dispatch_ids=ids, version=self._version)

    def _require(self, key: str) -> Record:
        record = self._records.get(key)
        if record is None:
            raise KeyError(f"no ledger record for {key!r}")
        return record

    def _insert(self, record: Record) -> None:
        self._order += 1
        record.order = self._order
        self._records[record.key] = record
        self._index(record)
        if len(self._records) > self._capacity:
            self._evict()

    def _forget(self, record: Record) -> None:
        self._records.pop(record.key, None)
        self._changed(record)
        source = (record.source_type, record.source_id)
        versions = self._by_source.get(source)
        if versions is not None:
            versions.pop(record.key, None)
            if not versions:
                del self._by_source[source]

    def _index(self, record: Record) -> None:
        self._by_source.setdefault((record.source_type, record.source_id), {})[record.key] = None

    def _evict(self) -> bool:
        """Forget the oldest settled records (acked ones first, then those whose acks are
        owed and not on their way), then the oldest failed ones; never work in flight, a
        record whose acks the writer is sending, nor a journaled turn's.
        Evicts a tenth of the capacity at once, so the scan is amortised. Returns whether
        anything was forgotten."""
        target = self._capacity - self._capacity // 10
        forgot = False
        for evictable in (self._settled, self._owed, self._waiting):
            excess = len(self._records) - target
            if excess <= 0:
                break
            victims: list[Record] = []
            for record in self._records.values():
                if evictable(record):
                    victims.append(record)
                    if len(victims) >= excess:
                        break
            for record in victims:
                self._forget(record)
                forgot = True
        return forgot

    @staticmethod
    def _settled(record: Record) -> bool:
        return not record.ack_pending and record.state in (WorkState.ACKED, WorkState.DEAD)

    @staticmethod
    def _owed(record: Record) -> bool:
        return record.state in (WorkState.DONE, WorkState.DEAD) and not record.ack_queued

    @staticmethod
    def _waiting(record: Record) -> bool:
        return record.state is WorkState.FAILED and record.turn_id is None

    def _row(self, record: Record, *, now: float, wall: float) -> SourceRow:
        if record.event is not None and record.event_json is None:
            record.event_json = encode_event(record.event)
        next_at = record.next_attempt_at
        return SourceRow(
            key=record.key,
            source_type=record.source_type,
            source_id=record.source_id,
            origin=record.origin.value,
            state=record.state.value,
            attempts=record.attempts,
            next_attempt_at=None if next_at is None else wall + (next_at - now),
            last_error=record.last_error,
            dispatch_ids=tuple(sorted(record.dispatch_ids)),
            ack_pending=record.ack_pending,
            turn_id=record.turn_id,
            event=record.event_json if record.event is not None else None,
            order=record.order,
        )

    def _record_of(self, row: SourceRow, *, now: float, wall: float) -> Record | None:
        try:
            state = WorkState(row.state)
            origin = EventOrigin(row.origin)
        except ValueError:
            _log.warning("stored record %s has an unknown state or origin: dropped", row.key)
            return None
        event = None
        if row.event is not None:
            try:
                event = decode_event(row.event)
            except Exception:
                _log.warning("stored event of %s does not decode: dropped", row.key)
                return None
        if state in (WorkState.CLAIMED, WorkState.QUEUED):
            # Taken by the previous run, never run: it waits to run again at once (or is
            # forgotten when it was still being fetched: its row brings it back).
            if event is None and row.attempts == 0:
                return None
            state = WorkState.FAILED
        next_at = row.next_attempt_at
        return Record(
            key=row.key,
            source_type=row.source_type,
            source_id=row.source_id,
            origin=origin,
            state=state,
            event=event,
            dispatch_ids=set(row.dispatch_ids),
            attempts=row.attempts,
            next_attempt_at=None if next_at is None else now + (next_at - wall),
            last_error=row.last_error,
            turn_id=row.turn_id,
            ack_pending=row.ack_pending,
            order=row.order,
            event_json=row.event,
        )


def _turn_state(value: str) -> TurnState:
    """A stored turn state; an unknown one is taken as running (the safe reading: the
    turn runs again, and counts an attempt)."""
    try:
        return TurnState(value)
    except ValueError:
        return TurnState.RUNNING
