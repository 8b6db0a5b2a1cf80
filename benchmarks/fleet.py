"""The fleet benchmark of issue 18: many accounts in one ``GatewayFleet`` process.

2,000 accounts (``--accounts``), each its own agent, API key and WebSocket, run by
one :class:`~parall_bridge.GatewayFleet` with no store (each account keeps its state
in memory); the emulator runs in a process of its own
(:mod:`benchmarks.perf_emulator`, a 2 ms round trip), so this process's memory, file
descriptors and CPU time are the fleet's. Measured, each against a baseline from the
same run where one makes sense:

- start-up: ``fleet.start()`` until ``wait_ready()`` returns with every account
  ``running``, in all and per account; against the same accounts each connecting a
  bare ``ParallClient`` and ``ParallWs`` (one shared connector), in a child process
  of its own (so that its memory, freed, is not reused unseen by the fleet);
- RSS per account: VmRSS once every account is ready (after ``gc.collect()`` and
  ``malloc_trim``: :func:`settled_rss_mib`) minus
  VmRSS just before the fleet started (imports, the runtime and the emulator's
  client already loaded), divided by the accounts; goal under 200 KiB; the bare
  connections' in the child, the same way;
- open file descriptors per account (``/proc/self/fd`` after minus before, divided;
  and the peak, sampled every 0.1 s through start-up and traffic), and the
  ``ulimit -n`` to set for that many accounts: 1.25 x the peak per account x the
  accounts + 256, rounded up to a multiple of 1,024;
- dispatch latency: a human posts into random accounts' chats at ``--rate`` a second
  for ``--seconds`` (the emulator posts, and notes ``time.monotonic()`` just before
  each post); latency is from then to the start of that account's ``run_turn``,
  p50 and p99 (goal p99 under 20 ms), against the floor: the same traffic into one
  bare ``ParallWs`` in this process receiving the ``message.new``, measured alone
  after the fleet has stopped, against a fresh emulator. Every message posted must
  start exactly one turn, in its own account: lost, duplicated and misrouted are
  counted (goal 0 each);
- CPU time of this process per event, from the first post to the last ack (against
  the floor's), the emulator's (the other process on the same cores), and this
  process's with every account idle (heartbeats and all), in percent of one core.

Run ``python -m benchmarks.fleet`` (part of ``make bench``); ``--quick`` is the smoke
run of the test suite (20 accounts, seconds; its figures mean nothing);
``--gc-freeze`` calls ``gc.freeze()`` once every account is ready, as a host with
thousands of accounts should (the collector's full passes over their objects
otherwise pause the whole process for up to a second). It prints a
table (benchmark, ours, baseline, ratio, goal, met) and writes every figure and the
details to ``--json`` (``.bench/fleet.json``). A goal missed is reported, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import attrs

from parall_bridge import (
    AgentRuntime,
    GatewayConfig,
    GatewayFleet,
    Message,
    ParallClient,
    ParallWs,
    Turn,
)

from ._common import library_warnings_to, run_heading, run_meta, say
from .perf import Figure, Goal, PerfReport, _number, _percentile, _status_mib
from .perf_emulator import ROOT, EmulatorProcess, raise_fd_limit

__all__ = ["FleetSizes", "bare_child", "main", "run_fleet"]

_log = logging.getLogger("benchmarks.fleet")

ROUND_TRIP: Final = 0.002
"""The emulator's simulated round trip on every REST answer (seconds), as in perf."""
RSS_GOAL_KIB: Final = 200.0
LATENCY_GOAL_MS: Final = 20.0
SAMPLE_INTERVAL: Final = 0.1
"""How often the open file descriptors are sampled (seconds)."""
ULIMIT_MARGIN: Final = 1.25
ULIMIT_SPARE: Final = 256
DEFAULT_JSON: Final = ".bench/fleet.json"
DEFAULT_LOG: Final = ".bench/fleet.log"
CHILD_TIMEOUT: Final = 600.0
"""Seconds the bare-connections child may take in all before it is killed."""


