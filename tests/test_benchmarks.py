"""Short smoke runs of ``make bench``, ``make soak`` and ``make fuzz``, so they cannot rot.

They check that each run completes and that its invariants hold; the figures
themselves are quoted only from full runs (``make bench``), never from here.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import tempfile
from pathlib import Path

import pytest

from benchmarks import fleet, import_time, perf, profile
from benchmarks.bench import BenchResult, run_benchmarks
from benchmarks.crash import crash_soak
from benchmarks.fleet_soak import fleet_soak
from benchmarks.fuzz import FuzzReport, Outcome, Target, fuzz
from benchmarks.fuzz_cases import GATEWAY_ENDPOINTS, REST_KINDS, WS_KINDS, RestCase, draw_cases
from benchmarks.soak import soak
from parall_bridge.testing import postgres

FUZZ_CASES = 60
FUZZ_SEED = 11
FUZZ_BOUND = 5.0
"""Seconds a call or the next good event may take in the smoke run (10 in ``make fuzz``)."""


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


PERF_KEYS = [
    "catch_up_2ms",
    "catch_up_2ms_fifo",
    "catch_up_2ms_turns",
    "catch_up_20ms",
    "catch_up_20ms_fifo",
    "catch_up_20ms_turns",
    "live_throughput",
    "cpu_per_event",
    "rss_growth",
    "writes_abandoned",
    "shutdown_seconds",
    "latency_p50",
    "latency_p99",
    "burst_turns",
    "writer_backlog_max",
    "writes_shed",
]
"""Every figure of a full ``make bench`` perf run, in the order of the table."""


def _perf_children(*markers: bytes) -> list[int]:
    """Emulator processes of the perf benchmarks (or, given ``markers``, processes
    whose command line holds one of them) still running under this process."""
    markers = markers or (b"perf_emulator",)
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        mine = fields.get("PPid", "").strip() == str(os.getpid())
        if mine and any(marker in cmdline for marker in markers):
            children.append(int(status.parent.name))
    return children


def test_import_time_smoke(tmp_path: Path) -> None:
    """The import-time benchmark runs, and ``import parall_bridge`` imports no framework."""
    out = tmp_path / "import.json"
    assert import_time.main(["--runs", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["frameworks_imported"] == []
    assert report["library"] > 0
    assert report["ratio"] == pytest.approx(report["library"] / report["baseline"])


@pytest.mark.parametrize("kind", profile.KINDS)
def test_profile_smoke(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks.profile`` profiles a tiny run and prints the gateway's
    calls (the catch-up's dispatch items, the live stream's message frames)."""
    assert profile.main([kind, "--items", "40", "--events", "40", "--lines", "200"]) == 0
    printed = capsys.readouterr().out
    first = printed.splitlines()[0]
    assert first.startswith("catch-up of 40 items" if kind == "catch_up" else "live stream of 40")
    assert ("Sources.on_item" if kind == "catch_up" else "Sources.on_message") in printed
    assert _perf_children() == []


