"""The demo behind ``make demo``: the real gateway against the built-in Parall emulator.

An example runtime (:class:`DemoRuntime`: it "thinks", calls a pretend tool and
replies; ``python -m parall_bridge run parall_bridge.demo:DemoRuntime`` serves it
to a real platform or to ``python -m parall_bridge emulator``) serves a scripted
conversation: a direct message, a group @mention that arrives while
the main session is busy (so it runs on a fork), a burst that coalesces into
one turn, and a task. The demo prints a trace of each event's route, turn,
steps and ack, then a summary, and ends by itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Final

from .client import ParallClient
from .gateway import Gateway, GatewayConfig
from .runtime import AgentRuntime, ForkOutcome, SessionRef, Turn
from .testing import FakeParallServer

__all__ = ["DemoRuntime", "run_demo"]

THINK_TIME: Final = 0.6
"""Seconds the example runtime pretends its model takes per turn."""
DEMO_TIMEOUT: Final = 20.0
"""The demo gives up (exit 1) if the conversation is not handled by then."""

Say = Callable[[str], None]

_TASK_VERSION: Final = re.compile(r"@\d{4}-\d\d-\d\dT[0-9:.+]+")
_TURN_ID: Final = re.compile(r"\b([st][0-9a-f]{6})[0-9a-f]{18}\b")

_log = logging.getLogger("parall_bridge.demo")


class DemoRuntime(AgentRuntime):
    """An example runtime: reasoning deltas, a tool call, a reply, and forks.

    It runs with the package alone, so the command line can serve it from anywhere:
    ``python -m parall_bridge run parall_bridge.demo:DemoRuntime``.

    Args:
        say: where it tells of the forks it releases (by default, an INFO log line).
    """

    def __init__(self, say: Say | None = None) -> None:
        self._say = say if say is not None else _log.info
        self._forks = 0

    async def run_turn(self, turn: Turn) -> str | None:
        """Think, look something up, reply to the chat (tasks get a summary only)."""
        turn.new_response()
        for delta in ("Reading ", f"{len(turn.events)} event(s) ", "and planning."):
            turn.reasoning(delta)
        turn.reasoning_done()
        await asyncio.sleep(THINK_TIME)  # the model at work
        turn.tool_call("call-1", "search_docs", {"query": turn.event.text[:40]})
        turn.tool_result("call-1", output={"hits": 3})
        answered = "; ".join(event.text.splitlines()[0] for event in turn.events)
        reply = f"Done: {answered}"
        if turn.chat_id:
            await turn.send_message(reply)
        return reply

    async def fork_session(self, parent: SessionRef) -> SessionRef | None:
        """Forks copy the parent's last completed turn (here: nothing to copy)."""
        self._forks += 1
        return SessionRef(f"{parent.key}/fork-{self._forks}", handle={"parent": parent.key})

    async def release_session(self, child: SessionRef, outcome: ForkOutcome) -> None:
        """Nothing to clean up in this example."""
        self._say(
            f"           fork {child.key.rsplit('/', 1)[-1]} released: {outcome.handled} handled"
        )


