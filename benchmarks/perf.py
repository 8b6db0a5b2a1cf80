"""Performance benchmarks of the gateway (issue 16), each against a baseline in the same run.

The emulator runs in a process of its own (:mod:`benchmarks.perf_emulator`), on
loopback, with a simulated round trip on every REST answer; the gateway runs in this
process, so its CPU time and memory are measured apart from the emulator's.

- catch-up: 10,000 pending items over 50 chats, at a 2 ms and a 20 ms round trip:
  items acked per second from the gateway's start, against the seed's serial
  algorithm written here with ``ParallClient`` (list the whole queue, then for each
  item in order: GET the message, PATCH the session active, POST the input step, run
  the instant turn, ack by id, PATCH idle). The serial baseline is timed on its first
  ``baseline_items`` items and extrapolated (each item costs the same:
  ``--full-baseline`` runs every item). FIFO per chat is checked (each chat's turns saw
  its messages once each, in dispatch order) and the turns are counted.
- live: throughput across 50 chats, messages posted as fast as they are taken (at
  most ``window`` pending), events acked per second, against a minimal asyncio loop
  doing the I/O an event needs (a bare ``ParallWs`` receiving ``message.new``, then
  for each event, concurrently: mark received, the input step, ack by source); and
  this process's CPU time per event, same runs.
- rss: RSS growth over 200,000 live events (400 a second) through the whole gateway,
  after a warm-up;
  then tracemalloc's top 10 lines over 20,000 more (tracemalloc is off while RSS is
  measured: it slows the gateway threefold, which lets the writer keep up and hides
  the growth, and its own memory would count).
- writer: the step and status writer's backlog, sampled during the live and rss runs,
  what it shed, and what a shutdown right after a 2,000-item catch-up abandoned.
- latency: post to turn start with the SQLite store on, p50 and p99, against the
  floor (a ``message.new`` reaching a bare ``ParallWs`` in this process, alone).
- burst: 300 messages into one chat during a 200 ms turn: how many turns they take.

Run ``make bench`` (or ``python -m benchmarks.perf``); ``--quick`` is the smoke run
of the test suite (seconds; its figures mean nothing), ``--only NAME`` runs one,
``--json PATH`` is where every figure goes (``.bench/perf.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from parall_bridge import (
    AgentRuntime,
    AgentSessionStatus,
    AgentStep,
    Gateway,
    GatewayConfig,
    Message,
    ParallClient,
    ParallWs,
    SourceType,
    SqliteStateStore,
    StateStore,
    StepType,
    TargetType,
    Turn,
)
from parall_bridge.models import TextContent

from ._common import library_warnings_to, run_heading, run_meta, say
from .perf_emulator import EmulatorProcess

__all__ = [
    "BENCHMARKS",
    "Figure",
    "Goal",
    "PerfReport",
    "Sizes",
    "main",
    "run_perf",
]

_log = logging.getLogger("benchmarks.perf")

BENCHMARKS: Final = ("catch-up", "live", "rss", "shutdown", "latency", "burst")
"""The names ``--only`` takes, in the order of the report."""
RUN_ORDER: Final = ("rss", "catch-up", "live", "shutdown", "latency", "burst")
"""The order a run goes: the RSS benchmark first, while this process has not yet held
(and freed) the memory of the others, which later allocations would reuse unseen."""
FAST: Final = 0.002
"""The round trip of most benchmarks (seconds)."""
SLOW: Final = 0.020
"""The second round trip of the catch-up benchmark."""
CHATS: Final = 50
BURST_TURN: Final = 0.2
"""How long the turn the burst arrives during takes (seconds)."""
RSS_RATE: Final = 400.0
"""Events a second of the RSS run: what the gateway keeps up with here (about 700 at
most, coalescing), turns one event each, faster than its writer at 2 ms."""
SAMPLE_INTERVAL: Final = 0.1
"""How often the writer's backlog is sampled (seconds)."""
IDLE_POLL: Final = 0.001
"""How often the latency benchmark looks whether the gateway is idle (seconds)."""
DEFAULT_JSON: Final = ".bench/perf.json"
DEFAULT_LOG: Final = ".bench/perf.log"


@attrs.frozen
class Sizes:
    """How big each benchmark is (:meth:`full` for ``make bench``, :meth:`quick` for the
    smoke run)."""

    catch_up_items: int
    catch_up_items_slow: int
    baseline_items: int
    baseline_items_slow: int
    shutdown_items: int
    live_warm: int
    live_events: int
    rss_warm: int
    rss_events: int
    rss_traced: int
    window: int
    latency_warm: int
    latency_samples: int
    burst: int

    @classmethod
    def full(cls) -> Sizes:
        """The sizes of issue 16."""
        return cls(
            catch_up_items=10_000,
            catch_up_items_slow=10_000,
            baseline_items=2_000,
            baseline_items_slow=300,
            shutdown_items=2_000,
            live_warm=2_000,
            live_events=20_000,
            rss_warm=10_000,
            rss_events=200_000,
            rss_traced=20_000,
            window=500,
            latency_warm=10,
            latency_samples=200,
            burst=300,
        )

    @classmethod
    def quick(cls) -> Sizes:
        """A smoke run of a few seconds."""
        return cls(
            catch_up_items=100,
            catch_up_items_slow=20,
            baseline_items=15,
            baseline_items_slow=3,
            shutdown_items=100,
            live_warm=20,
            live_events=100,
            rss_warm=20,
            rss_events=100,
            rss_traced=30,
            window=20,
            latency_warm=3,
            latency_samples=15,
            burst=150,
        )


