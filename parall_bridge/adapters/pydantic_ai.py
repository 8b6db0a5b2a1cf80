"""Pydantic AI on Parall: :class:`PydanticAIRuntime` runs a ``pydantic_ai.Agent`` for each
turn (``pip install 'parall-bridge[pydantic-ai]'``).

A host builds it in one line from the agent it already has::

    runtime = PydanticAIRuntime(agent)
    await Gateway(GatewayConfig.from_env(), runtime).start(abort)

Each turn runs ``agent.run(turn.prompt(), message_history=..., toolsets=[parall])`` with
the session's history (:class:`~parall_bridge.adapters.base.HistoryRuntime` keeps one per
session key, in Pydantic AI's own :data:`~pydantic_ai.messages.ModelMessage` type) and a
toolset of the four Parall tools built for that run only: the agent itself is never
modified. The run's event stream is recorded on the turn as it happens: each model
response starts a new response, thinking parts become reasoning, text parts text, and
function tool calls and their results tool calls and tool results, with the call ids the
model gave.

A Parall tool that fails raises :class:`pydantic_ai.exceptions.ToolFailed`: the model gets
a failed tool result (``outcome='failed'``, the provider's native error channel), the run
goes on, and the failure does not use up the tool's retry budget, however often it
happens. Only arguments that do not validate use that budget (``tool_retries`` in a row).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

try:
    import pydantic_core
    from pydantic_ai import FunctionToolset, RunContext, ToolFailed, UsageLimits
    from pydantic_ai.agent import AbstractAgent, EventStreamHandler
    from pydantic_ai.messages import (
        ERROR_OUTCOMES,
        AgentStreamEvent,
        FinalResultEvent,
        FunctionToolCallEvent,
        FunctionToolResultEvent,
        ModelMessage,
        ModelRequest,
        NativeToolCallPart,
        NativeToolReturnPart,
        PartDeltaEvent,
        PartEndEvent,
        PartStartEvent,
        TextPart,
        ThinkingPart,
        ThinkingPartDelta,
        ToolReturnPart,
        UserPromptPart,
    )
    from pydantic_ai.settings import ModelSettings
except ImportError as error:  # pragma: no cover (the extra is installed in the test env)
    raise ImportError(
        "parall_bridge.adapters.pydantic_ai needs Pydantic AI: "
        "pip install 'parall-bridge[pydantic-ai]'"
    ) from error

from ..runtime import Turn
from .base import (
    DEFAULT_SEED_HISTORY,
    REPLY_INSTRUCTIONS,
    TOOL_NAMES,
    ChatEntry,
    HistoryRuntime,
    ParallToolError,
    ParallTools,
    TurnOutput,
    seed_transcript,
    tool_failure_text,
)

__all__ = ["DEFAULT_INSTRUCTIONS", "DEFAULT_TOOL_RETRIES", "PydanticAIRuntime"]

_log = logging.getLogger("parall_bridge.adapters.pydantic_ai")

DEFAULT_INSTRUCTIONS: Final = REPLY_INSTRUCTIONS
"""The instructions the Parall toolset adds to each run (``instructions=None`` adds none):
:data:`~parall_bridge.adapters.base.REPLY_INSTRUCTIONS`, the same text every adapter gives
(this name is an alias of it)."""

DEFAULT_TOOL_RETRIES: Final = 5
"""How many Parall tool calls in a row may have arguments that do not validate before the
run fails (Pydantic AI sends each back to the model to fix; a call that succeeds resets
the count). A Parall tool that fails is not counted: it is a failed tool result."""

DepsFactory = Callable[[Turn], Any]
"""Builds a turn's deps: a function of the turn returning the deps, or an awaitable of them."""


