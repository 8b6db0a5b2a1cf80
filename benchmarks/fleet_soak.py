"""Fleet soak: fleet processes sharing one PostgreSQL store, one SIGKILLed, one rolled.

What a company running many agents sees on a deploy (issue 18, section 3). The parent
starts a throwaway PostgreSQL cluster (:class:`~parall_bridge.testing.postgres.PostgresServer`)
and the emulator (on one port for the whole run: its state outlives the processes),
seeds ``--accounts`` agents, each with a direct chat with a human, and writes a TOML
accounts file (each key from an environment variable it names). Then it starts
``--processes`` fleet processes (:mod:`benchmarks.fleet_soak_worker`: a
:class:`~parall_bridge.GatewayFleet` of every account on a
:class:`~parall_bridge.state.PostgresStateStore` with ``--lease-ttl``), waits until they
share the accounts (every account held, none over its fair share), and posts messages
to random accounts at ``--rate`` a second for ``--seconds``. Meanwhile:

- at a fifth of the traffic, one process is SIGKILLed, as one of its turns is in flight
  (it waits up to a tenth of the traffic for one): its leases and its heartbeat row
  expire after ``lease_ttl`` and the others take its accounts over (running their
  journals first: the interrupted turn again, with the same reply key);
- at 45 %, once they have, it is restarted (the others hand it its share back);
- at 65 %, a rolling restart of another: a new instance starts, and once it holds its
  fair share the old one gets SIGTERM (it releases each lease once that account is
  flushed).

Then traffic stops, the fleet drains (every message part of a successful turn, no
dispatch item pending) and every process gets SIGTERM. Throughout, the parent samples
the ``parall_bridge.leases`` table: an account is *without a holder* while its lease is
free or expired, or held by a process that was SIGKILLed (a dead holder's lease lives on
until it expires). From the emulator's records and the processes' turn log:

- replies in the chats, and messages answered by more than one reply (each reply names
  every event of its turn);
- messages lost (never part of a turn that ended successfully), and messages acked
  without such a turn;
- per account, the seconds without a holder from the first balance to the end of the
  drain (max, p99, median over the accounts), and the longest single stretch;
- how many accounts each process held over time (at each step of the scenario).

``ok`` holds when no message got a second reply, none was lost and none was acked
without a turn. Run ``python -m benchmarks.fleet_soak``; :func:`fleet_soak` is the same
as a coroutine, for a short smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, Final

import attrs

from parall_bridge.gateway.fleet import LEASE_LOST
from parall_bridge.models import TextContent
from parall_bridge.testing import FakeParallServer
from parall_bridge.testing.postgres import PostgresServer

from ._common import JsonLines, cancelled_on_sigterm, wait_until
from .crash_runtime import REPLY_PREFIX
from .fleet_soak_worker import ENV_STORE_DSN, ENV_TURN_LOG

__all__ = ["FleetSoakReport", "fleet_soak", "main"]

ROOT: Final = Path(__file__).resolve().parent.parent
"""The checkout: the workers run from it, so ``benchmarks`` imports."""
WORKER: Final = "benchmarks.fleet_soak_worker"
KEY_ENV: Final = "FLEET_SOAK_KEY_{:04d}"
"""The environment variable holding account ``n``'s API key (named in the accounts file)."""
SAMPLE_INTERVAL: Final = 0.1
"""Seconds between two looks at the leases table."""
POLL_INTERVAL: Final = 0.05
SETTLE_TIMEOUT: Final = 90.0
"""Seconds the processes get to share the accounts (at the start, after a kill, a
restart)."""
DRAIN_TIMEOUT: Final = 120.0
"""Seconds the fleet gets to handle and ack everything once traffic stopped."""
STOP_TIMEOUT: Final = 60.0
"""Seconds a process gets to exit after SIGTERM (its accounts' grace is 10 s)."""
KILL_AT: Final = 0.2
AIM_WITHIN: Final = 0.1
"""The SIGKILL waits (at most this share of the traffic's duration) for a turn of its
process to be in flight, so that the takeover has a turn to run from the journal."""
AIM_POLL_INTERVAL: Final = 0.002
"""How often the aimed SIGKILL looks for a turn start (turns last 0-50 ms)."""
RESTART_AT: Final = 0.45
ROLL_AT: Final = 0.65
"""When, in shares of the traffic's duration, the scenario's steps are due (each also
waits for the previous one to settle)."""


