"""The host contract: :class:`AgentRuntime` (how to run one agent turn) and
:class:`Turn` (everything the gateway hands to that turn).

A host framework subclasses :class:`AgentRuntime` and implements
:meth:`~AgentRuntime.run_turn`; every other hook has a working default.
Streaming SDKs can subclass :class:`EventStreamRuntime` instead and yield
typed events.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import attrs

from . import protocol as p
from .events import EventKind, ParallEvent, build_history_body, join_prompt, turn_id_of
from .models import AgentConfig, AgentStep, Message, StepType, TargetType

if TYPE_CHECKING:
    from .client import ParallClient

__all__ = [
    "AgentRuntime",
    "EventStreamRuntime",
    "ForkOutcome",
    "GatewayInfo",
    "HistoryEntry",
    "ReasoningDelta",
    "ReasoningEnd",
    "ResponseStart",
    "SessionRef",
    "StreamEvent",
    "Text",
    "ToolCall",
    "ToolResult",
    "Turn",
    "TurnHooks",
]

_log = logging.getLogger("parall_bridge.runtime")


@attrs.frozen
class SessionRef:
    """A session of the host's agent: its key, and a handle that belongs to the host.

    The gateway names the main session ``agent:main:parall:<account_id>``; a
    fork's key and handle are whatever :meth:`AgentRuntime.fork_session` returns.
    """

    key: str
    handle: Any = attrs.field(default=None, eq=False)


@attrs.frozen
class ForkOutcome:
    """How a fork went, given to :meth:`AgentRuntime.release_session`.

    Attributes:
        handled: events the fork handled successfully.
        failed: events whose turn failed on the fork.
        summary: the fork's last reply, if any (shown in main's ``[Fork result]``).
    """

    handled: int
    failed: int
    summary: str | None = None


@attrs.frozen
class GatewayInfo:
    """Who the gateway runs as, given to :meth:`AgentRuntime.on_start`.

    Attributes:
        agent_id: the agent's user id.
        org_id: the organisation.
        account_id: the gateway's account id (part of the main session key).
        session_id: the platform AgentSession id.
    """

    agent_id: str
    org_id: str
    account_id: str
    session_id: str | None


@attrs.frozen
class HistoryEntry:
    """An earlier event coalesced into a turn (the seed's ``InboundHistory``).

    ``body`` holds the event's metadata line (message id, hints, thread,
    attachments) then its text.
    """

    sender: str
    body: str
    message_id: str
    timestamp: datetime | None = None


# --- typed stream events (for EventStreamRuntime) -------------------------------------


@attrs.frozen
class ResponseStart:
    """A new LLM response begins (a new group key)."""


@attrs.frozen
class ReasoningDelta:
    """A piece of reasoning text (deltas are concatenated into one thinking step)."""

    text: str


@attrs.frozen
class ReasoningEnd:
    """The current reasoning block ended."""


@attrs.frozen
class Text:
    """Plain text produced by the agent (recorded as a suppressed text step)."""

    text: str


@attrs.frozen
class ToolCall:
    """The agent called a tool; ``args`` is a mapping or a JSON string (see
    :meth:`Turn.tool_call`)."""

    call_id: str
    name: str
    args: Mapping[str, Any] | str = attrs.field(factory=dict)


@attrs.frozen
class ToolResult:
    """A tool call returned (``output``) or failed (``error``)."""

    call_id: str
    output: Any = None
    error: str | None = None


StreamEvent: TypeAlias = (
    ResponseStart | ReasoningDelta | ReasoningEnd | Text | ToolCall | ToolResult
)
"""Anything :meth:`EventStreamRuntime.events` may yield."""


# --- the turn ----------------------------------------------------------------------------


class TurnHooks(Protocol):
    """What a :class:`Turn` needs from whoever runs it: the gateway's turn lifecycle
    implements it; a host never does (a :class:`Turn` built with ``record=`` only gets a
    default that never ends)."""

    @property
    def ended(self) -> bool:
        """Whether the turn is over (recorder calls are then ignored, sends refused)."""

    def record(self, step: AgentStep) -> None:
        """Take a recorded step (synchronously; written off the critical path)."""

    async def before_send(self) -> None:
        """Called before each :meth:`Turn.send_message` (the gateway makes the turn's
        journal entry durable here, so a crash after the send runs it again with the
        same keys)."""


class _Unmanaged:
    """The hooks of a turn built without a gateway (a host's own tests)."""

    def __init__(self, record: Callable[[AgentStep], None]) -> None:
        self.record = record

    @property
    def ended(self) -> bool:
        return False

    async def before_send(self) -> None:
        return None


class Turn:
    """One agent turn: the events it handles, the text to read, and tools to act.

    Built by the gateway; hosts read it and call its methods. The recorder
    methods (:meth:`new_response`, :meth:`reasoning`, :meth:`text`,
    :meth:`tool_call`, :meth:`tool_result`) are synchronous, keep their
    order, never raise, and do nothing once the turn has ended: the gateway
    writes the steps to the platform off the critical path.

    Args:
        session: the session it runs on.
        events: the events it handles (the last one is the prompt).
        prefix: the fork-result prefix of its body.
        org_id: the organisation.
        agent_id: the agent's user id.
        client: the REST client.
        record: where recorded steps go, for a turn built without a gateway.
        turn_id: its id (by default derived from its events' keys, see
            :attr:`turn_id`).
        hooks: the gateway's lifecycle of the turn (instead of ``record``).
    """

    def __init__(
        self,
        *,
        session: SessionRef,
        events: Sequence[ParallEvent],
        prefix: str,
        org_id: str,
        agent_id: str,
        client: ParallClient,
        record: Callable[[AgentStep], None] | None = None,
        turn_id: str | None = None,
        hooks: TurnHooks | None = None,
    ) -> None:
        if not events:
            raise ValueError("a turn handles at least one event")
        if hooks is None:
            if record is None:
                raise TypeError("Turn needs record= (or the gateway's hooks=)")
            hooks = _Unmanaged(record)
        self._session = session
        self._events = tuple(events)
        self._prefix = prefix
        self._org_id = org_id
        self._agent_id = agent_id
        self._client = client
        self._hooks = hooks
        self._turn_id = turn_id or turn_id_of([event.key for event in self._events])
        self._group_key = uuid.uuid4().hex
        self._reasoning: list[str] = []
        self._sends = 0
        last = self._events[-1]
        self._history = tuple(
            HistoryEntry(
                sender=event.sender_name,
                body=build_history_body(event),
                message_id=event.message_id,
                timestamp=event.created_at,
            )
            for event in self._events[:-1]
        )
        self._body = prefix + last.body

    def __repr__(self) -> str:
        return (
            f"Turn(turn_id={self._turn_id!r}, session_key={self.session_key!r}, "
            f"events={len(self._events)})"
        )

    # --- what the turn is about ------------------------------------------------------

    @property
    def turn_id(self) -> str:
        """The turn's id: derived from the keys of its events in order (a message's id, a
        task's id and ``updated_at``), so the same events give the same id in any
        process; random for a turn without a platform event (a fork-result wake-up).

        A turn interrupted by a crash runs again with the same events, so the same id:
        use it to make the host's own side effects idempotent. Its replies' keys derive
        from it (:meth:`send_message`).
        """
        return self._turn_id

    @property
    def session_key(self) -> str:
        """The key of the session this turn runs on (main or a fork)."""
        return self._session.key

    @property
    def session(self) -> SessionRef:
        """The session this turn runs on."""
        return self._session

    @property
    def body(self) -> str:
        """The last event's body, after the fork-result prefix if any."""
        return self._body

    @property
    def history(self) -> tuple[HistoryEntry, ...]:
        """The earlier events coalesced into this turn, in arrival order."""
        return self._history

    @property
    def events(self) -> tuple[ParallEvent, ...]:
        """Every event this turn handles; the last one is the prompt."""
        return self._events

    @property
    def event(self) -> ParallEvent:
        """The last event (the prompt)."""
        return self._events[-1]

    @property
    def org_id(self) -> str:
        """The organisation."""
        return self._org_id

    @property
    def agent_id(self) -> str:
        """The agent's user id."""
        return self._agent_id

    @property
    def chat_id(self) -> str | None:
        """The chat of the last event (``None`` for a task)."""
        return self._events[-1].chat_id

    @property
    def message_id(self) -> str:
        """The message id of the last event (the task id for a task, as the seed does)."""
        return self._events[-1].message_id

    @property
    def task_id(self) -> str | None:
        """The task of the last event (``None`` for a message)."""
        return self._events[-1].task_id

    @property
    def group_key(self) -> str:
        """The group key of the current response (changes with :meth:`new_response`)."""
        return self._group_key

    @property
    def client(self) -> ParallClient:
        """The REST client, for the agent's own tools."""
        return self._client

    @property
    def ended(self) -> bool:
        """Whether the turn is over (recorder calls are then ignored)."""
        return self._hooks.ended

    def prompt(self) -> str:
        """The fork-result prefix if any, then each event's body in arrival order,
        joined by ``---`` lines."""
        return join_prompt(self._prefix, [event.body for event in self._events])

    # --- acting -------------------------------------------------------------------

    async def send_message(
        self,
        text: str,
        *,
        chat_id: str | None = None,
        mentions: Iterable[str] = (),
        attachment_ids: Iterable[str] = (),
        thread_root_id: str | None = None,
        no_reply: bool = False,
    ) -> Message:
        """Send a message to the turn's chat (or ``chat_id``).

        The idempotency key is ``pb:<agent_id>:<turn_id>:<n>`` for the n-th send
        of the turn: when a turn runs again with the same events (the platform
        redelivered them after a crash), its replies are not posted twice; the
        agent's id keeps two agents answering one message apart (the platform
        scopes keys to the org).

        Raises:
            RuntimeError: the turn has ended (returned, failed, or was cancelled).
            ValueError: the turn has no chat (a task) and ``chat_id`` is not given.
        """
        if self._hooks.ended:
            # Its keys belong to the events' next attempt now (a turn cancelled at
            # shutdown that went on anyway must not use up its retry's reply).
            raise RuntimeError("this turn has ended: send with turn.client.send_message")
        target = chat_id or self.chat_id
        if not target:
            raise ValueError("this turn has no chat (a task): pass chat_id")
        self._sends += 1
        key = f"{p.IDEMPOTENCY_PREFIX}{self._agent_id}:{self._turn_id}:{self._sends}"
        await self._hooks.before_send()
        if self._hooks.ended:
            raise RuntimeError("this turn has ended: send with turn.client.send_message")
        return await self._client.send_message(
            self._org_id,
            target,
            text,
            mentions=mentions,
            attachment_ids=attachment_ids,
            thread_root_id=thread_root_id,
            no_reply=no_reply,
            idempotency_key=key,
        )

    # --- the recorder -------------------------------------------------------------

    def new_response(self) -> None:
        """A new LLM response starts: a new group key for the steps that follow."""
        if self._hooks.ended:
            return
        self._flush_reasoning()
        self._group_key = uuid.uuid4().hex

    def reasoning(self, text: str, done: bool = False) -> None:
        """A reasoning delta; ``done=True`` ends the block (one thinking step per block)."""
        if self._hooks.ended:
            return
        if text:
            self._reasoning.append(text if isinstance(text, str) else str(text))
        if done:
            self._flush_reasoning()

    def reasoning_done(self) -> None:
        """The current reasoning block ended."""
        if not self._hooks.ended:
            self._flush_reasoning()

    def text(self, text: str) -> None:
        """Plain text from the agent: recorded as a suppressed text step, never posted."""
        text = text if isinstance(text, str) else str(text)
        if self._hooks.ended or not text.strip():
            return
        self._flush_reasoning()
        self._emit(StepType.TEXT, {"text": text.strip(), "suppressed": True})

    def tool_call(
        self, call_id: str, name: str, args: Mapping[str, Any] | str | None = None
    ) -> None:
        """The agent called a tool. ``args`` may be a mapping or, as many model SDKs give
        it, a JSON string (decoded when it holds an object, else recorded as it is)."""
        if self._hooks.ended:
            return
        self._flush_reasoning()
        self._emit(StepType.TOOL_CALL, {"call_id": call_id, "name": name, "args": tool_args(args)})

    def tool_result(self, call_id: str, output: Any = None, error: str | None = None) -> None:
        """A tool call returned ``output`` or failed with ``error``."""
        if self._hooks.ended:
            return
        self._flush_reasoning()
        content: dict[str, Any] = {"call_id": call_id}
        if output is not None:
            content["output"] = output
        if error is not None:
            content["error"] = error
        self._emit(StepType.TOOL_RESULT, content)

    # --- internals ------------------------------------------------------------------

    def _flush_reasoning(self) -> None:
        if self._reasoning:
            text = "".join(self._reasoning)
            self._reasoning.clear()
            self._emit(StepType.THINKING, {"text": text})

    def _emit(self, step_type: StepType, content: Mapping[str, Any]) -> None:
        event = self._events[-1]
        target_type, target_id = step_target(event)
        try:
            step = AgentStep(
                step_type=step_type,
                target_type=target_type,
                target_id=target_id,
                content=json_safe(content),
                group_key=self._group_key,
            )
            self._hooks.record(step)
        except Exception:  # the recorder never raises into the host
            _log.exception("could not record a %s step", step_type.value)


def tool_args(args: object) -> object:
    """A tool call's arguments as recorded: a mapping as a dict, a JSON string holding
    an object decoded, anything else as it is (made JSON-safe with the step)."""
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, bytes):
        args = args.decode(errors="replace")
    if isinstance(args, str):
        try:
            decoded = json.loads(args)
        except ValueError:
            return args
        return decoded if isinstance(decoded, dict) else args
    return args


