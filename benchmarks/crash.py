"""Crash soak: the gateway in a child process, killed with SIGKILL at random moments.

This is what a user sees on deploys. The parent runs the emulator on one port for
the whole run (its state outlives the children), seeds an agent, three humans and
``--chats`` chats (direct ones and two ``active`` group chats), and posts
``--messages`` messages (bursts of up to five into one chat included) and
``--tasks`` task assignments over ``--seconds``. Meanwhile a child runs the gateway
as a user would::

    PRLL_API_URL=... PRLL_API_KEY=... PRLL_ORG_ID=... \\
        python -m parall_bridge run benchmarks.crash_runtime:CrashRuntime [--child-args]

and is killed with SIGKILL, then restarted, at least ``--kills`` times: after a
random uptime, or (a share ``--aim`` of the kills) aimed at a turn: as one starts,
or the moment the emulator stores the agent's reply, before the child has the answer.
(The model turns here take 0-50 ms, so a kill at a random moment mostly finds the
gateway idle, where a real agent's, with turns of seconds, would be busy.) Then
traffic stops, a last child drains the queue and is stopped with SIGTERM.

``python -m parall_bridge run`` takes its configuration from the environment only
(``PRLL_*``), with no way to set the gateway's tunables, so the children run with the
defaults (``reconcile_interval`` 60 s, ``cold_start_window`` 300 s: longer than a run's
items get old). The children's turn log (:mod:`benchmarks.crash_runtime`) and the
emulator's records give the report:

- replies in the chats, and events answered by more than one reply (each reply
  names every event of its turn);
- events lost (never part of a turn that ended successfully), and events acked
  without such a turn;
- events run by more than one turn, each put down to a kill while its turn was in
  flight, to a kill after its turn ended (the ack was lost with the process), or
  to neither.

``ok`` holds when no event got a second reply, none was lost and none was acked
without a turn. Run ``python -m benchmarks.crash``; ``crash_soak()`` is the same
as a coroutine, for a short smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import enum
import functools
import os
import random
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

import attrs

from parall_bridge.models import TextContent
from parall_bridge.protocol import FRAME_MESSAGE_NEW
from parall_bridge.testing import AgentAccount, FakeParallServer

from ._common import JsonLines, cancelled_on_sigterm, wait_until
from .crash_runtime import ENV_TURN_LOG, REPLY_PREFIX

__all__ = ["CrashReport", "crash_soak", "main"]

ROOT: Final = Path(__file__).resolve().parent.parent
"""The checkout: the children run from it, so ``benchmarks.crash_runtime`` imports."""
RUNTIME_SPEC: Final = "benchmarks.crash_runtime:CrashRuntime"
CONNECT_TIMEOUT: Final = 30.0
"""Seconds a new child gets to open its WebSocket and receive ``hello``."""
DRAIN_TIMEOUT: Final = 120.0
"""Seconds the last child gets to handle and ack everything once traffic stopped."""
STOP_TIMEOUT: Final = 30.0
"""Seconds the last child gets to exit after SIGTERM (its grace period is 10 s)."""
POLL_INTERVAL: Final = 0.05
AIM_POLL_INTERVAL: Final = 0.002
"""How often an aimed kill looks for a turn start or a reply (turns last 0-50 ms)."""
REPLY_WAIT: Final = 0.5
"""Longest wait of a kill aimed at a reply for that reply (a task turn has none)."""
GROUP_CHATS: Final = 2
HUMANS: Final = 3
MAX_BURST: Final = 5
AIM: Final = 0.5
"""Share of kills aimed at a turn (the rest land at a random moment of the uptime)."""


class KillKind(enum.StrEnum):
    """When a child was killed."""

    RANDOM = "at a random moment"
    MID_TURN = "as a turn started"  # within the poll interval of its start line
    ON_REPLY = "as the emulator stored a reply"


class _CrashServer(FakeParallServer):
    """The emulator, able to kill the child the moment it stores the agent's reply
    (before the child has its answer): the crash between a reply and its ack."""

    def __init__(self, *, port: int) -> None:
        super().__init__(port=port)
        self.agent_id: str | None = None
        self.on_agent_reply: Callable[[], None] | None = None

    def emit(self, user_id: str, frame_type: str, data: Mapping[str, Any]) -> int:
        hook = self.on_agent_reply
        if (
            hook is not None
            and frame_type == FRAME_MESSAGE_NEW
            and data.get("sender_id") == self.agent_id
        ):
            self.on_agent_reply = None
            hook()
        return super().emit(user_id, frame_type, data)


class Cause(enum.StrEnum):
    """Why an event ran more than once (or got more than one reply)."""

    IN_FLIGHT = "in flight at a kill"
    ACK_LOST = "done just before a kill"
    NO_KILL = "no kill involved"


@attrs.define
class _TurnRecord:
    pid: int
    seq: int
    keys: list[str]
    turn_id: str | None = None
    outcome: str | None = None  # None: no end line (the process died first)


@attrs.define
class CrashReport:
    """What a crash soak did and what the user would have seen."""

    seconds: float = 0.0
    kills: int = 0
    kill_kinds: collections.Counter[KillKind] = attrs.field(factory=collections.Counter)
    children: int = 0
    messages: int = 0
    tasks: int = 0
    turns: int = 0
    turns_ok: int = 0
    kills_mid_turn: int = 0
    replies: int = 0
    duplicate_replies: dict[str, Cause] = attrs.field(factory=dict)
    reran: dict[str, Cause] = attrs.field(factory=dict)
    extra_runs: int = 0
    lost: list[str] = attrs.field(factory=list)
    acked_without_turn: list[str] = attrs.field(factory=list)
    pending_at_end: int = 0
    final_exit: int | None = None
    store: str = ""
    notes: list[str] = attrs.field(factory=list)

    @property
    def events(self) -> int:
        return self.messages + self.tasks

    @property
    def ok(self) -> bool:
        return not (self.duplicate_replies or self.lost or self.acked_without_turn)

    def lines(self) -> list[str]:
        def causes(found: dict[str, Cause]) -> str:
            counts = collections.Counter(found.values())
            return ", ".join(f"{n} {cause}" for cause, n in sorted(counts.items())) or "none"

        per_kill = self.extra_runs / self.kills if self.kills else 0.0
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kill_kinds.items()))
        lines = [
            f"crash soak {self.seconds:.0f} s, state {self.store}: {self.kills} SIGKILLs "
            f"({kinds}; {self.kills_mid_turn} with a turn in flight), {self.children} children",
            f"events posted: {self.events} ({self.messages} messages, {self.tasks} tasks); "
            f"turns: {self.turns} started, {self.turns_ok} ended successfully",
            f"replies in the chats: {self.replies}; events with more than one reply: "
            f"{len(self.duplicate_replies)} ({causes(self.duplicate_replies)})",
            f"events run more than once: {len(self.reran)}, {self.extra_runs} extra runs "
            f"({per_kill:.1f} per kill; {causes(self.reran)})",
            f"events lost: {len(self.lost)}; acked without a successful turn: "
            f"{len(self.acked_without_turn)}; dispatch items pending at the end: "
            f"{self.pending_at_end}",
            f"last child exit status: {self.final_exit}",
        ]
        lines += [f"note: {note}" for note in self.notes]
        lines.append("verdict: " + ("ok" if self.ok else "FAILED"))
        return lines


@attrs.define
class _Plan:
    """The traffic of a run, drawn in advance: (offset in seconds, what to post)."""

    items: list[tuple[float, tuple[str, int] | None]]  # (chat id, burst size) or a task


def _plan(
    rng: random.Random, chat_ids: Sequence[str], messages: int, tasks: int, seconds: float
) -> _Plan:
    bursts: list[tuple[str, int] | None] = []
    left = messages
    while left > 0:
        size = min(left, rng.choice([1, 1, 1, 2, 2, 3, 4, MAX_BURST]))
        bursts.append((rng.choice(chat_ids), size))
        left -= size
    bursts += [None] * tasks
    rng.shuffle(bursts)
    offsets = sorted(rng.uniform(0.0, seconds * 0.95) for _ in bursts)
    return _Plan(list(zip(offsets, bursts, strict=True)))


class _Child:
    """One gateway process, as a user starts it."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid
        self.signalled = False

    @classmethod
    async def spawn(cls, args: Sequence[str], env: dict[str, str], out: IO[bytes]) -> _Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "parall_bridge",
            "run",
            RUNTIME_SPEC,
            *args,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
        return cls(process)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def signal_kill(self) -> None:
        """Send SIGKILL now (synchronously)."""
        self.signalled = True
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def kill(self) -> None:
        """SIGKILL (unless dead already) and reap."""
        self.signal_kill()
        await self.process.wait()

    async def terminate(self, within: float) -> int:
        """SIGTERM, then wait up to ``within`` seconds (SIGKILL past it); the exit status."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(within):
                return await self.process.wait()
        except TimeoutError:
            await self.kill()
            raise


async def _wait_until(
    predicate: Callable[[], bool], within: float, every: float = POLL_INTERVAL
) -> bool:
    """Poll ``predicate`` until it holds (True) or ``within`` seconds passed (False)."""
    return await wait_until(predicate, within, every)


class _TurnLog:
    """The children's turn log, read incrementally (cheap enough to poll every few ms)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[tuple[int, int], _TurnRecord] = {}
        self._lines = JsonLines(path)

    def refresh(self) -> dict[tuple[int, int], _TurnRecord]:
        """Read what was appended since the last call; return every turn seen so far."""
        for entry in self._lines.read_new():
            ident = (int(entry["pid"]), int(entry["seq"]))
            record = self.records.setdefault(
                ident, _TurnRecord(ident[0], ident[1], list(entry["keys"]), entry.get("turn_id"))
            )
            if entry["mark"] == "end":
                record.outcome = str(entry.get("outcome"))
        return self.records

    def in_flight(self, pid: int) -> bool:
        """Whether process ``pid`` has a turn started and not ended."""
        return any(r.pid == pid and r.outcome is None for r in self.refresh().values())

    def succeeded(self) -> set[str]:
        """The event keys of every turn that ended successfully."""
        return {key for r in self.refresh().values() if r.outcome == "ok" for key in r.keys}