@attrs.define
class _TurnRecord:
    pid: int
    account: str
    keys: list[str]
    outcome: str | None = None  # None: no end line (the process died first)


class _TurnLog:
    """The processes' shared turn log, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[tuple[int, int, int], _TurnRecord] = {}  # (pid, run, seq)
        self._lines = JsonLines(path)

    def refresh(self) -> dict[tuple[int, int, int], _TurnRecord]:
        """Read what was appended since the last call; return every turn seen so far."""
        for entry in self._lines.read_new():
            ident = (int(entry["pid"]), int(entry["run"]), int(entry["seq"]))
            record = self.records.setdefault(
                ident, _TurnRecord(ident[0], str(entry["account"]), list(entry["keys"]))
            )
            if entry["mark"] == "end":
                record.outcome = str(entry.get("outcome"))
        return self.records

    def succeeded(self) -> set[str]:
        """The event keys of every turn that ended successfully."""
        return {key for r in self.refresh().values() if r.outcome == "ok" for key in r.keys}

    def in_flight(self, pid: int) -> bool:
        """Whether process ``pid`` has a turn started and not ended."""
        return any(r.pid == pid and r.outcome is None for r in self.refresh().values())


class _Worker:
    """One fleet process."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, started: float) -> None:
        self.name = name
        self.process = process
        self.pid = process.pid
        self.started = started
        self.killed_at: float | None = None  # SIGKILL sent (its leases are dead from then)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def kill(self) -> None:
        """SIGKILL (unless dead already) and reap."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()

    def terminate(self) -> None:
        """Send SIGTERM (a graceful shutdown)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    async def wait(self, within: float) -> int | None:
        """Its exit status, waiting up to ``within`` seconds (``None``: still running)."""
        try:
            async with asyncio.timeout(within):
                return await self.process.wait()
        except TimeoutError:
            return None


