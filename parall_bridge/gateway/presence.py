"""Typing indicators and the agent heartbeat (DESIGN.md section 3, "Typing", "Heartbeat").

Typing is reference-counted per chat: the first turn for a chat sends
``start`` and refreshes it every ``typing_refresh`` seconds; the last one to
end sends ``stop``. The heartbeat sends host metrics at the hello's interval
(the first beat after a hello at a random point within it, so that a fleet's
gateways, connected together, do not all beat in the same second) and warns
when the timer fires late (a blocked event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._tasks import TaskSet
from ..ws import ConnectionState, ParallWs

__all__ = ["Presence", "host_metrics"]

_log = logging.getLogger("parall_bridge.gateway.presence")


def host_metrics() -> dict[str, Any]:
    """Host metrics from the standard library: hostname, cores, memory total/free
    (bytes) and uptime (seconds); a metric the platform does not offer is left out."""
    metrics: dict[str, Any] = {"hostname": socket.gethostname()}
    cores = os.cpu_count()
    if cores:
        metrics["cores"] = cores
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        metrics["mem_total"] = page * os.sysconf("SC_PHYS_PAGES")
        metrics["mem_free"] = page * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    with contextlib.suppress(OSError, ValueError, IndexError):
        metrics["uptime"] = float(Path("/proc/uptime").read_text().split()[0])
    return metrics


class Presence:
    """Typing indicators and heartbeats over one :class:`ParallWs`."""

    def __init__(
        self,
        ws: ParallWs,
        *,
        typing_refresh: float,
        drift_warning: float,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """``jitter``: a number in [0, 1) drawn at each hello; the first beat comes that
        fraction of the interval early."""
        self._ws = ws
        self._jitter = jitter
        self._typing_refresh = typing_refresh
        self._drift_warning = drift_warning
        self._typing: dict[str, int] = {}
        self._refreshers: dict[str, asyncio.Task[None]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._tasks = TaskSet(_log)
        self.heartbeats_sent = 0

    # --- typing --------------------------------------------------------------------

    def typing_start(self, chat_id: str) -> None:
        """A turn for ``chat_id`` started."""
        count = self._typing.get(chat_id, 0) + 1
        self._typing[chat_id] = count
        if count == 1:
            self._refreshers[chat_id] = self._tasks.spawn(
                self._refresh(chat_id), name=f"parall-typing-{chat_id}"
            )

    def typing_stop(self, chat_id: str) -> None:
        """A turn for ``chat_id`` ended."""
        count = self._typing.get(chat_id, 0) - 1
        if count > 0:
            self._typing[chat_id] = count
            return
        self._typing.pop(chat_id, None)
        refresher = self._refreshers.pop(chat_id, None)
        if refresher is not None:
            refresher.cancel()
        self._tasks.spawn(self._send_typing(chat_id, "stop"), name=f"parall-typing-stop-{chat_id}")

    @property
    def typing_chats(self) -> frozenset[str]:
        """Chats with a typing indicator on."""
        return frozenset(self._typing)

    async def _refresh(self, chat_id: str) -> None:
        while True:
            await self._send_typing(chat_id, "start")
            await asyncio.sleep(self._typing_refresh)

    async def _send_typing(self, chat_id: str, action: str) -> None:
        if self._ws.state is ConnectionState.CONNECTED:
            await self._ws.send_typing(chat_id, "start" if action == "start" else "stop")

    # --- heartbeat --------------------------------------------------------------------

    def restart_heartbeat(self, session_id: str, interval: float) -> None:
        """(Re)start the heartbeat after a hello."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._heartbeat = self._tasks.spawn(
            self._beat(session_id, interval), name="parall-heartbeat"
        )

    async def _beat(self, session_id: str, interval: float) -> None:
        last = time.monotonic()
        # The first beat at a random point within the interval, then every interval.
        delay = interval * (1.0 - min(max(self._jitter(), 0.0), 1.0))
        while True:
            await asyncio.sleep(delay)
            now = time.monotonic()
            drift = now - last - delay
            delay = interval
            if drift > self._drift_warning:
                _log.warning("heartbeat %.1f s late: the event loop may be blocked", drift)
            last = now
            if self._ws.state is ConnectionState.CONNECTED and await self._ws.send_agent_heartbeat(
                session_id, host_metrics()
            ):
                self.heartbeats_sent += 1

    # --- shutdown -----------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every typing indicator (sending ``stop``) and the heartbeat."""
        for chat_id in list(self._typing):
            self._typing.pop(chat_id, None)
            refresher = self._refreshers.pop(chat_id, None)
            if refresher is not None:
                refresher.cancel()
            await self._send_typing(chat_id, "stop")
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self._tasks.cancel()
