"""``Gateway``: connects an :class:`AgentRuntime` to the Parall platform.

A host does::

    gateway = Gateway(GatewayConfig.from_env(), MyRuntime())
    await gateway.start(abort_event)   # runs until abort_event is set

Start-up: open the state store, authenticate (``get_me``), load what the store
kept of a previous run into the ledger, mark that run's agent session
completed if it crashed, create this run's session, apply the platform
config; then, before anything new is dispatched, ack what the previous run
completed but did not ack and run its interrupted turns again; then connect
the WebSocket (retried with backoff, resumed from the stored ``last_seq``)
while reconciliation runs from the start. An event's path reads one way:
frame, intake, ledger, lane, turn, ledger, acks. Shutdown is graceful
(DESIGN.md section 3, "Shutdown").
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import attrs

from .._retry import retry_transient
from .._tasks import TaskSet
from ..client import ParallClient
from ..errors import ConfigurationError, LeaseLost, ParallError, StateStoreError
from ..models import (
    AgentSession,
    AgentSessionStatus,
    AgentStep,
    StepType,
    TargetType,
    User,
    UserType,
)
from ..routing import DefaultRoutingStrategy, RoutingStrategy
from ..runtime import AgentRuntime, GatewayInfo, SessionRef, step_target
from ..state import MemoryStateStore, SqliteStateStore, StateStore, StoreIdentity, StoreMeta
from ..ws import Backoff, ConnectionState, ParallWs, decode_payload, ws_url_from_base
from .config import GatewayConfig
from .config_sync import ConfigSync
from .intake import Intake
from .lanes import Board, Lanes
from .ledger import Ledger, Restored
from .persist import Persister
from .pipeline import ItemPipeline
from .presence import Presence
from .reconciler import Reconciler
from .sources import ChatCache, Sources
from .supervisor import Supervisor
from .turns import Turns
from .writer import PlatformWriter

__all__ = ["Gateway", "GatewayStats"]

_log = logging.getLogger("parall_bridge.gateway")

T = TypeVar("T")

RUNTIME_TYPE: Final = "parall_bridge"
"""The ``runtime_type`` of the agent session the gateway creates."""
INTERRUPTED_RUN: Final = "this run was interrupted (the process stopped); a new run took over"
"""The error step written into a crashed run's agent session."""


@attrs.frozen
class GatewayStats:
    """A snapshot of a gateway (:meth:`Gateway.stats`).

    Attributes:
        ledger: how many events are in each state (claimed, queued, running,
            done, acked, failed, dead).
        queued: events waiting in a queue (main and forks).
        main_busy: the main session has work.
        forks_open: forks open now.
        active_turns: turns running now.
        dead_letters: events dead-lettered since start (the ledger's count).
        turns_started, turns_succeeded, turns_failed, turns_cancelled: turn counters.
        acks_sent, acks_failed: ack requests.
        steps_written, steps_failed: platform writes (steps and status changes).
        connection: the WebSocket state.
        cold_start_skipped: dispatch items settled without a turn by the cold-start
            rule (``cold_start_window``).
        journaled_turns: turns in the journal (running, interrupted, or pinned for a
            retry).
        store: what keeps the state (``memory``, or the SQLite file).
        store_writes, store_failures: transactions written to the store, and failed.
        writes_pending: platform writes (acks, mark-received, steps, a status change)
            waiting or in flight: the writer's backlog.
        writes_shed: steps and mark-received calls dropped because the writer was
            ``queue_limit`` behind (each counted and logged, never silently).
        writes_abandoned: writes still unwritten when the shutdown flush timed out.
        running: one mapping per turn whose ``run_turn`` has not ended, oldest first:
            ``chat_id``, ``task_id``, ``session_key``, ``age`` (seconds), ``overdue``
            (past ``turn_timeout``), ``ignored_cancellation`` (still running
            ``cancel_grace`` after it was cancelled: stuck in the host's code).
    """

    ledger: Mapping[str, int]
    queued: int
    main_busy: bool
    forks_open: int
    active_turns: int
    dead_letters: int
    turns_started: int
    turns_succeeded: int
    turns_failed: int
    turns_cancelled: int
    acks_sent: int
    acks_failed: int
    steps_written: int
    steps_failed: int
    connection: str
    cold_start_skipped: int = 0
    journaled_turns: int = 0
    store: str = "memory"
    store_writes: int = 0
    store_failures: int = 0
    running: tuple[Mapping[str, Any], ...] = ()
    writes_pending: int = 0
    writes_shed: int = 0
    writes_abandoned: int = 0


