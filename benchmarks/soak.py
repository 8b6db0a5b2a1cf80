"""Soak run: the gateway against the emulator under random traffic and random faults.

For ``--seconds`` (300 by default) humans post messages in several chats and
assign tasks while faults are injected: WebSocket closes of every code class,
5xx answers, dropped connections, slow answers, zombie periods, garbage frames,
and turns that fail once. Then traffic stops, faults are cleared, the gateway
drains and stops, and the invariants are checked:

- every message and task was handled by exactly one successful turn;
- no dispatch item is left pending; no dead letter (failures were transient);
- the ledger stayed within its capacity, and so did the SQLite state file the gateway
  keeps (its rows, and its size on disk, reported half-way and at the end); no task of the
  library is left;
- no library object outlives its work: once stopped, no turn, event or step is alive
  (RSS is reported too, for information: it includes the emulator, which keeps every
  message, dispatch row and request it saw, as a real server's database would).

Run ``make soak`` (or ``python -m benchmarks.soak``); the test suite runs a
few seconds of it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import logging
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import attrs

from parall_bridge import (
    AgentRuntime,
    AgentStep,
    Gateway,
    GatewayConfig,
    ParallClient,
    ParallEvent,
    RetryPolicy,
    SessionRef,
    Turn,
)
from parall_bridge import protocol as p
from parall_bridge.testing import FakeParallServer
from parall_bridge.ws import Backoff

__all__ = ["SoakReport", "main", "soak"]

DEDUPE_CAPACITY: Final = 400
STATE_ROWS: Final = "SELECT (SELECT COUNT(*) FROM sources) + (SELECT COUNT(*) FROM turns)"
"""Rows of a state file: its records and its journaled turns."""
CLOSE_CODES: Final = (1000, 1001, 1011, 1012, 1013, 4001, 4008, 4999)
FAULTY_ENDPOINTS: Final = (
    p.SEND_MESSAGE,
    p.ACK_DISPATCH,
    p.ACK_DISPATCH_BY_ID,
    p.GET_MESSAGE,
    p.LIST_DISPATCH,
    p.CREATE_AGENT_STEP,
    p.WS_TICKET,
    p.LIST_CHATS,
    p.MARK_DISPATCH_RECEIVED,
)


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _alive_library_objects() -> dict[str, int]:
    """Live turns, events and steps (once the gateway is drained, it holds none)."""
    gc.collect()
    kinds = (Turn, ParallEvent, AgentStep)
    counts = dict.fromkeys((kind.__name__ for kind in kinds), 0)
    for obj in gc.get_objects():
        if type(obj) in kinds:
            counts[type(obj).__name__] += 1
    return counts


class _SoakRuntime(AgentRuntime):
    """Replies to each turn; some events fail their first attempt; forks supported."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.handled: collections.Counter[str] = collections.Counter()
        self.failed_once: set[str] = set()
        self.turns = 0
        self._forks = 0

    async def run_turn(self, turn: Turn) -> str | None:
        self.turns += 1
        await asyncio.sleep(self._rng.uniform(0.0, 0.05))  # the model at work
        last = turn.event
        if last.key not in self.failed_once and self._rng.random() < 0.1:
            self.failed_once.add(last.key)
            raise RuntimeError("transient model failure")
        if turn.chat_id:
            await turn.send_message(f"re: {last.text[:30]}")
        for event in turn.events:
            self.handled[event.key] += 1
        return "ok"

    async def fork_session(self, parent: SessionRef) -> SessionRef | None:
        self._forks += 1
        return SessionRef(f"{parent.key}/fork-{self._forks}")


@attrs.define
class SoakReport:
    """What a soak run did and whether its invariants held."""

    seconds: float = 0.0
    messages: int = 0
    tasks: int = 0
    turns: int = 0
    faults: collections.Counter[str] = attrs.field(factory=collections.Counter)
    connections: int = 0
    rss_half_mib: float = 0.0
    rss_end_mib: float = 0.0
    alive: dict[str, int] = attrs.field(factory=dict)
    ledger_max: int = 0
    state_half_kib: float = 0.0
    state_end_kib: float = 0.0
    state_rows_max: int = 0
    writes_shed: int = 0
    writes_abandoned: int = 0
    failures: list[str] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        faults = ", ".join(f"{n} {kind}" for kind, n in sorted(self.faults.items()))
        return [
            f"soak {self.seconds:.0f} s: {self.messages} messages, {self.tasks} tasks, "
            f"{self.turns} turns, {self.connections} WebSocket connections",
            f"faults injected: {faults or 'none'}",
            f"ledger max {self.ledger_max} (capacity {DEDUPE_CAPACITY}); library objects alive "
            f"once stopped: {self.alive}",
            f"state file (SQLite, with its WAL) half-way {self.state_half_kib:.0f} KiB, end "
            f"{self.state_end_kib:.0f} KiB; most rows {self.state_rows_max}",
            f"RSS (emulator included) half-way {self.rss_half_mib:.1f} MiB, "
            f"end {self.rss_end_mib:.1f} MiB",
            f"platform writes shed {self.writes_shed}, abandoned at shutdown "
            f"{self.writes_abandoned}",
            "invariants: " + ("all held" if self.ok else "; ".join(self.failures)),
        ]


