"""The Pydantic AI adapter end to end: a real gateway against the emulator, the agent driven
by Pydantic AI's own offline models (``FunctionModel`` scripted per turn, ``TestModel``).

Each test checks what reaches the platform (replies, steps, task statuses) and what the
model saw (the messages ``FunctionModel`` was given)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import attrs
import pytest
from pydantic_ai import Agent, RunContext, UsageLimits
from pydantic_ai.agent import AbstractAgent, EventStreamHandler, WrapperAgent
from pydantic_ai.capabilities import ProcessEventStream
from pydantic_ai.messages import (
    AgentStreamEvent,
    FunctionToolCallEvent,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    NativeToolCallPart,
    NativeToolReturnPart,
    ThinkingPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import (
    AgentInfo,
    BuiltinToolCallsReturns,
    DeltaThinkingCalls,
    DeltaThinkingPart,
    DeltaToolCall,
    DeltaToolCalls,
    FunctionModel,
)
from pydantic_ai.models.test import TestModel
from pydantic_ai.toolsets import FunctionToolset

from parall_bridge import SessionRef, StepType, TaskStatus, Turn
from parall_bridge import protocol as p
from parall_bridge.adapters.base import (
    REPLY_INSTRUCTIONS,
    SEED_HEADING,
    TOOL_NAMES,
    ParallTools,
    TurnOutput,
)
from parall_bridge.adapters.pydantic_ai import DEFAULT_INSTRUCTIONS, PydanticAIRuntime
from parall_bridge.models import AgentStep, Chat, User
from parall_bridge.testing import AgentAccount, FakeParallServer, running_gateway

from ..conftest import library_tasks
from ..test_examples import load, run_example

MAIN = "agent:main:parall:default"


# --- a scripted model ---------------------------------------------------------------------


@attrs.define(eq=False)
class Block:
    """A chunk that blocks the model's stream (or a tool) until released; records that its
    waiting ended in a cancellation."""

    started: asyncio.Event = attrs.field(factory=asyncio.Event)
    release: asyncio.Event = attrs.field(factory=asyncio.Event)
    cancelled: bool = False

    async def wait(self) -> None:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


Chunk: TypeAlias = str | DeltaToolCalls | DeltaThinkingCalls | BuiltinToolCallsReturns | Block
Response: TypeAlias = Sequence[Chunk]


def think(text: str) -> DeltaThinkingCalls:
    """A piece of a thinking part (part 0 of the response)."""
    return {0: DeltaThinkingPart(content=text)}


def call(name: str, args: Mapping[str, Any], call_id: str, index: int = 1) -> DeltaToolCalls:
    """A whole tool call (part ``index`` of the response)."""
    return {index: DeltaToolCall(name=name, json_args=json.dumps(args), tool_call_id=call_id)}


def send(text: str, call_id: str, index: int = 1) -> DeltaToolCalls:
    """A call of the Parall send_message tool."""
    return call("send_message", {"text": text}, call_id, index)


def native(index: int, part: NativeToolCallPart | NativeToolReturnPart) -> BuiltinToolCallsReturns:
    """A provider-run tool's call or return, whole (part ``index`` of the response)."""
    return {index: part}


