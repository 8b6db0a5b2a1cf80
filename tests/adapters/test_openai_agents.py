"""The OpenAI Agents SDK adapter end to end: a real gateway against the emulator, the agent
run by the SDK's Runner on the SDK's own scripted test model (offline: nothing may reach the
network, tracing is disabled)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import agents
import pytest
from agents import (
    Agent,
    Handoff,
    ModelSettings,
    RunConfig,
    RunContextWrapper,
    RunItemStreamEvent,
    StreamEvent,
    TResponseInputItem,
    function_tool,
    handoff,
)
from agents.models.interface import ModelTracing
from agents.testing import ModelCall, assistant_message, function_call

from parall_bridge import Gateway, StepType, TaskStatus, Turn
from parall_bridge import protocol as p
from parall_bridge.adapters.base import (
    REPLY_INSTRUCTIONS,
    SEED_HEADING,
    TOOL_NAMES,
    ParallTools,
    TurnOutput,
)
from parall_bridge.adapters.openai_agents import OpenAIAgentsRuntime, _parall_tools
from parall_bridge.models import Chat, User
from parall_bridge.testing import AgentAccount, FakeParallServer, running_gateway

from ..conftest import library_tasks
from ._openai_model import (
    REPLIED,
    Output,
    Replier,
    WholeReasoning,
    last_item,
    offline_model,
    text_of,
    tool_outputs,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
AGENTS_DIR = str(Path(agents.__file__).resolve().parent)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """No OpenAI key, and no socket may connect anywhere but loopback (the emulator)."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    refused: list[object] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def check(sock: socket.socket, address: Any) -> None:
        internet = sock.family in (socket.AF_INET, socket.AF_INET6)
        if internet and not ipaddress.ip_address(address[0]).is_loopback:
            refused.append(address)
            raise OSError(f"the tests are offline: no connection to {address!r}")

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield refused
    assert refused == []


def quiet_config() -> RunConfig:
    """The tests' RunConfig: no tracing (it would export to OpenAI), a marked setting."""
    return RunConfig(tracing_disabled=True, model_settings=ModelSettings(temperature=0.25))


def sdk_tasks() -> set[asyncio.Task[Any]]:
    """Pending tasks running the SDK's code."""
    found = set()
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if not task.done() and code is not None and code.co_filename.startswith(AGENTS_DIR):
            found.add(task)
    return found


def build(
    brain: Replier, *, tools: list[Any] | None = None, **options: Any
) -> tuple[Agent[Any], OpenAIAgentsRuntime]:
    agent: Agent[Any] = Agent(
        name="Assistant",
        instructions="Answer through send_message.",
        model=offline_model(brain),
        tools=list(tools or []),
    )
    options.setdefault("run_config", quiet_config())
    return agent, OpenAIAgentsRuntime(agent, **options)


class Watched(OpenAIAgentsRuntime):
    """The runtime, noting the SDK's pending tasks at the moment each turn ends."""

    def __init__(self, agent: Agent[Any], **options: Any) -> None:
        super().__init__(agent, **options)
        self.left_at_end: list[set[asyncio.Task[Any]]] = []

    async def run_turn(self, turn: Turn) -> str | None:
        try:
            return await super().run_turn(turn)
        finally:
            self.left_at_end.append(sdk_tasks())


def replies(server: FakeParallServer, chat: Chat, agent: AgentAccount) -> list[str]:
    return [
        m.content.text  # type: ignore[union-attr]
        for m in server.messages(chat.id)
        if m.sender_id == agent.user_id
    ]


def succeeded(gateway: Gateway, count: int) -> bool:
    return gateway.stats().turns_succeeded == count