# --- figures and the report ------------------------------------------------------------------


@attrs.frozen
class Goal:
    """What a figure should reach.

    Attributes:
        on: what is compared: ``"ratio"`` (ours / baseline), ``"ours"``, or ``"added"``
            (ours - baseline).
        op: ``">="``, ``"<="``, ``"<"``, ``"=="`` or ``"in"`` (``value`` to ``upper``).
        value: the bound.
        upper: the upper bound of ``"in"``.
    """

    on: str
    op: str
    value: float
    upper: float | None = None

    def holds(self, figure: Figure) -> bool | None:
        """Whether the figure meets it (``None`` when a value it needs is missing)."""
        x = {"ratio": figure.ratio, "ours": figure.ours, "added": figure.added}[self.on]
        if x is None:
            return None
        if self.op == ">=":
            return x >= self.value
        if self.op == "<=":
            return x <= self.value
        if self.op == "<":
            return x < self.value
        if self.op == "==":
            return x == self.value
        assert self.op == "in"
        assert self.upper is not None
        return self.value <= x <= self.upper

    def text(self, unit: str) -> str:
        """The goal in words, for the table."""
        bound = f"{self.value:g}" if self.upper is None else f"{self.value:g}-{self.upper:g}"
        if self.on == "ratio":
            return f"ratio {self.op} {bound}"
        what = "added" if self.on == "added" else ""
        op = "" if self.op == "in" else self.op + " "
        return " ".join(part for part in (what, f"{op}{bound} {unit}") if part)


@attrs.frozen
class Figure:
    """One line of the report: our figure, the baseline's (if any) and the goal.

    Attributes:
        key: a stable identifier (the JSON's).
        name: what it is, for the table.
        unit: the unit of ``ours`` and ``baseline``.
        ours: the gateway's figure (``None``: could not be measured).
        baseline: the baseline's, measured in the same run (``None``: the goal is absolute).
        goal: what it should reach (``None``: reported for information).
        note: how it was measured, when the name does not say.
    """

    key: str
    name: str
    unit: str
    ours: float | None
    baseline: float | None = None
    goal: Goal | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """ours / baseline (``None`` without a baseline, or with a baseline of 0)."""
        if self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline

    @property
    def added(self) -> float | None:
        """ours - baseline (``None`` without a baseline)."""
        if self.ours is None or self.baseline is None:
            return None
        return self.ours - self.baseline

    @property
    def met(self) -> bool | None:
        """Whether the goal is met (``None``: no goal, or nothing to compare)."""
        return None if self.goal is None else self.goal.holds(self)

    def as_json(self) -> dict[str, Any]:
        """Every field, the ratio, the goal's text and whether it is met."""
        return {
            "key": self.key,
            "name": self.name,
            "unit": self.unit,
            "ours": self.ours,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "added": self.added,
            "goal": None if self.goal is None else self.goal.text(self.unit),
            "met": self.met,
            "note": self.note,
        }


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == int(value) and abs(value) >= 10:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


@attrs.define
class PerfReport:
    """A run: what and where it ran, every figure, and the raw details."""

    quick: bool
    meta: dict[str, Any] = attrs.field(factory=dict)
    figures: list[Figure] = attrs.field(factory=list)
    details: dict[str, Any] = attrs.field(factory=dict)

    def figure(self, key: str) -> Figure:
        """The figure with this key (``KeyError`` when it was not measured)."""
        for figure in self.figures:
            if figure.key == key:
                return figure
        raise KeyError(key)

    def table(self) -> list[str]:
        """The figures as a table: name, ours, baseline, ratio, goal, met."""
        header = ("benchmark", "ours", "baseline", "ratio", "goal", "met")
        rows = [
            (
                f.name,
                f"{_number(f.ours)} {f.unit}",
                "-" if f.baseline is None else f"{_number(f.baseline)} {f.unit}",
                "-" if f.ratio is None else f"{f.ratio:.2f}",
                "-" if f.goal is None else f.goal.text(f.unit),
                {True: "yes", False: "NO", None: "-"}[f.met],
            )
            for f in self.figures
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row: Sequence[str]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))

        return [line(header), line(["-" * w for w in widths]), *map(line, rows)]

    def as_json(self) -> dict[str, Any]:
        """The whole report, for ``--json``."""
        return {
            "quick": self.quick,
            "meta": self.meta,
            "figures": [f.as_json() for f in self.figures],
            "details": self.details,
        }


