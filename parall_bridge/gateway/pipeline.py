"""Dispatch items handled with bounded concurrency, each chat's in dispatch order.

Catch-up and ``dispatch.new`` hand every item to one :class:`ItemPipeline`.
Up to ``fetch_concurrency`` items are handled at once (their messages and tasks
fetched in parallel), started in the order they were put; an item reaches its
lane only once the items put before it for the same chat have been handled
(its handler awaits the gate it is given right before submitting), so each
chat keeps its FIFO order while the fetches overlap, and what waits in a lane
is coalesced into the next turn.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

import attrs

from .._tasks import TaskSet
from .sources import Gate, ItemOutcome

__all__ = ["ItemPipeline"]

_log = logging.getLogger("parall_bridge.gateway.pipeline")

Handler = Callable[[Gate], Awaitable[ItemOutcome]]


@attrs.define(eq=False)
class _Entry:
    what: str
    handle: Handler
    result: asyncio.Future[ItemOutcome]
    before: asyncio.Future[None] | None
    done: asyncio.Future[None]


class ItemPipeline:
    """Runs handlers with bounded concurrency, in order per key.

    Args:
        concurrency: most handlers running at once.
    """

    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._concurrency = concurrency
        self._waiting: collections.deque[_Entry] = collections.deque()
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._running = 0
        self._tasks = TaskSet(_log)
        self._closed = False

    @property
    def pending(self) -> int:
        """Items put and not handled yet (running or waiting to start)."""
        return self._running + len(self._waiting)

    def put(self, key: str, handle: Handler, what: str) -> asyncio.Future[ItemOutcome]:
        """Run ``handle(gate)`` once a slot is free, after the handlers put before it
        started; its ``gate`` returns once every handler put before it with the same
        ``key`` has ended. The future gets its outcome: ``LEFT_PENDING`` if it raised
        (logged, naming ``what``); it is cancelled if the pipeline closes first.

        Raises:
            RuntimeError: the pipeline is closed.
        """
        if self._closed:
            raise RuntimeError("the item pipeline is closed")
        loop = asyncio.get_running_loop()
        result: asyncio.Future[ItemOutcome] = loop.create_future()
        done: asyncio.Future[None] = loop.create_future()
        entry = _Entry(what, handle, result, self._tails.get(key), done)
        self._tails[key] = done
        done.add_done_callback(lambda _: self._forget(key, done))
        self._waiting.append(entry)
        self._start()
        return result

    def busy(self, key: str) -> bool:
        """Whether a handler put with ``key`` has not ended yet."""
        tail = self._tails.get(key)
        return tail is not None and not tail.done()

    def _forget(self, key: str, done: asyncio.Future[None]) -> None:
        if self._tails.get(key) is done:
            del self._tails[key]

    def _start(self) -> None:
        while self._waiting and self._running < self._concurrency:
            entry = self._waiting.popleft()
            self._running += 1
            self._tasks.spawn(self._run(entry), name="parall-gateway-item")

    async def _run(self, entry: _Entry) -> None:
        before = entry.before

        async def gate() -> None:
            if before is not None and not before.done():
                await asyncio.shield(before)

        try:
            value = await entry.handle(gate)
        except asyncio.CancelledError:
            entry.result.cancel()
            raise
        except Exception:
            # One item must not stop the others; it stays pending for the next pass.
            _log.exception("could not handle %s", entry.what)
            if not entry.result.done():
                entry.result.set_result(ItemOutcome.LEFT_PENDING)
        else:
            if not entry.result.done():
                entry.result.set_result(value)
        finally:
            self._running -= 1
            if not entry.done.done():
                entry.done.set_result(None)
            if not self._closed:
                self._start()

    async def close(self) -> None:
        """Stop: cancel what runs and what waits (their futures are cancelled)."""
        self._closed = True
        while self._waiting:
            entry = self._waiting.popleft()
            entry.result.cancel()
            if not entry.done.done():
                entry.done.set_result(None)
        await self._tasks.cancel()
