"""The emulator's WebSocket side: per-user sequence numbers and replay buffers,
connections with an ordered outbound queue each, resume, and WS faults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import attrs
from aiohttp import WSCloseCode, WSMsgType, web

from .._tasks import TaskSet
from ..protocol import (
    CLOSE_FORBIDDEN,
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_TICKET,
    FRAME_HELLO,
    FRAME_PING,
    FRAME_PONG,
    FRAME_RECOVERY_OVERFLOW,
    HEADER_AUTHORIZATION,
    QUERY_LAST_SEQ,
    QUERY_TICKET,
)
from ._faults import FaultInjector
from ._records import ClientFrame, WsConnectionRecord
from ._rest import canonical_error, parse_json
from ._state import EmulatorState, InvalidTicket

__all__ = ["MAX_CLIENT_FRAME_SIZE", "WsHub"]

_log = logging.getLogger("parall_bridge.testing.ws")

MAX_CLIENT_FRAME_SIZE: Final = 64 * 1024 * 1024
"""Largest frame the emulator reads from a client: far above any client's own limit,
so oversized-frame tests exercise the client."""

CLOSE_HANDSHAKE_TIMEOUT: Final = 1.0
"""How long a server-initiated close waits for the client's close frame."""


@attrs.define
class _Outgoing:
    payload: str | bytes
    """A text frame, or the payload of a WebSocket-level pong."""
    is_event: bool = False
    enqueued_at: float = 0.0
    done: asyncio.Future[None] | None = None


@attrs.define
class _UserStream:
    seq: int
    buffer: deque[tuple[int, str]]


def _new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


