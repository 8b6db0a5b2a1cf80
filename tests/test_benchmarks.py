"""Short smoke runs of ``make bench`` and ``make soak``, so they cannot rot.

They check that each run completes and that its invariants hold; the figures
themselves are quoted only from full runs (``make bench``), never from here.
"""

from __future__ import annotations

import pytest

from benchmarks.bench import BenchResult, run_benchmarks
from benchmarks.crash import crash_soak
from benchmarks.soak import soak


@pytest.mark.asyncio
async def test_bench_smoke() -> None:
    results = await run_benchmarks(quick=True)
    assert [r.name.split(" ")[0] for r in results] == [
        "turn-start",
        "turn-start",
        "turn-start",
        "burst",
    ]
    for result in results:
        assert isinstance(result, BenchResult)
        assert result.ours > 0
        assert result.baseline > 0
        assert " -> " in result.line()


@pytest.mark.asyncio
async def test_soak_smoke() -> None:
    report = await soak(seconds=3.0, seed=7)
    assert report.messages > 0
    assert report.turns > 0
    assert report.ok, report.failures
    assert any("invariants: all held" in line for line in report.lines())


@pytest.mark.asyncio
async def test_crash_soak_smoke() -> None:
    """30 seconds of the crash soak: a gateway process with a SQLite state file, killed
    with SIGKILL at random moments and restarted: no second reply, nothing lost, nothing
    acked without a turn."""
    report = await crash_soak(30.0, messages=60, chats=6, tasks=4, kills=6, seed=3)
    assert report.kills >= 6
    assert report.events == 64
    assert report.ok, report.lines()
    assert report.pending_at_end == 0
    assert report.final_exit == 0
