"""LangGraph on Parall: :class:`LangGraphRuntime` runs a compiled LangGraph graph for each turn.

The graph's state has a ``messages`` key (``MessagesState`` or a state of your own with
``Annotated[list[AnyMessage], add_messages]``) and its tool node offers
:func:`parall_tools`, the four Parall tools as LangChain tools::

    runtime = LangGraphRuntime(graph)  # a graph you built
    runtime = LangGraphRuntime.from_model(model, [my_tool])  # or the standard agent loop

The runtime keeps each session's messages itself (see
:class:`~parall_bridge.adapters.base.HistoryRuntime`) and passes them in with the turn's
prompt as the last :class:`~langchain_core.messages.HumanMessage`; a graph compiled with
a checkpointer is refused, so a cancelled turn never leaves a dangling tool call in a
checkpoint. The run is streamed (``stream_mode=["messages", "updates", "values"]``) onto
the turn's recorder: each model response starts a new response, its reasoning becomes a
thinking step, its text a suppressed text step, its tool calls and their results tool
steps with the ids the model gave.

Install with ``pip install 'parall-bridge[langgraph]'``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from typing import Any, cast

try:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
    )
    from langchain_core.runnables import RunnableConfig
    from langchain_core.tools import BaseTool, StructuredTool, ToolException
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition
    from langgraph.pregel import Pregel
    from langgraph.types import StreamPart
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the LangGraph adapter needs langgraph and langchain-core: "
        "pip install 'parall-bridge[langgraph]'"
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

__all__ = ["LangGraphRuntime", "parall_tools"]

_log = logging.getLogger("parall_bridge.adapters.langgraph")

_STREAM_MODES: list[Any] = ["messages", "updates", "values"]


# --- the Parall tools ---------------------------------------------------------------------


async def _act(name: str, action: Callable[[ParallTools], Awaitable[str]]) -> str:
    """Run a Parall tool for the turn running in this context; any failure becomes a
    :class:`ToolException`, which the tool (``handle_tool_error=True``) returns to the
    model as a ``ToolMessage`` with ``status="error"``."""
    try:
        return await action(ParallTools.current())
    except ParallToolError as error:
        raise ToolException(str(error)) from error
    except Exception as error:  # any tool failure goes back to the model, not up the turn
        _log.warning("the Parall tool %s failed", name, exc_info=True)
        raise ToolException(tool_failure_text(name, error)) from error


async def _send_message(text: str) -> str:
    """Send a message to the chat of the current turn (your reply) and return its
    message id.

    Args:
        text: the message, in Markdown.
    """
    return await _act("send_message", lambda tools: tools.send_message(text))


async def _update_task(status: str) -> str:
    """Set the status of the current turn's task and return the status it now has.

    Args:
        status: one of todo, in_progress, in_review, done, canceled.
    """
    return await _act("update_task", lambda tools: tools.update_task(status))


async def _get_chat_history(limit: int = 20) -> str:
    """The current turn's chat's recent messages, oldest first, one per line
    ([message id] Sender: text).

    Args:
        limit: how many of the most recent messages (1 to 100).
    """
    return await _act("get_chat_history", lambda tools: tools.get_chat_history(limit))


async def _upload_file(filename: str, content: str, content_type: str = "text/plain") -> str:
    """Upload a text file, post it to the current turn's chat as a file message, and
    return that message's id.

    Args:
        filename: the file's name, e.g. report.md.
        content: the file's content, as text.
        content_type: its MIME type.
    """
    return await _act(
        "upload_file", lambda tools: tools.upload_file(filename, content, content_type)
    )


_TOOL_FUNCTIONS: dict[str, Callable[..., Awaitable[str]]] = {
    "send_message": _send_message,
    "update_task": _update_task,
    "get_chat_history": _get_chat_history,
    "upload_file": _upload_file,
}
assert tuple(_TOOL_FUNCTIONS) == TOOL_NAMES


def parall_tools() -> list[BaseTool]:
    """The Parall tools as LangChain tools: ``send_message(text)``,
    ``update_task(status)``, ``get_chat_history(limit=20)`` and
    ``upload_file(filename, content, content_type="text/plain")``.

    Give them to your model (``model.bind_tools``) and your tool node. Each acts for the
    turn running in the current context (the runtime binds it around the graph's run), so
    the same tools serve every turn and session. They are async only. A failure (a
    :class:`~parall_bridge.adapters.base.ParallToolError` or any exception) comes back to
    the model as a ``ToolMessage`` with ``status="error"`` whatever the tool node's
    ``handle_tool_errors``; called outside a turn, they say so the same way.
    """
    return [
        StructuredTool.from_function(
            coroutine=function,
            name=name,
            parse_docstring=True,
            error_on_invalid_docstring=True,
            handle_tool_error=True,
        )
        for name, function in _TOOL_FUNCTIONS.items()
    ]


def _tool_error(error: Exception) -> str:
    """The tool node's text for a failed tool of ``from_model``'s graph."""
    return f"{type(error).__name__}: {error}"


def _agent_graph(
    model: BaseChatModel,
    tools: Sequence[BaseTool | Callable[..., Any]],
    system_prompt: str | None,
) -> Pregel[Any, Any, Any, Any]:
    """The standard tool-calling loop: the model, then its tool calls, until it answers."""
    every = [*parall_tools(), *tools]
    node = ToolNode(every, handle_tool_errors=_tool_error)
    if len(node.tools_by_name) != len(every):
        raise ValueError(f"tool names must be unique (Parall's are {', '.join(TOOL_NAMES)})")
    bound = model.bind_tools(list(node.tools_by_name.values()))
    prompt = REPLY_INSTRUCTIONS if system_prompt is None else system_prompt
    prefix = [SystemMessage(prompt, id="parall-system-prompt")] if prompt else []

    async def call_model(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        response = await bound.ainvoke([*prefix, *state["messages"]], config)
        return {"messages": [response]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", call_model)
    builder.add_node("tools", node)
    builder.add_edge(START, "model")
    builder.add_conditional_edges("model", tools_condition, ["tools", END])
    builder.add_edge("tools", "model")
    return builder.compile(name="parall_agent")


# --- the stream -------------------------------------------------------------------------


def _reasoning(message: BaseMessage) -> str:
    """The reasoning text of a message or chunk: its ``reasoning`` content blocks
    (LangChain's standard blocks, which providers' thinking blocks translate to; an
    Anthropic ``thinking`` block as it is) or ``additional_kwargs["reasoning_content"]``."""
    parts: list[str] = []
    for block in message.content_blocks:
        if block["type"] == "reasoning":
            text = block.get("reasoning")
        elif block["type"] == "non_standard" and block["value"].get("type") == "thinking":
            text = block["value"].get("thinking")  # Anthropic's, from a message left untagged
        else:
            continue
        if isinstance(text, str):
            parts.append(text)
    return "".join(parts)


def _content_text(message: BaseMessage) -> str:
    return str(message.text)


class _Recorder:
    """Maps one run's stream onto the turn's recorder.

    Model tokens (``messages`` mode) start responses and carry the reasoning deltas; the
    nodes' finished messages (``updates`` mode) carry the text, the tool calls with their
    complete arguments, and the tool results.
    """

    def __init__(self, turn: Turn, given: Iterable[str | None]) -> None:
        self._turn = turn
        # The run's input (the history, the prompt) is not the run's: a subgraph node's
        # update holds its whole state, the history included.
        self._given = {message_id for message_id in given if message_id is not None}
        self._started: set[str] = set()  # responses whose tokens were seen
        self._done: set[str] = set()  # messages recorded whole
        self._reasoning = False

    def _start(self, message_id: str | None) -> bool:
        """Start a new response for ``message_id`` unless it started; True if it did."""
        if message_id is not None and message_id in self._started:
            return False
        if message_id is not None:
            self._started.add(message_id)
        self._end_reasoning()
        self._turn.new_response()
        return True

    def _end_reasoning(self) -> None:
        if self._reasoning:
            self._reasoning = False
            self._turn.reasoning_done()

    def token(self, message: BaseMessage) -> None:
        """A chunk of a model response (or the whole response, from a model that does
        not stream)."""
        if not isinstance(message, AIMessage) or message.id in self._given:
            return  # tool messages are recorded from the tool node's update
        self._start(message.id)
        reasoning = _reasoning(message)
        if reasoning:
            self._reasoning = True
            self._turn.reasoning(reasoning)
        elif message.content or message.tool_calls or getattr(message, "tool_call_chunks", None):
            self._end_reasoning()  # the answer began: the thinking block is over

    def update(self, data: object) -> None:
        """The ``updates`` of one step: each node's returned state update."""
        if not isinstance(data, dict):
            return
        for node, update in data.items():
            if isinstance(node, str) and node.startswith("__"):
                continue  # __interrupt__, __metadata__
            for message in _update_messages(update):
                self.message(message)

    def message(self, message: BaseMessage) -> None:
        """A finished message a node added."""
        if message.id is not None:
            if message.id in self._done or message.id in self._given:
                return
            self._done.add(message.id)
        turn = self._turn
        if isinstance(message, AIMessage):
            if self._start(message.id):  # not streamed: its reasoning is in the message
                reasoning = _reasoning(message)
                if reasoning:
                    turn.reasoning(reasoning)
            self._reasoning = False
            turn.reasoning_done()
            text = _content_text(message)
            if text.strip():
                turn.text(text)
            for call in message.tool_calls:
                turn.tool_call(call.get("id") or "", call["name"], call.get("args"))
            for bad in message.invalid_tool_calls:
                _log.warning("the model made an invalid tool call: %s", bad.get("error"))
        elif isinstance(message, ToolMessage):
            self._end_reasoning()
            if message.status == "error":
                turn.tool_result(message.tool_call_id, error=_content_text(message) or "error")
            else:
                turn.tool_result(message.tool_call_id, output=message.content)


def _update_messages(update: object) -> list[BaseMessage]:
    """The messages in a node's state update (a dict, a list of them, or a model)."""
    if isinstance(update, list | tuple):
        return [m for item in update for m in _update_messages(item)]
    if isinstance(update, dict):
        value = update.get("messages")
    else:
        value = getattr(update, "messages", None)
    if isinstance(value, BaseMessage):
        return [value]
    if isinstance(value, list | tuple):
        return [m for m in value if isinstance(m, BaseMessage)]
    return []


def _state_messages(state: object) -> list[BaseMessage]:
    value = state.get("messages") if isinstance(state, dict) else getattr(state, "messages", None)
    if not isinstance(value, list | tuple):
        raise TypeError("the graph's state has no messages list")
    return [m for m in value if isinstance(m, BaseMessage)]


def _new_id() -> str:
    return f"parall-{uuid.uuid4().hex}"


# --- the runtime ---------------------------------------------------------------------------


class LangGraphRuntime(HistoryRuntime[BaseMessage]):
    """An :class:`~parall_bridge.AgentRuntime` running a compiled LangGraph graph.

    The graph's state has a ``messages`` key, its tools include :func:`parall_tools`,
    and it is compiled without a checkpointer: the runtime keeps each session's messages
    and passes them in, so a failed or cancelled turn leaves the history as it was.

    The runtime adds no instructions to a graph of yours: its prompt must tell the model to
    reply with ``send_message`` (the final text is not posted), e.g. with
    :data:`~parall_bridge.adapters.base.REPLY_INSTRUCTIONS`. :meth:`from_model` does it.

    Args:
        graph: the compiled graph (``builder.compile()``, ``create_react_agent(...)``,
            ``create_agent(...)``); it is never modified.
        config: a ``RunnableConfig`` for every run (``recursion_limit``, ``callbacks``,
            ``tags``, ``metadata``, ``configurable``...).
        seed_history: how many of the chat's recent messages seed a session that has no
            history yet (0: none).
        history_turns: how many turns a session's history keeps (``None``: all).

    Raises:
        ValueError: the graph has a checkpointer, or no ``messages`` channel.
    """

    def __init__(
        self,
        graph: Pregel[Any, Any, Any, Any],
        *,
        config: RunnableConfig | None = None,
        seed_history: int = DEFAULT_SEED_HISTORY,
        history_turns: int | None = 100,
    ) -> None:
        super().__init__(seed_history=seed_history, history_turns=history_turns)
        if not isinstance(graph, Pregel):
            raise TypeError(f"LangGraphRuntime takes a compiled graph, not {type(graph)!r}")
        if graph.checkpointer not in (None, False):
            raise ValueError(
                "this graph was compiled with a checkpointer: LangGraphRuntime keeps each "
                "session's messages itself (saved only when a turn succeeds, so a cancelled "
                "turn never leaves a dangling tool call in a checkpoint); compile it "
                "without one"
            )
        if "messages" not in graph.channels:
            raise ValueError("the graph's state needs a 'messages' key (e.g. MessagesState)")
        self._graph = graph
        self._config: RunnableConfig = dict(config or {})  # type: ignore[assignment]

    @classmethod
    def from_model(
        cls,
        model: BaseChatModel,
        tools: Sequence[BaseTool | Callable[..., Any]] = (),
        *,
        system_prompt: str | None = None,
        config: RunnableConfig | None = None,
        seed_history: int = DEFAULT_SEED_HISTORY,
        history_turns: int | None = 100,
    ) -> LangGraphRuntime:
        """A runtime for the standard tool-calling agent: ``model`` with the Parall tools
        and ``tools`` bound, a tool node that returns any tool's exception to the model as
        an error ``ToolMessage``, and the loop between them until the model answers.

        Args:
            model: a chat model that supports ``bind_tools``.
            tools: your own tools (LangChain tools or functions).
            system_prompt: the system message put before the history on every call. By
                default (``None``),
                :data:`~parall_bridge.adapters.base.REPLY_INSTRUCTIONS`, which tells the
                model it replies with ``send_message`` (as the other adapters do); a prompt
                of yours replaces it, as it is (say in it to reply with ``send_message``:
                the model's final text is not posted); ``""`` puts no system message.
            config: see :class:`LangGraphRuntime`.
            seed_history: see :class:`LangGraphRuntime`.
            history_turns: see :class:`LangGraphRuntime`.
        """
        return cls(
            _agent_graph(model, tools, system_prompt),
            config=config,
            seed_history=seed_history,
            history_turns=history_turns,
        )

    @property
    def graph(self) -> Pregel[Any, Any, Any, Any]:
        """The graph each turn runs."""
        return self._graph

    def seed_messages(self, turn: Turn, entries: Sequence[ChatEntry]) -> Sequence[BaseMessage]:
        """The chat's recent messages as one ``HumanMessage``:
        :func:`~parall_bridge.adapters.base.seed_transcript` (the agent's own marked
        ``(you)``, sent with ``send_message``)."""
        return [HumanMessage(seed_transcript(entries), id=f"parall-seed-{entries[0].message_id}")]

    def _run_config(self, turn: Turn) -> RunnableConfig:
        config: RunnableConfig = dict(self._config)  # type: ignore[assignment]
        config["metadata"] = {
            **self._config.get("metadata", {}),
            "parall_turn_id": turn.turn_id,
            "parall_session_key": turn.session_key,
        }
        return config

    async def run_with_history(
        self, turn: Turn, history: Sequence[BaseMessage], tools: ParallTools
    ) -> TurnOutput[BaseMessage]:
        """Stream the graph on the history and the turn's prompt; record the stream; return
        the messages the run added (the prompt first) and its last AI text."""
        # Deep copies, each with an id: the graph's add_messages reducer gives an id to a
        # message that has none by setting it on the object, and a node may change what it
        # is given in place; the committed history must stay as it was whatever the run does.
        given = [m.model_copy(update={"id": m.id or _new_id()}, deep=True) for m in history]
        prompt = HumanMessage(turn.prompt(), id=_new_id())
        known = {m.id for m in given}
        recorder = _Recorder(turn, [*known, prompt.id])
        final: list[BaseMessage] | None = None
        stream = cast(  # astream is an async generator: aclosing can close it
            "AsyncGenerator[StreamPart[Any, Any], None]",
            self._graph.astream(
                {"messages": [*given, prompt]},
                self._run_config(turn),
                stream_mode=_STREAM_MODES,
                version="v2",
            ),
        )
        # A cancellation reaches the run inside astream, which cancels its nodes' tasks;
        # aclosing closes it at once too when the loop below stops for any other reason.
        async with contextlib.aclosing(stream):
            async for part in stream:
                if part["ns"]:
                    continue  # a subgraph's own stream (not asked for)
                if part["type"] == "messages":
                    recorder.token(part["data"][0])
                elif part["type"] == "updates":
                    recorder.update(part["data"])
                elif part["type"] == "values":
                    final = _state_messages(part["data"])
        if final is None:
            raise RuntimeError("the graph's run gave no state")
        new = [m for m in final if m.id not in known]
        return TurnOutput(new, _last_text(new))


def _last_text(messages: Iterable[BaseMessage]) -> str | None:
    texts = [_content_text(m) for m in messages if isinstance(m, AIMessage)]
    texts = [text for text in texts if text.strip()]
    return texts[-1] if texts else None