def test_perf_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The quick perf run completes, every figure is there and consistent (ratios from
    ours and baseline, FIFO held, goals evaluated), the table and the JSON say the same,
    and no emulator process is left. Whether the goals are met is the full run's."""
    out = tmp_path / "perf.json"
    assert perf.main(["--quick", "--json", str(out), "--log", str(tmp_path / "perf.log")]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert report["meta"]["cores"] == os.cpu_count()
    assert set(report["meta"]["benchmark_seconds"]) == set(perf.BENCHMARKS)
    figures = {f["key"]: f for f in report["figures"]}
    assert [f["key"] for f in report["figures"]] == PERF_KEYS
    for key, figure in figures.items():
        assert isinstance(figure["ours"], int | float), key
        assert math.isfinite(figure["ours"]), key
        if figure["baseline"] is None:
            assert figure["ratio"] is None, key
        else:
            assert figure["baseline"] > 0, key
            assert figure["ratio"] == pytest.approx(figure["ours"] / figure["baseline"]), key
            assert figure["added"] == pytest.approx(figure["ours"] - figure["baseline"]), key
        assert (figure["goal"] is None) == (figure["met"] is None), key
        assert figure["name"] in printed, key
    for latency in ("2ms", "20ms"):
        details = report["details"][f"catch_up_{latency}"]
        assert figures[f"catch_up_{latency}_fifo"]["ours"] == 0  # FIFO per chat held
        assert details["gateway_events"] == details["items"]  # each item once
        assert 1 <= figures[f"catch_up_{latency}_turns"]["ours"] <= details["items"]
        assert details["serial"]["items_run"] >= 1
    assert figures["catch_up_2ms"]["ours"] > 0
    live = report["details"]["live"]
    assert live["gateway"]["events"] == live["loop"]["events"] == live["events"]
    assert figures["cpu_per_event"]["ours"] == pytest.approx(
        live["gateway"]["cpu_seconds"] * 1000 / live["events"]
    )
    assert len(report["details"]["rss"]["tracemalloc_top10"]) == 10
    assert report["details"]["latency"]["samples"] == perf.Sizes.quick().latency_samples
    assert report["details"]["burst"]["fifo"] is True
    assert report["details"]["burst"]["posted_during_the_turn"] is True
    table = printed[printed.index("benchmark ") :].splitlines()
    assert table[0].split() == ["benchmark", "ours", "baseline", "ratio", "goal", "met"]
    for line, figure in zip(table[2:], report["figures"], strict=False):
        assert line.startswith(figure["name"] + " ")
        assert line.split()[-1] == {True: "yes", False: "NO", None: "-"}[figure["met"]]
    assert _perf_children() == []


FLEET_KEYS = [
    "fleet_startup",
    "fleet_startup_per_account",
    "fleet_not_running",
    "fleet_rss_per_account",
    "fleet_rss_per_account_after_traffic",
    "fleet_fds_per_account",
    "fleet_fds_peak_per_account",
    "fleet_ulimit",
    "fleet_latency_p50",
    "fleet_latency_p99",
    "fleet_lost",
    "fleet_duplicated",
    "fleet_misrouted",
    "fleet_cpu_per_event",
    "fleet_emulator_cpu_per_event",
    "fleet_idle_cpu",
    "fleet_shutdown",
]
"""Every figure of the fleet benchmark, in the order of the table."""


def test_fleet_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The quick fleet run (20 accounts in one ``GatewayFleet``, traffic spread over
    them) completes: every figure is there, every account ran, every message posted
    started exactly one turn in its own account, the ``ulimit`` is printed, and neither
    the emulator nor the baseline's child is left. Whether the goals are met is the
    full run's."""
    out = tmp_path / "fleet.json"
    assert fleet.main(["--quick", "--json", str(out), "--log", str(tmp_path / "fleet.log")]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    sizes = fleet.FleetSizes.quick()
    assert report["quick"] is True
    assert report["meta"]["sizes"]["accounts"] == sizes.accounts
    assert report["meta"]["gc_freeze"] is False
    assert [f["key"] for f in report["figures"]] == FLEET_KEYS
    figures = {f["key"]: f for f in report["figures"]}
    for key, figure in figures.items():
        assert isinstance(figure["ours"], int | float), key
        assert math.isfinite(figure["ours"]), key
        if figure["baseline"]:  # (a memory growth of 20 bare connections can be 0)
            assert figure["ratio"] == pytest.approx(figure["ours"] / figure["baseline"]), key
        assert (figure["goal"] is None) == (figure["met"] is None), key
        assert figure["name"] in printed, key
    details = report["details"]["fleet"]
    assert details["running"] == details["accounts"] == sizes.accounts
    assert details["events"] == sizes.events
    assert details["acked"] == sizes.events
    assert details["stopped"] == sizes.accounts
    for key in ("fleet_not_running", "fleet_lost", "fleet_duplicated", "fleet_misrouted"):
        assert figures[key]["ours"] == 0, key
        assert figures[key]["met"] is True, key
    assert details["unexpected"] == 0
    # (no sign asserted for RSS: 20 accounts' growth is within the allocator's noise)
    assert figures["fleet_fds_per_account"]["ours"] >= 1  # a WebSocket each, at least
    ulimit = int(figures["fleet_ulimit"]["ours"])
    assert ulimit == fleet.recommended_ulimit(
        figures["fleet_fds_peak_per_account"]["ours"], sizes.accounts
    )
    assert f"ulimit -n {ulimit}" in printed
    assert _perf_children(b"perf_emulator", b"benchmarks.fleet") == []


def test_fleet_settled_rss_counts_what_is_held_not_what_was_freed() -> None:
    """The fleet bench's RSS reading: 64 MiB held show, and once freed they no longer
    count (collected, and handed back to the system by the allocator)."""
    before = fleet.settled_rss_mib()
    held = [bytes([i % 256]) * 4096 for i in range(16 * 1024)]
    with_held = fleet.settled_rss_mib()
    assert with_held - before >= 48
    del held
    assert with_held - fleet.settled_rss_mib() >= 32


def test_fleet_recommended_ulimit() -> None:
    """The ``ulimit -n`` recommended: a 25% margin and 256 spare over what the accounts
    took at their peak, in multiples of 1,024, never below 1,024."""
    assert fleet.recommended_ulimit(0.0, 10) == 1024
    assert fleet.recommended_ulimit(2.0, 2000) == 6144  # 1.25 x 4,000 + 256 = 5,256
    assert fleet.recommended_ulimit(3.0, 2000) == 8192  # 7,756


@pytest.mark.asyncio
async def test_soak_smoke() -> None:
    report = await soak(seconds=3.0, seed=7)
    assert report.messages > 0
    assert report.turns > 0
    assert report.ok, report.failures
    assert any("invariants: all held" in line for line in report.lines())


@pytest.mark.asyncio
async def test_crash_soak_smoke() -> None:
    """12 seconds of the crash soak: a gateway process with a SQLite state file, killed
    with SIGKILL at random moments and restarted: no second reply, nothing lost, nothing
    acked without a turn."""
    report = await crash_soak(12.0, messages=30, chats=5, tasks=3, kills=4, seed=3)
    assert report.kills >= 4
    assert report.events == 33
    assert report.ok, report.lines()
    assert report.pending_at_end == 0
    assert report.final_exit == 0


def _our_clusters() -> list[Path]:
    """Throwaway PostgreSQL clusters made by this process and still on disk."""
    ours = []
    for owner in Path(tempfile.gettempdir()).glob(f"{postgres.PREFIX}*/{postgres.OWNER}"):
        try:
            if owner.read_text(encoding="ascii") == str(os.getpid()):
                ours.append(owner.parent)
        except OSError:
            continue  # another process's, deleted meanwhile
    return ours


@pytest.mark.asyncio
async def test_fleet_soak_smoke(tmp_path: Path) -> None:
    """A short fleet soak: 3 fleet processes on one PostgreSQL store share 16 accounts;
    one is SIGKILLed and restarted, another rolled (new instance first, SIGTERM to the
    old): no second reply, nothing lost, nothing acked without a turn, every step
    settled, every lease released at the end, no process nor cluster left."""
    clusters = _our_clusters()
    report = await fleet_soak(
        6.0, accounts=16, processes=3, rate=5.0, lease_ttl=2.0, seed=5, workdir=tmp_path
    )
    assert report.ok, report.lines()
    assert report.messages == 30
    assert report.pending_at_end == 0
    assert report.notes == [], report.lines()
    assert report.takeover_seconds is not None
    assert report.rolled_seconds is not None
    assert set(report.exits) == {"B", "C", "A'", "B'"}
    assert all(code == 0 for code in report.exits.values()), report.exits
    assert report.leases_live_at_end == 0
    assert len(report.unheld) == 16
    assert _perf_children(b"fleet_soak_worker") == []
    assert _our_clusters() == clusters


@pytest.fixture(scope="module")
def fuzz_report() -> FuzzReport:
    """One short fuzz run (every kind of case, and a 1 MiB big body), shared by the tests
    below. Its own event loop: the run installs a loop exception handler."""
    return asyncio.run(fuzz(FUZZ_CASES, FUZZ_SEED, bound=FUZZ_BOUND, big_body_mib=1))


def test_fuzz_smoke(fuzz_report: FuzzReport) -> None:
    """The fuzz run completes and its report is consistent (whether it found a defect is
    the next test's)."""
    report = fuzz_report
    drawn = draw_cases(FUZZ_CASES, FUZZ_SEED)
    assert report.cases == len(drawn) >= FUZZ_CASES
    per_kind = collections.Counter(case.kind for case in drawn)
    assert set(per_kind) == {*WS_KINDS, *REST_KINDS}
    on_gateway = collections.Counter(
        case.kind
        for case in drawn
        if not isinstance(case, RestCase) or case.endpoint in GATEWAY_ENDPOINTS
    )
    rows = {key: sum(counter.values()) for key, counter in report.rows.items()}
    for kind, count in per_kind.items():
        assert rows[(kind, Target.CLIENT)] == count, kind  # every case runs on the client
        expected = on_gateway[kind] - (report.unreached if kind in REST_KINDS else 0)
        assert expected <= rows.get((kind, Target.GATEWAY), 0) <= on_gateway[kind], kind
    for kind in WS_KINDS:
        assert rows[(kind, Target.GATEWAY)] == per_kind[kind]

    # The table: a header, one row per kind and target whose outcomes add up, a total.
    table = report.table()
    assert table[0].split() == ["kind", "target", "cases", *[o.value for o in Outcome]]
    body = table[2:-2]
    assert len(body) == len(report.rows)
    for line in body:
        *_, target, cases, typed, skipped, non_library, stuck = line.split()
        assert target in {t.value for t in Target}
        assert int(cases) == int(typed) + int(skipped) + int(non_library) + int(stuck) > 0
    total = table[-1].split()
    assert total[0] == "total"
    assert [int(n) for n in total[1:]] == [
        sum(rows.values()),
        *[report.total(outcome) for outcome in Outcome],
    ]

    # The harness left nothing behind (the library's own leftovers are a defect: below).
    assert not [name for name in report.leftover if name.startswith("fuzz-")]

    # Findings account for every defect; ok says whether there was one.
    defects = report.total(Outcome.NON_LIBRARY) + report.total(Outcome.STUCK)
    assert sum(finding.count for finding in report.findings.values()) == defects
    assert report.ok == (
        defects == 0
        and not report.unattributed
        and not report.hangs
        and not report.leftover
        and all(r.outcome is Outcome.SKIPPED or r.outcome is Outcome.TYPED for r in report.big)
    )
    lines = report.lines()
    assert lines[-1] == "result: " + ("no defect found" if report.ok else "defects found")

    # The big body ran in a child process on both targets.
    assert [result.target for result in report.big] == [Target.CLIENT, Target.GATEWAY]
    for result in report.big:
        assert result.outcome is not None, result.reason
        assert result.rss_growth_mib >= 0
    assert sum("1 MiB body" in line for line in lines) == 2


def test_fuzz_finds_no_defect(fuzz_report: FuzzReport) -> None:
    """No hostile frame or answer makes a non-library exception leave the client or crash
    a task of the gateway, and nothing gets stuck."""
    assert report_defects(fuzz_report) == []


def report_defects(report: FuzzReport) -> list[str]:
    """The findings of a report, one line each, for a readable assertion."""
    big = [
        f"big body on the {r.target}: {r.outcome} {r.reason}"
        for r in report.big
        if r.outcome in (Outcome.NON_LIBRARY, Outcome.STUCK, None)
    ]
    return [f"{f.signature} e.g. {f.example}" for f in report.findings.values()] + [
        *report.unattributed,
        *report.hangs,
        *report.leftover,
        *big,
    ]
