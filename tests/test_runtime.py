"""The host contract (DESIGN.md section 4): ``Turn`` (its text, ids, recorder and
retry-safe sends), ``EventStreamRuntime`` and the ``AgentRuntime`` defaults."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from parall_bridge import AgentConfig, AgentStep, ParallClient, StepType, TargetType
from parall_bridge.events import (
    EventAttachment,
    EventKind,
    ForkResult,
    ParallEvent,
    build_fork_result_prefix,
    turn_id_of,
)
from parall_bridge.gateway.ledger import TurnEntry
from parall_bridge.gateway.turns import TurnRun
from parall_bridge.models import Task, TaskStatus
from parall_bridge.runtime import (
    AgentRuntime,
    EventStreamRuntime,
    ForkOutcome,
    GatewayInfo,
    HistoryEntry,
    ReasoningDelta,
    ReasoningEnd,
    ResponseStart,
    SessionRef,
    StreamEvent,
    Text,
    ToolCall,
    ToolResult,
    Turn,
    json_safe,
    tool_args,
)
from parall_bridge.testing import AgentAccount, FakeParallServer

MAIN = SessionRef("agent:main:parall:default")
SEPARATOR = "\n\n---\n\n"
T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def message(
    message_id: str = "msg_1",
    *,
    chat_id: str = "cht_1",
    sender: str = "Ada",
    text: str = "hello",
    created_at: datetime | None = T0,
    **extra: Any,
) -> ParallEvent:
    return ParallEvent.message(
        chat_id=chat_id,
        message_id=message_id,
        sender_id=f"usr_{sender.lower()}",
        sender_name=sender,
        text=text,
        created_at=created_at,
        **extra,
    )


def task_event(updated_at: datetime = T0) -> ParallEvent:
    return ParallEvent.task(
        Task(
            id="tsk_1",
            identifier="ENG-1",
            title="Do it",
            status=TaskStatus.TODO,
            priority="normal",
            creator_id="usr_boss",
            updated_at=updated_at,
        )
    )


@pytest.fixture
def dummy_client() -> ParallClient:
    """A client that is never used to reach a server (no session is opened)."""
    return ParallClient("http://parall.invalid", "pk_dummy_key")


class Recorder:
    """A ``record`` callable keeping every step."""

    def __init__(self) -> None:
        self.steps: list[AgentStep] = []

    def __call__(self, step: AgentStep) -> None:
        self.steps.append(step)

    def kinds(self) -> list[str]:
        return [str(step.step_type) for step in self.steps]

    def contents(self) -> list[dict[str, Any]]:
        return [dict(step.content) for step in self.steps]


_RUNS: weakref.WeakKeyDictionary[Turn, TurnRun] = weakref.WeakKeyDictionary()


async def _journaled() -> None:
    return None


def make_turn(
    client: ParallClient,
    events: Sequence[ParallEvent] | None = None,
    *,
    prefix: str = "",
    record: Callable[[AgentStep], None] | None = None,
    session: SessionRef = MAIN,
) -> Turn:
    """A turn with the gateway's lifecycle behind it (see :func:`finish`)."""
    events = list(events) if events is not None else [message()]
    keys = tuple(event.key for event in events)
    run = TurnRun(
        TurnEntry(turn_id=turn_id_of(keys), keys=keys, session_key=session.key),
        record=record if record is not None else Recorder(),
        journaled=_journaled,
    )
    turn = Turn(
        session=session,
        events=events,
        prefix=prefix,
        org_id="org_test",
        agent_id="usr_bot",
        client=client,
        hooks=run,
    )
    _RUNS[turn] = run
    return turn


def finish(turn: Turn, reply: object) -> None:
    """End a turn of :func:`make_turn` as the gateway does once ``run_turn`` returned."""
    _RUNS[turn].finish(turn, reply)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def turn(dummy_client: ParallClient, recorder: Recorder) -> Turn:
    return make_turn(dummy_client, record=recorder)


# --- what the turn is about -----------------------------------------------------------------------


def test_a_turn_has_at_least_one_event(dummy_client: ParallClient) -> None:
    with pytest.raises(ValueError, match="at least one event"):
        make_turn(dummy_client, [])


def test_prompt_of_one_event_is_its_body(dummy_client: ParallClient) -> None:
    event = message()
    turn = make_turn(dummy_client, [event])
    assert turn.prompt() == event.body
    assert turn.body == event.body
    assert turn.history == ()


