"""Dispatch semantics: which events create items, and the dispatch endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import pytest

from parall_bridge.models import DispatchItem, DispatchStatus
from parall_bridge.protocol import (
    ACK_DISPATCH,
    ACK_DISPATCH_BY_ID,
    LIST_DISPATCH,
    MARK_DISPATCH_RECEIVED,
    SEND_MESSAGE,
    UPDATE_TASK,
)
from parall_bridge.testing import AgentAccount, FakeParallServer

from ._helpers import Api, nothing_arrives, receive

ApiFactory = Callable[[str | None], Api]


def reasons(server: FakeParallServer, agent: AgentAccount) -> list[str | None]:
    return [item.delivery_reason for item in server.dispatch_items(agent.user_id)]


@pytest.mark.asyncio
async def test_direct_chat_routes_every_message(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id, agent.user_id])
    message = parall_server.post_message(chat.id, human.id, "hi")

    [item] = parall_server.dispatch_items(agent.user_id)
    assert isinstance(item, DispatchItem)
    assert (item.event_type, item.source_type, item.source_id, item.chat_id, item.task_id) == (
        "message",
        "message",
        message.id,
        chat.id,
        None,
    )
    assert (item.status, item.delivery_reason) == (DispatchStatus.PENDING, "direct")
    listed = await api(agent.api_key).ok(LIST_DISPATCH)
    assert listed["data"] == [
        {
            "id": item.id,
            "event_type": "message",
            "source_type": "message",
            "source_id": message.id,
            "chat_id": chat.id,
            "status": "pending",
            "delivery_reason": "direct",
            "created_at": listed["data"][0]["created_at"],
        }
    ]
    assert item.id.startswith("dsp_")
    # The agent's own message creates nothing for it.
    parall_server.post_message(chat.id, agent.user_id, "reply")
    assert len(parall_server.dispatch_items(agent.user_id)) == 1


@pytest.mark.asyncio
async def test_group_routing_modes(parall_server: FakeParallServer) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    members = [human.id, agent.user_id]
    passive = parall_server.add_chat(type="group", members=members)
    explicit_passive = parall_server.add_chat(
        type="group", members=members, agent_routing_mode="passive"
    )
    active = parall_server.add_chat(type="group", members=members, agent_routing_mode="active")

    for chat in (passive, explicit_passive):
        parall_server.post_message(chat.id, human.id, "chatter")
        assert reasons(parall_server, agent) == []
    parall_server.post_message(passive.id, human.id, "@bot", mentions=[agent.user_id])
    parall_server.post_message(passive.id, human.id, "@all", mentions=["usr_all"])
    parall_server.post_message(passive.id, human.id, "@ada", mentions=[human.id])
    assert reasons(parall_server, agent) == ["mention", "mention"]
    parall_server.post_message(active.id, human.id, "anything")
    assert reasons(parall_server, agent) == ["mention", "mention", "active"]


@pytest.mark.asyncio
async def test_smart_mode_asks_the_router(parall_server: FakeParallServer) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(
        type="group", members=[human.id, agent.user_id], agent_routing_mode="smart"
    )
    seen: list[tuple[str, str]] = []

    def router(message: Mapping[str, Any], agent_id: str) -> bool:
        seen.append((message["content"]["text"], agent_id))
        return "deploy" in message["content"]["text"]

    parall_server.post_message(chat.id, human.id, "default router routes everything")
    parall_server.smart_router = router
    assert parall_server.smart_router is router
    parall_server.post_message(chat.id, human.id, "lunch?")
    parall_server.post_message(chat.id, human.id, "deploy now")
    parall_server.post_message(chat.id, human.id, "@bot", mentions=[agent.user_id])
    assert reasons(parall_server, agent) == ["smart", "smart", "mention"]
    assert seen == [("lunch?", agent.user_id), ("deploy now", agent.user_id)]


@pytest.mark.asyncio
async def test_only_text_and_file_messages_are_routed(parall_server: FakeParallServer) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id, agent.user_id])
    parall_server.post_message(
        chat.id, human.id, message_type="system", content={"event": "joined"}
    )
    assert reasons(parall_server, agent) == []
    parall_server.post_file(
        chat.id, human.id, b"x", file_name="x.bin", mime_type="application/octet-stream"
    )
    assert reasons(parall_server, agent) == ["direct"]


@pytest.mark.asyncio
async def test_rest_send_routes_to_other_agents_only(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    sender = parall_server.add_agent("A")
    listener = parall_server.add_agent("B")
    chat = parall_server.add_chat(
        type="group", members=[sender.user_id, listener.user_id], agent_routing_mode="active"
    )
    body = {"message_type": "text", "content": {"text": "hi"}}
    sent = await api(sender.api_key).ok(SEND_MESSAGE, chat_id=chat.id, body=body)
    assert parall_server.dispatch_items(sender.user_id) == []
    [item] = parall_server.dispatch_items(listener.user_id)
    assert (item.source_id, item.delivery_reason) == (sent["id"], "active")


@pytest.mark.asyncio
async def test_task_assignment_and_reassignment(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    first = parall_server.add_agent("A")
    second = parall_server.add_agent("B")
    human = parall_server.add_user("Ada")
    ws = await api(second.api_key).open_ws()

    task = parall_server.assign_task("Fix it", assignee_id=first.user_id, creator_id=human.id)
    [item] = parall_server.dispatch_items(first.user_id)
    assert (item.event_type, item.source_type, item.source_id, item.task_id, item.chat_id) == (
        "task_assign",
        "task_activity",
        task.id,
        task.id,
        None,
    )
    # Reassigning through the helper...
    parall_server.assign_task(
        "Fix it", assignee_id=second.user_id, creator_id=human.id, task_id=task.id
    )
    assert parall_server.get_task(task.id).assignee_id == second.user_id
    assigned = await receive(ws)
    assert (assigned["type"], assigned["data"]["id"], assigned["data"]["assignee_id"]) == (
        "task.assigned",
        task.id,
        second.user_id,
    )
    dispatch_new = await receive(ws)
    assert dispatch_new["type"] == "dispatch.new"
    assert dispatch_new["data"]["task_id"] == task.id
    # ... and through PATCH.
    await api(second.api_key).ok(UPDATE_TASK, task_id=task.id, body={"assignee_id": first.user_id})
    assert [i.task_id for i in parall_server.dispatch_items(first.user_id)] == [task.id, task.id]
    # A change that keeps the assignee announces nothing; neither does clearing it.
    parall_server.update_task(task.id, title="Fix it now")
    parall_server.update_task(task.id, assignee_id=None)
    assert len(parall_server.dispatch_items(first.user_id)) == 2
    assert len(parall_server.dispatch_items(second.user_id)) == 1
    # A human assignee gets task.assigned but no dispatch item.
    parall_server.update_task(task.id, assignee_id=human.id)
    assert parall_server.dispatch_items(human.id) == []
    await ws.close()


@pytest.mark.asyncio
async def test_ack_by_source_and_by_id(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    other = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id, agent.user_id, other.user_id])
    m1 = parall_server.post_message(chat.id, human.id, "one")
    m2 = parall_server.post_message(chat.id, human.id, "two")
    task = parall_server.assign_task("T", assignee_id=agent.user_id, creator_id=human.id)
    parall_server.assign_task("T", assignee_id=agent.user_id, creator_id=human.id, task_id=task.id)
    client = api(agent.api_key)

    by_source = {"source_type": "task_activity", "source_id": task.id}
    assert await client.ok(ACK_DISPATCH, body=by_source) == {"acked": 2}
    assert await client.ok(ACK_DISPATCH, body=by_source) == {"acked": 0}
    listed = (await client.ok(LIST_DISPATCH))["data"]
    assert [i["source_id"] for i in listed] == [m1.id, m2.id]

    first_id = listed[0]["id"]
    assert await client.ok(ACK_DISPATCH_BY_ID, dispatch_id=first_id) == {"acked": 1}
    assert await client.ok(ACK_DISPATCH_BY_ID, dispatch_id=first_id) == {"acked": 1}
    reply = await client.call(ACK_DISPATCH_BY_ID, dispatch_id="dsp_unknown")
    assert reply.status == 404
    # Another agent's item is not this agent's to ack.
    other_item = parall_server.dispatch_items(other.user_id)[0]
    assert (await client.call(ACK_DISPATCH_BY_ID, dispatch_id=other_item.id)).status == 404

    assert [i["source_id"] for i in (await client.ok(LIST_DISPATCH))["data"]] == [m2.id]
    everything = parall_server.dispatch_items(agent.user_id, include_acked=True)
    assert [i.status for i in everything] == ["acked", "pending", "acked", "acked"]
    assert len(parall_server.dispatch_items(other.user_id)) == 2

    for bad in ({"source_type": "chat", "source_id": m2.id}, {"source_type": "message"}, None):
        reply = await client.call(ACK_DISPATCH, body=bad)
        assert reply.status == 400, reply.text


@pytest.mark.asyncio
async def test_mark_received_keeps_items_listed(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id, agent.user_id])
    message = parall_server.post_message(chat.id, human.id, "hi")
    client = api(agent.api_key)
    source = {"source_type": "message", "source_id": message.id}

    assert await client.ok(MARK_DISPATCH_RECEIVED, body=source) == {"received": 1}
    [listed] = (await client.ok(LIST_DISPATCH))["data"]
    assert listed["status"] == "received"
    assert await client.ok(ACK_DISPATCH, body=source) == {"acked": 1}
    assert (await client.ok(LIST_DISPATCH))["data"] == []
    assert await client.ok(MARK_DISPATCH_RECEIVED, body=source) == {"received": 0}
    reply = await client.call(
        MARK_DISPATCH_RECEIVED, body={"source_type": "nope", "source_id": "x"}
    )
    assert reply.status == 400


@pytest.mark.asyncio
async def test_dispatch_list_is_fifo_and_paged(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id, agent.user_id])
    messages = [parall_server.post_message(chat.id, human.id, str(i)) for i in range(5)]
    client = api(agent.api_key)

    page = await client.ok(LIST_DISPATCH, params={"limit": "2"})
    assert [i["source_id"] for i in page["data"]] == [m.id for m in messages[:2]]
    # Acking what was read does not make the next page skip anything.
    for item in page["data"]:
        await client.ok(ACK_DISPATCH_BY_ID, dispatch_id=item["id"])
    page = await client.ok(LIST_DISPATCH, params={"limit": "2", "cursor": page["next_cursor"]})
    assert [i["source_id"] for i in page["data"]] == [m.id for m in messages[2:4]]
    page = await client.ok(LIST_DISPATCH, params={"limit": "2", "cursor": page["next_cursor"]})
    assert [i["source_id"] for i in page["data"]] == [messages[4].id]
    assert page["has_more"] is False

    before = parall_server.dispatch_items(agent.user_id)[0].created_at
    parall_server.age_dispatch_items(600, agent_id=agent.user_id)
    after = parall_server.dispatch_items(agent.user_id)[0].created_at
    assert before is not None
    assert after is not None
    assert (before - after).total_seconds() == pytest.approx(600, abs=0.002)


@pytest.mark.asyncio
async def test_dispatch_new_follows_the_live_event(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id, agent.user_id])
    ws = await api(agent.api_key).open_ws()
    message = parall_server.post_message(chat.id, human.id, "hi")
    live = await receive(ws)
    announced = await receive(ws)
    assert (live["type"], live["data"]["id"]) == ("message.new", message.id)
    assert announced["type"] == "dispatch.new"
    assert announced["seq"] == live["seq"] + 1
    [item] = parall_server.dispatch_items(agent.user_id)
    assert announced["data"]["id"] == item.id
    assert announced["data"]["source_id"] == message.id
    await ws.close()


@pytest.mark.asyncio
async def test_dispatch_delay(http: aiohttp.ClientSession) -> None:
    async with FakeParallServer(dispatch_delay=0.1) as server:
        agent = server.add_agent()
        human = server.add_user("Ada")
        chat = server.add_chat(members=[human.id, agent.user_id])
        ws = await Api(server, http, agent.api_key).open_ws()
        loop = asyncio.get_running_loop()
        posted_at = loop.time()
        message = server.post_message(chat.id, human.id, "hi")
        assert server.dispatch_items(agent.user_id) == []
        live = await receive(ws)
        assert live["type"] == "message.new"
        announced = await receive(ws)
        assert announced["type"] == "dispatch.new"
        assert loop.time() - posted_at >= 0.1
        assert announced["data"]["source_id"] == message.id
        assert len(server.dispatch_items(agent.user_id)) == 1
        # A delayed item still pending at close is cancelled cleanly.
        server.post_message(chat.id, human.id, "again")
        await receive(ws)
        await ws.close()


@pytest.mark.asyncio
async def test_events_are_numbered_while_offline(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id, agent.user_id])
    parall_server.post_message(chat.id, human.id, "while away")
    ws = await api(agent.api_key).open_ws()
    await nothing_arrives(ws)  # no last_seq: no replay
    await ws.close()
    ws = await api(agent.api_key).open_ws(last_seq=0)
    await nothing_arrives(ws)
    await ws.close()