@attrs.define
class FleetSoakReport:
    """What a fleet soak did and what the users of its accounts would have seen."""

    accounts: int = 0
    processes: int = 0
    lease_ttl: float = 0.0
    seconds: float = 0.0
    traffic_seconds: float = 0.0
    messages: int = 0
    turns: int = 0
    turns_ok: int = 0
    replies: int = 0
    duplicate_replies: list[str] = attrs.field(factory=list)
    lost: list[str] = attrs.field(factory=list)
    acked_without_turn: list[str] = attrs.field(factory=list)
    reran: int = 0
    reran_after_kill: int = 0
    extra_runs: int = 0
    pending_at_end: int = 0
    unheld: dict[str, float] = attrs.field(factory=dict)
    """Per account, the seconds without a holder, from the first balance to the drain."""
    longest_gap: float = 0.0
    """The longest single stretch an account was without a holder."""
    killed_mid_turn: bool = False
    """Whether the SIGKILLed process had a turn in flight."""
    takeover_seconds: float | None = None
    """From the SIGKILL until every account was held by a live process again."""
    rolled_seconds: float | None = None
    """From the old instance's SIGTERM until every account was held again."""
    steps: list[tuple[float, str, dict[str, int]]] = attrs.field(factory=list)
    """(seconds since the start, what happened, accounts held by each process then)."""
    timeline: list[tuple[float, dict[str, int]]] = attrs.field(factory=list)
    """Accounts held by each process, about once a second."""
    exits: dict[str, int | None] = attrs.field(factory=dict)
    leases_live_at_end: int = 0
    lease_losses: dict[str, int] = attrs.field(factory=dict)
    """Per process, the accounts it stopped because their lease was lost while they ran
    (its warnings): a lease not renewed in time, or taken over."""
    notes: list[str] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicate_replies or self.lost or self.acked_without_turn)

    def unheld_quantiles(self) -> tuple[float, float, float]:
        """(median, p99, max) of the per-account seconds without a holder."""
        values = sorted(self.unheld.values()) or [0.0]
        p99 = values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]
        return statistics.median(values), p99, values[-1]

    def lines(self) -> list[str]:
        median, p99, worst = self.unheld_quantiles()
        without = sum(1 for v in self.unheld.values() if v > 0)
        lines = [
            f"fleet soak {self.seconds:.0f} s: {self.processes} processes, {self.accounts} "
            f"accounts, one PostgreSQL store (lease_ttl {self.lease_ttl:g} s)",
            f"messages posted: {self.messages} in {self.traffic_seconds:.0f} s to random "
            f"accounts; turns: {self.turns} started, {self.turns_ok} ended successfully",
            f"replies in the chats: {self.replies}; messages with more than one reply: "
            f"{len(self.duplicate_replies)}",
            f"messages lost: {len(self.lost)}; acked without a successful turn: "
            f"{len(self.acked_without_turn)}; dispatch items pending at the end: "
            f"{self.pending_at_end}",
            f"messages run more than once: {self.reran} ({self.extra_runs} extra runs; "
            f"{self.reran_after_kill} of them in flight in the SIGKILLed process)",
            f"time without a holder per account: median {median:.2f} s, p99 {p99:.2f} s, "
            f"max {worst:.2f} s ({without} of {len(self.unheld)} accounts ever without one); "
            f"longest single stretch {self.longest_gap:.2f} s",
            "after the SIGKILL, every account held again in "
            + _seconds(self.takeover_seconds)
            + f" (a dead process's leases and heartbeat row expire within lease_ttl = "
            f"{self.lease_ttl:g} s of their last renewal; the others' next look, at most "
            f"{min(self.lease_ttl / 3, 2.0):.2f} s later, takes its accounts, one statement "
            "each)",
            "after the rolling restart's SIGTERM, every account held again in "
            + _seconds(self.rolled_seconds),
            "accounts held by each process:",
        ]
        lines += [f"  {at:6.1f} s  {_held_text(held)}  {what}" for at, what, held in self.steps]
        losses = ", ".join(f"{name} {n}" for name, n in self.lease_losses.items())
        lines.append(
            f"accounts stopped because their lease was lost while they ran: "
            f"{sum(self.lease_losses.values())} ({losses})"
        )
        exits = ", ".join(f"{name} {code}" for name, code in self.exits.items())
        lines.append(
            f"exit statuses: {exits}; leases still live at the end: {self.leases_live_at_end}"
        )
        lines += [f"note: {note}" for note in self.notes]
        lines.append("verdict: " + ("ok" if self.ok else "FAILED"))
        return lines

    def as_json(self) -> dict[str, Any]:
        median, p99, worst = self.unheld_quantiles()
        return {
            "ok": self.ok,
            "accounts": self.accounts,
            "processes": self.processes,
            "lease_ttl": self.lease_ttl,
            "seconds": self.seconds,
            "traffic_seconds": self.traffic_seconds,
            "messages": self.messages,
            "turns": self.turns,
            "turns_ok": self.turns_ok,
            "replies": self.replies,
            "duplicate_replies": self.duplicate_replies,
            "lost": self.lost,
            "acked_without_turn": self.acked_without_turn,
            "reran": self.reran,
            "reran_after_kill": self.reran_after_kill,
            "extra_runs": self.extra_runs,
            "pending_at_end": self.pending_at_end,
            "unheld_median": median,
            "unheld_p99": p99,
            "unheld_max": worst,
            "unheld": self.unheld,
            "longest_gap": self.longest_gap,
            "killed_mid_turn": self.killed_mid_turn,
            "takeover_seconds": self.takeover_seconds,
            "rolled_seconds": self.rolled_seconds,
            "steps": [{"at": at, "what": what, "held": held} for at, what, held in self.steps],
            "timeline": [{"at": at, "held": held} for at, held in self.timeline],
            "exits": self.exits,
            "leases_live_at_end": self.leases_live_at_end,
            "lease_losses": self.lease_losses,
            "notes": self.notes,
        }


