"""Lanes: the main session and its forks, their queues, coalescing, and turns.

:meth:`Lanes.submit` routes an event and queues it, synchronously (no ``await``
between the routing decision and the state change). Each lane has one worker
task that drains its queue: the main lane takes the events of its oldest
target together (coalescing) and leaves the other targets queued; a fork
drains its own target's queue and is released when empty, its result going
into main's next turn (or a synthetic wake-up turn when main is idle).

Invariants, whatever the routing strategy answers: events of one target run
in arrival order, and a target never has two turns at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

import attrs

from .._tasks import TaskSet
from ..client import ParallClient
from ..events import ForkResult, ParallEvent, build_fork_result_prefix
from ..models import AgentSessionStatus, AgentStep, StepType
from ..routing import DispatchState, Route, RoutingStrategy
from ..runtime import AgentRuntime, ForkOutcome, SessionRef, Turn, step_target
from .ledger import Ledger
from .presence import Presence
from .writer import PlatformWriter

__all__ = ["Lane", "LaneStats", "Lanes"]

_log = logging.getLogger("parall_bridge.gateway.lanes")

RELEASE_TIMEOUT: Final = 30.0
"""Seconds ``release_session`` may take before it is cancelled."""
HOOK_TIMEOUT: Final = 30.0
"""Seconds ``on_dead_letter`` may take before it is cancelled."""
ERROR_MESSAGE_LIMIT: Final = 500
"""Characters of an exception's text kept in an error step."""
TURN_CANCEL_TIMEOUT: Final = 5.0
"""Seconds a cancelled turn may take to end before an ERROR is logged. A timed-out
``run_turn`` that swallows its cancellation still keeps its session (and chat) until it
ends, since a session never runs two turns at once; at shutdown it is abandoned after
this, so shutdown never waits for it forever."""


@attrs.define(eq=False)
class Lane:
    """One session (main or a fork) and its queue."""

    session: SessionRef
    target: str | None = None
    queue: deque[ParallEvent] = attrs.field(factory=deque)
    worker: asyncio.Task[None] | None = None
    solo: str | None = None
    """Key of the event that opened the lane: it runs alone, as the seed dispatches it at
    once; events queued behind it coalesce into the next turn."""
    running: bool = False
    is_fork: bool = False
    handled: list[ParallEvent] = attrs.field(factory=list)
    failed: int = 0
    last_reply: str | None = None

    @property
    def busy(self) -> bool:
        """The lane has a worker (running a turn or about to)."""
        return self.worker is not None


@attrs.define
class LaneStats:
    """Counters of turns."""

    turns_started: int = 0
    turns_succeeded: int = 0
    turns_failed: int = 0
    turns_cancelled: int = 0
    forks_opened: int = 0
    forks_released: int = 0
    dead_letters: int = 0


