"""The ledger: one record per message or task version, the single owner of its state.

Where it came from (live, ``dispatch.new``, catch-up), where it is (claimed,
queued, running, done, failed, dead), its dispatch ids and its attempts. Dedupe,
acks (by source or by id), late dispatch rows, retries and dead-lettering all
read and write this one structure, so they cannot disagree (kombu's ``QoS``
plays the same role for unacknowledged deliveries).

The ledger is synchronous and does no I/O: every decision is made and recorded
in one step, with no ``await`` between a check and the state change it guards.
It is bounded: past its capacity it forgets the oldest finished records first,
and never a record whose work is in flight.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Final

import attrs

from ..events import EventOrigin, ParallEvent

__all__ = [
    "MAX_RETRY_DELAY",
    "AckPlan",
    "Claim",
    "Ledger",
    "Record",
    "Verdict",
    "WorkState",
]

MAX_RETRY_DELAY: Final = 600.0
"""Cap of the delay before a failed event is retried (10 minutes)."""


class WorkState(enum.StrEnum):
    """Where a message or task is in the gateway."""

    CLAIMED = "claimed"
    """Taken for processing (being fetched or normalised); nobody else dispatches it."""
    QUEUED = "queued"
    """Waiting in a lane's queue."""
    RUNNING = "running"
    """Its turn is running."""
    DONE = "done"
    """Its turn succeeded and its acks went out."""
    FAILED = "failed"
    """Its turn failed; it is retried once its delay has passed."""
    DEAD = "dead"
    """It failed ``max_attempts`` times and was given up on."""


ACTIVE: Final = frozenset({WorkState.CLAIMED, WorkState.QUEUED, WorkState.RUNNING})


class Verdict(enum.Enum):
    """What :meth:`Ledger.claim` found."""

    CLAIMED = "claimed"
    """The caller owns it now and must dispatch it (or :meth:`Ledger.release` it)."""
    ACTIVE = "active"
    """Already claimed, queued or running; a dispatch id given was attached."""
    DONE = "done"
    """Already handled; a dispatch id given must be acked now (a late row)."""
    DEAD = "dead"
    """Dead-lettered; a dispatch id given must be acked if dead letters are acked."""
    WAITING = "waiting"
    """Failed and waiting for its retry time; a dispatch id given was attached."""


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
    """The acks that settle a record: by source and/or by dispatch ids."""

    source: tuple[str, str] | None = None
    dispatch_ids: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.source is not None or bool(self.dispatch_ids)