def test_prompt_prefix_then_every_body_in_arrival_order(dummy_client: ParallClient) -> None:
    events = [message("msg_1", text="one"), message("msg_2", text="two"), message("msg_3")]
    prefix = build_fork_result_prefix([ForkResult(EventKind.MESSAGE, "2 events in cht_9")])
    turn = make_turn(dummy_client, events, prefix=prefix)
    assert turn.prompt() == (
        "[Fork result]\n[Handled: message — 2 events in cht_9]"
        + SEPARATOR
        + events[0].body
        + SEPARATOR
        + events[1].body
        + SEPARATOR
        + events[2].body
    )
    assert turn.body == prefix + events[2].body


def test_prompt_without_prefix(dummy_client: ParallClient) -> None:
    events = [message("msg_1", text="one"), message("msg_2", text="two")]
    turn = make_turn(dummy_client, events)
    assert turn.prompt() == events[0].body + SEPARATOR + events[1].body
    assert turn.body == events[1].body


def test_history_of_the_earlier_events(dummy_client: ParallClient) -> None:
    t1 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    earlier = [
        message("msg_1", sender="Ada", text="first", created_at=t1),
        message(
            "msg_2",
            sender="Bob",
            text="second",
            created_at=None,
            no_reply=True,
            thread_root_id="msg_0",
            attachments=[EventAttachment("image/png", "https://files.test/a.png")],
        ),
    ]
    turn = make_turn(dummy_client, [*earlier, message("msg_3", text="last")])
    assert turn.history == (
        HistoryEntry(
            sender="Ada", body="[Message ID: msg_1]\nfirst", message_id="msg_1", timestamp=t1
        ),
        HistoryEntry(
            sender="Bob",
            body=(
                "[Message ID: msg_2] [Hint: no_reply] [Thread: msg_0] "
                "[Attachment: image/png https://files.test/a.png]\nsecond"
            ),
            message_id="msg_2",
            timestamp=None,
        ),
    )


def test_ids_of_a_message_turn(dummy_client: ParallClient) -> None:
    session = SessionRef("fork:1", handle=object())
    events = [message("msg_1"), message("msg_2")]
    turn = make_turn(dummy_client, events, session=session)
    assert turn.session is session
    assert turn.session_key == "fork:1"
    assert turn.events == tuple(events)
    assert turn.event is events[-1]
    assert turn.org_id == "org_test"
    assert turn.agent_id == "usr_bot"
    assert turn.chat_id == "cht_1"
    assert turn.message_id == "msg_2"
    assert turn.task_id is None
    assert turn.client is dummy_client
    assert turn.group_key
    assert not turn.ended


def test_ids_of_a_task_turn(dummy_client: ParallClient) -> None:
    turn = make_turn(dummy_client, [task_event()])
    assert turn.chat_id is None
    assert turn.message_id == "tsk_1"
    assert turn.task_id == "tsk_1"


def test_ids_of_a_synthetic_turn(dummy_client: ParallClient) -> None:
    turn = make_turn(dummy_client, [ParallEvent.synthetic("synthetic-1")])
    assert turn.chat_id is None
    assert turn.task_id is None
    assert turn.message_id == "synthetic-1"


def test_group_keys_differ_between_turns(dummy_client: ParallClient) -> None:
    assert make_turn(dummy_client).group_key != make_turn(dummy_client).group_key


# --- the recorder ---------------------------------------------------------------------------------


def test_new_response_changes_the_group_key_of_every_step(turn: Turn, recorder: Recorder) -> None:
    first = turn.group_key
    turn.reasoning("think", done=True)
    turn.text("t1")
    turn.tool_call("c1", "search", {"q": "x"})
    turn.tool_result("c1", output="found")
    turn.new_response()
    second = turn.group_key
    assert second != first
    turn.reasoning("more", done=True)
    turn.tool_call("c2", "send", {})
    turn.tool_result("c2", error="nope")
    turn.text("t2")
    assert recorder.kinds() == [
        "thinking",
        "text",
        "tool_call",
        "tool_result",
        "thinking",
        "tool_call",
        "tool_result",
        "text",
    ]
    assert [step.group_key for step in recorder.steps] == [first] * 4 + [second] * 4


def test_reasoning_deltas_make_one_thinking_step_per_block(turn: Turn, recorder: Recorder) -> None:
    turn.reasoning("Let ")
    turn.reasoning("me ")
    turn.reasoning("see.")
    assert recorder.steps == []
    turn.reasoning_done()
    turn.reasoning("Second ")
    turn.reasoning("block.", done=True)
    turn.reasoning_done()  # nothing pending: no step
    turn.reasoning("", done=True)  # nothing pending: no step
    assert recorder.kinds() == ["thinking", "thinking"]
    assert recorder.contents() == [{"text": "Let me see."}, {"text": "Second block."}]