class _Trace(logging.Handler):
    """Renders the gateway's route/turn/step/ack log records as a readable trace."""

    def __init__(self, say: Say, labels: dict[str, str], started: float) -> None:
        super().__init__(logging.DEBUG)
        self._say = say
        self._labels = labels
        self._started = started

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._render(record)
        except Exception:
            self.handleError(record)

    def _render(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        kind = self._kind(record, text)
        if kind is None:
            return
        for raw, label in self._labels.items():
            text = text.replace(raw, label)
        text = _TASK_VERSION.sub("", text)  # a task's dedupe key is id@updated_at
        text = _TURN_ID.sub(r"\1", text)  # a turn id, shortened
        for word in ("route ", "turn ", "acked ", "agent session "):
            text = text.removeprefix(word)
        self._say(f"{time.monotonic() - self._started:6.2f}s  {kind:<6} {text}")

    @staticmethod
    def _kind(record: logging.LogRecord, text: str) -> str | None:
        if record.name.endswith((".lanes", ".turns")):
            if text.startswith("route "):
                return "route"
            if text.startswith("turn "):
                return "done" if text.endswith("succeeded") else "turn"
            return "lanes"
        if record.name.endswith(".writer"):
            if text.startswith("acked"):
                return "ack"
            if text.endswith("step written"):
                return "step"
            if text.startswith("agent session"):
                return "status"
        if record.levelno >= logging.WARNING:
            return "warn"
        return None


async def run_demo(say: Say) -> int:
    """Run the demo, printing through ``say``; returns the exit status."""
    started = time.monotonic()
    async with FakeParallServer(org_id="org_demo", heartbeat_interval=5.0) as server:
        agent = server.add_agent("Demo Agent")
        ada = server.add_user("Ada")
        bob = server.add_user("Bob")
        direct = server.add_chat(type="direct", members=[ada.id, agent.user_id])
        team = server.add_chat(
            type="group", name="Launch team", members=[ada.id, bob.id, agent.user_id]
        )
        labels: dict[str, str] = {
            direct.id: "chat:direct",
            team.id: "chat:launch-team",
            "agent:main:parall:default": "main",
        }
        say(f"Parall emulator at {server.url}; agent {agent.user_id}")
        handler = _Trace(say, labels, started)
        gateway_log = logging.getLogger("parall_bridge.gateway")
        previous_level = gateway_log.level
        gateway_log.addHandler(handler)
        gateway_log.setLevel(logging.DEBUG)
        try:
            return await _conversation(
                say,
                server,
                agent.api_key,
                ada.id,
                bob.id,
                direct.id,
                team.id,
                agent.user_id,
                labels,
                started,
            )
        finally:
            gateway_log.removeHandler(handler)
            gateway_log.setLevel(previous_level)


async def _conversation(
    say: Say,
    server: FakeParallServer,
    api_key: str,
    ada: str,
    bob: str,
    direct: str,
    team: str,
    agent_id: str,
    labels: dict[str, str],
    started: float,
) -> int:
    config = GatewayConfig(server.url, api_key, server.org_id, shutdown_grace=5.0)
    runtime = DemoRuntime(say)
    abort = asyncio.Event()
    async with ParallClient(server.url, api_key) as client:
        gateway = Gateway(config, runtime, client=client)
        running = asyncio.get_running_loop().create_task(gateway.start(abort), name="demo")
        try:
            await asyncio.wait_for(gateway.wait_ready(), DEMO_TIMEOUT)
            say(f"{time.monotonic() - started:6.2f}s  ready  gateway connected, catch-up done")

            def post(chat: str, sender: str, text: str, who: str, **kw: object) -> None:
                message = server.post_message(chat, sender, text, **kw)  # type: ignore[arg-type]
                labels[message.id] = f"msg({who}: {text[:24]!r})"
                say(
                    f"{time.monotonic() - started:6.2f}s  post   {who} -> "
                    f"{labels.get(chat, chat)}: {text!r}"
                )

            def turns() -> int:
                return gateway.stats().turns_started

            post(direct, ada, "Hi! Can you prepare the launch checklist?", "Ada")
            await server.wait_for(lambda: turns() == 1, timeout=DEMO_TIMEOUT)
            post(team, bob, "@Demo Agent what is the launch status?", "Bob", mentions=[agent_id])
            await server.wait_for(lambda: turns() == 2, timeout=DEMO_TIMEOUT)
            for text in ("Also add the weather check", "and the fuel check", "thanks!"):
                post(direct, ada, text, "Ada")
            task = server.assign_task(
                "Write the launch report", assignee_id=agent_id, creator_id=ada, priority="high"
            )
            labels[task.id] = "task('Write the launch report')"
            say(f"{time.monotonic() - started:6.2f}s  task   Ada assigned {labels[task.id]}")

            def settled() -> bool:
                stats = gateway.stats()
                return (
                    not server.dispatch_items(agent_id)
                    and stats.active_turns == 0
                    and stats.queued == 0
                    and stats.forks_open == 0
                )

            await server.wait_for(settled, timeout=DEMO_TIMEOUT)
            await server.wait_for(lambda: gateway.stats().acks_sent >= 5, timeout=DEMO_TIMEOUT)
        except TimeoutError:
            say("the demo did not finish in time")
            return 1
        finally:
            abort.set()
            await running
        stats = gateway.stats()
    replies = sum(
        1 for chat in (direct, team) for m in server.messages(chat) if m.sender_id == agent_id
    )
    steps = server.steps(agent_id)
    kinds: dict[str, int] = {}
    for step in steps:
        kinds[str(step.step_type)] = kinds.get(str(step.step_type), 0) + 1
    (session,) = server.sessions(agent_id)
    say("")
    say("summary")
    say(
        f"  turns: {stats.turns_succeeded} succeeded, {stats.turns_failed} failed "
        f"(5 messages and 1 task; the burst of 3 coalesced into one turn)"
    )
    say(
        f"  replies posted: {replies}; acks sent: {stats.acks_sent}; "
        f"pending dispatch items left: {len(server.dispatch_items(agent_id))}"
    )
    say("  steps: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())))
    say(f"  agent session {session.id}: {session.status}")
    say(f"  finished in {time.monotonic() - started:.1f} s")
    return 0