# --- measuring -------------------------------------------------------------------------------


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``) in MiB; 0 when unknown."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _input_step(message: Message) -> AgentStep:
    """An input step like the gateway's, for the baselines."""
    return AgentStep(
        step_type=StepType.INPUT,
        target_type=TargetType.CHAT,
        target_id=message.chat_id,
        content={
            "trigger_type": "mention",
            "trigger_ref": {"message_id": message.id},
            "sender_id": message.sender_id,
            "sender_name": message.sender_name,
            "summary": message.content.text if isinstance(message.content, TextContent) else "",
        },
    )


class _Arrivals:
    """When each key was seen, for a waiter that may come before or after."""

    def __init__(self) -> None:
        self._seen: dict[str, asyncio.Future[float]] = {}

    def _future(self, key: str) -> asyncio.Future[float]:
        future = self._seen.get(key)
        if future is None:
            future = self._seen[key] = asyncio.get_running_loop().create_future()
        return future

    def mark(self, key: str, at: float) -> None:
        future = self._future(key)
        if not future.done():
            future.set_result(at)

    async def wait(self, key: str, within: float) -> float:
        async with asyncio.timeout(within):
            return await asyncio.shield(self._future(key))


class _BenchRuntime(AgentRuntime):
    """An instant turn (or one of ``turn_time`` seconds) that counts turns and events;
    with ``record`` it also keeps the message ids each chat's turns saw, in order, and
    marks when each message's turn started."""

    def __init__(self, *, record: bool = True, turn_time: float = 0.0) -> None:
        self.record = record
        self.turn_time = turn_time
        self.turns = 0
        self.events = 0
        self.seen: defaultdict[str, list[str]] = defaultdict(list)
        self.started = _Arrivals()

    async def run_turn(self, turn: Turn) -> str | None:
        now = time.monotonic()
        self.turns += 1
        self.events += len(turn.events)
        if self.record:
            for event in turn.events:
                if event.chat_id and event.message_id:
                    self.seen[event.chat_id].append(event.message_id)
                    self.started.mark(event.message_id, now)
        if self.turn_time:
            await asyncio.sleep(self.turn_time)
        return None


def _fifo_violations(seen: Mapping[str, list[str]], order: Mapping[str, list[str]]) -> int:
    """Chats whose turns did not see exactly their messages, once each, in dispatch order."""
    return sum(1 for chat, ids in order.items() if seen.get(chat, []) != ids)


@attrs.define
class _WriterSample:
    pending_max: int | None = None
    shed: int | None = None
    abandoned: int | None = None
    source: str = "stats"


def _writer_now(gateway: Gateway) -> _WriterSample:
    """The writer's backlog, shed and abandoned writes: ``GatewayStats.writes_pending``,
    ``writes_shed`` and ``writes_abandoned`` where the gateway has them (issue 16); on a
    gateway from before them, the old writer's own counters (its queue and background
    acks, and the steps it dropped past its queue limit)."""
    stats = gateway.stats()
    pending = getattr(stats, "writes_pending", None)
    if pending is not None:
        return _WriterSample(
            pending,
            getattr(stats, "writes_shed", None),
            getattr(stats, "writes_abandoned", None),
        )
    writer = getattr(getattr(gateway, "_supervisor", None), "writer", None)
    if writer is None:
        return _WriterSample(source="none")
    queue = getattr(writer, "_queue", None)
    return _WriterSample(
        getattr(writer, "pending", None),
        getattr(getattr(writer, "stats", None), "dropped", None),
        queue.qsize() if queue is not None else None,  # meaningful once shut down
        source="internal",
    )


