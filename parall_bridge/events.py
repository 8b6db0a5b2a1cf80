"""``ParallEvent``: one inbound unit of work (a message or a task assignment), and the
text the agent reads for it (DESIGN.md section 5, the seed's ``buildEventBody``).

Header lines are bracketed (``[From: Ada (usr_1)]``); every name and id written
into one is sanitised so that it cannot end the line or forge another header
(DESIGN.md section 6, item 8).
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import attrs

from .models import ChatType, Task

__all__ = [
    "EventAttachment",
    "EventKind",
    "EventOrigin",
    "ParallEvent",
    "build_event_body",
    "build_fork_result_prefix",
    "build_history_body",
    "build_task_text",
    "join_prompt",
    "sanitize_header_value",
    "turn_id_of",
]

SUMMARY_LIMIT: Final = 200
"""Characters of an event's text kept in its ``input`` step summary."""
PROMPT_SEPARATOR: Final = "\n\n---\n\n"
"""Between the blocks of a prompt (fork results, earlier events, this event)."""
SYNTHETIC_TARGET: Final = "_orchestrator"
"""Target of the synthetic wake-up turn that delivers fork results to an idle main session."""
SYNTHETIC_BODY: Final = "[Orchestrator: fork session(s) completed — review results above]"


class EventKind(enum.StrEnum):
    """What an event is about."""

    MESSAGE = "message"
    TASK = "task"


class EventOrigin(enum.StrEnum):
    """How the gateway learnt of an event."""

    LIVE = "live"
    """A ``message.new`` / ``task.assigned`` frame (or :meth:`Gateway.feed`)."""
    DISPATCH_NEW = "dispatch_new"
    """A ``dispatch.new`` frame for a source the live path had not taken."""
    CATCH_UP = "catch_up"
    """A pending dispatch item found by catch-up or reconciliation."""
    SYNTHETIC = "synthetic"
    """The gateway's own wake-up turn delivering fork results."""


_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")


_FIELD_CHARACTERS = str.maketrans({"[": "(", "]": ")", '"': "'", "|": "/"})


def sanitize_header_value(value: object) -> str:
    """Make ``value`` safe inside a bracketed header line.

    Line breaks become spaces (no new line can start); square brackets become
    parentheses (the line cannot be closed early nor a header opened); double
    quotes and ``|`` become ``'`` and ``/`` (a quoted name cannot end early and
    fake a field of its own line, such as ``| type: direct``).
    """
    return _LINE_BREAKS.sub(" ", str(value)).translate(_FIELD_CHARACTERS).strip()


def _s(value: object) -> str:
    return sanitize_header_value(value)


@attrs.frozen
class EventAttachment:
    """A file attached to an event: its MIME type (``file`` when unknown) and a URL."""

    media_type: str
    url: str