@pytest.mark.parametrize("flush", ["text", "tool_call", "tool_result"])
def test_the_next_text_or_tool_step_ends_a_reasoning_block(
    turn: Turn, recorder: Recorder, flush: str
) -> None:
    turn.reasoning("a")
    turn.reasoning("b")
    if flush == "text":
        turn.text("said")
    elif flush == "tool_call":
        turn.tool_call("c1", "search")
    else:
        turn.tool_result("c1", output=1)
    assert recorder.kinds() == ["thinking", flush]
    assert recorder.contents()[0] == {"text": "ab"}
    turn.reasoning("c", done=True)
    assert recorder.contents()[2] == {"text": "c"}


def test_new_response_ends_the_reasoning_block_under_the_old_key(
    turn: Turn, recorder: Recorder
) -> None:
    first = turn.group_key
    turn.reasoning("old")
    turn.new_response()
    assert recorder.kinds() == ["thinking"]
    assert recorder.steps[0].group_key == first
    assert turn.group_key != first


def test_text_is_a_suppressed_text_step(turn: Turn, recorder: Recorder) -> None:
    turn.text("Hello, world")
    assert len(recorder.steps) == 1
    step = recorder.steps[0]
    assert step.step_type is StepType.TEXT
    assert dict(step.content) == {"text": "Hello, world", "suppressed": True}


def test_tool_call_shape(turn: Turn, recorder: Recorder) -> None:
    turn.tool_call("c1", "search", {"q": "docs", "limit": 3})
    turn.tool_call("c2", "now")
    assert [step.step_type for step in recorder.steps] == [StepType.TOOL_CALL] * 2
    assert recorder.contents() == [
        {"call_id": "c1", "name": "search", "args": {"q": "docs", "limit": 3}},
        {"call_id": "c2", "name": "now", "args": {}},
    ]


def test_tool_result_shape(turn: Turn, recorder: Recorder) -> None:
    turn.tool_result("c1", output={"hits": 2})
    turn.tool_result("c2", error="timeout")
    turn.tool_result("c3")
    turn.tool_result("c4", output="", error="partial")
    assert [step.step_type for step in recorder.steps] == [StepType.TOOL_RESULT] * 4
    assert recorder.contents() == [
        {"call_id": "c1", "output": {"hits": 2}},
        {"call_id": "c2", "error": "timeout"},
        {"call_id": "c3"},
        {"call_id": "c4", "output": "", "error": "partial"},
    ]


@pytest.mark.parametrize(
    ("event", "target"),
    [
        (message(chat_id="cht_42"), (TargetType.CHAT, "cht_42")),
        (task_event(), (TargetType.TASK, "tsk_1")),
        (ParallEvent.synthetic("synthetic-1"), (TargetType.NONE, None)),
    ],
)
def test_step_targets(
    dummy_client: ParallClient, event: ParallEvent, target: tuple[TargetType, str | None]
) -> None:
    recorder = Recorder()
    turn = make_turn(dummy_client, [event], record=recorder)
    turn.reasoning("r", done=True)
    turn.text("t")
    turn.tool_call("c", "n")
    turn.tool_result("c", output=1)
    assert len(recorder.steps) == 4
    for step in recorder.steps:
        assert (step.target_type, step.target_id) == target


def test_steps_target_the_last_event_of_a_coalesced_turn(dummy_client: ParallClient) -> None:
    recorder = Recorder()
    events = [task_event(), message(chat_id="cht_7")]
    make_turn(dummy_client, events, record=recorder).text("x")
    assert (recorder.steps[0].target_type, recorder.steps[0].target_id) == (
        TargetType.CHAT,
        "cht_7",
    )


class Flaky:
    """A ``record`` that raises on every other call."""

    def __init__(self) -> None:
        self.calls = 0
        self.kept: list[AgentStep] = []

    def __call__(self, step: AgentStep) -> None:
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("the writer is broken")
        self.kept.append(step)


