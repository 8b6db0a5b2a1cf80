"""``Gateway``: connects an :class:`AgentRuntime` to the Parall platform.

A host does::

    gateway = Gateway(GatewayConfig.from_env(), MyRuntime())
    await gateway.start(abort_event)   # runs until abort_event is set

Start-up: authenticate (``get_me``), create the agent session, apply the
platform config, then connect the WebSocket (retried with backoff) while
reconciliation runs from the start. Every inbound frame goes through one
intake queue, in arrival order; catch-up and retries run in the reconciler.
Shutdown is graceful (DESIGN.md section 3, "Shutdown").
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

from .._tasks import TaskSet
from ..client import ParallClient
from ..errors import ConfigurationError
from ..models import AgentSession, User, UserType
from ..routing import DefaultRoutingStrategy, RoutingStrategy
from ..runtime import AgentRuntime, GatewayInfo, SessionRef
from ..ws import Backoff, ConnectionState, ParallWs, decode_payload, ws_url_from_base
from .config import GatewayConfig
from .engine import TRANSIENT_ERRORS, Engine, sleep_or_stop
from .lanes import Lanes
from .ledger import Ledger
from .presence import Presence
from .sources import ChatCache, Sources
from .writer import PlatformWriter

__all__ = ["Gateway", "GatewayStats"]

_log = logging.getLogger("parall_bridge.gateway")

T = TypeVar("T")

RUNTIME_TYPE: Final = "parall_bridge"
"""The ``runtime_type`` of the agent session the gateway creates."""


@attrs.frozen
class GatewayStats:
    """A snapshot of a gateway (:meth:`Gateway.stats`).

    Attributes:
        ledger: how many events are in each state (claimed, queued, running,
            done, failed, dead).
        queued: events waiting in a queue (main and forks).
        main_busy: the main session has work.
        forks_open: forks open now.
        active_turns: turns running now.
        dead_letters: events dead-lettered since start.
        turns_started, turns_succeeded, turns_failed, turns_cancelled: turn counters.
        acks_sent, acks_failed: ack requests.
        steps_written, steps_failed: platform writes (steps and status changes).
        connection: the WebSocket state.
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


