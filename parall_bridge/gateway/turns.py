"""The turn lifecycle: start, steps, finish, abandon after a timeout or a cancellation.

:class:`Turns` runs one turn for keys a lane took from its queue: the ledger
starts it (journaled, its events running), the host's ``run_turn`` runs in a
task of its own while everything that announces it goes out in the background
(session ``active``, input steps, mark received, typing), then the ledger
settles it (acks to send, or a failure: error step, retry or dead letter).

:class:`TurnRun` is the small internal object behind one :class:`Turn`: it
owns whether the turn has ended, counts its sends, makes its journal entry
durable before the first one, and passes recorded steps to the writer. A
:class:`Turn` is the host's face of it and no more.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import attrs

from .._tasks import TaskSet
from ..client import ParallClient
from ..events import ParallEvent
from ..models import AgentSessionStatus, AgentStep, StepType
from ..runtime import AgentRuntime, SessionRef, Turn, step_target
from .ledger import Ledger, TurnEntry
from .persist import Persister
from .presence import Presence
from .writer import PlatformWriter

__all__ = ["RunningTurn", "TurnOutcome", "TurnRun", "TurnStats", "Turns"]

_log = logging.getLogger("parall_bridge.gateway.turns")

ERROR_MESSAGE_LIMIT: Final = 500
"""Characters of an exception's text kept in an error step."""


@attrs.define
class TurnStats:
    """Counters of turns."""

    turns_started: int = 0
    turns_succeeded: int = 0
    turns_failed: int = 0
    turns_cancelled: int = 0


@attrs.define
class RunningTurn:
    """A turn whose ``run_turn`` has not ended, for :attr:`GatewayStats.running`."""

    turn_id: str
    chat_id: str | None
    task_id: str | None
    session_key: str
    started: float
    cancelled_at: float | None = None

    def snapshot(self, now: float, turn_timeout: float, cancel_grace: float) -> dict[str, Any]:
        """``chat_id``, ``task_id``, ``session_key``, ``age`` (seconds), ``overdue`` (past
        ``turn_timeout``) and ``ignored_cancellation`` (still running ``cancel_grace``
        after it was cancelled)."""
        return {
            "chat_id": self.chat_id,
            "task_id": self.task_id,
            "session_key": self.session_key,
            "age": now - self.started,
            "overdue": now - self.started > turn_timeout,
            "ignored_cancellation": self.cancelled_at is not None
            and now - self.cancelled_at >= cancel_grace,
        }

    def where(self) -> str:
        """The chat or task it is for, for log lines."""
        return self.chat_id or self.task_id or "the orchestrator"


@attrs.frozen
class TurnOutcome:
    """How a turn ended: ``ok`` with the host's ``reply``, or failed."""

    ok: bool
    events: tuple[ParallEvent, ...]
    reply: str | None = None


class TurnRun:
    """One turn's lifecycle: the hooks of its :class:`Turn` (see ``TurnHooks``).

    Args:
        entry: the turn's journal entry.
        record: where its steps go (the writer), in order.
        journaled: waits until its journal entry is durable.
    """

    def __init__(
        self,
        entry: TurnEntry,
        *,
        record: Callable[[AgentStep], None],
        journaled: Callable[[], Awaitable[None]],
    ) -> None:
        self._record = record
        self._journaled = journaled
        self.entry = entry
        self.ended = False
        self.sends = 0
        self.recorded_text = False

    def record(self, step: AgentStep) -> None:
        """A step the host recorded: to the writer, in order."""
        if step.step_type == StepType.TEXT:
            self.recorded_text = True
        self._record(step)

    async def before_send(self) -> None:
        """The turn's journal entry is durable before its first send."""
        self.sends += 1
        await self._journaled()

    def finish(self, turn: Turn, reply: object) -> None:
        """End the turn: flush reasoning, record the reply unless text was recorded.

        A reply that is not a string (a host's mistake) is recorded as its ``str``.
        """
        if self.ended:
            return
        turn.reasoning_done()
        if reply is not None and not isinstance(reply, str):
            _log.warning(
                "run_turn returned a %s, not str | None: recorded as its str",
                type(reply).__name__,
            )
        text = reply if isinstance(reply, str) or reply is None else str(reply)
        if text and text.strip() and not self.recorded_text:
            turn.text(text)
        self.ended = True

    def abandon(self, turn: Turn) -> None:
        """End the turn after a failure or a cancellation (pending reasoning is kept)."""
        if not self.ended:
            turn.reasoning_done()
            self.ended = True