class _WriterSampler:
    """Samples the writer's backlog every :data:`SAMPLE_INTERVAL` within ``async with``
    (or until :meth:`stop`), and once more as it stops."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self.pending_max = 0
        self.source = "none"
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _WriterSampler:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="writer-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop sampling (idempotent), after a last sample."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.sample()

    def sample(self) -> None:
        now = _writer_now(self._gateway)
        self.source = now.source
        if now.pending_max is not None:
            self.pending_max = max(self.pending_max, now.pending_max)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)


class _GatewayRun:
    """The gateway under test, started in this process (:meth:`start`) and stopped
    (:meth:`stop`, timed), on every way out of ``async with``."""

    def __init__(
        self,
        emulator: EmulatorProcess,
        api_key: str,
        runtime: AgentRuntime,
        store: StateStore | None = None,
    ) -> None:
        config = GatewayConfig(emulator.url, api_key, emulator.org_id)
        self.gateway = Gateway(config, runtime, store=store)
        self._abort = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.shutdown_seconds: float | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self.gateway.start(self._abort), name="gateway-under-test"
        )

    async def stop(self) -> float:
        """Stop the gateway; how long its shutdown took (seconds)."""
        if self._task is None:
            return 0.0
        if self.shutdown_seconds is None:
            started = time.monotonic()
            self._abort.set()
            try:
                await self._task
            finally:
                self.shutdown_seconds = time.monotonic() - started
        return self.shutdown_seconds

    async def __aenter__(self) -> _GatewayRun:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _wait_idle(gateway: Gateway, within: float) -> None:
    """Until no turn runs or waits and the writer has nothing left to write (polled
    every :data:`IDLE_POLL`)."""
    async with asyncio.timeout(within):
        while True:
            stats = gateway.stats()
            idle = stats.active_turns == 0 and stats.queued == 0
            if idle and not _writer_now(gateway).pending_max:
                return
            await asyncio.sleep(IDLE_POLL)


def _ack_timeout(items: int, latency: float) -> float:
    """Generous: 60 s plus ten round trips per item."""
    return 60.0 + items * latency * 10


# --- catch-up ---------------------------------------------------------------------------------


async def _serial_catch_up(
    emulator: EmulatorProcess, api_key: str, agent_id: str, items_to_run: int
) -> dict[str, Any]:
    """The seed's serial algorithm: list the whole queue, then one item at a time."""
    org_id = emulator.org_id
    seen: defaultdict[str, list[str]] = defaultdict(list)
    async with ParallClient(emulator.url, api_key) as client:
        session = await client.create_agent_session(
            org_id, agent_id, runtime_type="seed", runtime_key="agent:main:parall:bench"
        )
        started = time.monotonic()
        items = [item async for item in client.iter_dispatch(org_id, page_size=50)]
        listed = time.monotonic()
        for item in items[:items_to_run]:
            message = await client.get_message(item.source_id or "")
            await client.update_agent_session(
                org_id, agent_id, session.id, status=AgentSessionStatus.ACTIVE
            )
            await client.create_agent_step(org_id, agent_id, session.id, _input_step(message))
            seen[message.chat_id].append(message.id)  # the turn (instant)
            await client.ack_dispatch_by_id(org_id, item.id)
            await client.update_agent_session(
                org_id, agent_id, session.id, status=AgentSessionStatus.IDLE
            )
        done = time.monotonic()
    ran = min(items_to_run, len(items))
    per_item = (done - listed) / ran if ran else 0.0
    return {
        "listed": len(items),
        "list_seconds": listed - started,
        "items_run": ran,
        "per_item_seconds": per_item,
        "seconds": (listed - started) + per_item * len(items),
        "extrapolated": ran < len(items),
    }


async def catch_up(
    emulator: EmulatorProcess, items: int, baseline_items: int
) -> tuple[list[Figure], dict[str, Any]]:
    """Catch-up of ``items`` pending items over 50 chats: the gateway vs the serial
    algorithm (run on ``baseline_items`` of them, extrapolated)."""
    latency = emulator.latency
    ms = f"{latency * 1000:g} ms"
    seed = await emulator.call("setup", chats=CHATS)
    await emulator.call("seed", agent=seed["agent_id"], count=items)
    serial = await _serial_catch_up(
        emulator, seed["api_key"], seed["agent_id"], min(items, baseline_items)
    )

    account = await emulator.call("setup", chats=CHATS)
    order: dict[str, list[str]] = (
        await emulator.call("seed", agent=account["agent_id"], count=items)
    )["order"]
    runtime = _BenchRuntime()
    run = _GatewayRun(emulator, account["api_key"], runtime)
    started = time.monotonic()
    async with run:
        await emulator.call(
            "wait_acked",
            agent=account["agent_id"],
            count=items,
            timeout=_ack_timeout(items, latency),
        )
        seconds = time.monotonic() - started
    violations = _fifo_violations(runtime.seen, order)
    key = f"catch_up_{latency * 1000:g}ms"
    note = (
        f"serial baseline timed on {serial['items_run']:,} of {items:,} items, extrapolated"
        if serial["extrapolated"]
        else ""
    )
    figures = [
        Figure(
            key,
            f"catch-up of {items:,} items, {ms}",
            "items/s",
            items / seconds,
            items / serial["seconds"],
            Goal("ratio", ">=", 8 if latency < SLOW else 10),
            note,
        ),
        Figure(
            key + "_fifo",
            f"catch-up {ms}: chats out of FIFO order",
            "chats",
            violations,
            goal=Goal("ours", "==", 0),
        ),
        Figure(
            key + "_turns",
            f"catch-up {ms}: turns",
            "turns",
            runtime.turns,
            items,
            note="baseline: the serial algorithm runs one turn per item",
        ),
    ]
    details = {
        "items": items,
        "chats": CHATS,
        "latency": latency,
        "gateway_seconds": seconds,
        "gateway_turns": runtime.turns,
        "gateway_events": runtime.events,
        "fifo_violations": violations,
        "gateway_shutdown_seconds": run.shutdown_seconds,
        "serial": serial,
    }
    return figures, details


