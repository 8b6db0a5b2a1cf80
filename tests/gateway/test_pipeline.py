"""Pipelined dispatch items: fetched many at once, each chat's in dispatch order, what
waits coalesced; the item pipeline on its own, then through a running gateway."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from parall_bridge import protocol as p
from parall_bridge.gateway.pipeline import ItemPipeline
from parall_bridge.gateway.sources import Gate, ItemOutcome
from parall_bridge.models import Chat, User
from parall_bridge.runtime import Turn
from parall_bridge.testing import AgentAccount, FakeParallServer

from ._harness import ScriptedRuntime, running

# --- the pipeline ---------------------------------------------------------------------------


class Probe:
    """Handlers that wait to be released, recording when they run and submit."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.submitted: list[str] = []
        self.release: dict[str, asyncio.Event] = {}

    def handler(self, name: str) -> Callable[[Gate], Awaitable[ItemOutcome]]:
        event = self.release.setdefault(name, asyncio.Event())

        async def handle(gate: Gate) -> ItemOutcome:
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                await event.wait()  # "the fetch"
                await gate()
                self.submitted.append(name)
                return ItemOutcome.DISPATCHED
            finally:
                self.running -= 1

        return handle


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``predicate`` until it holds (the handlers run on the same loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition still false"
        await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_each_key_submits_in_order_while_fetches_overlap() -> None:
    pipeline = ItemPipeline(4)
    probe = Probe()
    names = ["a1", "b1", "a2", "a3"]
    futures = [pipeline.put(name[0], probe.handler(name), name) for name in names]
    await until(lambda: probe.running == 4)  # every "fetch" in flight at once
    for name in ("a3", "a2", "b1"):  # the fetches end in reverse order
        probe.release[name].set()
    await until(lambda: probe.submitted == ["b1"])  # b is not held up by a
    assert pipeline.pending == 3  # a1 runs; a2 and a3 wait for it
    probe.release["a1"].set()
    assert [await f for f in futures] == [ItemOutcome.DISPATCHED] * 4
    assert probe.submitted == ["b1", "a1", "a2", "a3"]
    assert pipeline.pending == 0
    await pipeline.close()


@pytest.mark.asyncio
async def test_no_more_than_the_concurrency_runs_and_they_start_in_order() -> None:
    pipeline = ItemPipeline(2)
    probe = Probe()
    futures = [pipeline.put(f"k{n}", probe.handler(f"h{n}"), f"h{n}") for n in range(6)]
    await until(lambda: probe.running == 2)
    for n in range(6):
        probe.release[f"h{n}"].set()
    await asyncio.gather(*futures)
    assert probe.most == 2
    assert probe.submitted == [f"h{n}" for n in range(6)]
    await pipeline.close()


@pytest.mark.asyncio
async def test_a_handler_that_raises_leaves_its_item_pending_and_frees_its_chat(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipeline = ItemPipeline(2)

    async def broken(gate: Gate) -> ItemOutcome:
        raise RuntimeError("a bug")

    async def fine(gate: Gate) -> ItemOutcome:
        await gate()
        return ItemOutcome.DISPATCHED

    with caplog.at_level(logging.ERROR, logger="parall_bridge.gateway.pipeline"):
        first = pipeline.put("chat", broken, "dispatch item dsp_1")
        second = pipeline.put("chat", fine, "dispatch item dsp_2")
        assert await first is ItemOutcome.LEFT_PENDING
        assert await second is ItemOutcome.DISPATCHED
    assert "could not handle dispatch item dsp_1" in caplog.text
    await pipeline.close()


@pytest.mark.asyncio
async def test_busy_tells_a_key_with_work_and_close_cancels_what_is_left() -> None:
    pipeline = ItemPipeline(1)
    probe = Probe()
    running_one = pipeline.put("chat", probe.handler("one"), "one")
    waiting = pipeline.put("chat", probe.handler("two"), "two")
    await until(lambda: probe.running == 1)
    assert pipeline.busy("chat")
    assert not pipeline.busy("other")
    await pipeline.close()
    assert running_one.cancelled()
    assert waiting.cancelled()
    assert not pipeline.busy("chat")
    assert probe.submitted == []
    with pytest.raises(RuntimeError, match="closed"):
        pipeline.put("chat", probe.handler("three"), "three")


# --- through a gateway -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_backlog_becomes_a_few_turns_per_chat_in_dispatch_order(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    chats = [server.add_chat(type="direct", members=[ada.id, agent.user_id]) for _ in range(2)]
    posted: dict[str, list[str]] = {chat.id: [] for chat in chats}
    for n in range(30):
        for chat in chats:
            text = f"{chat.id} #{n}"
            server.post_message(chat.id, ada.id, text)
            posted[chat.id].append(text)
    server.delay_next(p.GET_MESSAGE, 0.02, times=60)  # a 20 ms fetch per item

    async def model(turn: Turn) -> str | None:
        await asyncio.sleep(0.05)  # the model's time
        return "ok"

    runtime = ScriptedRuntime(model)
    seen: dict[str, list[str]] = {chat.id: [] for chat in chats}

    def handled() -> int:
        for texts in seen.values():
            texts.clear()
        for turn in runtime.turns:
            for event in turn.events:
                if event.chat_id in seen:  # not the forks' wake-up
                    seen[event.chat_id].append(event.text)
        return sum(len(texts) for texts in seen.values())

    async with running(server, agent, runtime, ready=False) as run:
        await run.wait_for(lambda: handled() == 60 and not run.pending(), 20.0)
    assert seen == posted  # FIFO per chat
    # One fetch at a time handed each item to its lane alone: 60 turns, or nearly. Sixteen
    # at a time fill the lanes while a turn runs, and what waits is coalesced.
    assert len([t for t in runtime.turns if t.chat_id in seen]) <= 12


@pytest.mark.asyncio
async def test_a_dispatch_new_burst_does_not_hold_up_other_chats(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    team = server.add_chat(
        type="group", name="Team", members=[ada.id, agent.user_id], agent_routing_mode="smart"
    )
    server.smart_router = lambda message, agent_id: True  # the platform routes every one
    async with running(server, agent) as run:
        server.delay_next(p.GET_MESSAGE, 1.0, times=5)  # the smart messages' fetches are slow
        for n in range(5):
            server.post_message(team.id, ada.id, f"smart {n}")  # dispatch.new only
        await server.wait_for(lambda: len(server.requests) > 0)
        server.post_message(room.id, ada.id, "direct")  # live
        # The direct message's turn runs while the five fetches are still under way (one
        # dispatch.new handled at a time would hold it up five seconds).
        await run.wait_for(lambda: len(run.runtime.turns) >= 1, 0.9)
        assert run.runtime.texts()[0] == ["direct"]
        await run.wait_for(
            lambda: sum(len(t) for t in run.runtime.texts()) == 6 and not run.pending()
        )
    smart = [text for turn in run.runtime.texts() for text in turn if text.startswith("smart")]
    assert smart == [f"smart {n}" for n in range(5)]


@pytest.mark.asyncio
async def test_a_live_message_waits_for_the_dispatch_items_before_it_in_its_chat(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    team = server.add_chat(
        type="group", name="Team", members=[ada.id, agent.user_id], agent_routing_mode="smart"
    )
    server.smart_router = lambda message, agent_id: "pick me" in message["content"]["text"]
    async with running(server, agent) as run:
        server.delay_next(p.GET_MESSAGE, 0.3)
        server.post_message(team.id, ada.id, "pick me first")  # dispatch.new, a slow fetch
        server.post_message(team.id, ada.id, "@bot then me", mentions=[agent.user_id])  # live
        await run.wait_for(
            lambda: sum(len(t) for t in run.runtime.texts()) == 2 and not run.pending()
        )
    handled = [text for turn in run.runtime.texts() for text in turn]
    assert handled == ["pick me first", "@bot then me"]


@pytest.mark.asyncio
async def test_a_row_listed_again_while_its_ack_is_on_its_way_is_not_acked_twice(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    server.post_message(room.id, ada.id, "waiting for catch-up")
    (row,) = server.dispatch_items(agent.user_id)
    server.delay_next(p.ACK_DISPATCH_BY_ID, 1.0)  # the ack is slow
    async with running(server, agent, ready=False) as run:
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
        # The pass after hello lists the row again before its ack is answered.
        await run.gateway.feed(p.FRAME_RECOVERY_OVERFLOW, {})
        await run.wait_for(lambda: not run.pending())
        passes = len([r for r in server.requests if r.path.endswith("/dispatch")])
        assert passes >= 2
    acks = [r for r in server.requests if r.path.endswith(f"/dispatch/{row.id}/ack")]
    assert len(acks) == 1


@pytest.mark.asyncio
async def test_a_backlog_larger_than_the_ledger_runs_each_event_once_while_acks_lag(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    for n in range(30):
        server.post_message(room.id, ada.id, f"#{n}")
    server.delay_next(p.ACK_DISPATCH_BY_ID, 0.3, times=30)  # acks lag behind the turns
    async with running(server, agent, ready=False, dedupe_capacity=10) as run:
        await run.wait_for(lambda: len(run.runtime.turns) >= 1)
        await run.gateway.feed(p.FRAME_RECOVERY_OVERFLOW, {})  # a pass while acks lag
        await run.wait_for(lambda: not run.pending(), 15.0)
    handled = [text for turn in run.runtime.texts() for text in turn]
    # Records whose acks were still on their way were kept past dedupe_capacity: the
    # pass that listed their rows again ran none of them a second time.
    assert handled == [f"#{n}" for n in range(30)]