class Ledger:
    """The state of every message and task the gateway has seen, bounded.

    Args:
        capacity: most records kept (finished ones are forgotten first).
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
        self._by_source: dict[tuple[str, str], str] = {}
        self._capacity = capacity
        self._max_attempts = max_attempts
        self._retry_base = retry_base
        self._ack_dead = ack_dead
        self._dead_total = 0

    # --- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records.values()))

    def get(self, key: str) -> Record | None:
        """The record of ``key``, if remembered."""
        return self._records.get(key)

    def by_source(self, source_type: str, source_id: str) -> Record | None:
        """The latest record of a dispatch source, if remembered."""
        key = self._by_source.get((source_type, source_id))
        return self._records.get(key) if key is not None else None

    def counts(self) -> dict[str, int]:
        """How many records are in each state."""
        counts = Counter(record.state.value for record in self._records.values())
        return {state.value: counts.get(state.value, 0) for state in WorkState}

    @property
    def dead_total(self) -> int:
        """Records dead-lettered since the ledger was made (even if since forgotten)."""
        return self._dead_total

    @property
    def ack_dead(self) -> bool:
        """Whether dead records' dispatch rows are acked."""
        return self._ack_dead

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
        """Take ``key`` for processing unless it is in flight, done, dead, or not yet due.

        A ``dispatch_id`` is remembered with the record whatever the verdict
        (for ``DONE``/``DEAD`` the caller acks it instead).
        """
        record = self._records.get(key)
        if record is None:
            record = Record(key=key, source_type=source_type, source_id=source_id, origin=origin)
            if dispatch_id:
                record.dispatch_ids.add(dispatch_id)
            self._insert(record)
            return Claim(Verdict.CLAIMED, record)
        self._records.move_to_end(key)
        if record.state in ACTIVE:
            if dispatch_id:
                record.dispatch_ids.add(dispatch_id)
            return Claim(Verdict.ACTIVE, record)
        if record.state is WorkState.DONE:
            return Claim(Verdict.DONE, record)
        if record.state is WorkState.DEAD:
            return Claim(Verdict.DEAD, record)
        # FAILED
        if dispatch_id:
            record.dispatch_ids.add(dispatch_id)
        if record.next_attempt_at is not None and now < record.next_attempt_at:
            return Claim(Verdict.WAITING, record)
        record.state = WorkState.CLAIMED
        record.origin = origin if record.origin is EventOrigin.LIVE else record.origin
        return Claim(Verdict.CLAIMED, record)

    def attach(self, record: Record, dispatch_id: str) -> None:
        """Remember a dispatch row of an in-flight or waiting record."""
        record.dispatch_ids.add(dispatch_id)

    def release(self, key: str) -> None:
        """The claimed work is dropped without a turn (filtered, or its fetch failed).

        A record that was never dispatched is forgotten (a later delivery may
        claim it again); one that was (it failed, or shutdown interrupted it)
        goes back to waiting.
        """
        record = self._records.get(key)
        if record is None or record.state is not WorkState.CLAIMED:
            return
        if record.attempts == 0 and record.event is None:
            self._forget(record)
        else:
            record.state = WorkState.FAILED

    # --- progress ----------------------------------------------------------------

    def queued(self, key: str, event: ParallEvent) -> None:
        """The event waits in a lane's queue."""
        record = self._require(key)
        record.state = WorkState.QUEUED
        record.event = event

    def running(self, key: str) -> None:
        """The event's turn started."""
        self._require(key).state = WorkState.RUNNING

    def succeeded(self, key: str) -> AckPlan:
        """The turn succeeded: the record is done; returns the acks to send.

        A live event is acked by source (which covers every row that exists);
        one found through dispatch rows is acked by their ids. When a newer version
        of the same source is known (a task assigned again), only the ids are
        acked, so the newer version's row stays pending until it ran.
        """
        record = self._require(key)
        record.state = WorkState.DONE
        record.event = None
        record.next_attempt_at = None
        return self._settle(record)

    def failed(self, key: str, error: str, *, now: float) -> bool:
        """The turn failed. Returns ``True`` when the record just went dead (the caller
        dead-letters it: error step, runtime hook, acks from :meth:`dead_plan`)."""
        record = self._require(key)
        record.attempts += 1
        record.last_error = error
        if record.attempts >= self._max_attempts:
            record.state = WorkState.DEAD
            record.next_attempt_at = None
            self._dead_total += 1
            return True
        record.state = WorkState.FAILED
        record.next_attempt_at = now + self.retry_delay(record.attempts)
        return False

    def interrupted(self, key: str, *, now: float) -> None:
        """The turn was cancelled by shutdown: not acked, and no attempt counted."""
        record = self._records.get(key)
        if record is None or record.state in (WorkState.DONE, WorkState.DEAD):
            return
        record.state = WorkState.FAILED
        record.next_attempt_at = now

    def dead_plan(self, key: str) -> AckPlan:
        """The acks that settle a dead record (empty when dead letters are not acked)."""
        record = self._require(key)
        record.event = None
        if not self._ack_dead:
            return AckPlan()
        return self._settle(record)

    def retry_delay(self, attempts: int) -> float:
        """Delay before retry number ``attempts``: the base, doubled per attempt, capped."""
        exponent = min(max(attempts - 1, 0), 30)
        return float(min(MAX_RETRY_DELAY, self._retry_base * (2**exponent)))

    def due(self, now: float) -> list[Record]:
        """Failed records whose retry time has come (oldest first), with their event."""
        return [
            record
            for record in self._records.values()
            if record.state is WorkState.FAILED
            and record.event is not None
            and (record.next_attempt_at is None or record.next_attempt_at <= now)
        ]

    def next_retry_at(self) -> float | None:
        """When the next failed record becomes due, if any."""
        times = [
            record.next_attempt_at
            for record in self._records.values()
            if record.state is WorkState.FAILED
            and record.event is not None
            and record.next_attempt_at is not None
        ]
        return min(times) if times else None

    # --- internals ---------------------------------------------------------------

    def _settle(self, record: Record) -> AckPlan:
        ids = tuple(sorted(record.dispatch_ids))
        record.dispatch_ids.clear()
        source = (record.source_type, record.source_id)
        if self._by_source.get(source, record.key) != record.key:
            # A newer version of this source (a task assigned again) is in the ledger: an
            # ack by source would ack its row too, before it ran. Only this one's ids.
            return AckPlan(dispatch_ids=ids)
        if record.origin is EventOrigin.LIVE or not ids:
            return AckPlan(source=source)
        return AckPlan(dispatch_ids=ids)

    def _require(self, key: str) -> Record:
        record = self._records.get(key)
        if record is None:
            raise KeyError(f"no ledger record for {key!r}")
        return record

    def _insert(self, record: Record) -> None:
        self._records[record.key] = record
        self._by_source[(record.source_type, record.source_id)] = record.key
        if len(self._records) > self._capacity:
            self._evict()

    def _forget(self, record: Record) -> None:
        self._records.pop(record.key, None)
        source = (record.source_type, record.source_id)
        if self._by_source.get(source) == record.key:
            del self._by_source[source]

    def _evict(self) -> None:
        """Forget the oldest finished records, then the oldest failed ones; never work in
        flight. Evicts a tenth of the capacity at once, so the scan is amortised."""
        target = self._capacity - self._capacity // 10
        for states in ((WorkState.DONE, WorkState.DEAD), (WorkState.FAILED,)):
            excess = len(self._records) - target
            if excess <= 0:
                return
            victims: list[Record] = []
            for record in self._records.values():
                if record.state in states:
                    victims.append(record)
                    if len(victims) >= excess:
                        break
            for record in victims:
                self._forget(record)
