"""Writes to the platform off the critical path (DESIGN.md section 6, items 5 and 7).

What a turn records (the session's status, steps, mark-received, acks) is queued
without blocking and written by a bounded pool of workers
(``write_concurrency``), so the writer keeps up with turns instead of falling
behind one request at a time:

- **Status changes coalesce.** Only the latest status asked for is written, and
  only if it differs from the one the platform has: a turn's ``idle`` followed by
  the next turn's ``active`` writes nothing. ``completed`` (shutdown) is written
  once every step before it was.
- **Steps keep their order within a stream** (a lane session and its chat or
  task: the turns' steps of one conversation), one in flight per stream;
  different streams write concurrently.
- **Acks come first**, then mark-received, then steps. Each ack waits until the
  transition that planned it is durable in the state store, then goes out, and
  its success is reported back to the ledger (``acked``). A mark-received still
  waiting when its event's ack is planned is dropped: "working on it" says
  nothing once the work is done (counted in :attr:`WriterStats.marks_skipped`).
- **Everything is bounded.** Past ``queue_limit`` queued steps, or
  mark-received calls, new ones are shed: counted (:attr:`WriterStats.shed`,
  ``GatewayStats.writes_shed``) and logged with the count, never silently. Acks
  are never shed (they are small, and the event would run again without them);
  status changes take one slot.

At shutdown everything is flushed within a timeout; what is still unwritten is
counted (:attr:`WriterStats.abandoned`) and logged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import attrs

from .._tasks import TaskSet
from ..client import ParallClient
from ..errors import ParallError
from ..models import AgentSessionStatus, AgentStep
from .ledger import AckPlan, Ledger

__all__ = ["QUEUE_LIMIT", "WRITE_CONCURRENCY", "PlatformWriter", "WriterStats"]

_log = logging.getLogger("parall_bridge.gateway.writer")

QUEUE_LIMIT: Final = 10_000
"""Most steps (and, apart, mark-received calls) waiting by default; past it new ones are
shed (counted and logged), so what is written of a stream stays an ordered prefix."""
WRITE_CONCURRENCY: Final = 8
"""Writes in flight at once by default (``GatewayConfig.write_concurrency``)."""
SHED_LOG_INTERVAL: Final = 10.0
"""Seconds between two WARNINGs about shed writes (each gives the running count)."""

_Job = Callable[[], Coroutine[Any, Any, None]]


@attrs.define
class WriterStats:
    """Counters of the platform writer.

    Attributes:
        steps_written, steps_failed: step requests (a failed status write counts in
            ``steps_failed`` too).
        statuses_written: session status changes written.
        statuses_coalesced: status changes never written because a later one
            replaced them (or they matched what the platform had).
        acks_sent, acks_failed: ack requests.
        marks_sent: mark-received requests.
        marks_skipped: mark-received calls dropped because the event's ack was planned
            before they went out.
        shed: steps and mark-received calls dropped because their queue was full.
        abandoned: writes still unwritten when the shutdown flush timed out.
        backlog_max: the most writes ever waiting at once.
    """

    steps_written: int = 0
    steps_failed: int = 0
    statuses_written: int = 0
    statuses_coalesced: int = 0
    acks_sent: int = 0
    acks_failed: int = 0
    marks_sent: int = 0
    marks_skipped: int = 0
    shed: int = 0
    abandoned: int = 0
    backlog_max: int = 0

    @property
    def dropped(self) -> int:
        """Former name of :attr:`shed`."""
        return self.shed


async def _no_wait(version: int) -> None:
    return None


class PlatformWriter:
    """The step/status writer and the acks of one gateway.

    Args:
        client: the REST client.
        org_id: the organisation.
        agent_id: the agent's user id.
        ledger: the ledger whose ack plans it sends (told when they went out).
        durable: waits until the ledger is durable up to a version (the state
            store's persister); by default nothing is waited for.
        queue_limit: most steps, and apart most mark-received calls, waiting to be
            written (:data:`QUEUE_LIMIT`).
        concurrency: most writes in flight at once (:data:`WRITE_CONCURRENCY`).
    """

    def __init__(
        self,
        client: ParallClient,
        org_id: str,
        agent_id: str,
        *,
        ledger: Ledger,
        durable: Callable[[int], Awaitable[None]] = _no_wait,
        queue_limit: int = QUEUE_LIMIT,
        concurrency: int = WRITE_CONCURRENCY,
    ) -> None:
        if queue_limit < 1 or concurrency < 1:
            raise ValueError("queue_limit and concurrency must be at least 1")
        self._client = client
        self._org_id = org_id
        self._agent_id = agent_id
        self._ledger = ledger
        self._durable = durable
        self._queue_limit = queue_limit
        self._concurrency = concurrency
        self._session_id: str | None = None
        # Steps: a FIFO per stream; streams with a step to write and none in flight.
        self._streams: dict[str, collections.deque[AgentStep]] = {}
        self._ready: collections.deque[str] = collections.deque()
        self._busy_streams = 0
        self._steps_queued = 0
        self._acks: collections.deque[AckPlan] = collections.deque()
        # Mark-received calls by the ledger key of their event, oldest first.
        self._marks: dict[str, tuple[str, str]] = {}
        # Status: what was asked for last, what the platform has, a write in flight.
        self._status_wanted: AgentSessionStatus | None = None
        self._status_written: AgentSessionStatus | None = None
        self._status_busy = False
        self._in_flight = 0
        self._workers = 0
        self._pool = TaskSet(_log)
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._shed_logged_at: float | None = None
        self._shed_logged = 0
        self.stats = WriterStats()

    def start(self, session_id: str) -> None:
        """Start writing into the agent session ``session_id``."""
        self._session_id = session_id
        self._kick()

    @property
    def session_id(self) -> str | None:
        """The agent session written to."""
        return self._session_id

    @property
    def pending(self) -> int:
        """Writes waiting or in flight (steps, acks, mark-received, a status change)."""
        status = self._status_wanted is not None and self._status_wanted != self._status_written
        return (
            self._steps_queued + len(self._acks) + len(self._marks) + self._in_flight + int(status)
        )

    # --- enqueueing (synchronous: never blocks a turn) --------------------------------

    def step(self, step: AgentStep, stream: str = "") -> None:
        """Record a step, written after the steps recorded before it on ``stream`` (a lane
        session and its chat or task); steps of different streams are written
        concurrently."""
        if self._steps_queued >= self._queue_limit:
            self._shed(f"a {step.step_type} step")
            return
        queue = self._streams.get(stream)
        if queue is None:
            queue = self._streams[stream] = collections.deque()
            self._ready.append(stream)  # new: nothing of it in flight
        queue.append(step)
        self._steps_queued += 1
        self._queued()

    def status(self, status: AgentSessionStatus) -> None:
        """Ask for the agent session's status to be ``status``: only the latest status asked
        for is written, once (``completed`` after every step recorded before it)."""
        if self._status_wanted is not None and self._status_wanted != self._status_written:
            self.stats.statuses_coalesced += 1  # replaced before it was written
        self._status_wanted = status
        if status == self._status_written and not self._status_busy:
            self.stats.statuses_coalesced += 1  # what the platform has already
            return
        self._queued()

    def ack(self, plan: AckPlan) -> None:
        """Send the acks of ``plan`` (before any step), once the ledger is durable up to
        the plan's version; the ledger is told when they went out. A mark-received of
        the same event still waiting is dropped."""
        if plan.key is not None and self._marks.pop(plan.key, None) is not None:
            self.stats.marks_skipped += 1
        if plan:
            self._ledger.ack_sending(plan)
            self._acks.append(plan)
            self._queued()

    def mark_received(self, source_type: str, source_id: str, key: str | None = None) -> None:
        """Tell the platform work on this source started (``key``: its ledger record,
        whose ack makes it moot)."""
        if len(self._marks) >= self._queue_limit:
            self._shed(f"mark-received of {source_type} {source_id}")
            return
        self._marks[key if key is not None else f"{source_type}:{source_id}"] = (
            source_type,
            source_id,
        )
        self._queued()

    def _shed(self, what: str) -> None:
        self.stats.shed += 1
        now = time.monotonic()
        if self._shed_logged_at is None or now - self._shed_logged_at >= SHED_LOG_INTERVAL:
            _log.warning(
                "the platform writer is %d write(s) behind: shed %s (%d shed since start, "
                "%d since the last warning)",
                self.pending,
                what,
                self.stats.shed,
                self.stats.shed - self._shed_logged,
            )
            self._shed_logged_at = now
            self._shed_logged = self.stats.shed

    def _queued(self) -> None:
        backlog = self.pending
        if backlog > self.stats.backlog_max:
            self.stats.backlog_max = backlog
        self._idle.clear()
        self._kick()

    # --- the pool -----------------------------------------------------------------------

    def _kick(self) -> None:
        """Start workers for the jobs no worker is on yet (at most ``concurrency``)."""
        if self._session_id is None or self._closed:
            return
        jobs = len(self._acks) + len(self._marks) + len(self._ready) + int(self._status_due())
        while self._workers < min(self._concurrency, self._workers + jobs):
            self._workers += 1
            jobs -= 1
            self._pool.spawn(self._work(), name="parall-gateway-writer")
        if self._workers == 0 and not self.pending:
            self._idle.set()

    def _status_due(self) -> bool:
        wanted = self._status_wanted
        if self._status_busy or wanted is None or wanted == self._status_written:
            return False
        # The session ends after its last step: completed waits for every step.
        return wanted != AgentSessionStatus.COMPLETED or (
            self._steps_queued == 0 and self._busy_streams == 0
        )

    def _take(self) -> _Job | None:
        """The next job by priority: an ack, a mark-received, a status, a step."""
        if self._acks:
            plan = self._acks.popleft()
            return lambda: self._ack(plan)
        if self._marks:
            key = next(iter(self._marks))
            source_type, source_id = self._marks.pop(key)
            return lambda: self._mark_received(source_type, source_id)
        if self._status_due():
            wanted = self._status_wanted
            assert wanted is not None
            self._status_busy = True
            return lambda: self._write_status(wanted)
        if self._ready:
            stream = self._ready.popleft()
            step = self._streams[stream].popleft()
            self._steps_queued -= 1
            self._busy_streams += 1
            return lambda: self._write_step(stream, step)
        return None

    async def _work(self) -> None:
        try:
            while (job := self._take()) is not None:
                self._in_flight += 1
                try:
                    await job()
                finally:
                    self._in_flight -= 1
        finally:
            self._workers -= 1
            self._kick()

    # --- the writes ---------------------------------------------------------------------

    async def _write_step(self, stream: str, step: AgentStep) -> None:
        try:
            session_id = self._session_id
            assert session_id is not None
            await self._client.create_agent_step(self._org_id, self._agent_id, session_id, step)
            self.stats.steps_written += 1
            _log.debug("%s step written", step.step_type)
        except ParallError as exc:
            self.stats.steps_failed += 1
            _log.warning(
                "could not write a %s step to the agent session: %s", step.step_type, str(exc)
            )
        except Exception:  # one bad write must not stop the writer: later ones still go
            self.stats.steps_failed += 1
            _log.exception("could not write a %s step to the agent session", step.step_type)
        finally:
            self._busy_streams -= 1
            queue = self._streams[stream]
            if queue:
                self._ready.append(stream)
            else:
                del self._streams[stream]

    async def _write_status(self, status: AgentSessionStatus) -> None:
        try:
            session_id = self._session_id
            assert session_id is not None
            await self._client.update_agent_session(
                self._org_id, self._agent_id, session_id, status=status
            )
            self._status_written = status
            self.stats.statuses_written += 1
            _log.debug("agent session %s", status)
        except ParallError as exc:
            # Not retried here (the client retried what is transient); a later status
            # change is written as usual.
            self._status_failed(status)
            _log.warning("could not set the agent session %s: %s", status, str(exc))
        except Exception:
            self._status_failed(status)
            _log.exception("could not set the agent session %s", status)
        finally:
            self._status_busy = False

    def _status_failed(self, status: AgentSessionStatus) -> None:
        self.stats.steps_failed += 1
        if self._status_wanted == status:  # nothing newer was asked for meanwhile
            self._status_wanted = self._status_written

    async def _ack(self, plan: AckPlan) -> None:
        try:
            await self._durable(plan.version)
        except ParallError as exc:
            # Not on disk: acking now would make a crash lose the fact that the work is
            # done (it would run again). Reconciliation or the next start acks it.
            self.stats.acks_failed += 1
            self._ledger.ack_failed(plan)
            _log.warning("ack held back, the state store failed: %s", str(exc))
            return
        try:
            if plan.source is not None:
                source_type, source_id = plan.source
                await self._client.ack_dispatch(
                    self._org_id, source_type=source_type, source_id=source_id
                )
                self.stats.acks_sent += 1
                _log.debug("acked %s %s by source", source_type, source_id)
            for dispatch_id in plan.dispatch_ids:
                await self._client.ack_dispatch_by_id(self._org_id, dispatch_id)
                self.stats.acks_sent += 1
                _log.debug("acked dispatch item %s", dispatch_id)
            self._ledger.acked(plan)
        except ParallError as exc:
            # Still pending on the platform: reconciliation finds the row, and the
            # ledger (which knows the work is done) acks it by id then.
            self.stats.acks_failed += 1
            self._ledger.ack_failed(plan)
            _log.warning("ack failed, left to reconciliation: %s", str(exc))
        except Exception:  # a bug must not lose more than this ack: the same fallback
            self.stats.acks_failed += 1
            self._ledger.ack_failed(plan)
            _log.exception("ack failed, left to reconciliation")

    async def _mark_received(self, source_type: str, source_id: str) -> None:
        try:
            await self._client.mark_dispatch_received(
                self._org_id, source_type=source_type, source_id=source_id
            )
            self.stats.marks_sent += 1
        except ParallError as exc:
            _log.info("could not mark %s %s received: %s", source_type, source_id, str(exc))
        except Exception:
            _log.exception("could not mark %s %s received", source_type, source_id)

    # --- shutdown -----------------------------------------------------------------------

    async def flush(self, within: float) -> bool:
        """Wait up to ``within`` seconds for every queued write; returns whether
        everything was written."""
        if self._session_id is None or self._closed:
            return not self.pending
        try:
            async with asyncio.timeout(within):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, within: float) -> None:
        """Flush for up to ``within`` seconds, then stop (what is left is counted in
        :attr:`WriterStats.abandoned` and logged)."""
        if not await self.flush(within):
            left = self.pending
            self.stats.abandoned += left
            _log.warning(
                "shutdown: %d platform write(s) did not finish within %g s: abandoned",
                left,
                within,
            )
        self._closed = True
        await self._pool.cancel()
