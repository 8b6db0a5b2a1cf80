"""Command line: ``python -m parall_bridge <command>``.

- ``demo``: run the library against the built-in Parall emulator and show what
  happens (what ``make demo`` runs).
- ``emulator``: serve the Parall emulator on a local port until interrupted,
  printing its URL and an agent API key, to point a client or gateway at.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _print(text: str = "") -> None:
    """Print a line; once the reader has gone (``| head``), print nothing more."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's documented way out: point stdout at devnull so exit stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


async def _emulator(port: int) -> int:
    from .testing import FakeParallServer

    async with FakeParallServer(port=port) as server:
        agent = server.add_agent("Agent")
        human = server.add_user("Human")
        chat = server.add_chat(type="direct", members=[human.id, agent.user_id])
        _print(f"Parall emulator at {server.url} (WebSocket {server.ws_url})")
        _print(f"  PRLL_API_URL={server.url}")
        _print(f"  PRLL_API_KEY={agent.api_key}")
        _print(f"  PRLL_ORG_ID={server.org_id}")
        _print(f"  agent {agent.user_id}, human {human.id}, direct chat {chat.id}")
        _print("Ctrl-C stops it.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="parall-bridge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the library against the built-in emulator")
    emulator = commands.add_parser("emulator", help="serve the Parall emulator locally")
    emulator.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (8765)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return asyncio.run(run_demo(_print))
    return asyncio.run(_emulator(args.port))