def current_prompt(messages: Sequence[ModelMessage]) -> tuple[str, int]:
    """The prompt of the running turn (the last user prompt) and how many responses the
    model gave since."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if isinstance(message, ModelRequest):
            prompts = [part.content for part in message.parts if isinstance(part, UserPromptPart)]
            if prompts:
                responses = sum(isinstance(m, ModelResponse) for m in messages[i + 1 :])
                return str(prompts[-1]), responses
    raise AssertionError("no user prompt in the request")


@attrs.define(eq=False)
class Seen:
    """One request the model got."""

    key: str
    step: int
    messages: list[ModelMessage]
    info: AgentInfo


class Scripted:
    """A ``FunctionModel`` stream function: the turn whose prompt holds ``key`` gets the
    responses ``scripts[key]`` in order, then ``Done.``."""

    def __init__(self, scripts: Mapping[str, Sequence[Response]]) -> None:
        self.scripts = scripts
        self.seen: list[Seen] = []

    def model(self) -> FunctionModel:
        return FunctionModel(stream_function=self)

    def requests(self, key: str, step: int = 0) -> list[Seen]:
        return [s for s in self.seen if s.key == key and s.step == step]

    async def __call__(
        self, messages: list[ModelMessage], info: AgentInfo
    ) -> AsyncIterator[str | DeltaToolCalls | DeltaThinkingCalls | BuiltinToolCallsReturns]:
        prompt, step = current_prompt(messages)
        key = next(k for k in self.scripts if k in prompt)
        self.seen.append(Seen(key, step, list(messages), info))
        responses = self.scripts[key]
        for chunk in responses[step] if step < len(responses) else ["Done."]:
            if isinstance(chunk, Block):
                await chunk.wait()
            else:
                yield chunk


class Recording(PydanticAIRuntime):
    """The runtime under test, noting the sessions its turns ran on and its forks; its
    turns get Parall tools of ``tools_type``."""

    def __init__(
        self,
        agent: AbstractAgent[Any, Any],
        tools_type: type[ParallTools] = ParallTools,
        **options: Any,
    ) -> None:
        super().__init__(agent, **options)
        self.tools_type = tools_type
        self.sessions: list[str] = []
        self.forks: list[SessionRef] = []

    async def run_with_history(
        self, turn: Turn, history: Sequence[ModelMessage], tools: ParallTools
    ) -> TurnOutput[ModelMessage]:
        self.sessions.append(turn.session_key)
        if self.tools_type is not ParallTools:
            tools = self.tools_type(turn)
        return await super().run_with_history(turn, history, tools)

    async def fork_session(self, parent: SessionRef) -> SessionRef | None:
        child = await super().fork_session(parent)
        assert child is not None
        self.forks.append(child)
        return child


class BuggyTools(ParallTools):
    """Parall tools whose get_chat_history(limit=13) fails as a bug would: not with a
    ``ParallToolError``."""

    async def get_chat_history(self, limit: int = 20) -> str:
        if limit == 13:
            raise KeyError("the index is corrupt")
        return await super().get_chat_history(limit)


# --- helpers ------------------------------------------------------------------------------


def replies(server: FakeParallServer, chat: Chat, agent: AgentAccount) -> list[str]:
    return [
        m.content.text  # type: ignore[union-attr]
        for m in server.messages(chat.id)
        if m.sender_id == agent.user_id
    ]


def results(steps: Sequence[AgentStep]) -> dict[str, Mapping[str, Any]]:
    """The tool result steps by call id."""
    return {s.content["call_id"]: s.content for s in steps if s.step_type == StepType.TOOL_RESULT}


def prompts(messages: Sequence[ModelMessage]) -> list[str]:
    return [
        str(part.content)
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart)
    ]


def returns(messages: Sequence[ModelMessage]) -> dict[str, ToolReturnPart]:
    return {
        part.tool_call_id: part
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart)
    }


def active_groups(
    server: FakeParallServer, agent: AgentAccount, ada: User, count: int
) -> list[Chat]:
    return [
        server.add_chat(
            type="group",
            name=f"room{i}",
            members=[ada.id, agent.user_id],
            agent_routing_mode="active",
        )
        for i in range(count)
    ]


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_message_is_answered_once_and_its_stream_recorded_in_order(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    script = Scripted(
        {
            "hello": [
                [think("Ada greets me. "), think("I should answer."), send("Hi Ada!", "call_hi")],
                ["Replied to Ada."],
            ],
            "again": [
                [  # a provider-run (native) tool, then a function tool
                    native(0, NativeToolCallPart("web_search", {"query": "Ada"}, "ws_1")),
                    native(1, NativeToolReturnPart("web_search", {"hits": 3}, "ws_1")),
                    send("Hi again!", "call_again", index=2),
                ],
                ["Replied again."],
            ],
        }
    )
    runtime = Recording(Agent(script.model()), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "hello")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
        first_steps = len(server.steps(agent.user_id))
        server.post_message(room.id, ada.id, "again")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 2)
    assert replies(server, room, agent) == ["Hi Ada!", "Hi again!"]  # each once
    steps = server.steps(agent.user_id)
    first, second_steps = steps[:first_steps], steps[first_steps:]
    assert [s.step_type for s in first] == [
        StepType.INPUT,
        StepType.THINKING,
        StepType.TOOL_CALL,
        StepType.TOOL_RESULT,
        StepType.TEXT,
    ]
    _, thinking, tool_call, tool_result, text = first
    assert thinking.content == {"text": "Ada greets me. I should answer."}
    assert tool_call.content == {
        "call_id": "call_hi",
        "name": "send_message",
        "args": {"text": "Hi Ada!"},
    }
    reply_id = next(m.id for m in server.messages(room.id) if m.sender_id == agent.user_id)
    assert tool_result.content == {"call_id": "call_hi", "output": reply_id}
    assert text.content == {"text": "Replied to Ada.", "suppressed": True}
    # one response: thinking and its tool call; the next response: the text
    assert thinking.group_key == tool_call.group_key == tool_result.group_key
    assert text.group_key != tool_call.group_key
    assert [(s.step_type, s.content.get("call_id")) for s in second_steps] == [
        (StepType.INPUT, None),
        (StepType.TOOL_CALL, "ws_1"),
        (StepType.TOOL_RESULT, "ws_1"),
        (StepType.TOOL_CALL, "call_again"),
        (StepType.TOOL_RESULT, "call_again"),
        (StepType.TEXT, None),
    ]
    assert second_steps[1].content["args"] == {"query": "Ada"}
    assert second_steps[2].content["output"] == {"hits": 3}
    assert script.requests("hello")[0].info.instructions == REPLY_INSTRUCTIONS
    assert DEFAULT_INSTRUCTIONS is REPLY_INSTRUCTIONS  # the old name still works
    # the second turn ran on the first one's history, as Pydantic AI messages
    (second,) = script.requests("again")
    assert prompts(second.messages)[0].endswith("hello")
    assert prompts(second.messages)[1].endswith("again")
    history = runtime.history(runtime.sessions[0])
    assert [type(m).__name__ for m in history] == [
        "ModelRequest",  # hello
        "ModelResponse",  # thinking + send_message
        "ModelRequest",  # its result
        "ModelResponse",  # the text
        "ModelRequest",  # again
        "ModelResponse",
        "ModelRequest",
        "ModelResponse",
    ]
    assert isinstance(history[1], ModelResponse)
    assert isinstance(history[1].parts[0], ThinkingPart)
    assert isinstance(history[1].parts[1], ToolCallPart)
    assert history[1].parts[1].tool_call_id == "call_hi"
    assert second.messages[: len(history) // 2] == list(history[:4])


@pytest.mark.asyncio
async def test_tool_errors_reach_the_model_as_errors_and_the_turn_goes_on(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    script = Scripted(
        {
            "help": [
                [  # two failures at once, by two tools
                    call("update_task", {"status": "done"}, "call_task", index=1),
                    call("get_chat_history", {"limit": 0}, "call_limit", index=2),
                ],
                [send("   ", "call_empty_1")],  # send_message fails twice in a row:
                [send("   ", "call_empty_2")],  # more than Pydantic AI's default retries
                [call("send_message", {"txt": "hi"}, "call_bad_args")],  # invalid arguments
                [call("get_chat_history", {"limit": 5}, "call_down")],  # the platform fails
                [call("get_chat_history", {"limit": 13}, "call_bug")],  # the tool has a bug
                [send("Sorry, here I am.", "call_ok")],
                ["Answered."],
            ]
        }
    )
    runtime = Recording(Agent(script.model()), BuggyTools, seed_history=0)
    server.fail_next(p.LIST_CHAT_MESSAGES, status=404)  # only get_chat_history lists them
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "help")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
        assert gateway.stats().turns_failed == 0
    assert replies(server, room, agent) == ["Sorry, here I am."]
    by_id = results(server.steps(agent.user_id))
    assert "not a task" in by_id["call_task"]["error"]
    assert "1 to 100" in by_id["call_limit"]["error"]
    assert "non-empty" in by_id["call_empty_1"]["error"]
    assert "non-empty" in by_id["call_empty_2"]["error"]
    assert "text" in by_id["call_bad_args"]["error"]  # the missing argument, named
    assert "the platform refused" in by_id["call_down"]["error"]
    assert "404" in by_id["call_down"]["error"]
    assert "output" not in by_id["call_down"]
    assert by_id["call_bug"]["error"] == "get_chat_history failed: KeyError: 'the index is corrupt'"
    assert "error" not in by_id["call_ok"]
    # what the model saw: failed tool results (the native error channel), then went on
    final = script.requests("help", step=7)[0].messages
    seen = returns(final)
    failed = ("call_task", "call_limit", "call_empty_1", "call_empty_2", "call_down", "call_bug")
    for call_id in failed:
        assert seen[call_id].outcome == "failed", call_id
        assert seen[call_id].content == by_id[call_id]["error"]
    assert seen["call_bad_args"].outcome == "retried"
    assert seen["call_ok"].outcome == "success"


@pytest.mark.asyncio
async def test_a_fork_starts_from_mains_history_and_main_never_gets_the_forks(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    room_a, room_b = active_groups(server, agent, ada, 2)
    hold = Block()
    script = Scripted(
        {
            "first-a": [[send("A is done", "call_a")], ["Handled A."]],
            "busy-a": [[hold, "Busy A done."]],
            "fork-b": [[send("B from a fork", "call_b")], ["Handled the other room."]],
            "Fork result": [["Noted."]],
        }
    )
    runtime = Recording(Agent(script.model()), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room_a.id, ada.id, "first-a")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
        server.post_message(room_a.id, ada.id, "busy-a")
        await asyncio.wait_for(hold.started.wait(), 5)  # main is busy
        server.post_message(room_b.id, ada.id, "fork-b")  # so a fork takes it
        await server.wait_for(lambda: replies(server, room_b, agent) == ["B from a fork"])
        await server.wait_for(lambda: gateway.stats().forks_open == 0)  # released
        hold.release.set()
        await server.wait_for(lambda: len(script.requests("Fork result")) == 1)
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 4)
    (child,) = runtime.forks
    assert runtime.sessions == [MAIN, MAIN, child.key, MAIN]
    # the fork saw main's last completed turn, not the turn running on main
    (forked,) = script.requests("fork-b")
    assert [text.rsplit("\n", 1)[-1] for text in prompts(forked.messages)] == [
        "first-a",
        "fork-b",
    ]
    assert "call_a" in returns(forked.messages)
    # main's history has its own turns, never the fork's messages; the fork's is dropped
    main = runtime.history(MAIN)
    assert [text.rsplit("\n", 1)[-1] for text in prompts(main)][:2] == ["first-a", "busy-a"]
    assert "[Fork result]" in prompts(main)[2]
    assert not any("fork-b" in text for text in prompts(main))
    assert "call_b" not in returns(main)
    assert not runtime.has_history(child.key)


@pytest.mark.asyncio
@pytest.mark.parametrize("blocked_in", ["model", "tool"])
async def test_a_cancelled_turn_leaves_the_history_as_it_was_and_no_task_behind(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat, blocked_in: str
) -> None:
    hold = Block()
    script = Scripted(
        {
            "one": [[send("one done", "call_one")], ["Done one."]],
            "two": [[think("Thinking it over."), hold]]
            if blocked_in == "model"
            else [[send("on it", "call_on_it"), call("slow", {}, "call_slow", index=2)]],
        }
    )
    agent_ = Agent(script.model())

    @agent_.tool_plain
    async def slow() -> str:
        """A tool that takes its time."""
        await hold.wait()
        return "slow done"

    runtime = Recording(agent_, seed_history=0)
    before_tasks = asyncio.all_tasks()
    async with running_gateway(server, agent, runtime, shutdown_grace=0.1) as gateway:
        server.post_message(room.id, ada.id, "one")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
        before = runtime.history(MAIN)
        server.post_message(room.id, ada.id, "two")
        await asyncio.wait_for(hold.started.wait(), 5)
    # leaving the block shut the gateway down, cancelling the blocked turn
    assert gateway.stats().turns_cancelled == 1
    assert hold.cancelled  # the model's stream (or the tool) was cancelled, not left waiting
    assert runtime.history(MAIN) == before
    assert len(before) == 4
    left = {t for t in asyncio.all_tasks() if not t.done()} - before_tasks
    assert left == set(), left
    assert library_tasks() == set()
    if blocked_in == "tool":
        assert replies(server, room, agent) == ["one done", "on it"]
        tool_calls = [
            s.content["call_id"]
            for s in server.steps(agent.user_id)
            if s.step_type == StepType.TOOL_CALL
        ]
        assert tool_calls == ["call_one", "call_on_it", "call_slow"]


@pytest.mark.asyncio
async def test_a_restarted_host_seeds_the_history_from_the_chat(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    team = server.add_chat(type="group", name="Team", members=[ada.id, agent.user_id])
    first = Scripted({"remember": [[send("Noted: 42", "call_noted")], ["Noted."]]})
    async with running_gateway(server, agent, Recording(Agent(first.model()))) as gateway:
        server.post_message(team.id, ada.id, "remember 42", mentions=[agent.user_id])
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    # while the host is down, two messages that do not mention the agent (not dispatched)
    server.post_message(team.id, ada.id, "by the way")
    server.post_message(team.id, ada.id, "it is still 42")
    second = Scripted({"which number": [[send("42", "call_42")], ["Said 42."]]})
    runtime = Recording(Agent(second.model()), seed_history=10)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(team.id, ada.id, "which number?", mentions=[agent.user_id])
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    (seen,) = second.requests("which number")
    seeded = runtime.history(MAIN)[0]
    # one user prompt; the agent's own reply marked as sent with send_message, not given as
    # its plain text (a model may imitate that and answer where nobody sees it)
    assert isinstance(seeded, ModelRequest)
    assert prompts([seeded]) == [
        "\n".join(
            [
                SEED_HEADING,
                "Ada: remember 42",
                "Bot (you): Noted: 42",
                "Ada: by the way",
                "Ada: it is still 42",
            ]
        )
    ]
    # the model saw the seed, then the prompt (Pydantic AI joins the requests in a row)
    assert not any(isinstance(m, ModelResponse) for m in seen.messages)
    assert prompts(seen.messages)[0] == prompts([seeded])[0]
    assert prompts(seen.messages)[1].endswith("which number?")
    assert len(prompts(seen.messages)) == 2
    assert replies(server, team, agent) == ["Noted: 42", "42"]


@pytest.mark.asyncio
async def test_update_task_sets_the_status_of_a_task_turn(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    script = Scripted(
        {"Ship it": [[call("update_task", {"status": "in_review"}, "call_status")], ["Moved."]]}
    )
    runtime = Recording(Agent(script.model()))
    async with running_gateway(server, agent, runtime) as gateway:
        task = server.assign_task("Ship it", assignee_id=agent.user_id, creator_id=ada.id)
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    assert server.get_task(task.id).status == TaskStatus.IN_REVIEW
    assert results(server.steps(agent.user_id))["call_status"]["output"] == "in_review"


@pytest.mark.asyncio
async def test_a_run_leaves_the_users_agent_as_it_was(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    model = TestModel(call_tools=["send_message", "lookup"])
    seen_by: dict[str, set[str]] = {"capability": set(), "wrapper": set()}

    def observer(name: str) -> EventStreamHandler[None]:
        async def handle(ctx: RunContext[None], events: AsyncIterable[AgentStreamEvent]) -> None:
            async for event in events:
                if isinstance(event, FunctionToolCallEvent):
                    seen_by[name].add(event.part.tool_name)

        return handle

    bot: Agent[None, str] = Agent(model, capabilities=[ProcessEventStream(observer("capability"))])

    @bot.tool_plain
    def lookup() -> str:
        """Look something up."""
        return "found it"

    class Observed(WrapperAgent[None, str]):
        """A wrapper agent with an event stream handler of its own."""

        @property
        def event_stream_handler(self) -> EventStreamHandler[None] | None:
            return observer("wrapper")

    def snapshot() -> tuple[list[int], list[list[str]], str | None]:
        toolsets = list(bot.toolsets)
        names = [list(t.tools) for t in toolsets if isinstance(t, FunctionToolset)]
        return [id(t) for t in toolsets], names, bot.name

    before = snapshot()
    assert before[1] == [["lookup"]]
    runtime = Recording(Observed(bot), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "look it up")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    assert snapshot() == before
    # TestModel called both tools, the Parall one and the agent's own
    assert len(replies(server, room, agent)) == 1
    outputs = [r.get("output") for r in results(server.steps(agent.user_id)).values()]
    assert "found it" in outputs
    # the agent's own event handlers still saw the run's events
    assert seen_by == {
        "capability": {"send_message", "lookup"},
        "wrapper": {"send_message", "lookup"},
    }
    # a plain run afterwards offers the agent's own tool and instructions only
    model.call_tools = ["lookup"]  # asked for send_message, it would raise: unknown tool
    result = await bot.run("plain")
    assert result.output
    params = model.last_model_request_parameters
    assert params is not None
    assert [t.name for t in params.function_tools] == ["lookup"]
    assert not params.instruction_parts  # the Parall toolset's instructions came with it


@pytest.mark.asyncio
async def test_options_reach_each_run_and_the_file_and_history_tools_work(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    upload = {"filename": "notes.md", "content": "# Notes", "content_type": "text/markdown"}
    script = Scripted(
        {
            "who": [
                [
                    call("whoami", {}, "call_who", index=1),
                    call("upload_file", upload, "call_upload", index=2),
                    call("get_chat_history", {"limit": 5}, "call_history", index=3),
                ],
                ["Told."],
            ]
        }
    )
    bot: Agent[str, str] = Agent(script.model(), deps_type=str)

    @bot.tool
    def whoami(ctx: RunContext[str]) -> str:
        """Who the deps say we are."""
        return ctx.deps

    runtime = Recording(
        bot,
        deps_factory=lambda turn: f"deps of {turn.chat_id}",
        model_settings={"temperature": 0.25},
        instructions="Be brief.",
        seed_history=0,
    )
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "who are you")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    by_id = results(server.steps(agent.user_id))
    assert by_id["call_who"]["output"] == f"deps of {room.id}"
    # the other Parall tools: a file posted in the chat, then the chat's history
    question, posted = server.messages(room.id)
    assert by_id["call_upload"]["output"] == posted.id
    assert server.uploaded_bytes(posted.attachment_ids[0]) == b"# Notes"
    assert by_id["call_history"]["output"] == (
        f"[{question.id}] Ada: who are you\n[{posted.id}] Bot: notes.md\n[attachment: notes.md]"
    )
    first = script.requests("who")[0].info
    assert first.model_settings is not None
    assert first.model_settings.get("temperature") == 0.25
    assert first.instructions == "Be brief."
    assert sorted(t.name for t in first.function_tools) == [
        "get_chat_history",
        "send_message",
        "update_task",
        "upload_file",
        "whoami",
    ]
    # the Parall tools run one at a time, in the order called (replies land in order)
    assert all(t.sequential for t in first.function_tools if t.name in TOOL_NAMES)


@pytest.mark.asyncio
async def test_a_run_over_its_usage_limits_fails_the_turn_and_keeps_no_history(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    script = Scripted({"limited": [[send("first step", "call_first")], ["Second request."]]})
    runtime = Recording(
        Agent(script.model()), usage_limits=UsageLimits(request_limit=1), seed_history=0
    )
    async with running_gateway(server, agent, runtime, reconcile_interval=30) as gateway:
        server.post_message(room.id, ada.id, "limited")
        await server.wait_for(lambda: gateway.stats().turns_failed == 1)
    assert gateway.stats().turns_succeeded == 0
    assert not runtime.has_history(MAIN)  # nothing saved: no dangling tool call
    assert replies(server, room, agent) == ["first step"]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A structured output."""

    answer: str
    confidence: float


