"""A gateway process killed with SIGKILL, then started again on the same state file
(DESIGN.md section 8): the interrupted turn runs again first with its reply keys (one
reply in the chat), the crashed run's session is completed, and a turn that kills its
process every time is dead-lettered at ``max_dispatch_attempts`` instead of looping."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from parall_bridge.models import AgentSessionStatus, Chat, StepType, User
from parall_bridge.testing import AgentAccount, FakeParallServer

CHILD = """
import asyncio, json, os, signal, sys

from parall_bridge import AgentRuntime, Gateway, GatewayConfig


def say(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\\n")
    sys.stdout.flush()


class Runtime(AgentRuntime):
    def __init__(self, behaviour):
        self.behaviour = behaviour

    async def run_turn(self, turn):
        say("TURN", turn.turn_id, *[e.key for e in turn.events])
        if self.behaviour == "crash":
            await asyncio.sleep(0.3)  # the model at work (a crash at its first instant,
            os.kill(os.getpid(), signal.SIGKILL)  # before the journal is on disk, is uncounted)
        await turn.send_message("re " + " ".join(e.text for e in turn.events))
        say("SENT", turn.turn_id)
        if self.behaviour == "hang":
            await asyncio.Event().wait()
        return "ok"

    async def on_dead_letter(self, events, error):
        say("DEAD", *[e.key for e in events])


async def main():
    settings = json.loads(sys.argv[1])
    behaviour = settings.pop("behaviour")
    config = GatewayConfig(**settings)
    gateway = Gateway(config, Runtime(behaviour))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.ensure_future(gateway.start(stop))
    await gateway.wait_ready()
    say("READY")
    await task


asyncio.run(main())
"""


class Child:
    """A gateway process and the lines it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def expect(self, prefix: str, timeout: float = 20.0) -> str:
        """The next line starting with ``prefix`` (earlier lines are kept)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"the child exited before {prefix!r}: {self.lines}")
                line = raw.decode().strip()
                self.lines.append(line)
                if line.startswith(prefix):
                    return line

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)


@asynccontextmanager
async def child(
    server: FakeParallServer,
    agent: AgentAccount,
    tmp_path: Path,
    behaviour: str,
    **tunables: Any,
) -> AsyncIterator[Child]:
    """A gateway in a child process on ``tmp_path/state.db``; stopped (SIGTERM) at the end
    unless it is dead already."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    settings = {
        "parall_url": server.url,
        "api_key": agent.api_key,
        "org_id": server.org_id,
        "state_path": str(tmp_path / "state.db"),
        "shutdown_grace": 1.0,
        "behaviour": behaviour,
        **tunables,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        json.dumps(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    running = Child(proc)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def agent_replies(server: FakeParallServer, agent: AgentAccount, chat: Chat) -> list[str]:
    return [
        str(m.content.text)  # type: ignore[union-attr]
        for m in server.messages(chat.id)
        if m.sender_id == agent.user_id
    ]


@pytest.mark.asyncio
async def test_a_turn_killed_between_its_reply_and_its_ack_replies_once(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat, tmp_path: Path
) -> None:
    message = server.post_message(room.id, ada.id, "hello")
    async with child(server, agent, tmp_path, "hang") as first:
        started = await first.expect("TURN")
        await first.expect("SENT")
        first.kill()
        await first.proc.wait()
    assert agent_replies(server, agent, room) == ["re hello"]
    assert [item.source_id for item in server.dispatch_items(agent.user_id)] == [message.id]
    crashed_session = server.sessions(agent.user_id)[-1]
    assert crashed_session.status != AgentSessionStatus.COMPLETED

    async with child(server, agent, tmp_path, "reply") as second:
        again = await second.expect("TURN")
        assert again == started  # the same turn: same id, same events
        await second.expect("SENT")
        await server.wait_for(lambda: not server.dispatch_items(agent.user_id), timeout=10)
    assert agent_replies(server, agent, room) == ["re hello"]  # the platform kept one
    keys = [
        r.json["idempotency_key"]
        for r in server.requests
        if r.method == "POST" and r.path.endswith("/messages") and r.json
    ]
    assert len(keys) == 2
    assert len(set(keys)) == 1
    assert keys[0] == f"pb:{agent.user_id}:{started.split()[1]}:1"
    sessions = {s.id: s for s in server.sessions(agent.user_id)}
    assert sessions[crashed_session.id].status == AgentSessionStatus.COMPLETED
    steps = server.steps(agent.user_id, crashed_session.id)
    assert any(
        s.step_type == StepType.ERROR and "interrupted" in s.content["message"] for s in steps
    )


@pytest.mark.asyncio
async def test_a_turn_that_kills_its_process_is_dead_lettered_instead_of_looping(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat, tmp_path: Path
) -> None:
    """Each start that finds the turn interrupted counts an attempt; at
    ``max_dispatch_attempts`` its event is given up on (``on_dead_letter``, an error step,
    the ack) and nothing runs it again."""
    message = server.post_message(room.id, ada.id, "poison")
    for run in range(2):  # attempt 1 dies; the next start counts it and runs it again
        async with child(server, agent, tmp_path, "crash", max_dispatch_attempts=2) as crashing:
            await crashing.expect("TURN")
            assert await crashing.proc.wait() == -signal.SIGKILL, run
    async with child(server, agent, tmp_path, "reply", max_dispatch_attempts=2) as last:
        dead = await last.expect("DEAD")
        assert dead == f"DEAD {message.id}"
        await last.expect("READY")
        await server.wait_for(lambda: not server.dispatch_items(agent.user_id), timeout=10)
    assert not any(line.startswith("TURN") for line in last.lines)
    assert agent_replies(server, agent, room) == []
    errors = [s for s in server.steps(agent.user_id) if s.step_type == StepType.ERROR]
    assert any(s.content.get("attempts") == 2 for s in errors)