@attrs.define(eq=False)
class _Connection:
    """One open connection. Its handler task awaits the reader task; a close request
    cancels the reader, and the handler then runs the close handshake itself (so the
    server waits for the client's close frame before dropping TCP)."""

    user_id: str
    api_key: str = attrs.field(repr=False)  # the key its ticket was issued to
    ws: web.WebSocketResponse
    record: WsConnectionRecord
    queue: asyncio.Queue[_Outgoing] = attrs.field(factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None
    writer: asyncio.Task[None] | None = None
    close_request: tuple[int, str] | None = None
    close_sent: asyncio.Future[None] = attrs.field(factory=_new_future)
    finished: asyncio.Future[None] = attrs.field(factory=_new_future)
    events_sent: int = 0

    @property
    def closing(self) -> bool:
        return self.close_request is not None or self.ws.closed


def _frame(frame_type: str, data: Mapping[str, Any], seq: int | None = None) -> str:
    if seq is None:
        return json.dumps({"type": frame_type, "data": data})
    return json.dumps({"type": frame_type, "seq": seq, "data": data})


def _recorded_headers(request: web.Request) -> dict[str, str]:
    """The upgrade request's headers, an ``Authorization`` value replaced by ``***``."""
    return {
        name: "***" if name.lower() == HEADER_AUTHORIZATION.lower() else value
        for name, value in request.headers.items()
    }


def _parse_last_seq(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


class WsHub:
    """All WebSocket connections of one emulator, and every user's event stream."""

    def __init__(
        self,
        *,
        state: EmulatorState,
        faults: FaultInjector,
        tasks: TaskSet,
        heartbeat_interval: float,
        replay_buffer_size: int,
        frames: list[ClientFrame] | None,
        connections: list[WsConnectionRecord],
    ) -> None:
        self._state = state
        self._faults = faults
        self._tasks = tasks
        self._heartbeat_interval = heartbeat_interval
        self._replay_buffer_size = replay_buffer_size
        self._frames = frames
        self._records = connections
        self._streams: dict[str, _UserStream] = {}
        self._open: list[_Connection] = []
        self._shutting_down = False
        self.silent = False
        self.frame_delay: float | None = None
        self.close_every: tuple[int, int] | None = None

    # --- event streams -------------------------------------------------------------

    def _stream(self, user_id: str) -> _UserStream:
        stream = self._streams.get(user_id)
        if stream is None:
            stream = _UserStream(0, deque(maxlen=self._replay_buffer_size))
            self._streams[user_id] = stream
        return stream

    def emit(self, user_id: str, frame_type: str, data: Mapping[str, Any]) -> int:
        """Number an event frame for ``user_id``, buffer it, queue it on their connections."""
        stream = self._stream(user_id)
        stream.seq += 1
        text = _frame(frame_type, data, stream.seq)
        stream.buffer.append((stream.seq, text))
        for conn in self._open:
            if conn.user_id == user_id:
                self._enqueue(conn, _Outgoing(text, is_event=True))
        return stream.seq

    def seq(self, user_id: str) -> int:
        """The seq of the last event frame numbered for ``user_id`` (0 before the first)."""
        stream = self._streams.get(user_id)
        return 0 if stream is None else stream.seq

    def reset_seq(self, user_id: str | None = None) -> None:
        """Forget the replay buffer and restart numbering at 0 (one user, or all)."""
        for uid, stream in self._streams.items():
            if user_id is None or uid == user_id:
                stream.seq = 0
                stream.buffer.clear()

    # --- connections ----------------------------------------------------------------

    def _enqueue(self, conn: _Connection, item: _Outgoing) -> None:
        if conn.closing:
            _resolve(item.done)
            return
        item.enqueued_at = asyncio.get_running_loop().time()
        conn.queue.put_nowait(item)

    def _matching(self, user_id: str | None) -> list[_Connection]:
        return [c for c in self._open if user_id is None or c.user_id == user_id]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The ``GET /ws`` handler."""
        refusal = self._faults.take_ws_refusal()
        if refusal is not None:
            _log.debug("refusing a WebSocket upgrade with %d", refusal)
            return canonical_error(refusal, "WebSocket upgrade refused")
        last_seq = _parse_last_seq(request.query.get(QUERY_LAST_SEQ))
        ws = web.WebSocketResponse(
            autoping=False,
            compress=False,
            max_msg_size=MAX_CLIENT_FRAME_SIZE,
            timeout=CLOSE_HANDSHAKE_TIMEOUT,
        )
        await ws.prepare(request)
        record = WsConnectionRecord(
            user_id=None,
            last_seq=last_seq,
            opened_at=datetime.now(UTC),
            ticket=request.query.get(QUERY_TICKET),
            query=dict(request.query.items()),
            headers=_recorded_headers(request),
        )
        self._records.append(record)
        try:
            user_id, api_key, revoked = self._state.redeem_ticket(
                request.query.get(QUERY_TICKET, "")
            )
        except InvalidTicket:
            _log.debug("WebSocket with an invalid ticket: closing with %d", CLOSE_INVALID_TICKET)
            record.closed_code = CLOSE_INVALID_TICKET
            await ws.close(code=CLOSE_INVALID_TICKET, message=b"invalid or expired ticket")
            return ws
        record.user_id = user_id
        if revoked or self._shutting_down:
            code = CLOSE_FORBIDDEN if revoked else CLOSE_GOING_AWAY
            record.closed_code = code
            await ws.close(code=code, message=b"key revoked" if revoked else b"shutting down")
            return ws
        record.ticket_ok = True
        conn = _Connection(user_id=user_id, api_key=api_key, ws=ws, record=record)
        self._start(conn, last_seq)
        try:
            assert conn.reader is not None
            await asyncio.wait([conn.reader])
            if conn.close_request is not None:
                code, reason = conn.close_request
                _log.debug("closing the WebSocket of %s with %d", conn.user_id, code)
                # Wakes close_connections() once this step has written the close frame;
                # ws.close() then waits for the client's close frame (the handshake).
                _resolve(conn.close_sent)
                await ws.close(code=code, message=reason.encode())
        finally:
            await self._teardown(conn)
        return ws

    def _start(self, conn: _Connection, last_seq: int | None) -> None:
        """Queue hello and the replay (or overflow), then register for live frames,
        all in one step so no live frame can come between them."""
        session_id = f"wss_{secrets.token_hex(8)}"
        conn.record.session_id = session_id
        hello = {"session_id": session_id, "heartbeat_interval": self._heartbeat_interval}
        self._enqueue(conn, _Outgoing(_frame(FRAME_HELLO, hello)))
        if last_seq is not None and last_seq > 0:
            stream = self._stream(conn.user_id)
            oldest = stream.buffer[0][0] if stream.buffer else stream.seq + 1
            if last_seq > stream.seq or last_seq < oldest - 1:
                _log.debug("resume from %d not possible: recovery.overflow", last_seq)
                self._enqueue(conn, _Outgoing(_frame(FRAME_RECOVERY_OVERFLOW, {})))
            else:
                for seq, text in stream.buffer:
                    if seq > last_seq:
                        self._enqueue(conn, _Outgoing(text, is_event=True))
        self._open.append(conn)
        conn.writer = self._tasks.spawn(self._write_loop(conn), name=f"ws-writer-{conn.user_id}")
        conn.reader = self._tasks.spawn(self._read_loop(conn), name=f"ws-reader-{conn.user_id}")
        _log.debug("WebSocket open for %s (last_seq=%s)", conn.user_id, last_seq)

    async def _read_loop(self, conn: _Connection) -> None:
        async for msg in conn.ws:
            if msg.type is WSMsgType.TEXT:
                self._on_text(conn, msg.data)
            elif msg.type is WSMsgType.BINARY:
                if self._frames is not None:
                    raw = msg.data.decode("utf-8", "replace")
                    self._frames.append(ClientFrame(conn.user_id, None, {}, raw))
            elif msg.type is WSMsgType.PING:
                if not self.silent:
                    self._enqueue(conn, _Outgoing(bytes(msg.data)))
            elif msg.type is WSMsgType.ERROR:
                _log.debug("WebSocket error for %s: %s", conn.user_id, conn.ws.exception())
                break

    def _on_text(self, conn: _Connection, text: str) -> None:
        try:
            decoded: Any = parse_json(text.encode())
        except ValueError:
            decoded = None
        frame_type: str | None = None
        data: dict[str, Any] = {}
        if isinstance(decoded, dict):
            if isinstance(decoded.get("type"), str):
                frame_type = decoded["type"]
            if isinstance(decoded.get("data"), dict):
                data = decoded["data"]
        if self._frames is not None:
            self._frames.append(ClientFrame(conn.user_id, frame_type, data, text))
        if frame_type == FRAME_PING and not self.silent:
            pong = {"ts": data["ts"]} if "ts" in data else {}
            self._enqueue(conn, _Outgoing(_frame(FRAME_PONG, pong)))

    async def _write_loop(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await conn.queue.get()
            try:
                if self.frame_delay:
                    await asyncio.sleep(max(0.0, item.enqueued_at + self.frame_delay - loop.time()))
                if self.silent or conn.closing:
                    continue
                if isinstance(item.payload, bytes):
                    await conn.ws.pong(item.payload)
                else:
                    await conn.ws.send_str(item.payload)
                if item.is_event:
                    conn.events_sent += 1
                    if self.close_every is not None and conn.events_sent >= self.close_every[0]:
                        self._request_close(conn, self.close_every[1], "")
            except (ConnectionError, RuntimeError) as exc:
                _log.debug("WebSocket write to %s failed: %r", conn.user_id, exc)
                return
            finally:
                _resolve(item.done)

    def _request_close(self, conn: _Connection, code: int, reason: str) -> None:
        """Have the connection's handler close it with ``code`` (idempotent)."""
        if conn.closing:
            return
        conn.close_request = (code, reason)
        conn.record.closed_code = code
        if conn.reader is not None:
            conn.reader.cancel()

    async def _teardown(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.remove(conn)
        if conn.record.closed_code is None:
            conn.record.closed_code = conn.ws.close_code or WSCloseCode.ABNORMAL_CLOSURE
        tasks = [t for t in (conn.reader, conn.writer) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        while not conn.queue.empty():
            _resolve(conn.queue.get_nowait().done)
        _resolve(conn.close_sent)
        _resolve(conn.finished)
        _log.debug("WebSocket of %s closed (%s)", conn.user_id, conn.record.closed_code)

    # --- driving and faults ------------------------------------------------------------

    async def close_connections(
        self, code: int, reason: str = "", *, user_id: str | None = None, handshake: bool = False
    ) -> None:
        """Close the open connections (all, or ``user_id``'s) now; return once the close
        frames are sent (with ``handshake``: once the connections are closed)."""
        conns = self._matching(user_id)
        for conn in conns:
            self._request_close(conn, code, reason)
        if conns:
            await asyncio.wait([c.finished if handshake else c.close_sent for c in conns])

    def close_connections_soon(
        self, code: int, reason: str = "", *, user_id: str | None = None
    ) -> None:
        """Start closing the open connections (all, or ``user_id``'s)."""
        for conn in self._matching(user_id):
            self._request_close(conn, code, reason)

    def close_key_connections_soon(self, api_key: str, code: int, reason: str = "") -> None:
        """Start closing the open connections whose ticket was issued to ``api_key``."""
        for conn in self._open:
            if conn.api_key == api_key:
                self._request_close(conn, code, reason)

    async def send_raw(self, text: str, *, user_id: str | None = None) -> None:
        """Send a raw text frame on the open connections, in order with other frames;
        return once written (or dropped)."""
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[None]] = []
        for conn in self._matching(user_id):
            done: asyncio.Future[None] = loop.create_future()
            self._enqueue(conn, _Outgoing(text, done=done))
            waits.append(done)
        if waits:
            await asyncio.wait(waits)

    def open_user_ids(self) -> list[str]:
        """The users with an open connection, one entry per connection."""
        return [c.user_id for c in self._open]

    async def shutdown(self) -> None:
        """Close every connection with 1001 and refuse new ones."""
        self._shutting_down = True
        await self.close_connections(CLOSE_GOING_AWAY, "server shutting down", handshake=True)
