"""``FakeParallServer``: a Parall emulator (REST + WebSocket) on a loopback port,
with helpers to seed and drive it, records to inspect, and fault injection.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar

from aiohttp import web

from .._serde import structure
from .._tasks import TaskSet
from ..models import (
    AgentConfig,
    AgentSession,
    AgentStep,
    Chat,
    DispatchItem,
    Message,
    MessageType,
    Task,
    User,
    UserType,
)
from ..protocol import CLOSE_FORBIDDEN, WS_PATH, Endpoint
from ._faults import FaultInjector
from ._records import (
    AgentAccount,
    ClientFrame,
    RecordedRequest,
    UploadRecord,
    WsConnectionRecord,
)
from ._rest import MAX_BODY_SIZE, RestApi
from ._state import EmulatorState, SmartRouter, _Upload
from ._ws import WsHub

__all__ = ["FakeParallServer"]

_log = logging.getLogger("parall_bridge.testing.server")

T = TypeVar("T")

SHUTDOWN_TIMEOUT: Final = 1.0
"""How long closing the server waits for requests still being handled."""
WAIT_FOR_POLL_INTERVAL: Final = 0.01
"""How often :meth:`FakeParallServer.wait_for` checks its condition."""


def _describe(predicate: Callable[[], bool]) -> str:
    code = getattr(predicate, "__code__", None)
    name = getattr(predicate, "__qualname__", repr(predicate))
    if code is None:
        return name
    return f"{name} ({code.co_filename}:{code.co_firstlineno})"


def _upload_record(upload: _Upload) -> UploadRecord:
    return UploadRecord(
        attachment_id=upload.id,
        file_name=upload.file_name,
        mime_type=upload.mime_type,
        file_size=upload.file_size,
        content_type=upload.content_type,
        data=upload.data,
        completed=upload.completed,
        created_by=upload.created_by,
    )


class FakeParallServer:
    """A Parall emulator: a real aiohttp HTTP + WebSocket server on ``127.0.0.1``.

    It implements the Parall protocol: every REST row, the WebSocket protocol
    (tickets, hello, per-user sequence numbers, resume and
    ``recovery.overflow``, ping/pong) and the dispatch semantics. Seed it with
    users, agents, chats and tasks; drive it by posting messages and assigning
    tasks (the live events and dispatch items follow as on the platform);
    inspect what clients did through :attr:`requests` (with their times),
    :attr:`ws_frames`, :attr:`ws_connections` (with each upgrade's ticket, query
    and headers) and the inspection methods (:meth:`messages`, :meth:`uploads`,
    :meth:`idempotency_keys`, :meth:`seq`, :meth:`steps`, :meth:`dispatch_items`...);
    inject REST and WebSocket faults.

    Use it as an async context manager (or call :meth:`start` and
    :meth:`close`)::

        async with FakeParallServer() as server:
            agent = server.add_agent("Bot")
            ...

    The seeding and driving methods are plain functions, to be called from
    the event loop's thread while the server runs; the WebSocket events they
    cause are queued in order before they return.

    Args:
        org_id: the organisation id (a path with another org answers 404).
        heartbeat_interval: the ``heartbeat_interval`` sent in ``hello`` (seconds).
        replay_buffer_size: how many event frames per user are kept for resume.
        ticket_ttl: how long a WebSocket ticket stays valid (seconds).
        include_ws_url_in_ticket: whether ticket responses carry ``ws_url``.
        dispatch_delay: when set, dispatch items are created (and ``dispatch.new``
            sent) this many seconds after their live event, as the platform may.
        max_page_size: the cap on ``limit`` of paginated lists.
        port: the port on ``127.0.0.1`` (0: an ephemeral one).
        latency: seconds every HTTP request waits before it is acted on and answered
            (a simulated network round trip; ``0`` by default). WebSocket frames are
            not delayed (see :meth:`delay_ws_frames`). Faults come on top of it.
        record_requests: keep every HTTP request in :attr:`requests` (the default);
            ``False`` for a long run (a benchmark), whose list would grow without end.
        record_ws_frames: keep every frame clients send in :attr:`ws_frames` (the
            default); ``False`` for a long run.

    Attributes:
        org_id: the organisation id, for ``GatewayConfig`` and client calls.
    """

    def __init__(
        self,
        *,
        org_id: str = "org_test",
        heartbeat_interval: float = 30.0,
        replay_buffer_size: int = 1000,
        ticket_ttl: float = 60.0,
        include_ws_url_in_ticket: bool = True,
        dispatch_delay: float | None = None,
        max_page_size: int = 100,
        port: int = 0,
        latency: float = 0.0,
        record_requests: bool = True,
        record_ws_frames: bool = True,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError("port must be in 0..65535")
        if replay_buffer_size < 0:
            raise ValueError("replay_buffer_size must not be negative")
        if max_page_size < 1:
            raise ValueError("max_page_size must be at least 1")
        if heartbeat_interval <= 0 or ticket_ttl <= 0:
            raise ValueError("heartbeat_interval and ticket_ttl must be positive")
        if dispatch_delay is not None and dispatch_delay < 0:
            raise ValueError("dispatch_delay must not be negative")
        if not (isinstance(latency, int | float) and 0 <= latency < math.inf):
            raise ValueError(f"latency must be a finite number of seconds >= 0, got {latency!r}")
        self.org_id = org_id
        self.latency = float(latency)
        """Seconds every HTTP request waits before it is handled (the constructor's)."""
        self.requests: list[RecordedRequest] = []
        """Every HTTP request answered (or dropped), in the order answered (stays empty
        with ``record_requests=False``)."""
        self.ws_frames: list[ClientFrame] = []
        """Every frame received from WebSocket clients, in arrival order (stays empty
        with ``record_ws_frames=False``)."""
        self.ws_connections: list[WsConnectionRecord] = []
        """Every WebSocket upgrade accepted, in order."""
        self.faults = FaultInjector()
        """The scripted faults (also reachable through the helpers of this class)."""
        self._tasks = TaskSet(logging.getLogger("parall_bridge.testing.tasks"))
        self._closing = asyncio.Event()
        self._state = EmulatorState(
            org_id=org_id,
            sink=self,  # live events go through emit() to the hub
            tasks=self._tasks,
            ticket_ttl=ticket_ttl,
            dispatch_delay=dispatch_delay,
        )
        self._hub = WsHub(
            state=self._state,
            faults=self.faults,
            tasks=self._tasks,
            heartbeat_interval=heartbeat_interval,
            replay_buffer_size=replay_buffer_size,
            frames=self.ws_frames if record_ws_frames else None,
            connections=self.ws_connections,
        )
        self._rest = RestApi(
            state=self._state,
            faults=self.faults,
            requests=self.requests if record_requests else None,
            max_page_size=max_page_size,
            include_ws_url_in_ticket=include_ws_url_in_ticket,
            closing=self._closing,
            latency=self.latency,
        )
        self._port = port
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening on ``127.0.0.1`` (on an ephemeral port unless one was given)."""
        if self._runner is not None:
            raise RuntimeError("the server is already started")
        if self._closed:
            raise RuntimeError("a closed server cannot be started again")
        app = web.Application(client_max_size=MAX_BODY_SIZE)
        self._rest.register(app)
        app.router.add_get(WS_PATH, self._hub.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self._url = f"http://{host}:{port}"
        self._state.base_url = self._url
        self._state.ws_url = self.ws_url
        _log.debug("Parall emulator listening on %s", self._url)

    async def close(self) -> None:
        """Close every WebSocket (1001), cancel the emulator's tasks, stop listening.

        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        runner, self._runner = self._runner, None
        try:
            if runner is not None:
                await self._hub.shutdown()
        finally:
            await self._tasks.close()
            if runner is not None:
                await runner.cleanup()
            await self._tasks.close()
        _log.debug("Parall emulator closed")

    async def __aenter__(self) -> FakeParallServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:PORT`` (no trailing slash)."""
        if self._url is None:
            raise RuntimeError("the server is not started")
        return self._url

    @property
    def ws_url(self) -> str:
        """The WebSocket URL, ``ws://127.0.0.1:PORT/ws``."""
        return "ws" + self.url.removeprefix("http") + WS_PATH

    @property
    def smart_router(self) -> SmartRouter:
        """Picks the ``smart``-mode group messages routed to an agent:
        ``(message wire dict, agent user id) -> bool``. Default: every message.
        (A message that @mentions the agent or @all is routed without asking.)"""
        return self._state.smart_router

    @smart_router.setter
    def smart_router(self, router: SmartRouter) -> None:
        self._state.smart_router = router

    # --- seeding and driving ------------------------------------------------------------

    def add_user(
        self, display_name: str, *, user_id: str | None = None, type: str = UserType.HUMAN.value
    ) -> User:
        """Create a user (a human by default)."""
        return structure(self._state.add_user(display_name, user_id=user_id, type=type), User)

    def add_agent(
        self, display_name: str = "Agent", *, user_id: str | None = None, api_key: str | None = None
    ) -> AgentAccount:
        """Create an agent user with an API key (generated unless given)."""
        if api_key is not None and self._state.key_owner(api_key) is not None:
            raise ValueError("api_key is already in use")
        user = self.add_user(display_name, user_id=user_id, type=UserType.AGENT.value)
        return AgentAccount(user=user, api_key=self.add_api_key(user.id, api_key))

    def add_api_key(self, user_id: str, api_key: str | None = None) -> str:
        """Give a user (a human too) an API key (generated unless given); return it."""
        return self._state.add_api_key(user_id, api_key)

    def revoke_key(self, api_key: str) -> None:
        """Revoke an API key: its REST calls answer 401, its tickets are refused, and
        the open WebSockets opened with it are closed with 4003 (those of another key
        of the same user stay open)."""
        self._state.revoke_key(api_key)
        self._hub.close_key_connections_soon(api_key, CLOSE_FORBIDDEN, "key revoked")

    def add_chat(
        self,
        *,
        type: str = "direct",
        name: str | None = None,
        members: Sequence[str] = (),
        agent_routing_mode: str | None = None,
        chat_id: str | None = None,
    ) -> Chat:
        """Create a chat of these members (``agent_routing_mode`` absent unless given)."""
        chat = self._state.add_chat(
            type=type,
            name=name,
            members=members,
            agent_routing_mode=agent_routing_mode,
            chat_id=chat_id,
        )
        return structure(chat, Chat)

    def add_member(self, chat_id: str, user_id: str) -> Chat:
        """Add a user to an existing chat: the messages posted from now on reach them
        (``message.new``, and for an agent the dispatch items of its routing). The
        protocol has no frame for a new member, so nothing is sent now.

        Raises:
            KeyError: no such chat or user.
            ValueError: the user is a member already.
        """
        return structure(self._state.add_member(chat_id, user_id), Chat)

    def update_chat(self, chat_id: str, **changes: Any) -> Chat:
        """Change ``type``, ``name`` and/or ``agent_routing_mode``; members get ``chat.update``."""
        return structure(self._state.update_chat(chat_id, changes), Chat)

    def post_message(
        self,
        chat_id: str,
        sender_id: str,
        text: str = "",
        *,
        mentions: Sequence[str] = (),
        thread_root_id: str | None = None,
        no_reply: bool = False,
        attachment_ids: Sequence[str] = (),
        message_type: str = MessageType.TEXT.value,
        content: Mapping[str, Any] | None = None,
    ) -> Message:
        """Post a message as ``sender_id`` would: ``message.new`` to every member
        (the sender included), then the dispatch items and ``dispatch.new`` of the
        agents it is routed to.

        ``content`` replaces the content built from ``text`` and ``mentions``
        (needed for message types other than ``text``).
        """
        if content is None:
            content = {"text": text, "mentions": [{"user_id": m} for m in mentions]}
        message = self._state.create_message(
            chat_id,
            sender_id,
            message_type=message_type,
            content=content,
            thread_root_id=thread_root_id,
            hints={"no_reply": True} if no_reply else None,
            attachment_ids=attachment_ids,
        )
        return structure(message, Message)

    def post_file(
        self,
        chat_id: str,
        sender_id: str,
        data: bytes,
        *,
        file_name: str,
        mime_type: str,
        caption: str | None = None,
    ) -> Message:
        """Store ``data`` as an attachment and post a ``file`` message of it."""
        attachment_id = self.add_attachment(data, file_name=file_name, mime_type=mime_type)
        content: dict[str, Any] = {
            "attachment_id": attachment_id,
            "file_name": file_name,
            "mime_type": mime_type,
            "file_size": len(data),
        }
        if caption is not None:
            content["caption"] = caption
        return self.post_message(
            chat_id,
            sender_id,
            message_type=MessageType.FILE.value,
            content=content,
            attachment_ids=[attachment_id],
        )

    def add_attachment(self, data: bytes, *, file_name: str, mime_type: str) -> str:
        """Store a completed upload; return its attachment id."""
        return self._state.add_attachment(data, file_name=file_name, mime_type=mime_type)

    def delete_message(self, message_id: str) -> None:
        """Delete a message: later reads answer 404 and lists leave it out."""
        self._state.delete_message(message_id)

    def delete_task(self, task_id: str) -> None:
        """Delete a task: later reads answer 404."""
        self._state.delete_task(task_id)

    def assign_task(
        self,
        title: str,
        *,
        assignee_id: str,
        creator_id: str,
        status: str = "todo",
        priority: str = "normal",
        description: str | None = None,
        identifier: str | None = None,
        task_id: str | None = None,
    ) -> Task:
        """Create a task for ``assignee_id`` (or, when task ``task_id`` exists, reassign
        it): ``task.assigned`` to the assignee, and for an agent a dispatch item
        (``task_assign``/``task_activity``) and ``dispatch.new``."""
        task = self._state.assign_task(
            title,
            assignee_id=assignee_id,
            creator_id=creator_id,
            status=status,
            priority=priority,
            description=description,
            identifier=identifier,
            task_id=task_id,
        )
        return structure(task, Task)

    def update_task(self, task_id: str, **changes: Any) -> Task:
        """Change a task by the rules of the ``PATCH`` endpoint (unknown fields are
        ignored; a new assignee gets ``task.assigned`` and a dispatch item)."""
        return structure(self._state.update_task(task_id, changes), Task)

    def set_agent_config(self, agent_id: str, settings: Mapping[str, Any]) -> AgentConfig:
        """Replace the agent's platform settings; the version goes up by one and the
        agent gets ``agent_config.update``."""
        return structure(self._state.set_agent_config(agent_id, settings), AgentConfig)

    def age_dispatch_items(self, seconds: float, *, agent_id: str | None = None) -> None:
        """Move ``created_at`` of pending dispatch items ``seconds`` into the past."""
        self._state.age_dispatch(seconds, agent_id)

    # --- inspection ------------------------------------------------------------------------

    def dispatch_items(self, agent_id: str, *, include_acked: bool = False) -> list[DispatchItem]:
        """The agent's dispatch items, oldest first (acked ones have status ``"acked"``)."""
        records = self._state.dispatch_records(agent_id, include_acked=include_acked)
        return [structure(item, DispatchItem) for item in records]

    def dispatch_count(self, agent_id: str, *, acked: bool = False) -> int:
        """How many of the agent's dispatch items are pending (with ``acked``: how many
        were acked), without building them: cheap enough to poll under load."""
        return self._state.dispatch_count(agent_id, acked=acked)

    def step_count(self, agent_id: str) -> int:
        """How many steps the agent wrote (all sessions), without building them."""
        return self._state.step_count(agent_id)

    def messages(self, chat_id: str | None = None) -> list[Message]:
        """The chat's messages, or with no ``chat_id`` every message of the org (every
        chat), oldest first; deleted ones are left out."""
        if chat_id is None:
            return [structure(m, Message) for m in self._state.org_messages()]
        return [structure(m, Message) for _, m in self._state.chat_messages(chat_id)]

    def members(self, chat_id: str) -> list[str]:
        """The user ids of a chat's members, in the order they joined."""
        return self._state.members(chat_id)

    def idempotency_keys(self) -> dict[str, str]:
        """Every ``idempotency_key`` the org's sends carried, in the order first seen,
        mapped to the id of the message its first use created (a repeat creates
        nothing: :attr:`requests` shows each use)."""
        return self._state.idempotency_keys()

    def uploads(self) -> list[UploadRecord]:
        """Every attachment, presigned by a client or stored by the test, in the order
        created: its ``Content-Type`` as uploaded, its bytes, whether it was completed."""
        return [_upload_record(u) for u in self._state.uploads()]

    def upload(self, attachment_id: str) -> UploadRecord:
        """One attachment (see :meth:`uploads`).

        Raises:
            KeyError: no such attachment.
        """
        return _upload_record(self._state.upload(attachment_id))

    def seq(self, user_id: str) -> int:
        """The ``seq`` of the last event frame numbered for a user: the highest a
        client of theirs can have seen (0 before the first, and after
        :meth:`reset_seq`)."""
        return self._hub.seq(user_id)

    def get_task(self, task_id: str) -> Task:
        """A task as it is now."""
        return structure(self._state.task(task_id), Task)

    def sessions(self, agent_id: str) -> list[AgentSession]:
        """The agent sessions the agent created, oldest first."""
        return [structure(s, AgentSession) for s in self._state.sessions_of(agent_id)]

    def steps(self, agent_id: str, session_id: str | None = None) -> list[AgentStep]:
        """The agent's steps (of one session, or all), in arrival order."""
        return [structure(s, AgentStep) for s in self._state.steps_of(agent_id, session_id)]

    def uploaded_bytes(self, attachment_id: str) -> bytes:
        """The bytes stored for an attachment."""
        return self._state.uploaded_bytes(attachment_id)

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,
    ) -> None:
        """Wait until ``predicate()`` is true, checking every 10 ms.

        Raises:
            TimeoutError: when it is still false after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"condition {_describe(predicate)} still false after {timeout:g} s"
                )
            await asyncio.sleep(WAIT_FOR_POLL_INTERVAL)

    # --- REST faults ---------------------------------------------------------------------------

    def fail_next(
        self,
        endpoint: Endpoint,
        *,
        times: int = 1,
        status: int = 500,
        body_form: str = "canonical",
        retry_after: float | str | None = None,
        act_first: bool = False,
    ) -> None:
        """See :meth:`FaultInjector.fail_next`."""
        self.faults.fail_next(
            endpoint,
            times=times,
            status=status,
            body_form=body_form,
            retry_after=retry_after,
            act_first=act_first,
        )

    def malform_next(
        self,
        endpoint: Endpoint,
        *,
        times: int = 1,
        body: str = "not json",
        status: int = 200,
        content_type: str = "application/json",
        size: int | None = None,
        truncated: bool = False,
    ) -> None:
        """See :meth:`FaultInjector.malform_next`."""
        self.faults.malform_next(
            endpoint,
            times=times,
            body=body,
            status=status,
            content_type=content_type,
            size=size,
            truncated=truncated,
        )

    def delay_next(self, endpoint: Endpoint, seconds: float, *, times: int = 1) -> None:
        """See :meth:`FaultInjector.delay_next`."""
        self.faults.delay_next(endpoint, seconds, times=times)

    def drop_next(self, endpoint: Endpoint, *, times: int = 1) -> None:
        """See :meth:`FaultInjector.drop_next`."""
        self.faults.drop_next(endpoint, times=times)

    # --- WebSocket faults and driving ------------------------------------------------------

    async def close_ws(self, code: int, reason: str = "", *, user_id: str | None = None) -> None:
        """Close the open WebSocket connections (all, or ``user_id``'s) with ``code`` now."""
        await self._hub.close_connections(code, reason, user_id=user_id)

    def close_ws_every(self, frames: int | None, code: int = 1012) -> None:
        """Close each connection with ``code`` once ``frames`` event frames were sent on
        it (replayed ones count); ``None`` turns this off."""
        if frames is not None and frames < 1:
            raise ValueError("frames must be at least 1 (or None)")
        self._hub.close_every = None if frames is None else (frames, code)

    def go_silent(self, silent: bool = True) -> None:
        """Zombie mode: keep the sockets open but send nothing (no frames, no pongs,
        no answers to WebSocket pings), on open and new connections (a new one gets
        no ``hello``). Frames numbered meanwhile stay in the replay buffer."""
        self._hub.silent = silent

    async def send_raw(self, text: str, *, user_id: str | None = None) -> None:
        """Send a raw text frame (garbage, oversized...) on the open connections
        (all, or ``user_id``'s), after the frames already queued; return once sent."""
        await self._hub.send_raw(text, user_id=user_id)

    def delay_ws_frames(self, seconds: float | None) -> None:
        """Delay every outgoing WebSocket frame by ``seconds`` (``None``: no delay)."""
        if seconds is not None and seconds < 0:
            raise ValueError("seconds must not be negative")
        self._hub.frame_delay = seconds

    def refuse_ws(self, times: int, status: int = 503) -> None:
        """Answer the next ``times`` upgrade requests with HTTP ``status`` instead of
        a WebSocket (the ticket is not used up)."""
        self.faults.refuse_ws(times, status)

    def emit(self, user_id: str, frame_type: str, data: Mapping[str, Any]) -> int:
        """Push any event frame to a user: it gets the next seq and goes into the
        replay buffer. Return the seq."""
        return self._hub.emit(user_id, frame_type, data)

    def reset_seq(self, user_id: str | None = None) -> None:
        """Simulate a restart of the numbering (one user's, or everyone's): the replay
        buffer is emptied and seq restarts at 0."""
        self._hub.reset_seq(user_id)