def _seconds(value: float | None) -> str:
    return "(not measured)" if value is None else f"{value:.2f} s"


def _held_text(held: dict[str, int]) -> str:
    return " ".join(f"{name}={n}" for name, n in held.items()) or "-"


async def _wait_until(
    predicate: Callable[[], bool], within: float, every: float = POLL_INTERVAL
) -> bool:
    """Poll ``predicate`` until it holds (True) or ``within`` seconds passed (False)."""
    return await wait_until(predicate, within, every)


@attrs.define
class _Account:
    account_id: str
    agent_id: str
    api_key: str
    chat_id: str


class _Leases:
    """The leases table, sampled every :data:`SAMPLE_INTERVAL`: who holds each account
    (a live worker), and for how long each account had no holder."""

    def __init__(self, conn: Any, agents: dict[str, str], workers: list[_Worker]) -> None:
        self._conn = conn
        self._agents = agents  # agent id -> account id
        self._workers = workers
        self.holders: dict[str, str | None] = dict.fromkeys(agents.values())  # -> worker name
        self.unheld: dict[str, float] = dict.fromkeys(agents.values(), 0.0)
        self.gap_started: dict[str, float] = {}
        self.longest_gap = 0.0
        self.counting = False
        self.timeline: list[tuple[float, dict[str, int]]] = []
        self._last: float | None = None
        self._samples = 0
        self.sampled = asyncio.Event()

    def _worker(self, holder: str) -> _Worker | None:
        # A holder is hostname:pid:random.
        parts = holder.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        pid = int(parts[1])
        for worker in self._workers:
            if worker.pid == pid:
                return worker
        return None

    async def sample(self) -> None:
        """Read the table once; add the time since the last sample to each account that
        had no holder then."""
        rows = await self._conn.fetch(
            "SELECT agent_id, holder, expires_at > clock_timestamp() AS live "
            "FROM parall_bridge.leases"
        )
        now = time.monotonic()
        holders: dict[str, str | None] = dict.fromkeys(self._agents.values())
        for row in rows:
            account = self._agents.get(row["agent_id"])
            if account is None or not row["live"]:
                continue
            worker = self._worker(row["holder"])
            if worker is not None and worker.killed_at is None and worker.alive:
                holders[account] = worker.name
        if self.counting and self._last is not None:
            step = now - self._last
            for account, holder in self.holders.items():
                if holder is None:
                    self.unheld[account] += step
        for account, holder in holders.items():
            if holder is None:
                self.gap_started.setdefault(account, now)
            elif account in self.gap_started:
                began = self.gap_started.pop(account)
                if self.counting:
                    self.longest_gap = max(self.longest_gap, now - began)
        self.holders = holders
        self._last = now
        self._samples += 1
        if self._samples % round(1.0 / SAMPLE_INTERVAL) == 0:
            self.timeline.append((now, self.held()))
        self.sampled.set()

    def start_counting(self) -> None:
        """Count the time without a holder from now on (start-up excluded)."""
        self.counting = True
        now = time.monotonic()
        self.gap_started = {a: now for a, h in self.holders.items() if h is None}

    def stop_counting(self) -> None:
        """Stop counting; a stretch still open ends now."""
        now = time.monotonic()
        for began in self.gap_started.values():
            self.longest_gap = max(self.longest_gap, now - began)
        self.counting = False

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            await self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    def held(self) -> dict[str, int]:
        """Accounts held by each live worker (by name, in start order)."""
        counts = collections.Counter(h for h in self.holders.values() if h is not None)
        return {w.name: counts.get(w.name, 0) for w in self._workers if w.alive}

    def all_held(self) -> bool:
        return all(holder is not None for holder in self.holders.values())

    def balanced(self, share: int) -> bool:
        """Every account held, and no process over ``share``."""
        return self.all_held() and max(self.held().values(), default=0) <= share

    async def fresh(self) -> None:
        """Wait for the next sample."""
        self.sampled.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10 * SAMPLE_INTERVAL + 5.0):
                await self.sampled.wait()


