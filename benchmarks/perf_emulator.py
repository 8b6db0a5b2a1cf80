"""The emulator of the performance benchmarks, in a process of its own, and its control
channel.

``python -m benchmarks.perf_emulator --latency SECONDS`` serves a
:class:`~parall_bridge.testing.FakeParallServer` on loopback (every REST answer
delayed by the simulated round trip, nothing recorded), prints one JSON line
``{"ready": true, "url": ..., "org_id": ...}``, then reads one JSON command a line
on stdin and answers each with one JSON line on stdout, ``{"id", "ok", "result"}``
(or ``"error"``). Commands run concurrently, so a ``wait_acked`` does not hold up
the others. It exits on ``quit`` or when stdin closes (its parent died).

:class:`EmulatorProcess` is the parent's side: it starts the child, sends commands
and always kills the child on the way out. The gateway under test runs in the
parent's process, so its CPU time and memory are measured apart from the emulator's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import logging
import os
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import attrs

from parall_bridge.testing import FakeParallServer

__all__ = ["EmulatorError", "EmulatorProcess", "main", "raise_fd_limit", "serve"]

_log = logging.getLogger("benchmarks.perf_emulator")

POLL_INTERVAL: Final = 0.001
"""How often the child looks at its counts (``wait_acked``, the stream's window)."""
STREAM_CHUNK: Final = 100
"""Most messages a stream posts at once, so requests are answered meanwhile."""
LINE_LIMIT: Final = 64 * 1024 * 1024
"""Longest control line (a seed of 200,000 ids fits)."""
START_TIMEOUT: Final = 30.0
"""Seconds the child may take to say it is ready."""
QUIT_TIMEOUT: Final = 10.0
"""Seconds the child may take to exit after ``quit`` before it is killed."""
ROOT: Final = Path(__file__).resolve().parent.parent
"""The checkout the child imports ``benchmarks`` and ``parall_bridge`` from."""


class EmulatorError(RuntimeError):
    """A command failed in the child (or the child is gone)."""


# --- the child ------------------------------------------------------------------------


@attrs.define
class _Agent:
    agent_id: str
    human_id: str
    chats: list[str]
    posted: int = 0


class _Driver:
    """The commands, run against the server."""

    def __init__(self, server: FakeParallServer) -> None:
        self._server = server
        self._agents: dict[str, _Agent] = {}
        self._streams: set[asyncio.Task[None]] = set()

    def _agent(self, args: dict[str, Any]) -> _Agent:
        return self._agents[str(args["agent"])]

    def _post(self, agent: _Agent, chat_id: str) -> str:
        agent.posted += 1
        return self._server.post_message(chat_id, agent.human_id, f"m{agent.posted}").id

    async def setup(self, args: dict[str, Any]) -> dict[str, Any]:
        """A new agent, a human and ``chats`` direct chats between them."""
        server = self._server
        account = server.add_agent("Bench")
        human = server.add_user("Human")
        chats = [
            server.add_chat(type="direct", members=[human.id, account.user_id]).id
            for _ in range(int(args["chats"]))
        ]
        self._agents[account.user_id] = _Agent(account.user_id, human.id, chats)
        return {
            "agent_id": account.user_id,
            "api_key": account.api_key,
            "human_id": human.id,
            "chats": chats,
        }

    async def seed(self, args: dict[str, Any]) -> dict[str, Any]:
        """Post ``count`` messages round robin over the agent's chats; the ids per chat
        in the order posted (the dispatch order)."""
        agent = self._agent(args)
        order: dict[str, list[str]] = {chat: [] for chat in agent.chats}
        for n in range(int(args["count"])):
            chat = agent.chats[n % len(agent.chats)]
            order[chat].append(self._post(agent, chat))
        return {"order": order}

    async def post(self, args: dict[str, Any]) -> dict[str, Any]:
        """Post ``count`` (1) messages into one chat (the agent's first unless
        ``chat``) at once; their ids, and when (``time.monotonic()``)."""
        agent = self._agent(args)
        chat = str(args.get("chat") or agent.chats[0])
        at = time.monotonic()
        ids = [self._post(agent, chat) for _ in range(int(args.get("count", 1)))]
        return {"ids": ids, "at": at}

    async def setup_fleet(self, args: dict[str, Any]) -> dict[str, Any]:
        """``count`` new agents (the fleet benchmark's accounts), each with one direct
        chat with one human they share: ``[agent_id, api_key, chat_id]`` each."""
        server = self._server
        human = server.add_user("Human")
        agents = []
        for n in range(int(args["count"])):
            account = server.add_agent(f"Fleet {n}")
            chat = server.add_chat(type="direct", members=[human.id, account.user_id]).id
            self._agents[account.user_id] = _Agent(account.user_id, human.id, [chat])
            agents.append([account.user_id, account.api_key, chat])
        # Thousands of agents, chats and keys live as long as the server: out of the
        # garbage collector's way, or its full passes pause every frame for a while.
        gc.collect()
        gc.freeze()
        return {"agents": agents, "human_id": human.id}

    async def spray(self, args: dict[str, Any]) -> dict[str, Any]:
        """Post ``count`` messages at ``rate`` a second, each into the first chat of an
        agent drawn at random (``seed``) from ``agents``; answer once all are posted:
        ``[message_id, agent_id, at]`` each, ``at`` being ``time.monotonic()`` just
        before the post."""
        agents = [self._agents[str(agent)] for agent in args["agents"]]
        count, rate = int(args["count"]), float(args["rate"])
        pick = random.Random(int(args.get("seed", 0)))
        loop = asyncio.get_running_loop()
        started = loop.time()
        posts: list[list[Any]] = []
        while len(posts) < count:
            due = min(count, int((loop.time() - started) * rate) + 1)
            while len(posts) < due:
                agent = pick.choice(agents)
                at = time.monotonic()
                posts.append([self._post(agent, agent.chats[0]), agent.agent_id, at])
            await asyncio.sleep(POLL_INTERVAL)
        return {"posts": posts, "seconds": loop.time() - started}

    async def wait_acked_all(self, args: dict[str, Any]) -> dict[str, Any]:
        """Answer once the ``agents`` have ``count`` items acked in all (``timeout``
        seconds at most), polled every 10 ms: the acked and pending counts."""
        server = self._server
        agents = [str(agent) for agent in args["agents"]]
        count = int(args["count"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(args["timeout"])
        while (acked := sum(server.dispatch_count(a, acked=True) for a in agents)) < count:
            if loop.time() > deadline:
                raise TimeoutError(f"{acked} of {count} items acked after {args['timeout']} s")
            await asyncio.sleep(10 * POLL_INTERVAL)
        pending = sum(server.dispatch_count(a) for a in agents)
        return {"acked": acked, "pending": pending}

    async def stream(self, args: dict[str, Any]) -> dict[str, Any]:
        """Start posting ``count`` messages round robin over the agent's chats, as fast
        as they are taken (or ``rate`` a second, when given), never more than ``window``
        pending at once."""
        agent = self._agent(args)
        rate = args.get("rate")
        task = asyncio.get_running_loop().create_task(
            self._stream(
                agent, int(args["count"]), int(args["window"]), None if rate is None else rate
            ),
            name="stream",
        )
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)
        return {}

    async def _stream(self, agent: _Agent, count: int, window: int, rate: float | None) -> None:
        server = self._server
        chats = agent.chats
        loop = asyncio.get_running_loop()
        started = loop.time()
        posted = 0
        while posted < count:
            room = min(STREAM_CHUNK, window - server.dispatch_count(agent.agent_id), count - posted)
            if rate is not None:
                room = min(room, int((loop.time() - started) * rate) - posted)
            for _ in range(max(0, room)):
                self._post(agent, chats[agent.posted % len(chats)])
                posted += 1
            await asyncio.sleep(POLL_INTERVAL)

    async def wait_acked(self, args: dict[str, Any]) -> dict[str, Any]:
        """Answer once ``count`` of the agent's items are acked (``timeout`` seconds at
        most): when it was seen (``time.monotonic()``)."""
        agent = self._agent(args)
        count = int(args["count"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(args["timeout"])
        while (acked := self._server.dispatch_count(agent.agent_id, acked=True)) < count:
            if loop.time() > deadline:
                raise TimeoutError(f"{acked} of {count} items acked after {args['timeout']} s")
            await asyncio.sleep(POLL_INTERVAL)
        return {"at": time.monotonic(), "acked": acked}

    async def counts(self, args: dict[str, Any]) -> dict[str, Any]:
        """Pending and acked items, steps, and messages posted, of the agent."""
        agent = self._agent(args)
        server = self._server
        return {
            "pending": server.dispatch_count(agent.agent_id),
            "acked": server.dispatch_count(agent.agent_id, acked=True),
            "steps": server.step_count(agent.agent_id),
            "posted": agent.posted,
        }

    async def step_types(self, args: dict[str, Any]) -> dict[str, Any]:
        """How many steps of each type the agent wrote (builds them: at the end only)."""
        steps = self._server.steps(self._agent(args).agent_id)
        return dict(Counter(str(step.step_type) for step in steps))

    async def rss(self, args: dict[str, Any]) -> dict[str, Any]:
        """The child's resident memory, MiB."""
        return {"rss_mib": _status_kib("VmRSS") / 1024}

    async def cpu(self, args: dict[str, Any]) -> dict[str, Any]:
        """The child's CPU time so far (``time.process_time()``, seconds)."""
        return {"cpu_seconds": time.process_time()}

    async def fds(self, args: dict[str, Any]) -> dict[str, Any]:
        """The child's open file descriptors, and its ``RLIMIT_NOFILE`` soft limit."""
        return {"fds": _open_fds(), "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}

    async def close(self) -> None:
        """Stop the streams."""
        for task in list(self._streams):
            task.cancel()
        await asyncio.gather(*self._streams, return_exceptions=True)


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (0 when unknown)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _open_fds() -> int:
    """How many file descriptors this process has open (-1 when unknown)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def raise_fd_limit() -> int:
    """Raise this process's ``RLIMIT_NOFILE`` soft limit to its hard limit (many
    WebSockets need more than the usual 1,024); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _answer(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def serve(latency: float) -> None:
    """Run the emulator and answer commands until ``quit`` or the end of stdin."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    server = FakeParallServer(latency=latency, record_requests=False, record_ws_frames=False)
    async with server:
        driver = _Driver(server)
        ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "setup": driver.setup,
            "seed": driver.seed,
            "post": driver.post,
            "stream": driver.stream,
            "wait_acked": driver.wait_acked,
            "counts": driver.counts,
            "step_types": driver.step_types,
            "rss": driver.rss,
            "setup_fleet": driver.setup_fleet,
            "spray": driver.spray,
            "wait_acked_all": driver.wait_acked_all,
            "fds": driver.fds,
            "cpu": driver.cpu,
        }
        running: set[asyncio.Task[None]] = set()

        async def handle(command: dict[str, Any]) -> None:
            ident = command.get("id")
            try:
                result = await ops[str(command["op"])](command.get("args") or {})
            except Exception as exc:  # answered, not raised: the parent decides
                _answer({"id": ident, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            else:
                _answer({"id": ident, "ok": True, "result": result})

        _answer({"ready": True, "url": server.url, "org_id": server.org_id, "pid": os.getpid()})
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break  # the parent is gone
                command = json.loads(line)
                if command.get("op") == "quit":
                    _answer({"id": command.get("id"), "ok": True, "result": {}})
                    break
                task = loop.create_task(handle(command), name=f"op-{command.get('op')}")
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await driver.close()


def main(argv: list[str] | None = None) -> int:
    """The child's entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf_emulator")
    parser.add_argument("--latency", type=float, default=0.0, help="simulated round trip (s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    raise_fd_limit()  # the fleet benchmark's thousands of WebSockets
    asyncio.run(serve(args.latency))
    # The server is closed; after a long run the interpreter would spend many seconds
    # freeing millions of records one by one, for nothing: leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- the parent's side -------------------------------------------------------------------


class EmulatorProcess:
    """A running child emulator (use :meth:`run`), and its commands.

    Attributes:
        url: the emulator's base URL.
        org_id: its organisation.
        latency: its simulated round trip (seconds).
    """

    def __init__(
        self, process: asyncio.subprocess.Process, ready: dict[str, Any], latency: float
    ) -> None:
        self._process = process
        self.url = str(ready["url"])
        self.org_id = str(ready["org_id"])
        self.latency = latency
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(
            self._read(), name="perf-emulator-reader"
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def run(cls, latency: float) -> AsyncIterator[EmulatorProcess]:
        """Start a child emulator with this round trip; on the way out (whatever the
        way) ask it to quit, and kill it if it does not."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.perf_emulator",
            "--latency",
            repr(latency),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=ROOT,
            limit=LINE_LIMIT,
        )
        emulator: EmulatorProcess | None = None
        try:
            assert process.stdout is not None
            async with asyncio.timeout(START_TIMEOUT):
                line = await process.stdout.readline()
            if not line:
                raise EmulatorError("the emulator process exited before it was ready")
            emulator = cls(process, json.loads(line), latency)
            yield emulator
        finally:
            await _stop(process, emulator)

    async def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        try:
            while line := await stdout.readline():
                answer = json.loads(line)
                future = self._waiting.pop(int(answer["id"]), None)
                if future is not None and not future.done():
                    future.set_result(answer)
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(EmulatorError("the emulator process is gone"))
            self._waiting.clear()

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Run one command in the child; its result.

        Raises:
            EmulatorError: the command failed (its error), or the child is gone.
        """
        stdin = self._process.stdin
        if stdin is None or self._reader.done():
            raise EmulatorError("the emulator process is gone")
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        stdin.write(json.dumps({"id": ident, "op": op, "args": args}).encode() + b"\n")
        await stdin.drain()
        answer = await future
        if not answer.get("ok"):
            raise EmulatorError(f"{op}: {answer.get('error')}")
        result: dict[str, Any] = answer["result"]
        return result

    async def _quit(self) -> None:
        with contextlib.suppress(EmulatorError, ConnectionError):
            await self.call("quit")
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


async def _stop(process: asyncio.subprocess.Process, emulator: EmulatorProcess | None) -> None:
    """Ask the child to quit; kill it if it does not in time, or if anything fails."""
    try:
        if emulator is not None and process.returncode is None:
            async with asyncio.timeout(QUIT_TIMEOUT):
                await emulator._quit()
                await process.wait()
    except (TimeoutError, Exception):
        _log.warning("the emulator process did not quit: killing it")
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if process.stdin is not None:
            process.stdin.close()
        if emulator is not None and not emulator._reader.done():
            emulator._reader.cancel()
            await asyncio.gather(emulator._reader, return_exceptions=True)


if __name__ == "__main__":
    sys.exit(main())
