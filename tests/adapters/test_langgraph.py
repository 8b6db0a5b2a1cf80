"""The LangGraph adapter end to end: a real gateway against the emulator, LangGraph graphs
driven by an offline scripted chat model (``_lc_model``)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from typing_extensions import TypedDict

from parall_bridge import Gateway, StepType, TaskStatus, Turn
from parall_bridge.adapters.base import (
    REPLY_INSTRUCTIONS,
    SEED_HEADING,
    TOOL_NAMES,
    ParallTools,
    TurnOutput,
)
from parall_bridge.adapters.langgraph import LangGraphRuntime, parall_tools
from parall_bridge.models import AgentStep, Chat, User
from parall_bridge.testing import AgentAccount, FakeParallServer, running_gateway

from ..conftest import library_tasks
from ..test_examples import load
from ._lc_model import ScriptedChatModel, say

MAIN = "agent:main:parall:default"


def succeeded(gateway: Gateway, count: int) -> bool:
    return gateway.stats().turns_succeeded == count


def replies(server: FakeParallServer, chat: Chat, agent: AgentAccount) -> list[str]:
    return [
        m.content.text  # type: ignore[union-attr]
        for m in server.messages(chat.id)
        if m.sender_id == agent.user_id
    ]


def kinds(steps: Sequence[AgentStep]) -> list[str]:
    return [str(step.step_type) for step in steps]


def prompt_text(message: BaseMessage) -> str:
    """A prompt's own text (after the event's metadata line)."""
    return str(message.content).rsplit("\n", 1)[-1]


@pytest.mark.asyncio
async def test_a_message_is_answered_once_with_reasoning_and_tool_steps(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    model = ScriptedChatModel(
        script=[
            say(
                reasoning="Ada says hello, so I greet her.",
                calls=[("call_hi", "send_message", {"text": "Hello Ada!"})],
            ),
            say("Greeted Ada.", reasoning="Done: she has her answer.", style="reasoning"),
        ]
    )
    runtime = LangGraphRuntime.from_model(model, system_prompt="You are Bot.", seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "hello")
        await server.wait_for(lambda: succeeded(gateway, 1))
    assert replies(server, room, agent) == ["Hello Ada!"]
    reply_id = server.messages(room.id)[-1].id
    steps = server.steps(agent.user_id)
    assert kinds(steps) == [
        StepType.INPUT,
        StepType.THINKING,
        StepType.TOOL_CALL,
        StepType.TOOL_RESULT,
        StepType.THINKING,
        StepType.TEXT,
    ]
    _, think, call, result, think2, text = steps
    assert think.content == {"text": "Ada says hello, so I greet her."}
    assert call.content == {
        "call_id": "call_hi",
        "name": "send_message",
        "args": {"text": "Hello Ada!"},
    }
    assert result.content == {"call_id": "call_hi", "output": reply_id}
    assert think2.content == {"text": "Done: she has her answer."}
    assert text.content == {"text": "Greeted Ada.", "suppressed": True}
    assert think.group_key == call.group_key == result.group_key  # the first response
    assert think2.group_key == text.group_key != think.group_key  # the second
    # the model was offered the Parall tools, after the system prompt and the prompt
    assert model.offered == [list(TOOL_NAMES)] * 2
    first, second = model.calls
    assert [type(m) for m in first] == [type(first[0]), HumanMessage]
    assert first[0].content == "You are Bot."
    assert prompt_text(first[1]) == "hello"
    tool_message = second[-1]
    assert isinstance(tool_message, ToolMessage)
    assert (tool_message.tool_call_id, tool_message.content) == ("call_hi", reply_id)
    # the history: the prompt, the tool call, its result, the answer (no system prompt)
    history = runtime.history(MAIN)
    assert [type(m) for m in history] == [HumanMessage, AIMessage, ToolMessage, AIMessage]
    assert history == (*second[1:], history[-1])


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("system_prompt", "expected"),
    [
        (None, [REPLY_INSTRUCTIONS]),  # by default, the model is told to reply with send_message
        ("You are Bot. Reply with send_message.", ["You are Bot. Reply with send_message."]),
        ("", []),  # no system message at all
    ],
)
async def test_from_model_tells_the_model_how_to_reply(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    system_prompt: str | None,
    expected: list[str],
) -> None:
    model = ScriptedChatModel(
        script=[say(calls=[("call_hi", "send_message", {"text": "Hi."})]), say("Done.")]
    )
    runtime = LangGraphRuntime.from_model(model, system_prompt=system_prompt, seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "hello")
        await server.wait_for(lambda: succeeded(gateway, 1))
    for seen in model.calls:
        system = [m.content for m in seen if isinstance(m, SystemMessage)]
        assert system == expected
        assert isinstance(seen[len(expected)], HumanMessage)  # the system message first
    assert not any(isinstance(m, SystemMessage) for m in runtime.history(MAIN))
    assert replies(server, room, agent) == ["Hi."]


class Keys(LangGraphRuntime):
    """Records the session key of each turn it runs (to find a fork's)."""

    def __init__(self, graph: Any, **options: Any) -> None:
        super().__init__(graph, **options)
        self.keys: list[str] = []

    async def run_with_history(
        self, turn: Turn, history: Sequence[BaseMessage], tools: ParallTools
    ) -> TurnOutput[BaseMessage]:
        self.keys.append(turn.session_key)
        return await super().run_with_history(turn, history, tools)


@pytest.mark.asyncio
async def test_a_fork_starts_from_mains_last_completed_turn_and_keeps_its_own(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    room_a, room_b = (
        server.add_chat(
            type="group", name=name, members=[ada.id, agent.user_id], agent_routing_mode="active"
        )
        for name in ("room a", "room b")
    )
    waiting, gate = asyncio.Event(), asyncio.Event()
    numbers = itertools.count(1)

    async def respond(messages: Sequence[BaseMessage]) -> AIMessage:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            return say("Replied.")
        text = prompt_text(last)
        if "[Fork result]" in str(last.content):
            return say("Noted the fork's work.")
        if text == "a2":  # main is busy with a2 while b1 arrives
            waiting.set()
            await gate.wait()
            return say("a2 needs no reply.")
        return say(calls=[(f"call_{next(numbers)}", "send_message", {"text": f"re: {text}"})])

    model = ScriptedChatModel(script=[respond] * 12)
    runtime = Keys(LangGraphRuntime.from_model(model).graph, seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room_a.id, ada.id, "a1")
        await server.wait_for(lambda: succeeded(gateway, 1))
        after_a1 = runtime.history(MAIN)
        server.post_message(room_a.id, ada.id, "a2")
        await asyncio.wait_for(waiting.wait(), 10)
        server.post_message(room_b.id, ada.id, "b1")  # main is busy: a fork takes it
        await server.wait_for(lambda: succeeded(gateway, 2) and gateway.stats().forks_open == 0)
        gate.set()

        def fork_result_handled() -> bool:
            stats = gateway.stats()
            return stats.active_turns == 0 and any(
                "[Fork result]" in str(call[-1].content) for call in model.calls
            )

        await server.wait_for(fork_result_handled)
    assert replies(server, room_a, agent) == ["re: a1"]
    assert replies(server, room_b, agent) == ["re: b1"]
    fork = runtime.keys[2]
    assert runtime.keys[:2] == [MAIN, MAIN]
    assert fork.startswith(MAIN + ":fork:")
    # the fork's model saw main's history at a1 (not a2, still running), then b1
    b1_call = next(call for call in model.calls if prompt_text(call[-1]) == "b1")
    assert b1_call[0].content == REPLY_INSTRUCTIONS  # the system message, not kept
    assert tuple(b1_call[1:-1]) == after_a1
    assert not runtime.has_history(fork)  # released: dropped
    main = runtime.history(MAIN)
    prompts = [prompt_text(m) for m in main if isinstance(m, HumanMessage)]
    assert prompts[:2] == ["a1", "a2"]
    assert "[Fork result]" in str(main[-2].content)
    assert "b1" not in prompts
    assert all("re: b1" not in str(m) for m in main)


async def block_until_cancelled(started: asyncio.Event, stopped: asyncio.Event) -> None:
    started.set()
    try:
        await asyncio.Event().wait()
    finally:
        stopped.set()  # the framework cancelled what it ran for the turn


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["model", "tool"])
async def test_a_cancelled_turn_leaves_the_history_as_it_was_and_no_task(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat, where: str
) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    @tool
    async def research(topic: str) -> str:
        """Research a topic at length.

        Args:
            topic: what to research.
        """
        await block_until_cancelled(started, stopped)
        return "never"

    async def hang(messages: Sequence[BaseMessage]) -> AIMessage:
        await block_until_cancelled(started, stopped)
        return say("never")

    third = hang if where == "model" else say(calls=[("call_r", "research", {"topic": "two"})])
    model = ScriptedChatModel(
        script=[say(calls=[("call_1", "send_message", {"text": "one"})]), say("Done."), third]
    )
    runtime = LangGraphRuntime.from_model(model, [research], seed_history=0)
    tasks_before = asyncio.all_tasks()
    # shutdown_grace=0: the gateway cancels a running turn at once when it stops
    async with running_gateway(server, agent, runtime, shutdown_grace=0) as gateway:
        server.post_message(room.id, ada.id, "one")
        await server.wait_for(lambda: succeeded(gateway, 1))
        before = runtime.history(MAIN)
        server.post_message(room.id, ada.id, "two")
        await asyncio.wait_for(started.wait(), 10)
    # leaving the block shut the gateway down, cancelling the blocked turn
    assert gateway.stats().turns_cancelled == 1
    assert stopped.is_set()
    assert runtime.history(MAIN) == before
    assert len(before) == 4
    leftover = {t for t in asyncio.all_tasks() if not t.done()} - tasks_before
    assert leftover == set()
    assert library_tasks() == set()
    if where == "tool":  # the call was recorded; its result never came, nor was it kept
        calls = [
            s.content["call_id"] for s in server.steps(agent.user_id) if s.step_type == "tool_call"
        ]
        assert calls == ["call_1", "call_r"]
        assert all("call_r" not in str(m) for m in runtime.history(MAIN))


@pytest.mark.asyncio
async def test_a_restarted_runtime_seeds_the_history_from_the_chat(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    first = ScriptedChatModel(
        script=[
            say(calls=[("call_1", "send_message", {"text": "Nice to meet you, Ada."})]),
            say("Met Ada."),
        ]
    )
    async with running_gateway(server, agent, LangGraphRuntime.from_model(first)) as gateway:
        server.post_message(room.id, ada.id, "My name is Ada Lovelace.")
        await server.wait_for(lambda: succeeded(gateway, 1))
    # nothing earlier in the chat: only the system message and the prompt
    assert [type(m) for m in first.calls[0]] == [SystemMessage, HumanMessage]
    second = ScriptedChatModel(
        script=[
            say(calls=[("call_2", "send_message", {"text": "You are Ada Lovelace."})]),
            say("Answered."),
        ]
    )
    runtime = LangGraphRuntime.from_model(second)  # a new process: no history
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "What is my name?")
        await server.wait_for(lambda: succeeded(gateway, 1))
    system, *seen = second.calls[0]
    assert system.content == REPLY_INSTRUCTIONS
    # one human message; the agent's own reply marked as sent with send_message, not given
    # as plain AI text (a model may imitate that and answer where nobody sees it)
    transcript = f"{SEED_HEADING}\nAda: My name is Ada Lovelace.\nBot (you): Nice to meet you, Ada."
    assert [(type(m), m.content) for m in seen[:1]] == [(HumanMessage, transcript)]
    assert len(seen) == 2
    assert prompt_text(seen[1]) == "What is my name?"
    assert replies(server, room, agent) == ["Nice to meet you, Ada.", "You are Ada Lovelace."]
    assert runtime.history(MAIN)[:1] == tuple(seen[:1])


class BuggyTools(ParallTools):
    """Parall tools whose get_chat_history(limit=13) fails as a bug would: not with a
    ``ParallToolError``."""

    async def get_chat_history(self, limit: int = 20) -> str:
        if limit == 13:
            raise KeyError("the index is corrupt")
        return await super().get_chat_history(limit)


class Buggy(LangGraphRuntime):
    """The runtime, its turns given :class:`BuggyTools` (the tools act for the current)."""

    async def run_with_history(
        self, turn: Turn, history: Sequence[BaseMessage], tools: ParallTools
    ) -> TurnOutput[BaseMessage]:
        with BuggyTools(turn).bound() as buggy:
            return await super().run_with_history(turn, history, buggy)


@pytest.mark.asyncio
async def test_an_unexpected_parall_tool_failure_names_the_tool_the_error_and_its_message(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """The same text as the Pydantic AI and OpenAI Agents adapters give."""
    model = ScriptedChatModel(
        script=[say(calls=[("call_bug", "get_chat_history", {"limit": 13})]), say("Gave up.")]
    )
    runtime = Buggy(LangGraphRuntime.from_model(model).graph, seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "what was said?")
        await server.wait_for(lambda: succeeded(gateway, 1))
    expected = "get_chat_history failed: KeyError: 'the index is corrupt'"
    failure = model.calls[1][-1]
    assert isinstance(failure, ToolMessage)
    assert (failure.status, failure.content) == ("error", expected)
    (result,) = [s for s in server.steps(agent.user_id) if s.step_type == StepType.TOOL_RESULT]
    assert result.content == {"call_id": "call_bug", "error": expected}


@pytest.mark.asyncio
async def test_tool_errors_reach_the_model_and_the_turn_goes_on(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    @tool
    async def weather(city: str) -> str:
        """The weather in a city.

        Args:
            city: the city.
        """
        raise ValueError(f"no weather for {city}")

    model = ScriptedChatModel(
        script=[
            say(
                reasoning="Check the task and the weather.",
                calls=[
                    ("call_task", "update_task", {"status": "done"}),
                    ("call_weather", "weather", {"city": "Atlantis"}),
                ],
            ),
            say(calls=[("call_send", "send_message", {"text": "Sorry, no weather there."})]),
            say("Apologised."),
        ]
    )
    runtime = LangGraphRuntime.from_model(model, [weather], seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "Weather in Atlantis?")
        await server.wait_for(lambda: succeeded(gateway, 1))
    assert gateway.stats().turns_failed == 0
    task_error, weather_error = model.calls[1][-2:]
    assert isinstance(task_error, ToolMessage)
    assert isinstance(weather_error, ToolMessage)
    assert (task_error.status, task_error.content) == (
        "error",
        "this turn is about a chat message, not a task",
    )
    assert (weather_error.status, weather_error.content) == (
        "error",
        "ValueError: no weather for Atlantis",
    )
    results = [s.content for s in server.steps(agent.user_id) if s.step_type == "tool_result"]
    assert results[:2] == [
        {"call_id": "call_task", "error": "this turn is about a chat message, not a task"},
        {"call_id": "call_weather", "error": "ValueError: no weather for Atlantis"},
    ]
    assert results[2]["call_id"] == "call_send"
    assert replies(server, room, agent) == ["Sorry, no weather there."]


@pytest.mark.asyncio
async def test_update_task_sets_the_turns_task(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    model = ScriptedChatModel(
        script=[
            say(
                reasoning="The task is shipped.",
                calls=[("call_done", "update_task", {"status": "done"})],
                style="thinking",
            ),
            say("Marked it done."),
        ]
    )
    runtime = LangGraphRuntime.from_model(model)
    async with running_gateway(server, agent, runtime) as gateway:
        task = server.assign_task("Ship it", assignee_id=agent.user_id, creator_id=ada.id)
        await server.wait_for(lambda: succeeded(gateway, 1))
    assert server.get_task(task.id).status == TaskStatus.DONE
    steps = server.steps(agent.user_id)
    assert kinds(steps) == [
        StepType.INPUT,
        StepType.THINKING,
        StepType.TOOL_CALL,
        StepType.TOOL_RESULT,
        StepType.TEXT,
    ]
    assert steps[1].content == {"text": "The task is shipped."}  # an Anthropic thinking block
    assert steps[3].content == {"call_id": "call_done", "output": "done"}
    assert all(step.target_id == task.id for step in steps)


def own_graph(model: ScriptedChatModel) -> Any:
    """A graph of the host's own: LangGraph's ToolNode with its default error handling."""
    tools = parall_tools()
    bound = model.bind_tools(tools)

    async def agent_node(state: MessagesState) -> dict[str, Any]:
        first = state["messages"][0]  # a node that changes what it is given, in place
        first.additional_kwargs["seen"] = first.additional_kwargs.get("seen", 0) + 1
        return {"messages": [await bound.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent_node)
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, ["tools", END])
    builder.add_edge("tools", "agent")
    return builder.compile()


@pytest.mark.asyncio
async def test_a_graph_of_your_own_runs_unchanged_with_the_tools(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    model = ScriptedChatModel(
        script=[
            say("Hi.", calls=[("call_0", "get_chat_history", {"limit": 0})]),
            say(calls=[("call_1", "get_chat_history", {"limit": 5})]),
            say(calls=[("call_2", "upload_file", {"filename": "a.md", "content": "# A"})]),
            say("Uploaded."),
            say("Second turn."),
        ]
    )
    graph = own_graph(model)

    def shape() -> tuple[object, ...]:
        return (
            graph.checkpointer,
            dict(graph.config or {}),
            list(graph.nodes),
            list(graph.channels),
            graph.stream_mode,
            graph.nodes["tools"].bound.tools_by_name,
        )

    before = shape()
    runtime = LangGraphRuntime(graph, seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        question = server.post_message(room.id, ada.id, "notes please")
        await server.wait_for(lambda: succeeded(gateway, 1))
        first = [m.model_copy(deep=True) for m in runtime.history(MAIN)]
        server.post_message(room.id, ada.id, "thanks")
        await server.wait_for(lambda: succeeded(gateway, 2))
    assert shape() == before
    assert runtime.history(MAIN)[: len(first)] == tuple(first)  # the run changed none of it
    limit_error, history, upload = (model.calls[n][-1] for n in (1, 2, 3))
    assert isinstance(limit_error, ToolMessage)
    assert limit_error.status == "error"
    assert limit_error.content == "limit must be a whole number from 1 to 100"
    assert history.content == f"[{question.id}] Ada: notes please"
    file_message = server.messages(room.id)[1]
    assert upload.content == file_message.id
    assert server.uploaded_bytes(file_message.attachment_ids[0]) == b"# A"
    texts = [s.content["text"] for s in server.steps(agent.user_id) if s.step_type == "text"]
    assert texts == ["Hi.", "Uploaded.", "Second turn."]


@pytest.mark.asyncio
async def test_an_agent_in_a_subgraph_records_each_message_once(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    model = ScriptedChatModel(
        script=[
            say(reasoning="First.", calls=[("call_1", "send_message", {"text": "one"})]),
            say("Sent one."),
            say(reasoning="Second.", calls=[("call_2", "send_message", {"text": "two"})]),
            say("Sent two."),
        ]
    )
    inner = LangGraphRuntime.from_model(model).graph
    outer = StateGraph(MessagesState)
    outer.add_node("agent", inner)  # its update is its whole state, the history included
    outer.add_edge(START, "agent")
    runtime = LangGraphRuntime(outer.compile(), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        for n, text in enumerate(("first", "second"), 1):
            server.post_message(room.id, ada.id, text)
            await server.wait_for(partial(succeeded, gateway, n))
    assert replies(server, room, agent) == ["one", "two"]
    steps = server.steps(agent.user_id)
    second = steps[steps.index(next(s for s in steps[1:] if s.step_type == "input")) :]
    assert kinds(second) == [
        StepType.INPUT,
        StepType.THINKING,
        StepType.TOOL_CALL,
        StepType.TOOL_RESULT,
        StepType.TEXT,
    ]
    assert [s.content.get("call_id") for s in second[2:4]] == ["call_2", "call_2"]
    assert second[1].content == {"text": "Second."}
    assert len(runtime.history(MAIN)) == 8


@pytest.mark.asyncio
async def test_the_config_reaches_the_run_and_a_failed_run_changes_no_history(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    model = ScriptedChatModel(
        script=[
            say("Hello."),
            say(calls=[("call_1", "get_chat_history", {})]),
            say(calls=[("call_2", "get_chat_history", {})]),
        ]
    )
    runtime = LangGraphRuntime.from_model(model, config={"recursion_limit": 2}, seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "one")
        await server.wait_for(lambda: succeeded(gateway, 1))
        before = runtime.history(MAIN)
        server.post_message(room.id, ada.id, "two")  # model, tools, then past the limit
        await server.wait_for(lambda: gateway.stats().turns_failed == 1)
    assert runtime.history(MAIN) == before
    errors = [s.content["message"] for s in server.steps(agent.user_id) if s.step_type == "error"]
    assert len(errors) == 1
    assert "Recursion limit of 2 reached" in errors[0]


class Plain(TypedDict):
    text: str


def test_a_checkpointed_graph_and_other_mistakes_are_refused() -> None:
    model = ScriptedChatModel(script=[])
    builder = StateGraph(MessagesState)
    builder.add_node("model", lambda state: {"messages": []})
    builder.add_edge(START, "model")
    with pytest.raises(ValueError, match="compiled with a checkpointer"):
        LangGraphRuntime(builder.compile(checkpointer=InMemorySaver()))
    plain = StateGraph(Plain)
    plain.add_node("echo", lambda state: state)
    plain.add_edge(START, "echo")
    with pytest.raises(ValueError, match="'messages' key"):
        LangGraphRuntime(plain.compile())
    with pytest.raises(TypeError, match="compiled graph"):
        LangGraphRuntime(builder)  # type: ignore[arg-type]

    @tool
    async def send_message(text: str) -> str:
        """Another send_message.

        Args:
            text: the text.
        """
        return text

    with pytest.raises(ValueError, match="unique"):
        LangGraphRuntime.from_model(model, [send_message])
    with pytest.raises(ValueError, match="seed_history"):
        LangGraphRuntime(builder.compile(), seed_history=-1)


@pytest.mark.asyncio
async def test_the_tools_have_the_shared_names_and_arguments_and_work_only_in_a_turn() -> None:
    tools = parall_tools()
    assert [t.name for t in tools] == list(TOOL_NAMES)
    args = {t.name: t.args for t in tools}
    assert set(args["send_message"]) == {"text"}
    assert set(args["update_task"]) == {"status"}
    assert args["get_chat_history"]["limit"]["default"] == 20
    assert set(args["upload_file"]) == {"filename", "content", "content_type"}
    assert args["upload_file"]["content_type"]["default"] == "text/plain"
    assert args["send_message"]["text"]["description"] == "the message, in Markdown."
    call = {"type": "tool_call", "id": "call_x", "name": "send_message", "args": {"text": "hi"}}
    result = await tools[0].ainvoke(call)
    assert isinstance(result, ToolMessage)
    assert result.status == "error"
    assert "inside a turn" in str(result.content)


def test_without_langgraph_the_import_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['langchain_core'] = sys.modules['langgraph'] = None\n"
        "try:\n"
        "    import parall_bridge.adapters.langgraph\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(  # noqa: S603 (our own interpreter and code)
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "pip install 'parall-bridge[langgraph]'" in done.stdout


async def run_the_example(
    model: ScriptedChatModel | None,
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> list[AgentStep]:
    """Run examples/langgraph_host.py against the emulator until it answers "ping", stop it
    with SIGINT, and return its steps."""
    module = load("langgraph_host")
    monkeypatch.delenv("PRLL_EXAMPLE_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)  # where it keeps its state file
    monkeypatch.setenv("PRLL_API_URL", server.url)
    monkeypatch.setenv("PRLL_API_KEY", agent.api_key)
    monkeypatch.setenv("PRLL_ORG_ID", server.org_id)
    task = asyncio.get_running_loop().create_task(module.main(model))
    server.post_message(room.id, ada.id, "ping")
    await server.wait_for(lambda: bool(replies(server, room, agent)), timeout=10)
    await server.wait_for(lambda: not server.dispatch_items(agent.user_id))
    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the example's handler sets abort
    await asyncio.wait_for(task, 15)
    assert library_tasks() == set()
    assert (tmp_path / "langgraph_host.db").is_file()
    return server.steps(agent.user_id)


@pytest.mark.asyncio
async def test_the_example_host_answers_with_a_scripted_model(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    model = ScriptedChatModel(
        script=[
            say(reasoning="Ada pings.", calls=[("call_pong", "send_message", {"text": "pong"})]),
            say("Answered with pong."),
        ]
    )
    steps = await run_the_example(model, server, agent, ada, room, monkeypatch, tmp_path)
    assert replies(server, room, agent) == ["pong"]
    assert kinds(steps) == [
        StepType.INPUT,
        StepType.THINKING,
        StepType.TOOL_CALL,
        StepType.TOOL_RESULT,
        StepType.TEXT,
    ]
    assert steps[1].content == {"text": "Ada pings."}
    assert steps[2].content["call_id"] == "call_pong"
    assert str(model.calls[0][0].content).startswith("You are")  # the example's system prompt


@pytest.mark.asyncio
async def test_the_example_host_runs_offline_without_a_model(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    steps = await run_the_example(None, server, agent, ada, room, monkeypatch, tmp_path)
    assert replies(server, room, agent) == ["You said: ping"]
    assert kinds(steps) == [
        StepType.INPUT,
        StepType.THINKING,
        StepType.TOOL_CALL,
        StepType.TOOL_RESULT,
        StepType.TEXT,
    ]
    assert steps[1].content == {"text": "They wrote: ping"}
