"""What every framework adapter shares: :class:`HistoryRuntime` and :class:`ParallTools`.

An adapter subclasses :class:`HistoryRuntime` with two methods: how to turn the chat's
recent messages into the framework's messages (:meth:`HistoryRuntime.seed_messages`),
and how to run the framework's agent for one turn on a history, recording its stream on
the turn and returning the turn's new messages (:meth:`HistoryRuntime.run_with_history`).
The base keeps one history per session key, saves a turn's new messages only when the
turn succeeded (a failed or cancelled turn leaves the history as it was), copies the
history on :meth:`~parall_bridge.AgentRuntime.fork_session` and drops a fork's on
:meth:`~parall_bridge.AgentRuntime.release_session`, and seeds a session that has no
history (a fresh process) from the chat's recent messages.

:class:`ParallTools` is the platform side of the four Parall tools every adapter offers
the model in the framework's own format: ``send_message(text)``,
``update_task(status)``, ``get_chat_history(limit=20)`` and
``upload_file(filename, content, content_type="text/plain")``. Each acts through the
turn (replies keep the turn's idempotency keys) and raises :class:`ParallToolError`,
whose message the adapter hands back to the model as the tool's error.

This module imports no framework.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import logging
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Final, Generic, TypeVar

import attrs

from ..errors import ParallError
from ..models import MediaContent, Message, TaskStatus, TextContent
from ..runtime import AgentRuntime, ForkOutcome, SessionRef, Turn

__all__ = [
    "DEFAULT_SEED_HISTORY",
    "REPLY_INSTRUCTIONS",
    "SEED_HEADING",
    "TOOL_NAMES",
    "ChatEntry",
    "HistoryRuntime",
    "ParallToolError",
    "ParallTools",
    "TurnOutput",
    "seed_transcript",
    "tool_failure_text",
]

_log = logging.getLogger("parall_bridge.adapters")

M = TypeVar("M")

DEFAULT_SEED_HISTORY: Final = 20
"""How many of the chat's recent messages seed a session that has no history."""

TOOL_NAMES: Final = ("send_message", "update_task", "get_chat_history", "upload_file")
"""The Parall tools' names, the same in every framework."""

REPLY_INSTRUCTIONS: Final = (
    "You are an agent on Parall, a chat and task platform. Nobody sees your final answer: "
    "to reply in the conversation, call send_message (once per message you want to post). "
    "On a task, set its status with update_task. get_chat_history shows the chat's recent "
    "messages; upload_file posts a text file to the chat."
)
"""What every adapter tells the model by default: it replies only through ``send_message``
(its final text is not posted). Pydantic AI adds it as the Parall toolset's instructions,
OpenAI Agents appends it to the agent's instructions, ``LangGraphRuntime.from_model`` makes
it the system message; each adapter's ``instructions``/``system_prompt`` option replaces or
drops it."""

SEED_HEADING: Final = (
    'Earlier messages of this chat, oldest first (those marked "(you)" are yours, '
    "sent with send_message):"
)
"""The first line of :func:`seed_transcript`."""

_MAX_HISTORY_LIMIT: Final = 100

_current: contextvars.ContextVar[ParallTools] = contextvars.ContextVar("parall_bridge_tools")


class ParallToolError(Exception):
    """A Parall tool could not do what the model asked; the message says why, for the
    model (the adapter returns it as the tool's error, the turn goes on)."""


def tool_failure_text(name: str, error: BaseException) -> str:
    """What the model reads when the Parall tool ``name`` failed unexpectedly (with an
    exception other than :class:`ParallToolError`, whose message is given as it is):
    ``<name> failed: <Type>: <message>`` (``<name> failed: <Type>`` without a message), the
    same in every adapter."""
    message = str(error)
    if not message:
        return f"{name} failed: {type(error).__name__}"
    return f"{name} failed: {type(error).__name__}: {message}"


