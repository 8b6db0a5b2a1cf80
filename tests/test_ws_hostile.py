"""ParallWs against hostile frames sent by the emulator: it never loops, never goes silent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from parall_bridge import Message, ParallClient
from parall_bridge import protocol as p
from parall_bridge.testing import AgentAccount, FakeParallServer
from parall_bridge.ws import MAX_SEQ_JUMP, ConnectionState, ParallWs

from .test_ws import FAST_BACKOFF, Inbox


@pytest_asyncio.fixture
async def ws(client: ParallClient) -> AsyncIterator[ParallWs]:
    """A ParallWs of the agent (not yet connected), disconnected after the test."""
    socket = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF, hello_timeout=2.0)
    try:
        yield socket
    finally:
        await socket.disconnect()


def depth_bomb(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.asyncio
async def test_undecodable_frames_are_skipped_and_counted_on_one_connection(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox(ws, p.FRAME_HELLO, p.FRAME_MESSAGE_NEW, "e")
    await ws.connect()
    server.emit(agent.user_id, "e", {"i": 0})
    await server.wait_for(lambda: len(inbox.of("e")) == 1)
    seq = ws.last_seq
    hostile = [
        '{"type": "message.new", "seq": 99, "data": ' + depth_bomb(200_000) + "}",
        depth_bomb(1_000_000),
        '{"type": "e", "seq": ' + "9" * 5000 + "}",
        json.dumps({"type": "message.new", "seq": seq + 1, "data": {"id": None}}),
        json.dumps({"type": "task.assigned", "seq": seq + 1, "data": {"id": 12}}),
        json.dumps({"type": "dispatch.new", "seq": seq + 1, "data": [1, 2]}),
        json.dumps({"type": "chat.update", "seq": seq + 1, "data": {"chat_id": "c", "changes": 1}}),
    ]
    for frame in hostile:
        await server.send_raw(frame)
    server.emit(agent.user_id, "e", {"i": 1})
    await server.wait_for(lambda: len(inbox.of("e")) == 2)
    assert ws.skipped_frames == len(hostile)
    assert ws.state is ConnectionState.CONNECTED
    assert len(inbox.of(p.FRAME_HELLO)) == 1  # never dropped the connection
    assert inbox.of(p.FRAME_MESSAGE_NEW) == []
    assert ws.last_seq == seq + 1  # skipped frames did not move it
    assert "nested deeper than 64" in caplog.text


@pytest.mark.asyncio
async def test_handler_errors_are_counted(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount
) -> None:
    got: list[object] = []

    def broken(_: object) -> None:
        raise RuntimeError("handler bug")

    async def broken_async(_: object) -> None:
        raise RuntimeError("async handler bug")

    ws.on("e", broken)
    ws.on("e", broken_async)
    ws.on("e", got.append)
    await ws.connect()
    for i in range(3):
        server.emit(agent.user_id, "e", {"i": i})
    await server.wait_for(lambda: len(got) == 3 and ws.handler_errors == 6)
    assert ws.skipped_frames == 0
    assert ws.state is ConnectionState.CONNECTED


@pytest.mark.asyncio
async def test_the_same_unreadable_frame_on_resume_makes_the_next_connection_skip_resume(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount
) -> None:
    inbox = Inbox(ws, p.FRAME_HELLO, "e")
    await ws.connect()
    server.emit(agent.user_id, "e", {"i": 0})
    await server.wait_for(lambda: len(inbox.of("e")) == 1)
    seq = ws.last_seq
    nested: object = "deep"
    for _ in range(100):
        nested = [nested]
    server.emit(agent.user_id, p.FRAME_MESSAGE_NEW, {"id": "msg_x", "content": nested})
    await server.wait_for(lambda: ws.skipped_frames == 1)
    await server.close_ws(p.CLOSE_SERVICE_RESTART)  # resumes, meets the frame again
    await server.wait_for(lambda: len(inbox.of(p.FRAME_HELLO)) == 2 and ws.skipped_frames == 2)
    await server.close_ws(p.CLOSE_SERVICE_RESTART)  # now without last_seq: no loop
    await server.wait_for(lambda: len(inbox.of(p.FRAME_HELLO)) == 3)
    server.emit(agent.user_id, "e", {"i": 2})
    await server.wait_for(lambda: inbox.of("e")[-1] == {"i": 2})
    accepted = [c for c in server.ws_connections if c.ticket_ok]
    assert [c.last_seq for c in accepted] == [None, seq, None]
    assert ws.skipped_frames == 2


@pytest.fixture
def chat(server: FakeParallServer, agent: AgentAccount) -> tuple[str, str]:
    """A direct chat between Ada and the agent: (chat id, Ada's id)."""
    ada = server.add_user("Ada")
    return server.add_chat(type="direct", members=[ada.id, agent.user_id]).id, ada.id


@pytest.mark.asyncio
async def test_an_implausible_seq_is_delivered_but_not_adopted(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount, chat: tuple[str, str]
) -> None:
    chat_id, ada = chat
    inbox = Inbox(ws, "e", p.FRAME_MESSAGE_NEW)
    await ws.connect()
    server.emit(agent.user_id, "e", {"i": 0})
    await server.wait_for(lambda: len(inbox.of("e")) == 1)
    seq = ws.last_seq
    await server.send_raw(json.dumps({"type": "e", "seq": 10**12, "data": {"odd": True}}))
    server.post_message(chat_id, ada, "still heard")  # seq + 1: not taken for a duplicate
    await server.wait_for(lambda: inbox.texts() == ["still heard"])
    assert inbox.of("e") == [{"i": 0}, {"odd": True}]
    assert ws.last_seq > seq
    bound = ws.last_seq + MAX_SEQ_JUMP
    await server.send_raw(json.dumps({"type": "e", "seq": bound, "data": {}}))
    await server.wait_for(lambda: len(inbox.of("e")) == 3)
    assert ws.last_seq == bound  # a jump of exactly the bound is still adopted


@pytest.mark.asyncio
async def test_the_first_seq_is_adopted_whatever_it_is(
    ws: ParallWs, server: FakeParallServer
) -> None:
    """A server whose numbering is already high: nothing seen yet, so nothing to compare."""
    inbox = Inbox(ws, "e")
    await ws.connect()
    await server.send_raw(json.dumps({"type": "e", "seq": 5 * MAX_SEQ_JUMP, "data": {}}))
    await server.wait_for(lambda: len(inbox.events) == 1)
    assert ws.last_seq == 5 * MAX_SEQ_JUMP


@pytest.mark.parametrize(
    ("sent", "used", "warning"),
    [
        (0.001, 1.0, "out of bounds"),
        (10**9, 600.0, "out of bounds"),
        (-5, 30.0, "not positive"),
        (0, 30.0, "not positive"),
        ('"fast"', 30.0, "not a finite number (str)"),
        ("NaN", 30.0, "not a finite number (float)"),
        ("1e999", 30.0, "not a finite number (float)"),
        ("true", 30.0, "not a finite number (bool)"),
        (45, 45.0, None),
    ],
)
@pytest.mark.asyncio
async def test_heartbeat_interval_from_hello_is_clamped_or_defaulted(
    ws: ParallWs,
    server: FakeParallServer,
    caplog: pytest.LogCaptureFixture,
    sent: object,
    used: float,
    warning: str | None,
) -> None:
    await ws.connect()
    frame = '{"type": "hello", "data": {"session_id": "wss_x", "heartbeat_interval": %s}}'
    await server.send_raw(frame % sent)
    await server.wait_for(lambda: ws.session_id == "wss_x")
    assert ws.heartbeat_interval == used
    hello_warnings = [r for r in caplog.records if "heartbeat_interval" in r.getMessage()]
    if warning is None:
        assert hello_warnings == []
    else:
        assert [r.levelname for r in hello_warnings] == ["WARNING"]
        assert warning in hello_warnings[0].getMessage()
    assert ws.skipped_frames == 0


@pytest.mark.asyncio
async def test_a_tiny_heartbeat_interval_from_the_server_does_not_storm(
    client: ParallClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeParallServer(heartbeat_interval=0.001) as storm:
        bot = storm.add_agent("Bot", api_key="pk_storm")
        async with ParallClient(storm.url, "pk_storm") as c:
            ws = ParallWs(c.get_ws_ticket, backoff=FAST_BACKOFF)
            got: list[Message] = []
            ws.on("e", got.append)
            try:
                await ws.connect()
                assert ws.heartbeat_interval == 1.0
                storm.emit(bot.user_id, "e", {})
                await storm.wait_for(lambda: len(got) == 1)
                pings = [f for f in storm.ws_frames if f.type == p.FRAME_PING]
                assert len(pings) <= 2  # one at once, then one per half second
                assert len(storm.ws_connections) == 1
            finally:
                await ws.disconnect()
    assert "out of bounds: using 1 s" in caplog.text