@attrs.frozen(kw_only=True)
class ParallEvent:
    """One inbound message or task assignment, normalised.

    Attributes:
        kind: ``"message"`` or ``"task"``.
        target_id: the chat id (messages) or task id (tasks): the unit of routing.
        chat_id: the chat of a message (``None`` for tasks).
        message_id: the message id (the task id for tasks, as the seed does).
        task_id: the task id (``None`` for messages).
        sender_id: who sent the message / created the task.
        sender_name: their display name (``"system"`` for tasks, as the seed does).
        body: the formatted event body the agent reads (section 5).
        text: the raw message text (or the task's title/status/priority/description).
        created_at: when the message was sent / the task was last updated.
        dispatch_id: the dispatch item id, when known.
        origin: ``live``, ``dispatch_new`` or ``catch_up``.
        no_reply: the sender hinted that no reply is expected.
        thread_root_id: the thread the message belongs to.
        target_name: the chat name or task identifier, when there is one.
        target_type: the chat type (``direct``, ``group``...) or ``"task"``.
        attachments: the files of the message, each with a media URL.
        updated_at: for tasks, the ``updated_at`` that versions the assignment.
    """

    kind: EventKind = attrs.field(converter=EventKind)
    target_id: str
    chat_id: str | None = None
    message_id: str
    task_id: str | None = None
    sender_id: str
    sender_name: str
    body: str
    text: str = ""
    created_at: datetime | None = None
    dispatch_id: str | None = None
    origin: EventOrigin = attrs.field(default=EventOrigin.LIVE, converter=EventOrigin)
    no_reply: bool = False
    thread_root_id: str | None = None
    target_name: str | None = None
    target_type: str | None = None
    attachments: tuple[EventAttachment, ...] = ()
    updated_at: datetime | None = None

    @property
    def key(self) -> str:
        """The dedupe key: the message id, or ``task id @ updated_at`` for tasks."""
        if self.kind is EventKind.TASK:
            version = self.updated_at.isoformat() if self.updated_at else ""
            return f"{self.target_id}@{version}"
        return self.message_id

    @property
    def source_type(self) -> str:
        """The dispatch source type of this event (``message`` or ``task_activity``)."""
        return "task_activity" if self.kind is EventKind.TASK else "message"

    @property
    def source_id(self) -> str:
        """The dispatch source id (the message id, or the task id)."""
        return self.target_id if self.kind is EventKind.TASK else self.message_id

    @property
    def summary(self) -> str:
        """The event's text cut to 200 characters (the ``input`` step summary)."""
        return self.text[:SUMMARY_LIMIT]

    @classmethod
    def message(
        cls,
        *,
        chat_id: str,
        message_id: str,
        sender_id: str,
        sender_name: str,
        text: str,
        chat_name: str | None = None,
        chat_type: ChatType | str | None = None,
        thread_root_id: str | None = None,
        no_reply: bool = False,
        attachments: Sequence[EventAttachment] = (),
        created_at: datetime | None = None,
        origin: EventOrigin = EventOrigin.LIVE,
        dispatch_id: str | None = None,
    ) -> ParallEvent:
        """Build a message event; its body is formatted here."""
        target_type = str(chat_type) if chat_type else None
        body = build_event_body(
            kind=EventKind.MESSAGE,
            target_id=chat_id,
            target_name=chat_name,
            target_type=target_type,
            sender_id=sender_id,
            sender_name=sender_name,
            message_id=message_id,
            thread_root_id=thread_root_id,
            no_reply=no_reply,
            attachments=attachments,
            text=text,
        )
        return cls(
            kind=EventKind.MESSAGE,
            target_id=chat_id,
            chat_id=chat_id,
            message_id=message_id,
            sender_id=sender_id,
            sender_name=sender_name,
            body=body,
            text=text,
            created_at=created_at,
            dispatch_id=dispatch_id,
            origin=origin,
            no_reply=no_reply,
            thread_root_id=thread_root_id,
            target_name=chat_name,
            target_type=target_type,
            attachments=tuple(attachments),
        )

    @classmethod
    def task(
        cls,
        task: Task,
        *,
        origin: EventOrigin = EventOrigin.LIVE,
        dispatch_id: str | None = None,
    ) -> ParallEvent:
        """Build a task-assignment event; its body is formatted here."""
        text = build_task_text(task)
        sender_id = task.creator_id or ""
        body = build_event_body(
            kind=EventKind.TASK,
            target_id=task.id,
            target_name=task.identifier,
            target_type="task",
            sender_id=sender_id,
            sender_name="system",
            message_id=task.id,
            text=text,
        )
        return cls(
            kind=EventKind.TASK,
            target_id=task.id,
            task_id=task.id,
            message_id=task.id,
            sender_id=sender_id,
            sender_name="system",
            body=body,
            text=text,
            created_at=task.updated_at or task.created_at,
            dispatch_id=dispatch_id,
            origin=origin,
            target_name=task.identifier,
            target_type="task",
            updated_at=task.updated_at,
        )

    @classmethod
    def synthetic(cls, message_id: str) -> ParallEvent:
        """The wake-up event that delivers fork results to an idle main session."""
        body = build_event_body(
            kind=EventKind.MESSAGE,
            target_id=SYNTHETIC_TARGET,
            target_name=None,
            target_type="system",
            sender_id="system",
            sender_name="system",
            message_id=message_id,
            text=SYNTHETIC_BODY,
        )
        return cls(
            kind=EventKind.MESSAGE,
            target_id=SYNTHETIC_TARGET,
            message_id=message_id,
            sender_id="system",
            sender_name="system",
            body=body,
            text=SYNTHETIC_BODY,
            origin=EventOrigin.SYNTHETIC,
            target_type="system",
        )

    def with_origin(self, origin: EventOrigin, dispatch_id: str | None = None) -> ParallEvent:
        """A copy with another origin (and dispatch id, when given)."""
        return attrs.evolve(self, origin=origin, dispatch_id=dispatch_id or self.dispatch_id)