def test_recorder_methods_never_raise(dummy_client: ParallClient) -> None:
    flaky = Flaky()
    turn = make_turn(dummy_client, record=flaky)
    turn.new_response()
    turn.reasoning("a")
    turn.reasoning("b", done=True)  # raises inside
    turn.reasoning("c")
    turn.reasoning_done()  # kept
    turn.text("t")  # raises inside
    turn.tool_call("c1", "n", {"a": 1})  # kept
    turn.tool_result("c1", output=1)  # raises inside
    finish(turn, "reply")  # text already recorded: nothing
    assert flaky.calls == 5
    assert [str(step.step_type) for step in flaky.kept] == ["thinking", "tool_call"]
    assert turn.ended


def test_recorder_is_a_no_op_after_the_turn_ended(turn: Turn, recorder: Recorder) -> None:
    finish(turn, None)
    assert turn.ended
    key = turn.group_key
    turn.new_response()
    turn.reasoning("late")
    turn.reasoning("late", done=True)
    turn.reasoning_done()
    turn.text("late")
    turn.tool_call("c", "n")
    turn.tool_result("c", output=1)
    finish(turn, "late reply")
    assert recorder.steps == []
    assert turn.group_key == key


def test_finish_records_the_reply_when_no_text_was_recorded(turn: Turn, recorder: Recorder) -> None:
    turn.reasoning("pending")
    finish(turn, "the answer")
    assert recorder.kinds() == ["thinking", "text"]
    assert recorder.contents() == [
        {"text": "pending"},
        {"text": "the answer", "suppressed": True},
    ]


def test_finish_does_not_repeat_text_already_recorded(turn: Turn, recorder: Recorder) -> None:
    turn.text("the answer")
    finish(turn, "the answer")
    assert recorder.kinds() == ["text"]


def test_finish_without_a_reply_records_nothing(turn: Turn, recorder: Recorder) -> None:
    finish(turn, None)
    assert recorder.steps == []


# --- send_message against the emulator ------------------------------------------------------------


def sent_keys(server: FakeParallServer) -> list[str]:
    return [
        request.json["idempotency_key"]
        for request in server.requests
        if request.method == "POST" and request.path.endswith("/messages")
    ]


@pytest.mark.asyncio
async def test_send_message_is_retry_safe(
    server: FakeParallServer, agent: AgentAccount, client: ParallClient
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[agent.user_id, ada.id])
    posted = server.post_message(chat.id, ada.id, "hello")
    event = ParallEvent.message(
        chat_id=chat.id, message_id=posted.id, sender_id=ada.id, sender_name="Ada", text="hello"
    )

    def new_turn() -> Turn:
        return Turn(
            session=MAIN,
            events=[event],
            prefix="",
            org_id=server.org_id,
            agent_id=agent.user_id,
            client=client,
            record=Recorder(),
        )

    first = new_turn()
    turn_id = turn_id_of([posted.id])
    assert first.turn_id == turn_id
    prefix = f"pb:{agent.user_id}:{turn_id}"
    one = await first.send_message("one")
    two = await first.send_message("two", no_reply=True)
    assert sent_keys(server) == [f"{prefix}:1", f"{prefix}:2"]
    assert [m.id for m in server.messages(chat.id)] == [posted.id, one.id, two.id]
    assert one.chat_id == chat.id
    assert one.sender_id == agent.user_id

    # The platform redelivers the event (a crash before the ack): the same sends
    # answer the messages already posted and post nothing new.
    again = new_turn()
    assert (await again.send_message("one")).id == one.id
    assert (await again.send_message("two", no_reply=True)).id == two.id
    assert sent_keys(server)[2:] == [f"{prefix}:1", f"{prefix}:2"]
    assert [m.id for m in server.messages(chat.id)] == [posted.id, one.id, two.id]

    # A third send is new.
    three = await again.send_message("three")
    assert three.id not in (one.id, two.id)
    assert sent_keys(server)[-1] == f"{prefix}:3"
    assert len(server.messages(chat.id)) == 4


@pytest.mark.asyncio
async def test_send_message_to_another_chat(
    server: FakeParallServer, agent: AgentAccount, client: ParallClient
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[agent.user_id, ada.id])
    other = server.add_chat(type="group", name="Ops", members=[agent.user_id, ada.id])
    event = ParallEvent.message(
        chat_id=chat.id, message_id="msg_x", sender_id=ada.id, sender_name="Ada", text="hi"
    )
    turn = Turn(
        session=MAIN,
        events=[event],
        prefix="",
        org_id=server.org_id,
        agent_id=agent.user_id,
        client=client,
        record=Recorder(),
    )
    sent = await turn.send_message("over there", chat_id=other.id)
    assert sent.chat_id == other.id
    assert [m.id for m in server.messages(other.id)] == [sent.id]
    assert server.messages(chat.id) == []
    assert sent_keys(server) == [f"pb:{agent.user_id}:{turn_id_of(['msg_x'])}:1"]


