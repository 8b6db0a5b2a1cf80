"""ParallWs against the emulator's WebSocket, over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from parall_bridge import (
    ChatUpdate,
    DispatchItem,
    Hello,
    Message,
    ParallClient,
    ParallConnectionError,
    ParallError,
    RecoveryOverflow,
    Task,
    WebSocketClosedError,
    WsTicket,
)
from parall_bridge import protocol as p
from parall_bridge import ws as ws_module
from parall_bridge.testing import AgentAccount, FakeParallServer
from parall_bridge.ws import Backoff, ConnectionState, ParallWs, StateChange

from .conftest import FAST_RETRY, library_tasks

FAST_BACKOFF = Backoff(base=1.5, maximum=0.05, jitter=0.01, reset_after=0.5)
"""Reconnects within 60 ms: the policy under test, at test speed."""


class Inbox:
    """Records every delivered event in order."""

    def __init__(self, ws: ParallWs, *types: str) -> None:
        self.events: list[tuple[str, Any]] = []
        for frame_type in types:
            ws.on(frame_type, self._recorder(frame_type))

    def _recorder(self, frame_type: str) -> Any:
        def record(payload: Any) -> None:
            self.events.append((frame_type, payload))

        return record

    def of(self, frame_type: str) -> list[Any]:
        return [payload for kind, payload in self.events if kind == frame_type]

    def texts(self) -> list[str]:
        return [m.content.text for m in self.of(p.FRAME_MESSAGE_NEW)]


@pytest_asyncio.fixture
async def ws(client: ParallClient) -> AsyncIterator[ParallWs]:
    """A ParallWs of the agent (not yet connected), disconnected after the test."""
    socket = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF, hello_timeout=2.0)
    try:
        yield socket
    finally:
        await socket.disconnect()


@pytest.fixture
def chat(server: FakeParallServer, agent: AgentAccount) -> tuple[str, str]:
    """A direct chat between Ada and the agent: (chat id, Ada's id)."""
    ada = server.add_user("Ada")
    return server.add_chat(type="direct", members=[ada.id, agent.user_id]).id, ada.id


# --- connecting, events --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_connect_returns_after_hello(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount
) -> None:
    inbox = Inbox(ws, p.FRAME_HELLO)
    states: list[StateChange] = []
    ws.on_state_change(states.append)
    await ws.connect()
    assert ws.state is ConnectionState.CONNECTED
    assert ws.session_id
    assert ws.heartbeat_interval == 30.0
    hellos = inbox.of(p.FRAME_HELLO)
    assert len(hellos) == 1
    assert isinstance(hellos[0], Hello)
    assert [s.state for s in states] == [ConnectionState.CONNECTING, ConnectionState.CONNECTED]
    assert states[-1].previous is ConnectionState.CONNECTING
    assert server.ws_connections[-1].last_seq is None  # no last_seq on a first connection


@pytest.mark.asyncio
async def test_events_in_order_with_typed_payloads(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount, chat: tuple[str, str]
) -> None:
    chat_id, ada = chat
    inbox = Inbox(
        ws,
        p.FRAME_MESSAGE_NEW,
        p.FRAME_DISPATCH_NEW,
        p.FRAME_TASK_ASSIGNED,
        p.FRAME_CHAT_UPDATE,
        p.FRAME_AGENT_CONFIG_UPDATE,
        "brand.new",
    )
    await ws.connect()
    for i in range(20):
        server.post_message(chat_id, ada, f"m{i}")
    server.assign_task("T", assignee_id=agent.user_id, creator_id=ada)
    server.update_chat(chat_id, name="renamed")
    server.set_agent_config(agent.user_id, {"models": []})
    server.emit(agent.user_id, "brand.new", {"x": 1})
    await server.wait_for(lambda: len(inbox.of("brand.new")) == 1)
    assert inbox.texts() == [f"m{i}" for i in range(20)]
    assert all(isinstance(m, Message) for m in inbox.of(p.FRAME_MESSAGE_NEW))
    assert all(isinstance(d, DispatchItem) for d in inbox.of(p.FRAME_DISPATCH_NEW))
    assert len(inbox.of(p.FRAME_DISPATCH_NEW)) == 21
    assert isinstance(inbox.of(p.FRAME_TASK_ASSIGNED)[0], Task)
    assert isinstance(inbox.of(p.FRAME_CHAT_UPDATE)[0], ChatUpdate)
    assert inbox.of(p.FRAME_CHAT_UPDATE)[0].changes.name == "renamed"
    assert inbox.of(p.FRAME_AGENT_CONFIG_UPDATE)[0].version >= 2
    assert inbox.of("brand.new") == [{"x": 1}]  # unknown types: the raw mapping
    kinds = [kind for kind, _ in inbox.events]
    assert kinds[:2] == [p.FRAME_MESSAGE_NEW, p.FRAME_DISPATCH_NEW]  # live event, then its row
    assert ws.last_seq == 20 + 20 + 2 + 1 + 1 + 1