class Gateway:
    """The orchestrator between the Parall platform and an :class:`AgentRuntime`.

    Args:
        config: who to run as, and the tunables.
        runtime: the host's runtime.
        routing: the routing strategy (``DefaultRoutingStrategy(config.max_forks)``).
        client: a :class:`ParallClient` to use (the caller keeps ownership);
            by default the gateway makes and closes its own.
        backoff: retry delays for start-up and for the WebSocket's reconnects.
    """

    def __init__(
        self,
        config: GatewayConfig,
        runtime: AgentRuntime,
        *,
        routing: RoutingStrategy | None = None,
        client: ParallClient | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        if not isinstance(runtime, AgentRuntime):
            raise TypeError("runtime must be an AgentRuntime")
        if not inspect.iscoroutinefunction(runtime.run_turn):
            raise TypeError(
                f"{type(runtime).__name__}.run_turn must be a coroutine function (async def)"
            )
        self._config = config
        self._runtime = runtime
        self._routing: RoutingStrategy = routing or DefaultRoutingStrategy(config.max_forks)
        self._client = client
        self._owns_client = client is None
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
        self._engine: Engine | None = None

    def __repr__(self) -> str:
        return f"Gateway(org_id={self._config.org_id!r}, account_id={self._config.account_id!r})"

    # --- public surface -----------------------------------------------------------------

    @property
    def config(self) -> GatewayConfig:
        """The configuration."""
        return self._config

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
        return self._engine.ws if self._engine else None

    async def wait_ready(self) -> None:
        """Return once the first connection and the first catch-up pass are done.

        Raises the start-up error if the gateway stopped before being ready.
        """
        await self._ready.wait()
        if self._ready_error is not None:
            raise self._ready_error

    def stats(self) -> GatewayStats:
        """A snapshot of the ledger, the lanes and the platform writes."""
        engine = self._engine
        if engine is None:
            return GatewayStats(
                ledger=self._ledger.counts(),
                queued=0,
                main_busy=False,
                forks_open=0,
                active_turns=0,
                dead_letters=self._ledger.dead_total,
                turns_started=0,
                turns_succeeded=0,
                turns_failed=0,
                turns_cancelled=0,
                acks_sent=0,
                acks_failed=0,
                steps_written=0,
                steps_failed=0,
                connection=ConnectionState.DISCONNECTED.value,
            )
        lanes, writer = engine.lanes, engine.writer
        return GatewayStats(
            ledger=self._ledger.counts(),
            queued=lanes.queued,
            main_busy=lanes.main.busy,
            forks_open=len(lanes.forks),
            active_turns=lanes.active_turns,
            dead_letters=self._ledger.dead_total,
            turns_started=lanes.stats.turns_started,
            turns_succeeded=lanes.stats.turns_succeeded,
            turns_failed=lanes.stats.turns_failed,
            turns_cancelled=lanes.stats.turns_cancelled,
            acks_sent=writer.stats.acks_sent,
            acks_failed=writer.stats.acks_failed,
            steps_written=writer.stats.steps_written + writer.stats.statuses_written,
            steps_failed=writer.stats.steps_failed,
            connection=engine.ws.state.value,
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
        if self._engine is None or self._engine.stopping:
            raise RuntimeError("the gateway is not running")
        return await self._engine.feed(frame_type, decode_payload(frame_type, payload))

    async def start(self, abort_event: asyncio.Event) -> None:
        """Run the gateway until ``abort_event`` is set, then shut down gracefully.

        Raises:
            AuthenticationError: the API key was refused (at once, not retried).
            ConfigurationError: ``agent_id`` does not match the key's user.
            WebSocketClosedError: the platform closed the connection for good
                (4003), after a clean shutdown.
        """
        if self._started:
            raise RuntimeError("a Gateway runs once; make a new one")
        self._started = True
        watchers = TaskSet(_log)
        watchers.spawn(self._watch_abort(abort_event), name="parall-gateway-abort")
        try:
            engine = await self._boot()
            if engine is not None:
                engine.run()
                await self._stop.wait()
        except BaseException as exc:
            self._set_ready(exc)
            raise
        finally:
            try:
                if self._engine is not None:
                    await self._engine.shutdown()
                if self._client is not None and self._owns_client:
                    await self._client.close()
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

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T | None:
        """Call until it succeeds; transient platform errors are retried with backoff.
        Returns ``None`` when a stop is requested first."""
        failures = 0
        while True:
            try:
                return await call()
            except TRANSIENT_ERRORS as exc:
                delay = self._backoff.delay(failures)
                failures += 1
                _log.warning("could not %s (%s); retrying in %.1f s", what, str(exc), delay)
                if await sleep_or_stop(self._stop, delay):
                    return None

    async def _boot(self) -> Engine | None:
        """Authenticate, create the agent session, build the engine (``None`` when a stop
        was requested first)."""
        config = self._config
        if self._client is None:
            self._client = ParallClient(config.parall_url, config.api_key)
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
        writer = PlatformWriter(client, config.org_id, me.id)
        writer.start(session.id)
        ws = ParallWs(
            client.get_ws_ticket,
            config.ws_url or ws_url_from_base(config.parall_url),
            backoff=self._backoff,
        )
        presence = Presence(
            ws, typing_refresh=config.typing_refresh, drift_warning=config.heartbeat_drift_warning
        )
        chats = ChatCache(client, config.org_id)
        wake = asyncio.Event()  # pokes the reconciler when a failed turn sets a retry time
        lanes = Lanes(
            runtime=self._runtime,
            strategy=self._routing,
            ledger=self._ledger,
            writer=writer,
            presence=presence,
            client=client,
            org_id=config.org_id,
            agent_id=me.id,
            main_session=SessionRef(config.main_session_key),
            max_forks=config.max_forks,
            turn_timeout=config.turn_timeout,
            on_failure=wake.set,
            clock=self._clock,
        )
        sources = Sources(
            client=client,
            org_id=config.org_id,
            agent_id=me.id,
            ledger=self._ledger,
            lanes=lanes,
            writer=writer,
            chats=chats,
            clock=self._clock,
        )
        engine = Engine(
            config=config,
            runtime=self._runtime,
            client=client,
            agent_id=me.id,
            ledger=self._ledger,
            writer=writer,
            ws=ws,
            presence=presence,
            lanes=lanes,
            chats=chats,
            sources=sources,
            backoff=self._backoff,
            clock=self._clock,
            stop=self._request_stop,
            stop_event=self._stop,
            wake=wake,
            ready=self._set_ready,
        )
        self._engine = engine  # shut down by start() from here on, whatever happens next
        await self._runtime.on_start(
            GatewayInfo(
                agent_id=me.id,
                org_id=config.org_id,
                account_id=config.account_id,
                session_id=session.id,
            )
        )
        await engine.apply_config()
        return engine