class _Run:
    """The state of one fleet soak run."""

    def __init__(
        self,
        server: FakeParallServer,
        accounts: list[_Account],
        human_id: str,
        workdir: Path,
        dsn: str,
        lease_ttl: float,
        rng: random.Random,
        report: FleetSoakReport,
    ) -> None:
        self.server = server
        self.accounts = accounts
        self.human_id = human_id
        self.workdir = workdir
        self.turn_log = _TurnLog(workdir / "turns.jsonl")
        self.lease_ttl = lease_ttl
        self.rng = rng
        self.report = report
        self.workers: list[_Worker] = []
        self.posted: set[str] = set()
        self.started = time.monotonic()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PRLL_")}
        self.env.update(
            PRLL_API_URL=server.url,
            PRLL_ORG_ID=server.org_id,
            PYTHONUNBUFFERED="1",
        )
        self.env[ENV_STORE_DSN] = dsn
        self.env[ENV_TURN_LOG] = str(self.turn_log.path)
        for n, account in enumerate(accounts):
            self.env[KEY_ENV.format(n)] = account.api_key
        self.accounts_file = workdir / "accounts.toml"
        self.accounts_file.write_text(_accounts_toml(accounts), encoding="utf-8")
        self.leases: _Leases | None = None
        self._logs: list[IO[bytes]] = []

    def share(self, processes: int) -> int:
        """The fair share of one of ``processes`` live processes."""
        return math.ceil(len(self.accounts) / max(1, processes))

    def live(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive and w.killed_at is None]

    async def spawn(self, name: str) -> _Worker:
        """Start a fleet process (its output in ``<workdir>/<name>.log``)."""
        out = (self.workdir / f"{name}.log").open("ab")
        self._logs.append(out)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            WORKER,
            "--accounts",
            str(self.accounts_file),
            "--lease-ttl",
            f"{self.lease_ttl:g}",
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
        worker = _Worker(name, process, time.monotonic())
        self.workers.append(worker)
        return worker

    def step(self, what: str) -> None:
        """Note a step of the scenario, with who holds what now."""
        assert self.leases is not None
        at = time.monotonic() - self.started
        self.report.steps.append((at, what, self.leases.held()))

    async def settle(self, what: str, predicate: Callable[[], bool]) -> bool:
        """Wait until ``predicate`` holds, from a sample of the leases taken after the
        call; ``False`` (noted in the report) after :data:`SETTLE_TIMEOUT`."""
        assert self.leases is not None
        leases = self.leases
        await leases.fresh()  # a sample taken after what it waits for began
        if not await _wait_until(predicate, SETTLE_TIMEOUT):
            self.report.notes.append(f"{what}: not settled after {SETTLE_TIMEOUT:g} s")
            for worker in self.workers:
                if not worker.alive and worker.killed_at is None:
                    self.report.notes.append(
                        f"process {worker.name} exited by itself ({worker.process.returncode}); "
                        f"see {self.workdir / (worker.name + '.log')}"
                    )
            return False
        await leases.fresh()
        return True

    async def traffic(self, seconds: float, rate: float) -> None:
        """Post ``rate`` messages a second, each to a random account, for ``seconds``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        total = max(1, round(seconds * rate))
        for n in range(total):
            await asyncio.sleep(max(0.0, started + n / rate - loop.time()))  # pacing
            account = self.rng.choice(self.accounts)
            message = self.server.post_message(account.chat_id, self.human_id, f"m{n}")
            self.posted.add(message.id)
            self.report.messages += 1
        self.report.traffic_seconds = loop.time() - started

    async def scenario(self, seconds: float, victim: _Worker, rolled: _Worker) -> None:
        """The SIGKILL, the restart and the rolling restart, each due at its share of
        the traffic's ``seconds`` and once the previous step settled."""
        assert self.leases is not None
        leases = self.leases
        loop = asyncio.get_running_loop()
        begun = loop.time()

        async def at(share: float) -> None:
            await asyncio.sleep(max(0.0, begun + share * seconds - loop.time()))

        processes = len(self.live())
        await at(KILL_AT)
        busy = functools.partial(self.turn_log.in_flight, victim.pid)
        aimed = await _wait_until(busy, AIM_WITHIN * seconds, AIM_POLL_INTERVAL)
        victim.killed_at = time.monotonic()
        await victim.kill()
        self.report.killed_mid_turn = aimed
        self.step(
            f"SIGKILL {victim.name} (pid {victim.pid}"
            + (", a turn in flight)" if aimed else ", idle: no turn came)")
        )
        if await self.settle("takeover", leases.all_held):
            self.report.takeover_seconds = time.monotonic() - victim.killed_at
            self.step(f"{victim.name}'s accounts taken over")
        await at(RESTART_AT)
        again = await self.spawn(victim.name + "'")
        self.step(f"{again.name} started (restart of {victim.name})")
        if await self.settle("restart", lambda: leases.balanced(self.share(processes))):
            self.step(f"{again.name} holds its share")
        await at(ROLL_AT)
        new = await self.spawn(rolled.name + "'")
        self.step(f"{new.name} started (rolling restart of {rolled.name})")
        if await self.settle(
            "rolling start",
            lambda: (
                leases.held().get(new.name, 0) >= self.share(processes + 1) and leases.all_held()
            ),
        ):
            self.step(f"{new.name} holds its share")
        terminated = time.monotonic()
        rolled.terminate()
        self.step(f"SIGTERM {rolled.name} (pid {rolled.pid})")
        self.report.exits[rolled.name] = await rolled.wait(STOP_TIMEOUT)
        self.step(f"{rolled.name} exited ({self.report.exits[rolled.name]})")
        if await self.settle("rolling stop", lambda: leases.balanced(self.share(processes))):
            self.report.rolled_seconds = time.monotonic() - terminated
            self.step(f"{rolled.name}'s accounts taken over")

    async def drain(self, within: float) -> None:
        """Wait until every message was part of a successful turn and none is pending."""
        agents = [a.agent_id for a in self.accounts]

        def drained() -> bool:
            if not self.posted <= self.turn_log.succeeded():
                return False
            return not any(self.server.dispatch_count(agent) for agent in agents)

        if not await _wait_until(drained, within, 0.2):
            self.report.notes.append(f"not drained {within:g} s after the traffic stopped")

    async def stop_all(self) -> None:
        """SIGTERM every live process at once; wait for each."""
        live = [w for w in self.workers if w.alive]
        for worker in live:
            worker.terminate()
        codes = await asyncio.gather(*(w.wait(STOP_TIMEOUT) for w in live))
        for worker, code in zip(live, codes, strict=True):
            self.report.exits[worker.name] = code
            if code is None:
                self.report.notes.append(
                    f"process {worker.name} ignored SIGTERM for {STOP_TIMEOUT:g} s"
                )

    async def close(self) -> None:
        """Kill whatever still runs (after an error or a cancellation) and reap it."""
        for worker in self.workers:
            await worker.kill()
        for out in self._logs:
            out.close()

    def analyse(self) -> None:
        report = self.report
        for worker in self.workers:
            log = self.workdir / f"{worker.name}.log"
            text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
            report.lease_losses[worker.name] = sum(
                1
                for line in text.splitlines()
                if "WARNING parall_bridge.gateway.fleet: account " in line
                and f": {LEASE_LOST}" in line
            )
        records = self.turn_log.refresh()
        report.turns = len(records)
        report.turns_ok = sum(r.outcome == "ok" for r in records.values())
        killed = {w.pid for w in self.workers if w.killed_at is not None}
        by_key: dict[str, list[_TurnRecord]] = collections.defaultdict(list)
        for record in records.values():
            for key in record.keys:
                by_key[key].append(record)
        for runs in by_key.values():
            if len(runs) > 1:
                report.reran += 1
                report.extra_runs += len(runs) - 1
                if any(r.outcome is None and r.pid in killed for r in runs):
                    report.reran_after_kill += 1
        succeeded = self.turn_log.succeeded()
        report.lost = sorted(self.posted - succeeded)
        acked: set[str] = set()
        pending = 0
        replies: list[str] = []
        for account in self.accounts:
            items = self.server.dispatch_items(account.agent_id, include_acked=True)
            acked.update(item.source_id or "" for item in items if item.status == "acked")
            pending += self.server.dispatch_count(account.agent_id)
            replies += [
                message.content.text
                for message in self.server.messages(account.chat_id)
                if message.sender_id == account.agent_id
                and isinstance(message.content, TextContent)
            ]
        report.acked_without_turn = sorted(acked - succeeded)
        report.pending_at_end = pending
        named = collections.Counter(key for reply in replies for key in _named_keys(reply))
        report.replies = len(replies)
        report.duplicate_replies = sorted(key for key, n in named.items() if n > 1)


