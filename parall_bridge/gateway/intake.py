"""Intake: every inbound frame, in arrival order, to the part that handles it.

WebSocket frames and :meth:`Gateway.feed` calls go through one queue drained
by one task, so frames are handled one at a time in the order they came:
``message.new`` and ``task.assigned`` go to the sources (which claim them in the
ledger and hand them to the lanes), after the dispatch items of the same chat
still in the item pipeline; ``dispatch.new`` goes to that pipeline, which
fetches many items at once and keeps each chat's order; ``hello`` loads
the chats, restarts the heartbeat and asks for a catch-up; ``chat.update``
updates the chat cache; ``agent_config.update`` refreshes the platform config;
``recovery.overflow`` asks for a full catch-up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs

from .. import protocol as p
from .._tasks import TaskSet
from ..errors import ParallError
from ..events import EventOrigin
from ..models import ChatUpdate, DispatchItem, Hello, Message, Task
from ..ws import ParallWs
from .config_sync import ConfigSync
from .pipeline import ItemPipeline
from .presence import Presence
from .reconciler import Reconciler
from .sources import ChatCache, Gate, ItemOutcome, Sources, chat_key, item_key, task_key

__all__ = ["INBOUND_FRAMES", "Intake"]

_log = logging.getLogger("parall_bridge.gateway")

INBOUND_FRAMES: Final = (
    p.FRAME_HELLO,
    p.FRAME_MESSAGE_NEW,
    p.FRAME_TASK_ASSIGNED,
    p.FRAME_DISPATCH_NEW,
    p.FRAME_CHAT_UPDATE,
    p.FRAME_AGENT_CONFIG_UPDATE,
    p.FRAME_RECOVERY_OVERFLOW,
)
"""The WebSocket frames the gateway listens to."""


@attrs.define
class _Inbound:
    """One inbound frame waiting in the queue."""

    frame_type: str
    payload: Any
    done: asyncio.Future[bool] | None = None


class Intake:
    """The one queue of inbound frames and its worker.

    Args:
        ws: the WebSocket (its frames are subscribed to by :meth:`start`).
        sources: turns messages, tasks and dispatch items into claimed events.
        pipeline: handles dispatch items, many at once, each chat's in order.
        chats: the chat cache.
        presence: the heartbeat, restarted on every ``hello``.
        reconciler: asked for a catch-up pass after ``hello`` and on overflow.
        config: fetches the platform config again on ``agent_config.update``.
        heard: called on every frame (the platform is alive).
    """

    def __init__(
        self,
        *,
        ws: ParallWs,
        sources: Sources,
        pipeline: ItemPipeline,
        chats: ChatCache,
        presence: Presence,
        reconciler: Reconciler,
        config: ConfigSync,
        heard: Callable[[], None],
    ) -> None:
        self._ws = ws
        self._sources = sources
        self._pipeline = pipeline
        self._chats = chats
        self._presence = presence
        self._reconciler = reconciler
        self._config = config
        self._heard = heard
        self._queue: asyncio.Queue[_Inbound] = asyncio.Queue()
        self._tasks = TaskSet(_log)
        self._closed = False

    def start(self) -> None:
        """Subscribe to the WebSocket's frames and start the worker."""
        for frame_type in INBOUND_FRAMES:
            self._ws.on(frame_type, self._handler(frame_type))
        self._tasks.spawn(self._worker(), name="parall-gateway-intake")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def feed(self, frame_type: str, payload: Any) -> bool:
        """Queue a frame behind the ones before it; returns once it was handled, with
        whether a turn was scheduled."""
        if self._closed:
            raise RuntimeError("the gateway is stopping")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Inbound(frame_type, payload, done))
        return await done

    def _handler(self, frame_type: str) -> Callable[[Any], None]:
        def handle(payload: Any) -> None:
            if not self._closed:
                self._queue.put_nowait(_Inbound(frame_type, payload))

        return handle

    async def _worker(self) -> None:
        while True:
            item = await self._queue.get()
            routed = False
            try:
                self._heard()
                routed = await self._process(item.frame_type, item.payload, item.done is not None)
            except Exception:
                _log.exception("handling a %s frame failed", item.frame_type)
            finally:
                if item.done is not None and not item.done.done():
                    item.done.set_result(routed)

    async def _process(self, frame_type: str, payload: Any, wait: bool) -> bool:
        """Handle one frame; whether a turn was scheduled (``dispatch.new``: only when
        ``wait``, for :meth:`feed`; otherwise its item is left to the pipeline)."""
        sources = self._sources
        pipeline = self._pipeline
        if frame_type == p.FRAME_MESSAGE_NEW and isinstance(payload, Message):
            key = chat_key(payload.chat_id)
            if not pipeline.busy(key):
                return await sources.on_message(payload)
            # Dispatch items of its chat are still being fetched: it goes after them,
            # through the pipeline, and the frames behind it do not wait.
            return await self._after(wait, key, sources.on_message, payload)
        if frame_type == p.FRAME_TASK_ASSIGNED and isinstance(payload, Task):
            key = task_key(payload.id)
            if not pipeline.busy(key):
                return await sources.on_task(payload)
            return await self._after(wait, key, sources.on_task, payload)
        if frame_type == p.FRAME_DISPATCH_NEW and isinstance(payload, DispatchItem):
            key = item_key(payload)
            if not pipeline.busy(key) and sources.in_hand(payload):
                # The row of a message already handled live: attached or acked at once.
                outcome_now = await sources.on_item(payload, EventOrigin.DISPATCH_NEW)
                return outcome_now is ItemOutcome.DISPATCHED
            outcome = pipeline.put(
                key,
                functools.partial(sources.on_item, payload, EventOrigin.DISPATCH_NEW, None),
                f"dispatch item {payload.id}",
            )
            return wait and await outcome is ItemOutcome.DISPATCHED
        if frame_type == p.FRAME_CHAT_UPDATE and isinstance(payload, ChatUpdate):
            self._chats.apply(payload)
        elif frame_type == p.FRAME_HELLO and isinstance(payload, Hello):
            await self._on_hello(payload)
        elif frame_type == p.FRAME_AGENT_CONFIG_UPDATE:
            _log.info("platform config changed: fetching it")
            self._config.refresh()
        elif frame_type == p.FRAME_RECOVERY_OVERFLOW:
            _log.warning("the platform lost events (recovery.overflow): full catch-up")
            self._reconciler.request()
        else:
            _log.debug("ignoring a %s frame", frame_type)
        return False

    async def _after(
        self,
        wait: bool,
        key: str,
        handle: Callable[[Any, Gate], Awaitable[bool]],
        payload: Any,
    ) -> bool:
        async def live(gate: Gate) -> ItemOutcome:
            routed = await handle(payload, gate)
            # Only "dispatched or not" matters here (for feed()): a live event that is
            # not routed has nothing pending of its own.
            return ItemOutcome.DISPATCHED if routed else ItemOutcome.LEFT_PENDING

        outcome = self._pipeline.put(key, live, f"a live {type(payload).__name__.lower()}")
        return wait and await outcome is ItemOutcome.DISPATCHED

    async def _on_hello(self, hello: Hello) -> None:
        try:
            count = await self._chats.load()
            _log.info("connected; %d chat(s) cached", count)
        except ParallError as exc:
            _log.warning("could not load the chats: %s", str(exc))
        except Exception:
            # Chats are fetched on demand anyway: this hello's catch-up must still run.
            _log.exception("loading the chats failed")
        self._presence.restart_heartbeat(hello.session_id, self._ws.heartbeat_interval)
        self._reconciler.request(hello=True)

    async def close(self) -> None:
        """Stop taking frames; frames still queued are dropped (their events stay
        pending on the platform), and :meth:`feed` callers get ``False``."""
        self._closed = True
        await self._tasks.cancel()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item.done is not None and not item.done.done():
                item.done.set_result(False)
