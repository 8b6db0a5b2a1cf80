"""Benchmarks of the gateway, each against a baseline measured in the same run.

1. Turn-start latency: time from a message being posted to the runtime's turn
   starting. Ours writes the session status and the input step off the
   critical path; the baseline does what the seed does (awaits both REST calls
   before the agent runs). Every REST call to those endpoints gets the same
   injected latency, as over a real network.
2. Turn-start latency with the SQLite store: the same measure, with a real
   SQLite state file against the memory store (median and p99); a turn's
   journal entry is written in the background, never awaited before it starts.
3. Burst throughput: a burst of messages over several chats whose turns take
   a fixed time. Fork-on-busy routing (``DefaultRoutingStrategy``) against
   serial routing (``SerialRoutingStrategy``), same gateway, same emulator.

Run ``make bench`` (or ``python -m benchmarks``); ``--quick`` is the smoke run
the test suite uses.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Final

import attrs

from parall_bridge import (
    AgentRuntime,
    AgentSessionStatus,
    AgentStep,
    DefaultRoutingStrategy,
    EventOrigin,
    Gateway,
    GatewayConfig,
    GatewayInfo,
    MemoryStateStore,
    ParallClient,
    RoutingStrategy,
    SerialRoutingStrategy,
    SessionRef,
    SqliteStateStore,
    StateStore,
    Turn,
)
from parall_bridge import protocol as p
from parall_bridge.testing import FakeParallServer
from parall_bridge.ws import Backoff

__all__ = ["BenchResult", "main", "run_benchmarks"]

REST_LATENCY: Final = 0.02
"""Injected latency of the session-status and step endpoints (a 20 ms round trip)."""
TURN_TIME: Final = 0.05
"""How long each turn of the throughput benchmark takes (the model's time)."""


@attrs.frozen
class BenchResult:
    """One benchmark: our figure, the baseline's, and the ratio (baseline / ours)."""

    name: str
    unit: str
    ours: float
    baseline: float

    @property
    def ratio(self) -> float:
        """How many times better ours is (for times: baseline / ours)."""
        return self.baseline / self.ours if self.ours else float("inf")

    def line(self) -> str:
        return (
            f"{self.name}: ours {self.ours:.4f} {self.unit}, baseline {self.baseline:.4f} "
            f"{self.unit} -> {self.ratio:.2f}x"
        )


class _LatencyRuntime(AgentRuntime):
    """Records when each turn started; the seed-style variant first awaits the session
    status and the input step itself, as the seed does before the agent runs."""

    def __init__(self, seed_style: bool) -> None:
        self.seed_style = seed_style
        self.started: dict[str, float] = {}
        self._session_id = ""

    async def on_start(self, info: GatewayInfo) -> None:
        self._session_id = info.session_id or ""

    async def run_turn(self, turn: Turn) -> str | None:
        if self.seed_style:
            await turn.client.update_agent_session(
                turn.org_id, turn.agent_id, self._session_id, status=AgentSessionStatus.ACTIVE
            )
            await turn.client.create_agent_step(
                turn.org_id, turn.agent_id, self._session_id, AgentStep(step_type="input")
            )
        self.started[turn.message_id] = time.monotonic()
        return None


class _SlowRuntime(AgentRuntime):
    """Each turn takes TURN_TIME; forks are supported."""

    def __init__(self) -> None:
        self.handled = 0
        self._forks = 0

    async def run_turn(self, turn: Turn) -> str | None:
        await asyncio.sleep(TURN_TIME)  # the model at work
        # Platform events only: a synthetic wake-up turn (fork results) is not one.
        self.handled += sum(1 for e in turn.events if e.origin is not EventOrigin.SYNTHETIC)
        return None

    async def fork_session(self, parent: SessionRef) -> SessionRef | None:
        self._forks += 1
        return SessionRef(f"{parent.key}/fork-{self._forks}")


async def _run_gateway(
    server: FakeParallServer,
    api_key: str,
    runtime: AgentRuntime,
    routing: RoutingStrategy | None,
    body: Callable[[Gateway], object],
    store: StateStore | None = None,
) -> None:
    config = GatewayConfig(server.url, api_key, server.org_id, max_forks=8, shutdown_grace=5.0)
    abort = asyncio.Event()
    async with ParallClient(server.url, api_key) as client:
        gateway = Gateway(
            config,
            runtime,
            routing=routing,
            client=client,
            store=store,
            backoff=Backoff(maximum=0.1),
        )
        task = asyncio.get_running_loop().create_task(gateway.start(abort))
        try:
            await asyncio.wait_for(gateway.wait_ready(), 10)
            result = body(gateway)
            if asyncio.iscoroutine(result):
                await result
        finally:
            abort.set()
            await task


async def turn_start_latency(samples: int) -> BenchResult:
    """Median time from post to turn start, ours vs the seed's awaited writes."""
    baseline = statistics.median(await _turn_starts(seed_style=True, samples=samples))
    ours = statistics.median(await _turn_starts(seed_style=False, samples=samples))
    return BenchResult("turn-start latency (median)", "s", ours, baseline)


async def store_latency(samples: int) -> list[BenchResult]:
    """Turn-start latency with the SQLite store (a real file) against the memory store,
    median and 99th percentile: no store write is awaited before a turn starts."""
    with tempfile.TemporaryDirectory(prefix="bench-store-") as folder:
        memory = await _turn_starts(seed_style=False, samples=samples, store=MemoryStateStore())
        sqlite = await _turn_starts(
            seed_style=False,
            samples=samples,
            store=SqliteStateStore(Path(folder) / "state.db"),
        )
    return [
        BenchResult(
            "turn-start latency, SQLite store vs memory (median)",
            "s",
            statistics.median(sqlite),
            statistics.median(memory),
        ),
        BenchResult(
            "turn-start latency, SQLite store vs memory (p99)",
            "s",
            _percentile(sqlite, 99),
            _percentile(memory, 99),
        ),
    ]


def _percentile(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def _turn_starts(
    *, seed_style: bool, samples: int, store: StateStore | None = None
) -> list[float]:
    async with FakeParallServer() as server:
        agent = server.add_agent("Bench", api_key="pk_bench_latency")
        human = server.add_user("Human")
        chat = server.add_chat(type="direct", members=[human.id, agent.user_id])
        runtime = _LatencyRuntime(seed_style)
        latencies: list[float] = []

        async def drive(gateway: Gateway) -> None:
            server.delay_next(p.UPDATE_AGENT_SESSION, REST_LATENCY, times=100_000)
            server.delay_next(p.CREATE_AGENT_STEP, REST_LATENCY, times=100_000)
            for _ in range(samples):
                posted_at = time.monotonic()
                message_id = server.post_message(chat.id, human.id, "ping").id
                await server.wait_for(partial(_contains, runtime.started, message_id), timeout=10)
                latencies.append(runtime.started[message_id] - posted_at)
                await server.wait_for(partial(_idle, gateway))

        await _run_gateway(server, agent.api_key, runtime, None, drive, store)
        if store is not None:
            await store.close()
    return latencies


def _contains(mapping: dict[str, float], key: str) -> bool:
    return key in mapping


def _idle(gateway: Gateway) -> bool:
    stats = gateway.stats()
    return stats.active_turns == 0 and stats.queued == 0


async def burst_throughput(chats: int, per_chat: int) -> BenchResult:
    """Wall time to handle a multi-chat burst: fork-on-busy vs serial routing."""
    serial = await _burst_time(SerialRoutingStrategy(), chats, per_chat)
    forks = await _burst_time(DefaultRoutingStrategy(max_forks=8), chats, per_chat)
    return BenchResult(f"burst of {chats}x{per_chat} messages (wall time)", "s", forks, serial)


async def _burst_time(strategy: RoutingStrategy, chats: int, per_chat: int) -> float:
    async with FakeParallServer() as server:
        agent = server.add_agent("Bench", api_key="pk_bench_burst")
        human = server.add_user("Human")
        rooms = [
            server.add_chat(type="direct", members=[human.id, agent.user_id]) for _ in range(chats)
        ]
        runtime = _SlowRuntime()
        elapsed: list[float] = []

        def done() -> bool:
            return runtime.handled == chats * per_chat and not server.dispatch_items(agent.user_id)

        async def drive(gateway: Gateway) -> None:
            started = time.monotonic()
            for n in range(per_chat):
                for room in rooms:
                    server.post_message(room.id, human.id, f"m{n}")
            await server.wait_for(done, timeout=120)
            elapsed.append(time.monotonic() - started)

        await _run_gateway(server, agent.api_key, runtime, strategy, drive)
    return elapsed[0]


async def run_benchmarks(quick: bool = False) -> list[BenchResult]:
    """Run every benchmark (``quick``: a few samples, for the smoke test)."""
    return [
        await turn_start_latency(samples=5 if quick else 50),
        *await store_latency(samples=5 if quick else 200),
        await burst_throughput(chats=3 if quick else 8, per_chat=2 if quick else 10),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print one line each."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    for result in asyncio.run(run_benchmarks(args.quick)):
        sys.stdout.write(result.line() + "\n")
    return 0