@pytest.mark.asyncio
async def test_slow_async_handler_does_not_block_later_events(
    ws: ParallWs, server: FakeParallServer, chat: tuple[str, str]
) -> None:
    chat_id, ada = chat
    release = asyncio.Event()
    started: list[str] = []
    finished: list[str] = []

    async def slow(message: Message) -> None:
        text = message.content.text  # type: ignore[union-attr]
        started.append(text)
        if text == "first":
            await release.wait()
        finished.append(text)

    ws.on(p.FRAME_MESSAGE_NEW, slow)
    await ws.connect()
    server.post_message(chat_id, ada, "first")
    server.post_message(chat_id, ada, "second")
    await server.wait_for(lambda: finished == ["second"])
    assert started == ["first", "second"]  # started in arrival order
    release.set()
    await server.wait_for(lambda: finished == ["second", "first"])


@pytest.mark.asyncio
async def test_handler_errors_are_logged_and_never_stop_the_connection(
    ws: ParallWs, server: FakeParallServer, chat: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    chat_id, ada = chat
    got: list[str] = []

    def broken(_: Message) -> None:
        raise RuntimeError("sync handler bug")

    async def broken_async(_: Message) -> None:
        raise RuntimeError("async handler bug")

    ws.on(p.FRAME_MESSAGE_NEW, broken)
    ws.on(p.FRAME_MESSAGE_NEW, broken_async)
    ws.on(p.FRAME_MESSAGE_NEW, lambda m: got.append(m.id))
    await ws.connect()
    server.post_message(chat_id, ada, "a")
    server.post_message(chat_id, ada, "b")
    await server.wait_for(lambda: len(got) == 2)
    await server.wait_for(lambda: "async handler bug" in caplog.text)
    assert "sync handler bug" in caplog.text
    assert "message.new" in caplog.text
    assert ws.state is ConnectionState.CONNECTED


@pytest.mark.asyncio
async def test_unsubscribe(ws: ParallWs, server: FakeParallServer, chat: tuple[str, str]) -> None:
    chat_id, ada = chat
    got: list[str] = []
    everything: list[str] = []
    off = ws.on(p.FRAME_MESSAGE_NEW, lambda m: got.append(m.id))
    ws.on(p.FRAME_MESSAGE_NEW, lambda m: everything.append(m.id))
    await ws.connect()
    server.post_message(chat_id, ada, "a")
    await server.wait_for(lambda: len(everything) == 1)
    off()
    off()  # idempotent
    server.post_message(chat_id, ada, "b")
    await server.wait_for(lambda: len(everything) == 2)
    assert len(got) == 1


# --- reconnect and resume ------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "code",
    [
        p.CLOSE_GOING_AWAY,
        p.CLOSE_INTERNAL_ERROR,
        p.CLOSE_SERVICE_RESTART,
        p.CLOSE_TRY_AGAIN_LATER,
        p.CLOSE_INVALID_TICKET,
        p.CLOSE_RATE_LIMITED,
        p.CLOSE_NORMAL,
        4999,
    ],
)
async def test_reconnects_with_new_ticket_and_last_seq_delivering_each_missed_event_once(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount, chat: tuple[str, str], code: int
) -> None:
    chat_id, ada = chat
    inbox = Inbox(ws, p.FRAME_MESSAGE_NEW, p.FRAME_HELLO)
    states: list[StateChange] = []
    ws.on_state_change(states.append)
    await ws.connect()
    for i in range(3):
        server.post_message(chat_id, ada, f"before{i}")
    await server.wait_for(lambda: len(inbox.texts()) == 3)
    seq_before = ws.last_seq
    tickets_before = len([r for r in server.requests if r.path == p.WS_TICKET.path])
    server.refuse_ws(2)  # the first reconnect attempts fail: events pile up meanwhile
    await server.close_ws(code, "test")
    for i in range(5):
        server.post_message(chat_id, ada, f"away{i}")
    await server.wait_for(lambda: len(inbox.of(p.FRAME_HELLO)) == 2)
    await server.wait_for(lambda: len(inbox.texts()) == 8)
    assert inbox.texts() == [f"before{i}" for i in range(3)] + [f"away{i}" for i in range(5)]
    accepted = [c for c in server.ws_connections if c.ticket_ok]
    assert accepted[-1].last_seq == seq_before
    tickets_after = len([r for r in server.requests if r.path == p.WS_TICKET.path])
    assert tickets_after - tickets_before == 3  # a fresh ticket for each of the 3 attempts
    reconnecting = next(s for s in states if s.state is ConnectionState.RECONNECTING)
    assert reconnecting.code == code
    assert ws.state is ConnectionState.CONNECTED


