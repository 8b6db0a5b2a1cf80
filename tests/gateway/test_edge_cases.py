"""Gateway edge cases found in review: a first connection closed before hello, a newer
task assignment found by catch-up, a host's own CancelledError, a live message whose
catch-up fetch fails, an unexpected error in catch-up, attachment ids without their
objects, tool arguments as a JSON string, and a cold-start window of 0. Each test fails on
the code as it was before its fix."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any, cast

import pytest

from parall_bridge import DispatchItem, EventOrigin, ProtocolError, StepType
from parall_bridge import protocol as p
from parall_bridge.gateway.sources import Gate as ItemGate
from parall_bridge.gateway.sources import ItemOutcome, Sources
from parall_bridge.models import Chat, User
from parall_bridge.routing import SerialRoutingStrategy
from parall_bridge.runtime import ForkOutcome, GatewayInfo, SessionRef, Turn
from parall_bridge.testing import AgentAccount, FakeParallServer
from parall_bridge.ws import ConnectionState

from ._harness import Gate, ScriptedRuntime, running


@pytest.mark.asyncio
async def test_gateway_retries_a_first_connection_closed_before_hello(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    """PROTOCOL.md: 1001/1011/1012/1013 -> reconnect, only 4003 is fatal; issue 8: "a
    transient platform outage at start is retried, not fatal"."""
    server.go_silent()  # the upgrade succeeds, then no hello yet
    async with running(server, agent, ready=False) as run:
        await run.wait_for(lambda: any(c.ticket_ok for c in server.ws_connections))
        server.go_silent(False)
        await server.close_ws(p.CLOSE_TRY_AGAIN_LATER, "try again later")
        await asyncio.wait_for(run.gateway.wait_ready(), 5.0)
        assert run.gateway.stats().connection == ConnectionState.CONNECTED.value


@pytest.mark.asyncio
async def test_catch_up_runs_a_newer_task_assignment_while_the_older_one_runs() -> None:
    """DESIGN.md 3: "task dispatches dedupe on (task id, updated_at)" (the seed's catch-up
    fetches the task and dispatches a version it has not seen)."""
    async with FakeParallServer(replay_buffer_size=0) as server:
        agent = server.add_agent("Bot", api_key="pk_test_secret_key_0123456789")
        ada = server.add_user("Ada")
        room = server.add_chat(type="direct", members=[ada.id, agent.user_id])
        gate = asyncio.Event()
        gated: list[Turn] = []

        async def behaviour(turn: Turn) -> str | None:
            if not gated:
                gated.append(turn)
                await gate.wait()
            return "ok"

        runtime = ScriptedRuntime(behaviour)
        async with running(server, agent, runtime) as run:
            task = server.assign_task("Write", assignee_id=agent.user_id, creator_id=ada.id)
            await run.wait_for(lambda: len(runtime.turns) == 1)
            await server.close_ws(p.CLOSE_SERVICE_RESTART)
            # While the WebSocket is down (and nothing can be replayed) the task is
            # assigned again and a message follows: only catch-up brings them, in order.
            v2 = server.assign_task(
                "Write", assignee_id=agent.user_id, creator_id=ada.id, task_id=task.id
            )
            later = server.post_message(room.id, ada.id, "after the reassignment")
            await run.wait_for(
                lambda: any(r.path.endswith(f"/messages/{later.id}") for r in server.requests)
            )  # catch-up (FIFO) got past the task's new row
            gate.set()
            await run.wait_for(
                lambda: any(t.event.updated_at == v2.updated_at for t in runtime.finished),
                timeout=3.0,
            )
        assert v2.updated_at != task.updated_at
        assert not run.pending()