class PydanticAIRuntime(HistoryRuntime[ModelMessage]):
    """An :class:`~parall_bridge.AgentRuntime` that runs a Pydantic AI agent for each turn.

    The agent gets the Parall tools (``send_message``, ``update_task``,
    ``get_chat_history``, ``upload_file``) as a toolset added to each run, besides its own
    tools; the agent object is not modified. Its own ``event_stream_handler``, if any,
    still sees every event.

    Args:
        agent: the agent (a ``pydantic_ai.Agent``, or any ``AbstractAgent`` such as a
            wrapper agent).
        deps: the deps of every run (for an agent with a ``deps_type``).
        deps_factory: builds the deps of each turn instead, from the turn (it may return
            an awaitable); not with ``deps``.
        model_settings: the model settings of every run (merged with the agent's own, as
            Pydantic AI does for ``run(model_settings=...)``).
        usage_limits: the usage limits of every run (Pydantic AI's default otherwise: 50
            requests). A run over them fails its turn (retried later).
        instructions: the instructions the Parall toolset adds to each run (by default
            :data:`~parall_bridge.adapters.base.REPLY_INSTRUCTIONS`, which tells the model
            it replies with ``send_message``); ``None`` adds none (the agent's own say it).
        tool_retries: how many calls of a Parall tool in a row may have invalid arguments
            before the run fails (:data:`DEFAULT_TOOL_RETRIES`).
        seed_history: how many of the chat's recent messages seed a session that has no
            history (a fresh process); 0 starts it empty.
        history_turns: how many turns a session's history keeps (``None``: all).

    Raises:
        TypeError: both ``deps`` and ``deps_factory`` were given.
        ValueError: an option is out of range, or the agent has a function tool named
            like a Parall tool.
    """

    def __init__(
        self,
        agent: AbstractAgent[Any, Any],
        *,
        deps: Any = None,
        deps_factory: DepsFactory | None = None,
        model_settings: ModelSettings | None = None,
        usage_limits: UsageLimits | None = None,
        instructions: str | None = REPLY_INSTRUCTIONS,
        tool_retries: int = DEFAULT_TOOL_RETRIES,
        seed_history: int = DEFAULT_SEED_HISTORY,
        history_turns: int | None = 100,
    ) -> None:
        super().__init__(seed_history=seed_history, history_turns=history_turns)
        if deps is not None and deps_factory is not None:
            raise TypeError("give deps or deps_factory, not both")
        if tool_retries < 0:
            raise ValueError("tool_retries must be 0 or more")
        for toolset in agent.toolsets:  # the static ones: Pydantic AI refuses a clash per run
            if not isinstance(toolset, FunctionToolset):
                continue
            if taken := sorted(set(TOOL_NAMES) & set(toolset.tools)):
                raise ValueError(
                    f"the agent has tools named like the Parall tools ({', '.join(taken)}): "
                    "rename them (Pydantic AI refuses two tools of one name)"
                )
        self._agent = agent
        self._deps = deps
        self._deps_factory = deps_factory
        self._model_settings = model_settings
        self._usage_limits = usage_limits
        self._instructions = instructions
        self._tool_retries = tool_retries

    @property
    def agent(self) -> AbstractAgent[Any, Any]:
        """The agent this runtime runs."""
        return self._agent

    def seed_messages(self, turn: Turn, entries: Sequence[ChatEntry]) -> Sequence[ModelMessage]:
        """The chat's recent messages as one ``ModelRequest`` of a ``UserPromptPart``:
        :func:`~parall_bridge.adapters.base.seed_transcript` (the agent's own marked
        ``(you)``, sent with ``send_message``)."""
        return [ModelRequest(parts=[UserPromptPart(content=seed_transcript(entries))])]

    async def run_with_history(
        self, turn: Turn, history: Sequence[ModelMessage], tools: ParallTools
    ) -> TurnOutput[ModelMessage]:
        """Run the agent on ``history`` with ``turn.prompt()`` and the Parall tools, record
        its event stream on the turn, and return the run's new messages and output.

        Everything the run started (model streams, tool calls) is closed by the run itself
        before this returns or raises, cancellation included: the run is awaited in this
        task, not in a background one.
        """
        deps = await self._deps_for(turn)
        recorder = _StreamRecorder(turn)
        result = await self._agent.run(
            turn.prompt(),
            message_history=list(history),
            deps=deps,
            model_settings=self._model_settings,
            usage_limits=self._usage_limits,
            toolsets=[self._toolset(tools)],
            event_stream_handler=self._handler(recorder),
            infer_name=False,  # inferring may set the user's agent.name
        )
        return TurnOutput(result.new_messages(), _output_text(result.output))

    # --- internals ----------------------------------------------------------------------

    async def _deps_for(self, turn: Turn) -> Any:
        if self._deps_factory is None:
            return self._deps
        deps = self._deps_factory(turn)
        if inspect.isawaitable(deps):
            deps = await deps
        return deps

    def _handler(self, recorder: _StreamRecorder) -> EventStreamHandler[Any]:
        own = self._agent.event_stream_handler

        async def handle(ctx: RunContext[Any], events: AsyncIterable[AgentStreamEvent]) -> None:
            recorder.node_started()
            tapped = _Tap(events, recorder.record)
            if own is not None:
                await own(ctx, tapped)
            async for _ in tapped:  # what the agent's own handler left
                pass

        return handle

    def _toolset(self, tools: ParallTools) -> FunctionToolset[Any]:
        async def send_message(text: str) -> str:
            """Post a message in the conversation's chat (this is how you reply) and
            return its message id.

            Args:
                text: the message, in Markdown.
            """
            return await _guarded("send_message", tools.send_message(text))

        async def update_task(status: str) -> str:
            """Set the status of the task this conversation is about and return the status
            it now has.

            Args:
                status: one of todo, in_progress, in_review, done, canceled.
            """
            return await _guarded("update_task", tools.update_task(status))

        async def get_chat_history(limit: int = 20) -> str:
            """The chat's most recent messages, oldest first, one per line
            ([message id] Sender: text).

            Args:
                limit: how many messages (1 to 100).
            """
            return await _guarded("get_chat_history", tools.get_chat_history(limit))

        async def upload_file(filename: str, content: str, content_type: str = "text/plain") -> str:
            """Upload a text file, post it in the chat as a file message, and return that
            message's id.

            Args:
                filename: the file's name, e.g. report.md.
                content: the file's content, as text.
                content_type: its MIME type.
            """
            return await _guarded("upload_file", tools.upload_file(filename, content, content_type))

        return FunctionToolset(
            [send_message, update_task, get_chat_history, upload_file],
            max_retries=self._tool_retries,
            # One at a time, in the order the model called them: two replies of one
            # response land in the chat in that order.
            sequential=True,
            instructions=self._instructions,
        )


