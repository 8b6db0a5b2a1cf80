"""Lanes: the main session and its forks, their queues (of ledger keys), coalescing.

:class:`Board` is the synchronous part: it routes claimed keys to a lane,
queues them (the ledger records them queued), and picks each turn's keys
(coalescing). It does no I/O and starts no task, so it can be checked on its
own against the ledger. :class:`Lanes` runs it: one worker task per lane
drains its queue through :class:`~parall_bridge.gateway.turns.Turns`; the main
lane takes the events of its oldest target together and leaves the other
targets queued; a fork drains its own target's queue and is released when
empty, its result going into main's next turn (or a synthetic wake-up turn
when main is idle).

Invariants, whatever the routing strategy answers: events of one target run
in arrival order, and a target never has two turns at once. A lane's queue
holds keys only: the events and their state are the ledger's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Sequence

import attrs

from .._tasks import TaskSet
from ..events import ForkResult, ParallEvent, build_fork_result_prefix
from ..routing import DispatchState, Route, RoutingStrategy
from ..runtime import AgentRuntime, ForkOutcome, SessionRef
from .ledger import Ledger, TurnEntry
from .turns import Turns

__all__ = ["Board", "Lane", "LaneStats", "Lanes"]

_log = logging.getLogger("parall_bridge.gateway.lanes")


@attrs.define(eq=False)
class Lane:
    """One session (main or a fork) and its queue of ledger keys."""

    session: SessionRef
    target: str | None = None
    queue: deque[str] = attrs.field(factory=deque)
    worker: asyncio.Task[None] | None = None
    solo: str | None = None
    """Key that opened the lane: it runs alone, as the seed dispatches it at once; keys
    queued behind it coalesce into the next turn."""
    is_fork: bool = False
    handled: list[ParallEvent] = attrs.field(factory=list)
    """Events a fork handled (for its result)."""
    failed: int = 0
    last_reply: str | None = None

    @property
    def busy(self) -> bool:
        """The lane has a worker (running a turn or about to)."""
        return self.worker is not None


@attrs.define
class LaneStats:
    """Counters of forks."""

    forks_opened: int = 0
    forks_released: int = 0


class Board:
    """The lanes' queues and routing, synchronous: no I/O, no task.

    Args:
        ledger: the owner of every queued key's event and state.
        strategy: the routing strategy.
        main_session: the main session.
        max_forks: the fork cap reported to the strategy.
    """

    def __init__(
        self,
        ledger: Ledger,
        strategy: RoutingStrategy,
        main_session: SessionRef,
        max_forks: int,
    ) -> None:
        self._ledger = ledger
        self._strategy = strategy
        self._max_forks = max_forks
        self.main = Lane(session=main_session)
        self.forks: dict[str, Lane] = {}
        # How many keys of each target main's queue holds: asked on every event that
        # wants a fork while main is busy, so it must not cost a scan of the queue.
        self._main_targets: Counter[str] = Counter()

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
    def lanes(self) -> list[Lane]:
        """Main, then the forks."""
        return [self.main, *self.forks.values()]

    @property
    def queued(self) -> int:
        """Keys waiting in a queue (main and forks)."""
        return sum(len(lane.queue) for lane in self.lanes)

    def target_of(self, key: str) -> str:
        """The routing target (chat or task) of a queued key."""
        return self._ledger.event(key).target_id

    def place(self, keys: Sequence[str]) -> tuple[Route, Lane]:
        """Route claimed ``keys`` (one event, or a journaled turn's events: one target) and
        queue them on a lane; a new fork lane is made (its worker is the caller's)."""
        event = self._ledger.event(keys[0])
        state = self.state()
        try:
            route = Route(self._strategy.route(event, state))
        except Exception:
            _log.exception("routing strategy failed; queueing for main")
            route = Route.BUFFER_MAIN
        route = self._enforce(event, route, state)
        _log.debug("route %s %s -> %s", event.kind.value, event.key, route.value)
        if route is Route.BUFFER_FORK:
            lane = self.forks[event.target_id]
        elif route is Route.NEW_FORK:
            lane = Lane(
                session=self.main.session, target=event.target_id, is_fork=True, solo=keys[0]
            )
            self.forks[event.target_id] = lane
        else:
            lane = self.main
            if route is Route.MAIN:
                self.main.target = event.target_id
                self.main.solo = keys[0] if len(keys) == 1 else None
        self.enqueue(lane, keys)
        return route, lane

    def _enforce(self, event: ParallEvent, route: Route, state: DispatchState) -> Route:
        """Keep per-target order and one turn per target, whatever the strategy said."""
        target = event.target_id
        if target in self.forks:
            return Route.BUFFER_FORK
        if route is Route.BUFFER_FORK:
            route = Route.MAIN if not state.main_busy else Route.BUFFER_MAIN
        if route is Route.NEW_FORK and (
            not state.main_busy or self._main_has_target(target, state)
        ):
            route = Route.MAIN if not state.main_busy else Route.BUFFER_MAIN
        if route is Route.MAIN and state.main_busy:
            route = Route.BUFFER_MAIN
        return route

    def _main_has_target(self, target: str, state: DispatchState) -> bool:
        """Whether main runs or holds an event of ``target``."""
        return state.main_target == target or self._main_targets[target] > 0

    def main_targets(self) -> Counter[str]:
        """How many keys of each target main's queue holds (a copy)."""
        return +self._main_targets

    def enqueue(self, lane: Lane, keys: Sequence[str]) -> None:
        """Queue claimed keys on ``lane`` (the ledger records them queued)."""
        for key in keys:
            self._ledger.queued(key)
            lane.queue.append(key)
            if lane is self.main:
                self._main_targets[self.target_of(key)] += 1

    def _recount_main(self) -> None:
        self._main_targets = Counter(self.target_of(key) for key in self.main.queue)

    def take_batch(self, lane: Lane) -> list[str]:
        """The next turn's keys: a journaled turn's keys as they were (it runs again with
        the same sources); else the lane's opening key alone; else every queued key of
        the oldest target that belongs to no journaled turn (coalescing). Other keys
        stay queued."""
        first = lane.queue[0]
        entry = self.entry_of((first,))
        if entry is not None:
            lane.queue = deque(key for key in lane.queue if key not in entry.keys)
            lane.solo = None
            if lane is self.main:
                self._recount_main()
            return list(entry.keys)
        if lane.solo is not None and first == lane.solo:
            lane.solo = None
            if lane is self.main:
                self._main_targets[self.target_of(first)] -= 1
            return [lane.queue.popleft()]
        lane.solo = None
        target = self.target_of(first)
        batch: list[str] = []
        rest: deque[str] = deque()
        for key in lane.queue:
            if self.target_of(key) == target and not self._journaled(key):
                batch.append(key)
            else:
                rest.append(key)
        lane.queue = rest
        if lane is self.main:
            self._main_targets[target] -= len(batch)
        return batch

    def entry_of(self, keys: Sequence[str]) -> TurnEntry | None:
        """The journaled turn ``keys`` belong to (a batch of :meth:`take_batch`), if any:
        it runs again with its id and its prefix."""
        record = self._ledger.get(keys[0])
        return self._ledger.turn(record.turn_id) if record and record.turn_id else None

    def _journaled(self, key: str) -> bool:
        record = self._ledger.get(key)
        return record is not None and record.turn_id is not None

    def fold_into_main(self, fork: Lane) -> None:
        """A fork that could not be made (or stopped early) hands its keys to main."""
        if self.forks.get(fork.target or "") is fork:
            del self.forks[fork.target or ""]
        keys, fork.queue = list(fork.queue), deque()
        self.main.queue.extend(keys)
        for key in keys:
            self._main_targets[self.target_of(key)] += 1

    def clear(self) -> list[str]:
        """Empty every queue (shutdown); returns the keys that were queued."""
        keys = [key for lane in self.lanes for key in lane.queue]
        for lane in self.lanes:
            lane.queue.clear()
        self._main_targets.clear()
        self.forks.clear()
        return keys


class Lanes:
    """The main lane and the forks of one gateway, and their workers.

    Args:
        board: the queues and routing.
        turns: runs the turns.
        runtime: the host's runtime (forks are made and released through it).
        release_timeout: seconds ``release_session`` may take before it is cancelled.
    """

    def __init__(
        self, *, board: Board, turns: Turns, runtime: AgentRuntime, release_timeout: float
    ) -> None:
        self.board = board
        self._release_timeout = release_timeout
        self._turns = turns
        self._runtime = runtime
        self._fork_results: list[ForkResult] = []
        self._resumed: deque[TurnEntry] = deque()
        self._workers = TaskSet(_log)
        self._hooks = TaskSet(_log)
        self._closing = False
        self.stats = LaneStats()

    @property
    def main(self) -> Lane:
        """The main lane."""
        return self.board.main

    @property
    def forks(self) -> dict[str, Lane]:
        """Open forks by target."""
        return self.board.forks

    @property
    def queued(self) -> int:
        """Keys waiting in a queue (main and forks)."""
        return self.board.queued

    @property
    def pending_fork_results(self) -> int:
        """Fork results waiting for main's next turn."""
        return len(self._fork_results)

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` has begun."""
        return self._closing

    # --- routing (synchronous) ------------------------------------------------------

    def submit(self, keys: Sequence[str]) -> Route | None:
        """Route claimed ``keys`` (one event, or a journaled turn's) and queue them. Once
        closing, nothing is queued: the keys are released (``None``)."""
        if self._closing:
            for key in keys:
                self._turns.ledger.release(key)
            return None
        route, lane = self.board.place(keys)
        if route is Route.NEW_FORK:
            self.stats.forks_opened += 1
            lane.worker = self._workers.spawn(
                self._fork_worker(lane), name=f"parall-fork-{lane.target}"
            )
        elif lane is self.main:
            self._wake_main()
        return route

    def resume(self, entry: TurnEntry) -> None:
        """Run a journaled turn again first (at start): its claimed keys are queued as one
        unit, a turn without any (a fork-result wake-up) runs on main with its prefix."""
        if entry.keys:
            self.submit(entry.keys)
        elif not self._closing:
            self._resumed.append(entry)
            self._wake_main()

    def _wake_main(self) -> None:
        if self.main.worker is None and not self._closing:
            self.main.worker = self._workers.spawn(self._main_worker(), name="parall-main")

    # --- workers -------------------------------------------------------------------

    async def _main_worker(self) -> None:
        lane = self.main
        try:
            while not self._closing:
                if self._resumed:
                    wake_up = self._resumed.popleft()
                    lane.target = None
                    await self._turns.run(
                        lane.session, (), prefix=wake_up.prefix, turn_id=wake_up.turn_id
                    )
                    continue
                results, self._fork_results = self._fork_results, []
                if lane.queue:
                    batch = self.board.take_batch(lane)
                    entry = self.board.entry_of(batch)
                    prefix = build_fork_result_prefix(results)
                    if entry is not None and entry.prefix:
                        # A journaled turn runs as it was; these results wait for the next.
                        self._fork_results[:0] = results
                        results, prefix = [], entry.prefix
                    lane.target = self.board.target_of(batch[0])
                    outcome = await self._turns.run(
                        lane.session,
                        batch,
                        prefix=prefix,
                        turn_id=entry.turn_id if entry is not None else None,
                    )
                elif results:
                    lane.target = None
                    outcome = await self._turns.run(
                        lane.session, (), prefix=build_fork_result_prefix(results)
                    )
                else:
                    break
                if not outcome.ok and results:
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
                batch = self.board.take_batch(fork)
                entry = self.board.entry_of(batch)
                outcome = await self._turns.run(
                    fork.session,
                    batch,
                    prefix=entry.prefix if entry is not None else "",
                    turn_id=entry.turn_id if entry is not None else None,
                )
                if outcome.ok:
                    fork.handled.extend(outcome.events)
                    if outcome.reply is not None:
                        fork.last_reply = outcome.reply
                else:
                    fork.failed += len(outcome.events)
        finally:
            if self.forks.get(target) is fork:
                del self.forks[target]
            fork.worker = None
            if fork.queue:
                self._fold_into_main(fork)
            if child is not None:
                await self._release(fork, child)

    def _fold_into_main(self, fork: Lane) -> None:
        self.board.fold_into_main(fork)
        if self.main.queue:
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
        done, _ = await asyncio.wait({release}, timeout=self._release_timeout)
        if not done:
            _log.warning("release_session took over %.0f s: cancelled", self._release_timeout)
            release.cancel()
            await asyncio.gather(release, return_exceptions=True)
        if self._fork_results:
            self._wake_main()

    # --- shutdown -----------------------------------------------------------------------

    async def close(self, grace: float) -> None:
        """Stop taking work; let running turns finish within ``grace`` seconds, then
        cancel them (not acked, steps flushed, forks released). Queued keys that never
        ran are dropped from the queues (the ledger settles them: :meth:`Ledger.shutdown`)."""
        self._closing = True
        if not await self._workers.wait(grace):
            _log.warning("shutdown: cancelling %d running turn(s)", self._turns.active)
        await self._workers.cancel()
        self.board.clear()
        self._resumed.clear()
        await self._hooks.close(grace=self._release_timeout)