class _Run:
    """The state of one crash soak run."""

    def __init__(
        self,
        server: _CrashServer,
        agent: AgentAccount,
        chat_ids: Sequence[str],
        workdir: Path,
        child_args: Sequence[str],
        rng: random.Random,
        report: CrashReport,
    ) -> None:
        self.server = server
        self.agent = agent
        self.chat_ids = list(chat_ids)
        self.turn_log = _TurnLog(workdir / "turns.jsonl")
        self.child_log = workdir / "children.log"
        self.child_args = list(child_args)
        self.rng = rng
        self.report = report
        self.child: _Child | None = None
        self.killed: set[int] = set()
        self.posted: set[str] = set()
        self.task_keys: dict[str, str] = {}  # task id -> event key
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PRLL_")}
        self.env.update(
            PRLL_API_URL=server.url,
            PRLL_API_KEY=agent.api_key,
            PRLL_ORG_ID=server.org_id,
            PYTHONUNBUFFERED="1",
        )
        self.env[ENV_TURN_LOG] = str(self.turn_log.path)

    async def start_child(self, out: IO[bytes]) -> _Child:
        """Start a child and wait until its WebSocket got ``hello``."""
        before = len(self.server.ws_connections)
        child = await _Child.spawn(self.child_args, self.env, out)
        self.child = child
        self.report.children += 1

        def connected() -> bool:
            return any(
                c.user_id == self.agent.user_id
                and c.session_id is not None
                and c.closed_code is None
                for c in self.server.ws_connections[before:]
            )

        if not await _wait_until(lambda: connected() or not child.alive, CONNECT_TIMEOUT):
            raise RuntimeError(f"child {child.pid} not connected after {CONNECT_TIMEOUT:g} s")
        if not child.alive:
            raise RuntimeError(
                f"child {child.pid} exited with {child.process.returncode} before connecting "
                f"(see {self.child_log})"
            )
        return child

    async def traffic(self, plan: _Plan, chats: dict[str, list[str]], done: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        humans = sorted({h for senders in chats.values() for h in senders})
        for offset, item in plan.items:
            await asyncio.sleep(max(0.0, started + offset - loop.time()))  # pacing
            if item is None:
                task = self.server.assign_task(
                    f"task {self.report.tasks}",
                    assignee_id=self.agent.user_id,
                    creator_id=self.rng.choice(humans),
                )
                version = task.updated_at.isoformat() if task.updated_at else ""
                self.task_keys[task.id] = f"{task.id}@{version}"
                self.posted.add(self.task_keys[task.id])
                self.report.tasks += 1
                continue
            chat_id, size = item
            for _ in range(size):  # a burst: back to back, before the agent can answer
                message = self.server.post_message(
                    chat_id, self.rng.choice(chats[chat_id]), f"msg {self.report.messages}"
                )
                self.posted.add(message.id)
                self.report.messages += 1
        done.set()

    async def killer(
        self, out: IO[bytes], kills: int, slot: float, aim: float, done: asyncio.Event
    ) -> None:
        """Start a child, kill it after a random uptime, again until ``kills`` and the
        traffic are done.

        With probability ``aim`` the kill is aimed instead: after a shorter uptime it
        waits (at most ``slot`` seconds) for a turn to start, then lands at once
        (mid-turn) or just after the emulator answered the agent's next reply (between
        a reply and its ack). The model turns here last 0-50 ms, so a kill at a random
        moment mostly finds the gateway idle, where a real agent's (turns of seconds,
        with work after the reply) would be busy."""
        while not (done.is_set() and self.report.kills >= kills):
            child = await self.start_child(out)
            if self.rng.random() < aim:
                await self._aim(child, slot)
            else:
                await asyncio.sleep(self.rng.uniform(0.2, 1.0) * slot)  # the kill schedule
                self.report.kill_kinds[KillKind.RANDOM] += 1
            if not child.alive and not child.signalled:
                self.report.notes.append(
                    f"child {child.pid} exited by itself ({child.process.returncode})"
                )
            await child.kill()
            self.killed.add(child.pid)
            self.report.kills += 1

    async def _aim(self, child: _Child, slot: float) -> None:
        await asyncio.sleep(self.rng.uniform(0.1, 0.5) * slot)  # the kill schedule
        busy = functools.partial(self.turn_log.in_flight, child.pid)
        if not await _wait_until(busy, slot, AIM_POLL_INTERVAL):
            self.report.kill_kinds[KillKind.RANDOM] += 1  # no turn came
            return
        if self.rng.random() < 0.5:
            self.report.kill_kinds[KillKind.MID_TURN] += 1
            return  # at once
        fired = asyncio.Event()

        def kill_now() -> None:
            child.signal_kill()
            fired.set()

        self.server.on_agent_reply = kill_now
        try:
            await _wait_until(fired.is_set, REPLY_WAIT)
        finally:
            self.server.on_agent_reply = None
        self.report.kill_kinds[KillKind.ON_REPLY if fired.is_set() else KillKind.RANDOM] += 1

    async def finish(self, out: IO[bytes], within: float) -> None:
        """Start the last child, wait until everything is handled and acked, SIGTERM it."""
        child = await self.start_child(out)

        def drained() -> bool:
            if self.server.dispatch_items(self.agent.user_id):
                return False
            return (
                not self.turn_log.in_flight(child.pid) and self.posted <= self.turn_log.succeeded()
            )

        if not await _wait_until(drained, within):
            self.report.notes.append(f"not drained {within:g} s after the traffic stopped")
        try:
            self.report.final_exit = await child.terminate(STOP_TIMEOUT)
        except TimeoutError:
            self.report.notes.append(f"last child ignored SIGTERM for {STOP_TIMEOUT:g} s")
        self.child = None

    async def close(self) -> None:
        """Kill a child still running (after an error or a cancellation) and reap it."""
        child, self.child = self.child, None
        if child is not None:
            await child.kill()

    def analyse(self) -> None:
        report = self.report
        records = self.turn_log.refresh()
        report.turns = len(records)
        report.turns_ok = sum(r.outcome == "ok" for r in records.values())
        report.kills_mid_turn = len(
            {r.pid for r in records.values() if r.outcome is None and r.pid in self.killed}
        )
        by_key: dict[str, list[_TurnRecord]] = collections.defaultdict(list)
        for record in records.values():
            for key in record.keys:
                by_key[key].append(record)

        def cause(key: str) -> Cause:
            runs = by_key[key]
            if any(r.outcome is None and r.pid in self.killed for r in runs):
                return Cause.IN_FLIGHT
            if any(r.outcome == "ok" and r.pid in self.killed for r in runs):
                return Cause.ACK_LOST
            return Cause.NO_KILL

        for key, runs in sorted(by_key.items()):
            if len(runs) > 1:
                report.reran[key] = cause(key)
                report.extra_runs += len(runs) - 1
        succeeded = self.turn_log.succeeded()
        report.lost = sorted(self.posted - succeeded)
        acked = self.server.dispatch_items(self.agent.user_id, include_acked=True)
        acked_keys = {
            self.task_keys.get(item.source_id or "", "")
            if item.source_type == "task_activity"
            else item.source_id or ""
            for item in acked
            if item.status == "acked"
        }
        report.acked_without_turn = sorted(acked_keys - succeeded)
        report.pending_at_end = len(self.server.dispatch_items(self.agent.user_id))
        replies = _replies(self.server, self.agent.user_id, self.chat_ids)
        named = collections.Counter(key for reply in replies for key in _named_keys(reply))
        report.replies = len(replies)
        report.duplicate_replies = {key: cause(key) for key, n in named.items() if n > 1}


def _replies(server: FakeParallServer, agent_id: str, chat_ids: Sequence[str]) -> list[str]:
    """The texts the agent sent in these chats."""
    return [
        message.content.text
        for chat_id in chat_ids
        for message in server.messages(chat_id)
        if message.sender_id == agent_id and isinstance(message.content, TextContent)
    ]


def _named_keys(reply: str) -> set[str]:
    """The event keys a reply names (every event of the turn that sent it)."""
    return (
        set(reply.removeprefix(REPLY_PREFIX).split()) if reply.startswith(REPLY_PREFIX) else set()
    )


def _seed(server: FakeParallServer, agent: AgentAccount, chats: int) -> dict[str, list[str]]:
    """Create the humans and chats; return each chat's possible senders."""
    humans = [server.add_user(f"human{i}").id for i in range(HUMANS)]
    groups = min(GROUP_CHATS, chats // 2)
    senders: dict[str, list[str]] = {}
    for i in range(chats - groups):
        human = humans[i % HUMANS]
        chat = server.add_chat(type="direct", members=[human, agent.user_id])
        senders[chat.id] = [human]
    for i in range(groups):
        chat = server.add_chat(
            type="group",
            name=f"group {i}",
            members=[*humans, agent.user_id],
            agent_routing_mode="active",
        )
        senders[chat.id] = list(humans)
    return senders


async def crash_soak(
    seconds: float = 60.0,
    *,
    messages: int = 200,
    chats: int = 20,
    tasks: int = 10,
    kills: int = 10,
    aim: float = AIM,
    seed: int = 1,
    state: bool = True,
    child_args: Sequence[str] = (),
    port: int = 0,
    drain_within: float = DRAIN_TIMEOUT,
    workdir: Path | None = None,
) -> CrashReport:
    """Run the crash soak and return its report.

    Args:
        seconds: how long traffic is posted (kills go on past it until ``kills``).
        messages: messages posted, over ``chats`` chats.
        chats: chats seeded (two of them ``active`` group chats).
        tasks: tasks assigned to the agent.
        kills: least number of SIGKILLs.
        aim: the share of kills aimed at a turn in flight (the others land at a random
            moment of the child's uptime, mostly between turns).
        seed: the seed of the traffic and of the kill schedule.
        state: the children keep a durable state file (``--state`` in the work
            directory, shared by every child); ``False``: ``--no-state``.
        child_args: extra arguments of ``python -m parall_bridge run`` in the children.
        port: the emulator's port (0: one ephemeral port, chosen once for the run).
        drain_within: seconds the last child gets to handle everything.
        workdir: where the turn log and the children's output are kept (a temporary
            directory, removed afterwards, when ``None``).
    """
    rng = random.Random(seed)
    report = CrashReport()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crash-")))
        workdir.mkdir(parents=True, exist_ok=True)
        out = stack.enter_context((workdir / "children.log").open("ab"))
        server = _CrashServer(port=port)
        async with server:
            agent = server.add_agent("Crash", api_key="pk_crash_soak")
            server.agent_id = agent.user_id
            senders = _seed(server, agent, chats)
            store = ["--state", str(workdir / "state.db")] if state else ["--no-state"]
            report.store = "SQLite file" if state else "memory (--no-state)"
            args = [*store, *child_args]
            run = _Run(server, agent, list(senders), workdir, args, rng, report)
            plan = _plan(rng, list(senders), messages, tasks, seconds)
            done = asyncio.Event()
            slot = seconds / (kills + 1)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(run.traffic(plan, senders, done))
                    group.create_task(run.killer(out, kills, slot, aim, done))
                await run.finish(out, drain_within)
            finally:
                await run.close()
            run.analyse()
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the crash soak and print its report; exit 1 if an event got a second reply,
    was lost, or was acked without a turn."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.crash",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="traffic duration (60)")
    parser.add_argument("--messages", type=int, default=200, help="messages posted (200)")
    parser.add_argument("--chats", type=int, default=20, help="chats (20, two of them groups)")
    parser.add_argument("--tasks", type=int, default=10, help="tasks assigned (10)")
    parser.add_argument("--kills", type=int, default=10, help="least number of SIGKILLs (10)")
    parser.add_argument(
        "--aim",
        type=float,
        default=AIM,
        help=f"share of kills aimed at a turn in flight ({AIM:g}; 0: all at random moments)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--no-state",
        action="store_true",
        help="children keep their state in memory (the behaviour before the state store)",
    )
    parser.add_argument(
        "--child-args",
        default="",
        help="extra arguments of 'python -m parall_bridge run' (one string, shell-split)",
    )
    parser.add_argument("--workdir", type=Path, help="keep the turn log and child output here")
    args = parser.parse_args(argv)
    soak = crash_soak(
        args.seconds,
        messages=args.messages,
        chats=args.chats,
        tasks=args.tasks,
        kills=args.kills,
        aim=args.aim,
        seed=args.seed,
        state=not args.no_state,
        child_args=shlex.split(args.child_args),
        workdir=args.workdir,
    )
    try:
        report = asyncio.run(cancelled_on_sigterm(soak))
    except (asyncio.CancelledError, KeyboardInterrupt):
        sys.stderr.write("crash soak interrupted (its child was killed)\n")
        return 1
    for line in report.lines():
        sys.stdout.write(line + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