@pytest.mark.asyncio
async def test_task_turn_needs_a_chat_id(
    server: FakeParallServer, agent: AgentAccount, client: ParallClient
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[agent.user_id, ada.id])
    event = task_event()
    turn = Turn(
        session=MAIN,
        events=[event],
        prefix="",
        org_id=server.org_id,
        agent_id=agent.user_id,
        client=client,
        record=Recorder(),
    )
    with pytest.raises(ValueError, match="chat_id"):
        await turn.send_message("where to?")
    assert sent_keys(server) == []
    sent = await turn.send_message("done", chat_id=chat.id)
    assert sent.chat_id == chat.id
    assert sent_keys(server) == [f"pb:{agent.user_id}:{turn_id_of([event.key])}:1"]


def test_turn_id_derives_from_the_events_in_order(dummy_client: ParallClient) -> None:
    """DESIGN.md section 8: a turn's id is derived from its ordered sources, so the same
    events give the same id (and the same reply keys) in any process."""
    a, b = message(message_id="msg_a"), message(message_id="msg_b")
    turn = make_turn(dummy_client, [a, b])
    assert turn.turn_id == turn_id_of(["msg_a", "msg_b"])
    assert make_turn(dummy_client, [a, b]).turn_id == turn.turn_id
    assert make_turn(dummy_client, [b, a]).turn_id != turn.turn_id
    assert make_turn(dummy_client, [b]).turn_id != turn.turn_id
    given = Turn(
        session=MAIN,
        events=[a],
        prefix="",
        org_id="org_test",
        agent_id="usr_bot",
        client=dummy_client,
        record=Recorder(),
        turn_id="s0123",
    )
    assert given.turn_id == "s0123"


def test_a_task_assigned_again_makes_a_new_turn_id(dummy_client: ParallClient) -> None:
    first = task_event(T0)
    again = task_event(datetime(2026, 11, 24, 11, tzinfo=UTC))
    assert make_turn(dummy_client, [first]).turn_id != make_turn(dummy_client, [again]).turn_id


@pytest.mark.asyncio
async def test_two_agents_answering_one_message_keep_their_replies_apart(
    server: FakeParallServer, client: ParallClient
) -> None:
    """PROTOCOL.md scopes idempotency keys to the org: two agents replying to one group
    message must not share a key, or the second reply is silently dropped."""
    ada = server.add_user("Ada")
    bots = [server.add_agent("Bot one"), server.add_agent("Bot two")]
    chat = server.add_chat(type="group", members=[ada.id, *(b.user_id for b in bots)])
    posted = server.post_message(chat.id, ada.id, "@both hello")
    event = ParallEvent.message(
        chat_id=chat.id, message_id=posted.id, sender_id=ada.id, sender_name="Ada", text="hi"
    )
    for bot in bots:
        async with ParallClient(server.url, bot.api_key) as own:
            turn = Turn(
                session=MAIN,
                events=[event],
                prefix="",
                org_id=server.org_id,
                agent_id=bot.user_id,
                client=own,
                record=Recorder(),
            )
            await turn.send_message(f"reply from {bot.user.display_name}")
    replies = [m for m in server.messages(chat.id) if m.id != posted.id]
    assert sorted(m.sender_id for m in replies) == sorted(b.user_id for b in bots)


# --- EventStreamRuntime ---------------------------------------------------------------------------


class Scripted(EventStreamRuntime):
    """Yields a fixed list of stream events."""

    def __init__(self, script: Sequence[StreamEvent]) -> None:
        self.script = list(script)
        self.seen: list[Turn] = []

    async def events(self, turn: Turn) -> AsyncIterator[StreamEvent]:
        self.seen.append(turn)
        for event in self.script:
            yield event