@attrs.frozen
class ChatEntry:
    """One of the chat's recent messages, given to :meth:`HistoryRuntime.seed_messages`.

    Attributes:
        message_id: the message's id.
        sender_id: who sent it.
        sender_name: their display name (their id when the platform gave none).
        text: its text (a file message: ``[file: <name>]`` and its caption).
        from_agent: whether this agent sent it (marked ``(you)`` in the seed).
        created_at: when it was sent.
    """

    message_id: str
    sender_id: str
    sender_name: str
    text: str
    from_agent: bool
    created_at: datetime | None = None

    @classmethod
    def from_message(cls, message: Message, agent_id: str) -> ChatEntry:
        """The entry of a platform message, as seen by the agent ``agent_id``."""
        content = message.content
        if isinstance(content, TextContent):
            text = content.text
        elif isinstance(content, MediaContent):
            text = f"[file: {content.file_name}]"
            if content.caption:
                text += f" {content.caption}"
        else:
            text = f"[{message.message_type} message]"
        for attachment in message.attachments:
            text += f"\n[attachment: {attachment.file_name}]"
        return cls(
            message_id=message.id,
            sender_id=message.sender_id,
            sender_name=message.sender_name,
            text=text,
            from_agent=message.sender_id == agent_id,
            created_at=message.created_at,
        )

    def line(self) -> str:
        """The entry on one line for a model: ``Sender: text``."""
        return f"{self.sender_name}: {self.text}"


def seed_transcript(entries: Sequence[ChatEntry]) -> str:
    """The chat's recent messages as the text of the one user message that seeds a session
    (:meth:`HistoryRuntime.seed_messages`, the same in every adapter): :data:`SEED_HEADING`,
    then one ``Sender: text`` per entry, the agent's own as ``Sender (you): text``.

    The agent's own messages are not given as plain assistant text: in a live turn they
    are ``send_message`` calls, and a model shown its past replies as plain text may go on
    answering in plain text, which nobody sees.
    """
    lines = [SEED_HEADING]
    for entry in entries:
        if entry.from_agent:
            lines.append(f"{entry.sender_name} (you): {entry.text}")
        else:
            lines.append(entry.line())
    return "\n".join(lines)


@attrs.frozen
class TurnOutput(Generic[M]):
    """What :meth:`HistoryRuntime.run_with_history` returns.

    Attributes:
        new_messages: the turn's messages to append to the session's history (the
            user input first), in the framework's own type.
        output: the turn's final text (recorded as a suppressed text step), if any.
    """

    new_messages: Sequence[M]
    output: str | None = None