def _named_keys(reply: str) -> set[str]:
    """The event keys a reply names (every event of the turn that sent it)."""
    return (
        set(reply.removeprefix(REPLY_PREFIX).split()) if reply.startswith(REPLY_PREFIX) else set()
    )


def _accounts_toml(accounts: Iterable[_Account]) -> str:
    """The accounts file: one table per account, its key from an environment variable
    (``parall_url`` and ``org_id`` from ``PRLL_API_URL`` and ``PRLL_ORG_ID``)."""
    tables = [
        f'[{account.account_id}]\napi_key_env = "{KEY_ENV.format(n)}"\n'
        f'agent_id = "{account.agent_id}"\n'
        for n, account in enumerate(accounts)
    ]
    return "\n".join(tables)


def _seed(server: FakeParallServer, accounts: int) -> tuple[list[_Account], str]:
    """The agents, each with a direct chat with the one human; and the human's id."""
    human = server.add_user("Human").id
    seeded = []
    for n in range(accounts):
        agent = server.add_agent(f"Agent {n}", api_key=f"pk_fleet_soak_{n:04d}")
        chat = server.add_chat(type="direct", members=[human, agent.user_id]).id
        seeded.append(_Account(f"agent{n:04d}", agent.user_id, agent.api_key, chat))
    return seeded, human


