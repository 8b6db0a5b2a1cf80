"""Restarts with a store that outlives the gateway (DESIGN.md section 8; the state issue,
section 3): acks owed are sent without a turn, interrupted turns run again first with
their reply keys, the cold-start rule measures from when the previous run last heard
from the platform, and a store serves one gateway at a time.

These restart in-process with a :class:`MemoryStateStore` given to two gateways one
after the other (a graceful stop); ``test_crash.py`` kills a gateway process instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from parall_bridge import StateStoreError, StepType
from parall_bridge import protocol as p
from parall_bridge.models import AgentSessionStatus, Chat, User
from parall_bridge.runtime import Turn
from parall_bridge.state import MemoryStateStore, StateBatch, StoreIdentity, StoreMeta
from parall_bridge.testing import AgentAccount, FakeParallServer

from ._harness import Gate, ScriptedRuntime, running


async def reply(turn: Turn) -> str | None:
    """Reply once, naming the turn's last event."""
    await turn.send_message(f"re {turn.event.text}")
    return "ok"


def replies(server: FakeParallServer, agent: AgentAccount, chat: Chat) -> list[str]:
    return [m.content.text for m in server.messages(chat.id) if m.sender_id == agent.user_id]  # type: ignore[union-attr]


async def seed_meta(
    server: FakeParallServer, agent: AgentAccount, meta: StoreMeta
) -> MemoryStateStore:
    """A store that holds ``meta``, as a previous run of this agent left it."""
    store = MemoryStateStore()
    await store.open()
    await store.load(StoreIdentity(server.url, server.org_id, agent.user_id))
    await store.write(StateBatch(meta=meta))
    await store.release()
    return store


