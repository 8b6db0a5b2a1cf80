"""The running machinery of a :class:`~parall_bridge.Gateway`, built once it has
authenticated and created its agent session: the intake of inbound frames (one
queue, in arrival order), the WebSocket connection, catch-up and
reconciliation, the platform config, and the ordered shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import attrs

from .. import protocol as p
from .._tasks import TaskSet
from ..client import ParallClient
from ..errors import (
    ParallConnectionError,
    ParallError,
    RateLimitedError,
    ServerError,
    WebSocketClosedError,
)
from ..events import EventOrigin
from ..models import AgentSessionStatus, ChatUpdate, DispatchItem, Hello, Message, Task
from ..runtime import AgentRuntime
from ..ws import Backoff, ParallWs
from .config import GatewayConfig
from .lanes import Lanes
from .ledger import Ledger
from .presence import Presence
from .sources import ChatCache, ItemOutcome, Sources
from .writer import PlatformWriter

__all__ = ["TRANSIENT_ERRORS", "Engine"]

_log = logging.getLogger("parall_bridge.gateway")

FLUSH_TIMEOUT: Final = 10.0
"""Seconds shutdown waits for queued steps and acks to reach the platform."""
HOOK_TIMEOUT: Final = 30.0
"""Seconds ``on_stop`` and ``apply_platform_config`` may take."""
DISPATCH_PAGE_SIZE: Final = 50

TRANSIENT_ERRORS: Final = (ServerError, RateLimitedError, ParallConnectionError)
"""Platform errors worth retrying later (an outage, not a refusal)."""

INBOUND_FRAMES: Final = (
    p.FRAME_HELLO,
    p.FRAME_MESSAGE_NEW,
    p.FRAME_TASK_ASSIGNED,
    p.FRAME_DISPATCH_NEW,
    p.FRAME_CHAT_UPDATE,
    p.FRAME_AGENT_CONFIG_UPDATE,
    p.FRAME_RECOVERY_OVERFLOW,
)


@attrs.define
class Inbound:
    """One inbound frame waiting in the intake queue."""

    frame_type: str
    payload: Any
    done: asyncio.Future[bool] | None = None


class Engine:
    """Everything a started gateway runs; made by :meth:`Gateway.start`."""

    def __init__(
        self,
        *,
        config: GatewayConfig,
        runtime: AgentRuntime,
        client: ParallClient,
        agent_id: str,
        ledger: Ledger,
        writer: PlatformWriter,
        ws: ParallWs,
        presence: Presence,
        lanes: Lanes,
        chats: ChatCache,
        sources: Sources,
        backoff: Backoff,
        clock: Callable[[], float],
        stop: Callable[[BaseException | None], None],
        stop_event: asyncio.Event,
        wake: asyncio.Event,
        ready: Callable[[], None],
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.client = client
        self.agent_id = agent_id
        self.ledger = ledger
        self.writer = writer
        self.ws = ws
        self.presence = presence
        self.lanes = lanes
        self.chats = chats
        self.sources = sources
        self._backoff = backoff
        self._clock = clock
        self._request_stop = stop
        self._stop_event = stop_event
        self._ready = ready
        self._tasks = TaskSet(_log)
        self._intake: asyncio.Queue[Inbound] = asyncio.Queue()
        self._wake = wake
        self._stopping = False
        self._hello_seen = False
        self._catch_up_count = 0
        self._catch_up_requested = False
        self._config_again = False
        self._config_task: asyncio.Task[None] | None = None

    def run(self) -> None:
        """Subscribe to the WebSocket and start the intake, reconciler and connection."""
        for frame_type in INBOUND_FRAMES:
            self.ws.on(frame_type, self._inbound_handler(frame_type))
        self._tasks.spawn(self._intake_worker(), name="parall-gateway-intake")
        self._tasks.spawn(self._reconciler(), name="parall-gateway-reconciler")
        self._tasks.spawn(self._connect(), name="parall-gateway-connect")

    @property
    def stopping(self) -> bool:
        """Whether shutdown has begun."""
        return self._stopping

    def poke(self) -> None:
        """Wake the reconciler (a failed turn changed the next retry time)."""
        self._wake.set()

    async def feed(self, frame_type: str, payload: Any) -> bool:
        """Queue a frame behind the ones before it; returns once it was handled."""
        if self._stopping:
            raise RuntimeError("the gateway is stopping")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._intake.put_nowait(Inbound(frame_type, payload, done))
        return await done

    async def sleep_or_stop(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; returns ``True`` if a stop was requested meanwhile."""
        return await sleep_or_stop(self._stop_event, delay)

    def _inbound_handler(self, frame_type: str) -> Callable[[Any], None]:
        def handle(payload: Any) -> None:
            if not self._stopping:
                self._intake.put_nowait(Inbound(frame_type, payload))

        return handle

    async def _connect(self) -> None:
        """Connect the WebSocket, retrying with backoff; then watch for a fatal close."""
        ws = self.ws
        failures = 0
        while not self._stopping:
            try:
                await ws.connect()
                break
            except WebSocketClosedError as exc:
                self._request_stop(exc)
                return
            except ParallError as exc:
                if isinstance(exc, TRANSIENT_ERRORS) or not hasattr(exc, "status"):
                    delay = self._backoff.delay(failures)
                    failures += 1
                    _log.warning(
                        "WebSocket connection failed (%s); retrying in %.1f s", str(exc), delay
                    )
                    if await self.sleep_or_stop(delay):
                        return
                    continue
                self._request_stop(exc)
                return
        try:
            await ws.wait_closed()
        except WebSocketClosedError as exc:
            _log.error("the platform closed the connection for good: %s", str(exc))
            self._request_stop(exc)

    async def apply_config(self) -> None:
        """Fetch the platform config and hand it to the runtime; failures are logged."""
        try:
            config = await self.client.get_agent_config(self.config.org_id, self.agent_id)
            async with asyncio.timeout(HOOK_TIMEOUT):
                await self.runtime.apply_platform_config(config)
            _log.info("platform config version %d applied", config.version)
        except (ParallError, TimeoutError) as exc:
            _log.warning("platform config not applied: %s", str(exc))
        except Exception:
            _log.exception("apply_platform_config failed")

    def _refresh_config(self) -> None:
        if self._config_task is not None and not self._config_task.done():
            self._config_again = True
            return
        self._config_task = self._tasks.spawn(self._config_loop(), name="parall-gateway-config")

    async def _config_loop(self) -> None:
        while True:
            self._config_again = False
            await self.apply_config()
            if not self._config_again or self._stopping:
                return

    # --- intake -----------------------------------------------------------------------------

    async def _intake_worker(self) -> None:
        while True:
            item = await self._intake.get()
            routed = False
            try:
                routed = await self._process(item.frame_type, item.payload)
            except Exception:
                _log.exception("handling a %s frame failed", item.frame_type)
            finally:
                if item.done is not None and not item.done.done():
                    item.done.set_result(routed)

    async def _process(self, frame_type: str, payload: Any) -> bool:
        sources = self.sources
        if frame_type == p.FRAME_MESSAGE_NEW and isinstance(payload, Message):
            return await sources.on_message(payload)
        if frame_type == p.FRAME_TASK_ASSIGNED and isinstance(payload, Task):
            return await sources.on_task(payload)
        if frame_type == p.FRAME_DISPATCH_NEW and isinstance(payload, DispatchItem):
            outcome = await sources.on_item(payload, EventOrigin.DISPATCH_NEW)
            return outcome is ItemOutcome.DISPATCHED
        if frame_type == p.FRAME_CHAT_UPDATE and isinstance(payload, ChatUpdate):
            self.chats.apply(payload)
        elif frame_type == p.FRAME_HELLO and isinstance(payload, Hello):
            await self._on_hello(payload)
        elif frame_type == p.FRAME_AGENT_CONFIG_UPDATE:
            _log.info("platform config changed: fetching it")
            self._refresh_config()
        elif frame_type == p.FRAME_RECOVERY_OVERFLOW:
            _log.warning("the platform lost events (recovery.overflow): full catch-up")
            self._request_catch_up()
        else:
            _log.debug("ignoring a %s frame", frame_type)
        return False

    async def _on_hello(self, hello: Hello) -> None:
        try:
            count = await self.chats.load()
            _log.info("connected; %d chats cached", count)
        except ParallError as exc:
            _log.warning("could not load the chats: %s", str(exc))
        self.presence.restart_heartbeat(hello.session_id, self.ws.heartbeat_interval)
        self._hello_seen = True
        self._request_catch_up()

    # --- catch-up and reconciliation ------------------------------------------------------------

    def _request_catch_up(self) -> None:
        self._catch_up_requested = True
        self.poke()

    async def _reconciler(self) -> None:
        """Catch-up after every hello and on overflow, on a timer from the start, and
        retries of failed events when they fall due."""
        interval = self.config.reconcile_interval
        next_pass = self._clock() + interval
        while not self._stopping:
            wake_at = next_pass
            retry_at = self.ledger.next_retry_at()
            if retry_at is not None:
                wake_at = min(wake_at, retry_at)
            if not self._catch_up_requested:
                try:
                    async with asyncio.timeout(max(0.0, wake_at - self._clock())):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            if self._stopping:
                return
            try:
                if self._catch_up_requested or self._clock() >= next_pass:
                    self._catch_up_requested = False
                    await self._catch_up()
                    next_pass = self._clock() + interval
                self.sources.retry_due()
            except Exception:
                # A bug must not end reconciliation for the rest of the run: the next
                # pass (on the timer, or the next request) tries again.
                _log.exception("reconciliation pass failed")
                next_pass = self._clock() + interval

    async def _catch_up(self) -> None:
        """One pass over the pending dispatch items, oldest first."""
        first = self._catch_up_count == 0
        window = self.config.cold_start_window
        cutoff = (
            datetime.now(UTC) - timedelta(seconds=window) if first and window is not None else None
        )
        items: list[DispatchItem] = []
        try:
            # Listed fully before any is handled: acks during paging must not shift pages.
            async for item in self.client.iter_dispatch(
                self.config.org_id, page_size=DISPATCH_PAGE_SIZE
            ):
                items.append(item)
        except ParallError as exc:
            _log.warning("catch-up could not list the dispatch queue: %s", str(exc))
            return
        self._catch_up_count += 1
        outcomes: dict[ItemOutcome, int] = {}
        for item in items:
            if self._stopping:
                return
            try:
                outcome = await self.sources.on_item(item, EventOrigin.CATCH_UP, cutoff)
            except Exception:
                # One item must not stop the pass; it stays pending for the next one.
                _log.exception("catch-up could not handle dispatch item %s", item.id)
                outcome = ItemOutcome.LEFT_PENDING
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        skipped = outcomes.get(ItemOutcome.SKIPPED_OLD, 0)
        if skipped:
            _log.warning(
                "cold start: acked %d dispatch item(s) older than %g s without a turn",
                skipped,
                window,
            )
        if items:
            _log.info(
                "catch-up: %d pending item(s): %s",
                len(items),
                ", ".join(f"{n} {o.value}" for o, n in outcomes.items()),
            )
        if self._hello_seen:
            self._ready()

    async def shutdown(self) -> None:
        """Stop taking events; let turns finish within the grace period, then cancel
        them; stop typing and heartbeats; disconnect; flush steps and acks; mark the
        session completed; call ``on_stop``. Nothing started here is left running."""
        self._stopping = True
        self.poke()
        await self._tasks.cancel()
        while not self._intake.empty():
            item = self._intake.get_nowait()
            if item.done is not None and not item.done.done():
                item.done.set_result(False)
        await self.lanes.close(self.config.shutdown_grace)
        await self.presence.close()
        await self.ws.disconnect()
        self.writer.status(AgentSessionStatus.COMPLETED)
        await self.writer.close(FLUSH_TIMEOUT)
        try:
            async with asyncio.timeout(HOOK_TIMEOUT):
                await self.runtime.on_stop()
        except Exception:
            _log.exception("on_stop failed")


async def sleep_or_stop(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds; returns ``True`` if ``stop`` was set meanwhile."""
    try:
        async with asyncio.timeout(delay):
            await stop.wait()
    except TimeoutError:
        return False
    return True
