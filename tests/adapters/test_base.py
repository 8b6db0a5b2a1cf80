"""The adapters' shared base, through a real gateway against the emulator: a history per
session saved only when a turn succeeds, forks, seeding from the chat, and the Parall tools
(with a framework-free runtime whose messages are strings)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import pytest

from parall_bridge import ForkOutcome, Gateway, SessionRef, TaskStatus, Turn
from parall_bridge import protocol as p
from parall_bridge.adapters.base import (
    SEED_HEADING,
    ChatEntry,
    HistoryRuntime,
    ParallToolError,
    ParallTools,
    TurnOutput,
    seed_transcript,
    tool_failure_text,
)
from parall_bridge.models import Chat, User
from parall_bridge.testing import AgentAccount, FakeParallServer, running_gateway


def succeeded(gateway: Gateway, count: int) -> bool:
    return gateway.stats().turns_succeeded == count


Behaviour = Callable[[Turn, ParallTools], Awaitable[None]]


class Script(HistoryRuntime[str]):
    """Messages are strings; each turn adds ``user: <prompt>`` and ``agent: ok``; the seed
    is one message, the transcript (as the adapters seed)."""

    def __init__(self, behaviour: Behaviour | None = None, **options: int | None) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.behaviour = behaviour
        self.seen: list[tuple[str, tuple[str, ...]]] = []

    def seed_messages(self, turn: Turn, entries: Sequence[ChatEntry]) -> Sequence[str]:
        return [f"user: {seed_transcript(entries)}"]

    async def run_with_history(
        self, turn: Turn, history: Sequence[str], tools: ParallTools
    ) -> TurnOutput[str]:
        self.seen.append((turn.session_key, tuple(history)))
        assert ParallTools.current() is tools
        if self.behaviour is not None:
            await self.behaviour(turn, tools)
        return TurnOutput([f"user: {turn.prompt()}", "agent: ok"], "ok")


def reply(text: str) -> Behaviour:
    async def act(turn: Turn, tools: ParallTools) -> None:
        await tools.send_message(text)

    return act


@pytest.mark.asyncio
async def test_a_history_per_session_grows_with_each_successful_turn(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    runtime = Script(reply("hi"), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "one")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
        server.post_message(room.id, ada.id, "two")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 2)
    key = runtime.seen[0][0]
    assert runtime.seen[0][1] == ()
    assert runtime.history(key)[:2] == runtime.seen[1][1]
    assert len(runtime.history(key)) == 4
    assert runtime.history(key)[2].endswith("two")
    replies = [m for m in server.messages(room.id) if m.sender_id == agent.user_id]
    assert len(replies) == 2


@pytest.mark.asyncio
async def test_a_failed_turn_leaves_the_history_as_it_was(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    failing = {"yes": True}

    async def maybe_fail(turn: Turn, tools: ParallTools) -> None:
        if failing["yes"] and "two" in turn.prompt():
            failing["yes"] = False
            raise RuntimeError("the model is down")

    runtime = Script(maybe_fail, seed_history=0)
    async with running_gateway(server, agent, runtime, reconcile_interval=0.2) as gateway:
        server.post_message(room.id, ada.id, "one")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
        key = runtime.seen[0][0]
        before = runtime.history(key)
        server.post_message(room.id, ada.id, "two")
        await server.wait_for(lambda: gateway.stats().turns_failed == 1)
        assert runtime.history(key) == before
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 2)
    assert runtime.seen[2][1] == before  # the retry ran on the history before the failure
    assert len(runtime.history(key)) == 4


@pytest.mark.asyncio
async def test_a_cancelled_turn_leaves_the_history_as_it_was(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    started = asyncio.Event()

    async def hang(turn: Turn, tools: ParallTools) -> None:
        if "two" in turn.prompt():
            started.set()
            await asyncio.Event().wait()

    runtime = Script(hang, seed_history=0)
    async with running_gateway(server, agent, runtime, shutdown_grace=0) as gateway:
        server.post_message(room.id, ada.id, "one")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
        key = runtime.seen[0][0]
        before = runtime.history(key)
        server.post_message(room.id, ada.id, "two")
        await asyncio.wait_for(started.wait(), 10)
    # leaving the block shut the gateway down, cancelling the hanging turn
    assert gateway.stats().turns_cancelled == 1
    assert runtime.history(key) == before


@pytest.mark.asyncio
async def test_a_fork_starts_from_the_parents_history_and_keeps_its_own() -> None:
    runtime = Script(seed_history=0)
    parent = SessionRef("agent:main:parall:a")
    runtime._histories[parent.key] = (("user: one", "agent: ok"),)
    child = await runtime.fork_session(parent)
    assert child is not None
    assert child.key != parent.key
    assert runtime.history(child.key) == ("user: one", "agent: ok")
    runtime._histories[child.key] += (("user: fork", "agent: ok"),)
    assert runtime.history(parent.key) == ("user: one", "agent: ok")
    assert runtime.session_keys() == (parent.key, child.key)
    await runtime.release_session(child, ForkOutcome(handled=1, failed=0))
    assert runtime.session_keys() == (parent.key,)
    assert not runtime.has_history(child.key)
    assert runtime.has_history(parent.key)


@pytest.mark.asyncio
async def test_a_fresh_session_is_seeded_from_the_chat_before_its_events(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    team = server.add_chat(type="group", name="Team", members=[ada.id, agent.user_id])
    for n in range(4):  # not mentioned in a passive group: nothing dispatched
        server.post_message(team.id, ada.id, f"old {n}")
        server.post_message(team.id, agent.user_id, f"answer {n}")
    assert server.dispatch_items(agent.user_id) == []
    runtime = Script(reply("hello again"), seed_history=5)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(team.id, ada.id, "new", mentions=[agent.user_id])
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    (seeded,) = runtime.seen[0][1]
    # one user message: the agent's own replies are marked as sent with send_message, never
    # plain assistant text (which a model may imitate, answering where nobody sees it)
    assert seeded == "user: " + "\n".join(
        [
            'Earlier messages of this chat, oldest first (those marked "(you)" are yours, '
            "sent with send_message):",
            "Bot (you): answer 1",
            "Ada: old 2",
            "Bot (you): answer 2",
            "Ada: old 3",
            "Bot (you): answer 3",
        ]
    )
    assert runtime.history(runtime.seen[0][0])[0] == seeded


@pytest.mark.asyncio
async def test_a_seed_larger_than_a_page_reads_several_pages(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    team = server.add_chat(type="group", name="Team", members=[ada.id, agent.user_id])
    for n in range(160):  # not mentioned in a passive group: nothing dispatched
        server.post_message(team.id, ada.id, f"old {n}")
    runtime = Script(seed_history=150)  # the emulator's pages hold at most 100
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(team.id, ada.id, "new", mentions=[agent.user_id])
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    (seeded,) = runtime.seen[0][1]
    assert seeded.splitlines() == [
        f"user: {SEED_HEADING}",
        *(f"Ada: old {n}" for n in range(10, 160)),
    ]


@pytest.mark.asyncio
async def test_history_turns_drops_whole_old_turns(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    runtime = Script(seed_history=0, history_turns=2)
    async with running_gateway(server, agent, runtime) as gateway:
        for n in range(3):
            server.post_message(room.id, ada.id, f"m{n}")
            await server.wait_for(partial(succeeded, gateway, n + 1))
    history = runtime.history(runtime.seen[0][0])
    assert len(history) == 4
    assert history[0].endswith("m1")


@pytest.mark.asyncio
async def test_the_tools_act_through_the_turn(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    results: dict[str, object] = {}

    async def act(turn: Turn, tools: ParallTools) -> None:
        results["sent"] = await tools.send_message("the answer")
        results["history"] = await tools.get_chat_history(limit=2)
        results["file"] = await tools.upload_file("notes.md", "# Notes", "text/markdown")
        for name, call in (
            ("no task", tools.update_task("done")),
            ("empty", tools.send_message("  ")),
            ("limit", tools.get_chat_history(limit=0)),
        ):
            with pytest.raises(ParallToolError) as error:
                await call
            results[name] = str(error.value)

    runtime = Script(act, seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "question")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    messages = server.messages(room.id)
    sent = next(m for m in messages if m.id == results["sent"])
    assert sent.content.text == "the answer"  # type: ignore[union-attr]
    assert results["history"] == (f"[{messages[0].id}] Ada: question\n[{sent.id}] Bot: the answer")
    posted = next(m for m in messages if m.id == results["file"])
    assert posted.content.text == "notes.md"  # type: ignore[union-attr]
    assert server.uploaded_bytes(posted.attachment_ids[0]) == b"# Notes"
    assert "not a task" in str(results["no task"])
    assert "non-empty" in str(results["empty"])
    assert "1 to 100" in str(results["limit"])
    keys = [
        r.json["idempotency_key"]
        for r in server.requests
        if r.method == "POST" and r.path.endswith("/messages") and r.json
    ]
    turn_ids = {key.rsplit(":", 2)[1] for key in keys}
    assert len(keys) == 2
    assert len(turn_ids) == 1
    assert all(key.startswith(f"pb:{agent.user_id}:") for key in keys)


@pytest.mark.asyncio
async def test_posts_called_together_land_in_call_order(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """The OpenAI Agents SDK and LangGraph's ToolNode run a response's tool calls
    concurrently: a slow first post must not be overtaken by the second."""

    async def act(turn: Turn, tools: ParallTools) -> None:
        server.delay_next(p.SEND_MESSAGE, 0.3)  # the first post is slow
        await asyncio.gather(
            tools.send_message("first"),
            tools.upload_file("second.md", "# Second"),
            tools.send_message("third"),
        )

    runtime = Script(act, seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "question")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    texts = {m.id: m.content.text for m in server.messages(room.id)}  # type: ignore[union-attr]
    posted = [text for text in texts.values() if text != "question"]
    assert posted == ["first", "second.md", "third"]
    # each post's key is numbered in that order too (a rerun reuses the same keys)
    by_key = {key.rsplit(":", 1)[1]: texts[m] for key, m in server.idempotency_keys().items()}
    assert by_key == {"1": "first", "2": "second.md", "3": "third"}


@pytest.mark.asyncio
async def test_update_task_sets_the_turns_task(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    errors: list[str] = []

    async def act(turn: Turn, tools: ParallTools) -> None:
        with pytest.raises(ParallToolError) as error:
            await tools.send_message("hello")
        errors.append(str(error.value))
        with pytest.raises(ParallToolError) as error:
            await tools.update_task("finished")
        errors.append(str(error.value))
        assert await tools.update_task("In_Review") == "in_review"

    runtime = Script(act)
    async with running_gateway(server, agent, runtime) as gateway:
        task = server.assign_task("Ship it", assignee_id=agent.user_id, creator_id=ada.id)
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    assert server.get_task(task.id).status == TaskStatus.IN_REVIEW
    assert "not a chat" in errors[0]
    assert "unknown status 'finished'" in errors[1]


def test_the_tools_outside_a_turn_say_so() -> None:
    with pytest.raises(ParallToolError, match="inside a turn"):
        ParallTools.current()


def test_importing_the_package_imports_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, parall_bridge, parall_bridge.adapters, parall_bridge.adapters.base\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('pydantic_ai', 'agents', 'openai', 'langgraph', 'langchain_core', 'pydantic')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run(  # noqa: S603 (our own interpreter and code)
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.asyncio
async def test_a_platform_refusal_is_a_tool_error(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    errors: list[str] = []

    async def act(turn: Turn, tools: ParallTools) -> None:
        for endpoint, call in (
            (p.LIST_CHAT_MESSAGES, tools.get_chat_history),
            (p.SEND_MESSAGE, partial(tools.send_message, "hi")),
        ):
            server.fail_next(endpoint, status=403)
            with pytest.raises(ParallToolError) as error:
                await call()
            errors.append(str(error.value))

    runtime = Script(act, seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "question")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    assert errors[0].startswith("the platform refused the history")
    assert errors[1].startswith("the platform refused the message")


def test_an_unexpected_tool_failure_reads_the_same_in_every_adapter() -> None:
    assert tool_failure_text("get_chat_history", KeyError("gone")) == (
        "get_chat_history failed: KeyError: 'gone'"
    )
    assert tool_failure_text("send_message", RuntimeError()) == "send_message failed: RuntimeError"