class Turns:
    """Runs turns for the lanes.

    Args:
        runtime: the host's runtime.
        ledger: the one owner of the events' state.
        writer: steps, status changes and acks.
        persister: makes journal entries durable before a turn's sends.
        presence: typing indicators.
        client: the REST client handed to turns.
        org_id: the organisation.
        agent_id: the agent's user id.
        turn_timeout: seconds a turn may run before it is cancelled (a failure).
        cancel_grace: seconds a cancelled turn may take to end before it is reported
            (after a timeout) or abandoned (at shutdown).
        hook_timeout: seconds ``on_dead_letter`` may take.
        on_retry: called when a failed turn left events waiting for a retry.
        clock: the ledger's clock.
    """

    def __init__(
        self,
        *,
        runtime: AgentRuntime,
        ledger: Ledger,
        writer: PlatformWriter,
        persister: Persister,
        presence: Presence,
        client: ParallClient,
        org_id: str,
        agent_id: str,
        turn_timeout: float,
        cancel_grace: float,
        hook_timeout: float,
        on_retry: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        self.runtime = runtime
        self.ledger = ledger
        self.writer = writer
        self.persister = persister
        self.presence = presence
        self.client = client
        self.org_id = org_id
        self.agent_id = agent_id
        self.turn_timeout = turn_timeout
        self.cancel_grace = cancel_grace
        self.hook_timeout = hook_timeout
        self._on_retry = on_retry
        self._clock = clock
        self._hooks = TaskSet(_log)
        self._tasks: dict[asyncio.Task[str | None], RunningTurn] = {}
        self.active = 0
        self.stats = TurnStats()

    async def run(
        self,
        session: SessionRef,
        keys: Sequence[str],
        *,
        prefix: str = "",
        turn_id: str | None = None,
    ) -> TurnOutcome:
        """Run one turn for the queued ``keys`` (none: a fork-result wake-up) on
        ``session``; a cancellation (shutdown) propagates, the turn interrupted."""
        ledger = self.ledger
        entry = ledger.start_turn(keys, session_key=session.key, prefix=prefix, turn_id=turn_id)
        events = [ledger.event(key) for key in entry.keys] or [ParallEvent.synthetic(entry.turn_id)]
        version = ledger.version
        run = TurnRun(
            entry,
            record=functools.partial(self.writer.step, stream=_stream(session.key, events[-1])),
            journaled=lambda: self.persister.durable(version),
        )
        turn = Turn(
            session=session,
            events=events,
            prefix=entry.prefix,
            org_id=self.org_id,
            agent_id=self.agent_id,
            client=self.client,
            turn_id=entry.turn_id,
            hooks=run,
        )
        last = turn.event
        _log.info(
            "turn %s on %s for %s: %s",
            entry.turn_id,
            session.key,
            last.target_id,
            f"{len(entry.keys)} event(s) {', '.join(entry.keys)}"
            if entry.keys
            else "fork results (a wake-up)",
        )
        # The turn's task is made before _begin starts the background writes, so run_turn
        # runs first (the input steps are queued by then: they are still written first).
        child = asyncio.get_running_loop().create_task(
            self.runtime.run_turn(turn), name="parall-turn"
        )
        running = RunningTurn(entry.turn_id, turn.chat_id, turn.task_id, session.key, self._clock())
        self._tasks[child] = running
        child.add_done_callback(self._forget)
        self._begin(turn, entry)
        try:
            reply = await self._run_bounded(child, running)
        except asyncio.CancelledError:
            # Shutdown cancelled the lane (the turn itself was stopped by _run_bounded).
            run.abandon(turn)
            self.stats.turns_cancelled += 1
            ledger.turn_interrupted(entry.turn_id, now=self._clock())
            _log.info("turn %s for %s cancelled: not acked", entry.turn_id, last.target_id)
            raise
        except Exception as exc:
            run.abandon(turn)
            self._failed(turn, run, exc)
            return TurnOutcome(False, tuple(events))
        else:
            run.finish(turn, reply)
            self.stats.turns_succeeded += 1
            _log.info("turn %s on %s for %s succeeded", entry.turn_id, session.key, last.target_id)
            for plan in ledger.turn_succeeded(entry.turn_id):
                self.writer.ack(plan)
            return TurnOutcome(True, tuple(events), None if reply is None else str(reply))
        finally:
            self._end(turn)

    def _forget(self, child: asyncio.Task[str | None]) -> None:
        self._tasks.pop(child, None)

    def running(self) -> tuple[dict[str, Any], ...]:
        """A snapshot of every turn whose ``run_turn`` has not ended (see
        :meth:`RunningTurn.snapshot`), oldest first; an abandoned one stays until it ends."""
        now = self._clock()
        return tuple(
            turn.snapshot(now, self.turn_timeout, self.cancel_grace)
            for turn in sorted(self._tasks.values(), key=lambda turn: turn.started)
        )

    async def _run_bounded(
        self, child: asyncio.Task[str | None], running: RunningTurn
    ) -> str | None:
        """Await a turn's task (``run_turn`` runs in a task of its own, so that the turn
        timeout and shutdown do not depend on the host letting a cancellation through).
        A turn still running at half its timeout is logged (WARNING).

        Raises:
            TimeoutError: the turn ran past ``turn_timeout`` (it was cancelled, and has
                ended).
            RuntimeError: ``run_turn`` raised ``CancelledError`` although nobody cancelled
                it (the host's own cancellation escaped).
        """
        half = self.turn_timeout / 2
        try:
            done, _ = await asyncio.wait({child}, timeout=half)
            if not done:
                _log.warning(
                    "turn %s for %s is still running after %.0f s, half its turn_timeout",
                    running.turn_id,
                    running.where(),
                    half,
                )
                done, _ = await asyncio.wait({child}, timeout=self.turn_timeout - half)
        except asyncio.CancelledError:
            await self._stop_turn(child, running, until_ended=False)
            raise
        if not done:
            await self._stop_turn(child, running, until_ended=True)
            raise TimeoutError
        if child.cancelled():
            raise RuntimeError("run_turn raised CancelledError")
        return child.result()

    async def _stop_turn(
        self, child: asyncio.Task[str | None], running: RunningTurn, *, until_ended: bool
    ) -> None:
        """Cancel a turn and wait for it to end: for good when ``until_ended`` (its session
        must not run another turn meanwhile), else up to ``cancel_grace`` (shutdown, which
        :meth:`close` finishes). Logs a turn that ignores it, naming its chat."""
        running.cancelled_at = self._clock()
        child.cancel()
        try:
            await asyncio.wait({child}, timeout=self.cancel_grace)
            if not child.done():
                _log.error(
                    "turn %s for %s ignored its cancellation for %g s (let CancelledError "
                    "propagate out of run_turn); %s",
                    running.turn_id,
                    running.where(),
                    self.cancel_grace,
                    "its session waits for it to end" if until_ended else "abandoning it",
                )
                if until_ended:
                    await asyncio.wait({child})
        finally:
            if child.done():
                _retrieve(child)
            else:
                child.add_done_callback(_retrieve)

    def _begin(self, turn: Turn, entry: TurnEntry) -> None:
        """Everything that goes out when a turn starts, none of it awaited."""
        self.stats.turns_started += 1
        self.active += 1
        if self.active == 1:
            self.writer.status(AgentSessionStatus.ACTIVE)
        for event in turn.events:
            target_type, target_id = step_target(event)
            is_task = event.task_id is not None
            self.writer.step(
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
                ),
                _stream(turn.session_key, turn.event),
            )
        for key in entry.keys:
            record = self.ledger.get(key)
            if record is not None:
                self.writer.mark_received(record.source_type, record.source_id, key)
        if turn.chat_id:
            self.presence.typing_start(turn.chat_id)

    def _end(self, turn: Turn) -> None:
        if turn.chat_id:
            self.presence.typing_stop(turn.chat_id)
        self.active -= 1
        if self.active == 0:
            self.writer.status(AgentSessionStatus.IDLE)

    def _failed(self, turn: Turn, run: TurnRun, exc: Exception) -> None:
        self.stats.turns_failed += 1
        message = f"{type(exc).__name__}: {exc}"[:ERROR_MESSAGE_LIMIT]
        if isinstance(exc, TimeoutError):
            message = f"turn timed out after {self.turn_timeout:g} s"
        entry = run.entry
        failure = self.ledger.turn_failed(
            entry.turn_id, message, now=self._clock(), sent=run.sends > 0
        )
        target_type, target_id = step_target(turn.event)
        self.writer.step(
            AgentStep(
                step_type=StepType.ERROR,
                target_type=target_type,
                target_id=target_id,
                content={"message": message, "attempts": failure.attempts},
                group_key=turn.group_key,
            ),
            _stream(turn.session_key, turn.event),
        )
        if failure.split:
            _log.warning(
                "turn %s for %s failed: %s; its %d events are tried again in two halves, "
                "so a poison event fails alone",
                entry.turn_id,
                turn.event.target_id,
                message,
                len(entry.keys),
            )
        elif entry.keys:
            _log.warning(
                "turn %s for %s failed (attempt %d): %s",
                entry.turn_id,
                turn.event.target_id,
                failure.attempts,
                message,
            )
        else:
            _log.warning("turn %s for %s failed: %s", entry.turn_id, turn.event.target_id, message)
        if failure.dead:
            self.dead_letter(failure.dead, exc, failure.attempts)
        for plan in failure.acks:
            self.writer.ack(plan)
        if failure.retrying:
            self._on_retry()

    def dead_letter(
        self, events: Sequence[ParallEvent], error: BaseException, attempts: int
    ) -> None:
        """Events the ledger gave up on: logged, and handed to ``on_dead_letter``."""
        _log.warning(
            "dead-lettered %d event(s) after %d failed attempts: %s",
            len(events),
            attempts,
            ", ".join(event.key for event in events),
        )
        self._hooks.spawn(self._call_dead_letter(events, error), name="parall-dead-letter")

    async def _call_dead_letter(self, events: Sequence[ParallEvent], error: BaseException) -> None:
        try:
            async with asyncio.timeout(self.hook_timeout):
                await self.runtime.on_dead_letter(list(events), error)
        except Exception:
            _log.exception("on_dead_letter failed")

    async def close(self, grace: float) -> None:
        """After the lanes closed: give dead-letter hooks ``grace`` seconds, and stop
        the turns whose lane was cancelled while they ignored their cancellation."""
        await self._hooks.close(grace=grace)
        left = [child for child in self._tasks if not child.done()]
        if left:
            now = self._clock()
            for child in left:
                self._tasks[child].cancelled_at = now
                child.cancel()
            await asyncio.wait(left, timeout=self.cancel_grace)
            if still := [child for child in left if not child.done()]:
                _log.error(
                    "shutdown: abandoning %d turn(s) that ignore their cancellation, for %s",
                    len(still),
                    ", ".join(
                        self._tasks[child].where() for child in still if child in self._tasks
                    ),
                )


def _stream(session_key: str, event: ParallEvent) -> str:
    """The writer stream of a turn's steps: its session and its chat (or task). A chat's
    steps keep their order; the main session's turns for other chats write alongside."""
    return f"{session_key}|{event.target_id}"


def _retrieve(task: asyncio.Task[str | None]) -> None:
    """Mark a finished turn's outcome as seen (it was already accounted for)."""
    if not task.cancelled():
        task.exception()