def _state_kib(path: Path) -> float:
    """The state file's size on disk, its write-ahead log included."""
    files = [path, path.with_name(path.name + "-wal")]
    return sum(f.stat().st_size for f in files if f.exists()) / 1024


def _state_rows(path: Path) -> int:
    """Rows of the state file (a reader beside the gateway's connection: WAL allows it)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute(STATE_ROWS).fetchone()[0])


async def soak(seconds: float, seed: int = 1) -> SoakReport:
    """Run the soak for ``seconds`` and return its report."""
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        return await _soak(seconds, seed, Path(folder) / "state.db")


async def _soak(seconds: float, seed: int, state_path: Path) -> SoakReport:
    rng = random.Random(seed)
    report = SoakReport(seconds=seconds)
    alive_before = _alive_library_objects()  # whatever else in this process holds some
    async with FakeParallServer(heartbeat_interval=1.0, replay_buffer_size=200) as server:
        agent = server.add_agent("Soak", api_key="pk_soak_run")
        humans = [server.add_user(f"human{i}") for i in range(3)]
        members = [h.id for h in humans] + [agent.user_id]
        senders: dict[str, list[str]] = {}
        for i in range(4):
            chat = server.add_chat(type="direct", members=[humans[i % 3].id, agent.user_id])
            senders[chat.id] = [humans[i % 3].id]
        modes = {}
        for i, mode in enumerate(("active", "smart", "passive")):
            chat = server.add_chat(
                type="group", name=f"g{i}", members=members, agent_routing_mode=mode
            )
            senders[chat.id] = [h.id for h in humans]
            modes[chat.id] = mode
        runtime = _SoakRuntime(rng)
        config = GatewayConfig(
            server.url,
            agent.api_key,
            server.org_id,
            reconcile_interval=0.5,
            dedupe_capacity=DEDUPE_CAPACITY,
            shutdown_grace=5.0,
            cold_start_window=None,
            state_path=str(state_path),
        )
        retry = RetryPolicy(initial_backoff=0.05, max_backoff=0.5, jitter=0.05)
        abort = asyncio.Event()
        expected: set[str] = set()
        timers: list[asyncio.TimerHandle] = []
        async with ParallClient(server.url, agent.api_key, retry=retry, timeout=2.0) as client:
            gateway = Gateway(
                config, runtime, client=client, backoff=Backoff(maximum=0.5, jitter=0.1)
            )
            task = asyncio.get_running_loop().create_task(gateway.start(abort))
            await asyncio.wait_for(gateway.wait_ready(), 10)
            deadline = time.monotonic() + seconds
            half = time.monotonic() + seconds / 2
            while time.monotonic() < deadline:
                for _ in range(rng.randint(1, 4)):
                    chat_id = rng.choice(list(senders))
                    mention = modes.get(chat_id) == "passive" or rng.random() < 0.3
                    message = server.post_message(
                        chat_id,
                        rng.choice(senders[chat_id]),
                        f"msg {report.messages}",
                        mentions=[agent.user_id] if mention else [],
                    )
                    expected.add(message.id)
                    report.messages += 1
                if rng.random() < 0.05:
                    task_ = server.assign_task(
                        f"task {report.tasks}", assignee_id=agent.user_id, creator_id=humans[0].id
                    )
                    version = task_.updated_at.isoformat() if task_.updated_at else ""
                    expected.add(f"{task_.id}@{version}")
                    report.tasks += 1
                if rng.random() < 0.15:
                    await _inject_fault(server, rng, report, timers)
                report.ledger_max = max(report.ledger_max, sum(gateway.stats().ledger.values()))
                if report.rss_half_mib == 0.0 and time.monotonic() >= half:
                    report.rss_half_mib = _rss_mib()
                    report.state_half_kib = _state_kib(state_path)
                    report.state_rows_max = max(report.state_rows_max, _state_rows(state_path))
                await asyncio.sleep(rng.uniform(0.01, 0.1))  # pacing of the traffic
            for timer in timers:
                timer.cancel()
            server.faults.clear()
            server.go_silent(False)
            server.delay_ws_frames(None)

            def drained() -> bool:
                stats = gateway.stats()
                return (
                    not server.dispatch_items(agent.user_id)
                    and stats.active_turns == 0
                    and stats.queued == 0
                    and all(runtime.handled[key] for key in expected)
                )

            try:
                await server.wait_for(drained, timeout=60)
            except TimeoutError:
                report.failures.append("did not drain within 60 s after the traffic stopped")
            report.ledger_max = max(report.ledger_max, sum(gateway.stats().ledger.values()))
            report.rss_end_mib = _rss_mib()
            report.state_rows_max = max(report.state_rows_max, _state_rows(state_path))
            stats = gateway.stats()
            abort.set()
            await asyncio.wait_for(task, 30)
            final = gateway.stats()
            report.writes_shed = final.writes_shed
            report.writes_abandoned = final.writes_abandoned
            # Measured once stopped: steps still being written are in flight, not leaked.
            report.alive = {
                name: max(0, n - alive_before[name]) for name, n in _alive_library_objects().items()
            }
        report.state_end_kib = _state_kib(state_path)
        report.turns = runtime.turns
        report.connections = len([c for c in server.ws_connections if c.ticket_ok])
        missing = [key for key in expected if runtime.handled[key] == 0]
        twice = [key for key, n in runtime.handled.items() if n > 1]
        pending = server.dispatch_items(agent.user_id)
        if missing:
            report.failures.append(f"{len(missing)} event(s) never handled")
        if twice:
            report.failures.append(f"{len(twice)} event(s) handled more than once")
        if pending:
            report.failures.append(f"{len(pending)} dispatch item(s) left pending")
        if report.writes_shed or report.writes_abandoned:
            report.failures.append(
                f"the writer shed {report.writes_shed} and abandoned "
                f"{report.writes_abandoned} platform write(s)"
            )
        if stats.dead_letters:
            report.failures.append(f"{stats.dead_letters} dead letter(s)")
        if report.ledger_max > DEDUPE_CAPACITY:
            report.failures.append(f"ledger grew to {report.ledger_max}")
        if report.state_rows_max > DEDUPE_CAPACITY:
            report.failures.append(f"the state file grew to {report.state_rows_max} rows")
        left = [t for t in asyncio.all_tasks() if t.get_name().startswith("parall-")]
        if left:
            report.failures.append(f"{len(left)} library task(s) left running")
        leaked = {name: n for name, n in report.alive.items() if n}
        if leaked:
            report.failures.append(f"library objects outlived their work: {leaked}")
    return report


async def _inject_fault(
    server: FakeParallServer,
    rng: random.Random,
    report: SoakReport,
    timers: list[asyncio.TimerHandle],
) -> None:
    kind = rng.choice(["close", "fail", "drop", "delay", "zombie", "garbage", "refuse"])
    report.faults[kind] += 1
    if kind == "close":
        await server.close_ws(rng.choice(CLOSE_CODES), "soak")
    elif kind == "fail":
        server.fail_next(
            rng.choice(FAULTY_ENDPOINTS),
            status=rng.choice([500, 502, 503, 504, 429]),
            retry_after=0.05,
            times=rng.randint(1, 3),
        )
    elif kind == "drop":
        server.drop_next(rng.choice(FAULTY_ENDPOINTS), times=rng.randint(1, 2))
    elif kind == "delay":
        server.delay_next(rng.choice(FAULTY_ENDPOINTS), rng.uniform(0.1, 0.8))
    elif kind == "zombie":
        server.go_silent(True)
        timers.append(
            asyncio.get_running_loop().call_later(rng.uniform(1.0, 3.0), server.go_silent, False)
        )
    elif kind == "garbage":
        await server.send_raw(rng.choice(["not json", '{"seq": 1}', '{"type": "message.new"}']))
    else:
        server.refuse_ws(rng.randint(1, 3))


class _LogCounter(logging.Handler):
    """Counts the library's log records by level instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print its report; exit 1 if an invariant failed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    counter = _LogCounter()
    library = logging.getLogger("parall_bridge")
    library.addHandler(counter)
    library.setLevel(logging.INFO)
    library.propagate = False
    try:
        report = asyncio.run(soak(args.seconds, args.seed))
    finally:
        library.removeHandler(counter)
        library.propagate = True
    for line in report.lines():
        sys.stdout.write(line + "\n")
    logged = ", ".join(f"{n} {level}" for level, n in sorted(counter.counts.items()))
    sys.stdout.write(f"log records: {logged}\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
