"""One fleet process of the fleet soak (see :mod:`benchmarks.fleet_soak`).

Run as::

    PRLL_STORE_DSN=postgresql://... FLEET_SOAK_TURN_LOG=/tmp/turns.jsonl \\
        python -m benchmarks.fleet_soak_worker --accounts accounts.toml --lease-ttl 5

It loads the accounts file (:func:`parall_bridge.gateway.accounts.load_accounts`: keys
from the environment variables it names) and runs a
:class:`~parall_bridge.GatewayFleet` of them on a shared
:class:`~parall_bridge.state.PostgresStateStore` (``--lease-ttl``), so it runs only
the accounts it holds a lease for, until SIGTERM or SIGINT (a graceful shutdown), or
until its parent process is gone.

Each account's runtime (:class:`SoakRuntime`) sleeps 0-50 ms (the model at work),
then replies once in its chat naming every event of the turn
(:func:`benchmarks.crash_runtime.reply_text`), and appends one JSON line at the
turn's start and one at its end to the turn log, each with a single ``os.write`` on
an ``O_APPEND`` descriptor shared by every process of the soak: a SIGKILL loses
nothing already written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
from typing import Any, Final

from parall_bridge import GatewayFleet, Turn
from parall_bridge.gateway.accounts import load_accounts
from parall_bridge.state import PostgresStateStore

from .crash_runtime import CrashRuntime

__all__ = ["ENV_STORE_DSN", "ENV_TURN_LOG", "SoakRuntime", "main"]

ENV_TURN_LOG: Final = "FLEET_SOAK_TURN_LOG"
"""The environment variable naming the turn log (none written when unset)."""
ENV_STORE_DSN: Final = "PRLL_STORE_DSN"
"""The environment variable holding the shared store's DSN."""
PARENT_POLL: Final = 1.0
"""Seconds between two looks at whether the parent process is still there."""

_FD: list[int] = []
"""The turn log's descriptor, shared by every account of the process (opened once)."""
_RUNTIMES = itertools.count(1)
"""Numbers the runtimes of the process: an account that runs again in it (handed over
and taken back, or its lease lost and taken again) gets a new runtime, whose turns
count from 1 again."""


def _log_turn(record: dict[str, Any]) -> None:
    if not _FD:
        path = os.environ.get(ENV_TURN_LOG)
        if not path:
            return
        _FD.append(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    line = json.dumps(record, separators=(",", ":")) + "\n"
    os.write(_FD[0], line.encode())


class SoakRuntime(CrashRuntime):
    """One account's runtime: the crash soak's (one reply per turn, each turn's start and
    end journaled), its lines in the turn log shared by every account of the process, with
    the account and the runtime (``run``: unique in the process; ``seq`` counts from 1 in
    each runtime)."""

    def __init__(self, account_id: str) -> None:
        super().__init__()
        self._account_id = account_id
        self._run = next(_RUNTIMES)

    def _fields(self, turn: Turn) -> dict[str, Any]:
        return {"account": self._account_id, "run": self._run}

    def _log(self, record: dict[str, Any]) -> None:
        _log_turn(record)


async def _watch_parent(parent: int, abort: asyncio.Event) -> None:
    """Set ``abort`` once the parent process is gone (an orphan shuts down)."""
    while True:
        if os.getppid() != parent:
            abort.set()
            return
        await asyncio.sleep(PARENT_POLL)


async def run(accounts: str, dsn: str, lease_ttl: float) -> None:
    """Run the fleet of the accounts file on the shared store until SIGTERM or SIGINT."""
    configs = load_accounts(accounts)
    abort = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, abort.set)
    watcher = loop.create_task(_watch_parent(os.getppid(), abort))
    store = PostgresStateStore(dsn, lease_ttl=lease_ttl)
    fleet = GatewayFleet(configs, lambda config: SoakRuntime(config.account_id), store=store)
    try:
        await fleet.start(abort)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the fleet; 0 once it has shut down."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet_soak_worker",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--accounts", required=True, help="the TOML accounts file")
    parser.add_argument("--lease-ttl", type=float, default=5.0, help="seconds (5)")
    args = parser.parse_args(argv)
    dsn = os.environ.get(ENV_STORE_DSN)
    if not dsn:
        parser.error(f"{ENV_STORE_DSN} is not set")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(run(args.accounts, dsn, args.lease_ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