async def fleet_soak(
    seconds: float = 120.0,
    *,
    accounts: int = 300,
    processes: int = 3,
    rate: float = 10.0,
    lease_ttl: float = 5.0,
    seed: int = 1,
    drain_within: float = DRAIN_TIMEOUT,
    workdir: Path | None = None,
) -> FleetSoakReport:
    """Run the fleet soak and return its report.

    Args:
        seconds: how long traffic is posted (the scenario's steps are due at shares
            of it; a step that waits for the previous one to settle may run past it).
        accounts: agents seeded, each an account of every fleet process.
        processes: fleet processes (at least 2: one is SIGKILLed, another rolled).
        rate: messages a second, each to a random account.
        lease_ttl: the store's ``lease_ttl`` in every process.
        seed: the seed of the traffic.
        drain_within: seconds the fleet gets to handle everything after the traffic.
        workdir: where the accounts file, the turn log and the processes' output are
            kept (a temporary directory, removed afterwards, when ``None``).
    """
    if processes < 2:
        raise ValueError("the fleet soak needs at least 2 processes")
    import asyncpg  # type: ignore[import-untyped]  # no type hints

    rng = random.Random(seed)
    report = FleetSoakReport(accounts=accounts, processes=processes, lease_ttl=lease_ttl)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-soak-")))
        workdir.mkdir(parents=True, exist_ok=True)
        postgres = PostgresServer()
        await asyncio.to_thread(postgres.start)
        stack.callback(postgres.stop)
        dsn = await postgres.new_database()
        server = FakeParallServer(port=0)
        async with server:
            seeded, human = _seed(server, accounts)
            run = _Run(server, seeded, human, workdir, dsn, lease_ttl, rng, report)
            conn = await asyncpg.connect(dsn)
            sampler: asyncio.Task[None] | None = None
            try:
                names = [chr(ord("A") + n) for n in range(processes)]
                for name in names:
                    await run.spawn(name)
                run.leases = leases = _Leases(
                    conn, {a.agent_id: a.account_id for a in seeded}, run.workers
                )
                sampler = asyncio.get_running_loop().create_task(_sample(leases, conn))
                if not await run.settle("start", lambda: leases.balanced(run.share(processes))):
                    raise RuntimeError(f"the fleet did not start (see {workdir})")
                run.step("all started, the accounts shared")
                leases.start_counting()
                victim, rolled = run.workers[0], run.workers[1]
                async with asyncio.TaskGroup() as group:
                    group.create_task(run.traffic(seconds, rate))
                    group.create_task(run.scenario(seconds, victim, rolled))
                run.step("traffic stopped")
                await run.drain(drain_within)
                leases.stop_counting()
                run.step("drained")
                await run.stop_all()
                report.unheld = dict(leases.unheld)
                report.longest_gap = leases.longest_gap
                t0 = run.started
                report.timeline = [(at - t0, held) for at, held in leases.timeline]
                await _stop(sampler, report)
                sampler = None
                report.leases_live_at_end = await conn.fetchval(
                    "SELECT count(*) FROM parall_bridge.leases WHERE expires_at > clock_timestamp()"
                )
            finally:
                if sampler is not None:
                    await _stop(sampler, report)
                await run.close()
                await conn.close()
            run.analyse()
    report.seconds = time.monotonic() - started
    return report


