"""Gateway edge cases found in review: a first connection closed before hello, a newer
task assignment found by catch-up, a host's own CancelledError, and a live message whose
catch-up fetch fails. Each test fails on the code as it was before its fix."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from parall_bridge import DispatchItem, EventOrigin
from parall_bridge import protocol as p
from parall_bridge.gateway.sources import ItemOutcome, Sources
from parall_bridge.runtime import Turn
from parall_bridge.testing import AgentAccount, FakeParallServer
from parall_bridge.ws import ConnectionState

from ._harness import ScriptedRuntime, running


@pytest.mark.asyncio
async def test_gateway_retries_a_first_connection_closed_before_hello(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    """PROTOCOL.md: 1001/1011/1012/1013 -> reconnect, only 4003 is fatal; issue 8: "a
    transient platform outage at start is retried, not fatal"."""
    server.go_silent()  # the upgrade succeeds, then no hello yet
    async with running(server, agent, ready=False) as run:
        await run.wait_for(lambda: any(c.ticket_ok for c in server.ws_connections))
        server.go_silent(False)
        await server.close_ws(p.CLOSE_TRY_AGAIN_LATER, "try again later")
        await asyncio.wait_for(run.gateway.wait_ready(), 5.0)
        assert run.gateway.stats().connection == ConnectionState.CONNECTED.value


@pytest.mark.asyncio
async def test_catch_up_runs_a_newer_task_assignment_while_the_older_one_runs() -> None:
    """DESIGN.md 3: "task dispatches dedupe on (task id, updated_at)" (the seed's catch-up
    fetches the task and dispatches a version it has not seen)."""
    async with FakeParallServer(replay_buffer_size=0) as server:
        agent = server.add_agent("Bot", api_key="pk_test_secret_key_0123456789")
        ada = server.add_user("Ada")
        room = server.add_chat(type="direct", members=[ada.id, agent.user_id])
        gate = asyncio.Event()
        gated: list[Turn] = []

        async def behaviour(turn: Turn) -> str | None:
            if not gated:
                gated.append(turn)
                await gate.wait()
            return "ok"

        runtime = ScriptedRuntime(behaviour)
        async with running(server, agent, runtime) as run:
            task = server.assign_task("Write", assignee_id=agent.user_id, creator_id=ada.id)
            await run.wait_for(lambda: len(runtime.turns) == 1)
            await server.close_ws(p.CLOSE_SERVICE_RESTART)
            # While the WebSocket is down (and nothing can be replayed) the task is
            # assigned again and a message follows: only catch-up brings them, in order.
            v2 = server.assign_task(
                "Write", assignee_id=agent.user_id, creator_id=ada.id, task_id=task.id
            )
            later = server.post_message(room.id, ada.id, "after the reassignment")
            await run.wait_for(
                lambda: any(r.path.endswith(f"/messages/{later.id}") for r in server.requests)
            )  # catch-up (FIFO) got past the task's new row
            gate.set()
            await run.wait_for(
                lambda: any(t.event.updated_at == v2.updated_at for t in runtime.finished),
                timeout=3.0,
            )
        assert v2.updated_at != task.updated_at
        assert not run.pending()


@pytest.mark.asyncio
async def test_a_turn_raising_cancelled_error_by_itself_does_not_stall_the_lane(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    """DESIGN.md 4: "a turn that raises is a failed dispatch ... the gateway keeps running";
    only cancellations by shutdown or the turn timeout are cancellations."""
    ada = server.add_user("Ada")
    room = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    gate = asyncio.Event()

    async def behaviour(turn: Turn) -> str | None:
        if turn.event.text == "first":
            await gate.wait()
            # The host awaited an inner task it cancelled itself (a "stop" button):
            # the CancelledError escapes run_turn, but nobody cancelled the turn.
            inner = asyncio.get_running_loop().create_task(asyncio.sleep(10))
            inner.cancel()
            await inner
        return "ok"

    runtime = ScriptedRuntime(behaviour)
    async with running(server, agent, runtime) as run:
        server.post_message(room.id, ada.id, "first")
        await run.wait_for(lambda: len(runtime.turns) == 1)
        server.post_message(room.id, ada.id, "second")
        await run.wait_for(lambda: run.gateway.stats().queued == 1)
        gate.set()
        await run.wait_for(lambda: any(t.event.text == "second" for t in runtime.finished))


@pytest.mark.asyncio
async def test_a_live_message_is_not_dropped_while_a_catch_up_fetch_of_it_fails(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    """DESIGN.md 6.15: an item whose source is not taken is dispatched at once; the live
    event was in hand, yet it waits up to ``reconcile_interval`` (60 s by default)."""
    ada = server.add_user("Ada")
    room = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime) as run:  # reconcile_interval=30
        server.delay_ws_frames(0.5)  # the live frames come a little late
        message = server.post_message(room.id, ada.id, "hello")
        # The catch-up's fetch of the message is slow, then fails (a transient outage).
        server.fail_next(p.GET_MESSAGE, status=429, retry_after=1.0)
        server.fail_next(p.GET_MESSAGE, status=503, times=3)
        await run.gateway.feed(p.FRAME_RECOVERY_OVERFLOW, {})  # a catch-up now
        await run.wait_for(
            lambda: len([r for r in server.requests if r.path.endswith(message.id)]) >= 4
        )  # the fetch gave up; meanwhile message.new and dispatch.new were delivered
        server.delay_ws_frames(None)
        await run.wait_for(lambda: len(runtime.finished) == 1, timeout=3.0)


@pytest.mark.asyncio
async def test_an_unexpected_error_on_one_item_does_not_stop_catch_up(
    server: FakeParallServer, agent: AgentAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug met while handling one dispatch item (stood in for by an exception injected
    into the item handler) leaves that item pending; the rest of the pass and every later
    pass still run."""
    ada = server.add_user("Ada")
    room = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    first = server.post_message(room.id, ada.id, "first")
    server.post_message(room.id, ada.id, "second")  # both wait for catch-up
    original = Sources.on_item
    broken = [first.id]

    async def on_item(
        self: Sources, item: DispatchItem, origin: EventOrigin, cutoff: datetime | None = None
    ) -> ItemOutcome:
        if item.source_id in broken:
            broken.clear()
            raise RuntimeError("a bug")
        return await original(self, item, origin, cutoff)

    monkeypatch.setattr(Sources, "on_item", on_item)
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime) as run:
        await run.wait_for(lambda: runtime.texts() == [["second"]])
        await run.gateway.feed(p.FRAME_RECOVERY_OVERFLOW, {})  # the next pass
        await run.wait_for(lambda: runtime.texts() == [["second"], ["first"]])
        assert not run.pending()
