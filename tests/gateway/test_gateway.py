"""The gateway end to end against the emulator: DESIGN.md section 3, behaviour kept
from the seed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import pytest

from parall_bridge import (
    AgentRuntime,
    AuthenticationError,
    ConfigurationError,
    ParallClient,
    StepType,
    WebSocketClosedError,
)
from parall_bridge import protocol as p
from parall_bridge.gateway import Gateway, GatewayConfig
from parall_bridge.models import Chat, User
from parall_bridge.runtime import Turn
from parall_bridge.testing import AgentAccount, ClientFrame, FakeParallServer

from ..conftest import FAST_RETRY, library_tasks
from ._harness import FAST_BACKOFF, Gate, ScriptedRuntime, make_config, running


@pytest.fixture
def direct(server: FakeParallServer, agent: AgentAccount, ada: User) -> Chat:
    return server.add_chat(type="direct", members=[ada.id, agent.user_id])


def group(server: FakeParallServer, agent: AgentAccount, ada: User, mode: str | None) -> Chat:
    return server.add_chat(
        type="group", name="Team", members=[ada.id, agent.user_id], agent_routing_mode=mode
    )


# --- identity, messages, bodies ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_direct_message_turn_with_exact_body_steps_and_ack(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    async with running(server, agent) as run:
        posted = server.post_message(direct.id, ada.id, "  hello bot  ")
        await run.wait_for(lambda: not run.pending() and len(run.runtime.finished) == 1)
        turn = run.runtime.turns[0]
        assert turn.body == (
            "[Event: message.new]\n"
            f"[Chat: {direct.id} | type: direct]\n"
            f"[From: Ada ({ada.id})]\n"
            f"[Message ID: {posted.id}]\n"
            "\n"
            "hello bot"
        )
        assert turn.prompt() == turn.body
        assert turn.session_key == "agent:main:parall:default"
        assert (turn.chat_id, turn.message_id, turn.task_id) == (direct.id, posted.id, None)
        assert turn.org_id == server.org_id
        assert turn.agent_id == agent.user_id
        await run.wait_for(lambda: len(run.steps(StepType.TEXT)) == 1)
        (step,) = run.steps(StepType.INPUT)
        assert step.target_type == "chat"
        assert step.target_id == direct.id
        assert step.content == {
            "trigger_type": "mention",
            "trigger_ref": {"message_id": posted.id},
            "sender_id": ada.id,
            "sender_name": "Ada",
            "summary": "hello bot",
        }
        assert run.steps(StepType.TEXT)[0].content == {"text": "ok", "suppressed": True}
        acks = [r for r in server.requests if r.path.endswith("/dispatch/ack")]
        assert [r.json for r in acks] == [{"source_type": "message", "source_id": posted.id}]


@pytest.mark.asyncio
async def test_own_messages_are_ignored(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    async with running(server, agent) as run:
        server.post_message(direct.id, agent.user_id, "I said this myself")
        server.post_message(direct.id, ada.id, "and Ada said this")
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
        routed = await run.gateway.feed(p.FRAME_MESSAGE_NEW, server.messages(direct.id)[0])
        assert routed is False
    assert run.runtime.texts() == [["and Ada said this"]]


@pytest.mark.asyncio
async def test_file_message_and_text_attachments_get_media_urls(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    async with running(server, agent) as run:
        server.post_file(
            direct.id, ada.id, b"%PDF-1", file_name="r.pdf", mime_type="application/pdf"
        )
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
        attachment = server.add_attachment(b"png", file_name="a.png", mime_type="image/png")
        server.post_message(direct.id, ada.id, "see this", attachment_ids=[attachment])
        await run.wait_for(lambda: len(run.runtime.finished) == 2)
    file_turn, text_turn = run.runtime.turns
    lines = file_turn.body.splitlines()
    assert lines[-1] == "[file: r.pdf]"
    (attachment_line,) = [line for line in lines if line.startswith("[Attachment:")]
    assert attachment_line.startswith("[Attachment: application/pdf http://127.0.0.1:")
    url = attachment_line.split()[-1].rstrip("]")
    async with ParallClient(server.url, agent.api_key) as c:
        session = c._ensure_session()
        async with session.get(url) as resp:
            assert await resp.read() == b"%PDF-1"
    assert "[Attachment: image/png http://127.0.0.1:" in text_turn.body
    assert text_turn.body.endswith("\n\nsee this")


@pytest.mark.asyncio
async def test_passive_group_handles_mentions_only(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    team = group(server, agent, ada, None)
    async with running(server, agent) as run:
        server.post_message(team.id, ada.id, "chatter")
        server.post_file(team.id, ada.id, b"x", file_name="x.txt", mime_type="text/plain")
        server.post_message(team.id, ada.id, "@bot do it", mentions=[agent.user_id])
        server.post_message(team.id, ada.id, "@all hello", mentions=[p.MENTION_ALL_USER_ID])
        await run.wait_for(lambda: not run.pending())
    handled = [text for turn in run.runtime.texts() for text in turn]
    assert handled == ["@bot do it", "@all hello"]
    assert f'[Chat: "Team" ({team.id}) | type: group]' in run.runtime.turns[0].body


@pytest.mark.asyncio
async def test_active_group_handles_every_message(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    team = group(server, agent, ada, "active")
    async with running(server, agent) as run:
        server.post_message(team.id, ada.id, "one")
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
        server.post_message(team.id, ada.id, "two")
        await run.wait_for(lambda: len(run.runtime.finished) == 2)
    assert run.runtime.texts() == [["one"], ["two"]]


@pytest.mark.asyncio
async def test_smart_group_mentions_live_and_the_rest_as_the_server_routes_them(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    team = group(server, agent, ada, "smart")
    server.smart_router = lambda message, agent_id: "pick me" in message["content"]["text"]
    async with running(server, agent) as run:
        server.post_message(team.id, ada.id, "ignore me")
        server.post_message(team.id, ada.id, "@bot hi", mentions=[agent.user_id])
        server.post_message(team.id, ada.id, "pick me please")
        await run.wait_for(lambda: len(run.runtime.finished) == 2)
        await run.wait_for(lambda: not run.pending())
    handled = sorted(text for turn in run.runtime.texts() for text in turn)
    assert handled == ["@bot hi", "pick me please"]


@pytest.mark.asyncio
async def test_task_assignment_body_statuses_and_dedupe(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    bob = server.add_user("Bob")
    async with running(server, agent) as run:
        task = server.assign_task(
            "Ship it",
            assignee_id=agent.user_id,
            creator_id=ada.id,
            priority="high",
            description="by Friday",
            identifier="T-7",
        )
        await run.wait_for(lambda: len(run.runtime.finished) == 1 and not run.pending())
        turn = run.runtime.turns[0]
        assert turn.body == (
            "[Event: task.assigned]\n"
            f"[Task: T-7 ({task.id}) | type: task]\n"
            f"[Assigned by: system ({ada.id})]\n"
            "\n"
            "Title: Ship it\nStatus: todo\nPriority: high\n\nby Friday"
        )
        assert (turn.task_id, turn.chat_id, turn.message_id) == (task.id, None, task.id)
        await run.wait_for(lambda: len(run.steps(StepType.TEXT)) == 1)  # steps go in the background
        (step,) = run.steps(StepType.INPUT)
        assert (step.target_type, step.target_id) == ("task", task.id)
        assert step.content["trigger_type"] == "task_assign"
        assert step.content["trigger_ref"] == {"task_id": task.id}
        # The same version again: deduped. A new version: a new turn.
        again = server.get_task(task.id)
        assert await run.gateway.feed(p.FRAME_TASK_ASSIGNED, again) is False
        server.update_task(task.id, status="in_progress")
        await run.gateway.feed(p.FRAME_TASK_ASSIGNED, server.get_task(task.id))
        await run.wait_for(lambda: len(run.runtime.finished) == 2)
        # Not dispatched: done tasks, tasks of others.
        server.assign_task("Other's", assignee_id=bob.id, creator_id=ada.id)
        done = server.assign_task(
            "Done", assignee_id=agent.user_id, creator_id=ada.id, status="done"
        )
        await run.wait_for(lambda: done.id not in run.pending())
    assert len(run.runtime.turns) == 2


# --- the agent session and its steps -------------------------------------------------------------


@pytest.mark.asyncio
async def test_agent_session_lifecycle(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    async with running(server, agent) as run:
        paths = [r.path for r in server.requests]
        session_at = next(i for i, path in enumerate(paths) if path.endswith("/sessions"))
        ticket_at = paths.index(p.WS_TICKET.path)
        assert session_at < ticket_at  # created before the WebSocket: REST-only works too
        server.post_message(direct.id, ada.id, "one")
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
        await server.close_ws(p.CLOSE_SERVICE_RESTART)
        await run.wait_for(lambda: len([c for c in server.ws_connections if c.ticket_ok]) == 2)
        server.post_message(direct.id, ada.id, "two")
        await run.wait_for(lambda: len(run.runtime.finished) == 2)
        assert run.runtime.info is not None
        assert run.runtime.info.session_id == run.gateway.session_id
    (session,) = server.sessions(agent.user_id)  # kept across the reconnect
    assert session.runtime_key == "agent:main:parall:default"
    assert session.status == "completed"
    statuses = [r.json["status"] for r in server.requests if r.method == "PATCH"]
    assert statuses == ["active", "idle", "active", "idle", "completed"]
    assert run.runtime.stopped


@pytest.mark.asyncio
async def test_status_changes_coalesce_while_the_platform_is_slow(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    async with running(server, agent) as run:
        server.delay_next(p.UPDATE_AGENT_SESSION, 1.0)  # the first status write is slow
        for n in range(1, 6):  # five turns one after another, each active then idle
            server.post_message(direct.id, ada.id, f"message {n}")
            await run.wait_for(lambda: len(run.runtime.finished) == n)  # noqa: B023
        await run.wait_for(lambda: run.gateway.stats().writes_pending == 0)
        stats = run.gateway.stats()
        assert stats.writes_shed == 0
    statuses = [r.json["status"] for r in server.requests if r.method == "PATCH"]
    # While the first write was slow only the latest status waited: written once (one
    # write per change would have made ten).
    assert statuses == ["active", "idle", "completed"]
    assert run.gateway.stats().writes_abandoned == 0


@pytest.mark.asyncio
async def test_recorder_steps_group_keys_and_tool_steps(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    keys: list[str] = []

    async def think_and_act(turn: Turn) -> str | None:
        turn.new_response()
        keys.append(turn.group_key)
        turn.reasoning("Let me ")
        turn.reasoning("think.", done=True)
        turn.tool_call("c1", "search", {"q": "x"})
        turn.tool_result("c1", output={"hits": 1})
        turn.new_response()
        keys.append(turn.group_key)
        turn.reasoning("Done thinking")
        turn.reasoning_done()
        turn.text("final words")
        return "final words"

    async with running(server, agent, ScriptedRuntime(think_and_act)) as run:
        server.post_message(direct.id, ada.id, "go")
        await run.wait_for(lambda: len(run.steps(StepType.TEXT)) == 1)
    steps = run.steps()
    kinds = [s.step_type for s in steps]
    assert kinds == ["input", "thinking", "tool_call", "tool_result", "thinking", "text"]
    assert steps[1].content == {"text": "Let me think."}
    assert steps[1].group_key == steps[2].group_key == steps[3].group_key == keys[0]
    assert steps[4].group_key == steps[5].group_key == keys[1]
    assert keys[0] != keys[1]
    assert steps[2].content == {"call_id": "c1", "name": "search", "args": {"q": "x"}}
    assert steps[3].content == {"call_id": "c1", "output": {"hits": 1}}
    assert steps[5].content == {"text": "final words", "suppressed": True}  # recorded once


@pytest.mark.asyncio
async def test_failed_turn_records_an_error_step_and_is_not_acked(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    async def boom(turn: Turn) -> str | None:
        raise RuntimeError("model unavailable")

    async with running(server, agent, ScriptedRuntime(boom)) as run:
        posted = server.post_message(direct.id, ada.id, "hi")
        await run.wait_for(lambda: len(run.steps(StepType.ERROR)) == 1)
        assert run.pending() == [posted.id]
    (error,) = run.steps(StepType.ERROR)
    assert error.content == {"message": "RuntimeError: model unavailable", "attempts": 1}
    assert error.target_id == direct.id
    assert run.pending() == [posted.id]  # still pending: redelivered later


# --- catch-up ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_catch_up_on_start_with_the_cold_start_window(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    direct: Chat,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = server.post_message(direct.id, ada.id, "from long ago")
    server.age_dispatch_items(600)
    recent = server.post_message(direct.id, ada.id, "recent")
    async with running(server, agent) as run:
        await run.wait_for(lambda: not run.pending())
    assert run.runtime.texts() == [["recent"]]
    assert "cold start" in caplog.text
    acked = [r.path for r in server.requests if "/ack" in r.path]
    assert len(acked) == 2  # the old one acked by id without a turn, the recent one after its turn
    assert old.id != recent.id


@pytest.mark.asyncio
async def test_cold_start_window_none_replays_everything(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    server.post_message(direct.id, ada.id, "from long ago")
    server.age_dispatch_items(6000)
    async with running(server, agent, cold_start_window=None) as run:
        await run.wait_for(lambda: not run.pending())
    assert run.runtime.texts() == [["from long ago"]]


@pytest.mark.asyncio
async def test_catch_up_after_every_hello_replays_old_items_too(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    async with running(server, agent) as run:
        server.refuse_ws(1000)
        await server.close_ws(p.CLOSE_SERVICE_RESTART)
        server.post_message(direct.id, ada.id, "while away")
        server.age_dispatch_items(600)  # older than the window, but this is not a cold start
        server.reset_seq(agent.user_id)  # no replay: only catch-up can bring it back
        server.faults.clear()
        await run.wait_for(lambda: len(run.runtime.finished) == 1, timeout=10)
    assert run.runtime.texts() == [["while away"]]
    assert run.runtime.turns[0].event.origin == "catch_up"


@pytest.mark.asyncio
async def test_catch_up_deleted_sources_stale_tasks_and_transient_failures(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    bob = server.add_user("Bob")
    flaky = server.post_message(direct.id, ada.id, "cannot be fetched yet")  # oldest: fetched first
    gone = server.post_message(direct.id, ada.id, "deleted before catch-up")
    server.delete_message(gone.id)
    stale = server.assign_task("Stale", assignee_id=agent.user_id, creator_id=ada.id)
    server.update_task(stale.id, assignee_id=bob.id)
    server.fail_next(p.GET_MESSAGE, status=503, times=4)  # first fetch of `flaky`, all retries
    # One fetch at a time, so that the four failures all land on `flaky`.
    async with running(server, agent, ready=False, fetch_concurrency=1) as run:
        # The first pass (at start) leaves `flaky` pending, acks the deleted message and
        # the stale task without a turn; a later pass (after hello) fetches `flaky`.
        await run.wait_for(lambda: not run.pending())
    assert run.runtime.texts() == [["cannot be fetched yet"]]
    failed_fetches = [r for r in server.requests if r.status == 503 and r.path.endswith(flaky.id)]
    assert len(failed_fetches) == 4


@pytest.mark.asyncio
async def test_recovery_overflow_runs_a_full_catch_up(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    async with running(server, agent) as run:
        posted = server.post_message(direct.id, ada.id, "lost in transit")
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
        listed = len([r for r in server.requests if r.path.endswith("/dispatch")])
        server.emit(agent.user_id, p.FRAME_RECOVERY_OVERFLOW, {})
        await run.wait_for(
            lambda: len([r for r in server.requests if r.path.endswith("/dispatch")]) > listed
        )
        assert posted.id not in run.pending()


# --- chats, typing, heartbeat, config ------------------------------------------------------------


@pytest.mark.asyncio
async def test_chat_cache_loaded_on_hello_updated_and_fetched_on_demand(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    team = group(server, agent, ada, None)
    async with running(server, agent) as run:
        assert any(r.path.endswith("/chats") for r in server.requests)
        server.update_chat(team.id, name="Renamed", agent_routing_mode="active")
        server.post_message(team.id, ada.id, "no mention needed now")
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
        assert f'"Renamed" ({team.id})' in run.runtime.turns[0].body
        assert not any(r.path.endswith(f"/chats/{team.id}") for r in server.requests)
        late = server.add_chat(type="direct", members=[ada.id, agent.user_id])
        server.post_message(late.id, ada.id, "new chat")
        await run.wait_for(lambda: len(run.runtime.finished) == 2)
        assert any(r.path.endswith(f"/chats/{late.id}") for r in server.requests)


@pytest.mark.asyncio
async def test_typing_refreshed_while_a_turn_runs_and_stopped_after(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    gate = Gate()
    async with running(server, agent, ScriptedRuntime(gate), typing_refresh=0.05) as run:
        server.post_message(direct.id, ada.id, "hi")

        def typing() -> list[Mapping[str, Any]]:
            return [f.data for f in server.ws_frames if f.type == p.FRAME_TYPING]

        await run.wait_for(lambda: len(typing()) >= 3)
        assert all(frame == {"chat_id": direct.id, "action": "start"} for frame in typing())
        gate.open.set()
        await run.wait_for(lambda: typing()[-1]["action"] == "stop")
        count = len(typing())
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
    assert len(typing()) == count  # nothing after the stop


@pytest.mark.asyncio
async def test_heartbeat_frames_with_host_metrics(agent: AgentAccount) -> None:
    async with FakeParallServer(heartbeat_interval=0.2) as fast:
        bot = fast.add_agent("Bot", api_key="pk_hb")
        async with running(fast, bot) as run:

            def beats() -> list[ClientFrame]:
                return [f for f in fast.ws_frames if f.type == p.FRAME_AGENT_HEARTBEAT]

            await run.wait_for(lambda: len(beats()) >= 2)
            data = beats()[0].data
            assert data["session_id"] == fast.ws_connections[-1].session_id
            assert {"hostname", "cores", "mem_total", "mem_free", "uptime"} <= set(data)
            assert data["mem_total"] >= data["mem_free"] > 0


@pytest.mark.asyncio
async def test_platform_config_at_start_and_on_update_failures_not_fatal(
    server: FakeParallServer, agent: AgentAccount, caplog: pytest.LogCaptureFixture
) -> None:
    server.set_agent_config(agent.user_id, {"models": ["m1"]})
    async with running(server, agent) as run:
        assert [c.extra.get("models") for c in run.runtime.configs] == [["m1"]]
        server.set_agent_config(agent.user_id, {"models": ["m2"]})
        await run.wait_for(lambda: len(run.runtime.configs) == 2)
        assert run.runtime.configs[-1].extra["models"] == ["m2"]
        server.fail_next(p.AGENT_CONFIG, status=500, times=10)
        server.set_agent_config(agent.user_id, {"models": ["m3"]})
        await run.wait_for(lambda: "platform config not applied" in caplog.text)
    assert len(run.runtime.configs) == 2


# --- start-up and failure modes ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_bad_credentials_fail_fast(server: FakeParallServer, agent: AgentAccount) -> None:
    config = GatewayConfig(server.url, "pk_wrong", server.org_id)
    gateway = Gateway(config, ScriptedRuntime(), backoff=FAST_BACKOFF)
    before = library_tasks()
    with pytest.raises(AuthenticationError):
        await asyncio.wait_for(gateway.start(asyncio.Event()), 5.0)
    assert len([r for r in server.requests if r.path == p.ME.path]) == 1
    with pytest.raises(AuthenticationError):
        await gateway.wait_ready()
    assert library_tasks(before) == set()


@pytest.mark.asyncio
async def test_agent_id_is_checked(server: FakeParallServer, agent: AgentAccount) -> None:
    config = make_config(server, agent, agent_id="usr_someone_else")
    with pytest.raises(ConfigurationError, match="usr_someone_else"):
        await Gateway(config, ScriptedRuntime(), backoff=FAST_BACKOFF).start(asyncio.Event())
    async with running(server, agent, agent_id=agent.user_id) as run:
        assert run.gateway.agent_id == agent.user_id


@pytest.mark.asyncio
async def test_transient_outage_at_start_is_retried(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    server.fail_next(p.ME, status=503, times=6)
    server.fail_next(p.CREATE_AGENT_SESSION, status=429, retry_after=0.01, times=5)
    server.refuse_ws(3)
    async with running(server, agent) as run:
        assert run.gateway.session_id is not None
    assert len(server.sessions(agent.user_id)) == 1


@pytest.mark.asyncio
async def test_4003_shuts_down_cleanly_then_raises(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    runtime = ScriptedRuntime()
    gateway = Gateway(make_config(server, agent), runtime, backoff=FAST_BACKOFF)
    before = library_tasks()
    task = asyncio.get_running_loop().create_task(gateway.start(asyncio.Event()))
    await asyncio.wait_for(gateway.wait_ready(), 5.0)
    server.revoke_key(agent.api_key)
    with pytest.raises(WebSocketClosedError) as info:
        await asyncio.wait_for(task, 10.0)
    assert info.value.code == p.CLOSE_FORBIDDEN
    assert runtime.stopped
    assert library_tasks(before) == set()


@pytest.mark.asyncio
async def test_abort_before_ready_returns_cleanly(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    server.fail_next(p.ME, status=503, times=1000)
    abort = asyncio.Event()
    async with ParallClient(server.url, agent.api_key, retry=FAST_RETRY) as client:
        gateway = Gateway(
            make_config(server, agent), ScriptedRuntime(), client=client, backoff=FAST_BACKOFF
        )
        task = asyncio.get_running_loop().create_task(gateway.start(abort))
        await server.wait_for(lambda: len([r for r in server.requests if r.path == p.ME.path]) >= 8)
        abort.set()
        await asyncio.wait_for(task, 5.0)
    with pytest.raises(RuntimeError, match="before it was ready"):
        await gateway.wait_ready()


@pytest.mark.asyncio
async def test_stats_and_feed(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    gate = Gate()
    gateway = Gateway(make_config(server, agent), ScriptedRuntime(gate))
    with pytest.raises(RuntimeError, match="not running"):
        await gateway.feed(p.FRAME_MESSAGE_NEW, {})
    assert gateway.stats().connection == "disconnected"
    async with running(server, agent, ScriptedRuntime(gate)) as run:
        message = server.post_message(direct.id, ada.id, "x")
        await run.wait_for(lambda: run.gateway.stats().active_turns == 1)
        # The seam takes the raw wire payload too, and dedupes against the live copy.
        raw = {
            "id": message.id,
            "chat_id": direct.id,
            "sender_id": ada.id,
            "message_type": "text",
            "content": {"text": "x"},
        }
        assert await run.gateway.feed(p.FRAME_MESSAGE_NEW, raw) is False
        stats = run.gateway.stats()
        assert stats.ledger["running"] == 1
        assert stats.main_busy
        assert stats.connection == "connected"
        gate.open.set()
        # done (its acks owed), then acked once they reached the platform
        await run.wait_for(lambda: run.gateway.stats().ledger["acked"] == 1)
        assert run.gateway.stats().acks_sent == 1
        stats = run.gateway.stats()
        assert (stats.turns_started, stats.turns_succeeded, stats.turns_failed) == (1, 1, 0)


@pytest.mark.asyncio
async def test_logs_go_through_parall_bridge_loggers(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    direct: Chat,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    async with running(server, agent) as run:
        server.post_message(direct.id, ada.id, "hi")
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
    ours = {r.name for r in all_logs.records if not r.name.startswith("parall_bridge.testing")}
    assert ours
    assert all(
        name.startswith("parall_bridge") or name in {"asyncio", "aiohttp.access"} for name in ours
    )
    assert logging.getLogger("parall_bridge").handlers == []  # the library installs no handler


@pytest.mark.asyncio
async def test_heartbeat_drift_warns_of_a_blocked_event_loop(
    agent: AgentAccount, caplog: pytest.LogCaptureFixture
) -> None:
    async def blocks_the_loop(turn: Turn) -> str | None:
        # Longer than the heartbeat interval (1 s, the shortest a client takes), so a beat
        # falls due while the loop is blocked; shorter than the dead-connection bound.
        time.sleep(1.3)  # noqa: ASYNC251 - a runtime that blocks the loop: what the warning reveals
        return "ok"

    async with FakeParallServer(heartbeat_interval=1.0) as fast:
        bot = fast.add_agent("Bot", api_key="pk_drift")
        ada = fast.add_user("Ada")
        chat = fast.add_chat(type="direct", members=[ada.id, bot.user_id])
        runtime = ScriptedRuntime(blocks_the_loop)
        async with running(fast, bot, runtime, heartbeat_drift_warning=0.2) as run:
            fast.post_message(chat.id, ada.id, "hi")
            await run.wait_for(lambda: "event loop may be blocked" in caplog.text)


@pytest.mark.asyncio
async def test_a_turn_past_turn_timeout_is_cancelled_and_counts_as_a_failure(
    server: FakeParallServer, agent: AgentAccount, ada: User, direct: Chat
) -> None:
    cancelled = asyncio.Event()

    async def hangs(turn: Turn) -> str | None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return None

    async with running(server, agent, ScriptedRuntime(hangs), turn_timeout=0.2) as run:
        posted = server.post_message(direct.id, ada.id, "hi")
        await run.wait_for(lambda: len(run.steps(StepType.ERROR)) == 1)
        assert cancelled.is_set()
        assert run.pending() == [posted.id]  # not acked: retried later
    (error,) = run.steps(StepType.ERROR)
    assert error.content == {"message": "turn timed out after 0.2 s", "attempts": 1}


class SyncRunTurn(AgentRuntime):
    def run_turn(self, turn: Turn) -> str | None:  # type: ignore[override]
        return "a plain def"


def test_a_run_turn_that_is_not_async_is_refused_at_construction() -> None:
    config = GatewayConfig("http://127.0.0.1:9", "pk_x", "org_x")
    with pytest.raises(TypeError, match=r"SyncRunTurn.run_turn must be a coroutine function"):
        Gateway(config, SyncRunTurn())
    with pytest.raises(TypeError, match="runtime must be an AgentRuntime"):
        Gateway(config, object())  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_human_users_key_is_warned_about(
    server: FakeParallServer, all_logs: pytest.LogCaptureFixture
) -> None:
    human = server.add_user("Ada")
    account = AgentAccount(user=human, api_key=server.add_api_key(human.id))
    async with running(server, account):
        pass
    warnings = [r.getMessage() for r in all_logs.records if r.levelname == "WARNING"]
    assert "the API key belongs to a human user, not an agent" in warnings
