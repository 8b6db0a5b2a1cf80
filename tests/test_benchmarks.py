"""Short smoke runs of ``make bench`` and ``make soak``, so they cannot rot.

They check that each run completes and that its invariants hold; the figures
themselves are quoted only from full runs (``make bench``), never from here.
"""

from __future__ import annotations

import pytest

from benchmarks.bench import BenchResult, run_benchmarks
from benchmarks.soak import soak


@pytest.mark.asyncio
async def test_bench_smoke() -> None:
    results = await run_benchmarks(quick=True)
    assert [r.name.split(" ")[0] for r in results] == ["turn-start", "burst"]
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