@attrs.frozen
class FleetSizes:
    """How big a run is.

    Attributes:
        accounts: accounts in the fleet.
        rate: messages posted a second during the traffic.
        seconds: how long the traffic lasts (the floor's too).
        idle_seconds: how long the idle fleet's CPU time is measured.
    """

    accounts: int = 2_000
    rate: float = 500.0
    seconds: float = 30.0
    idle_seconds: float = 5.0

    @classmethod
    def quick(cls) -> FleetSizes:
        """A smoke run of a few seconds."""
        return cls(accounts=20, rate=100.0, seconds=1.0, idle_seconds=0.5)

    @property
    def events(self) -> int:
        """Messages posted during the traffic (and the floor)."""
        return max(1, round(self.rate * self.seconds))


# --- measuring ---------------------------------------------------------------------------------


def open_fds() -> int:
    """This process's open file descriptors (-1 when ``/proc`` is not there)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def settled_rss_mib() -> float:
    """This process's RSS in MiB once garbage is collected and the C allocator has handed
    its free pages back to the system (glibc's ``malloc_trim``, where there is one), so
    that memory freed by an earlier phase is not counted against the next."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
    return _status_mib("VmRSS")


def recommended_ulimit(fds_per_account: float, accounts: int) -> int:
    """The ``ulimit -n`` to set for ``accounts`` accounts: :data:`ULIMIT_MARGIN` x
    ``fds_per_account`` x ``accounts`` + :data:`ULIMIT_SPARE`, rounded up to a
    multiple of 1,024."""
    need = ULIMIT_MARGIN * max(0.0, fds_per_account) * accounts + ULIMIT_SPARE
    return max(1024, math.ceil(need / 1024) * 1024)


class _FdSampler:
    """The most file descriptors open at once, sampled every :data:`SAMPLE_INTERVAL`
    within ``async with``."""

    def __init__(self) -> None:
        self.peak = open_fds()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _FdSampler:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fd-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, open_fds())

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)


class _Turns:
    """What the accounts' turns saw: when each message's turn started, how many turns
    each message was in, and in which account."""

    def __init__(self) -> None:
        self.started = _Awaited()
        self.count: Counter[str] = Counter()
        self.account: dict[str, str] = {}
        self.turns = 0

    def record(self, account_id: str, turn: Turn, now: float) -> None:
        self.turns += 1
        for event in turn.events:
            message_id = event.message_id
            if message_id:
                self.count[message_id] += 1
                self.started.mark(message_id, now)
                self.account.setdefault(message_id, account_id)


class _FleetRuntime(AgentRuntime):
    """An account's runtime: an instant turn (no reply) that notes when it started."""

    def __init__(self, account_id: str, turns: _Turns) -> None:
        self._account_id = account_id
        self._turns = turns

    async def run_turn(self, turn: Turn) -> str | None:
        self._turns.record(self._account_id, turn, time.monotonic())
        return None


class _Awaited:
    """Message ids seen, and a wait for a set of them that may start before or after
    they are seen."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self._missing: set[str] | None = None
        self._all_seen = asyncio.Event()

    def mark(self, message_id: str, at: float) -> None:
        """``message_id`` was seen at ``at`` (the first time counts)."""
        self.seen.setdefault(message_id, at)
        if self._missing is not None:
            self._missing.discard(message_id)
            if not self._missing:
                self._all_seen.set()

    async def wait(self, message_ids: set[str], within: float, what: str) -> None:
        """Until every one of ``message_ids`` is seen (``TimeoutError`` naming ``what``
        after ``within`` seconds)."""
        self._missing = message_ids - self.seen.keys()
        if not self._missing:
            self._all_seen.set()
        try:
            async with asyncio.timeout(within):
                await self._all_seen.wait()
        except TimeoutError:
            missing = len(self._missing)
            raise TimeoutError(f"{what}: {missing} not within {within:g} s") from None


def _traffic_timeout(sizes: FleetSizes) -> float:
    return 120.0 + sizes.seconds * 2


# --- the baseline: bare connections, in a child process -----------------------------------------


async def _bare(url: str, keys: Sequence[str]) -> dict[str, Any]:
    """Connect a bare ``ParallClient`` and ``ParallWs`` per key (one shared REST
    connector, as the fleet has), all at once: how long it took, and this process's
    RSS and open file descriptors before and after."""
    rss_before, fds_before = settled_rss_mib(), open_fds()
    connector = aiohttp.TCPConnector(limit=0)
    clients = [ParallClient(url, key, connector=connector) for key in keys]
    sockets = [ParallWs(client.get_ws_ticket) for client in clients]
    try:
        started = time.monotonic()
        await asyncio.gather(*(ws.connect() for ws in sockets))
        seconds = time.monotonic() - started
        rss_after, fds_after = settled_rss_mib(), open_fds()
    finally:
        await asyncio.gather(*(ws.disconnect() for ws in sockets), return_exceptions=True)
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        await connector.close()
    return {
        "accounts": len(keys),
        "seconds": seconds,
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
        "fds_before": fds_before,
        "fds_after": fds_after,
    }


def bare_child() -> int:
    """The baseline child's entry point (``--bare-child``): reads ``{"url", "keys"}``
    as JSON on stdin, writes :func:`_bare`'s result as JSON on stdout."""
    raise_fd_limit()
    job = json.loads(sys.stdin.read())
    result = asyncio.run(_bare(str(job["url"]), [str(key) for key in job["keys"]]))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