@pytest.mark.asyncio
async def test_replay_overlap_is_not_delivered_twice(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount
) -> None:
    inbox = Inbox(ws, "custom.event")
    await ws.connect()
    for i in range(4):
        server.emit(agent.user_id, "custom.event", {"i": i})
    await server.wait_for(lambda: len(inbox.events) == 4)
    # A server that re-sends frames the client already has (seq not above last_seq).
    for seq in (2, 3, 4):
        await server.send_raw(
            json.dumps({"type": "custom.event", "seq": seq, "data": {"dup": seq}})
        )
    server.emit(agent.user_id, "custom.event", {"i": 4})
    await server.wait_for(lambda: len(inbox.events) == 5)
    assert [payload for _, payload in inbox.events] == [{"i": i} for i in range(5)]


@pytest.mark.asyncio
async def test_replay_too_old_delivers_recovery_overflow_and_restarts_tracking(
    client: ParallClient, agent: AgentAccount
) -> None:
    async with FakeParallServer(replay_buffer_size=3) as small:
        bot = small.add_agent("Bot", api_key="pk_small")
        async with ParallClient(small.url, "pk_small", retry=FAST_RETRY) as c:
            ws = ParallWs(c.get_ws_ticket, backoff=FAST_BACKOFF)
            inbox = Inbox(ws, p.FRAME_RECOVERY_OVERFLOW, "e")
            try:
                await ws.connect()
                small.emit(bot.user_id, "e", {"i": 0})
                await small.wait_for(lambda: len(inbox.of("e")) == 1)
                small.refuse_ws(1)
                await small.close_ws(p.CLOSE_SERVICE_RESTART)
                for i in range(1, 8):  # more than the buffer holds
                    small.emit(bot.user_id, "e", {"i": i})
                await small.wait_for(lambda: len(inbox.of(p.FRAME_RECOVERY_OVERFLOW)) == 1)
                overflow = inbox.of(p.FRAME_RECOVERY_OVERFLOW)[0]
                assert isinstance(overflow, RecoveryOverflow)
                assert ws.last_seq == 0
                small.emit(bot.user_id, "e", {"i": 8})
                await small.wait_for(lambda: inbox.of("e")[-1] == {"i": 8})
                assert ws.last_seq == 9
            finally:
                await ws.disconnect()


