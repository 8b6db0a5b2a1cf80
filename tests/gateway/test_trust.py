"""Only what is the agent's reaches the agent (the hardening issue, item 3): events of
another org or another assignee are logged and never dispatched, and a huge message or
task description reaches the turn cut to ``max_body_chars`` with a visible marker."""

from __future__ import annotations

import logging

import attrs
import pytest

from parall_bridge import protocol as p
from parall_bridge.models import Chat, User
from parall_bridge.testing import AgentAccount, FakeParallServer

from ._harness import ScriptedRuntime, running


@pytest.mark.asyncio
async def test_a_task_of_another_org_is_never_dispatched(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="parall_bridge")
    task = server.assign_task("ours", assignee_id=agent.user_id, creator_id=ada.id)
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime) as run:
        await run.wait_for(lambda: len(runtime.finished) == 1)  # our own task ran
        foreign = attrs.evolve(task, id="tsk_foreign", org_id="org_other")
        assert await run.gateway.feed(p.FRAME_TASK_ASSIGNED, foreign) is False
        assert await run.gateway.feed(p.FRAME_TASK_ASSIGNED, foreign) is False
    assert [t.event.task_id for t in runtime.turns] == [task.id]
    assert any("another org (org_other)" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_a_task_assigned_to_someone_else_is_never_dispatched(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    bob = server.add_user("Bob")
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime) as run:
        task = server.assign_task("Bob's", assignee_id=bob.id, creator_id=ada.id)
        assert await run.gateway.feed(p.FRAME_TASK_ASSIGNED, server.get_task(task.id)) is False
        assert run.gateway.stats().ledger["queued"] == 0
    assert runtime.turns == []


@pytest.mark.asyncio
async def test_a_huge_message_reaches_the_turn_cut_with_a_marker(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="parall_bridge")
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime, max_body_chars=100) as run:
        message = server.post_message(room.id, ada.id, "x" * 250)
        await run.wait_for(lambda: len(runtime.finished) == 1)
    (turn,) = runtime.turns
    assert turn.event.text == "x" * 100 + "\n[... truncated: 150 more characters]"
    assert turn.body.endswith(turn.event.text)
    assert any(
        f"{message.id} has 250 characters: only the first 100" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.asyncio
async def test_a_huge_task_description_is_cut_too(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime, max_body_chars=50) as run:
        server.assign_task(
            "big", assignee_id=agent.user_id, creator_id=ada.id, description="d" * 500
        )
        await run.wait_for(lambda: len(runtime.finished) == 1)
    text = runtime.turns[0].event.text
    assert text.endswith("d" * 50 + "\n[... truncated: 450 more characters]")
    assert "d" * 51 not in text


@pytest.mark.asyncio
async def test_a_message_within_the_limit_is_untouched(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime, max_body_chars=5) as run:
        server.post_message(room.id, ada.id, "hello")
        await run.wait_for(lambda: len(runtime.finished) == 1)
    assert runtime.turns[0].event.text == "hello"