# --- live throughput, CPU per event, RSS ------------------------------------------------------


class _MinimalLoop:
    """The I/O an event needs and no more: a bare ``ParallWs`` receiving ``message.new``,
    then for each event, concurrently (one chain per event, the WebSocket's handler
    tasks): mark received, write the input step, ack by source."""

    def __init__(self, emulator: EmulatorProcess, api_key: str, agent_id: str) -> None:
        self._org_id = emulator.org_id
        self._agent_id = agent_id
        self._client = ParallClient(emulator.url, api_key)
        self._ws = ParallWs(self._client.get_ws_ticket)
        self._session_id = ""
        self.events = 0

    async def __aenter__(self) -> _MinimalLoop:
        session = await self._client.create_agent_session(
            self._org_id, self._agent_id, runtime_type="loop", runtime_key="agent:main:loop"
        )
        self._session_id = session.id
        self._ws.on("message.new", self._on_message)
        await self._ws.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._ws.disconnect()
        finally:
            await self._client.close()

    async def _on_message(self, message: Message) -> None:
        if message.sender_id == self._agent_id:
            return
        client, org_id = self._client, self._org_id
        await client.mark_dispatch_received(
            org_id, source_type=SourceType.MESSAGE, source_id=message.id
        )
        await client.create_agent_step(
            org_id, self._agent_id, self._session_id, _input_step(message)
        )
        await client.ack_dispatch(org_id, source_type=SourceType.MESSAGE, source_id=message.id)
        self.events += 1


@attrs.frozen
class _Stream:
    events: int
    seconds: float
    cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_ms_per_event(self) -> float:
        return self.cpu_seconds * 1000 / self.events


async def _stream(
    emulator: EmulatorProcess, agent_id: str, warm: int, events: int, window: int
) -> _Stream:
    """Stream ``warm + events + window`` messages (at most ``window`` pending); measure
    the ``events`` after the warm-up, while the window is still full."""
    total = warm + events + window
    timeout = _ack_timeout(total, emulator.latency)
    await emulator.call("stream", agent=agent_id, count=total, window=window)
    await emulator.call("wait_acked", agent=agent_id, count=warm, timeout=timeout)
    started, cpu = time.monotonic(), time.process_time()
    await emulator.call("wait_acked", agent=agent_id, count=warm + events, timeout=timeout)
    stream = _Stream(events, time.monotonic() - started, time.process_time() - cpu)
    await emulator.call("wait_acked", agent=agent_id, count=total, timeout=timeout)
    return stream


async def live(
    emulator: EmulatorProcess, warm: int, events: int, window: int
) -> tuple[list[Figure], dict[str, Any]]:
    """Live throughput and CPU per event across 50 chats: the gateway vs the minimal loop."""
    loop_account = await emulator.call("setup", chats=CHATS)
    async with _MinimalLoop(emulator, loop_account["api_key"], loop_account["agent_id"]):
        baseline = await _stream(emulator, loop_account["agent_id"], warm, events, window)

    account = await emulator.call("setup", chats=CHATS)
    runtime = _BenchRuntime(record=False)
    run = _GatewayRun(emulator, account["api_key"], runtime)
    async with run:
        await run.gateway.wait_ready()
        async with _WriterSampler(run.gateway) as sampler:
            ours = await _stream(emulator, account["agent_id"], warm, events, window)
            await sampler.stop()
            shed = _writer_now(run.gateway).shed
    abandoned = _writer_now(run.gateway).abandoned
    figures = [
        Figure(
            "live_throughput",
            f"live throughput, {CHATS} chats",
            "events/s",
            ours.per_second,
            baseline.per_second,
            Goal("ratio", ">=", 0.8),
            "baseline: a bare ParallWs + mark received, input step, ack per event",
        ),
        Figure(
            "cpu_per_event",
            "CPU per event (this process)",
            "ms",
            ours.cpu_ms_per_event,
            baseline.cpu_ms_per_event,
            Goal("ratio", "<=", 1.3),
        ),
    ]
    details = {
        "events": events,
        "warm": warm,
        "window": window,
        "gateway": attrs.asdict(ours),
        "loop": attrs.asdict(baseline),
        "gateway_turns": runtime.turns,
        "writer_pending_max": sampler.pending_max,
        "writer_shed": shed,
        "writer_abandoned_at_shutdown": abandoned,
        "writer_source": sampler.source,
        "gateway_shutdown_seconds": run.shutdown_seconds,
    }
    return figures, details