@pytest.mark.asyncio
async def test_server_numbering_restart_is_accepted_after_overflow(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount
) -> None:
    inbox = Inbox(ws, p.FRAME_RECOVERY_OVERFLOW, "e")
    await ws.connect()
    for i in range(5):
        server.emit(agent.user_id, "e", {"i": i})
    await server.wait_for(lambda: len(inbox.of("e")) == 5)
    server.reset_seq(agent.user_id)
    await server.close_ws(p.CLOSE_SERVICE_RESTART)
    await server.wait_for(lambda: len(inbox.of(p.FRAME_RECOVERY_OVERFLOW)) == 1)
    server.emit(agent.user_id, "e", {"i": "after restart"})  # seq 1 again
    await server.wait_for(lambda: inbox.of("e")[-1] == {"i": "after restart"})
    assert ws.last_seq == 1


@pytest.mark.asyncio
async def test_zombie_connection_is_detected_within_the_bound_and_left(
    agent: AgentAccount,
) -> None:
    interval = 1.0  # the shortest heartbeat_interval a client takes from hello
    async with FakeParallServer(heartbeat_interval=interval) as zombie:
        bot = zombie.add_agent("Bot", api_key="pk_z")
        async with ParallClient(zombie.url, "pk_z", retry=FAST_RETRY) as c:
            ws = ParallWs(c.get_ws_ticket, backoff=FAST_BACKOFF, hello_timeout=0.5)
            inbox = Inbox(ws, p.FRAME_HELLO, "e")
            try:
                await ws.connect()
                await zombie.wait_for(lambda: ws.latency is not None)  # pings answered
                zombie.go_silent()
                silent_at = time.monotonic()
                await zombie.wait_for(
                    lambda: ws.state is not ConnectionState.CONNECTED, timeout=5.0
                )
                detected = time.monotonic() - silent_at
                # No frame for 2 x heartbeat_interval: dead. Allow one ping period of slack.
                assert detected <= 2 * interval + interval / 2 + 0.3
                assert detected >= interval  # not a false alarm
                zombie.go_silent(False)
                await zombie.wait_for(lambda: len(inbox.of(p.FRAME_HELLO)) == 2, timeout=5.0)
                zombie.emit(bot.user_id, "e", {"back": True})
                await zombie.wait_for(lambda: inbox.of("e") == [{"back": True}])
            finally:
                await ws.disconnect()


@pytest.mark.asyncio
async def test_hello_timeout_on_a_silent_server(
    client: ParallClient, server: FakeParallServer
) -> None:
    server.go_silent()
    ws = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF, hello_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ParallConnectionError, match=r"no hello|TimeoutError"):
        await ws.connect()
    assert time.monotonic() - started < 2.0
    assert ws.state is ConnectionState.DISCONNECTED
    await ws.disconnect()


# --- fatal closes and refusals -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_4003_stops_reconnecting_and_surfaces_the_error(
    ws: ParallWs, server: FakeParallServer
) -> None:
    states: list[StateChange] = []

    async def on_state(change: StateChange) -> None:  # async state handlers work too
        states.append(change)

    ws.on_state_change(on_state)
    await ws.connect()
    connections = len(server.ws_connections)
    await server.close_ws(p.CLOSE_FORBIDDEN, "key revoked")
    with pytest.raises(WebSocketClosedError) as info:
        await asyncio.wait_for(ws.wait_closed(), 5.0)
    assert info.value.code == p.CLOSE_FORBIDDEN
    assert info.value.reason == "key revoked"
    assert isinstance(info.value, ParallError)
    assert ws.state is ConnectionState.CLOSED
    await server.wait_for(lambda: any(s.state is ConnectionState.CLOSED for s in states))
    closed = next(s for s in states if s.state is ConnectionState.CLOSED)
    assert (closed.code, closed.reason) == (p.CLOSE_FORBIDDEN, "key revoked")
    assert len(server.ws_connections) == connections  # no new attempt
    assert await ws.send_typing("cht_x", "start") is False


