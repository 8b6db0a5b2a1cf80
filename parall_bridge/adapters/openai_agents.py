"""The OpenAI Agents SDK on Parall: :class:`OpenAIAgentsRuntime` runs an ``agents.Agent``
for each turn.

.. code-block:: python

    runtime = OpenAIAgentsRuntime(agent)
    await Gateway(GatewayConfig.from_env(), runtime).start(abort)

Each turn runs ``Runner.run_streamed`` on a clone of the agent that also has the four
Parall tools (``send_message``, ``update_task``, ``get_chat_history``, ``upload_file``)
and, after the agent's own instructions, :data:`~parall_bridge.adapters.base.REPLY_INSTRUCTIONS`
(the model replies with ``send_message``), with the session's history and ``turn.prompt()``
as a user message. The run's stream is
recorded on the turn: each model response starts a new step group, reasoning deltas become
thinking steps, tool calls and their results (with the model's call ids) tool steps, and
message output text steps. The agent replies through ``send_message``; its final output is
the turn's (suppressed) text.

The history is the SDK's input items (``TResponseInputItem``), kept per session by
:class:`~parall_bridge.adapters.base.HistoryRuntime` (not by an SDK ``Session``): a turn's
items are saved only when the run completed.

Needs ``pip install 'parall-bridge[openai-agents]'``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

try:
    from agents import (
        Agent,
        AgentsException,
        FunctionTool,
        Handoff,
        HandoffCallItem,
        HandoffOutputItem,
        ItemHelpers,
        MessageOutputItem,
        RawResponsesStreamEvent,
        ReasoningItem,
        RunConfig,
        RunContextWrapper,
        RunItemStreamEvent,
        Runner,
        RunResultStreaming,
        StreamEvent,
        ToolCallItem,
        ToolCallOutputItem,
        TResponseInputItem,
        function_tool,
    )
    from agents.run_config import DEFAULT_MAX_TURNS
    from agents.tool_context import ToolContext
    from openai.types.responses import (
        ResponseCreatedEvent,
        ResponseReasoningSummaryTextDeltaEvent,
        ResponseReasoningSummaryTextDoneEvent,
        ResponseReasoningTextDeltaEvent,
        ResponseReasoningTextDoneEvent,
    )
    from pydantic import BaseModel
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "parall_bridge.adapters.openai_agents needs the OpenAI Agents SDK: "
        "pip install 'parall-bridge[openai-agents]'"
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

__all__ = ["EventHook", "OpenAIAgentsRuntime"]

_log = logging.getLogger("parall_bridge.adapters.openai_agents")

EventHook: TypeAlias = Callable[[Turn, StreamEvent], Awaitable[None] | None]
"""Called with each event of a run's stream after it was recorded (awaited when it returns
an awaitable)."""

_REASONING_DELTAS = (ResponseReasoningSummaryTextDeltaEvent, ResponseReasoningTextDeltaEvent)
_REASONING_DONES = (ResponseReasoningSummaryTextDoneEvent, ResponseReasoningTextDoneEvent)


class OpenAIAgentsRuntime(HistoryRuntime[TResponseInputItem]):
    """An :class:`~parall_bridge.AgentRuntime` that runs an OpenAI Agents SDK agent.

    The agent is never modified: each run uses ``agent.clone(tools=[*agent.tools,
    *parall_tools], instructions=...)``, and so for the agents it hands off to (a handoff's
    target gets the Parall tools and the reply instructions too, so it can reply). Their
    own tools, guardrails, model and settings apply as they are.

    Args:
        agent: the ``agents.Agent`` to run; neither it nor an agent it hands off to may
            have a tool named like a Parall tool.
        run_config: the ``agents.RunConfig`` of every run, passed as it is (tracing, model
            provider, model settings...). By default, one plain ``RunConfig()`` of this
            runtime (its model provider is closed when the gateway stops). Tracing is the
            SDK's: it exports to OpenAI unless ``RunConfig(tracing_disabled=True)``,
            ``agents.set_tracing_disabled(True)`` or ``OPENAI_AGENTS_DISABLE_TRACING=1``.
        context: the run context of every run (the agent's ``TContext``).
        context_factory: instead of ``context``, a function building the context of each
            turn from the :class:`~parall_bridge.Turn` (it may return an awaitable).
        max_turns: the SDK's limit of model calls per run (``None``: no limit); a run that
            exceeds it fails the turn.
        on_event: called with each event of the run's stream after it was recorded, to
            observe the stream (awaited if it returns an awaitable; raising fails the turn).
        instructions: appended to each agent's own instructions in the run's clones (a
            string, a callable, or none), after a blank line: by default
            :data:`~parall_bridge.adapters.base.REPLY_INSTRUCTIONS`, which tells the model
            it replies with ``send_message``; ``None`` adds nothing (the agent's own say it).
        seed_history: how many of the chat's recent messages seed a session that has no
            history (a fresh process); 0 starts it empty.
        history_turns: how many turns a session's history keeps (``None``: all).

    Raises:
        TypeError: ``agent`` is not an ``agents.Agent``, or both ``context`` and
            ``context_factory`` were given.
        ValueError: an option is out of range, or the agent (or one it hands off to) has
            a tool named like a Parall tool.
    """

    def __init__(
        self,
        agent: Agent[Any],
        *,
        run_config: RunConfig | None = None,
        context: Any = None,
        context_factory: Callable[[Turn], Any] | None = None,
        max_turns: int | None = DEFAULT_MAX_TURNS,
        on_event: EventHook | None = None,
        instructions: str | None = REPLY_INSTRUCTIONS,
        seed_history: int = DEFAULT_SEED_HISTORY,
        history_turns: int | None = 100,
    ) -> None:
        super().__init__(seed_history=seed_history, history_turns=history_turns)
        if not isinstance(agent, Agent):
            raise TypeError(f"OpenAIAgentsRuntime takes an agents.Agent, not {type(agent)!r}")
        if context is not None and context_factory is not None:
            raise TypeError("give context or context_factory, not both")
        if max_turns is not None and max_turns < 1:
            raise ValueError("max_turns must be at least 1 (or None)")
        _check_tool_names(agent)
        self._agent = agent
        self._owns_run_config = run_config is None
        self._run_config = RunConfig() if run_config is None else run_config
        self._context = context
        self._context_factory = context_factory
        self._max_turns = max_turns
        self._on_event = on_event
        self._instructions = instructions

    @property
    def agent(self) -> Agent[Any]:
        """The agent each turn runs (never modified by a run)."""
        return self._agent

    @property
    def run_config(self) -> RunConfig:
        """The ``RunConfig`` of every run."""
        return self._run_config

    def seed_messages(
        self, turn: Turn, entries: Sequence[ChatEntry]
    ) -> Sequence[TResponseInputItem]:
        """The chat's recent messages as one ``user`` message item:
        :func:`~parall_bridge.adapters.base.seed_transcript` (the agent's own marked
        ``(you)``, sent with ``send_message``)."""
        return [{"role": "user", "content": seed_transcript(entries)}]

    async def run_with_history(
        self, turn: Turn, history: Sequence[TResponseInputItem], tools: ParallTools
    ) -> TurnOutput[TResponseInputItem]:
        """Run the agent, with the Parall tools, on ``history`` and the turn's prompt; record
        its stream on the turn; return the prompt and the run's items, and its final output.

        On any exit before the run completed (an error, a cancellation), the run is
        cancelled and its tasks awaited before this returns or raises.
        """
        prompt: TResponseInputItem = {"role": "user", "content": turn.prompt()}
        given = [*history, prompt]
        errors: dict[str, str] = {}
        agent = _Equipped(_parall_tools(tools, errors), self._instructions).agent(self._agent)
        context = self._context_factory(turn) if self._context_factory else self._context
        if inspect.isawaitable(context):  # an async factory (as Pydantic AI's deps_factory)
            context = await context
        result = Runner.run_streamed(
            agent,
            input=list(given),
            context=context,
            max_turns=self._max_turns,
            run_config=self._run_config,
        )
        stream = result.stream_events()
        recorder = _StreamRecorder(turn, errors)
        try:
            async for event in stream:
                recorder.record(event)
                if self._on_event is not None:
                    outcome = self._on_event(turn, event)
                    if inspect.isawaitable(outcome):
                        await outcome
        finally:
            await _stop(result, stream)
        return TurnOutput(_new_items(result, given), _output_text(result.final_output))

    async def on_stop(self) -> None:
        """Close the model provider of the runtime's own ``RunConfig`` (not a given one)."""
        if self._owns_run_config:
            await self._run_config.model_provider.aclose()


# --- the Parall tools -------------------------------------------------------------------


def _check_own_tools(agent: Agent[Any]) -> None:
    """Refuse an agent that has a tool named like a Parall tool."""
    names = {name for tool in agent.tools if isinstance(name := getattr(tool, "name", None), str)}
    clash = sorted(names & set(TOOL_NAMES))
    if clash:
        raise ValueError(
            f"the agent {agent.name!r} already has tools named {', '.join(clash)}: "
            "the Parall tools use these names"
        )


def _check_tool_names(agent: Agent[Any], seen: set[int] | None = None) -> None:
    """Refuse an agent, or an agent it hands off to, with a tool named like a Parall tool."""
    seen = set() if seen is None else seen
    if id(agent) in seen:
        return
    seen.add(id(agent))
    _check_own_tools(agent)
    for target in agent.handoffs:
        if isinstance(target, Agent):
            _check_tool_names(target, seen)


class _Equipped:
    """Clones of the agents of one run with the Parall tools added (and ``instructions``
    appended to their own, unless ``None``): the starting agent and the agents it hands
    off to (a plain ``Agent`` in ``handoffs``, or the agent a ``Handoff`` returns), each
    cloned once. The originals are not modified."""

    def __init__(self, tools: list[FunctionTool], instructions: str | None = None) -> None:
        self._tools = tools
        self._instructions = instructions
        self._clones: dict[int, Agent[Any]] = {}

    def agent(self, agent: Agent[Any]) -> Agent[Any]:
        clone = self._clones.get(id(agent))
        if clone is not None:
            return clone
        _check_own_tools(agent)  # the agents it hands off to are checked as they are cloned
        if self._instructions is None:
            clone = agent.clone(tools=[*agent.tools, *self._tools])
        else:
            clone = agent.clone(
                tools=[*agent.tools, *self._tools],
                instructions=_appended(agent.instructions, self._instructions),
            )
        self._clones[id(agent)] = clone
        clone.handoffs = [self._handoff(target) for target in agent.handoffs]  # a new list
        return clone

    def _handoff(self, target: Agent[Any] | Handoff[Any, Any]) -> Agent[Any] | Handoff[Any, Any]:
        if isinstance(target, Agent):
            return self.agent(target)
        invoke = target.on_invoke_handoff

        async def equipped(context: RunContextWrapper[Any], arguments: str) -> Any:
            chosen = await invoke(context, arguments)
            return self.agent(chosen) if isinstance(chosen, Agent) else chosen

        return dataclasses.replace(target, on_invoke_handoff=equipped)


Instructions: TypeAlias = (
    str | Callable[[RunContextWrapper[Any], Agent[Any]], Awaitable[str] | str] | None
)


def _appended(own: Instructions, extra: str) -> Instructions:
    """An agent's instructions with ``extra`` after them (a blank line between): a string
    for a string or none, a function calling the agent's own (sync or async) for a
    function."""
    if own is None:
        return extra
    if isinstance(own, str):
        return f"{own}\n\n{extra}" if own.strip() else extra
    function = own

    async def instructions(context: RunContextWrapper[Any], agent: Agent[Any]) -> str:
        given = function(context, agent)
        if inspect.isawaitable(given):
            given = await given
        return f"{given}\n\n{extra}" if given and str(given).strip() else extra

    return instructions


def _parall_tools(tools: ParallTools, errors: dict[str, str]) -> list[FunctionTool]:
    """The four Parall tools of one run as SDK function tools. A tool that raises returns
    its error to the model (the turn goes on), noted in ``errors`` by call id."""

    def failure(name: str) -> Callable[[RunContextWrapper[Any], Exception], str]:
        def failed(context: RunContextWrapper[Any], error: Exception) -> str:
            message = _error_text(name, error)
            if isinstance(context, ToolContext):
                errors[context.tool_call_id] = message
            return message

        return failed

    return [
        function_tool(method, failure_error_function=failure(method.__name__))
        for method in (
            tools.send_message,
            tools.update_task,
            tools.get_chat_history,
            tools.upload_file,
        )
    ]


def _error_text(name: str, error: Exception) -> str:
    """What the model reads when the Parall tool ``name`` failed. The SDK's default hides
    every error's message; the Parall tools' messages are written for the model, and an
    unexpected error's reads as in the other adapters (:func:`tool_failure_text`)."""
    if isinstance(error, ParallToolError):
        return str(error)
    if isinstance(error, AgentsException):  # e.g. arguments that do not match the schema
        return str(error)
    if isinstance(getattr(error, "cancelled_error", None), asyncio.CancelledError):
        return "the tool was cancelled"  # the SDK's wrapper of a tool's CancelledError
    _log.error("the Parall tool %s failed unexpectedly", name, exc_info=error)
    return tool_failure_text(name, error)


# --- the stream -------------------------------------------------------------------------


def _field(raw: object, name: str) -> Any:
    """A field of an SDK raw item, which is a pydantic model or a plain dict."""
    if isinstance(raw, dict):
        return raw.get(name)
    return getattr(raw, name, None)


class _StreamRecorder:
    """Records a run's stream events on the turn."""

    def __init__(self, turn: Turn, errors: dict[str, str]) -> None:
        self._turn = turn
        self._errors = errors
        self._streamed: set[str] = set()  # reasoning items whose deltas were recorded

    def record(self, event: StreamEvent) -> None:
        if isinstance(event, RawResponsesStreamEvent):
            self._raw(event)
        elif isinstance(event, RunItemStreamEvent):
            self._item(event)

    def _raw(self, event: RawResponsesStreamEvent) -> None:
        data = event.data
        if isinstance(data, ResponseCreatedEvent):
            self._turn.new_response()
        elif isinstance(data, _REASONING_DELTAS):
            self._streamed.add(data.item_id)
            self._turn.reasoning(data.delta)
        elif isinstance(data, _REASONING_DONES):
            self._turn.reasoning_done()

    def _item(self, event: RunItemStreamEvent) -> None:
        item = event.item
        turn = self._turn
        if isinstance(item, ReasoningItem):
            # A model that gave the reasoning whole, without deltas: record it now.
            reasoning = item.raw_item
            if reasoning.id not in self._streamed:
                for summary in reasoning.summary:
                    turn.reasoning(summary.text, done=True)
                for content in reasoning.content or []:
                    turn.reasoning(content.text, done=True)
        elif isinstance(item, ToolCallItem | HandoffCallItem):  # a handoff is a tool call
            raw = item.raw_item
            call_id = _field(raw, "call_id") or _field(raw, "id") or ""
            name = _field(raw, "name") or _field(raw, "type") or "tool"
            turn.tool_call(str(call_id), str(name), _field(raw, "arguments"))
        elif isinstance(item, ToolCallOutputItem | HandoffOutputItem):
            call_id = str(_field(item.raw_item, "call_id") or _field(item.raw_item, "id") or "")
            error = self._errors.pop(call_id, None)
            if error is not None:
                turn.tool_result(call_id, error=error)
            elif isinstance(item, ToolCallOutputItem):
                turn.tool_result(call_id, output=item.output)
            else:  # the handoff's output, e.g. {"assistant": "<the agent's name>"}
                turn.tool_result(call_id, output=_field(item.raw_item, "output"))
        elif isinstance(item, MessageOutputItem):
            turn.text(ItemHelpers.text_message_output(item))


async def _stop(result: RunResultStreaming, stream: AsyncIterator[StreamEvent]) -> None:
    """End the run and wait until every task it started is over.

    A completed run is already over. Otherwise (an error or a cancellation of the consumer)
    the SDK leaves work behind: cancelled while waiting on the stream, it cancels the run's
    tasks without awaiting them; cancelled while busy elsewhere, the stream stays suspended
    and the run goes on (the model, the tools) until the generator is collected. So: cancel
    the run, close the stream, await the run's tasks.
    """
    if not result.is_complete:
        result.cancel()
    if isinstance(stream, AsyncGenerator):  # it is one (typed as an iterator)
        await stream.aclose()
    tasks = {
        task
        for task in (
            result.run_loop_task,
            # Private in openai-agents 0.24 (pinned < 0.25): the guardrail tasks of the run,
            # which cancel() cancels without awaiting.
            getattr(result, "_input_guardrails_task", None),
            getattr(result, "_output_guardrails_task", None),
        )
        if isinstance(task, asyncio.Task) and not task.done()
    }
    if tasks:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


def _new_items(
    result: RunResultStreaming, given: Sequence[TResponseInputItem]
) -> list[TResponseInputItem]:
    """The turn's new items: the prompt, then what the run added after its input."""
    items = result.to_input_list()
    start = len(ItemHelpers.input_to_new_input_list(result.input))
    if items[: len(given)] != list(given):
        # A handoff input filter rewrote the input: keep the prompt and the run's own items.
        _log.debug("the run rewrote its input; saving the prompt and the run's items")
    return [given[-1], *items[start:]]


def _output_text(output: object) -> str | None:
    """The run's final output as text."""
    if output is None or isinstance(output, str):
        return output
    if isinstance(output, BaseModel):
        return output.model_dump_json()
    try:
        return json.dumps(output, default=str)
    except ValueError:
        return str(output)
