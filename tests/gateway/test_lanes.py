"""Routing, coalescing and forks end to end (DESIGN.md section 3, "Routing",
"Coalescing", "Forks")."""

from __future__ import annotations

import asyncio

import pytest

from parall_bridge import StepType
from parall_bridge.events import ParallEvent
from parall_bridge.models import Chat, User
from parall_bridge.routing import DispatchState, Route, SerialRoutingStrategy
from parall_bridge.runtime import ForkOutcome, SessionRef, Turn
from parall_bridge.testing import AgentAccount, FakeParallServer

from ._harness import Run, ScriptedRuntime, running


class Gates:
    """Turns that wait, per target, until the test opens their gate."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.default_open = False

    def gate(self, target: str) -> asyncio.Event:
        return self.gates.setdefault(target, asyncio.Event())

    def release(self, target: str) -> None:
        self.gate(target).set()

    async def __call__(self, turn: Turn) -> str | None:
        if not self.default_open:
            await self.gate(turn.event.target_id).wait()
        return f"handled {len(turn.events)}"


def direct_chats(server: FakeParallServer, agent: AgentAccount, ada: User, n: int) -> list[Chat]:
    return [
        server.add_chat(
            type="group",
            name=f"room{i}",
            members=[ada.id, agent.user_id],
            agent_routing_mode="active",
        )
        for i in range(n)
    ]


async def main_on_a_and_fork_on_b(run: Run, ada: User, room_a: Chat, room_b: Chat) -> None:
    """Post a1 (main takes it) then b1 while main is busy (a fork takes it); return once
    both turns run."""
    run.server.post_message(room_a.id, ada.id, "a1")
    await run.wait_for(lambda: len(run.runtime.turns) == 1)
    run.server.post_message(room_b.id, ada.id, "b1")
    await run.wait_for(lambda: len(run.runtime.turns) == 2)


@pytest.mark.asyncio
async def test_same_target_events_coalesce_into_one_turn_with_history(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    (room,) = direct_chats(server, agent, ada, 1)
    gates = Gates()
    async with running(server, agent, ScriptedRuntime(gates)) as run:
        first = server.post_message(room.id, ada.id, "first")
        await run.wait_for(lambda: len(run.runtime.turns) == 1)  # MAIN: runs at once, alone
        second = server.post_message(room.id, ada.id, "second", no_reply=True)
        third = server.post_message(room.id, ada.id, "third")
        await run.wait_for(lambda: run.gateway.stats().queued == 2)
        gates.release(room.id)
        await run.wait_for(lambda: len(run.runtime.finished) == 2 and not run.pending())
    assert run.runtime.texts() == [["first"], ["second", "third"]]
    turn = run.runtime.turns[1]
    (entry,) = turn.history
    assert entry.sender == "Ada"
    assert entry.message_id == second.id
    assert entry.body == f"[Message ID: {second.id}] [Hint: no_reply]\nsecond"
    assert entry.timestamp == second.created_at
    assert turn.message_id == third.id
    assert turn.prompt() == turn.events[0].body + "\n\n---\n\n" + turn.events[1].body
    inputs = [s.content["trigger_ref"]["message_id"] for s in run.steps(StepType.INPUT)]
    assert inputs == [first.id, second.id, third.id]  # an input step for each coalesced event


@pytest.mark.asyncio
async def test_new_fork_runs_another_target_in_parallel_then_reports_to_main(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    room_a, room_b = direct_chats(server, agent, ada, 2)
    gates = Gates()
    runtime = ScriptedRuntime(gates)
    async with running(server, agent, runtime) as run:
        await main_on_a_and_fork_on_b(run, ada, room_a, room_b)  # main is busy: b1 runs on a fork
        assert runtime.turns[1].session_key == runtime.forked[0].key
        assert run.gateway.stats().forks_open == 1
        assert run.gateway.stats().active_turns == 2  # truly in parallel
        server.post_message(room_b.id, ada.id, "b2")  # BUFFER_FORK: queued on the open fork
        server.post_message(room_b.id, ada.id, "b3")
        await run.wait_for(lambda: run.gateway.stats().queued == 2)
        gates.release(room_b.id)
        await run.wait_for(lambda: len(runtime.released) == 1)
        child, outcome = runtime.released[0]
        assert child == runtime.forked[0]
        assert (outcome.handled, outcome.failed) == (3, 0)
        assert outcome.summary == "handled 2"
        assert runtime.texts()[2] == ["b2", "b3"]  # coalesced on the fork
        assert runtime.turns[2].session_key == child.key
        server.post_message(room_a.id, ada.id, "a2")
        await run.wait_for(lambda: run.gateway.stats().queued == 1)  # behind a1, on main
        gates.release(room_a.id)
        await run.wait_for(lambda: len(runtime.finished) == 4 and not run.pending())
    main_turn = runtime.turns[3]
    assert main_turn.session_key == "agent:main:parall:default"
    assert main_turn.body.startswith(
        "[Fork result]\n[Handled: message — 3 events in room1]\n[Actions: handled 2]"
        "\n\n---\n\n[Event: message.new]"
    )
    assert main_turn.prompt().startswith("[Fork result]")
    assert len(runtime.released) == 1  # released exactly once


@pytest.mark.asyncio
async def test_fork_results_wake_an_idle_main_with_a_synthetic_turn(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    room_a, room_b = direct_chats(server, agent, ada, 2)
    gates = Gates()
    runtime = ScriptedRuntime(gates)
    async with running(server, agent, runtime) as run:
        await main_on_a_and_fork_on_b(run, ada, room_a, room_b)
        gates.release(room_a.id)  # main finishes first and goes idle
        await run.wait_for(lambda: len(runtime.finished) == 1)
        gates.release(room_b.id)  # then the fork finishes: main is woken up
        gates.default_open = True
        await run.wait_for(lambda: len(runtime.finished) == 3)
    synthetic = runtime.turns[2]
    assert synthetic.session_key == "agent:main:parall:default"
    assert synthetic.body == (
        "[Fork result]\n[Handled: message — message from Ada in room1]\n[Actions: handled 1]"
        "\n\n---\n\n"
        "[Event: message.new]\n[Chat: _orchestrator | type: system]\n[From: system (system)]\n"
        f"[Message ID: {synthetic.message_id}]\n\n"
        "[Orchestrator: fork session(s) completed — review results above]"
    )
    assert synthetic.event.origin == "synthetic"


@pytest.mark.asyncio
async def test_runtime_without_forks_makes_events_wait_for_main(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    room_a, room_b = direct_chats(server, agent, ada, 2)
    gates = Gates()
    runtime = ScriptedRuntime(gates, forks=False)
    async with running(server, agent, runtime) as run:
        server.post_message(room_a.id, ada.id, "a1")
        await run.wait_for(lambda: len(runtime.turns) == 1)
        server.post_message(room_b.id, ada.id, "b1")
        await run.wait_for(lambda: run.gateway.stats().queued == 1)
        assert run.gateway.stats().forks_open == 0
        assert len(runtime.turns) == 1  # b1 waits for main
        gates.default_open = True
        gates.release(room_a.id)
        await run.wait_for(lambda: len(runtime.finished) == 2)
    assert [t.session_key for t in runtime.turns] == ["agent:main:parall:default"] * 2


@pytest.mark.asyncio
async def test_backpressure_at_max_forks(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    rooms = direct_chats(server, agent, ada, 4)
    gates = Gates()
    runtime = ScriptedRuntime(gates)
    async with running(server, agent, runtime, max_forks=2) as run:
        for i, room in enumerate(rooms):
            server.post_message(room.id, ada.id, f"m{i}")

            def started(n: int = min(i + 1, 3)) -> bool:  # main, then two forks, then wait
                return len(runtime.turns) == n

            await run.wait_for(started)
        await run.wait_for(lambda: run.gateway.stats().queued == 1)
        assert run.gateway.stats().forks_open == 2  # the cap: the 4th waits for main
        gates.default_open = True
        for room in rooms:
            gates.release(room.id)
        await run.wait_for(lambda: not run.pending() and run.gateway.stats().active_turns == 0)
    assert len(runtime.forked) == 2
    assert runtime.texts()[3] == ["m3"]


@pytest.mark.asyncio
async def test_serial_strategy_never_forks(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    rooms = direct_chats(server, agent, ada, 3)
    gates = Gates()
    runtime = ScriptedRuntime(gates)
    async with running(server, agent, runtime, routing=SerialRoutingStrategy()) as run:
        for room in rooms:
            server.post_message(room.id, ada.id, room.name or "")
        gates.default_open = True
        for room in rooms:
            gates.release(room.id)
        await run.wait_for(lambda: not run.pending())
    assert runtime.forked == []
    assert max(len(set(t.session_key for t in runtime.turns)), 1) == 1


@pytest.mark.asyncio
async def test_a_custom_strategy_sees_the_dispatch_state(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    seen: list[DispatchState] = []

    class AlwaysFork:
        def route(self, event: ParallEvent, state: DispatchState) -> Route:
            seen.append(state)
            return Route.NEW_FORK

    room_a, room_b = direct_chats(server, agent, ada, 2)
    gates = Gates()
    runtime = ScriptedRuntime(gates)
    async with running(server, agent, runtime, routing=AlwaysFork(), max_forks=3) as run:
        await main_on_a_and_fork_on_b(run, ada, room_a, room_b)
        server.post_message(room_a.id, ada.id, "a2")
        await run.wait_for(lambda: len(seen) == 3)
        gates.default_open = True
        gates.release(room_a.id)
        gates.release(room_b.id)
        await run.wait_for(lambda: not run.pending() and run.gateway.stats().active_turns == 0)
    assert seen[0] == DispatchState(max_forks=3)  # idle: the gateway corrects NEW_FORK to MAIN
    assert seen[1].main_busy
    assert seen[1].main_target == room_a.id
    assert seen[2].fork_targets == frozenset({room_b.id})
    assert seen[2].fork_count == 1
    assert runtime.overlaps == []  # a2 was not forked away from a1's target: no overlap
    real = [t for t in runtime.turns if t.event.origin != "synthetic"]
    assert [[e.text for e in t.events] for t in real] == [["a1"], ["b1"], ["a2"]]
    assert real[2].session_key == "agent:main:parall:default"


@pytest.mark.asyncio
async def test_events_of_one_chat_run_in_order_and_never_two_at_once(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    rooms = direct_chats(server, agent, ada, 3)

    async def quick(turn: Turn) -> str | None:
        await asyncio.sleep(0)  # let other events interleave
        return "ok"

    runtime = ScriptedRuntime(quick)
    async with running(server, agent, runtime, max_forks=2) as run:
        for n in range(12):
            for room in rooms:
                server.post_message(room.id, ada.id, f"{room.name}-{n}")
        await run.wait_for(lambda: not run.pending(), timeout=10)
    assert runtime.overlaps == []
    for room in rooms:
        handled = [
            text
            for turn in runtime.turns
            for text in (e.text for e in turn.events)
            if text.startswith(f"{room.name}-")
        ]
        assert handled == [f"{room.name}-{n}" for n in range(12)]


@pytest.mark.asyncio
async def test_an_open_fork_takes_its_chats_events_even_when_main_is_idle(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    room_a, room_b = direct_chats(server, agent, ada, 2)
    gates = Gates()
    runtime = ScriptedRuntime(gates)
    async with running(server, agent, runtime) as run:
        await main_on_a_and_fork_on_b(run, ada, room_a, room_b)
        gates.release(room_a.id)
        await run.wait_for(lambda: not run.gateway.stats().main_busy)
        server.post_message(room_b.id, ada.id, "b2")  # main idle, but b's fork is open
        await run.wait_for(lambda: run.gateway.stats().queued == 1)
        assert len(runtime.turns) == 2  # not run on main beside the fork's turn
        gates.release(room_b.id)
        gates.default_open = True
        await run.wait_for(lambda: not run.pending() and run.gateway.stats().active_turns == 0)
    assert runtime.overlaps == []
    b2_turn = next(t for t in runtime.turns if t.event.text == "b2")
    assert b2_turn.session_key == runtime.forked[0].key


@pytest.mark.asyncio
async def test_fork_results_of_a_failed_main_turn_go_with_the_next_one(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    room_a, room_b = direct_chats(server, agent, ada, 2)
    gates = Gates()
    wake_ups = 0

    async def fail_the_wake_up(turn: Turn) -> str | None:
        nonlocal wake_ups
        if turn.event.origin == "synthetic":
            wake_ups += 1
            raise RuntimeError("the model is down")
        return await gates(turn)

    runtime = ScriptedRuntime(fail_the_wake_up)
    async with running(server, agent, runtime) as run:
        await main_on_a_and_fork_on_b(run, ada, room_a, room_b)
        gates.release(room_a.id)
        await run.wait_for(lambda: len(runtime.finished) == 1)
        gates.release(room_b.id)
        await run.wait_for(lambda: wake_ups == 1 and not run.gateway.stats().main_busy)
        server.post_message(room_a.id, ada.id, "a2")
        await run.wait_for(lambda: runtime.turns[-1].event.text == "a2")
        await run.wait_for(lambda: not run.pending())
    assert wake_ups == 1  # no spinning on a failing runtime
    assert runtime.turns[-1].body.startswith("[Fork result]\n[Handled: message — message from Ada")


@pytest.mark.asyncio
async def test_a_hanging_release_session_is_cancelled_after_its_timeout(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    room_a, room_b = direct_chats(server, agent, ada, 2)
    gates = Gates()
    release_cancelled = asyncio.Event()

    class HangingRelease(ScriptedRuntime):
        async def release_session(self, child: SessionRef, outcome: ForkOutcome) -> None:
            self.released.append((child, outcome))
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                release_cancelled.set()
                raise

    runtime = HangingRelease(gates)
    async with running(server, agent, runtime, hook_timeout=0.2) as run:
        await main_on_a_and_fork_on_b(run, ada, room_a, room_b)
        gates.release(room_b.id)
        await run.wait_for(lambda: release_cancelled.is_set())
        gates.release(room_a.id)
        gates.default_open = True
        await run.wait_for(lambda: not run.pending() and run.gateway.stats().active_turns == 0)
    assert len(runtime.released) == 1
    assert any(t.body.startswith("[Fork result]") for t in runtime.turns)  # still reported