@pytest.mark.asyncio
async def test_revoked_key_closes_for_good(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount
) -> None:
    await ws.connect()
    server.revoke_key(agent.api_key)
    with pytest.raises(WebSocketClosedError):
        await asyncio.wait_for(ws.wait_closed(), 5.0)


@pytest.mark.asyncio
async def test_connect_against_a_refused_server_raises_a_clear_error() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()

    async def ticket() -> WsTicket:
        return WsTicket(ticket="t", ws_url=f"ws://127.0.0.1:{port}/ws")

    ws = ParallWs(ticket, backoff=FAST_BACKOFF)
    with pytest.raises(ParallConnectionError, match="WebSocket connection: cannot connect to"):
        await ws.connect()
    assert ws.state is ConnectionState.DISCONNECTED
    await ws.disconnect()


@pytest.mark.asyncio
async def test_refused_upgrade_on_connect_raises(ws: ParallWs, server: FakeParallServer) -> None:
    server.refuse_ws(1, status=503)
    with pytest.raises(ParallConnectionError, match="503"):
        await ws.connect()
    await ws.connect()  # the caller retries; the next attempt works
    assert ws.state is ConnectionState.CONNECTED


@pytest.mark.asyncio
async def test_no_url_is_a_clear_error_at_connect() -> None:
    async def ticket() -> WsTicket:
        return WsTicket(ticket="t")

    ws = ParallWs(ticket)
    with pytest.raises(ParallError, match="no WebSocket URL"):
        await ws.connect()
    await ws.disconnect()


@pytest.mark.asyncio
async def test_ticket_without_ws_url_uses_the_configured_url(client: ParallClient) -> None:
    async with FakeParallServer(include_ws_url_in_ticket=False) as bare:
        bare.add_agent("Bot", api_key="pk_bare")
        async with ParallClient(bare.url, "pk_bare", retry=FAST_RETRY) as c:
            ws = ParallWs(c.get_ws_ticket, bare.ws_url, backoff=FAST_BACKOFF)
            try:
                await ws.connect()
                assert ws.state is ConnectionState.CONNECTED
            finally:
                await ws.disconnect()


@pytest.mark.asyncio
async def test_reconnect_false_closes_on_a_drop(
    client: ParallClient, server: FakeParallServer
) -> None:
    ws = ParallWs(client.get_ws_ticket, reconnect=False)
    await ws.connect()
    await server.close_ws(p.CLOSE_SERVICE_RESTART)
    with pytest.raises(WebSocketClosedError) as info:
        await asyncio.wait_for(ws.wait_closed(), 5.0)
    assert info.value.code == p.CLOSE_SERVICE_RESTART
    assert len([c for c in server.ws_connections if c.ticket_ok]) == 1
    await ws.disconnect()


# --- malformed and oversized frames --------------------------------------------------------------