@pytest.mark.asyncio
async def test_a_message_gets_one_reply_and_the_steps_show_the_run(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    brain = Replier()

    @function_tool
    def lookup(city: str) -> str:
        """Look a city up.

        Args:
            city: the city.
        """
        return f"{city} is sunny"

    user_agent, runtime = build(brain, tools=[lookup], seed_history=0)
    tools_before = user_agent.tools
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "hello")
        await server.wait_for(lambda: succeeded(gateway, 1))
    assert replies(server, room, agent) == ["You said: hello"]
    reply = next(m for m in server.messages(room.id) if m.sender_id == agent.user_id)

    steps = server.steps(agent.user_id)
    assert [s.step_type for s in steps] == [
        StepType.INPUT,
        StepType.THINKING,
        StepType.TOOL_CALL,
        StepType.TOOL_RESULT,
        StepType.TEXT,
    ]
    (call_id,) = brain.call_ids
    assert steps[1].content == {"text": "They wrote 'hello'; I answer with send_message."}
    assert steps[2].content == {
        "call_id": call_id,
        "name": "send_message",
        "args": {"text": "You said: hello"},
    }
    assert steps[3].content == {"call_id": call_id, "output": reply.id}
    assert steps[4].content == {"text": REPLIED, "suppressed": True}
    assert steps[1].group_key == steps[2].group_key == steps[3].group_key
    assert steps[4].group_key != steps[3].group_key  # the second model response

    # The model got the turn's prompt, the user's tool and the four Parall tools, and the
    # given RunConfig (its settings, tracing disabled).
    first = brain.calls[0]
    prompt = text_of(last_item(first))
    assert prompt.endswith("hello")
    assert "[Message ID:" in prompt
    assert [t.name for t in first.tools] == ["lookup", *TOOL_NAMES]
    assert first.model_settings.temperature == 0.25
    assert first.tracing is ModelTracing.DISABLED

    # The history: the prompt, the reasoning, the call, its output, the final message.
    (key,) = runtime._histories
    history = runtime.history(key)
    assert history[0] == {"role": "user", "content": prompt}
    assert [item.get("type") for item in history[1:]] == [
        "reasoning",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert brain.calls[1].input == list(history[:4])
    # The user's agent was not modified by the run.
    assert user_agent.tools is tools_before
    assert user_agent.tools == [lookup]


@pytest.mark.asyncio
async def test_reasoning_given_whole_is_recorded_once(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    brain = Replier()
    user_agent: Agent[Any] = Agent(name="Assistant", model=WholeReasoning(offline_model(brain)))
    runtime = OpenAIAgentsRuntime(user_agent, run_config=quiet_config(), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "hello")
        await server.wait_for(lambda: succeeded(gateway, 1))
    steps = server.steps(agent.user_id)
    assert [s.step_type for s in steps] == [
        "input",
        "thinking",
        "tool_call",
        "tool_result",
        "text",
    ]
    assert steps[1].content == {"text": "They wrote 'hello'; I answer with send_message."}


@pytest.mark.asyncio
async def test_the_history_grows_turn_by_turn(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    brain = Replier()
    _, runtime = build(brain, seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "one")
        await server.wait_for(lambda: succeeded(gateway, 1))
        (key,) = runtime._histories
        after_one = runtime.history(key)
        server.post_message(room.id, ada.id, "two")
        await server.wait_for(lambda: succeeded(gateway, 2))
    assert len(after_one) == 5
    assert brain.calls[2].input[:5] == list(after_one)  # turn two starts on turn one
    assert text_of(brain.calls[2].input[5]).endswith("two")
    assert len(runtime.history(key)) == 10
    assert replies(server, room, agent) == ["You said: one", "You said: two"]


@pytest.mark.asyncio
async def test_a_tool_error_reaches_the_model_and_the_turn_goes_on(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    outputs: list[dict[str, str]] = []

    def respond(call: ModelCall) -> Output:
        if last_item(call).get("type") != "function_call_output":
            server.fail_next(p.LIST_CHAT_MESSAGES, status=403)  # the platform refuses
            return [  # three failing calls: a refused update, wrong arguments, a refusal
                function_call("update_task", {"status": "done"}, call_id="call_task"),
                function_call("send_message", {"words": "hi"}, call_id="call_bad"),
                function_call("get_chat_history", {"limit": 5}, call_id="call_refused"),
            ]
        found = tool_outputs(call)
        if "call_sorry" not in found:
            outputs.append(found)
            return [function_call("send_message", {"text": "Sorry."}, call_id="call_sorry")]
        return [assistant_message("done", item_id="msg_done")]

    user_agent: Agent[Any] = Agent(name="Assistant", model=offline_model(respond))
    runtime = OpenAIAgentsRuntime(user_agent, run_config=quiet_config(), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "please close the task")
        await server.wait_for(lambda: succeeded(gateway, 1))
    assert gateway.stats().turns_failed == 0
    assert replies(server, room, agent) == ["Sorry."]
    (seen,) = outputs
    assert seen["call_task"] == "this turn is about a chat message, not a task"
    assert seen["call_bad"].startswith("Invalid JSON input for tool send_message")
    assert seen["call_refused"].startswith("the platform refused")
    assert "403" in seen["call_refused"]
    results = {
        s.content["call_id"]: s.content
        for s in server.steps(agent.user_id)
        if s.step_type == StepType.TOOL_RESULT
    }
    assert results["call_task"] == {"call_id": "call_task", "error": seen["call_task"]}
    assert results["call_bad"] == {"call_id": "call_bad", "error": seen["call_bad"]}
    assert results["call_refused"] == {"call_id": "call_refused", "error": seen["call_refused"]}
    assert "error" not in results["call_sorry"]


class BuggyTools(ParallTools):
    """Parall tools whose get_chat_history(limit=13) fails as a bug would: not with a
    ``ParallToolError``."""

    async def get_chat_history(self, limit: int = 20) -> str:
        """The chat's recent messages (fails for 13)."""
        if limit == 13:
            raise KeyError("the index is corrupt")
        return await super().get_chat_history(limit)


class Buggy(OpenAIAgentsRuntime):
    """The runtime, its turns given :class:`BuggyTools`."""

    async def run_with_history(
        self, turn: Turn, history: Sequence[TResponseInputItem], tools: ParallTools
    ) -> TurnOutput[TResponseInputItem]:
        return await super().run_with_history(turn, history, BuggyTools(turn))


@pytest.mark.asyncio
async def test_an_unexpected_tool_failure_names_the_tool_the_error_and_its_message(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """The same text as the Pydantic AI and LangGraph adapters give."""
    brain = Replier(("get_chat_history", {"limit": 13}), when=lambda prompt: True)
    user_agent: Agent[Any] = Agent(name="Assistant", model=offline_model(brain))
    runtime = Buggy(user_agent, run_config=quiet_config(), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "what was said?")
        await server.wait_for(lambda: succeeded(gateway, 1))
    (call_id,) = brain.call_ids
    expected = "get_chat_history failed: KeyError: 'the index is corrupt'"
    assert tool_outputs(brain.calls[1]) == {call_id: expected}
    (result,) = [s for s in server.steps(agent.user_id) if s.step_type == StepType.TOOL_RESULT]
    assert result.content == {"call_id": call_id, "error": expected}


@pytest.mark.asyncio
async def test_the_four_tools_act_on_the_platform(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    seen: dict[str, str] = {}

    def respond(call: ModelCall) -> Output:
        if last_item(call).get("type") != "function_call_output":
            return [
                function_call("get_chat_history", {"limit": 5}, call_id="call_history"),
                function_call(
                    "upload_file",
                    {"filename": "notes.md", "content": "# Notes", "content_type": "text/markdown"},
                    call_id="call_file",
                ),
            ]
        seen.update(tool_outputs(call))
        return [assistant_message("filed", item_id="msg_done")]

    user_agent: Agent[Any] = Agent(name="Assistant", model=offline_model(respond))
    runtime = OpenAIAgentsRuntime(user_agent, run_config=quiet_config(), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        question = server.post_message(room.id, ada.id, "file my notes")
        await server.wait_for(lambda: succeeded(gateway, 1))
    assert seen["call_history"] == f"[{question.id}] Ada: file my notes"
    posted = next(m for m in server.messages(room.id) if m.id == seen["call_file"])
    assert posted.sender_id == agent.user_id
    assert server.uploaded_bytes(posted.attachment_ids[0]) == b"# Notes"


@pytest.mark.asyncio
async def test_an_async_context_factory_is_awaited(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """As Pydantic AI's ``deps_factory``: a factory may return an awaitable of the context."""
    seen: list[object] = []

    async def context_of(turn: Turn) -> dict[str, str]:
        await asyncio.sleep(0)
        return {"chat": str(turn.chat_id)}

    @function_tool
    async def whoami(ctx: agents.RunContextWrapper[Any]) -> str:
        """Where the conversation is."""
        seen.append(ctx.context)
        return "noted"

    brain = Replier(("whoami", {}), when=lambda prompt: True)
    user_agent: Agent[Any] = Agent(name="Assistant", model=offline_model(brain), tools=[whoami])
    runtime = OpenAIAgentsRuntime(
        user_agent, run_config=quiet_config(), seed_history=0, context_factory=context_of
    )
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "where am I?")
        await server.wait_for(lambda: succeeded(gateway, 1))
    assert seen == [{"chat": room.id}]


@pytest.mark.asyncio
@pytest.mark.parametrize("form", ["agent", "handoff"])
async def test_an_agent_handed_off_to_gets_the_tools_and_replies(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat, form: str
) -> None:
    def triage(call: ModelCall) -> Output:
        return [function_call("transfer_to_specialist", {}, call_id="call_handoff")]

    told: list[str | None] = []

    def specialist(call: ModelCall) -> Output:
        told.append(call.system_instructions)
        if "call_reply" in tool_outputs(call):
            return [assistant_message("Handled.", item_id="msg_done")]
        return [function_call("send_message", {"text": "Specialist here."}, call_id="call_reply")]

    expert: Agent[Any] = Agent(name="Specialist", model=offline_model(specialist))
    target: Agent[Any] | Handoff[Any, Any] = expert if form == "agent" else handoff(expert)
    front: Agent[Any] = Agent(name="Triage", model=offline_model(triage), handoffs=[target])
    expert.handoffs.append(front)  # a cycle: each is cloned once
    runtime = OpenAIAgentsRuntime(front, run_config=quiet_config(), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "I need the specialist")
        await server.wait_for(lambda: succeeded(gateway, 1))
    assert replies(server, room, agent) == ["Specialist here."]
    steps = [(s.step_type, s.content) for s in server.steps(agent.user_id)][1:]
    reply = next(m for m in server.messages(room.id) if m.sender_id == agent.user_id)
    assert steps == [
        ("tool_call", {"call_id": "call_handoff", "name": "transfer_to_specialist", "args": {}}),
        ("tool_result", {"call_id": "call_handoff", "output": '{"assistant": "Specialist"}'}),
        (
            "tool_call",
            {"call_id": "call_reply", "name": "send_message", "args": {"text": "Specialist here."}},
        ),
        ("tool_result", {"call_id": "call_reply", "output": reply.id}),
        ("text", {"text": "Handled.", "suppressed": True}),
    ]
    assert told == [REPLY_INSTRUCTIONS] * 2  # the clone handed off to is told how to reply
    assert front.handoffs == [target]  # neither agent was modified
    assert expert.handoffs == [front]
    assert expert.tools == []
    assert expert.instructions is None


@pytest.mark.asyncio
async def test_update_task_sets_the_turns_task(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    brain = Replier(("update_task", {"status": "in_review"}), when=lambda p: "Ship it" in p)
    _, runtime = build(brain)
    async with running_gateway(server, agent, runtime) as gateway:
        task = server.assign_task("Ship it", assignee_id=agent.user_id, creator_id=ada.id)
        await server.wait_for(lambda: succeeded(gateway, 1))
    assert server.get_task(task.id).status == TaskStatus.IN_REVIEW
    results = [s.content for s in server.steps(agent.user_id) if s.step_type == "tool_result"]
    assert results == [{"call_id": brain.call_ids[0], "output": "in_review"}]


@pytest.mark.asyncio
async def test_a_failed_run_leaves_the_history_as_it_was(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    brain = Replier()
    failures = {"left": 1}

    def respond(call: ModelCall) -> Output:
        if "two" in text_of(last_item(call)) and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the model is down")
        return brain(call)

    user_agent: Agent[Any] = Agent(name="Assistant", model=offline_model(respond))
    runtime = OpenAIAgentsRuntime(user_agent, run_config=quiet_config(), seed_history=0)
    async with running_gateway(server, agent, runtime, reconcile_interval=0.2) as gateway:
        server.post_message(room.id, ada.id, "one")
        await server.wait_for(lambda: succeeded(gateway, 1))
        (key,) = runtime._histories
        before = runtime.history(key)
        server.post_message(room.id, ada.id, "two")
        await server.wait_for(lambda: gateway.stats().turns_failed == 1)
        assert runtime.history(key) == before
        await server.wait_for(lambda: succeeded(gateway, 2))
    assert brain.calls[2].input[:5] == list(before)  # the retry ran on the same history
    assert len(runtime.history(key)) == 10
    assert replies(server, room, agent) == ["You said: one", "You said: two"]
    assert sdk_tasks() == set()


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["model", "tool", "consumer"])
async def test_a_cancelled_turn_leaves_the_history_and_no_task_behind(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat, where: str
) -> None:
    """The gateway shuts down while the turn waits: on the model, in a tool of the agent's
    own, or in the consumer of the stream (an event hook) while the run goes on."""
    tasks_before = asyncio.all_tasks()
    blocked = asyncio.Event()
    stopped: list[str] = []
    brain = Replier(("wait_here", {}), when=lambda p: where == "tool" and "two" in p)

    async def respond(call: ModelCall) -> Output:
        if where == "model" and "two" in text_of(last_item(call)):
            blocked.set()
            try:
                await asyncio.Event().wait()
            finally:
                stopped.append("model")
        return brain(call)

    @function_tool
    async def wait_here() -> str:
        """Wait for something that never comes."""
        blocked.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append("tool")
        return "never"

    async def hook(turn: Turn, event: StreamEvent) -> None:
        # At the tool's output (the reply is sent), the run would go on to the model.
        output = isinstance(event, RunItemStreamEvent) and event.name == "tool_output"
        if where == "consumer" and "two" in turn.prompt() and output:
            blocked.set()
            try:
                await asyncio.Event().wait()
            finally:
                stopped.append("consumer")

    user_agent: Agent[Any] = Agent(
        name="Assistant", model=offline_model(respond), tools=[wait_here]
    )
    runtime = Watched(user_agent, run_config=quiet_config(), seed_history=0, on_event=hook)
    async with running_gateway(server, agent, runtime, shutdown_grace=0.1) as gateway:
        server.post_message(room.id, ada.id, "one")
        await server.wait_for(lambda: succeeded(gateway, 1))
        (key,) = runtime._histories
        before = runtime.history(key)
        calls_before = len(brain.calls)
        server.post_message(room.id, ada.id, "two")
        await asyncio.wait_for(blocked.wait(), 10)
    # leaving the block shut the gateway down, cancelling the waiting turn
    assert gateway.stats().turns_cancelled == 1
    assert stopped == [where]
    assert runtime.history(key) == before
    assert runtime.left_at_end == [set(), set()]  # the run was over when its turn ended
    assert sdk_tasks() == set()
    assert library_tasks() == set()
    assert {t for t in asyncio.all_tasks() - tasks_before if not t.done()} == set()
    # The run stopped with the turn: no further model call after the cancellation.
    assert len(brain.calls) == calls_before + (0 if where == "model" else 1)


@pytest.mark.asyncio
async def test_a_fork_starts_from_the_parents_history_and_keeps_its_own(
    server: FakeParallServer, agent: AgentAccount, ada: User
) -> None:
    room_a, room_b = (
        server.add_chat(
            type="group",
            name=f"room{n}",
            members=[ada.id, agent.user_id],
            agent_routing_mode="active",
        )
        for n in (1, 2)
    )
    brain = Replier()
    gate = asyncio.Event()
    main_busy = asyncio.Event()

    async def respond(call: ModelCall) -> Output:
        if text_of(last_item(call)).endswith("a2"):
            main_busy.set()
            await gate.wait()
        return brain(call)

    turns: list[Turn] = []

    def context_of(turn: Turn) -> dict[str, str]:
        turns.append(turn)
        return {"session": turn.session_key}

    user_agent: Agent[Any] = Agent(name="Assistant", model=offline_model(respond))
    runtime = OpenAIAgentsRuntime(
        user_agent, run_config=quiet_config(), seed_history=0, context_factory=context_of
    )
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room_a.id, ada.id, "a1")
        await server.wait_for(lambda: succeeded(gateway, 1))
        main_key = turns[0].session_key
        main_history = runtime.history(main_key)
        server.post_message(room_a.id, ada.id, "a2")
        await asyncio.wait_for(main_busy.wait(), 10)
        server.post_message(room_b.id, ada.id, "b1")  # main is busy: a fork takes it
        await server.wait_for(lambda: succeeded(gateway, 2))
        fork = next(t for t in turns if t.session_key != main_key)
        gate.set()
        await server.wait_for(lambda: not gateway.stats().forks_open and succeeded(gateway, 4))
    # The fork ran on main's history as of its last completed turn (not "a2", running).
    fork_first = next(c for c in brain.calls if text_of(last_item(c)).endswith("b1"))
    assert fork_first.input[: len(main_history)] == list(main_history)
    assert len(fork_first.input) == len(main_history) + 1
    # Main never got the fork's items; the fork's history was dropped on release.
    history = runtime.history(main_key)
    assert not any(text_of(item).endswith("b1") for item in history)
    assert not runtime.has_history(fork.session_key)
    assert replies(server, room_b, agent) == ["You said: b1"]
    assert replies(server, room_a, agent) == ["You said: a1", "You said: a2"]
    assert any(text_of(item).startswith("[Fork result]") for item in history)


@pytest.mark.asyncio
async def test_a_restart_seeds_the_history_from_the_chat(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    _, first = build(Replier())
    async with running_gateway(server, agent, first) as gateway:
        server.post_message(room.id, ada.id, "my name is Ada")
        await server.wait_for(lambda: succeeded(gateway, 1))
    brain = Replier()
    _, second = build(brain)  # a new process: a new runtime and gateway
    async with running_gateway(server, agent, second) as gateway:
        server.post_message(room.id, ada.id, "what is my name?")
        await server.wait_for(lambda: succeeded(gateway, 1))
    seen = brain.calls[0].input
    # one user message; the agent's own reply marked as sent with send_message, not given
    # as plain assistant text (a model may imitate that and answer where nobody sees it)
    transcript = f"{SEED_HEADING}\nAda: my name is Ada\nBot (you): You said: my name is Ada"
    assert seen[0] == {"role": "user", "content": transcript}
    assert len(seen) == 2
    assert text_of(seen[1]).endswith("what is my name?")
    assert second.history(second.session_keys()[0])[0] == seen[0]


def own_name(context: RunContextWrapper[Any], agent: Agent[Any]) -> str:
    """Instructions as a function (of the agent the run gives it: the clone)."""
    return f"You are {agent.name}."


async def own_name_later(context: RunContextWrapper[Any], agent: Agent[Any]) -> str:
    """Instructions as an async function."""
    return f"You are {agent.name}."


@pytest.mark.asyncio
@pytest.mark.parametrize("own", ["string", "function", "async function", "none"])
async def test_the_model_is_told_to_reply_with_send_message(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat, own: str
) -> None:
    given: Any = {
        "string": "You are Assistant.",
        "function": own_name,
        "async function": own_name_later,
        "none": None,
    }[own]
    brain = Replier()
    user_agent: Agent[Any] = Agent(name="Assistant", instructions=given, model=offline_model(brain))
    runtime = OpenAIAgentsRuntime(user_agent, run_config=quiet_config(), seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "hello")
        await server.wait_for(lambda: succeeded(gateway, 1))
    expected = f"You are Assistant.\n\n{REPLY_INSTRUCTIONS}" if given else REPLY_INSTRUCTIONS
    assert [call.system_instructions for call in brain.calls] == [expected] * 2
    assert user_agent.instructions is given  # the user's agent is not modified
    assert replies(server, room, agent) == ["You said: hello"]


@pytest.mark.asyncio
@pytest.mark.parametrize("instructions", [None, "Reply with send_message, in French."])
async def test_the_reply_instructions_can_be_replaced_or_left_out(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    instructions: str | None,
) -> None:
    brain = Replier()
    _, runtime = build(brain, instructions=instructions, seed_history=0)
    async with running_gateway(server, agent, runtime) as gateway:
        server.post_message(room.id, ada.id, "hello")
        await server.wait_for(lambda: succeeded(gateway, 1))
    own = "Answer through send_message."
    expected = f"{own}\n\n{instructions}" if instructions else own
    assert [call.system_instructions for call in brain.calls] == [expected] * 2


def test_the_tools_tell_the_model_how_to_reply() -> None:
    """The descriptions the model reads: send_message is the reply (as in the other two
    adapters), and no reStructuredText markup from the docstrings reaches the model."""
    tools = _parall_tools(ParallTools(cast(Turn, None)), {})
    descriptions = {tool.name: tool.description for tool in tools}
    assert tuple(descriptions) == TOOL_NAMES
    assert "reply" in descriptions["send_message"]
    assert not any("``" in text for text in descriptions.values())


def test_the_runtime_refuses_what_it_cannot_run() -> None:
    @function_tool
    def send_message(text: str) -> str:
        """Shadow the Parall tool."""
        return text

    with pytest.raises(ValueError, match="send_message"):
        OpenAIAgentsRuntime(Agent(name="a", tools=[send_message]))
    with pytest.raises(ValueError, match="'Expert' already has tools named send_message"):
        OpenAIAgentsRuntime(Agent(name="a", handoffs=[Agent(name="Expert", tools=[send_message])]))
    with pytest.raises(TypeError, match=r"agents\.Agent"):
        OpenAIAgentsRuntime("not an agent")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="context_factory"):  # as Pydantic AI's deps
        OpenAIAgentsRuntime(Agent(name="a"), context={}, context_factory=lambda turn: {})
    with pytest.raises(ValueError, match="seed_history"):
        OpenAIAgentsRuntime(Agent(name="a"), seed_history=-1)


@pytest.mark.asyncio
async def test_the_run_config_is_the_users_or_a_plain_one() -> None:
    given = quiet_config()
    assert OpenAIAgentsRuntime(Agent(name="a"), run_config=given).run_config is given
    runtime = OpenAIAgentsRuntime(Agent(name="a"))
    own = runtime.run_config
    assert isinstance(own, RunConfig)
    assert own.tracing_disabled is False  # the SDK's default: the adapter changes nothing
    assert own.model_settings is None
    await runtime.on_stop()  # closes its own model provider, reusable afterwards
    assert runtime.run_config is own


def test_without_the_sdk_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "agents", None)  # what a missing package looks like
    monkeypatch.delitem(sys.modules, "parall_bridge.adapters.openai_agents")
    with pytest.raises(ImportError, match=r"pip install 'parall-bridge\[openai-agents\]'"):
        importlib.import_module("parall_bridge.adapters.openai_agents")


# --- the example ------------------------------------------------------------------------


def load_example() -> ModuleType:
    path = EXAMPLES / "openai_agents_host.py"
    spec = importlib.util.spec_from_file_location("example_openai_agents_host", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.asyncio
@pytest.mark.parametrize("model", ["tests", "default"])
async def test_the_example_host_replies_and_stops_on_sigint(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    model: str,
) -> None:
    """The example with this suite's scripted model, and with its own offline default."""
    module = load_example()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRLL_API_URL", server.url)
    monkeypatch.setenv("PRLL_API_KEY", agent.api_key)
    monkeypatch.setenv("PRLL_ORG_ID", server.org_id)
    monkeypatch.delenv("PRLL_EXAMPLE_MODEL", raising=False)
    brain = Replier()
    given = offline_model(brain) if model == "tests" else None
    task = asyncio.get_running_loop().create_task(module.main(given))
    server.post_message(room.id, ada.id, "ping")
    await server.wait_for(lambda: bool(replies(server, room, agent)), timeout=10)
    await server.wait_for(lambda: not server.dispatch_items(agent.user_id))
    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the example's handler sets abort
    await asyncio.wait_for(task, 15)
    assert replies(server, room, agent) == ["You said: ping"]
    steps = [s.step_type for s in server.steps(agent.user_id)]
    assert steps == ["input", "thinking", "tool_call", "tool_result", "text"]
    assert bool(brain.calls) == (model == "tests")
    assert library_tasks() == set()
    assert sdk_tasks() == set()
    assert (tmp_path / "openai_agents_host.db").is_file()