async def _run_bare(url: str, keys: Sequence[str]) -> dict[str, Any]:
    """Run :func:`_bare` in a child process; the child is gone when this returns or
    raises."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.fleet",
        "--bare-child",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(CHILD_TIMEOUT):
            out, _ = await process.communicate(json.dumps({"url": url, "keys": keys}).encode())
        if process.returncode != 0:
            raise RuntimeError(f"the bare-connections child failed (exit {process.returncode})")
        result: dict[str, Any] = json.loads(out)
        return result
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


# --- the floor: one bare ParallWs receiving the same traffic ------------------------------------


async def _floor(emulator: EmulatorProcess, sizes: FleetSizes) -> dict[str, Any]:
    """The same traffic (rate, seconds) into one bare ``ParallWs`` in this process:
    post to ``message.new`` received (ms), and this process's CPU time per event."""
    account = await emulator.call("setup", chats=1)
    received = _Awaited()

    def on_message(message: Message) -> None:
        received.mark(message.id, time.monotonic())

    async with ParallClient(emulator.url, account["api_key"]) as client:
        ws = ParallWs(client.get_ws_ticket)
        ws.on("message.new", on_message)
        await ws.connect()
        try:
            cpu = time.process_time()
            sprayed = await emulator.call(
                "spray", agents=[account["agent_id"]], count=sizes.events, rate=sizes.rate
            )
            posts = sprayed["posts"]
            await received.wait(
                {post[0] for post in posts}, _traffic_timeout(sizes), "the floor's messages"
            )
            cpu = time.process_time() - cpu
        finally:
            await ws.disconnect()
    latencies = [(received.seen[post[0]] - post[2]) * 1000 for post in posts]
    return {
        "events": len(posts),
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "max_ms": max(latencies),
        "cpu_ms_per_event": cpu * 1000 / len(posts),
        "posting_seconds": sprayed["seconds"],
    }


# --- the fleet ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _running(fleet: GatewayFleet) -> AsyncIterator[asyncio.Task[None]]:
    """The fleet started (its ``start()`` task), stopped on every way out."""
    abort = asyncio.Event()
    task = asyncio.get_running_loop().create_task(fleet.start(abort), name="fleet-under-test")
    try:
        yield task
    finally:
        abort.set()
        await asyncio.gather(task, return_exceptions=True)


