"""What the benchmarks and soaks share: the machine and commit a report was made on, and
a run that SIGTERM cancels as SIGINT does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import attrs

ROOT = Path(__file__).resolve().parent.parent
"""The repository's root."""

T = TypeVar("T")


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(  # noqa: S603 - a fixed git command, no shell
            ["git", *args],  # noqa: S607 - git from PATH, as make finds it
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()
    return "unknown"


def run_meta(quick: bool, sizes: Any, **extra: Any) -> dict[str, Any]:
    """Where a report was made: the commit (and whether the tree was dirty), Python, the
    CPU and its cores, the platform, the sizes run (an attrs instance) and ``extra``."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "quick": quick,
        "sizes": attrs.asdict(sizes),
        **extra,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


async def cancelled_on_sigterm(run: Coroutine[Any, Any, T]) -> T:
    """Await ``run``, cancelled by SIGTERM as by SIGINT, so that what it started (child
    processes, a database cluster) is stopped by its own clean-up."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


class JsonLines:
    """A file of JSON lines that processes append to (one write per line), read
    incrementally: each :meth:`read_new` returns the complete lines added since the last
    (cheap enough to poll every few milliseconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        """The entries appended since the last call (none while the file is missing)."""
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # cannot happen with one write per line; never fatal anyway
        return entries


def say(text: str) -> None:
    """A line of a benchmark's progress or report, on stdout at once."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def library_warnings_to(path: str | Path) -> Iterator[None]:
    """The library's warnings (a full writer queue warns once per step it drops) go to a
    file while the block runs: they cost what they cost, without flooding the terminal."""
    handler = logging.FileHandler(path, mode="w")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    library = logging.getLogger("parall_bridge")
    library.addHandler(handler)
    try:
        yield
    finally:
        library.removeHandler(handler)
        handler.close()


def run_heading(meta: dict[str, Any], quick: bool) -> str:
    """The report's first line: the kind of run, the commit, Python, the CPU, the time."""
    return (
        f"{'quick run' if quick else 'full run'} at {meta['commit']}"
        f"{' (dirty)' if meta['dirty'] else ''}, Python {meta['python']}, {meta['cpu']}"
        f" x{meta['cores']}, {meta['seconds']:.0f} s"
    )


async def wait_until(predicate: Callable[[], bool], within: float, every: float) -> bool:
    """Poll ``predicate`` every ``every`` seconds until it holds (``True``) or ``within``
    seconds passed (``False``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(every)
    return True