def build_task_text(task: Task) -> str:
    """The text of a task event: title, status, priority, then the description."""
    parts = [f"Title: {task.title}", f"Status: {task.status}", f"Priority: {task.priority}"]
    if task.description:
        parts += ["", task.description]
    return "\n".join(parts)


def build_event_body(
    *,
    kind: EventKind,
    target_id: str,
    target_name: str | None,
    target_type: str | None,
    sender_id: str,
    sender_name: str,
    message_id: str,
    text: str,
    thread_root_id: str | None = None,
    no_reply: bool = False,
    attachments: Sequence[EventAttachment] = (),
) -> str:
    """The event body: bracketed header lines, a blank line, then the text."""
    lines: list[str] = []
    if kind is EventKind.MESSAGE:
        label = f'"{_s(target_name)}" ({_s(target_id)})' if target_name else _s(target_id)
        lines.append("[Event: message.new]")
        lines.append(f"[Chat: {label} | type: {_s(target_type or 'unknown')}]")
        lines.append(f"[From: {_s(sender_name)} ({_s(sender_id)})]")
        lines.append(f"[Message ID: {_s(message_id)}]")
        if thread_root_id:
            lines.append(f"[Thread: {_s(thread_root_id)}]")
        if no_reply:
            lines.append("[Hint: no_reply]")
        for attachment in attachments:
            lines.append(
                f"[Attachment: {_s(attachment.media_type or 'file')} {_s(attachment.url)}]"
            )
    else:
        label = f"{_s(target_name)} ({_s(target_id)})" if target_name else _s(target_id)
        lines.append("[Event: task.assigned]")
        lines.append(f"[Task: {label} | type: {_s(target_type or 'task')}]")
        lines.append(f"[Assigned by: {_s(sender_name)} ({_s(sender_id)})]")
    lines += ["", text]
    return "\n".join(lines)


def build_history_body(event: ParallEvent) -> str:
    """The body of an earlier, coalesced event in a turn's history: its metadata on one
    line (message id, no-reply hint, thread, attachments), then its text."""
    meta = [f"[Message ID: {_s(event.message_id)}]"]
    if event.no_reply:
        meta.append("[Hint: no_reply]")
    if event.thread_root_id:
        meta.append(f"[Thread: {_s(event.thread_root_id)}]")
    for attachment in event.attachments:
        meta.append(f"[Attachment: {_s(attachment.media_type or 'file')} {_s(attachment.url)}]")
    return " ".join(meta) + "\n" + event.text


@attrs.frozen
class ForkResult:
    """What a finished fork reports to the main session's next turn."""

    kind: EventKind
    summary: str
    actions: tuple[str, ...] = ()

    @classmethod
    def of(cls, handled: Sequence[ParallEvent], actions: Sequence[str] = ()) -> ForkResult:
        """The result of a fork that handled ``handled`` (at least one event)."""
        first = handled[0]
        where = first.target_name or first.target_id
        if len(handled) == 1:
            summary = f"{first.kind.value} from {first.sender_name} in {where}"
        else:
            summary = f"{len(handled)} events in {where}"
        return cls(first.kind, summary, tuple(a for a in actions if a))


def build_fork_result_prefix(results: Sequence[ForkResult]) -> str:
    """The ``[Fork result]`` blocks put before main's next turn, ending with ``---``."""
    if not results:
        return ""
    blocks = []
    for result in results:
        lines = ["[Fork result]", f"[Handled: {result.kind.value} — {_s(result.summary)}]"]
        if result.actions:
            lines.append(f"[Actions: {'; '.join(_s(a) for a in result.actions)}]")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + PROMPT_SEPARATOR


def join_prompt(prefix: str, bodies: Sequence[str]) -> str:
    """The fork-result prefix (if any), then the bodies joined by ``---`` lines."""
    return prefix + PROMPT_SEPARATOR.join(bodies)


def turn_id_of(keys: Sequence[str]) -> str:
    """The id of a turn that handles the events of ``keys``, in this order: the same keys
    give the same id in any process, so a turn that runs again (after a crash) keeps its
    replies' idempotency keys. A task's key holds its ``updated_at``, so a task assigned
    again makes a new turn id."""
    digest = hashlib.blake2b("\x00".join(keys).encode(), digest_size=12).hexdigest()
    return f"t{digest}"