@pytest.mark.asyncio
async def test_event_stream_is_drained_into_the_recorder_in_order(
    turn: Turn, recorder: Recorder
) -> None:
    runtime = Scripted(
        [
            ResponseStart(),
            ReasoningDelta("I should "),
            ReasoningDelta("search."),
            ReasoningEnd(),
            ToolCall("c1", "search", {"q": "parall"}),
            ToolResult("c1", output=["hit"]),
            ResponseStart(),
            ReasoningDelta("Found it."),
            Text("draft"),
            ToolCall("c2", "send_message"),
            ToolResult("c2", error="rate limited"),
            Text("final answer"),
        ]
    )
    initial = turn.group_key
    reply = await runtime.run_turn(turn)
    assert reply == "final answer"
    assert runtime.seen == [turn]
    assert recorder.kinds() == [
        "thinking",
        "tool_call",
        "tool_result",
        "thinking",
        "text",
        "tool_call",
        "tool_result",
        "text",
    ]
    assert recorder.contents() == [
        {"text": "I should search."},
        {"call_id": "c1", "name": "search", "args": {"q": "parall"}},
        {"call_id": "c1", "output": ["hit"]},
        {"text": "Found it."},
        {"text": "draft", "suppressed": True},
        {"call_id": "c2", "name": "send_message", "args": {}},
        {"call_id": "c2", "error": "rate limited"},
        {"text": "final answer", "suppressed": True},
    ]
    keys = [step.group_key for step in recorder.steps]
    assert initial not in keys
    assert keys[0] == keys[1] == keys[2]
    assert keys[3] == keys[4] == keys[5] == keys[6] == keys[7]
    assert keys[0] != keys[3]
    finish(turn, reply)
    assert len(recorder.steps) == 8


@pytest.mark.asyncio
async def test_event_stream_without_text_returns_none(turn: Turn, recorder: Recorder) -> None:
    reply = await Scripted([ReasoningDelta("hmm")]).run_turn(turn)
    assert reply is None
    assert recorder.steps == []  # the block is still open
    finish(turn, reply)
    assert recorder.contents() == [{"text": "hmm"}]


def test_stream_event_defaults() -> None:
    assert ToolCall("c", "n").args == {}
    result = ToolResult("c")
    assert (result.output, result.error) == (None, None)


# --- AgentRuntime ---------------------------------------------------------------------------------


class Minimal(AgentRuntime):
    async def run_turn(self, turn: Turn) -> str | None:
        return "ok"


@pytest.mark.asyncio
async def test_agent_runtime_defaults(turn: Turn) -> None:
    runtime = Minimal()
    parent = SessionRef("agent:main:parall:default")
    assert await runtime.fork_session(parent) is None
    await runtime.release_session(SessionRef("fork"), ForkOutcome(handled=1, failed=0))
    await runtime.apply_platform_config(AgentConfig(version=3))
    await runtime.on_start(
        GatewayInfo(agent_id="usr_bot", org_id="org_1", account_id="default", session_id="ses_1")
    )
    await runtime.on_dead_letter([message()], RuntimeError("poison"))
    await runtime.on_stop()
    assert await runtime.run_turn(turn) == "ok"


def test_agent_runtime_is_abstract() -> None:
    with pytest.raises(TypeError):
        AgentRuntime()  # type: ignore[abstract]

    class NoTurn(AgentRuntime):
        pass

    with pytest.raises(TypeError):
        NoTurn()  # type: ignore[abstract]


def test_event_stream_runtime_needs_events() -> None:
    class NoEvents(EventStreamRuntime):
        pass

    with pytest.raises(TypeError):
        NoEvents()  # type: ignore[abstract]
    assert issubclass(EventStreamRuntime, AgentRuntime)


def test_small_public_types() -> None:
    outcome = ForkOutcome(handled=2, failed=1)
    assert (outcome.handled, outcome.failed, outcome.summary) == (2, 1, None)
    assert ForkOutcome(1, 0, "done").summary == "done"
    ref = SessionRef("k")
    assert ref.handle is None
    # The handle belongs to the host: it does not take part in equality.
    assert SessionRef("k", handle=object()) == SessionRef("k", handle=object())
    info = GatewayInfo(agent_id="usr_bot", org_id="org_1", account_id="a", session_id=None)
    assert info.session_id is None


def test_tool_args_takes_mappings_json_strings_and_anything_else() -> None:
    assert tool_args(None) == {}
    assert tool_args({"q": 1}) == {"q": 1}
    assert tool_args('{"q": 1}') == {"q": 1}
    assert tool_args(b'{"q": 1}') == {"q": 1}
    assert tool_args("[1, 2]") == "[1, 2]"  # JSON, but not an object: kept as sent
    assert tool_args("not json") == "not json"
    assert tool_args([1, 2]) == [1, 2]


def test_json_safe_turns_non_finite_numbers_into_text() -> None:
    content = {"score": float("nan"), "limits": (float("inf"), -float("inf"), 1.5)}
    assert json_safe(content) == {"score": "nan", "limits": ["inf", "-inf", 1.5]}