@pytest.mark.asyncio
async def test_an_ack_lost_to_a_fault_is_sent_at_the_next_start_without_a_second_turn(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    store = MemoryStateStore()
    server.fail_next(p.ACK_DISPATCH, status=503, times=1000)
    server.fail_next(p.ACK_DISPATCH_BY_ID, status=503, times=1000)
    first = ScriptedRuntime(reply)
    async with running(server, agent, first, store=store) as run:
        message = server.post_message(room.id, ada.id, "hello")
        await run.wait_for(lambda: run.gateway.stats().acks_failed >= 1)
        assert run.gateway.stats().ledger["done"] == 1  # settled, its ack owed
    assert run.pending() == [message.id]
    server.faults.clear()
    second = ScriptedRuntime(reply)
    async with running(server, agent, second, store=store) as run:
        await run.wait_for(lambda: not run.pending())
        assert run.gateway.stats().ledger["acked"] == 1
    assert second.turns == []
    assert replies(server, agent, room) == ["re hello"]


@pytest.mark.asyncio
async def test_a_turn_interrupted_by_shutdown_runs_again_first_with_its_reply_keys(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """The turn replied, then shutdown cancelled it before it completed: the next start
    runs it again before anything else, as the same turn (same id, same reply key), so
    the human sees one reply."""
    store = MemoryStateStore()
    gate = Gate()

    async def reply_then_hang(turn: Turn) -> str | None:
        await turn.send_message(f"re {turn.event.text}")
        return await gate(turn)

    first = ScriptedRuntime(reply_then_hang)
    async with running(server, agent, first, store=store, shutdown_grace=0.1) as run:
        server.post_message(room.id, ada.id, "one")
        await run.wait_for(lambda: replies(server, agent, room) == ["re one"])
    assert first.finished
    assert run.gateway.stats().turns_cancelled == 1
    server.post_message(room.id, ada.id, "two")  # while the gateway is down
    second = ScriptedRuntime(reply)
    async with running(server, agent, second, store=store) as run:
        await run.wait_for(lambda: not run.pending() and len(second.finished) == 2)
    assert second.texts() == [["one"], ["two"]]
    assert second.turns[0].turn_id == first.turns[0].turn_id
    assert replies(server, agent, room) == ["re one", "re two"]


@pytest.mark.asyncio
async def test_events_queued_at_shutdown_run_at_the_next_start(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    store = MemoryStateStore()
    first = ScriptedRuntime(Gate())
    async with running(server, agent, first, store=store, shutdown_grace=0.1) as run:
        server.post_message(room.id, ada.id, "one")
        await run.wait_for(lambda: len(first.turns) == 1)
        server.post_message(room.id, ada.id, "two")
        server.post_message(room.id, ada.id, "three")
        await run.wait_for(lambda: run.gateway.stats().queued == 2)
    assert run.gateway.stats().ledger["failed"] == 3  # nothing ran to its end, none lost
    second = ScriptedRuntime(reply)
    async with running(server, agent, second, store=store) as run:
        await run.wait_for(lambda: not run.pending() and len(second.finished) == 2)
    assert second.texts() == [["one"], ["two", "three"]]
    assert replies(server, agent, room) == ["re one", "re three"]


@pytest.mark.asyncio
async def test_a_failed_turn_that_replied_runs_again_as_the_same_turn(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """A turn that sent its reply and then raised is retried with exactly the same events
    (even when more of the chat arrived meanwhile), so the retry's reply is the same
    message, not a second one."""
    failures: list[str] = []

    async def reply_then_fail_once(turn: Turn) -> str | None:
        await turn.send_message(f"re {turn.event.text}")
        if not failures:
            failures.append(turn.turn_id)
            raise RuntimeError("the model crashed after replying")
        return "ok"

    runtime = ScriptedRuntime(reply_then_fail_once)
    async with running(server, agent, runtime, reconcile_interval=0.2) as run:
        server.post_message(room.id, ada.id, "one")
        await run.wait_for(lambda: run.gateway.stats().turns_failed == 1)
        server.post_message(room.id, ada.id, "two")
        await run.wait_for(lambda: not run.pending() and run.gateway.stats().turns_succeeded == 2)
    assert runtime.texts() == [["one"], ["two"], ["one"]]
    assert runtime.turns[2].turn_id == failures[0]
    assert sorted(replies(server, agent, room)) == ["re one", "re two"]


@pytest.mark.asyncio
async def test_cold_start_measures_age_from_when_the_previous_run_last_heard(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The previous run last heard from the platform 10 minutes ago. What arrived while it
    was down is run, however old; only what had already waited longer than the window
    when it last heard is skipped, logged with the count and the oldest age, and counted."""
    store = await seed_meta(server, agent, StoreMeta(last_heard_at=time.time() - 600))
    server.post_message(room.id, ada.id, "stale")
    server.age_dispatch_items(1000)  # 1,000 s old: waited 400 s past the window already
    server.post_message(room.id, ada.id, "while down")
    server.age_dispatch_items(480)  # 480 s old: came while the gateway was down
    runtime = ScriptedRuntime()
    caplog.set_level(logging.WARNING, logger="parall_bridge")
    async with running(server, agent, runtime, store=store, cold_start_window=300.0) as run:
        await run.wait_for(lambda: not run.pending())
        assert run.gateway.stats().cold_start_skipped == 1
    assert runtime.texts() == [["while down"]]
    (warning,) = [r for r in caplog.records if "cold start" in r.getMessage()]
    assert "acked 1 dispatch item(s)" in warning.getMessage()
    assert "the oldest 1480 s old" in warning.getMessage()


@pytest.mark.asyncio
async def test_cold_start_never_skips_a_source_the_store_knows(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    store = MemoryStateStore()

    async def fail(turn: Turn) -> str | None:
        raise RuntimeError("down")

    async with running(
        server, agent, ScriptedRuntime(fail), store=store, reconcile_interval=0.5
    ) as run:
        server.post_message(room.id, ada.id, "retry me")
        await run.wait_for(lambda: run.gateway.stats().turns_failed == 1)
    server.age_dispatch_items(3600)  # its retry time (0.5 s after the failure) survives too
    runtime = ScriptedRuntime()
    async with running(
        server, agent, runtime, store=store, cold_start_window=60.0, reconcile_interval=0.05
    ) as run:
        await run.wait_for(lambda: not run.pending())
        assert run.gateway.stats().cold_start_skipped == 0
    assert runtime.texts() == [["retry me"]]


@pytest.mark.asyncio
async def test_cold_start_without_a_previous_run_is_measured_from_now(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    server.post_message(room.id, ada.id, "old")
    server.age_dispatch_items(600)
    server.post_message(room.id, ada.id, "new")
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime, cold_start_window=300.0) as run:
        await run.wait_for(lambda: not run.pending())
        assert run.gateway.stats().cold_start_skipped == 1
    assert runtime.texts() == [["new"]]


@pytest.mark.asyncio
async def test_two_agents_mentioned_in_one_message_both_reply(
    server: FakeParallServer, ada: User
) -> None:
    """Reply keys carry the agent's id: the platform scopes idempotency keys to the org,
    so two agents answering one message must not collide (one reply would be dropped)."""
    bots = [server.add_agent(f"Bot {i}") for i in (1, 2)]
    group = server.add_chat(
        type="group", name="Team", members=[ada.id, *(bot.user_id for bot in bots)]
    )
    runtimes = [ScriptedRuntime(reply), ScriptedRuntime(reply)]
    async with (
        running(server, bots[0], runtimes[0]) as one,
        running(server, bots[1], runtimes[1]) as two,
    ):
        server.post_message(group.id, ada.id, "hi both", mentions=[b.user_id for b in bots])
        await one.wait_for(lambda: not one.pending() and not two.pending())
    senders = sorted(m.sender_id for m in server.messages(group.id) if m.sender_id != ada.id)
    assert senders == sorted(bot.user_id for bot in bots)


@pytest.mark.asyncio
async def test_a_restart_completes_the_session_a_crashed_run_left_open(
    server: FakeParallServer, agent: AgentAccount, client: object
) -> None:
    """A run that crashed never marked its agent session completed; the next start does,
    with an error step saying the run was interrupted."""
    from parall_bridge import ParallClient

    assert isinstance(client, ParallClient)
    old = await client.create_agent_session(
        server.org_id, agent.user_id, runtime_type="parall_bridge", runtime_key="k"
    )
    await client.update_agent_session(
        server.org_id, agent.user_id, old.id, status=AgentSessionStatus.ACTIVE
    )
    store = await seed_meta(server, agent, StoreMeta(session_id=old.id))
    async with running(server, agent, store=store) as run:
        new_session = run.gateway.session_id
    statuses = {s.id: s.status for s in server.sessions(agent.user_id)}
    assert statuses[old.id] == AgentSessionStatus.COMPLETED
    assert statuses[new_session or ""] == AgentSessionStatus.COMPLETED
    (error,) = [s for s in server.steps(agent.user_id, old.id) if s.step_type == StepType.ERROR]
    assert "interrupted" in error.content["message"]
    # A graceful stop leaves nothing to complete at the next start.
    async with running(server, agent, store=store):
        pass
    assert [
        s for s in server.steps(agent.user_id, new_session) if s.step_type == StepType.ERROR
    ] == []


@pytest.mark.asyncio
async def test_one_store_serves_one_gateway_at_a_time(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    store = MemoryStateStore()
    async with running(server, agent, store=store) as run:
        other = ScriptedRuntime()
        with pytest.raises(StateStoreError, match="in use by another gateway"):
            async with running(server, agent, other, store=store):
                pass
        assert run.gateway.stats().connection == "connected"
    assert store.is_open  # given, so left open


@pytest.mark.asyncio
async def test_a_store_refuses_another_agent(server: FakeParallServer, agent: AgentAccount) -> None:
    store = MemoryStateStore()
    async with running(server, agent, store=store):
        pass
    other = server.add_agent("Other bot")
    with pytest.raises(StateStoreError, match="belongs to"):
        async with running(server, other, store=store):
            pass


@pytest.mark.asyncio
async def test_the_ledger_is_written_to_the_store_as_it_goes(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """A running gateway's state is in its store, not only at shutdown."""
    store = MemoryStateStore()
    async with running(server, agent, ScriptedRuntime(reply), store=store) as run:
        message = server.post_message(room.id, ada.id, "hello")
        await run.wait_for(lambda: not run.pending())

        async def acked_in_store() -> bool:
            state = await store._load(StoreIdentity(server.url, server.org_id, agent.user_id))
            return any(row.key == message.id and row.state == "acked" for row in state.sources)

        deadline = asyncio.get_running_loop().time() + 5
        while not await acked_in_store():
            assert asyncio.get_running_loop().time() < deadline, "never written"
            await asyncio.sleep(0.01)  # polling the store, not waiting blind
        assert run.gateway.stats().store_writes >= 1


@pytest.mark.asyncio
async def test_the_next_start_resumes_the_websocket_from_the_stored_last_seq(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """A restarted process resumes the event stream where the previous one stopped: the
    platform replays only what came after (and catch-up covers the rest)."""
    store = MemoryStateStore()
    async with running(server, agent, ScriptedRuntime(reply), store=store) as run:
        server.post_message(room.id, ada.id, "one")
        await run.wait_for(lambda: not run.pending())
        assert run.gateway.ws is not None
        last_seq = run.gateway.ws.last_seq
    assert last_seq > 0
    assert server.ws_connections[-1].last_seq is None  # a first start: no resume
    server.post_message(room.id, ada.id, "two")  # while down: replayed on resume
    second = ScriptedRuntime(reply)
    async with running(server, agent, second, store=store) as run:
        await run.wait_for(lambda: not run.pending())
    assert server.ws_connections[-1].last_seq == last_seq
    assert second.texts() == [["two"]]


@pytest.mark.asyncio
async def test_a_state_path_store_is_the_gateways_own(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat, tmp_path: Path
) -> None:
    """``state_path`` makes a SQLite store the gateway opens, holds for its life (a second
    gateway on the file fails at start, naming the file and the account) and closes."""
    path = tmp_path / "state.db"
    async with running(server, agent, ScriptedRuntime(reply), state_path=str(path)) as run:
        assert run.gateway.stats().store == str(path)
        with pytest.raises(StateStoreError) as refused:
            async with running(server, agent, state_path=str(path), account_id="second"):
                pass
        assert str(path) in str(refused.value)
        assert "account 'second'" in str(refused.value)
        server.post_message(room.id, ada.id, "hello")
        await run.wait_for(lambda: not run.pending())
    assert not run.gateway.store.is_open  # closed: its lock released
    again = ScriptedRuntime(reply)
    async with running(server, agent, again, state_path=str(path)) as run:
        assert run.gateway.stats().ledger["acked"] == 1  # what the first run settled
    assert again.turns == []
