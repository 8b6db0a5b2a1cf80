"""How long ``import parall_bridge`` takes in a fresh interpreter, against its baseline.

Each import runs in a new ``python -c`` process (so nothing is cached in ``sys.modules``),
``--runs`` times, alternating with the baseline: the same interpreter importing only the
library's four dependencies (aiohttp, attrs, cattrs, tenacity). The figure is the median
wall time of each, and their ratio, with the bytecode cache in use as a user's interpreter
has it (the first, unmeasured run writes it). It also checks that importing ``parall_bridge`` and
``parall_bridge.adapters`` imports no agent framework (the adapters import theirs only
when their own module is imported).

``python -m benchmarks.import_time`` (``make bench`` runs it with the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Final

import attrs

LIBRARY: Final = "import parall_bridge, parall_bridge.adapters"
BASELINE: Final = "import aiohttp, attrs, cattrs, tenacity"
FRAMEWORKS: Final = ("pydantic_ai", "agents", "openai", "langgraph", "langchain_core")


@attrs.frozen
class ImportTimes:
    """Median seconds of each import over ``runs`` fresh processes."""

    runs: int
    library: float
    baseline: float
    frameworks_imported: tuple[str, ...]

    @property
    def ratio(self) -> float:
        """The library's import time over its dependencies'."""
        return self.library / self.baseline


def _env() -> dict[str, str]:
    # As a user's interpreter runs: with the bytecode cache (the first run writes it).
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _time(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())  # noqa: S603
    return time.perf_counter() - started


def frameworks_imported() -> tuple[str, ...]:
    """The agent frameworks a fresh ``import parall_bridge, parall_bridge.adapters``
    pulls in (none is right)."""
    code = (
        f"{LIBRARY}\nimport sys\n"
        f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(FRAMEWORKS)!r})))"
    )
    out = subprocess.run(  # noqa: S603 (our own code)
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return tuple(out.split())


def measure(runs: int) -> ImportTimes:
    """Time ``runs`` fresh imports of the library and of the baseline, interleaved."""
    library: list[float] = []
    baseline: list[float] = []
    _time(LIBRARY)  # warm the file cache for both
    _time(BASELINE)
    for _ in range(runs):
        library.append(_time(LIBRARY))
        baseline.append(_time(BASELINE))
    return ImportTimes(
        runs=runs,
        library=statistics.median(library),
        baseline=statistics.median(baseline),
        frameworks_imported=frameworks_imported(),
    )


def main(argv: list[str] | None = None) -> int:
    """Measure and print; 1 when a framework was imported."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.import_time", description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    times = measure(args.runs)
    print(
        f"import parall_bridge: {times.library * 1000:.0f} ms (median of {times.runs} fresh "
        f"processes) against {times.baseline * 1000:.0f} ms for its dependencies alone: "
        f"{times.ratio:.2f}x; frameworks imported: {', '.join(times.frameworks_imported) or 'none'}"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(attrs.asdict(times) | {"ratio": times.ratio}, out, indent=2)
    return 1 if times.frameworks_imported else 0


if __name__ == "__main__":
    raise SystemExit(main())
