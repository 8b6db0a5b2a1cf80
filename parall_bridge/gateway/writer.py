"""Writes to the platform off the critical path (DESIGN.md section 6, items 5 and 7).

Session status changes and steps go through ONE ordered queue drained by one
task, so they reach the platform in the order they were recorded while the
turn runs without waiting for them. Acks and mark-received calls run as
tracked background tasks (the client retries them: acks are always safe to
repeat). Everything is flushed, with a timeout, at shutdown.

The writer sends only the acks the ledger planned (:class:`AckPlan`): each
waits until the transition that planned it is durable in the state store,
then goes out, and its success is reported back to the ledger (acked).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import attrs

from .._tasks import TaskSet
from ..client import ParallClient
from ..errors import ParallError
from ..models import AgentSessionStatus, AgentStep
from .ledger import AckPlan, Ledger

__all__ = ["PlatformWriter", "WriterStats"]

_log = logging.getLogger("parall_bridge.gateway.writer")

QUEUE_LIMIT: Final = 10_000
"""Most steps waiting in the ordered queue by default; past it new steps are dropped
(counted in :attr:`WriterStats.dropped` and logged), so what is written stays an ordered
prefix. Status changes are never dropped (there are at most two per turn)."""


@attrs.frozen
class _Step:
    step: AgentStep


@attrs.frozen
class _Status:
    status: AgentSessionStatus


@attrs.define
class WriterStats:
    """Counters of the platform writer."""

    steps_written: int = 0
    steps_failed: int = 0
    statuses_written: int = 0
    acks_sent: int = 0
    acks_failed: int = 0
    dropped: int = 0


async def _no_wait(version: int) -> None:
    return None


class PlatformWriter:
    """The ordered step/status writer and the background acks of one gateway.

    Args:
        client: the REST client.
        org_id: the organisation.
        agent_id: the agent's user id.
        ledger: the ledger whose ack plans it sends (told when they went out).
        durable: waits until the ledger is durable up to a version (the state
            store's persister); by default nothing is waited for.
        queue_limit: most steps waiting to be written (:data:`QUEUE_LIMIT`).
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
    ) -> None:
        self._client = client
        self._queue_limit = queue_limit
        self._org_id = org_id
        self._agent_id = agent_id
        self._ledger = ledger
        self._durable = durable
        self._session_id: str | None = None
        self._queue: asyncio.Queue[_Step | _Status] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._background = TaskSet(_log)
        self._last_status: AgentSessionStatus | None = None
        self.stats = WriterStats()

    def start(self, session_id: str) -> None:
        """Start writing into the agent session ``session_id``."""
        self._session_id = session_id
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(
            self._drain(self._queue), name="parall-gateway-writer"
        )

    @property
    def session_id(self) -> str | None:
        """The agent session written to."""
        return self._session_id

    @property
    def pending(self) -> int:
        """Writes waiting in the ordered queue, plus background acks in flight."""
        return (self._queue.qsize() if self._queue else 0) + len(self._background)

    # --- enqueueing (synchronous: never blocks a turn) --------------------------------

    def step(self, step: AgentStep) -> None:
        """Record a step (in order with every other step and status change)."""
        self._put(_Step(step))

    def status(self, status: AgentSessionStatus) -> None:
        """Set the agent session's status (in order with the steps)."""
        self._put(_Status(status))

    def _put(self, item: _Step | _Status) -> None:
        if self._queue is None:
            _log.debug("writer not started: dropping a %s", type(item).__name__)
            return
        if isinstance(item, _Step) and self._queue.qsize() >= self._queue_limit:
            self.stats.dropped += 1
            _log.warning(
                "step queue full (%d): dropping a %s step",
                self._queue_limit,
                item.step.step_type,
            )
            return
        self._queue.put_nowait(item)

    def ack(self, plan: AckPlan) -> None:
        """Send the acks of ``plan`` in the background, once the ledger is durable up to
        the plan's version; the ledger is told when they went out."""
        if plan:
            self._background.spawn(self._ack(plan), name="parall-gateway-ack")

    def mark_received(self, source_type: str, source_id: str) -> None:
        """Tell the platform work on this source started, in the background."""
        self._background.spawn(
            self._mark_received(source_type, source_id), name="parall-gateway-received"
        )

    # --- the work -----------------------------------------------------------------------

    async def _drain(self, queue: asyncio.Queue[_Step | _Status]) -> None:
        while True:
            item = await queue.get()
            try:
                await self._write(item)
            finally:
                queue.task_done()

    async def _write(self, item: _Step | _Status) -> None:
        session_id = self._session_id
        if session_id is None:
            return
        try:
            if isinstance(item, _Status):
                if item.status == self._last_status:
                    return
                await self._client.update_agent_session(
                    self._org_id, self._agent_id, session_id, status=item.status
                )
                self._last_status = item.status
                self.stats.statuses_written += 1
                _log.debug("agent session %s", item.status)
            else:
                await self._client.create_agent_step(
                    self._org_id, self._agent_id, session_id, item.step
                )
                self.stats.steps_written += 1
                _log.debug("%s step written", item.step.step_type)
        except ParallError as exc:
            self.stats.steps_failed += 1
            what = item.status if isinstance(item, _Status) else item.step.step_type
            _log.warning("could not write %s to the agent session: %s", what, str(exc))
        except Exception:  # one bad write must not stop the writer: later ones still go
            self.stats.steps_failed += 1
            _log.exception("could not write a %s to the agent session", type(item).__name__)

    async def _ack(self, plan: AckPlan) -> None:
        try:
            await self._durable(plan.version)
        except ParallError as exc:
            # Not on disk: acking now would make a crash lose the fact that the work is
            # done (it would run again). Reconciliation or the next start acks it.
            self.stats.acks_failed += 1
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
            _log.warning("ack failed, left to reconciliation: %s", str(exc))
        except Exception:  # a bug must not lose more than this ack: the same fallback
            self.stats.acks_failed += 1
            _log.exception("ack failed, left to reconciliation")

    async def _mark_received(self, source_type: str, source_id: str) -> None:
        try:
            await self._client.mark_dispatch_received(
                self._org_id, source_type=source_type, source_id=source_id
            )
        except ParallError as exc:
            _log.info("could not mark %s %s received: %s", source_type, source_id, str(exc))

    # --- shutdown -----------------------------------------------------------------------

    async def flush(self, within: float) -> bool:
        """Wait up to ``within`` seconds for every queued write and background ack;
        returns whether everything was written."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        ok = True
        if self._queue is not None and self._worker is not None and not self._worker.done():
            try:
                async with asyncio.timeout(within):
                    await self._queue.join()
            except TimeoutError:
                ok = False
        remaining = max(0.0, deadline - loop.time())
        return await self._background.wait(remaining) and ok

    async def close(self, within: float) -> None:
        """Flush for up to ``within`` seconds, then stop (unwritten items are logged)."""
        if not await self.flush(within):
            left = self.pending
            _log.warning("shutdown: %d platform write(s) did not finish in time", left)
        await self._background.cancel()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