async def _fleet(
    emulator: EmulatorProcess, agents: list[list[str]], sizes: FleetSizes, gc_freeze: bool
) -> dict[str, Any]:
    """Start the fleet, measure it ready, idle and under traffic, stop it; with
    ``gc_freeze``, ``gc.freeze()`` once every account is ready (and measured)."""
    turns = _Turns()
    configs = [
        GatewayConfig(emulator.url, key, emulator.org_id, agent_id=agent, account_id=agent)
        for agent, key, _chat in agents
    ]
    fleet = GatewayFleet(configs, lambda config: _FleetRuntime(config.account_id, turns))
    agent_ids = [agent for agent, _key, _chat in agents]
    out: dict[str, Any] = {"accounts": len(agents)}
    out["rss_before_mib"] = settled_rss_mib()
    out["fds_before"] = open_fds()
    async with _FdSampler() as fds:
        started = time.monotonic()
        async with _running(fleet) as task:
            await fleet.wait_ready()
            out["startup_seconds"] = time.monotonic() - started
            totals = fleet.stats()["totals"]
            out["running"] = totals["running"]
            out["not_running"] = {
                account_id: stats["reason"]
                for account_id, stats in fleet.stats()["accounts"].items()
                if stats["state"] != "running"
            }
            out["startup_peak_fds"] = fds.peak
            out["rss_ready_mib"] = settled_rss_mib()
            out["fds_ready"] = open_fds()
            if gc_freeze:
                gc.freeze()  # what a host can do once its accounts run: see the docs
            out["gc_frozen"] = gc.get_freeze_count()

            cpu = time.process_time()
            idle_started = time.monotonic()
            await asyncio.sleep(sizes.idle_seconds)  # a span of idle time, measured
            out["idle_cpu_percent"] = (
                100 * (time.process_time() - cpu) / (time.monotonic() - idle_started)
            )

            traffic_started = time.monotonic()
            cpu = time.process_time()
            emulator_cpu = (await emulator.call("cpu"))["cpu_seconds"]
            sprayed = await emulator.call(
                "spray", agents=agent_ids, count=sizes.events, rate=sizes.rate, seed=18
            )
            posts: list[list[Any]] = sprayed["posts"]
            posted = {post[0] for post in posts}
            await turns.started.wait(posted, _traffic_timeout(sizes), "messages without a turn")
            out["posting_seconds"] = sprayed["seconds"]
            acked = await emulator.call(
                "wait_acked_all",
                agents=agent_ids,
                count=len(posts),
                timeout=_traffic_timeout(sizes),
            )
            out["cpu_ms_per_event"] = (time.process_time() - cpu) * 1000 / len(posts)
            emulator_cpu = (await emulator.call("cpu"))["cpu_seconds"] - emulator_cpu
            out["emulator_cpu_ms_per_event"] = emulator_cpu * 1000 / len(posts)
            out["traffic_seconds"] = time.monotonic() - traffic_started
            out["acked"], out["pending_after"] = acked["acked"], acked["pending"]
            out["rss_after_traffic_mib"] = settled_rss_mib()
            out["fds_after_traffic"] = open_fds()
            out["fleet_totals"] = fleet.stats()["totals"]
            stopping = time.monotonic()
        out["shutdown_seconds"] = time.monotonic() - stopping
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError("the fleet failed") from task.exception()
    if gc_freeze:
        gc.unfreeze()  # the fleet's objects are garbage now
    out["peak_fds"] = fds.peak
    out["stopped"] = fleet.stats()["totals"]["stopped"]

    latencies = [(turns.started.seen[post[0]] - post[2]) * 1000 for post in posts]
    out["events"] = len(posts)
    out["turns"] = turns.turns
    out["p50_ms"] = _percentile(latencies, 50)
    out["p90_ms"] = _percentile(latencies, 90)
    out["p99_ms"] = _percentile(latencies, 99)
    out["max_ms"] = max(latencies)
    out["over_goal"] = sum(1 for latency in latencies if latency >= LATENCY_GOAL_MS)
    out["latency_by_second"] = _by_second(posts, latencies)
    out["lost"] = len(posted - turns.started.seen.keys())
    out["duplicated"] = sum(turns.count[message] - 1 for message in posted)
    out["unexpected"] = len(turns.count.keys() - posted)
    out["misrouted"] = sum(1 for post in posts if turns.account.get(post[0]) != post[1])
    out["accounts_with_traffic"] = len({post[1] for post in posts})
    return out


def _by_second(posts: Sequence[Sequence[Any]], latencies: Sequence[float]) -> list[Any]:
    """Each second of the traffic (from the first post): ``[second, posts, p50 ms,
    max ms]``, to see when the slow turns came."""
    first = posts[0][2]
    seconds: dict[int, list[float]] = {}
    for post, latency in zip(posts, latencies, strict=True):
        seconds.setdefault(int(post[2] - first), []).append(latency)
    return [
        [second, len(values), round(_percentile(values, 50), 3), round(max(values), 3)]
        for second, values in sorted(seconds.items())
    ]


# --- the run -----------------------------------------------------------------------------------


def _meta(quick: bool, sizes: FleetSizes, **extra: Any) -> dict[str, Any]:
    return run_meta(quick, sizes, round_trip=ROUND_TRIP, **extra)