async def rss(
    emulator: EmulatorProcess, warm: int, events: int, traced: int, window: int
) -> tuple[list[Figure], dict[str, Any]]:
    """RSS growth over ``events`` live events (:data:`RSS_RATE` a second) through the
    gateway after ``warm`` of them, then tracemalloc's top 10 lines over ``traced`` more
    (what is allocated per event and still held). tracemalloc is not on while RSS is
    measured: it slows the gateway about threefold, and a slower gateway lets its writer
    keep up better, which would hide the growth being measured; its own memory would
    count too."""
    account = await emulator.call("setup", chats=CHATS)
    agent_id = account["agent_id"]
    total = warm + events + traced + window
    timeout = _ack_timeout(total, emulator.latency)
    runtime = _BenchRuntime(record=False)
    was_tracing = tracemalloc.is_tracing()
    top: list[str] = []
    run = _GatewayRun(emulator, account["api_key"], runtime)
    try:
        async with run:
            await run.gateway.wait_ready()
            async with _WriterSampler(run.gateway) as sampler:
                await emulator.call(
                    "stream", agent=agent_id, count=total, window=window, rate=RSS_RATE
                )
                await emulator.call("wait_acked", agent=agent_id, count=warm, timeout=timeout)
                gc.collect()
                rss_start = _status_mib("VmRSS")
                began = time.monotonic()
                await emulator.call(
                    "wait_acked", agent=agent_id, count=warm + events, timeout=timeout
                )
                seconds = time.monotonic() - began
                gc.collect()
                rss_end, hwm_end = _status_mib("VmRSS"), _status_mib("VmHWM")
                if not was_tracing:
                    tracemalloc.start()
                began = time.monotonic()
                await emulator.call(
                    "wait_acked", agent=agent_id, count=total - window, timeout=timeout
                )
                traced_seconds = time.monotonic() - began
                gc.collect()
                snapshot = tracemalloc.take_snapshot()
                if not was_tracing:
                    tracemalloc.stop()
                top = [str(stat) for stat in snapshot.statistics("lineno")[:10]]
                await emulator.call("wait_acked", agent=agent_id, count=total, timeout=timeout)
                await sampler.stop()
                shed = _writer_now(run.gateway).shed
    finally:
        if tracemalloc.is_tracing() and not was_tracing:
            tracemalloc.stop()
    figures = [
        Figure(
            "rss_growth",
            f"RSS growth over {events:,} live events",
            "MiB",
            rss_end - rss_start,
            goal=Goal("ours", "<", 10),
            note=f"VmRSS from after {warm:,} events to {events:,} later, {RSS_RATE:g}/s",
        ),
    ]
    details = {
        "events": events,
        "warm": warm,
        "traced": traced,
        "window": window,
        "rate": RSS_RATE,
        "gateway_turns": runtime.turns,
        "rss_start_mib": rss_start,
        "rss_end_mib": rss_end,
        "hwm_end_mib": hwm_end,
        "events_per_second": events / seconds,
        "events_per_second_traced": traced / traced_seconds,
        "tracemalloc_top10": top,
        "writer_pending_max": sampler.pending_max,
        "writer_shed": shed,
        "writer_source": sampler.source,
        "gateway_shutdown_seconds": run.shutdown_seconds,
    }
    return figures, details


async def shutdown(emulator: EmulatorProcess, items: int) -> tuple[list[Figure], dict[str, Any]]:
    """A shutdown right after a catch-up of ``items`` items: the writes it abandoned and
    how long it took."""
    account = await emulator.call("setup", chats=CHATS)
    await emulator.call("seed", agent=account["agent_id"], count=items)
    run = _GatewayRun(emulator, account["api_key"], _BenchRuntime(record=False))
    async with run:
        await emulator.call(
            "wait_acked",
            agent=account["agent_id"],
            count=items,
            timeout=_ack_timeout(items, emulator.latency),
        )
        pending = _writer_now(run.gateway).pending_max
    seconds = await run.stop()
    after = _writer_now(run.gateway)
    grace = run.gateway.config.shutdown_grace
    figures = [
        Figure(
            "writes_abandoned",
            f"writes abandoned at shutdown after a {items:,}-item catch-up",
            "writes",
            after.abandoned,
            goal=Goal("ours", "==", 0),
        ),
        Figure(
            "shutdown_seconds",
            f"shutdown after a {items:,}-item catch-up",
            "s",
            seconds,
            goal=Goal("ours", "<=", grace),
            note="goal: within shutdown_grace",
        ),
    ]
    details = {
        "items": items,
        "writer_pending_at_stop": pending,
        "writer_abandoned": after.abandoned,
        "writer_shed": after.shed,
        "writer_source": after.source,
        "shutdown_seconds": seconds,
        "shutdown_grace": grace,
    }
    return figures, details


# --- dispatch latency, burst ---------------------------------------------------------------