class Lanes:
    """The main lane and the forks of one gateway."""

    def __init__(
        self,
        *,
        runtime: AgentRuntime,
        strategy: RoutingStrategy,
        ledger: Ledger,
        writer: PlatformWriter,
        presence: Presence,
        client: ParallClient,
        org_id: str,
        agent_id: str,
        main_session: SessionRef,
        max_forks: int,
        turn_timeout: float,
        on_failure: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._runtime = runtime
        self._strategy = strategy
        self._ledger = ledger
        self._writer = writer
        self._presence = presence
        self._client = client
        self._org_id = org_id
        self._agent_id = agent_id
        self._max_forks = max_forks
        self._turn_timeout = turn_timeout
        self._on_failure = on_failure
        self._clock = clock
        self.main = Lane(session=main_session)
        self.forks: dict[str, Lane] = {}
        self._fork_results: list[ForkResult] = []
        self._workers = TaskSet(_log)
        self._hooks = TaskSet(_log)
        self._turn_tasks: set[asyncio.Task[str | None]] = set()
        self._active_turns = 0
        self._closing = False
        self._synthetic_seq = 0
        self.stats = LaneStats()

    # --- state -------------------------------------------------------------------

    def state(self) -> DispatchState:
        """The snapshot routing strategies decide from."""
        return DispatchState(
            main_busy=self.main.busy,
            main_target=self.main.target,
            fork_targets=frozenset(self.forks),
            fork_count=len(self.forks),
            max_forks=self._max_forks,
        )

    @property
    def active_turns(self) -> int:
        """Turns running now (main and forks)."""
        return self._active_turns

    @property
    def queued(self) -> int:
        """Events waiting in a queue (main and forks)."""
        return len(self.main.queue) + sum(len(fork.queue) for fork in self.forks.values())

    @property
    def pending_fork_results(self) -> int:
        """Fork results waiting for main's next turn."""
        return len(self._fork_results)

    # --- routing (synchronous) ------------------------------------------------------

    def submit(self, event: ParallEvent) -> Route:
        """Route ``event`` and queue it on a lane. The caller has claimed it."""
        if self._closing:
            self._ledger.release(event.key)
            return Route.BUFFER_MAIN
        state = self.state()
        try:
            route = Route(self._strategy.route(event, state))
        except Exception:
            _log.exception("routing strategy failed; queueing for main")
            route = Route.BUFFER_MAIN
        route = self._enforce(event, route, state)
        _log.debug("route %s %s -> %s", event.kind.value, event.key, route.value)
        if route is Route.BUFFER_FORK:
            self._enqueue(self.forks[event.target_id], event)
        elif route is Route.NEW_FORK:
            fork = Lane(
                session=self.main.session, target=event.target_id, is_fork=True, solo=event.key
            )
            self.forks[event.target_id] = fork
            self.stats.forks_opened += 1
            self._enqueue(fork, event)
            fork.worker = self._workers.spawn(
                self._fork_worker(fork), name=f"parall-fork-{event.target_id}"
            )
        else:
            if route is Route.MAIN:
                self.main.target = event.target_id
                self.main.solo = event.key
            self._enqueue(self.main, event)
            self._wake_main()
        return route

    def _enforce(self, event: ParallEvent, route: Route, state: DispatchState) -> Route:
        """Keep per-target order and one turn per target, whatever the strategy said."""
        target = event.target_id
        if target in self.forks:
            return Route.BUFFER_FORK
        main_has_target = state.main_target == target or any(
            queued.target_id == target for queued in self.main.queue
        )
        if route is Route.BUFFER_FORK:
            route = Route.MAIN if not state.main_busy else Route.BUFFER_MAIN
        if route is Route.NEW_FORK and (not state.main_busy or main_has_target):
            route = Route.MAIN if not state.main_busy else Route.BUFFER_MAIN
        if route is Route.MAIN and state.main_busy:
            route = Route.BUFFER_MAIN
        return route

    def _enqueue(self, lane: Lane, event: ParallEvent) -> None:
        lane.queue.append(event)
        if event.key and self._ledger.get(event.key) is not None:
            self._ledger.queued(event.key, event)

    def _wake_main(self) -> None:
        if self.main.worker is None and not self._closing:
            self.main.worker = self._workers.spawn(self._main_worker(), name="parall-main")

    # --- workers -------------------------------------------------------------------

    async def _main_worker(self) -> None:
        lane = self.main
        try:
            while not self._closing:
                results, self._fork_results = self._fork_results, []
                if lane.queue:
                    batch = self._take_batch(lane)
                elif results:
                    self._synthetic_seq += 1
                    batch = [
                        ParallEvent.synthetic(
                            f"synthetic-{int(time.time() * 1000)}-{self._synthetic_seq}"
                        )
                    ]
                else:
                    break
                lane.target = batch[0].target_id
                ok = await self._turn(lane, batch, build_fork_result_prefix(results))
                if not ok and results:
                    # Not delivered: they go with main's next turn. No wake-up of their
                    # own, so a failing runtime cannot spin on them.
                    self._fork_results[:0] = results
                    if not lane.queue:
                        break
        finally:
            lane.worker = None
            lane.target = None

    async def _fork_worker(self, fork: Lane) -> None:
        target = fork.target or ""
        child: SessionRef | None = None
        try:
            try:
                child = await self._runtime.fork_session(self.main.session)
            except Exception:
                _log.exception("fork_session failed; the events wait for main")
            if child is None:
                self._fold_into_main(fork)
                return
            fork.session = child
            while fork.queue and not self._closing:
                await self._turn(fork, self._take_batch(fork), "")
        finally:
            if self.forks.get(target) is fork:
                del self.forks[target]
            fork.worker = None
            if fork.queue:
                self._fold_into_main(fork)
            if child is not None:
                await self._release(fork, child)

    @staticmethod
    def _take_batch(lane: Lane) -> list[ParallEvent]:
        """The next turn's events: the lane's opening event alone, else every queued event
        of the oldest target (coalescing); other targets stay queued."""
        first = lane.queue[0]
        if lane.solo is not None and first.key == lane.solo:
            lane.solo = None
            return [lane.queue.popleft()]
        lane.solo = None
        batch = [event for event in lane.queue if event.target_id == first.target_id]
        lane.queue = deque(event for event in lane.queue if event.target_id != first.target_id)
        return batch

    def _fold_into_main(self, fork: Lane) -> None:
        """A fork that could not be made (or stopped early) hands its events to main."""
        if self.forks.get(fork.target or "") is fork:
            del self.forks[fork.target or ""]
        events, fork.queue = list(fork.queue), deque()
        if self._closing:
            for event in events:
                self._ledger.release(event.key)
            return
        for event in events:
            self._enqueue(self.main, event)
        self._wake_main()

    async def _release(self, fork: Lane, child: SessionRef) -> None:
        """Release a fork exactly once; its result goes to main's next turn."""
        outcome = ForkOutcome(
            handled=len(fork.handled), failed=fork.failed, summary=fork.last_reply
        )
        if fork.handled:
            actions = [fork.last_reply] if fork.last_reply else []
            self._fork_results.append(ForkResult.of(fork.handled, actions))
        self.stats.forks_released += 1
        release = self._hooks.spawn(
            self._runtime.release_session(child, outcome), name="parall-release-session"
        )
        done, _ = await asyncio.wait({release}, timeout=RELEASE_TIMEOUT)
        if not done:
            _log.warning("release_session took over %.0f s: cancelled", RELEASE_TIMEOUT)
            release.cancel()
            await asyncio.gather(release, return_exceptions=True)
        if self._fork_results:
            self._wake_main()

    # --- one turn ------------------------------------------------------------------

    async def _turn(self, lane: Lane, events: Sequence[ParallEvent], prefix: str) -> bool:
        """Run one turn; returns whether it succeeded (a cancellation propagates)."""
        tracked = [event for event in events if self._ledger.get(event.key) is not None]
        for event in tracked:
            self._ledger.running(event.key)
        turn = Turn(
            session=lane.session,
            events=events,
            prefix=prefix,
            org_id=self._org_id,
            agent_id=self._agent_id,
            client=self._client,
            record=self._writer.step,
        )
        last = events[-1]
        _log.info(
            "turn on %s for %s: %d event(s) %s",
            lane.session.key,
            last.target_id,
            len(events),
            ", ".join(event.key for event in events),
        )
        # The turn's task is made before _begin starts the background writes, so run_turn
        # runs first (the input steps are queued by then: they are still written first).
        child = asyncio.get_running_loop().create_task(
            self._runtime.run_turn(turn), name="parall-turn"
        )
        self._turn_tasks.add(child)
        child.add_done_callback(self._turn_tasks.discard)
        self._begin(turn, tracked)
        lane.running = True
        try:
            reply = await self._run_bounded(child)
        except asyncio.CancelledError:
            # Shutdown cancelled this lane (the turn itself was stopped by _run_bounded).
            turn._abandon()
            self.stats.turns_cancelled += 1
            now = self._clock()
            for event in tracked:
                self._ledger.interrupted(event.key, now=now)
            _log.info("turn for %s cancelled: not acked", last.target_id)
            raise
        except Exception as exc:
            turn._abandon()
            lane.failed += len(events)
            self._failed(turn, tracked, exc)
            return False
        else:
            turn._finish(reply)
            self.stats.turns_succeeded += 1
            _log.info("turn on %s for %s succeeded", lane.session.key, last.target_id)
            for event in tracked:
                self._writer.ack(self._ledger.succeeded(event.key))
            if lane.is_fork:
                lane.handled.extend(events)
                if reply is not None:
                    lane.last_reply = str(reply)
            return True
        finally:
            lane.running = False
            self._end(turn)

    async def _run_bounded(self, child: asyncio.Task[str | None]) -> str | None:
        """Await a turn's task (``run_turn`` runs in a task of its own, so that the turn
        timeout and shutdown do not depend on the host letting a cancellation through).

        Raises:
            TimeoutError: the turn ran past ``turn_timeout`` (it was cancelled, and has
                ended).
            RuntimeError: ``run_turn`` raised ``CancelledError`` although nobody cancelled
                it (the host's own cancellation escaped).
        """
        try:
            done, _ = await asyncio.wait({child}, timeout=self._turn_timeout)
        except asyncio.CancelledError:
            await self._stop_turn(child, until_ended=False)
            raise
        if not done:
            await self._stop_turn(child, until_ended=True)
            raise TimeoutError
        if child.cancelled():
            raise RuntimeError("run_turn raised CancelledError")
        return child.result()

    async def _stop_turn(self, child: asyncio.Task[str | None], *, until_ended: bool) -> None:
        """Cancel a turn and wait for it to end: for good when ``until_ended`` (its session
        must not run another turn meanwhile), else up to :data:`TURN_CANCEL_TIMEOUT`
        (shutdown, which :meth:`close` finishes). Logs a turn that ignores it."""
        child.cancel()
        try:
            await asyncio.wait({child}, timeout=TURN_CANCEL_TIMEOUT)
            if not child.done():
                _log.error(
                    "run_turn ignored its cancellation for %g s (let CancelledError "
                    "propagate out of run_turn); %s",
                    TURN_CANCEL_TIMEOUT,
                    "its session waits for it to end" if until_ended else "abandoning it",
                )
                if until_ended:
                    await asyncio.wait({child})
        finally:
            if child.done():
                _retrieve(child)
            else:
                child.add_done_callback(_retrieve)

    def _begin(self, turn: Turn, tracked: Sequence[ParallEvent]) -> None:
        """Everything that goes out when a turn starts, none of it awaited."""
        self.stats.turns_started += 1
        self._active_turns += 1
        if self._active_turns == 1:
            self._writer.status(AgentSessionStatus.ACTIVE)
        for event in turn.events:
            target_type, target_id = step_target(event)
            is_task = event.task_id is not None
            self._writer.step(
                AgentStep(
                    step_type=StepType.INPUT,
                    target_type=target_type,
                    target_id=target_id,
                    content={
                        "trigger_type": "task_assign" if is_task else "mention",
                        "trigger_ref": {"task_id": event.task_id}
                        if is_task
                        else {"message_id": event.message_id},
                        "sender_id": event.sender_id,
                        "sender_name": event.sender_name,
                        "summary": event.summary,
                    },
                )
            )
        for event in tracked:
            self._writer.mark_received(event.source_type, event.source_id)
        if turn.chat_id:
            self._presence.typing_start(turn.chat_id)

    def _end(self, turn: Turn) -> None:
        if turn.chat_id:
            self._presence.typing_stop(turn.chat_id)
        self._active_turns -= 1
        if self._active_turns == 0:
            self._writer.status(AgentSessionStatus.IDLE)

    def _failed(self, turn: Turn, tracked: Sequence[ParallEvent], exc: Exception) -> None:
        self.stats.turns_failed += 1
        message = f"{type(exc).__name__}: {exc}"[:ERROR_MESSAGE_LIMIT]
        if isinstance(exc, TimeoutError):
            message = f"turn timed out after {self._turn_timeout:g} s"
        now = self._clock()
        dead: list[ParallEvent] = []
        attempts = 0
        for event in tracked:
            if self._ledger.failed(event.key, message, now=now):
                dead.append(event)
            record = self._ledger.get(event.key)
            attempts = max(attempts, record.attempts if record else 0)
        target_type, target_id = step_target(turn.event)
        self._writer.step(
            AgentStep(
                step_type=StepType.ERROR,
                target_type=target_type,
                target_id=target_id,
                content={"message": message, "attempts": attempts},
                group_key=turn.group_key,
            )
        )
        if tracked:
            _log.warning(
                "turn for %s failed (attempt %d): %s", turn.event.target_id, attempts, message
            )
        else:
            _log.warning("turn for %s failed: %s", turn.event.target_id, message)
        if dead:
            self._dead_letter(dead, exc, attempts)
        if len(dead) < len(tracked):
            self._on_failure()

    def _dead_letter(
        self, events: Sequence[ParallEvent], error: BaseException, attempts: int
    ) -> None:
        self.stats.dead_letters += len(events)
        for event in events:
            self._writer.ack(self._ledger.dead_plan(event.key))
        _log.warning(
            "dead-lettered %d event(s) after %d failed attempts: %s",
            len(events),
            attempts,
            ", ".join(event.key for event in events),
        )
        self._hooks.spawn(self._call_dead_letter(events, error), name="parall-dead-letter")

    async def _call_dead_letter(self, events: Sequence[ParallEvent], error: BaseException) -> None:
        try:
            async with asyncio.timeout(HOOK_TIMEOUT):
                await self._runtime.on_dead_letter(list(events), error)
        except Exception:
            _log.exception("on_dead_letter failed")

    # --- shutdown -----------------------------------------------------------------------

    async def close(self, grace: float) -> None:
        """Stop taking work; let running turns finish within ``grace`` seconds, then
        cancel them (not acked, steps flushed, forks released). Queued events that never
        ran are released (the platform redelivers them)."""
        self._closing = True
        if not await self._workers.wait(grace):
            _log.warning("shutdown: cancelling %d running turn(s)", self._active_turns)
        await self._workers.cancel()
        for lane in [self.main, *self.forks.values()]:
            for event in lane.queue:
                self._ledger.release(event.key)
            lane.queue.clear()
        self.forks.clear()
        await self._hooks.close(grace=RELEASE_TIMEOUT)
        left = [child for child in self._turn_tasks if not child.done()]
        if left:
            # Turns whose lane was cancelled while they ignored their cancellation.
            for child in left:
                child.cancel()
            await asyncio.wait(left, timeout=TURN_CANCEL_TIMEOUT)
            if still := [child for child in left if not child.done()]:
                _log.error(
                    "shutdown: abandoning %d turn(s) that ignore their cancellation",
                    len(still),
                )


def _retrieve(task: asyncio.Task[str | None]) -> None:
    """Mark a finished turn's outcome as seen (it was already accounted for)."""
    if not task.cancelled():
        task.exception()