@pytest.mark.asyncio
async def test_a_turn_raising_cancelled_error_by_itself_does_not_stall_the_lane(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """DESIGN.md 4: "a turn that raises is a failed dispatch ... the gateway keeps running";
    only cancellations by shutdown or the turn timeout are cancellations."""
    gate = asyncio.Event()

    async def behaviour(turn: Turn) -> str | None:
        if turn.event.text == "first":
            await gate.wait()
            # The host awaited an inner task it cancelled itself (a "stop" button):
            # the CancelledError escapes run_turn, but nobody cancelled the turn.
            inner = asyncio.get_running_loop().create_task(asyncio.sleep(10))
            inner.cancel()
            await inner
        return "ok"

    runtime = ScriptedRuntime(behaviour)
    async with running(server, agent, runtime) as run:
        server.post_message(room.id, ada.id, "first")
        await run.wait_for(lambda: len(runtime.turns) == 1)
        server.post_message(room.id, ada.id, "second")
        await run.wait_for(lambda: run.gateway.stats().queued == 1)
        gate.set()
        await run.wait_for(lambda: any(t.event.text == "second" for t in runtime.finished))


@pytest.mark.asyncio
async def test_a_live_message_is_not_dropped_while_a_catch_up_fetch_of_it_fails(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """DESIGN.md 6.15: an item whose source is not taken is dispatched at once; the live
    event was in hand, yet it waits up to ``reconcile_interval`` (60 s by default)."""
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime) as run:  # reconcile_interval=30
        server.delay_ws_frames(0.5)  # the live frames come a little late
        message = server.post_message(room.id, ada.id, "hello")
        # The catch-up's fetch of the message is slow, then fails (a transient outage).
        server.fail_next(p.GET_MESSAGE, status=429, retry_after=1.0)
        server.fail_next(p.GET_MESSAGE, status=503, times=3)
        await run.gateway.feed(p.FRAME_RECOVERY_OVERFLOW, {})  # a catch-up now
        await run.wait_for(
            lambda: len([r for r in server.requests if r.path.endswith(message.id)]) >= 4
        )  # the fetch gave up; meanwhile message.new and dispatch.new were delivered
        server.delay_ws_frames(None)
        await run.wait_for(lambda: len(runtime.finished) == 1, timeout=3.0)


@pytest.mark.asyncio
async def test_an_unexpected_error_on_one_item_does_not_stop_catch_up(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug met while handling one dispatch item (stood in for by an exception injected
    into the item handler) leaves that item pending; the rest of the pass and every later
    pass still run."""
    first = server.post_message(room.id, ada.id, "first")
    server.post_message(room.id, ada.id, "second")  # both wait for catch-up
    original = Sources.on_item
    broken = [first.id]

    async def on_item(
        self: Sources,
        item: DispatchItem,
        origin: EventOrigin,
        cutoff: datetime | None = None,
        gate: ItemGate | None = None,
    ) -> ItemOutcome:
        if item.source_id in broken:
            broken.clear()
            raise RuntimeError("a bug")
        return await original(self, item, origin, cutoff, gate)

    monkeypatch.setattr(Sources, "on_item", on_item)
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime, ready=False) as run:
        # The first pass (at start) meets the bug on "first" and still runs "second"; a
        # later pass (the one after hello) runs "first".
        await run.wait_for(lambda: runtime.texts() == [["second"], ["first"]])
        await run.wait_for(lambda: not run.pending())  # the ack goes out in the background
    assert broken == []  # the bug was met


@pytest.mark.asyncio
async def test_text_message_with_attachment_ids_only_gets_a_media_url(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """PROTOCOL.md, Objects, ``Message``: "``attachment_ids`` (list, may be absent),
    ``attachments`` (list, may be absent ...). A ``text`` message may carry attachments
    too: they belong in the event body like a file message's."
    DESIGN.md section 3, Inbound filters: "file messages, and attachments on text
    messages, get a media URL each"; section 5: "``[Attachment: type url]`` (one line
    per attachment, the file message's own and any on a text message)".

    A server may send ``attachment_ids`` without the ``attachments`` objects: the
    attachment must still reach the body (its URL from ``get_file_url``).
    """
    attachment = server.add_attachment(b"png", file_name="a.png", mime_type="image/png")
    frame: dict[str, Any] = {
        "id": "msg_ids_only",
        "chat_id": room.id,
        "sender_id": ada.id,
        "sender": {"id": ada.id, "display_name": "Ada", "type": "human"},
        "message_type": "text",
        "content": {"text": "see this"},
        "attachment_ids": [attachment],
    }
    async with running(server, agent) as run:
        assert await run.gateway.feed(p.FRAME_MESSAGE_NEW, frame)
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
    body = run.runtime.turns[0].body
    attachment_lines = [line for line in body.splitlines() if line.startswith("[Attachment: ")]
    assert len(attachment_lines) == 1, body
    assert attachment in attachment_lines[0]
    assert body.endswith("\n\nsee this")


@pytest.mark.asyncio
async def test_tool_call_recorder_never_raises_on_json_string_args(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """DESIGN.md section 4: "Recorder methods on ``Turn``, synchronous, ordered, never
    raising ... ``tool_call(call_id, name, args)``"; PROTOCOL.md ``AgentStep``:
    "tool_call: ``{call_id, name, args}``".

    Streaming SDKs hand tool arguments over as a JSON string (OpenAI's
    ``function.arguments``); recording one must not raise into the host's turn (which
    would fail the turn and leave the event unacked).
    """
    raised: list[BaseException] = []

    async def behaviour(turn: Turn) -> str | None:
        try:
            turn.tool_call("call_1", "lookup", cast(Any, '{"q": "x"}'))
        except Exception as exc:  # recorded, so the test reports it rather than a failed turn
            raised.append(exc)
        turn.tool_result("call_1", "found")
        return "done"

    async with running(server, agent, ScriptedRuntime(behaviour)) as run:
        server.post_message(room.id, ada.id, "look it up")
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
        await run.wait_for(lambda: not run.pending())
    assert raised == []
    calls = run.steps(StepType.TOOL_CALL)
    assert [c.content for c in calls] == [
        {"call_id": "call_1", "name": "lookup", "args": {"q": "x"}}
    ]


@pytest.mark.asyncio
async def test_cold_start_window_zero_skips_every_pending_item_on_the_first_pass(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """DESIGN.md section 3, Catch-up: "on the first catch-up pass of a process skip (ack,
    logged at WARNING) items older than the cold-start window (5 min; ``None`` turns
    this off)"; issue 8: "``cold_start_window=None`` turns the cold-start skip off".

    Only ``None`` turns the skip off: with a window of 0 s every pending item is older
    than the window, so the first pass acks it without a turn.
    """
    server.post_message(room.id, ada.id, "from before the start")
    server.age_dispatch_items(60)
    async with running(server, agent, cold_start_window=0.0) as run:
        await run.wait_for(lambda: not run.pending())
    assert run.runtime.texts() == []


class Stubborn:
    """A turn behaviour that swallows its first ``swallow`` cancellations (a host bug)."""

    def __init__(self, swallow: int) -> None:
        self.swallow = swallow
        self.swallowed = 0
        self.release = asyncio.Event()

    async def __call__(self, turn: Turn) -> str | None:
        if turn.event.text != "stubborn":
            return "ok"
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                if self.swallowed >= self.swallow:
                    raise
                self.swallowed += 1
        return "finally"


@pytest.mark.asyncio
async def test_a_timed_out_turn_that_swallows_its_cancellation_keeps_its_session(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    """At most one run_turn per session (DESIGN 4): the next turn of the chat waits for the
    stubborn one to end; then the timeout is recorded and the lane goes on."""
    stubborn = Stubborn(swallow=100)
    runtime = ScriptedRuntime(stubborn)
    try:
        async with running(server, agent, runtime, turn_timeout=0.3, cancel_grace=0.2) as run:
            server.post_message(room.id, ada.id, "stubborn")
            server.post_message(room.id, ada.id, "next")
            await run.wait_for(
                lambda: any("its session waits for it" in r.getMessage() for r in all_logs.records)
            )
            assert stubborn.swallowed == 1
            assert len(runtime.turns) == 1  # "next" waits: the session is still busy
            stubborn.release.set()  # the host's turn ends on its own
            await run.wait_for(lambda: any(t.event.text == "next" for t in runtime.finished))
            await run.wait_for(lambda: len(run.steps(StepType.ERROR)) == 1)
            errors = [s.content["message"] for s in run.steps(StepType.ERROR)]
            assert errors == ["turn timed out after 0.3 s"]
    finally:
        stubborn.release.set()
    assert runtime.overlaps == []
    assert run.gateway.stats().turns_failed == 1


@pytest.mark.asyncio
async def test_a_fork_is_released_only_after_its_stubborn_turn_ended(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    first = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    second = server.add_chat(
        type="group", name="ops", members=[ada.id, agent.user_id], agent_routing_mode="active"
    )
    stubborn = Stubborn(swallow=100)
    main_gate = asyncio.Event()
    active_at_release: list[set[str]] = []

    async def behaviour(turn: Turn) -> str | None:
        if turn.event.text == "main work":
            await main_gate.wait()
            return "ok"
        return await stubborn(turn)

    class Recorder(ScriptedRuntime):
        async def release_session(self, child: SessionRef, outcome: ForkOutcome) -> None:
            active_at_release.append(set(self.active))
            await super().release_session(child, outcome)

    runtime = Recorder(behaviour)
    try:
        async with running(server, agent, runtime, turn_timeout=0.3, cancel_grace=0.2) as run:
            server.post_message(first.id, ada.id, "main work")
            await run.wait_for(lambda: len(runtime.turns) == 1)
            server.post_message(second.id, ada.id, "stubborn")  # main busy: a fork
            await run.wait_for(lambda: stubborn.swallowed == 1)  # timed out, still running
            main_gate.set()
            stubborn.release.set()
            await run.wait_for(lambda: len(runtime.released) == 1)
    finally:
        stubborn.release.set()
        main_gate.set()
    assert runtime.forked
    assert active_at_release == [set()]


@pytest.mark.asyncio
async def test_shutdown_while_a_timed_out_turn_is_being_stopped_leaves_nothing_running(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
) -> None:
    stubborn = Stubborn(swallow=1)  # a second cancellation ends it
    runtime = ScriptedRuntime(stubborn)
    try:
        async with running(
            server, agent, runtime, turn_timeout=0.3, shutdown_grace=0.1, cancel_grace=3.0
        ) as run:
            server.post_message(room.id, ada.id, "stubborn")
            await run.wait_for(lambda: stubborn.swallowed == 1)  # timed out, being stopped
            await asyncio.wait_for(run.stop(), 5.0)  # the harness checks no task is left
    finally:
        stubborn.release.set()
    assert len(runtime.finished) == 1


@pytest.mark.asyncio
async def test_send_message_after_the_turn_ended_is_refused(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    kept: list[Turn] = []

    async def behaviour(turn: Turn) -> str | None:
        kept.append(turn)
        return "ok"

    async with running(server, agent, ScriptedRuntime(behaviour)) as run:
        server.post_message(room.id, ada.id, "hello")
        await run.wait_for(lambda: len(run.runtime.finished) == 1)
        with pytest.raises(RuntimeError, match="this turn has ended"):
            await kept[0].send_message("too late")
    assert [m.sender_id for m in server.messages(room.id)] == [ada.id]


@pytest.mark.asyncio
async def test_shutdown_does_not_wait_forever_for_a_turn_that_swallows_its_cancellation(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
) -> None:
    stubborn = Stubborn(swallow=1)
    runtime = ScriptedRuntime(stubborn)
    async with running(server, agent, runtime, shutdown_grace=0.1, cancel_grace=0.2) as run:
        server.post_message(room.id, ada.id, "stubborn")
        await run.wait_for(lambda: len(runtime.turns) == 1)
        run.abort.set()
        # Grace, one cancel swallowed (abandoned after 0.2 s), a second cancel at close.
        await asyncio.wait_for(asyncio.shield(run.task), 3.0)
    assert stubborn.swallowed == 1
    assert run.pending() == [run.pending()[0]]  # not acked: it never finished


# --- stuck turns are visible (the hardening issue, item 6) -------------------------------------


@pytest.mark.asyncio
async def test_stats_show_each_running_turn_with_its_chat_and_age(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    gate = Gate()
    async with running(server, agent, ScriptedRuntime(gate)) as run:
        assert run.gateway.stats().running == ()
        server.post_message(room.id, ada.id, "hello")
        await run.wait_for(lambda: len(run.gateway.stats().running) == 1)
        (turn,) = run.gateway.stats().running
        assert (turn["chat_id"], turn["task_id"]) == (room.id, None)
        assert turn["session_key"] == "agent:main:parall:default"
        assert turn["age"] >= 0
        assert (turn["overdue"], turn["ignored_cancellation"]) == (False, False)
        gate.open.set()
        await run.wait_for(lambda: run.gateway.stats().running == ())


@pytest.mark.asyncio
async def test_a_long_turn_is_warned_about_at_half_its_timeout(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    gate = Gate()
    async with running(server, agent, ScriptedRuntime(gate), turn_timeout=0.6) as run:
        server.post_message(room.id, ada.id, "slow")
        await run.wait_for(
            lambda: any("half its turn_timeout" in r.getMessage() for r in all_logs.records)
        )
        gate.open.set()  # it ends in time: no failure
        await run.wait_for(lambda: not run.pending())
        assert run.gateway.stats().turns_failed == 0
    (warning,) = [r for r in all_logs.records if "half its turn_timeout" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert room.id in warning.getMessage()


@pytest.mark.asyncio
async def test_a_turn_that_ignores_its_cancellation_shows_as_stuck_and_is_named(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    stubborn = Stubborn(swallow=100)
    try:
        async with running(
            server, agent, ScriptedRuntime(stubborn), turn_timeout=0.3, cancel_grace=0.2
        ) as run:
            server.post_message(room.id, ada.id, "stubborn")

            def stuck() -> bool:
                return any(t["ignored_cancellation"] for t in run.gateway.stats().running)

            def named() -> bool:
                return any(
                    r.levelno == logging.ERROR
                    and room.id in r.getMessage()
                    and "ignored its cancellation" in r.getMessage()
                    for r in all_logs.records
                )

            # The stats see the grace run out on their own clock; the watchdog's ERROR
            # follows on its own task (later, on a loaded machine).
            await run.wait_for(lambda: stuck() and named())
            (turn,) = run.gateway.stats().running
            assert turn["overdue"] is True
            assert turn["chat_id"] == room.id
            stubborn.release.set()
            await run.wait_for(lambda: run.gateway.stats().running == ())
    finally:
        stubborn.release.set()


@pytest.mark.asyncio
async def test_shutdown_names_the_chat_of_a_turn_it_abandons(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    stubborn = Stubborn(swallow=100)
    try:
        async with running(
            server, agent, ScriptedRuntime(stubborn), shutdown_grace=0.1, cancel_grace=0.2
        ) as run:
            server.post_message(room.id, ada.id, "stubborn")
            await run.wait_for(lambda: len(run.gateway.stats().running) == 1)
            run.abort.set()
            await asyncio.wait_for(asyncio.shield(run.task), 5.0)  # returns, bounded
            errors = [r.getMessage() for r in all_logs.records if r.levelno == logging.ERROR]
            assert any("abandoning it" in m and room.id in m for m in errors), errors
            assert len(run.gateway.stats().running) == 1  # abandoned, still in the host's code
            stubborn.release.set()  # the host's coroutine ends at last
            await run.wait_for(lambda: run.gateway.stats().running == ())
    finally:
        stubborn.release.set()


# --- hostile answers, gateway side (the hardening issue, item 1) ----------------------------------


@pytest.mark.asyncio
async def test_catch_up_handles_the_pages_it_got_before_a_listing_error() -> None:
    async with FakeParallServer(max_page_size=2) as server:
        bot = server.add_agent("Paged")
        human = server.add_user("Ada")
        chats = [server.add_chat(type="direct", members=[human.id, bot.user_id]) for _ in range(5)]
        for i, chat in enumerate(chats):
            server.post_message(chat.id, human.id, f"m{i}")
        server.refuse_ws(100_000)  # no hello: only the start-up pass runs
        server.delay_next(p.LIST_DISPATCH, 0.0)  # the first page answers...
        server.fail_next(p.LIST_DISPATCH, status=400, times=1)  # ...the second does not
        runtime = ScriptedRuntime()
        # Serial: the two items run as two turns on main. With forks, the second item
        # could run on one, and the fork's wake-up turn made a third (a flaky count).
        async with running(
            server,
            bot,
            runtime,
            routing=SerialRoutingStrategy(),
            ready=False,
            reconcile_interval=600.0,
            outage_poll_interval=600.0,
        ) as run:
            await run.wait_for(lambda: len(runtime.finished) == 2)
            assert sorted(text for turn in runtime.texts() for text in turn) == ["m0", "m1"]
            await run.wait_for(lambda: len(run.pending()) == 3)  # the rest: the next pass


@pytest.mark.asyncio
async def test_an_unreadable_dispatch_item_counts_attempts_and_is_dead_lettered(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """A message that never decodes is not fetched again on every pass: each failed fetch
    counts an attempt, as a failed turn does, and at max_dispatch_attempts it is given up
    on (on_dead_letter, an error step, the ack)."""
    message = server.post_message(room.id, ada.id, "garbled")
    server.malform_next(p.GET_MESSAGE, times=1000, body='{"id": ')
    runtime = ScriptedRuntime()
    async with running(
        server, agent, runtime, reconcile_interval=0.1, max_dispatch_attempts=2
    ) as run:
        await run.wait_for(lambda: run.gateway.stats().dead_letters == 1 and not run.pending())
    assert runtime.turns == []
    ((dead, error),) = runtime.dead
    assert isinstance(error, ProtocolError)
    assert [event.message_id for event in dead] == [message.id]
    assert dead[0].text.startswith("[unreadable: ProtocolError")
    fetches = [r for r in server.requests if r.path.endswith(f"/messages/{message.id}")]
    assert len(fetches) == 2  # once per attempt, not once per pass
    attempts = [s.content["attempts"] for s in run.steps(StepType.ERROR)]
    assert attempts == [1, 2]


class HangingStart(ScriptedRuntime):
    """A runtime whose ``on_start`` never returns by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = asyncio.Event()
        self.start_cancelled = False

    async def on_start(self, info: GatewayInfo) -> None:
        self.starting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.start_cancelled = True
            raise


@pytest.mark.asyncio
async def test_an_abort_during_a_hanging_on_start_cancels_it_and_shuts_down(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    """The shutdown is bounded even when the host's ``on_start`` hangs: the abort cancels
    it, and ``on_stop`` still runs."""
    runtime = HangingStart()
    async with running(server, agent, runtime, ready=False) as run:
        await asyncio.wait_for(runtime.starting.wait(), 10.0)
        run.abort.set()
        await asyncio.wait_for(asyncio.shield(run.task), 10.0)
    assert runtime.start_cancelled
    assert runtime.stopped
    assert run.task.exception() is None
