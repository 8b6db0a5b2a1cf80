"""The runtime of the crash soak's child process (see :mod:`benchmarks.crash`).

Run as a user would::

    CRASH_TURN_LOG=/tmp/turns.jsonl python -m parall_bridge run \\
        benchmarks.crash_runtime:CrashRuntime

Each turn sleeps 0-50 ms (the model at work), then replies once in its chat with
``re <key> <key>...``, naming every event the turn handles (the prompt last), so a
reply can be traced to its events by content. When ``CRASH_TURN_LOG`` names a file,
one JSON line is appended at each turn's start and at its end, each with a single
``os.write`` on an ``O_APPEND`` descriptor: a SIGKILL loses nothing already written.

Importing this module does nothing (the log is opened at the first turn).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import Any, Final

from parall_bridge import AgentRuntime, Turn

__all__ = ["ENV_TURN_LOG", "CrashRuntime", "reply_text"]

ENV_TURN_LOG: Final = "CRASH_TURN_LOG"
"""The environment variable naming the turn log (none written when unset)."""
MAX_MODEL_DELAY: Final = 0.05
"""Longest simulated model time of one turn, in seconds."""
REPLY_PREFIX: Final = "re "


def reply_text(keys: list[str]) -> str:
    """The reply of a turn handling the events ``keys`` (in turn order)."""
    return REPLY_PREFIX + " ".join(keys)


class CrashRuntime(AgentRuntime):
    """Replies once per turn and journals each turn's start and end to a file."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._seq = 0
        self._rng = random.Random()

    def _log(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            path = os.environ.get(ENV_TURN_LOG)
            if not path:
                return
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = json.dumps(record, separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode())

    def _fields(self, turn: Turn) -> dict[str, Any]:
        """What a turn's log lines carry besides the process, the turn's number and its
        events' keys."""
        return {"turn_id": getattr(turn, "turn_id", None)}

    async def run_turn(self, turn: Turn) -> str | None:
        self._seq += 1
        keys = [event.key for event in turn.events]
        base: dict[str, Any] = {
            "pid": os.getpid(),
            "seq": self._seq,
            "keys": keys,
            **self._fields(turn),
        }
        self._log({**base, "mark": "start", "t": time.time()})
        outcome = "error"
        try:
            await asyncio.sleep(self._rng.uniform(0.0, MAX_MODEL_DELAY))  # the model at work
            if turn.chat_id:
                await turn.send_message(reply_text(keys))
            outcome = "ok"
            return "ok"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._log({**base, "mark": "end", "outcome": outcome, "t": time.time()})

    async def on_stop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