async def _guarded(name: str, call: Awaitable[str]) -> str:
    """Await a Parall tool; a failure becomes :class:`ToolFailed` (a failed tool result
    for the model, not an aborted run, and not a retry that uses up the budget)."""
    try:
        return await call
    except ToolFailed:
        raise
    except Exception as error:
        if isinstance(error, ParallToolError):
            message = str(error) or type(error).__name__
        else:
            _log.warning("the Parall tool %s failed", name, exc_info=True)
            message = tool_failure_text(name, error)
        raise ToolFailed(message) from error


class _Tap:
    """Passes a node's events through, recording each one first.

    A plain async iterator rather than an async generator: closing a generator from
    another context is what Pydantic AI's own stream classes avoid (its issue 5132).
    """

    def __init__(
        self, events: AsyncIterable[AgentStreamEvent], record: Callable[[AgentStreamEvent], None]
    ) -> None:
        self._events = aiter(events)
        self._record = record

    def __aiter__(self) -> AsyncIterator[AgentStreamEvent]:
        return self

    async def __anext__(self) -> AgentStreamEvent:
        event = await anext(self._events)
        self._record(event)
        return event


class _StreamRecorder:
    """Maps a run's events to the turn's recorder."""

    def __init__(self, turn: Turn) -> None:
        self._turn = turn
        self._fresh = False
        self._native_results: set[str] = set()

    def node_started(self) -> None:
        """A node's stream begins: a model response's if it holds response events."""
        self._fresh = True

    def record(self, event: AgentStreamEvent) -> None:
        """Record one event (never raises into the run)."""
        try:
            self._record(event)
        except Exception:
            _log.exception("could not record a %s event", type(event).__name__)

    def _record(self, event: AgentStreamEvent) -> None:
        turn = self._turn
        response_event = PartStartEvent | PartDeltaEvent | PartEndEvent | FinalResultEvent
        if self._fresh and isinstance(event, response_event):
            self._fresh = False
            turn.new_response()
        match event:
            case PartStartEvent(part=ThinkingPart(content=text)):
                turn.reasoning(text)
            case PartDeltaEvent(delta=ThinkingPartDelta(content_delta=delta)):
                if delta:
                    turn.reasoning(delta)
            case PartEndEvent(part=ThinkingPart()):
                turn.reasoning_done()
            case PartEndEvent(part=TextPart(content=text)):
                turn.text(text)
            case PartEndEvent(part=NativeToolCallPart() as call):
                turn.tool_call(call.tool_call_id, call.tool_name, call.args)
            case (
                PartStartEvent(part=NativeToolReturnPart() as native)
                | PartEndEvent(part=NativeToolReturnPart() as native)
            ):
                # Pydantic AI starts a provider-run tool's return whole (and may not end it).
                if native.tool_call_id not in self._native_results:
                    self._native_results.add(native.tool_call_id)
                    turn.tool_result(native.tool_call_id, output=_plain_content(native.content))
            case FunctionToolCallEvent(part=call):
                turn.tool_call(call.tool_call_id, call.tool_name, call.args)
            case FunctionToolResultEvent(part=returned):
                self._tool_result(returned)
            case _:
                pass

    def _tool_result(self, part: ToolReturnPart) -> None:
        if part.outcome == "success":
            self._turn.tool_result(part.tool_call_id, output=_plain_content(part.content))
            return
        error = part.model_response_str(wrap_if_error=False)
        if part.outcome not in ERROR_OUTCOMES:  # denied, interrupted: say which
            error = f"{part.outcome}: {error}"
        self._turn.tool_result(part.tool_call_id, error=error)


def _plain_content(content: object) -> object:
    """A tool's output as plain data for a step (its text when it has no JSON form)."""
    if content is None or isinstance(content, str | int | float | bool):
        return content
    try:
        return pydantic_core.to_jsonable_python(content)
    except pydantic_core.PydanticSerializationError:
        return str(content)


def _output_text(output: object) -> str | None:
    """The run's output as the turn's final text: a string as it is, structured output as
    its JSON."""
    if output is None or isinstance(output, str):
        return output
    try:
        return pydantic_core.to_json(output).decode()
    except pydantic_core.PydanticSerializationError:
        return str(output)