@pytest.mark.asyncio
async def test_garbage_frames_are_skipped_without_dropping_the_connection(
    ws: ParallWs, server: FakeParallServer, chat: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    chat_id, ada = chat
    inbox = Inbox(ws, p.FRAME_MESSAGE_NEW, p.FRAME_HELLO)
    await ws.connect()
    secret_payload = "SECRET-PAYLOAD-CONTENT"
    for garbage in (
        "not json at all",
        "[1, 2, 3]",
        json.dumps({"seq": 99999, "data": {}}),  # no type
        json.dumps({"type": 7}),
        json.dumps({"type": "message.new", "seq": 1000, "data": {"note": secret_payload}}),
    ):
        await server.send_raw(garbage)
    server.post_message(chat_id, ada, "still here")
    await server.wait_for(lambda: inbox.texts() == ["still here"])
    assert ws.state is ConnectionState.CONNECTED
    assert len(inbox.of(p.FRAME_HELLO)) == 1  # never reconnected
    assert "not JSON" in caplog.text
    assert "does not decode" in caplog.text
    assert secret_payload not in caplog.text  # payloads are not logged


@pytest.mark.asyncio
async def test_oversized_frame_resumes_then_skips_resume_on_the_same_frame(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ws = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF, max_frame_size=2048)
    inbox = Inbox(ws, p.FRAME_HELLO, "e")
    try:
        await ws.connect()
        server.emit(agent.user_id, "e", {"i": 0})
        await server.wait_for(lambda: len(inbox.of("e")) == 1)
        seq = ws.last_seq
        server.emit(agent.user_id, "e", {"blob": "x" * 5000})  # too big, and replayed on resume
        await server.wait_for(lambda: len(inbox.of(p.FRAME_HELLO)) == 3, timeout=5.0)
        # Frames sent before the resume-less connection are left to the gateway's catch-up;
        # live ones arrive again.
        server.emit(agent.user_id, "e", {"i": 2})
        await server.wait_for(lambda: inbox.of("e")[-1] == {"i": 2}, timeout=5.0)
        accepted = [c for c in server.ws_connections if c.ticket_ok]
        # 1st: original; 2nd: resumed from the last good seq (meets the frame again);
        # 3rd: without last_seq, so no loop on the same frame.
        assert [c.last_seq for c in accepted] == [None, seq, None]
        assert accepted[0].closed_code == p.CLOSE_MESSAGE_TOO_BIG
        assert {"blob": "x" * 5000} not in inbox.of("e")
    finally:
        await ws.disconnect()


# --- outbound ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_typing_heartbeat_and_generic_frames_reach_the_server(
    ws: ParallWs, server: FakeParallServer, agent: AgentAccount
) -> None:
    assert await ws.send_typing("cht_1", "start") is False  # not connected: no exception
    await ws.connect()
    assert await ws.send_typing("cht_1", "start") is True
    assert await ws.send_typing("cht_1", "stop") is True
    metrics = {"hostname": "h", "cores": 2, "mem_total": 10, "mem_free": 5, "uptime": 1.5}
    assert await ws.send_agent_heartbeat(ws.session_id or "", metrics) is True
    assert await ws.send("custom", {"a": 1}) is True
    with pytest.raises(ValueError, match="action"):
        await ws.send_typing("cht_1", "pause")  # type: ignore[arg-type]
    await server.wait_for(lambda: any(f.type == "custom" for f in server.ws_frames))
    frames = [f for f in server.ws_frames if f.type != p.FRAME_PING]
    assert [(f.type, dict(f.data)) for f in frames] == [
        (p.FRAME_TYPING, {"chat_id": "cht_1", "action": "start"}),
        (p.FRAME_TYPING, {"chat_id": "cht_1", "action": "stop"}),
        (p.FRAME_AGENT_HEARTBEAT, {"session_id": ws.session_id, **metrics}),
        ("custom", {"a": 1}),
    ]
    assert all(f.user_id == agent.user_id for f in frames)


@pytest.mark.asyncio
async def test_pings_measure_latency(agent: AgentAccount) -> None:
    async with FakeParallServer(heartbeat_interval=1.5) as fast:
        fast.add_agent("Bot", api_key="pk_f")
        async with ParallClient(fast.url, "pk_f", retry=FAST_RETRY) as c:
            ws = ParallWs(c.get_ws_ticket, backoff=FAST_BACKOFF)
            try:
                await ws.connect()
                assert ws.heartbeat_interval == 1.5
                await fast.wait_for(lambda: ws.latency is not None)
                assert ws.latency is not None
                assert 0 <= ws.latency < 1.0
                pings = [f for f in fast.ws_frames if f.type == p.FRAME_PING]
                assert isinstance(pings[0].data["ts"], int)
            finally:
                await ws.disconnect()