def _figures(
    sizes: FleetSizes, fleet: dict[str, Any], bare: dict[str, Any], floor: dict[str, Any]
) -> list[Figure]:
    """The report's lines, from the three measurements."""
    n = fleet["accounts"]
    rss = (fleet["rss_ready_mib"] - fleet["rss_before_mib"]) * 1024 / n
    bare_rss = (bare["rss_after_mib"] - bare["rss_before_mib"]) * 1024 / n
    fds = (fleet["fds_ready"] - fleet["fds_before"]) / n
    bare_fds = (bare["fds_after"] - bare["fds_before"]) / n
    peak_fds = (fleet["peak_fds"] - fleet["fds_before"]) / n
    ulimit = recommended_ulimit(peak_fds, n)
    rate = f"{sizes.rate:g}/s over {n:,} accounts"
    return [
        Figure(
            "fleet_startup",
            f"start-up of {n:,} accounts (start to all running)",
            "s",
            fleet["startup_seconds"],
            bare["seconds"],
            note="baseline: a bare ParallClient + ParallWs connected per account, at once",
        ),
        Figure(
            "fleet_startup_per_account",
            "start-up per account",
            "ms",
            fleet["startup_seconds"] * 1000 / n,
            bare["seconds"] * 1000 / n,
        ),
        Figure(
            "fleet_not_running",
            "accounts not running after wait_ready()",
            "accounts",
            n - fleet["running"],
            goal=Goal("ours", "==", 0),
        ),
        Figure(
            "fleet_rss_per_account",
            "RSS per account, all ready",
            "KiB",
            rss,
            bare_rss,
            Goal("ours", "<", RSS_GOAL_KIB),
            "VmRSS ready - before the fleet started (after gc), / accounts",
        ),
        Figure(
            "fleet_rss_per_account_after_traffic",
            "RSS per account after the traffic",
            "KiB",
            (fleet["rss_after_traffic_mib"] - fleet["rss_before_mib"]) * 1024 / n,
        ),
        Figure(
            "fleet_fds_per_account",
            "open fds per account, all ready",
            "fds",
            fds,
            bare_fds,
        ),
        Figure(
            "fleet_fds_peak_per_account",
            "open fds per account, peak (start-up and traffic)",
            "fds",
            peak_fds,
            note="sampled every 0.1 s",
        ),
        Figure(
            "fleet_ulimit",
            f"ulimit -n to set for {n:,} accounts",
            "fds",
            ulimit,
            note=f"{ULIMIT_MARGIN:g} x peak fds per account x accounts + {ULIMIT_SPARE}, "
            "rounded up to 1,024",
        ),
        Figure(
            "fleet_latency_p50",
            f"post to turn start p50, {rate}",
            "ms",
            fleet["p50_ms"],
            floor["p50_ms"],
            note="baseline: the same traffic into one bare ParallWs (the floor)",
        ),
        Figure(
            "fleet_latency_p99",
            f"post to turn start p99, {rate}",
            "ms",
            fleet["p99_ms"],
            floor["p99_ms"],
            Goal("ours", "<", LATENCY_GOAL_MS),
            "baseline: the same traffic into one bare ParallWs (the floor)",
        ),
        Figure(
            "fleet_lost",
            f"messages without a turn (of {fleet['events']:,})",
            "messages",
            fleet["lost"],
            goal=Goal("ours", "==", 0),
        ),
        Figure(
            "fleet_duplicated",
            "messages in more than one turn (extra turns)",
            "messages",
            fleet["duplicated"],
            goal=Goal("ours", "==", 0),
        ),
        Figure(
            "fleet_misrouted",
            "messages whose turn ran in another account",
            "messages",
            fleet["misrouted"],
            goal=Goal("ours", "==", 0),
        ),
        Figure(
            "fleet_cpu_per_event",
            "CPU per event, first post to last ack (this process)",
            "ms",
            fleet["cpu_ms_per_event"],
            floor["cpu_ms_per_event"],
            note="baseline: the floor's (receiving and decoding only)",
        ),
        Figure(
            "fleet_emulator_cpu_per_event",
            "the emulator's CPU per event (its own process)",
            "ms",
            fleet["emulator_cpu_ms_per_event"],
            note="the other process on the same cores: what the machine has left",
        ),
        Figure(
            "fleet_idle_cpu",
            f"CPU with {n:,} accounts idle",
            "% of a core",
            fleet["idle_cpu_percent"],
        ),
        Figure(
            "fleet_shutdown",
            f"shutdown of {n:,} accounts after the traffic",
            "s",
            fleet["shutdown_seconds"],
        ),
    ]


