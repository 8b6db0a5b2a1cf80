"""Tracked background tasks: a strong reference to each until it is done, failures
logged, and a close that cancels and awaits every one (also those started while
closing)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["TaskSet"]

T = TypeVar("T")


class TaskSet:
    """A set of tasks this library started; nothing in it outlives :meth:`close`.

    Unlike a ``TaskGroup``, one task's failure does not cancel its siblings:
    it is logged on ``logger`` and the others go on.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = logger

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Start ``coro`` as a tracked task."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("task %s failed", task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:
        return bool(self._tasks)

    async def wait(self, within: float | None) -> bool:
        """Wait for every task (also those started meanwhile) up to ``within`` seconds
        (``None``: no limit); returns whether all are done."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while self._tasks:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            _, pending = await asyncio.wait(list(self._tasks), timeout=remaining)
            if pending and deadline is not None and loop.time() >= deadline:
                return False
        return True

    async def cancel(self) -> None:
        """Cancel every task (also those started while cancelling) and await them."""
        while self._tasks:
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self, grace: float = 0.0) -> None:
        """Give the tasks ``grace`` seconds to finish, then cancel the rest."""
        if grace > 0:
            await self.wait(grace)
        await self.cancel()