class ParallTools:
    """The Parall tools of one turn, framework-free.

    Adapters wrap these four methods in their framework's tool format, with the same
    names and arguments everywhere (the OpenAI Agents adapter gives the model the methods'
    docstrings as the tools' descriptions: plain text, no markup). Within a turn run by
    :class:`HistoryRuntime`, :meth:`current` returns the turn's tools (for tools built
    once, outside any turn, like LangGraph's).

    Args:
        turn: the turn the tools act for.
    """

    def __init__(self, turn: Turn) -> None:
        self._turn = turn
        # Frameworks run a response's tool calls concurrently (the OpenAI Agents SDK,
        # LangGraph's ToolNode): the posts of one turn go one at a time, in call order
        # (the lock is fair), so two replies of one response land in that order.
        self._posting = asyncio.Lock()

    @property
    def turn(self) -> Turn:
        """The turn the tools act for."""
        return self._turn

    @staticmethod
    def current() -> ParallTools:
        """The tools of the turn running in this context.

        Raises:
            ParallToolError: no turn of a :class:`HistoryRuntime` runs in this context
                (a tool called outside the gateway).
        """
        try:
            return _current.get()
        except LookupError:
            raise ParallToolError(
                "no Parall turn is running here: the Parall tools work inside a turn"
            ) from None

    @contextlib.contextmanager
    def bound(self) -> Iterator[ParallTools]:
        """Make these the :meth:`current` tools for the block (and the tasks it starts)."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    async def send_message(self, text: str) -> str:
        """Send a message to the chat of the current turn (your reply: nothing else you
        write is posted) and return its message id.

        Args:
            text: the message, in Markdown.
        """
        if not isinstance(text, str) or not text.strip():
            raise ParallToolError("send_message needs a non-empty text")
        if not self._turn.chat_id:
            raise ParallToolError("this turn is about a task, not a chat: there is no chat")
        try:
            async with self._posting:
                message = await self._turn.send_message(text)
        except ParallError as error:
            raise ParallToolError(f"the platform refused the message: {error}") from error
        except RuntimeError as error:  # the turn has ended
            raise ParallToolError(str(error)) from error
        return message.id

    async def update_task(self, status: str) -> str:
        """Set the status of the current turn's task and return the status it now has.

        Args:
            status: one of todo, in_progress, in_review, done, canceled.
        """
        task_id = self._turn.task_id
        if not task_id:
            raise ParallToolError("this turn is about a chat message, not a task")
        try:
            wanted = TaskStatus(str(status).strip().lower())
        except ValueError:
            allowed = ", ".join(s.value for s in TaskStatus)
            raise ParallToolError(f"unknown status {status!r}: use one of {allowed}") from None
        try:
            task = await self._turn.client.update_task(self._turn.org_id, task_id, status=wanted)
        except ParallError as error:
            raise ParallToolError(f"the platform refused the update: {error}") from error
        return str(task.status)

    async def get_chat_history(self, limit: int = 20) -> str:
        """The current turn's chat's recent messages, oldest first, one per line
        ([message id] Sender: text).

        Args:
            limit: how many of the most recent messages (1 to 100).
        """
        chat_id = self._turn.chat_id
        if not chat_id:
            raise ParallToolError("this turn is about a task, not a chat: there is no chat")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ParallToolError("limit must be a whole number from 1 to 100")
        try:
            entries = await self.recent_messages(min(limit, _MAX_HISTORY_LIMIT))
        except ParallError as error:
            raise ParallToolError(f"the platform refused the history: {error}") from error
        if not entries:
            return "(no messages)"
        return "\n".join(f"[{entry.message_id}] {entry.line()}" for entry in entries)

    async def upload_file(
        self, filename: str, content: str, content_type: str = "text/plain"
    ) -> str:
        """Upload a text file, post it to the current turn's chat as a file message, and
        return that message's id.

        Args:
            filename: the file's name, e.g. report.md.
            content: the file's content, as text.
            content_type: its MIME type.
        """
        chat_id = self._turn.chat_id
        if not chat_id:
            raise ParallToolError("this turn is about a task, not a chat: there is no chat")
        if not isinstance(filename, str) or not filename.strip():
            raise ParallToolError("upload_file needs a filename")
        if not isinstance(content, str):
            raise ParallToolError("upload_file takes the content as text")
        turn = self._turn
        try:
            async with self._posting:  # the file's message lands in call order too
                attachment_id = await turn.client.upload_file(
                    turn.org_id,
                    content.encode(),
                    file_name=filename.strip(),
                    mime_type=content_type or "text/plain",
                )
                message = await turn.send_message(filename.strip(), attachment_ids=[attachment_id])
        except ParallError as error:
            raise ParallToolError(f"the platform refused the file: {error}") from error
        except RuntimeError as error:
            raise ParallToolError(str(error)) from error
        return message.id

    async def recent_messages(self, limit: int) -> list[ChatEntry]:
        """Up to ``limit`` of the chat's most recent messages, oldest first (none for a
        task). Raises :class:`~parall_bridge.ParallError` as the client does."""
        chat_id = self._turn.chat_id
        if not chat_id or limit < 1:
            return []
        turn = self._turn
        newest_first: list[Message] = []
        before: str | None = None
        while len(newest_first) < limit:  # the platform caps a page (the emulator at 100)
            page = await turn.client.get_chat_messages(
                turn.org_id, chat_id, limit=limit - len(newest_first), before=before
            )
            newest_first.extend(page.data)
            if not page.data or not page.has_more or not page.next_cursor:
                break
            before = page.next_cursor
        return [ChatEntry.from_message(m, turn.agent_id) for m in reversed(newest_first[:limit])]


class HistoryRuntime(AgentRuntime, Generic[M]):
    """An :class:`~parall_bridge.AgentRuntime` that keeps a conversation history per
    session key in the framework's own message type ``M``.

    Subclasses implement :meth:`seed_messages` and :meth:`run_with_history`.

    Args:
        seed_history: how many of the chat's recent messages seed a session that has
            no history yet (a fresh process); 0 starts it empty.
        history_turns: how many turns a session's history keeps (the oldest are
            dropped whole, so a tool call never loses its result); ``None`` keeps all.
    """

    def __init__(
        self, *, seed_history: int = DEFAULT_SEED_HISTORY, history_turns: int | None = 100
    ) -> None:
        if seed_history < 0:
            raise ValueError("seed_history must be 0 or more")
        if history_turns is not None and history_turns < 1:
            raise ValueError("history_turns must be at least 1 (or None)")
        self._seed_history = seed_history
        self._history_turns = history_turns
        # Per session key: the committed turns, each a tuple of messages. Replaced, never
        # mutated, so a fork's copy is the parent's last completed turn.
        self._histories: dict[str, tuple[tuple[M, ...], ...]] = {}

    # --- to implement -----------------------------------------------------------------

    @abc.abstractmethod
    def seed_messages(self, turn: Turn, entries: Sequence[ChatEntry]) -> Sequence[M]:
        """The framework's messages for the chat's recent ``entries`` (oldest first),
        the history of a session seen for the first time: the three adapters give one
        user message of :func:`seed_transcript` (the agent's own messages marked as
        sent with ``send_message``, never as plain assistant text)."""

    @abc.abstractmethod
    async def run_with_history(
        self, turn: Turn, history: Sequence[M], tools: ParallTools
    ) -> TurnOutput[M]:
        """Run the framework's agent for ``turn`` on ``history`` with ``turn.prompt()`` as
        the user input, offering ``tools``; record its stream on the turn; return the
        turn's new messages and final text.

        Raise to fail the turn (the history stays as it was); on cancellation, stop
        everything the framework started for the run before re-raising.
        """

    # --- the history ------------------------------------------------------------------

    def history(self, session_key: str) -> tuple[M, ...]:
        """The committed history of ``session_key`` (empty when it has none)."""
        return tuple(m for chunk in self._histories.get(session_key, ()) for m in chunk)

    def session_keys(self) -> tuple[str, ...]:
        """The session keys that have a history (main, and each open fork's)."""
        return tuple(self._histories)

    def has_history(self, session_key: str) -> bool:
        """Whether ``session_key`` has a history (seeded or from a completed turn)."""
        return session_key in self._histories

    def forget(self, session_key: str) -> None:
        """Drop the history of ``session_key`` (its next turn seeds it again)."""
        self._histories.pop(session_key, None)

    async def run_turn(self, turn: Turn) -> str | None:
        """Run one turn on its session's history; save its messages if it succeeded."""
        key = turn.session_key
        committed = self._histories.get(key)
        if committed is None:
            committed = await self._seed(turn)
        history = tuple(m for chunk in committed for m in chunk)
        tools = ParallTools(turn)
        with tools.bound():
            result = await self.run_with_history(turn, history, tools)
        new = tuple(result.new_messages)
        chunks = (*committed, new) if new else committed
        if self._history_turns is not None:
            chunks = chunks[-self._history_turns :]
        self._histories[key] = chunks
        return result.output

    async def fork_session(self, parent: SessionRef) -> SessionRef | None:
        """A new session holding a copy of ``parent``'s history at its last completed
        turn (a turn running on the parent is not in it, nor ever will be)."""
        child = SessionRef(f"{parent.key}:fork:{uuid.uuid4().hex[:12]}")
        committed = self._histories.get(parent.key)
        if committed is not None:
            self._histories[child.key] = committed
        return child

    async def release_session(self, child: SessionRef, outcome: ForkOutcome) -> None:
        """Drop the fork's history (what it learnt reaches main as the fork result)."""
        self._histories.pop(child.key, None)

    async def _seed(self, turn: Turn) -> tuple[tuple[M, ...], ...]:
        if self._seed_history == 0 or not turn.chat_id:
            return ()
        own = {event.message_id for event in turn.events}
        # The turn's own events are its prompt; what came after them is for later turns.
        entries = await ParallTools(turn).recent_messages(self._seed_history + len(own))
        cut = next((i for i, entry in enumerate(entries) if entry.message_id in own), None)
        earlier = entries[:cut] if cut is not None else entries
        earlier = [entry for entry in earlier if entry.message_id not in own]
        earlier = earlier[-self._seed_history :]
        if not earlier:
            return ()
        _log.debug("seeded %s from %d chat messages", turn.session_key, len(earlier))
        return (tuple(self.seed_messages(turn, earlier)),)