async def dispatch_latency(
    emulator: EmulatorProcess, warm: int, samples: int
) -> tuple[list[Figure], dict[str, Any]]:
    """Post to turn start with the SQLite store, one message at a time (the gateway idle,
    its writes done, before each), against the floor: post to a bare ``ParallWs``
    receiving the same ``message.new``, measured alone first (on the same host, a bare
    socket read beside the gateway's would put its decoding on the gateway's path)."""
    received = _Arrivals()
    floor: list[float] = []

    def on_message(message: Message) -> None:
        received.mark(message.id, time.monotonic())

    bare = await emulator.call("setup", chats=1)
    async with ParallClient(emulator.url, bare["api_key"]) as client:
        ws = ParallWs(client.get_ws_ticket)
        ws.on("message.new", on_message)
        await ws.connect()
        try:
            for n in range(warm + samples):
                posted = await emulator.call("post", agent=bare["agent_id"])
                seen = await received.wait(posted["ids"][0], 10)
                if n >= warm:
                    floor.append((seen - posted["at"]) * 1000)
        finally:
            await ws.disconnect()

    with tempfile.TemporaryDirectory(prefix="perf-store-") as folder:
        store = SqliteStateStore(Path(folder) / "state.db")
        try:
            raw = await _turn_starts(emulator, warm, samples, store)
        finally:
            await store.close()
    memory = await _turn_starts(emulator, warm, samples, None)
    figures = [
        Figure(
            f"latency_p{pct}",
            f"post to turn start p{pct}, SQLite store, 2 ms",
            "ms",
            _percentile(raw, pct),
            _percentile(floor, pct),
            Goal("added", "<", limit),
            "baseline: post to a bare ParallWs receiving the message.new (the floor)",
        )
        for pct, limit in ((50, 1.0), (99, 5.0))
    ]
    details = {
        "samples": samples,
        "raw_ms": {"p50": _percentile(raw, 50), "p99": _percentile(raw, 99)},
        "floor_ms": {"p50": _percentile(floor, 50), "p99": _percentile(floor, 99)},
        "raw_mean_ms": statistics.fmean(raw),
        "floor_mean_ms": statistics.fmean(floor),
        "memory_store_ms": {"p50": _percentile(memory, 50), "p99": _percentile(memory, 99)},
    }
    return figures, details


async def _turn_starts(
    emulator: EmulatorProcess, warm: int, samples: int, store: StateStore | None
) -> list[float]:
    """Post to turn start (ms) of ``samples`` messages posted one at a time, each once
    the gateway is idle and its writes are done."""
    account = await emulator.call("setup", chats=1)
    runtime = _BenchRuntime()
    starts: list[float] = []
    async with _GatewayRun(emulator, account["api_key"], runtime, store=store) as run:
        await run.gateway.wait_ready()
        for n in range(warm + samples):
            await _wait_idle(run.gateway, 10)
            posted = await emulator.call("post", agent=account["agent_id"])
            start = await runtime.started.wait(posted["ids"][0], 10)
            if n >= warm:
                starts.append((start - posted["at"]) * 1000)
            await emulator.call("wait_acked", agent=account["agent_id"], count=n + 1, timeout=10)
    return starts


async def burst(emulator: EmulatorProcess, count: int) -> tuple[list[Figure], dict[str, Any]]:
    """``count`` messages into one chat while a 200 ms turn of it runs: their turns."""
    account = await emulator.call("setup", chats=1)
    runtime = _BenchRuntime(turn_time=BURST_TURN)
    async with _GatewayRun(emulator, account["api_key"], runtime) as run:
        await run.gateway.wait_ready()
        first = await emulator.call("post", agent=account["agent_id"])
        started = await runtime.started.wait(first["ids"][0], 10)
        posted = await emulator.call("post", agent=account["agent_id"], count=count)
        during = posted["at"] < started + BURST_TURN
        await emulator.call("wait_acked", agent=account["agent_id"], count=count + 1, timeout=60)
    chat = account["chats"][0]
    in_order = runtime.seen[chat] == first["ids"] + posted["ids"]
    figures = [
        Figure(
            "burst_turns",
            f"burst of {count} into one chat during a {BURST_TURN * 1000:g} ms turn",
            "turns",
            runtime.turns - 1,
            goal=Goal("ours", "in", 1, 2),
            note="the turns after the one running when the burst came",
        )
    ]
    details = {
        "count": count,
        "turns_total": runtime.turns,
        "posted_during_the_turn": during,
        "fifo": in_order,
    }
    return figures, details


# --- the run ----------------------------------------------------------------------------------


def _meta(quick: bool, sizes: Sizes) -> dict[str, Any]:
    return run_meta(quick, sizes, round_trips={"fast": FAST, "slow": SLOW})