async def _stop(sampler: asyncio.Task[None], report: FleetSoakReport) -> None:
    """Stop sampling the leases; a sampler that failed is noted in the report."""
    if sampler.done() and not sampler.cancelled() and sampler.exception() is not None:
        report.notes.append(f"the leases stopped being sampled: {sampler.exception()!r}")
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)


async def _sample(leases: _Leases, conn: Any) -> None:
    """Sample the leases table until cancelled (it exists once a process opened the
    store: until then, wait)."""
    while True:
        if await conn.fetchval("SELECT to_regclass('parall_bridge.leases') IS NOT NULL"):
            break
        await asyncio.sleep(POLL_INTERVAL)
    await leases.run()


def main(argv: list[str] | None = None) -> int:
    """Run the fleet soak and print its report; exit 1 if a message got a second reply,
    was lost, or was acked without a turn."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet_soak",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--accounts", type=int, default=300, help="accounts (300)")
    parser.add_argument("--processes", type=int, default=3, help="fleet processes (3)")
    parser.add_argument("--seconds", type=float, default=120.0, help="traffic duration (120)")
    parser.add_argument("--rate", type=float, default=10.0, help="messages a second (10)")
    parser.add_argument(
        "--lease-ttl", type=float, default=5.0, help="the store's lease_ttl, seconds (5)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the report here, as JSON")
    parser.add_argument("--workdir", type=Path, help="keep the turn log and process output here")
    args = parser.parse_args(argv)
    soak = fleet_soak(
        args.seconds,
        accounts=args.accounts,
        processes=args.processes,
        rate=args.rate,
        lease_ttl=args.lease_ttl,
        seed=args.seed,
        workdir=args.workdir,
    )
    try:
        report = asyncio.run(cancelled_on_sigterm(soak))
    except (asyncio.CancelledError, KeyboardInterrupt):
        sys.stderr.write("fleet soak interrupted (its processes were killed)\n")
        return 1
    for line in report.lines():
        sys.stdout.write(line + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