@pytest.mark.asyncio
async def test_the_second_ping_comes_at_a_random_point_within_the_ping_interval(
    agent: AgentAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Heartbeat interval 20 s: a ping every 10 s; drawn 0.99, the second ping comes
    # 0.1 s after the first (so that a fleet's connections, opened together, spread).
    monkeypatch.setattr(ws_module, "_jitter", lambda: 0.99)
    async with FakeParallServer(heartbeat_interval=20.0) as slow:
        slow.add_agent("Bot", api_key="pk_j")
        async with ParallClient(slow.url, "pk_j", retry=FAST_RETRY) as c:
            ws = ParallWs(c.get_ws_ticket, backoff=FAST_BACKOFF)

            def pings() -> int:
                return sum(1 for f in slow.ws_frames if f.type == p.FRAME_PING)

            try:
                await ws.connect()
                await slow.wait_for(lambda: pings() >= 1)  # one at once
                await slow.wait_for(lambda: pings() >= 2, timeout=5.0)  # not 10 s later
            finally:
                await ws.disconnect()


# --- shutdown, secrets, backoff ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_disconnect_leaves_no_task_and_is_idempotent(
    client: ParallClient, server: FakeParallServer, chat: tuple[str, str]
) -> None:
    chat_id, ada = chat
    before = asyncio.all_tasks()
    ws = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF)
    hold = asyncio.Event()

    async def slow(_: Message) -> None:
        await hold.wait()

    ws.on(p.FRAME_MESSAGE_NEW, slow)
    await ws.connect()
    server.post_message(chat_id, ada, "x")
    await server.wait_for(lambda: bool(library_tasks(before)))  # the handler task runs
    await ws.disconnect()
    await ws.disconnect()
    assert ws.state is ConnectionState.DISCONNECTED
    assert library_tasks(before) == set()
    await server.wait_for(lambda: server.ws_connections[-1].closed_code == p.CLOSE_NORMAL)
    await ws.wait_closed()  # returns after a requested disconnect


@pytest.mark.asyncio
async def test_no_ticket_or_api_key_in_any_log(
    client: ParallClient,
    server: FakeParallServer,
    agent: AgentAccount,
    chat: tuple[str, str],
    all_logs: pytest.LogCaptureFixture,
) -> None:
    tickets: list[str] = []

    async def get_ticket() -> WsTicket:
        ticket = await client.get_ws_ticket()
        tickets.append(ticket.ticket)
        return ticket

    ws = ParallWs(get_ticket, backoff=FAST_BACKOFF)
    try:
        await ws.connect()
        server.refuse_ws(1)
        await server.close_ws(p.CLOSE_INVALID_TICKET)
        await server.wait_for(lambda: len(tickets) >= 3 and ws.state is ConnectionState.CONNECTED)
        await server.send_raw("garbage")
    finally:
        await ws.disconnect()
    text = all_logs.text + "".join(str(r.__dict__) for r in all_logs.records)
    assert "connecting to ws://" in all_logs.text  # the URL is logged, redacted
    for ticket in tickets:
        assert ticket not in text
    assert agent.api_key not in text


def test_backoff_grows_is_capped_and_jittered() -> None:
    backoff = Backoff()
    rng = random.Random(7)
    assert backoff.delay(0, rng) <= 1.0  # after a connection that stayed up: within a second
    delays = [backoff.delay(n, random.Random(n)) for n in range(1, 12)]
    floors = [min(60.0, 1.85**n) for n in range(1, 12)]
    for delay, floor in zip(delays, floors, strict=True):
        assert floor <= delay <= floor + 1.0
    assert all(b > a for a, b in itertools.pairwise(floors[:7]))  # grows
    assert max(delays) <= 61.0  # capped
    spread = {round(backoff.delay(3, random.Random(seed)), 6) for seed in range(20)}
    assert len(spread) > 10  # jittered
    assert backoff.delay(10_000) <= 61.0  # no overflow


def test_backoff_validates() -> None:
    with pytest.raises(ValueError, match="base"):
        Backoff(base=0)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=-1)


def test_state_change_compares_as_its_state() -> None:
    change = StateChange(ConnectionState.CLOSED, ConnectionState.CONNECTED, 4003, "revoked")
    assert change == ConnectionState.CLOSED  # type: ignore[comparison-overlap]
    assert change.state is ConnectionState.CLOSED
    assert change == "closed"
    assert change.code == 4003
    assert "4003" in repr(change)
    assert logging.getLogger("parall_bridge.ws").name == "parall_bridge.ws"