async def run_fleet(
    sizes: FleetSizes,
    *,
    quick: bool = False,
    gc_freeze: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PerfReport:
    """Run the benchmark (with ``gc_freeze``, ``gc.freeze()`` once the fleet is ready);
    the emulator and the baseline's child are gone when it returns or raises."""
    say = progress or (lambda _: None)
    report = PerfReport(quick=quick, meta=_meta(quick, sizes))
    report.meta["gc_freeze"] = gc_freeze
    began = time.monotonic()
    report.meta["fd_limit"] = raise_fd_limit()
    async with EmulatorProcess.run(ROUND_TRIP) as emulator:
        say(f"setting up {sizes.accounts:,} agents in the emulator...")
        agents: list[list[str]] = (await emulator.call("setup_fleet", count=sizes.accounts))[
            "agents"
        ]
        say("bare connections (the baseline, in a child process)...")
        bare = await _run_bare(emulator.url, [key for _agent, key, _chat in agents])
        say(f"  {bare['seconds']:.1f} s")
        say(f"the fleet: {sizes.accounts:,} accounts, then {sizes.events:,} messages...")
        fleet = await _fleet(emulator, agents, sizes, gc_freeze)
        say(f"  ready in {fleet['startup_seconds']:.1f} s, p99 {fleet['p99_ms']:.2f} ms")
        emulator_fds = await emulator.call("fds")
        emulator_rss = (await emulator.call("rss"))["rss_mib"]
    # A fresh emulator for the floor: the fleet's has a heap of thousands of agents and
    # messages, whose garbage collections would pause the floor's frames.
    async with EmulatorProcess.run(ROUND_TRIP) as emulator:
        say("the floor (one bare ParallWs, the same traffic, a fresh emulator)...")
        floor = await _floor(emulator, sizes)
        say(f"  p99 {floor['p99_ms']:.2f} ms")
    report.figures.extend(_figures(sizes, fleet, bare, floor))
    report.details.update(
        {"fleet": fleet, "bare": bare, "floor": floor, "emulator_rss_mib": emulator_rss}
    )
    report.details["emulator_fds_at_end"] = emulator_fds
    report.meta["seconds"] = time.monotonic() - began
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; 0 once done (goals missed
    are reported, not an error)."""
    defaults = FleetSizes()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--accounts", type=int, default=None, help="accounts (2000)")
    parser.add_argument("--rate", type=float, default=None, help="messages a second (500)")
    parser.add_argument(
        "--seconds", type=float, default=None, help=f"traffic (default {defaults.seconds:g} s)"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (20 accounts)")
    parser.add_argument(
        "--json", default=DEFAULT_JSON, help=f"where the figures go ({DEFAULT_JSON})"
    )
    parser.add_argument("--log", default=DEFAULT_LOG, help=f"the log (default {DEFAULT_LOG})")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once every account is ready (after the RSS and fds figures)",
    )
    parser.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_child:
        return bare_child()
    sizes = FleetSizes.quick() if args.quick else defaults
    changes = {
        name: value
        for name, value in (
            ("accounts", args.accounts),
            ("rate", args.rate),
            ("seconds", args.seconds),
        )
        if value is not None
    }
    sizes = attrs.evolve(sizes, **changes)
    if sizes.accounts < 1 or sizes.rate <= 0 or sizes.seconds <= 0:
        parser.error("--accounts, --rate and --seconds must be > 0")
    for path in (args.json, args.log):
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    with library_warnings_to(args.log):
        report = asyncio.run(
            run_fleet(sizes, quick=args.quick, gc_freeze=args.gc_freeze, progress=say)
        )
    meta = report.meta
    say("")
    say(run_heading(meta, report.quick) + (", gc.freeze() once ready" if meta["gc_freeze"] else ""))
    for line in report.table():
        say(line)
    ulimit = report.figure("fleet_ulimit").ours
    say("")
    limit = _number(ulimit).replace(",", "")
    say(f"set `ulimit -n {limit}` (or more) for {sizes.accounts:,} accounts")
    Path(args.json).write_text(json.dumps(report.as_json(), indent=2) + "\n")
    say(f"figures written to {args.json}; warnings logged to {args.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
