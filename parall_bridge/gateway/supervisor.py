"""Supervision of a started gateway: the WebSocket connection and the ordered shutdown.

The supervisor starts the parts (intake, reconciler, connection) once the
gateway is booted, and stops them in the one order that loses nothing: stop
taking events, let turns finish within the grace period and then cancel
them, settle the ledger, stop typing and heartbeats, disconnect, flush steps
and acks, mark the session completed, write the state store, call
``on_stop``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from .._retry import is_transient, retry_transient
from .._tasks import TaskSet
from ..errors import ParallError, ProtocolError, WebSocketClosedError
from ..models import AgentSessionStatus
from ..runtime import AgentRuntime
from ..ws import Backoff, ParallWs
from .config_sync import ConfigSync
from .intake import Intake
from .lanes import Lanes
from .ledger import Ledger
from .persist import Persister
from .pipeline import ItemPipeline
from .presence import Presence
from .reconciler import Reconciler
from .turns import Turns
from .writer import PlatformWriter

__all__ = ["Supervisor"]

_log = logging.getLogger("parall_bridge.gateway")

FLUSH_TIMEOUT: Final = 10.0
"""Seconds shutdown waits for queued steps and acks to reach the platform."""
STORE_TIMEOUT: Final = 10.0
"""Seconds shutdown waits for the last changes to reach the state store."""


class Supervisor:
    """Connection and shutdown of one booted gateway.

    Args:
        runtime: the host's runtime.
        config: the platform config's sync.
        ws: the WebSocket.
        intake: the inbound frames.
        pipeline: the dispatch items being handled (closed after the intake).
        reconciler: catch-up and retries.
        lanes: the lanes.
        turns: the turn lifecycle.
        ledger: the ledger.
        presence: typing and heartbeat.
        writer: steps, status changes and acks.
        persister: the state store's writer.
        backoff: delays between connection attempts.
        shutdown_grace: seconds running turns get at shutdown.
        hook_timeout: seconds ``on_stop`` may take.
        clock: the ledger's clock.
        stop: asks the gateway to stop (with the fatal error, if any).
        stop_event: set once a stop was asked for.
        flushed: awaited in the shutdown once turns, platform writes and the store are
            flushed, before ``on_stop`` (the gateway releases its store there).
    """

    def __init__(
        self,
        *,
        runtime: AgentRuntime,
        config: ConfigSync,
        ws: ParallWs,
        intake: Intake,
        pipeline: ItemPipeline,
        reconciler: Reconciler,
        lanes: Lanes,
        turns: Turns,
        ledger: Ledger,
        presence: Presence,
        writer: PlatformWriter,
        persister: Persister,
        backoff: Backoff,
        shutdown_grace: float,
        hook_timeout: float,
        clock: Callable[[], float],
        stop: Callable[[BaseException | None], None],
        stop_event: asyncio.Event,
        flushed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._runtime = runtime
        self.config = config
        self.ws = ws
        self.intake = intake
        self.pipeline = pipeline
        self.reconciler = reconciler
        self.lanes = lanes
        self.turns = turns
        self.ledger = ledger
        self.presence = presence
        self.writer = writer
        self.persister = persister
        self._backoff = backoff
        self._grace = shutdown_grace
        self._hook_timeout = hook_timeout
        self._clock = clock
        self._request_stop = stop
        self._stop_event = stop_event
        self._flushed = flushed
        self._tasks = TaskSet(_log)
        self._stopping = False

    @property
    def stopping(self) -> bool:
        """Whether shutdown has begun."""
        return self._stopping

    def run(self) -> None:
        """Start the intake, the reconciler and the connection."""
        self.intake.start()
        self._tasks.spawn(self.reconciler.run(), name="parall-gateway-reconciler")
        self._tasks.spawn(self._connect(), name="parall-gateway-connect")

    # --- connection -------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Connect the WebSocket, retrying with backoff (an outage, or a malformed answer
        a proxy may have sent: the retry module's rule, plus :class:`ProtocolError`);
        a refusal (a 4xx, a fatal close) stops the gateway. Then watch for a fatal close."""
        ws = self.ws

        async def connect() -> bool:
            await ws.connect()
            return True

        try:
            connected = await retry_transient(
                connect,
                backoff=self._backoff,
                stop=self._stop_event,
                what="connect the WebSocket",
                transient=_worth_reconnecting,
            )
        except ParallError as exc:
            self._request_stop(exc)
            return
        if connected is None:  # a stop came first
            return
        try:
            await ws.wait_closed()
        except WebSocketClosedError as exc:
            _log.error("the platform closed the connection for good: %s", str(exc))
            self._request_stop(exc)

    # --- shutdown -----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop taking events; let turns finish within the grace period, then cancel
        them; settle the ledger; stop typing and heartbeats; disconnect; flush steps
        and acks; mark the session completed; write the store; call ``on_stop``.
        Nothing started here is left running."""
        self._stopping = True
        self.reconciler.stop()
        await self.intake.close()
        await self.pipeline.close()  # items not handed to a lane stay pending
        await self.config.close()
        await self._tasks.cancel()
        await self.lanes.close(self._grace)
        await self.turns.close(self._grace)
        settled = self.ledger.shutdown(now=self._clock())
        if settled:
            _log.info("shutdown: %d event(s) not run are left to the next start", settled)
        await self.presence.close()
        await self.ws.disconnect()
        self.persister.set_last_seq(self.ws.last_seq)
        self.writer.status(AgentSessionStatus.COMPLETED)
        await self.writer.close(FLUSH_TIMEOUT)
        self.persister.set_session(None)  # shut down: nothing to mark completed at start
        await self.persister.close(STORE_TIMEOUT)
        if self._flushed is not None:
            try:
                await self._flushed()
            except Exception:
                _log.exception("releasing the state store failed")
        try:
            async with asyncio.timeout(self._hook_timeout):
                await self._runtime.on_stop()
        except Exception:
            _log.exception("on_stop failed")


def _worth_reconnecting(exc: BaseException) -> bool:
    return is_transient(exc) or (
        isinstance(exc, ProtocolError) and not isinstance(exc, WebSocketClosedError)
    )