async def run_perf(
    *,
    quick: bool = False,
    only: Sequence[str] = BENCHMARKS,
    sizes: Sizes | None = None,
    full_baseline: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PerfReport:
    """Run the benchmarks (``only`` some of :data:`BENCHMARKS`); every child emulator is
    gone when it returns or raises."""
    sizes = sizes or (Sizes.quick() if quick else Sizes.full())
    if full_baseline:
        sizes = attrs.evolve(
            sizes,
            baseline_items=sizes.catch_up_items,
            baseline_items_slow=sizes.catch_up_items_slow,
        )
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; known: {BENCHMARKS}")
    say = progress or (lambda _: None)
    report = PerfReport(quick=quick, meta=_meta(quick, sizes))
    began = time.monotonic()

    measured: dict[str, list[Figure]] = {}  # by benchmark, in the order of the report
    current = ""

    def add(name: str, result: tuple[list[Figure], dict[str, Any]]) -> None:
        figures, details = result
        measured.setdefault(current, []).extend(figures)
        report.details[name] = details
        for figure in figures:
            say(f"  {figure.name}: {_number(figure.ours)} {figure.unit}")

    async with contextlib.AsyncExitStack() as stack:
        emulators: dict[float, EmulatorProcess] = {}

        async def emulator(latency: float) -> EmulatorProcess:
            if latency not in emulators:
                emulators[latency] = await stack.enter_async_context(EmulatorProcess.run(latency))
            return emulators[latency]

        for name in RUN_ORDER:
            if name not in only:
                continue
            current = name
            say(f"{name}...")
            began_one = time.monotonic()
            fast = await emulator(FAST)
            if name == "catch-up":
                figures = await catch_up(fast, sizes.catch_up_items, sizes.baseline_items)
                add("catch_up_2ms", figures)
                slow = await emulator(SLOW)
                add(
                    "catch_up_20ms",
                    await catch_up(slow, sizes.catch_up_items_slow, sizes.baseline_items_slow),
                )
            elif name == "live":
                add("live", await live(fast, sizes.live_warm, sizes.live_events, sizes.window))
            elif name == "rss":
                figures = await rss(
                    fast, sizes.rss_warm, sizes.rss_events, sizes.rss_traced, sizes.window
                )
                add("rss", figures)
            elif name == "shutdown":
                add("shutdown", await shutdown(fast, sizes.shutdown_items))
            elif name == "latency":
                figures = await dispatch_latency(fast, sizes.latency_warm, sizes.latency_samples)
                add("latency", figures)
            elif name == "burst":
                add("burst", await burst(fast, sizes.burst))
            took = time.monotonic() - began_one
            report.meta.setdefault("benchmark_seconds", {})[name] = took
            say(f"  ({took:.1f} s)")
        for name in BENCHMARKS:
            report.figures.extend(measured.get(name, []))
        report.figures.extend(_writer_figures(report))
        for round_trip, child in emulators.items():
            report.details.setdefault("emulator_rss_mib", {})[f"{round_trip * 1000:g}ms"] = (
                await child.call("rss")
            )["rss_mib"]
    report.meta["seconds"] = time.monotonic() - began
    return report


def _writer_figures(report: PerfReport) -> list[Figure]:
    """The writer's backlog and shed writes over the live and rss runs."""
    runs = [report.details[name] for name in ("live", "rss") if name in report.details]
    if not runs:
        return []
    pending = [run["writer_pending_max"] for run in runs if run["writer_pending_max"] is not None]
    shed = [run["writer_shed"] for run in runs if run["writer_shed"] is not None]
    which = " and ".join(name for name in ("live", "rss") if name in report.details)
    return [
        Figure(
            "writer_backlog_max",
            f"writer backlog, max ({which} runs)",
            "writes",
            max(pending) if pending else None,
            note="sampled every 0.1 s",
        ),
        Figure(
            "writes_shed",
            f"writes shed ({which} runs)",
            "writes",
            sum(shed) if shed else None,
            note="counted, never silent; 0 expected at the soak's rate",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print the table, write the JSON; 0 once done (goals missed
    are reported, not an error)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, help="run only this one")
    parser.add_argument(
        "--json", default=DEFAULT_JSON, help=f"where the figures go ({DEFAULT_JSON})"
    )
    parser.add_argument("--log", default=DEFAULT_LOG, help=f"the log (default {DEFAULT_LOG})")
    parser.add_argument(
        "--full-baseline",
        action="store_true",
        help="run the serial catch-up baseline on every item, not a sample",
    )
    args = parser.parse_args(argv)
    for path in (args.json, args.log):
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    with library_warnings_to(args.log):
        report = asyncio.run(
            run_perf(
                quick=args.quick,
                only=args.only or BENCHMARKS,
                full_baseline=args.full_baseline,
                progress=say,
            )
        )
    meta = report.meta
    say("")
    say(run_heading(meta, report.quick))
    for line in report.table():
        say(line)
    if "rss" in report.details:
        say("")
        say("tracemalloc top 10 (by line, after the warm-up):")
        for line in report.details["rss"]["tracemalloc_top10"]:
            say(f"  {line}")
    Path(args.json).write_text(json.dumps(report.as_json(), indent=2) + "\n")
    say(f"figures written to {args.json}; warnings logged to {args.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
