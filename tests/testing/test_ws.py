"""The emulator's WebSocket side, with a raw aiohttp client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import aiohttp
import pytest

from parall_bridge.protocol import ME, WS_TICKET
from parall_bridge.testing import AgentAccount, FakeParallServer

from ._helpers import Api, nothing_arrives, receive, receive_close

ApiFactory = Callable[[str | None], Api]


def seed(server: FakeParallServer) -> tuple[AgentAccount, str, str]:
    """An agent, a human, and their direct chat."""
    agent = server.add_agent("Bot")
    human = server.add_user("Ada")
    chat = server.add_chat(members=[human.id, agent.user_id])
    return agent, human.id, chat.id


async def connect_raw(
    http: aiohttp.ClientSession, ticket: dict[str, str], **params: str
) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(
        ticket["ws_url"], params={"ticket": ticket["ticket"], **params}, autoping=False
    )


@pytest.mark.asyncio
async def test_hello_and_connection_record(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent, _, _ = seed(parall_server)
    ws = await api(agent.api_key).connect()
    hello = await receive(ws)
    assert hello == {
        "type": "hello",
        "data": {"session_id": hello["data"]["session_id"], "heartbeat_interval": 30.0},
    }
    assert hello["data"]["session_id"].startswith("wss_")
    [record] = parall_server.ws_connections
    assert (record.user_id, record.last_seq, record.ticket_ok, record.closed_code) == (
        agent.user_id,
        None,
        True,
        None,
    )
    assert record.session_id == hello["data"]["session_id"]
    await ws.close()
    await parall_server.wait_for(lambda: record.closed_code == 1000)


@pytest.mark.asyncio
async def test_heartbeat_interval_setting(http: aiohttp.ClientSession) -> None:
    async with FakeParallServer(heartbeat_interval=0.5) as server:
        agent, _, _ = seed(server)
        ws = await Api(server, http, agent.api_key).connect()
        assert (await receive(ws))["data"]["heartbeat_interval"] == 0.5
        await ws.close()


@pytest.mark.asyncio
async def test_ticket_is_single_use(
    parall_server: FakeParallServer, api: ApiFactory, http: aiohttp.ClientSession
) -> None:
    agent, _, _ = seed(parall_server)
    ticket = await api(agent.api_key).ok(WS_TICKET, body={})
    first = await connect_raw(http, ticket)
    assert (await receive(first))["type"] == "hello"
    second = await connect_raw(http, ticket)
    assert await receive_close(second) == 4001
    bogus = await connect_raw(http, {**ticket, "ticket": "wst_bogus"})
    assert await receive_close(bogus) == 4001
    no_ticket = await http.ws_connect(ticket["ws_url"])
    assert await receive_close(no_ticket) == 4001
    records = parall_server.ws_connections
    assert [(r.ticket_ok, r.closed_code) for r in records[1:]] == [(False, 4001)] * 3
    assert records[1].user_id is None
    await first.close()


@pytest.mark.asyncio
async def test_expired_ticket(http: aiohttp.ClientSession) -> None:
    async with FakeParallServer(ticket_ttl=0.05) as server:
        agent, _, _ = seed(server)
        ticket = await Api(server, http, agent.api_key).ok(WS_TICKET)
        expiry = time.monotonic() + 0.06
        await server.wait_for(lambda: time.monotonic() > expiry)
        ws = await connect_raw(http, ticket)
        assert await receive_close(ws) == 4001


@pytest.mark.asyncio
async def test_seq_increases_and_control_frames_have_none(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent, human, chat = seed(parall_server)
    ws = await api(agent.api_key).open_ws()
    parall_server.post_message(chat, human, "one")
    parall_server.update_chat(chat, name="renamed")
    parall_server.set_agent_config(agent.user_id, {"models": []})
    frames = [await receive(ws) for _ in range(4)]
    assert [(f["type"], f["seq"]) for f in frames] == [
        ("message.new", 1),
        ("dispatch.new", 2),
        ("chat.update", 3),
        ("agent_config.update", 4),
    ]
    assert frames[2]["data"] == {"chat_id": chat, "changes": {"name": "renamed"}}
    assert frames[3]["data"] == {"version": 2}
    await ws.send_json({"type": "ping", "data": {"ts": 1234}})
    assert await receive(ws) == {"type": "pong", "data": {"ts": 1234}}
    await ws.close()


@pytest.mark.asyncio
async def test_live_events_reach_every_member(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent, human, chat = seed(parall_server)
    human_ws = await api(parall_server.add_api_key(human)).open_ws()
    agent_ws = await api(agent.api_key).open_ws()
    message = parall_server.post_message(chat, human, "mine")
    # The sender gets its own message.new (and, as a human, no dispatch.new).
    assert (await receive(human_ws))["data"]["id"] == message.id
    assert (await receive(agent_ws))["data"]["id"] == message.id
    await nothing_arrives(human_ws)
    await human_ws.close()
    await agent_ws.close()


@pytest.mark.asyncio
async def test_resume_replays_exactly_the_missed_frames(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent, human, chat = seed(parall_server)
    client = api(agent.api_key)
    ws = await client.open_ws()
    parall_server.post_message(chat, human, "seen")
    seen = [await receive(ws) for _ in range(2)]
    await ws.close()
    missed = [parall_server.post_message(chat, human, f"missed {i}") for i in range(2)]

    ws = await client.connect(last_seq=seen[-1]["seq"])
    assert (await receive(ws))["type"] == "hello"
    replayed = [await receive(ws) for _ in range(4)]
    assert [f["seq"] for f in replayed] == [3, 4, 5, 6]
    assert [f["data"]["id"] for f in replayed if f["type"] == "message.new"] == [
        m.id for m in missed
    ]
    await nothing_arrives(ws)
    # Live frames continue the numbering.
    parall_server.emit(agent.user_id, "custom.event", {"x": 1})
    assert await receive(ws) == {"type": "custom.event", "seq": 7, "data": {"x": 1}}
    assert parall_server.ws_connections[-1].last_seq == 2
    # Resuming from the newest seq replays nothing.
    await ws.close()
    ws = await client.open_ws(last_seq=7)
    await nothing_arrives(ws)
    await ws.close()


@pytest.mark.asyncio
async def test_recovery_overflow_when_too_old(http: aiohttp.ClientSession) -> None:
    async with FakeParallServer(replay_buffer_size=3) as server:
        agent, _, _ = seed(server)
        client = Api(server, http, agent.api_key)
        for i in range(5):
            server.emit(agent.user_id, "custom", {"i": i})  # seq 1..5, buffer holds 3..5
        ws = await client.open_ws(last_seq=1)
        assert await receive(ws) == {"type": "recovery.overflow", "data": {}}
        await nothing_arrives(ws)
        await ws.close()
        # last_seq 2: everything after it (3..5) is still held.
        ws = await client.open_ws(last_seq=2)
        assert [(await receive(ws))["seq"] for _ in range(3)] == [3, 4, 5]
        await ws.close()


@pytest.mark.asyncio
async def test_recovery_overflow_when_last_seq_is_ahead(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent, _, _ = seed(parall_server)
    client = api(agent.api_key)
    ws = await client.open_ws(last_seq=5)
    assert await receive(ws) == {"type": "recovery.overflow", "data": {}}
    await ws.close()

    for i in range(3):
        parall_server.emit(agent.user_id, "custom", {"i": i})
    parall_server.reset_seq(agent.user_id)
    assert parall_server.emit(agent.user_id, "custom", {"i": "after restart"}) == 1
    ws = await client.open_ws(last_seq=3)
    assert (await receive(ws))["type"] == "recovery.overflow"
    await nothing_arrives(ws)  # the overflow replaces the replay
    await ws.close()


@pytest.mark.asyncio
async def test_reset_seq_for_everyone(parall_server: FakeParallServer) -> None:
    a = parall_server.add_agent()
    b = parall_server.add_agent()
    assert parall_server.emit(a.user_id, "x", {}) == 1
    assert parall_server.emit(b.user_id, "x", {}) == 1
    assert parall_server.emit(b.user_id, "x", {}) == 2
    parall_server.reset_seq()
    assert parall_server.emit(a.user_id, "x", {}) == 1
    assert parall_server.emit(b.user_id, "x", {}) == 1


@pytest.mark.asyncio
async def test_ping_pong_and_client_frames_recorded(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent, _, chat = seed(parall_server)
    ws = await api(agent.api_key).open_ws()
    await ws.ping(b"probe")
    pong = await ws.receive(timeout=2)
    assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"probe")
    await ws.send_json({"type": "typing", "data": {"chat_id": chat, "action": "start"}})
    heartbeat = {
        "session_id": "wss_x",
        "hostname": "box",
        "cores": 4,
        "mem_total": 8,
        "mem_free": 4,
        "uptime": 10,
    }
    await ws.send_json({"type": "agent.heartbeat", "data": heartbeat})
    await ws.send_str("not json")
    await ws.send_json({"type": "ping", "data": {"ts": 7}})
    assert await receive(ws) == {"type": "pong", "data": {"ts": 7}}
    frames = parall_server.ws_frames
    assert [(f.user_id, f.type) for f in frames] == [
        (agent.user_id, "typing"),
        (agent.user_id, "agent.heartbeat"),
        (agent.user_id, None),
        (agent.user_id, "ping"),
    ]
    assert frames[0].data == {"chat_id": chat, "action": "start"}
    assert frames[1].data == heartbeat
    assert (frames[2].raw, frames[2].data) == ("not json", {})
    assert json.loads(frames[3].raw) == {"type": "ping", "data": {"ts": 7}}
    await ws.close()


@pytest.mark.asyncio
async def test_close_ws(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent, _, _ = seed(parall_server)
    other = parall_server.add_agent()
    ws = await api(agent.api_key).open_ws()
    other_ws = await api(other.api_key).open_ws()
    await parall_server.close_ws(4008, "slow down", user_id=agent.user_id)
    assert await receive_close(ws) == 4008
    assert parall_server.ws_connections[0].closed_code == 4008
    await nothing_arrives(other_ws)
    assert parall_server.ws_connections[1].closed_code is None
    await parall_server.close_ws(1012)
    assert await receive_close(other_ws) == 1012


@pytest.mark.asyncio
async def test_close_ws_every(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent, _, _ = seed(parall_server)
    client = api(agent.api_key)
    parall_server.close_ws_every(2, code=1013)
    ws = await client.open_ws()
    for i in range(3):
        parall_server.emit(agent.user_id, "custom", {"i": i})
    assert [(await receive(ws))["seq"] for _ in range(2)] == [1, 2]
    assert await receive_close(ws) == 1013
    # The next connection resumes (the replay counts too) and is closed again.
    ws = await client.open_ws(last_seq=2)
    assert (await receive(ws))["seq"] == 3
    parall_server.emit(agent.user_id, "custom", {"i": 3})
    assert (await receive(ws))["seq"] == 4
    assert await receive_close(ws) == 1013
    parall_server.close_ws_every(None)
    ws = await client.open_ws(last_seq=4)
    for i in range(3):
        parall_server.emit(agent.user_id, "custom", {"i": i})
    assert [(await receive(ws))["seq"] for _ in range(3)] == [5, 6, 7]
    await ws.close()


@pytest.mark.asyncio
async def test_go_silent(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent, human, chat = seed(parall_server)
    client = api(agent.api_key)
    ws = await client.open_ws()
    assert parall_server.emit(agent.user_id, "before", {}) == 1
    assert (await receive(ws))["seq"] == 1
    parall_server.go_silent()
    await ws.send_json({"type": "ping", "data": {"ts": 1}})
    await ws.ping(b"anyone?")
    parall_server.post_message(chat, human, "unheard")  # seq 2 and 3
    await nothing_arrives(ws)
    assert not ws.closed
    fresh = await client.connect()
    await nothing_arrives(fresh)  # upgraded, but no hello
    assert parall_server.ws_connections[-1].ticket_ok
    assert [f.type for f in parall_server.ws_frames] == ["ping"]  # still recorded

    parall_server.go_silent(False)
    await ws.send_json({"type": "ping", "data": {"ts": 2}})
    assert await receive(ws) == {"type": "pong", "data": {"ts": 2}}
    # What was numbered meanwhile is still there for a resume.
    resumed = await client.open_ws(last_seq=1)
    assert [(await receive(resumed))["seq"] for _ in range(2)] == [2, 3]
    for conn in (ws, fresh, resumed):
        await conn.close()


@pytest.mark.asyncio
async def test_refuse_ws(
    parall_server: FakeParallServer, api: ApiFactory, http: aiohttp.ClientSession
) -> None:
    agent, _, _ = seed(parall_server)
    client = api(agent.api_key)
    parall_server.refuse_ws(2, status=503)
    ticket = await client.ok(WS_TICKET)
    for _ in range(2):
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await connect_raw(http, ticket)
        assert caught.value.status == 503
    assert parall_server.ws_connections == []
    ws = await connect_raw(http, ticket)  # the refused attempts did not use the ticket
    assert (await receive(ws))["type"] == "hello"
    await ws.close()


@pytest.mark.asyncio
async def test_send_raw(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent, _, _ = seed(parall_server)
    other = parall_server.add_agent()
    ws = await api(agent.api_key).open_ws()
    other_ws = await api(other.api_key).open_ws()
    await parall_server.send_raw("garbage{", user_id=agent.user_id)
    msg = await ws.receive(timeout=2)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "garbage{")
    await nothing_arrives(other_ws)
    await other_ws.close()
    # An oversized frame trips the client's own limit (1009), not the server's.
    small = await api(agent.api_key).connect(max_msg_size=1024)
    await receive(small)
    await parall_server.send_raw("x" * 4096, user_id=agent.user_id)
    closing = await small.receive(timeout=2)
    assert closing.type in (
        aiohttp.WSMsgType.ERROR,
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSED,
    )
    assert small.close_code == 1009
    assert (await ws.receive(timeout=2)).data == "x" * 4096
    await ws.close()


@pytest.mark.asyncio
async def test_delay_ws_frames(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent, _, _ = seed(parall_server)
    ws = await api(agent.api_key).open_ws()
    parall_server.delay_ws_frames(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    parall_server.emit(agent.user_id, "a", {})
    parall_server.emit(agent.user_id, "b", {})
    assert [(await receive(ws))["type"] for _ in range(2)] == ["a", "b"]
    elapsed = loop.time() - started
    assert 0.2 <= elapsed < 0.4  # each frame is delayed from when it was queued
    parall_server.delay_ws_frames(None)
    started = loop.time()
    parall_server.emit(agent.user_id, "c", {})
    await receive(ws)
    assert loop.time() - started < 0.2
    await ws.close()


@pytest.mark.asyncio
async def test_revoke_key_closes_with_4003(
    parall_server: FakeParallServer, api: ApiFactory, http: aiohttp.ClientSession
) -> None:
    agent, _, _ = seed(parall_server)
    client = api(agent.api_key)
    ws = await client.open_ws()
    spare = await client.ok(WS_TICKET)
    parall_server.revoke_key(agent.api_key)
    assert await receive_close(ws) == 4003
    assert (await client.call(WS_TICKET)).status == 401
    late = await connect_raw(http, spare)  # a ticket issued before the revocation
    assert await receive_close(late) == 4003
    assert [r.closed_code for r in parall_server.ws_connections] == [4003, 4003]


@pytest.mark.asyncio
async def test_revoking_a_key_leaves_the_websocket_of_another_key_of_the_user_open(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    """4003 means "this key was revoked": a connection opened with another, still valid
    key of the same user must not get it (its client would stop for good)."""
    agent, human_id, chat_id = seed(parall_server)
    second = api(parall_server.add_api_key(agent.user_id))
    ws = await second.open_ws()
    parall_server.revoke_key(agent.api_key)
    await second.ok(ME)  # the second key still works
    parall_server.post_message(chat_id, human_id, "still there?")
    assert (await receive(ws))["type"] == "message.new"
    await ws.close()


@pytest.mark.asyncio
async def test_close_sends_1001_and_leaves_no_task(http: aiohttp.ClientSession) -> None:
    before = asyncio.all_tasks()
    server = FakeParallServer(dispatch_delay=5.0)
    await server.start()
    agent, human, chat = seed(server)
    client = Api(server, http, agent.api_key)
    ws = await client.open_ws()
    silent_ws = await client.open_ws()
    server.post_message(chat, human, "pending dispatch")  # a delayed item never created
    await receive(ws)
    server.go_silent()
    server.delay_next(WS_TICKET, 30)
    slow = asyncio.create_task(client.call(WS_TICKET))
    await server.wait_for(lambda: server.faults.pending() == 0)
    # The clients keep reading while the server closes, as real ones do.
    closes = [asyncio.create_task(receive_close(conn)) for conn in (ws, silent_ws)]
    await server.close()
    assert await asyncio.gather(*closes) == [1001, 1001]
    await slow  # the delayed request was answered promptly at close
    await server.close()  # idempotent
    assert asyncio.all_tasks() - before == set()
