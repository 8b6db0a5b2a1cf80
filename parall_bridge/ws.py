"""``ParallWs``: the WebSocket client of the Parall platform.

Ticket auth (a fresh single-use ticket per attempt), ``hello``, resume with
``last_seq``, duplicate suppression, dead-connection detection from missing
frames and pongs, reconnect with exponential backoff and jitter, typed
inbound events, and the outbound ``typing`` / ``agent.heartbeat`` frames.

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
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal

import aiohttp
import attrs
import cattrs
from yarl import URL

from . import protocol as p
from ._serde import structure
from .errors import (
    AuthenticationError,
    ParallConnectionError,
    ParallError,
    PermissionDeniedError,
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
"""Pings sent per heartbeat interval (the protocol: at least every interval / 2)."""
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
"""Seconds :meth:`ParallWs.disconnect` lets async handlers finish before cancelling them."""
MAX_TICKET_RETRIES_AT_CONNECT: Final = 2
"""Extra attempts ``connect()`` makes when the server rejects a ticket (4001)."""

BACKOFF_BASE: Final = 1.85
"""Exponential base of the reconnect delay (hikari's)."""
BACKOFF_MAXIMUM: Final = 60.0
"""Cap of one reconnect delay, in seconds."""
BACKOFF_JITTER: Final = 1.0
"""Up to this many random seconds added to each reconnect delay."""
BACKOFF_RESET_AFTER: Final = 30.0
"""A connection that stayed up this long resets the backoff: the next attempt comes at once
(within the jitter)."""

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


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"Backoff.{attribute.name} must be > 0, got {value!r}")


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"Backoff.{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class Backoff:
    """Reconnect delays: ``min(maximum, base ** n) + uniform(0, jitter)`` for the n-th
    failed attempt in a row (n >= 1); the first attempt after a connection that
    stayed up waits only the jitter.

    Attributes:
        base: exponential base (1.85).
        maximum: cap of the exponential part, in seconds (60).
        jitter: up to this many random seconds added (1).
        reset_after: seconds a connection must stay up to reset the count (30).
    """

    base: float = attrs.field(default=BACKOFF_BASE, validator=_positive)
    maximum: float = attrs.field(default=BACKOFF_MAXIMUM, validator=_non_negative)
    jitter: float = attrs.field(default=BACKOFF_JITTER, validator=_non_negative)
    reset_after: float = attrs.field(default=BACKOFF_RESET_AFTER, validator=_non_negative)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next attempt, after ``failures`` failed attempts
        in a row (0: the connection had stayed up)."""
        jitter = (rng or random).uniform(0.0, self.jitter) if self.jitter else 0.0
        if failures <= 0:
            return jitter
        exponent = min(failures, 64)  # keeps base ** n finite; the cap applies long before
        return min(self.maximum, self.base**exponent) + jitter


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

    Handlers registered with :meth:`on` receive the typed payload of each
    event (``Message`` for ``message.new``, ``Hello`` for ``hello`` on every
    connection, ...; a raw mapping for unknown types). Sync handlers run
    inline; async ones run as tracked tasks, started in arrival order. A
    handler's exception is logged and never stops the connection.
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
    ) -> None:
        if hello_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("hello_timeout and connect_timeout must be > 0")
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

        self._handlers: dict[str, list[EventHandler]] = {}
        self._state_handlers: list[StateHandler] = []
        self._state = ConnectionState.DISCONNECTED
        self._session_id: str | None = None
        self._heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self._last_seq = last_seq
        self._latency: float | None = None

        self._transport: _Transport | None = None
        self._runner: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready: asyncio.Future[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._closed_event = asyncio.Event()
        self._fatal: WebSocketClosedError | None = None
        self._stopping = False
        self._too_big_seq: int | None = None
        self._too_big_count = 0
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
        """The highest event ``seq`` delivered (0: none yet, or reset by ``recovery.overflow``)."""
        return self._last_seq

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
            _log.exception("%s handler failed", what)
            return
        if inspect.isawaitable(result):
            self._track(self._await_handler(result, what), f"parall-ws-handler-{what}")

    @staticmethod
    async def _await_handler(awaitable: Awaitable[Any], what: str) -> None:
        # Seen by tasks the handler starts too (asyncio.wait_for(ws.disconnect(), ...)).
        _HANDLER_TASK.set(asyncio.current_task())
        try:
            await awaitable
        except Exception:
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
        """Let handler tasks finish (up to :data:`HANDLER_SHUTDOWN_TIMEOUT`), then cancel
        the rest; the handler that called :meth:`disconnect` (directly or through a task
        of its own) excepted."""
        exempt = {asyncio.current_task(), _HANDLER_TASK.get()}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDLER_SHUTDOWN_TIMEOUT
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
        failures = 0
        ticket_retries = 0
        last_ticket_rejected = False
        while not self._stopping:
            try:
                ended = await self._connect_once()
            except Exception as exc:  # never let an attempt's surprise end the runner
                _log.exception("WebSocket connection attempt failed unexpectedly")
                ended = _Ended(error=exc)
            if self._stopping:
                return
            first = self._ready is not None and not self._ready.done()
            fatal = self._fatal_error(ended)
            if fatal is not None:
                self._close_for_good(fatal, ended)
                await self._release_session()
                return
            ticket_rejected = ended.code == p.CLOSE_INVALID_TICKET and not ended.hello
            if first:
                if ticket_rejected and ticket_retries < MAX_TICKET_RETRIES_AT_CONNECT:
                    ticket_retries += 1
                    continue
                self._fail_first(ended)
                return
            if not self._reconnect:
                self._close_for_good(
                    WebSocketClosedError(ended.code, ended.reason or "connection lost"), ended
                )
                await self._release_session()
                return
            self._note_frame_too_big(ended)
            if ended.hello and ended.connected_for >= self._backoff.reset_after:
                failures = 0
            if ended.code == p.CLOSE_INVALID_TICKET and not last_ticket_rejected:
                delay = 0.0  # a new ticket at once; a second rejection in a row backs off
            else:
                delay = self._backoff.delay(failures)
                failures += 1
            last_ticket_rejected = ticket_rejected
            self._set_state(ConnectionState.RECONNECTING, code=ended.code, reason=ended.reason)
            _log.info(
                "reconnecting in %.2f s (close code %s%s)",
                delay,
                ended.code,
                f", {type(ended.error).__name__}" if ended.error else "",
            )
            await asyncio.sleep(delay)

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

    def _note_frame_too_big(self, ended: _Ended) -> None:
        """PROTOCOL.md: 1009 -> resume; the same ``last_seq`` meeting 1009 twice in a row
        -> reconnect once without ``last_seq`` instead of looping on the same frame."""
        if ended.code != p.CLOSE_MESSAGE_TOO_BIG:
            self._too_big_seq, self._too_big_count = None, 0
            return
        _log.warning("a frame above %d bytes closed the connection (1009)", self._max_frame_size)
        if self._too_big_seq == ended.last_seq:
            self._too_big_count += 1
        else:
            self._too_big_seq, self._too_big_count = ended.last_seq, 1
        if self._too_big_count >= 2:
            _log.warning("the same frame is too big again: reconnecting without resume")
            self._skip_resume = True
            self._too_big_seq, self._too_big_count = None, 0

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
        url = URL(base).update_query(query)
        _log.info("connecting to %s", _redact(url))
        session = self._ensure_session()
        try:
            async with asyncio.timeout(self._connect_timeout):
                ws = await session.ws_connect(
                    url,
                    autoping=True,
                    max_msg_size=self._max_frame_size,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT),
                )
        except aiohttp.WSServerHandshakeError as exc:
            _log.warning("WebSocket upgrade refused with status %d", exc.status)
            return _Ended(
                error=ParallConnectionError(
                    f"WebSocket upgrade refused with status {exc.status}", request_sent=True
                ),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            _log.warning("WebSocket connection failed: %s", type(exc).__name__)
            return _Ended(
                error=ParallConnectionError(
                    f"WebSocket connection failed: {type(exc).__name__}", request_sent=False
                ),
            )
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
                decoded = self._decode(text)
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
        while not transport.closed:
            ts = int(time.time() * 1000)
            try:
                await transport.send_json({"type": p.FRAME_PING, "data": {"ts": ts}})
            except (aiohttp.ClientError, ConnectionError, RuntimeError):
                return
            await asyncio.sleep(interval)

    def _decode(self, text: str) -> tuple[str, Any] | None:
        """Decode one frame; ``None`` when it is skipped (malformed, a duplicate, a pong).

        ``last_seq`` advances only past frames that are delivered: a frame whose
        data does not decode cannot push the numbering past real events.
        """
        try:
            frame = json.loads(text)
        except ValueError:
            _log.warning("skipping a frame that is not JSON (%d characters)", len(text))
            return None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            _log.warning("skipping a frame without a type")
            return None
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
        if frame_type not in _PAYLOAD_TYPES:
            _log.debug("unknown frame type %r", frame_type)
            payload: Any = data
        else:
            try:
                payload = decode_payload(frame_type, data)
            except cattrs.BaseValidationError as exc:
                detail = "; ".join(cattrs.transform_error(exc))
                _log.warning(
                    "skipping a %s frame whose data does not decode: %s", frame_type, detail
                )
                return None
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                _log.warning(
                    "skipping a %s frame whose data does not decode: %s",
                    frame_type,
                    exc.__class__.__name__,
                )
                return None
        if seq is not None:
            self._last_seq = seq
        return frame_type, payload

    def _on_hello(self, hello: Hello) -> None:
        self._session_id = hello.session_id or None
        interval = hello.heartbeat_interval
        self._heartbeat_interval = interval if interval > 0 else DEFAULT_HEARTBEAT_INTERVAL

    def _deliver(self, frame_type: str, payload: Any) -> None:
        if frame_type == p.FRAME_RECOVERY_OVERFLOW:
            _log.warning("recovery.overflow: the server lost events; sequence tracking restarts")
            self._last_seq = 0
        for handler in list(self._handlers.get(frame_type, ())):
            self._call(handler, payload, frame_type)

    def _on_pong(self, data: Any) -> None:
        ts = data.get("ts") if isinstance(data, dict) else None
        if isinstance(ts, int | float):
            self._latency = max(0.0, time.time() - ts / 1000)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session
