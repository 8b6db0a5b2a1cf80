"""``ParallWs``: the WebSocket client of the Parall platform.

Ticket auth (a fresh single-use ticket per attempt), ``hello``, resume with
``last_seq``, duplicate suppression, dead-connection detection from missing
frames and pongs, reconnect with exponential backoff and jitter (the loop and
its delays from :mod:`parall_bridge._retry`), typed inbound events, and the
outbound ``typing`` / ``agent.heartbeat`` frames.

Nothing the server sends makes it loop or go silent: a frame that does not
decode (or whose handler fails) is logged, counted and skipped, never a
reason to drop the connection; an unreadable frame met again on resume makes
the next connection go without ``last_seq``; an implausible ``seq`` is not
adopted; ``heartbeat_interval`` is clamped.

The structure follows hikari's gateway shard: :class:`_Transport` turns
aiohttp's message types into a small closed set of outcomes, and the
protocol loop in :class:`ParallWs` only branches on those.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import inspect
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal

import aiohttp
import attrs
import cattrs
from yarl import URL

from . import _json
from . import protocol as p
from ._retry import Backoff, BackoffCounter, connection_error, repeat
from ._serde import structure
from .errors import (
    AuthenticationError,
    ParallConnectionError,
    ParallError,
    PermissionDeniedError,
    ProtocolError,
    WebSocketClosedError,
)
from .models import (
    AgentConfigUpdate,
    ChatUpdate,
    DispatchItem,
    Hello,
    Message,
    RecoveryOverflow,
    Task,
    WsTicket,
)

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HELLO_TIMEOUT",
    "DEFAULT_MAX_FRAME_SIZE",
    "HANDLER_SHUTDOWN_TIMEOUT",
    "MAX_HEARTBEAT_INTERVAL",
    "MAX_SEQ_JUMP",
    "MIN_HEARTBEAT_INTERVAL",
    "Backoff",
    "ConnectionState",
    "ParallWs",
    "StateChange",
    "decode_payload",
    "ws_url_from_base",
]

_log = logging.getLogger("parall_bridge.ws")

DEFAULT_HEARTBEAT_INTERVAL: Final = 30.0
"""Seconds between heartbeats when ``hello`` does not say (the protocol's default)."""
PINGS_PER_INTERVAL: Final = 2
"""Pings sent per heartbeat interval (the protocol: at least every interval / 2): one at
once on connecting, the second at a random point within the ping interval (so that the
thousands of connections of a fleet, opened together, do not all ping in the same
second), then one every ping interval."""
DEAD_AFTER_INTERVALS: Final = 2.0
"""A connection with no frame at all for this many heartbeat intervals is dead."""
DEFAULT_HELLO_TIMEOUT: Final = 10.0
"""Seconds to wait for ``hello`` once the upgrade succeeded."""
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""Seconds the upgrade request may take."""
CLOSE_TIMEOUT: Final = 2.0
"""Seconds to wait for the server's answer to our close frame before dropping the socket."""
DEFAULT_MAX_FRAME_SIZE: Final = 4 * 1024 * 1024
"""Largest frame read (bytes); a larger one closes the connection with 1009."""
HANDLER_SHUTDOWN_TIMEOUT: Final = 5.0
"""Default seconds :meth:`ParallWs.disconnect` lets async handlers finish before cancelling
them (the ``handler_shutdown_timeout`` option)."""
MAX_TICKET_RETRIES_AT_CONNECT: Final = 2
"""Extra attempts ``connect()`` makes when the server rejects a ticket (4001)."""
MIN_HEARTBEAT_INTERVAL: Final = 1.0
"""Shortest ``heartbeat_interval`` taken from ``hello`` (seconds): a smaller one would have
the client ping in a loop and call a healthy connection dead."""
MAX_HEARTBEAT_INTERVAL: Final = 600.0
"""Longest ``heartbeat_interval`` taken from ``hello`` (seconds): a larger one would leave a
dead connection undetected for hours."""
MAX_SEQ_JUMP: Final = 1_000_000
"""A ``seq`` more than this far above the highest seen is delivered but not adopted: one
implausible number must not make every later event look like a duplicate."""

_jitter: Callable[[], float] = random.random
"""A number in [0, 1): how early in the ping interval the second ping comes (tests
replace it)."""

_PAYLOAD_TYPES: Final[dict[str, type[Any]]] = {
    p.FRAME_HELLO: Hello,
    p.FRAME_MESSAGE_NEW: Message,
    p.FRAME_TASK_ASSIGNED: Task,
    p.FRAME_CHAT_UPDATE: ChatUpdate,
    p.FRAME_AGENT_CONFIG_UPDATE: AgentConfigUpdate,
    p.FRAME_DISPATCH_NEW: DispatchItem,
    p.FRAME_RECOVERY_OVERFLOW: RecoveryOverflow,
}

_FATAL_CLOSE_CODES: Final = frozenset({p.CLOSE_FORBIDDEN})


class ConnectionState(enum.StrEnum):
    """State of a :class:`ParallWs`."""

    DISCONNECTED = "disconnected"
    """Not connected: before ``connect()`` or after ``disconnect()``."""
    CONNECTING = "connecting"
    """The first connection is being made."""
    CONNECTED = "connected"
    """The upgrade succeeded and ``hello`` arrived."""
    RECONNECTING = "reconnecting"
    """The connection dropped; a new one is being made."""
    CLOSED = "closed"
    """Closed for good (a fatal close code, or a drop with reconnecting turned off)."""


class StateChange(str):
    """What state handlers receive: a string equal to the new state's value, plus details.

    Compare it with a :class:`ConnectionState` directly
    (``change == ConnectionState.CLOSED``) or read its attributes.

    Attributes:
        state: the new state.
        previous: the state before.
        code: the close code that caused the change, if any.
        reason: the close reason, if any.
        error: the error that caused the change, if any.
    """

    state: ConnectionState
    previous: ConnectionState
    code: int | None
    reason: str
    error: BaseException | None

    def __new__(
        cls,
        state: ConnectionState,
        previous: ConnectionState,
        code: int | None = None,
        reason: str = "",
        error: BaseException | None = None,
    ) -> StateChange:
        obj = super().__new__(cls, state.value)
        obj.state = state
        obj.previous = previous
        obj.code = code
        obj.reason = reason
        obj.error = error
        return obj

    def __repr__(self) -> str:
        return (
            f"StateChange(state={self.state.value!r}, previous={self.previous.value!r}, "
            f"code={self.code!r}, reason={self.reason!r})"
        )


def ws_url_from_base(base_url: str) -> str:
    """The WebSocket URL the protocol derives from an API base URL (``http``->``ws``, ``/ws``)."""
    url = URL(base_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)
    return str(url.with_scheme(scheme).with_path(p.WS_PATH))


def decode_payload(frame_type: str, data: Any) -> Any:
    """The typed payload of a frame (``Message`` for ``message.new``...): a model already
    of the right type is returned as is; unknown types keep their raw mapping.

    Raises what the converter raises when ``data`` does not decode.
    """
    payload_type = _PAYLOAD_TYPES.get(frame_type)
    if payload_type is None or isinstance(data, payload_type):
        return data
    return structure(data if data is not None else {}, payload_type)


def _heartbeat_interval(raw: Any) -> float:
    """The ``heartbeat_interval`` to use from a hello's raw value: the default when it is
    absent, not a positive number (with a warning), else clamped to
    [:data:`MIN_HEARTBEAT_INTERVAL`, :data:`MAX_HEARTBEAT_INTERVAL`] (with a warning)."""
    if raw is None:
        return DEFAULT_HEARTBEAT_INTERVAL
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        _log.warning(
            "hello: heartbeat_interval is not a finite number (%s): using %g s",
            type(raw).__name__,
            DEFAULT_HEARTBEAT_INTERVAL,
        )
        return DEFAULT_HEARTBEAT_INTERVAL
    if raw <= 0:
        _log.warning(
            "hello: heartbeat_interval %g is not positive: using %g s",
            raw,
            DEFAULT_HEARTBEAT_INTERVAL,
        )
        return DEFAULT_HEARTBEAT_INTERVAL
    clamped = min(MAX_HEARTBEAT_INTERVAL, max(MIN_HEARTBEAT_INTERVAL, float(raw)))
    if clamped != raw:
        _log.warning("hello: heartbeat_interval %g s is out of bounds: using %g s", raw, clamped)
    return clamped


def _redact(url: URL) -> str:
    """The URL with the ticket hidden, for logs."""
    if p.QUERY_TICKET not in url.query:
        return str(url)
    return str(url.update_query({p.QUERY_TICKET: "***"}))


_HANDLER_TASK: contextvars.ContextVar[asyncio.Task[Any] | None] = contextvars.ContextVar(
    "parall_bridge_ws_handler_task", default=None
)
"""The handler task a piece of code runs in (or was started from)."""

EventHandler = Callable[[Any], Awaitable[None] | None]
StateHandler = Callable[[StateChange], Awaitable[None] | None]


# --- the transport: aiohttp message types in, a closed set of outcomes out --------------------


class _Dead(Exception):
    """No frame arrived within the dead-connection bound."""


@attrs.define
class _Ended:
    """How one connection (or connection attempt) ended."""

    code: int | None = None
    reason: str = ""
    hello: bool = False
    connected_for: float = 0.0
    error: BaseException | None = None
    last_seq: int = 0
    ticket_error: bool = False
    unreadable_at: int | None = None
    """``last_seq`` when the first frame the client could not read arrived."""


class _Transport:
    """One WebSocket connection: reads text frames, sends JSON, closes."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self.close_reason = ""

    @property
    def closed(self) -> bool:
        return self._ws.closed

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    async def receive_text(self, dead_after: float) -> str | None:
        """The next text frame; ``None`` once the connection is closed.

        Raises :class:`_Dead` when nothing at all arrives within ``dead_after`` seconds.
        """
        while True:
            try:
                msg = await self._ws.receive(timeout=dead_after)
            except TimeoutError:
                raise _Dead from None
            if msg.type is aiohttp.WSMsgType.TEXT:
                return str(msg.data)
            if msg.type is aiohttp.WSMsgType.BINARY:
                _log.warning("skipping a binary frame of %d bytes", len(msg.data))
                continue
            if msg.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                continue
            if msg.type is aiohttp.WSMsgType.ERROR:
                _log.warning("WebSocket error: %s", type(msg.data).__name__)
            elif msg.type is aiohttp.WSMsgType.CLOSE and isinstance(msg.extra, str):
                self.close_reason = msg.extra
            return None

    async def send_json(self, frame: Mapping[str, Any]) -> None:
        await self._ws.send_str(json.dumps(frame, separators=(",", ":")))

    async def close(self, code: int = p.CLOSE_NORMAL) -> None:
        await self._ws.close(code=code)

    async def close_quietly(self, code: int = p.CLOSE_NORMAL) -> None:
        """Close if still open, giving up after :data:`CLOSE_TIMEOUT`; never raises."""
        if self._ws.closed:
            return
        with contextlib.suppress(TimeoutError, aiohttp.ClientError, ConnectionError):
            await asyncio.wait_for(self._ws.close(code=code), CLOSE_TIMEOUT)


# --- the client -------------------------------------------------------------------------------


class ParallWs:
    """WebSocket client of the Parall platform.

    Args:
        get_ticket: async callable returning a fresh :class:`WsTicket`
            (normally ``client.get_ws_ticket``); called before every attempt.
        ws_url: the WebSocket URL when the ticket does not carry one.
        session: an aiohttp session to use (the caller keeps ownership).
        reconnect: reconnect after a drop (``False``: a drop closes for good).
        backoff: the reconnect :class:`Backoff`.
        hello_timeout: seconds to wait for ``hello`` after the upgrade.
        connect_timeout: seconds the upgrade request may take.
        max_frame_size: largest frame read, in bytes.
        last_seq: the sequence number to resume from on the first connection (a
            restarted process's last delivered ``seq``; 0: no resume).
        verify_tls: verify the server's TLS certificate (the default). ``False`` is
            for a test server with a self-signed certificate only; it logs a warning.
        handler_shutdown_timeout: seconds :meth:`disconnect` lets async handlers
            finish before cancelling them.

    Handlers registered with :meth:`on` receive the typed payload of each
    event (``Message`` for ``message.new``, ``Hello`` for ``hello`` on every
    connection, ...; a raw mapping for unknown types). Sync handlers run
    inline; async ones run as tracked tasks, started in arrival order. A
    handler's exception is logged (and counted: :attr:`handler_errors`) and never
    stops the connection; nor does a frame that does not decode (logged, counted:
    :attr:`skipped_frames`, and skipped).
    """

    def __init__(
        self,
        get_ticket: Callable[[], Awaitable[WsTicket]],
        ws_url: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        last_seq: int = 0,
        verify_tls: bool = True,
        handler_shutdown_timeout: float = HANDLER_SHUTDOWN_TIMEOUT,
    ) -> None:
        if hello_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("hello_timeout and connect_timeout must be > 0")
        if handler_shutdown_timeout < 0:
            raise ValueError("handler_shutdown_timeout must be >= 0")
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be > 0")
        if isinstance(last_seq, bool) or not isinstance(last_seq, int) or last_seq < 0:
            raise ValueError("last_seq must be an integer >= 0")
        self._get_ticket = get_ticket
        self._ws_url = ws_url
        self._session = session
        self._owns_session = session is None
        self._reconnect = reconnect
        self._backoff = backoff or Backoff()
        self._hello_timeout = hello_timeout
        self._connect_timeout = connect_timeout
        self._max_frame_size = max_frame_size
        self._verify_tls = verify_tls
        self._handler_shutdown_timeout = handler_shutdown_timeout
        if not verify_tls:
            _log.warning("TLS certificate verification is OFF for the WebSocket (verify_tls=False)")

        self._handlers: dict[str, list[EventHandler]] = {}
        self._state_handlers: list[StateHandler] = []
        self._state = ConnectionState.DISCONNECTED
        self._session_id: str | None = None
        self._heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self._last_seq = last_seq
        self._latency: float | None = None
        self._skipped_frames = 0
        self._handler_errors = 0

        self._transport: _Transport | None = None
        self._runner: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready: asyncio.Future[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._closed_event = asyncio.Event()
        self._fatal: WebSocketClosedError | None = None
        self._stopping = False
        self._unreadable_seq: int | None = None
        self._unreadable_count = 0
        self._skip_resume = False

    def __repr__(self) -> str:
        return f"ParallWs(state={self._state.value!r}, session_id={self._session_id!r})"

    # --- read-only state ------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The connection state."""
        return self._state

    @property
    def session_id(self) -> str | None:
        """The ``session_id`` of the last ``hello``."""
        return self._session_id

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats, from the last ``hello`` (30 until one arrives)."""
        return self._heartbeat_interval

    @property
    def last_seq(self) -> int:
        """The highest event ``seq`` delivered (0: none yet, or reset by ``recovery.overflow``).

        A frame whose ``seq`` is more than :data:`MAX_SEQ_JUMP` (1,000,000) above it
        is delivered but not adopted, so one implausible number cannot make every later
        event look like a duplicate; while it is 0 (nothing seen yet), the first
        ``seq`` is adopted whatever it is. A frame that does not decode never moves it.
        """
        return self._last_seq

    @property
    def skipped_frames(self) -> int:
        """How many frames were skipped because they did not decode (not JSON, too deep,
        no type, data of the wrong shape), since this object was made."""
        return self._skipped_frames

    @property
    def handler_errors(self) -> int:
        """How many times a handler (of an event or a state change) raised."""
        return self._handler_errors

    @property
    def latency(self) -> float | None:
        """Round-trip time of the last ping, in seconds (``None`` before the first pong)."""
        return self._latency

    # --- handlers -------------------------------------------------------------------

    def on(self, event_type: str, handler: EventHandler) -> Callable[[], None]:
        """Call ``handler(payload)`` for each ``event_type`` frame; returns an unsubscriber."""
        handlers = self._handlers.setdefault(event_type, [])
        handlers.append(handler)

        def unsubscribe() -> None:
            if handler in handlers:
                handlers.remove(handler)

        return unsubscribe

    def on_state_change(self, handler: StateHandler) -> Callable[[], None]:
        """Call ``handler(change)`` on every state change; returns an unsubscriber."""
        self._state_handlers.append(handler)

        def unsubscribe() -> None:
            if handler in self._state_handlers:
                self._state_handlers.remove(handler)

        return unsubscribe

    def _call(self, handler: Callable[[Any], Any], arg: Any, what: str) -> None:
        """Run a sync handler inline, or start an async one as a tracked task."""
        try:
            result = handler(arg)
        except Exception:
            self._handler_errors += 1
            _log.exception("%s handler failed", what)
            return
        if inspect.isawaitable(result):
            self._track(self._await_handler(result, what), f"parall-ws-handler-{what}")

    async def _await_handler(self, awaitable: Awaitable[Any], what: str) -> None:
        # Seen by tasks the handler starts too (asyncio.wait_for(ws.disconnect(), ...)).
        _HANDLER_TASK.set(asyncio.current_task())
        try:
            await awaitable
        except Exception:
            self._handler_errors += 1
            _log.exception("%s handler failed", what)

    def _track(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _set_state(
        self,
        state: ConnectionState,
        *,
        code: int | None = None,
        reason: str = "",
        error: BaseException | None = None,
    ) -> None:
        previous, self._state = self._state, state
        if previous is state:
            return
        _log.info("connection state %s -> %s", previous.value, state.value)
        if state is ConnectionState.CONNECTED:
            self._wake_waiters(None)
        elif state is ConnectionState.CLOSED:
            self._wake_waiters(error or WebSocketClosedError(code, reason))
        change = StateChange(state, previous, code, reason, error)
        for handler in list(self._state_handlers):
            self._call(handler, change, "state change")

    def _wake_waiters(self, error: BaseException | None) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    # --- connect / disconnect ---------------------------------------------------------

    async def connect(self) -> None:
        """Connect and return once ``hello`` arrived.

        While a connection is already being made (or remade after a drop), waits
        for it instead of starting another.

        Raises:
            ParallError: no URL, or the ticket could not be had (an exception of
                the ``get_ticket`` callable is raised as it is).
            ParallConnectionError: the first connection could not be made, or was
                closed before ``hello`` with a code that is not fatal (retry later).
            WebSocketClosedError: the server closed the connection for good (4003).
        """
        if self._state is ConnectionState.CONNECTED:
            return
        loop = asyncio.get_running_loop()
        runner = self._runner
        if runner is not None and not runner.done():
            if self._stopping:
                # Ending (closed for good or disconnecting): let it end, then look again
                # (another caller may have started a connection meanwhile).
                await asyncio.wait({runner})
                return await self.connect()
            # Already connecting or reconnecting: wait for it to succeed or end for good.
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            await waiter
            return
        self._stopping = False
        self._fatal = None
        self._closed_event.clear()  # the same object: a wait_closed() begun earlier sees it
        self._ready = loop.create_future()
        self._set_state(ConnectionState.CONNECTING)
        self._runner = loop.create_task(self._run(), name="parall-ws-runner")
        ready = self._ready
        try:
            await asyncio.shield(ready)
        except asyncio.CancelledError:
            await self.disconnect()
            raise
        except BaseException:
            await self._reap_runner()
            await self._release_session()
            raise

    async def disconnect(self) -> None:
        """Close with 1000, stop reconnecting, cancel and await every task started here.

        Idempotent; afterwards :meth:`wait_closed` returns and the state is
        ``disconnected`` (or stays ``closed`` after a fatal close).
        """
        self._stopping = True
        transport = self._transport
        if transport is not None:
            await transport.close_quietly()
        await self._reap_runner()
        await self._stop_pinger()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ParallConnectionError("disconnected before hello"))
            self._ready.exception()  # retrieved: connect() was cancelled or is gone
        self._wake_waiters(ParallConnectionError("disconnected while connecting"))
        if self._state is not ConnectionState.CLOSED:
            self._set_state(ConnectionState.DISCONNECTED, code=p.CLOSE_NORMAL)
        self._closed_event.set()
        try:
            await self._reap_handlers()  # after the last state change: its handlers too
        finally:
            await self._release_session()

    async def _reap_handlers(self) -> None:
        """Let handler tasks finish (up to ``handler_shutdown_timeout``), then cancel the
        rest; the handler that called :meth:`disconnect` (directly or through a task of
        its own) excepted."""
        exempt = {asyncio.current_task(), _HANDLER_TASK.get()}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._handler_shutdown_timeout
        while others := [t for t in self._tasks if t not in exempt and not t.done()]:
            remaining = deadline - loop.time()
            if remaining > 0:
                await asyncio.wait(others, timeout=remaining)
                continue
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    async def _release_session(self) -> None:
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def wait_closed(self) -> None:
        """Wait until the client is closed for good.

        Returns after :meth:`disconnect`; raises :class:`WebSocketClosedError`
        after a fatal close (4003, or any drop with ``reconnect=False``).
        """
        await self._closed_event.wait()
        if self._fatal is not None:
            raise self._fatal

    async def _reap_runner(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if not runner.done() and runner is not asyncio.current_task():
            runner.cancel()
        if runner is not asyncio.current_task():
            await asyncio.gather(runner, return_exceptions=True)

    # --- outbound ---------------------------------------------------------------------

    async def send(self, type: str, data: Mapping[str, Any]) -> bool:
        """Send a frame; returns whether it was sent (``False`` when not connected)."""
        transport = self._transport
        if self._state is not ConnectionState.CONNECTED or transport is None or transport.closed:
            return False
        try:
            await transport.send_json({"type": type, "data": dict(data)})
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            _log.debug("could not send a %s frame: %s", type, exc.__class__.__name__)
            return False
        return True

    async def send_typing(self, chat_id: str, action: Literal["start", "stop"]) -> bool:
        """Tell the chat the agent is typing (``"start"``) or stopped (``"stop"``)."""
        if action not in ("start", "stop"):
            raise ValueError(f"action must be 'start' or 'stop', got {action!r}")
        return await self.send(p.FRAME_TYPING, {"chat_id": chat_id, "action": action})

    async def send_agent_heartbeat(self, session_id: str, metrics: Mapping[str, Any]) -> bool:
        """Send the agent heartbeat (``session_id`` from hello, plus host metrics)."""
        return await self.send(p.FRAME_AGENT_HEARTBEAT, {"session_id": session_id, **metrics})

    # --- the protocol loop -----------------------------------------------------------------

    async def _run(self) -> None:
        """The reconnect loop, run by :func:`parall_bridge._retry.repeat`: each attempt
        connects and reads until the connection ends, then says whether and when to go
        again."""
        backoff = BackoffCounter(self._backoff)
        ticket_retries = 0
        last_ticket_rejected = False

        async def attempt() -> float | None:
            nonlocal ticket_retries, last_ticket_rejected
            if self._stopping:
                return None
            try:
                ended = await self._connect_once()
            except Exception as exc:  # never let an attempt's surprise end the runner
                _log.exception("WebSocket connection attempt failed unexpectedly")
                ended = _Ended(error=exc)
            if self._stopping:
                return None
            first = self._ready is not None and not self._ready.done()
            fatal = self._fatal_error(ended)
            if fatal is not None:
                self._close_for_good(fatal, ended)
                await self._release_session()
                return None
            ticket_rejected = ended.code == p.CLOSE_INVALID_TICKET and not ended.hello
            if first:
                if ticket_rejected and ticket_retries < MAX_TICKET_RETRIES_AT_CONNECT:
                    ticket_retries += 1
                    return 0.0
                self._fail_first(ended)
                return None
            if not self._reconnect:
                self._close_for_good(
                    WebSocketClosedError(ended.code, ended.reason or "connection lost"), ended
                )
                await self._release_session()
                return None
            self._note_unreadable(ended)
            if ended.hello and ended.connected_for >= self._backoff.reset_after:
                backoff.reset()
            if ended.code == p.CLOSE_INVALID_TICKET and not last_ticket_rejected:
                delay = 0.0  # a new ticket at once; a second rejection in a row backs off
            else:
                delay = backoff.next_delay()
            last_ticket_rejected = ticket_rejected
            self._set_state(ConnectionState.RECONNECTING, code=ended.code, reason=ended.reason)
            _log.info(
                "reconnecting in %.2f s (close code %s%s)",
                delay,
                ended.code,
                f", {type(ended.error).__name__}" if ended.error else "",
            )
            return delay

        await repeat(attempt)

    def _fatal_error(self, ended: _Ended) -> WebSocketClosedError | None:
        if ended.code in _FATAL_CLOSE_CODES:
            return WebSocketClosedError(ended.code, ended.reason or "forbidden")
        if isinstance(ended.error, AuthenticationError | PermissionDeniedError):
            return WebSocketClosedError(None, f"ticket refused: {ended.error.status}")
        return None

    def _close_for_good(self, error: WebSocketClosedError, ended: _Ended) -> None:
        self._fatal = error
        self._stopping = True
        _log.error("WebSocket closed for good: %s", error)
        self._set_state(ConnectionState.CLOSED, code=ended.code, reason=ended.reason, error=error)
        if self._ready is not None and not self._ready.done():
            # connect() raises what the caller can act on: a refused key as itself.
            api_error = ended.error if isinstance(ended.error, ParallError) else None
            self._ready.set_exception(api_error or error)
        self._closed_event.set()

    def _fail_first(self, ended: _Ended) -> None:
        error: BaseException
        if isinstance(ended.error, ParallError) or (ended.ticket_error and ended.error):
            error = ended.error  # what the caller can act on, as raised
        elif ended.error is not None:
            error = ParallConnectionError(f"WebSocket connection failed: {ended.error}")
        elif ended.code is not None:
            # Not fatal (fatal codes were handled before): the caller may retry.
            reason = f": {ended.reason}" if ended.reason else ""
            error = ParallConnectionError(
                f"WebSocket closed with code {ended.code} before hello{reason}"
            )
        else:
            error = ParallConnectionError("WebSocket connection failed: closed before hello")
        self._stopping = True
        self._set_state(ConnectionState.DISCONNECTED, code=ended.code, reason=ended.reason)
        self._closed_event.set()  # nothing runs any more: a supervisor's wait_closed() returns
        self._wake_waiters(error)
        assert self._ready is not None
        self._ready.set_exception(error)

    def _note_unreadable(self, ended: _Ended) -> None:
        """PROTOCOL.md: a frame too big (1009) resumes, and so does a connection that met
        a frame it could not decode; when a resume from the same ``last_seq`` meets such
        a frame again, the next connection goes without ``last_seq`` (the catch-up covers
        what is skipped) instead of looping on the same frame."""
        mark = ended.unreadable_at
        if ended.code == p.CLOSE_MESSAGE_TOO_BIG:
            _log.warning(
                "a frame above %d bytes closed the connection (1009)", self._max_frame_size
            )
            mark = ended.last_seq
        if mark is None or mark != ended.last_seq:  # none, or events were delivered since
            self._unreadable_seq, self._unreadable_count = None, 0
            return
        if self._unreadable_seq == mark:
            self._unreadable_count += 1
        else:
            self._unreadable_seq, self._unreadable_count = mark, 1
        if self._unreadable_count >= 2:
            _log.warning(
                "the same unreadable frame came back on resume from seq %d: "
                "reconnecting without resume",
                mark,
            )
            self._skip_resume = True
            self._unreadable_seq, self._unreadable_count = None, 0

    async def _connect_once(self) -> _Ended:
        """One attempt: ticket, upgrade, hello, then read until the connection ends."""
        try:
            ticket = await self._get_ticket()
        except Exception as exc:  # the caller's ticket callable may raise anything
            _log.warning("could not get a WebSocket ticket: %s", type(exc).__name__)
            return _Ended(error=exc, ticket_error=True)
        base = ticket.ws_url or self._ws_url
        if not base:
            return _Ended(
                error=ParallError(
                    "no WebSocket URL: the ticket has no ws_url and ParallWs got no ws_url"
                )
            )
        resume_from = 0 if self._skip_resume else self._last_seq
        self._skip_resume = False
        query = {p.QUERY_TICKET: ticket.ticket}
        if resume_from > 0:
            query[p.QUERY_LAST_SEQ] = str(resume_from)
        try:
            url: URL | None = URL(base).update_query(query)
        except (TypeError, ValueError):
            url = None
        if url is None or url.scheme not in ("ws", "wss", "http", "https") or not url.host:
            return _Ended(error=ProtocolError("the WebSocket URL is not an absolute ws(s) URL"))
        _log.info("connecting to %s", _redact(url))
        session = self._ensure_session()
        try:
            async with asyncio.timeout(self._connect_timeout):
                ws = await session.ws_connect(
                    url,
                    autoping=True,
                    max_msg_size=self._max_frame_size,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT),
                    ssl=self._verify_tls,
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = connection_error(exc, "WebSocket connection", timeout=self._connect_timeout)
            _log.warning("%s", error)
            return _Ended(error=error)
        transport = _Transport(ws)
        self._transport = transport
        try:
            return await self._read_loop(transport)
        finally:
            await self._stop_pinger()
            await transport.close_quietly()
            self._transport = None

    async def _read_loop(self, transport: _Transport) -> _Ended:
        ended = _Ended()
        connected_at: float | None = None
        timeout = self._hello_timeout
        try:
            while True:
                try:
                    text = await transport.receive_text(timeout)
                except _Dead:
                    what = "hello" if connected_at is None else "frame at all"
                    _log.warning("no %s within %.1f s: the connection is dead", what, timeout)
                    ended.error = TimeoutError(f"no {what} within {timeout:g} s")
                    await transport.close(p.CLOSE_GOING_AWAY)
                    break
                if text is None:
                    break
                decoded = self._read_frame(text, ended)
                if decoded is None:
                    continue
                frame_type, payload = decoded
                if frame_type == p.FRAME_HELLO:
                    self._on_hello(payload)
                    timeout = DEAD_AFTER_INTERVALS * self._heartbeat_interval
                    if connected_at is None:
                        connected_at = time.monotonic()
                        ended.hello = True
                        self._on_connected(transport)
                self._deliver(frame_type, payload)
        finally:
            ended.code = transport.close_code if ended.code is None else ended.code
            ended.reason = ended.reason or transport.close_reason
            ended.last_seq = self._last_seq
            if connected_at is not None:
                ended.connected_for = time.monotonic() - connected_at
        if ended.error is None and ended.code is not None:
            _log.info("connection closed with code %s", ended.code)
        return ended

    def _on_connected(self, transport: _Transport) -> None:
        self._set_state(ConnectionState.CONNECTED)
        self._pinger = self._track(self._ping_loop(transport), "parall-ws-ping")
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def _stop_pinger(self) -> None:
        pinger, self._pinger = self._pinger, None
        if pinger is not None and not pinger.done():
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)

    async def _ping_loop(self, transport: _Transport) -> None:
        interval = self._heartbeat_interval / PINGS_PER_INTERVAL
        # One ping at once, the next at a random point within the interval (never later),
        # then every interval: many connections opened together spread their pings.
        delay = interval * (1.0 - min(max(_jitter(), 0.0), 1.0))
        while not transport.closed:
            ts = int(time.time() * 1000)
            try:
                await transport.send_json({"type": p.FRAME_PING, "data": {"ts": ts}})
            except (aiohttp.ClientError, ConnectionError, RuntimeError):
                return
            await asyncio.sleep(delay)
            delay = interval

    def _read_frame(self, text: str, ended: _Ended) -> tuple[str, Any] | None:
        """Decode one frame; ``None`` when it is dropped (a duplicate, a pong) or skipped
        because it does not decode: logged (without its content), counted, and noted for
        :meth:`_note_unreadable`. Never raises."""
        try:
            return self._decode(text)
        except Exception as exc:
            self._skipped_frames += 1
            if ended.unreadable_at is None:
                ended.unreadable_at = self._last_seq
            detail = exc.detail if isinstance(exc, ProtocolError) else type(exc).__name__
            _log.warning("skipping a frame (%d characters): %s", len(text), detail)
            return None

    def _decode(self, text: str) -> tuple[str, Any] | None:
        """Decode one frame; ``None`` when it is dropped (a duplicate, a pong).

        ``last_seq`` advances only past frames that are delivered: a frame whose
        data does not decode cannot push the numbering past real events; nor can
        one whose ``seq`` jumps more than :data:`MAX_SEQ_JUMP` ahead.

        Raises:
            ProtocolError: the frame is not JSON, has no type, or its data does not
                decode.
        """
        frame = _json.loads(text, allow_nonfinite=True)
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise ProtocolError("a frame without a type")
        frame_type: str = frame["type"]
        seq = frame.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            seq = None
        if seq is not None and seq <= self._last_seq:
            _log.debug("dropping %s seq %d: already delivered", frame_type, seq)
            return None
        data = frame.get("data")
        if data is None:
            data = {}
        if frame_type == p.FRAME_PONG:
            self._on_pong(data)
            return None
        if frame_type == p.FRAME_HELLO and isinstance(data, dict):
            interval = _heartbeat_interval(data.get("heartbeat_interval"))
            data = {**data, "heartbeat_interval": interval}
        if frame_type not in _PAYLOAD_TYPES:
            _log.debug("unknown frame type %r", frame_type)
            payload: Any = data
        else:
            try:
                payload = decode_payload(frame_type, data)
            except cattrs.BaseValidationError as exc:
                detail = "; ".join(cattrs.transform_error(exc))
                raise ProtocolError(
                    f"a {frame_type} frame whose data does not decode: {detail}"
                ) from None
            except Exception as exc:
                raise ProtocolError(
                    f"a {frame_type} frame whose data does not decode: {type(exc).__name__}"
                ) from None
        if seq is not None:
            if self._last_seq > 0 and seq - self._last_seq > MAX_SEQ_JUMP:
                _log.warning(
                    "%s seq %d jumps more than %d past %d: delivered, not adopted",
                    frame_type,
                    seq,
                    MAX_SEQ_JUMP,
                    self._last_seq,
                )
            else:
                self._last_seq = seq
        return frame_type, payload

    def _on_hello(self, hello: Hello) -> None:
        self._session_id = hello.session_id or None
        self._heartbeat_interval = hello.heartbeat_interval

    def _deliver(self, frame_type: str, payload: Any) -> None:
        if frame_type == p.FRAME_RECOVERY_OVERFLOW:
            _log.warning("recovery.overflow: the server lost events; sequence tracking restarts")
            self._last_seq = 0
        for handler in list(self._handlers.get(frame_type, ())):
            self._call(handler, payload, frame_type)

    def _on_pong(self, data: Any) -> None:
        ts = data.get("ts") if isinstance(data, dict) else None
        if isinstance(ts, int | float) and math.isfinite(ts):
            self._latency = max(0.0, time.time() - ts / 1000)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session