@pytest.mark.asyncio
async def test_a_structured_output_is_the_turns_text_as_json(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    script = Scripted(
        {
            "judge": [
                [send("Yes.", "call_yes")],
                [call("final_result", {"answer": "yes", "confidence": 0.5}, "call_out")],
            ]
        }
    )
    bot: Agent[None, Verdict] = Agent(script.model(), output_type=Verdict)
    async with running_gateway(server, agent, Recording(bot, seed_history=0)) as gateway:
        server.post_message(room.id, ada.id, "judge this")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    steps = server.steps(agent.user_id)
    assert [s.step_type for s in steps] == [
        StepType.INPUT,
        StepType.TOOL_CALL,  # send_message; the output tool is no tool call of the agent's
        StepType.TOOL_RESULT,
        StepType.TEXT,
    ]
    assert json.loads(steps[-1].content["text"]) == {"answer": "yes", "confidence": 0.5}
    assert steps[-1].content["suppressed"] is True


def test_options_are_checked() -> None:
    bot = Agent(TestModel())
    with pytest.raises(TypeError, match="not both"):
        PydanticAIRuntime(bot, deps=1, deps_factory=lambda turn: 2)
    with pytest.raises(ValueError, match="seed_history"):
        PydanticAIRuntime(bot, seed_history=-1)
    with pytest.raises(ValueError, match="history_turns"):
        PydanticAIRuntime(bot, history_turns=0)
    with pytest.raises(ValueError, match="tool_retries"):
        PydanticAIRuntime(bot, tool_retries=-1)
    assert PydanticAIRuntime(bot).agent is bot

    async def send_message(text: str) -> str:
        return text

    with pytest.raises(ValueError, match=r"named like the Parall tools \(send_message\)"):
        PydanticAIRuntime(Agent(TestModel(), tools=[send_message]))


def test_without_pydantic_ai_the_import_error_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['pydantic_ai'] = None\n"
        "try:\n"
        "    import parall_bridge.adapters.pydantic_ai\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(  # noqa: S603 (our own interpreter and code)
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "pip install 'parall-bridge[pydantic-ai]'" in done.stdout


@pytest.mark.asyncio
async def test_the_example_host_replies_and_stops_on_sigint(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("PRLL_EXAMPLE_MODEL", raising=False)
    module = load("pydantic_ai_host")
    task = await run_example(module, server, agent, monkeypatch, tmp_path)
    server.post_message(room.id, ada.id, "ping")
    await server.wait_for(lambda: bool(replies(server, room, agent)), timeout=10)
    await server.wait_for(lambda: not server.dispatch_items(agent.user_id))
    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the example's handler sets abort
    await asyncio.wait_for(task, 15)
    assert replies(server, room, agent) == ["You said: ping"]
    steps = [s.step_type for s in server.steps(agent.user_id)]
    assert steps == [StepType.INPUT, StepType.TOOL_CALL, StepType.TOOL_RESULT, StepType.TEXT]
    assert library_tasks() == set()
    assert (tmp_path / "pydantic_ai_host.db").is_file()