def _plain(value: object) -> object:
    """``value`` as data JSON can hold: what it cannot (datetimes, sets, NaN, objects of
    the host's own) becomes text."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def json_safe(content: Mapping[str, Any]) -> dict[str, Any]:
    """``content`` as plain JSON data: what JSON cannot hold (datetimes, sets, NaN,
    objects of the host's own) becomes text, so a step can always be sent."""
    return {str(key): _plain(value) for key, value in content.items()}


def step_target(event: ParallEvent) -> tuple[TargetType, str | None]:
    """The step target of an event: its chat, its task, or nothing (synthetic)."""
    if event.chat_id and event.chat_id.startswith(p.CHAT_ID_PREFIX):
        return TargetType.CHAT, event.chat_id
    if event.kind is EventKind.TASK:
        return TargetType.TASK, event.task_id
    return TargetType.NONE, None


# --- the runtime contract ---------------------------------------------------------------------


class AgentRuntime(abc.ABC):
    """How the host framework runs agent turns.

    Implement :meth:`run_turn`; the other hooks have working defaults. Main
    and forks run concurrently (at most one turn per session key at a time),
    so a runtime must be safe across keys.
    """

    @abc.abstractmethod
    async def run_turn(self, turn: Turn) -> str | None:
        """Run one agent turn and return its final text (recorded as a suppressed
        text step unless :meth:`Turn.text` recorded text already), or ``None``.

        Raising fails the turn: nothing is acked, an error step is recorded,
        and the events are retried later. Let ``CancelledError`` propagate.
        """

    async def fork_session(self, parent: SessionRef) -> SessionRef | None:
        """Copy ``parent``'s last *completed* turn into a new session, without blocking
        it; ``None`` (the default) means forks are unsupported: events wait for main."""
        return None

    async def release_session(self, child: SessionRef, outcome: ForkOutcome) -> None:
        """A fork is done (called exactly once per successful fork)."""
        return None

    async def apply_platform_config(self, config: AgentConfig) -> None:
        """The platform config (models, defaults...), at start and on every update."""
        return None

    async def on_start(self, info: GatewayInfo) -> None:
        """The gateway authenticated and created its agent session."""
        return None

    async def on_dead_letter(self, events: Sequence[ParallEvent], error: BaseException) -> None:
        """``events`` failed ``max_dispatch_attempts`` times and were given up on."""
        return None

    async def on_stop(self) -> None:
        """The gateway stopped; release what :meth:`on_start` acquired."""
        return None


class EventStreamRuntime(AgentRuntime):
    """A runtime whose turn is a stream of typed events.

    Implement :meth:`events` as an async generator yielding
    :class:`ResponseStart`, :class:`ReasoningDelta`, :class:`ReasoningEnd`,
    :class:`Text`, :class:`ToolCall` and :class:`ToolResult`; the gateway
    records them. The turn's result is the last :class:`Text`.
    """

    @abc.abstractmethod
    def events(self, turn: Turn) -> AsyncIterator[StreamEvent]:
        """The events of one turn."""

    async def run_turn(self, turn: Turn) -> str | None:
        """Drain :meth:`events` into the turn's recorder; return the last text."""
        last_text: str | None = None
        async for event in self.events(turn):
            match event:
                case ResponseStart():
                    turn.new_response()
                case ReasoningDelta(text=text):
                    turn.reasoning(text)
                case ReasoningEnd():
                    turn.reasoning_done()
                case Text(text=text):
                    turn.text(text)
                    last_text = text
                case ToolCall(call_id=call_id, name=name, args=args):
                    turn.tool_call(call_id, name, args)
                case ToolResult(call_id=call_id, output=output, error=error):
                    turn.tool_result(call_id, output, error)
                case _:
                    _log.warning("ignoring an unknown stream event %r", type(event).__name__)
        return last_text