class Gateway:
    """The orchestrator between the Parall platform and an :class:`AgentRuntime`.

    Args:
        config: who to run as, and the tunables.
        runtime: the host's runtime.
        routing: the routing strategy (``DefaultRoutingStrategy(config.max_forks)``).
        client: a :class:`ParallClient` to use (the caller keeps ownership);
            by default the gateway makes and closes its own.
        store: where to keep what must survive a restart; wins over
            ``config.state_path``. The caller keeps ownership: the gateway opens
            it if needed and never closes it. By default a
            :class:`~parall_bridge.SqliteStateStore` on ``config.state_path``, or a
            :class:`~parall_bridge.MemoryStateStore`, which the gateway closes.
        backoff: retry delays for start-up and for the WebSocket's reconnects.
    """

    def __init__(
        self,
        config: GatewayConfig,
        runtime: AgentRuntime,
        *,
        routing: RoutingStrategy | None = None,
        client: ParallClient | None = None,
        store: StateStore | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        if not isinstance(runtime, AgentRuntime):
            raise TypeError("runtime must be an AgentRuntime")
        if not inspect.iscoroutinefunction(runtime.run_turn):
            raise TypeError(
                f"{type(runtime).__name__}.run_turn must be a coroutine function (async def)"
            )
        if store is not None and not isinstance(store, StateStore):
            raise TypeError("store must be a StateStore")
        self._config = config
        self._runtime = runtime
        self._routing: RoutingStrategy = routing or DefaultRoutingStrategy(config.max_forks)
        self._client = client
        self._owns_client = client is None
        self._owns_store = store is None
        if store is None:
            store = (
                SqliteStateStore(config.state_path)
                if config.state_path is not None
                else MemoryStateStore()
            )
        self._store: StateStore = store
        self._backoff = backoff or Backoff()
        self._clock: Callable[[], float] = time.monotonic
        self._ledger = Ledger(
            capacity=config.dedupe_capacity,
            max_attempts=config.max_dispatch_attempts,
            retry_base=config.reconcile_interval,
            ack_dead=config.ack_dead_letters,
        )
        self._started = False
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None
        self._ready = asyncio.Event()
        self._ready_error: BaseException | None = None
        self._agent: User | None = None
        self._session: AgentSession | None = None
        self._supervisor: Supervisor | None = None
        self._store_loaded = False

    def __repr__(self) -> str:
        return f"Gateway(org_id={self._config.org_id!r}, account_id={self._config.account_id!r})"

    # --- public surface -----------------------------------------------------------------

    @property
    def config(self) -> GatewayConfig:
        """The configuration."""
        return self._config

    @property
    def store(self) -> StateStore:
        """The state store."""
        return self._store

    @property
    def agent_id(self) -> str | None:
        """The agent's user id, once authenticated."""
        return self._agent.id if self._agent else None

    @property
    def session_id(self) -> str | None:
        """The platform AgentSession id, once created."""
        return self._session.id if self._session else None

    @property
    def ws(self) -> ParallWs | None:
        """The WebSocket client, once started."""
        return self._supervisor.ws if self._supervisor else None

    async def wait_ready(self) -> None:
        """Return once the first connection and the first catch-up pass are done.

        Raises the start-up error if the gateway stopped before being ready.
        """
        await self._ready.wait()
        if self._ready_error is not None:
            raise self._ready_error

    def stats(self) -> GatewayStats:
        """A snapshot of the ledger, the lanes and the platform writes."""
        ledger = self._ledger
        supervisor = self._supervisor
        if supervisor is None:
            return GatewayStats(
                ledger=ledger.counts(),
                queued=0,
                main_busy=False,
                forks_open=0,
                active_turns=0,
                dead_letters=ledger.dead_total,
                turns_started=0,
                turns_succeeded=0,
                turns_failed=0,
                turns_cancelled=0,
                acks_sent=0,
                acks_failed=0,
                steps_written=0,
                steps_failed=0,
                connection=ConnectionState.DISCONNECTED.value,
                journaled_turns=len(ledger.journal),
                store=self._store.description,
            )
        lanes, turns, writer = supervisor.lanes, supervisor.turns, supervisor.writer
        return GatewayStats(
            ledger=ledger.counts(),
            queued=lanes.queued,
            main_busy=lanes.main.busy,
            forks_open=len(lanes.forks),
            active_turns=turns.active,
            dead_letters=ledger.dead_total,
            turns_started=turns.stats.turns_started,
            turns_succeeded=turns.stats.turns_succeeded,
            turns_failed=turns.stats.turns_failed,
            turns_cancelled=turns.stats.turns_cancelled,
            acks_sent=writer.stats.acks_sent,
            acks_failed=writer.stats.acks_failed,
            steps_written=writer.stats.steps_written + writer.stats.statuses_written,
            steps_failed=writer.stats.steps_failed,
            connection=supervisor.ws.state.value,
            cold_start_skipped=supervisor.reconciler.cold_start_skipped,
            journaled_turns=len(ledger.journal),
            store=self._store.description,
            store_writes=supervisor.persister.writes,
            store_failures=supervisor.persister.failures,
            running=turns.running(),
            writes_pending=writer.pending,
            writes_shed=writer.stats.shed,
            writes_abandoned=writer.stats.abandoned,
        )

    async def feed(self, frame_type: str, payload: Any) -> bool:
        """Push an inbound event into the gateway without a socket (aiogram's
        ``feed_update``): ``frame_type`` is a WebSocket frame type (``message.new``,
        ``task.assigned``, ``dispatch.new``, ``chat.update``, ...), ``payload`` its typed
        model or raw ``data`` mapping.

        It goes through the same intake as a WebSocket frame, after the frames
        before it; returns once it was handled, with whether a turn was scheduled.

        Raises:
            RuntimeError: the gateway is not running.
        """
        supervisor = self._supervisor
        if supervisor is None or supervisor.stopping:
            raise RuntimeError("the gateway is not running")
        return await supervisor.intake.feed(frame_type, decode_payload(frame_type, payload))

    async def start(self, abort_event: asyncio.Event) -> None:
        """Run the gateway until ``abort_event`` is set, then shut down gracefully.

        Raises:
            AuthenticationError: the API key was refused (at once, not retried).
            ConfigurationError: ``agent_id`` does not match the key's user.
            StateStoreError: the state store is held by another gateway, belongs to
                another agent, or cannot be read (before anything is dispatched).
            LeaseLost: the store's account lease was lost while running (another
                process may run the account now): the gateway stopped at once, after
                a shutdown that sent and acked nothing more.
            WebSocketClosedError: the platform closed the connection for good
                (4003), after a clean shutdown.
        """
        if self._started:
            raise RuntimeError("a Gateway runs once; make a new one")
        self._started = True
        watchers = TaskSet(_log)
        watchers.spawn(self._watch_abort(abort_event), name="parall-gateway-abort")
        try:
            supervisor = await self._boot()
            if supervisor is not None:
                supervisor.run()
                await self._stop.wait()
        except BaseException as exc:
            self._set_ready(exc)
            raise
        finally:
            try:
                if self._supervisor is not None:
                    await self._supervisor.shutdown()
                if self._client is not None and self._owns_client:
                    await self._client.close()
            finally:
                try:
                    await self._close_store()
                finally:
                    await watchers.cancel()
                    self._set_ready(
                        self._fatal or RuntimeError("the gateway stopped before it was ready")
                    )
                    _log.info("gateway stopped")
        if self._fatal is not None:
            raise self._fatal

    # --- start-up --------------------------------------------------------------------------

    async def _watch_abort(self, abort_event: asyncio.Event) -> None:
        await abort_event.wait()
        _log.info("abort requested: shutting down")
        self._request_stop(None)

    def _request_stop(self, fatal: BaseException | None) -> None:
        if fatal is not None and self._fatal is None:
            self._fatal = fatal
        self._stop.set()

    def _set_ready(self, error: BaseException | None = None) -> None:
        if not self._ready.is_set():
            self._ready_error = error
            self._ready.set()

    def _lease_lost(self, error: LeaseLost) -> None:
        """The store's account lease is lost: another process may run this account now.
        Stop at once (nothing more is sent or acked: every send and ack waits on the
        store) and end ``start()`` with the error."""
        _log.error("stopping: %s", str(error))
        self._request_stop(error)

    async def _release_store(self) -> None:
        """Done with the store (in the shutdown, once everything is flushed, before
        ``on_stop``; else when the gateway closes)."""
        if self._store_loaded:
            self._store_loaded = False
            await self._store.release()

    async def _close_store(self) -> None:
        await self._release_store()
        if self._owns_store:
            await self._store.close()

    async def _unless_stopped(self, work: Awaitable[None], what: str) -> bool:
        """Await ``work`` unless a stop is requested first, which cancels it (a host's
        ``on_start`` that hangs must not hold the shutdown); returns whether it ran to
        the end."""
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        task.set_name(f"parall-gateway-{what}")
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, stopped):
                pending.cancel()
            await asyncio.gather(stopped, return_exceptions=True)
            if not task.done():
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            _log.info("stop requested during %s: cancelled it", what)
            return False
        task.result()  # its error, if it failed
        return True

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T | None:
        """Call until it succeeds; transient platform errors are retried with backoff (the
        retry module's rule). Returns ``None`` when a stop is requested first."""
        return await retry_transient(call, backoff=self._backoff, stop=self._stop, what=what)

    async def _boot(self) -> Supervisor | None:
        """Open the store, authenticate, restore the ledger, create the agent session,
        build the parts and replay what the previous run left (``None`` when a stop was
        requested first)."""
        config = self._config
        store = self._store
        try:
            await store.open()  # fails fast when another gateway holds the file
        except StateStoreError as exc:
            raise StateStoreError(f"{exc} (account {config.account_id!r})") from exc
        if self._client is None:
            self._client = ParallClient(
                config.parall_url, config.api_key, verify_tls=config.verify_tls
            )
        client = self._client
        me = await self._retrying(client.get_me, "authenticate")
        if me is None:
            return None
        if config.agent_id is not None and me.id != config.agent_id:
            raise ConfigurationError(
                f"agent_id {config.agent_id!r} does not match the API key's user {me.id!r}"
            )
        self._agent = me
        _log.info("authenticated as %s (%s)", me.display_name or me.id, me.id)
        if me.type != UserType.AGENT:
            _log.warning("the API key belongs to a %s user, not an agent", me.type)
        stored = await store.load(
            StoreIdentity(config.parall_url, config.org_id, me.id, config.account_id)
        )
        self._store_loaded = True
        restored = Restored()
        if not stored.empty:
            restored = self._ledger.restore(stored, now=self._clock(), wall=time.time())
            _log.info(
                "state store %s: %d record(s), %d journaled turn(s) from the previous run",
                store.description,
                len(self._ledger),
                len(self._ledger.journal),
            )
        if stored.meta.session_id is not None:
            await self._end_previous_session(client, me.id, stored.meta.session_id)
        session = await self._retrying(
            lambda: client.create_agent_session(
                config.org_id,
                me.id,
                runtime_type=RUNTIME_TYPE,
                runtime_key=config.main_session_key,
                runtime_ref={"hostname": socket.gethostname(), "pid": os.getpid()},
            ),
            "create the agent session",
        )
        if session is None:
            return None
        self._session = session
        _log.info("agent session %s", session.id)
        supervisor = self._build(client, me.id, session.id, stored.meta)
        self._supervisor = supervisor  # shut down by start() from here on, whatever happens
        info = GatewayInfo(
            agent_id=me.id,
            org_id=config.org_id,
            account_id=config.account_id,
            session_id=session.id,
        )
        if not await self._unless_stopped(self._runtime.on_start(info), "on_start"):
            return None  # the shutdown (from start()) still runs, on_stop included
        await supervisor.config.apply()
        if restored.resume or restored.dead:
            # The attempts a crash counted are on disk before the turn runs again: a turn
            # that kills its process at once is still dead-lettered in the end.
            await supervisor.persister.flush_once()
        self._replay(supervisor, restored)
        return supervisor

    def _build(
        self, client: ParallClient, agent_id: str, session_id: str, meta: StoreMeta
    ) -> Supervisor:
        """Make the parts of a running gateway, wired one way: intake, sources, ledger,
        lanes, turns, writer."""
        config = self._config
        ledger = self._ledger
        persister = Persister(
            self._store, ledger, meta, clock=self._clock, on_lease_lost=self._lease_lost
        )
        persister.set_session(session_id)
        persister.start()
        writer = PlatformWriter(
            client,
            config.org_id,
            agent_id,
            ledger=ledger,
            durable=persister.durable,
            concurrency=config.write_concurrency,
        )
        writer.start(session_id)
        ws = ParallWs(
            client.get_ws_ticket,
            config.ws_url or ws_url_from_base(config.parall_url),
            backoff=self._backoff,
            last_seq=meta.last_seq,
            verify_tls=config.verify_tls,
        )
        presence = Presence(
            ws, typing_refresh=config.typing_refresh, drift_warning=config.heartbeat_drift_warning
        )
        retry_wake = asyncio.Event()  # a failed turn set a retry time: the reconciler looks
        turns = Turns(
            runtime=self._runtime,
            ledger=ledger,
            writer=writer,
            persister=persister,
            presence=presence,
            client=client,
            org_id=config.org_id,
            agent_id=agent_id,
            turn_timeout=config.turn_timeout,
            cancel_grace=config.cancel_grace,
            hook_timeout=config.hook_timeout,
            on_retry=retry_wake.set,
            clock=self._clock,
        )
        board = Board(ledger, self._routing, SessionRef(config.main_session_key), config.max_forks)
        lanes = Lanes(
            board=board, turns=turns, runtime=self._runtime, release_timeout=config.hook_timeout
        )
        chats = ChatCache(client, config.org_id)
        sources = Sources(
            client=client,
            org_id=config.org_id,
            agent_id=agent_id,
            ledger=ledger,
            lanes=lanes,
            writer=writer,
            chats=chats,
            clock=self._clock,
            dead_letter=turns.dead_letter,
            max_body_chars=config.max_body_chars,
        )
        pipeline = ItemPipeline(config.fetch_concurrency)
        reconciler = Reconciler(
            client=client,
            org_id=config.org_id,
            sources=sources,
            pipeline=pipeline,
            next_retry_at=ledger.next_retry_at,
            interval=config.reconcile_interval,
            outage_interval=config.outage_poll_interval,
            connected=lambda: ws.state is ConnectionState.CONNECTED,
            cold_start_window=config.cold_start_window,
            previous_heard=meta.last_heard_at,
            clock=self._clock,
            heard=persister.heard,
            ready=self._set_ready,
            wake=retry_wake,
        )
        # Connected or not sets the reconciler's pace: it looks again at every change.
        ws.on_state_change(lambda _: reconciler.poke())
        platform_config = ConfigSync(
            client, config.org_id, agent_id, self._runtime, hook_timeout=config.hook_timeout
        )

        def heard() -> None:
            persister.heard()
            persister.set_last_seq(ws.last_seq)

        intake = Intake(
            ws=ws,
            sources=sources,
            pipeline=pipeline,
            chats=chats,
            presence=presence,
            reconciler=reconciler,
            config=platform_config,
            heard=heard,
        )
        return Supervisor(
            runtime=self._runtime,
            config=platform_config,
            ws=ws,
            intake=intake,
            pipeline=pipeline,
            reconciler=reconciler,
            lanes=lanes,
            turns=turns,
            ledger=ledger,
            presence=presence,
            writer=writer,
            persister=persister,
            backoff=self._backoff,
            shutdown_grace=config.shutdown_grace,
            hook_timeout=config.hook_timeout,
            clock=self._clock,
            stop=self._request_stop,
            stop_event=self._stop,
            flushed=self._release_store,
        )

    def _replay(self, supervisor: Supervisor, restored: Restored) -> None:
        """Before anything new: ack what the previous run completed but did not ack,
        dead-letter what crashed it too often, run its interrupted turns again."""
        for plan in restored.acks:
            supervisor.writer.ack(plan)
        for events, error in restored.dead:
            supervisor.turns.dead_letter(
                events, RuntimeError(error), self._config.max_dispatch_attempts
            )
            target_type, target_id = step_target(events[-1])
            supervisor.writer.step(
                AgentStep(
                    step_type=StepType.ERROR,
                    target_type=target_type,
                    target_id=target_id,
                    content={"message": error, "attempts": self._config.max_dispatch_attempts},
                )
            )
        for entry in restored.resume:
            _log.info(
                "running turn %s again first (%d event(s)): the previous run %s",
                entry.turn_id,
                len(entry.keys),
                "was interrupted during it",
            )
            supervisor.lanes.resume(entry)
        if restored.acks or restored.resume or restored.dead:
            _log.info(
                "restart: %d ack(s) owed, %d turn(s) run again, %d group(s) dead-lettered",
                len(restored.acks),
                len(restored.resume),
                len(restored.dead),
            )

    async def _end_previous_session(
        self, client: ParallClient, agent_id: str, session_id: str
    ) -> None:
        """The previous run crashed with its session open: mark it completed, with an
        error step saying why, so the platform does not show it active forever."""
        org_id = self._config.org_id
        try:
            await client.create_agent_step(
                org_id,
                agent_id,
                session_id,
                AgentStep(
                    step_type=StepType.ERROR,
                    target_type=TargetType.NONE,
                    content={"message": INTERRUPTED_RUN},
                ),
            )
            await client.update_agent_session(
                org_id, agent_id, session_id, status=AgentSessionStatus.COMPLETED
            )
            _log.info("previous run's agent session %s marked completed", session_id)
        except ParallError as exc:
            _log.warning(
                "could not mark the previous run's agent session %s completed: %s",
                session_id,
                str(exc),
            )
