"""Typed models of every object of the Parall protocol.

All models are frozen, slotted attrs classes whose attribute names are the
wire field names. They are (de)serialised by the one converter of
:mod:`parall_bridge._serde`: unknown fields from the server are ignored,
unknown enum values are kept as plain strings, absent optional fields take
their defaults, and ``None``-valued optional fields are left out on output.

Fields of a closed set (chat type, task status, step type, ...) are typed
``SomeEnum | str``: a known value becomes the enum member, an unknown one is
kept as the string, so ``AgentStep(step_type="thinking", ...)`` and
``AgentStep(step_type=StepType.THINKING, ...)`` are the same value.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar

import attrs

from .protocol import MENTION_ALL_USER_ID

__all__ = [
    "MENTION_ALL_USER_ID",
    "AgentConfig",
    "AgentConfigUpdate",
    "AgentSession",
    "AgentSessionStatus",
    "AgentStep",
    "Attachment",
    "Chat",
    "ChatChanges",
    "ChatType",
    "ChatUpdate",
    "DispatchEventType",
    "DispatchItem",
    "DispatchStatus",
    "FileUrl",
    "Hello",
    "MediaContent",
    "Mention",
    "Message",
    "MessageHints",
    "MessageType",
    "Page",
    "RecoveryOverflow",
    "RoutingMode",
    "SourceType",
    "StepType",
    "TargetType",
    "Task",
    "TaskPriority",
    "TaskStatus",
    "TextContent",
    "UploadTicket",
    "User",
    "UserType",
    "WsTicket",
]

T = TypeVar("T")
E = TypeVar("E", bound=enum.StrEnum)


# --- enums ---------------------------------------------------------------------


class UserType(enum.StrEnum):
    """Kind of user account."""

    HUMAN = "human"
    AGENT = "agent"


class ChatType(enum.StrEnum):
    """Kind of chat."""

    DIRECT = "direct"
    GROUP = "group"


class RoutingMode(enum.StrEnum):
    """How a group chat routes its messages to agents (``agent_routing_mode``)."""

    PASSIVE = "passive"
    """Only messages that @mention the agent or @all (the default)."""
    ACTIVE = "active"
    """Every message."""
    SMART = "smart"
    """The messages the platform picks (announced by ``dispatch.new``)."""


class MessageType(enum.StrEnum):
    """Kind of message; agents handle ``text`` and ``file`` and ignore the rest."""

    TEXT = "text"
    FILE = "file"


class TaskStatus(enum.StrEnum):
    """Status of a task."""

    TODO = "todo"
    IN_PROGRESS = "in_progress"
    IN_REVIEW = "in_review"
    DONE = "done"
    CANCELED = "canceled"


class TaskPriority(enum.StrEnum):
    """Priority of a task."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class DispatchEventType(enum.StrEnum):
    """What a dispatch item announces."""

    MESSAGE = "message"
    TASK_ASSIGN = "task_assign"


class SourceType(enum.StrEnum):
    """Kind of entity a dispatch item points at."""

    MESSAGE = "message"
    TASK_ACTIVITY = "task_activity"


class DispatchStatus(enum.StrEnum):
    """Status of a dispatch item that is not yet acknowledged."""

    PENDING = "pending"
    RECEIVED = "received"


class AgentSessionStatus(enum.StrEnum):
    """Status of an agent session on the platform."""

    ACTIVE = "active"
    IDLE = "idle"
    COMPLETED = "completed"


class StepType(enum.StrEnum):
    """Kind of an agent step (an observability record)."""

    INPUT = "input"
    THINKING = "thinking"
    TEXT = "text"
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"
    ERROR = "error"


class TargetType(enum.StrEnum):
    """What an agent step is about; the empty string means nothing in particular."""

    CHAT = "chat"
    TASK = "task"
    NONE = ""


def enum_or_str(enum_cls: type[E], value: Any) -> E | str:
    """Map ``value`` to a member of ``enum_cls`` when it names one; keep any other string."""
    if isinstance(value, enum_cls):
        return value
    text = str(value.value if isinstance(value, enum.Enum) else value)
    try:
        return enum_cls(text)
    except ValueError:
        return text


# Named converters (one per field type; mypy's attrs plugin reads their signatures).
def _user_type(value: Any) -> UserType | str | None:
    return None if value is None else enum_or_str(UserType, value)


def _chat_type(value: Any) -> ChatType | str | None:
    return None if value is None else enum_or_str(ChatType, value)


def _routing_mode(value: Any) -> RoutingMode | str:
    return enum_or_str(RoutingMode, value)


def _optional_routing_mode(value: Any) -> RoutingMode | str | None:
    return None if value is None else enum_or_str(RoutingMode, value)


def _message_type(value: Any) -> MessageType | str:
    return enum_or_str(MessageType, value)


def _task_status(value: Any) -> TaskStatus | str | None:
    return None if value is None else enum_or_str(TaskStatus, value)


def _task_priority(value: Any) -> TaskPriority | str | None:
    return None if value is None else enum_or_str(TaskPriority, value)


def _dispatch_event_type(value: Any) -> DispatchEventType | str | None:
    return None if value is None else enum_or_str(DispatchEventType, value)


def _source_type(value: Any) -> SourceType | str | None:
    return None if value is None else enum_or_str(SourceType, value)


def _dispatch_status(value: Any) -> DispatchStatus | str:
    return enum_or_str(DispatchStatus, value)


def _session_status(value: Any) -> AgentSessionStatus | str | None:
    return None if value is None else enum_or_str(AgentSessionStatus, value)


def _step_type(value: Any) -> StepType | str:
    return enum_or_str(StepType, value)


def _target_type(value: Any) -> TargetType | str:
    return enum_or_str(TargetType, value)


def _to_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if value is not None else ()


def _to_dict(value: Any) -> dict[str, Any]:
    return dict(value) if value is not None else {}


# --- users, chats --------------------------------------------------------------


@attrs.frozen
class User:
    """A platform user, human or agent (also the ``sender`` of a message)."""

    id: str
    display_name: str = ""
    type: UserType | str | None = attrs.field(default=None, converter=_user_type)
    status: str | None = None
    avatar_url: str | None = None


@attrs.frozen
class Chat:
    """A direct or group chat."""

    id: str
    org_id: str | None = None
    type: ChatType | str | None = attrs.field(default=None, converter=_chat_type)
    name: str | None = None
    description: str | None = None
    agent_routing_mode: RoutingMode | str = attrs.field(
        default=RoutingMode.PASSIVE, converter=_routing_mode
    )
    created_at: datetime | None = None
    updated_at: datetime | None = None


# --- messages ------------------------------------------------------------------


@attrs.frozen
class Mention:
    """An @mention inside a text message; ``user_id`` is ``usr_all`` for @all."""

    user_id: str


@attrs.frozen
class TextContent:
    """Content of a ``text`` message."""

    text: str = ""
    mentions: tuple[Mention, ...] = attrs.field(default=(), converter=_to_tuple)

    def mentions_user(self, user_id: str) -> bool:
        """Whether the message mentions ``user_id`` directly or through @all."""
        return any(m.user_id in (user_id, MENTION_ALL_USER_ID) for m in self.mentions)


@attrs.frozen
class MediaContent:
    """Content of a ``file`` message."""

    attachment_id: str = ""
    file_name: str = ""
    mime_type: str = ""
    file_size: int | None = None
    caption: str | None = None


@attrs.frozen
class Attachment:
    """A file attached to a message.

    The server may name the fields ``name``, ``content_type``, ``size`` and
    ``download_url`` instead; the converter reads both spellings.
    """

    id: str
    file_name: str = ""
    mime_type: str = ""
    file_size: int | None = None
    url: str | None = None


@attrs.frozen
class MessageHints:
    """Hints the sender attached to a message."""

    no_reply: bool = False


@attrs.frozen
class Message:
    """A chat message.

    ``content`` is a :class:`TextContent` for ``text`` messages, a
    :class:`MediaContent` for ``file`` messages, and the raw mapping for any
    other message type.
    """

    id: str
    chat_id: str
    sender_id: str
    message_type: MessageType | str = attrs.field(converter=_message_type)
    content: TextContent | MediaContent | Mapping[str, Any]
    sender: User | None = None
    thread_root_id: str | None = None
    hints: MessageHints | None = None
    attachment_ids: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple)
    attachments: tuple[Attachment, ...] = attrs.field(default=(), converter=_to_tuple)
    created_at: datetime | None = None

    @property
    def no_reply(self) -> bool:
        """Whether the sender asked for no reply."""
        return self.hints is not None and self.hints.no_reply

    @property
    def sender_name(self) -> str:
        """The sender's display name, or their id when the server gave none."""
        if self.sender is not None and self.sender.display_name:
            return self.sender.display_name
        return self.sender_id


# --- tasks ---------------------------------------------------------------------


@attrs.frozen
class Task:
    """A task."""

    id: str
    org_id: str | None = None
    identifier: str | None = None
    title: str = ""
    description: str | None = None
    status: TaskStatus | str | None = attrs.field(default=None, converter=_task_status)
    priority: TaskPriority | str | None = attrs.field(default=None, converter=_task_priority)
    assignee_id: str | None = None
    creator_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


# --- dispatch ------------------------------------------------------------------


@attrs.frozen
class DispatchItem:
    """A pending (not yet acknowledged) unit of work routed to the agent."""

    id: str
    event_type: DispatchEventType | str | None = attrs.field(
        default=None, converter=_dispatch_event_type
    )
    source_type: SourceType | str | None = attrs.field(default=None, converter=_source_type)
    source_id: str | None = None
    chat_id: str | None = None
    task_id: str | None = None
    status: DispatchStatus | str = attrs.field(
        default=DispatchStatus.PENDING, converter=_dispatch_status
    )
    delivery_reason: str | None = None
    created_at: datetime | None = None


# --- agent sessions, steps, config ------------------------------------------------


@attrs.frozen
class AgentSession:
    """An agent session: the platform's record of one agent runtime session."""

    id: str
    status: AgentSessionStatus | str | None = attrs.field(default=None, converter=_session_status)
    runtime_type: str | None = None
    runtime_key: str | None = None
    runtime_ref: Mapping[str, Any] | None = None
    created_at: datetime | None = None


@attrs.frozen
class AgentStep:
    """An agent step, as sent (``id``, ``session_id`` and ``created_at`` unset)
    and as the server returns it.

    ``content`` depends on ``step_type``: input ``{trigger_type, trigger_ref,
    sender_id, sender_name, summary}``; thinking ``{text}``; text ``{text,
    suppressed}``; tool_call ``{call_id, name, args}``; tool_result
    ``{call_id, output?, error?}``; error ``{message, attempts?}``.
    """

    step_type: StepType | str = attrs.field(converter=_step_type)
    target_type: TargetType | str = attrs.field(default=TargetType.NONE, converter=_target_type)
    target_id: str | None = None
    content: Mapping[str, Any] = attrs.field(factory=dict, converter=_to_dict)
    group_key: str | None = None
    id: str | None = None
    session_id: str | None = None
    created_at: datetime | None = None


@attrs.frozen
class AgentConfig:
    """The agent's platform configuration: a ``version`` and free-form settings.

    ``extra`` holds every other field of the server's object (``models``,
    ``defaults``, ...), as sent.
    """

    version: int = 0
    extra: Mapping[str, Any] = attrs.field(factory=dict, converter=_to_dict)


# --- small responses ----------------------------------------------------------------


def _redact(_: object) -> str:
    return "'***'"


@attrs.frozen
class WsTicket:
    """A single-use, short-lived WebSocket credential.

    The ticket is a secret: its repr is redacted.
    """

    ticket: str = attrs.field(repr=_redact)
    ws_url: str | None = None
    expires_at: datetime | None = None


@attrs.frozen
class FileUrl:
    """A (usually time-limited) download URL for an attachment."""

    url: str


@attrs.frozen
class UploadTicket:
    """The answer to a presign request: where to ``PUT`` the bytes."""

    attachment_id: str
    upload_url: str = attrs.field(repr=_redact)


@attrs.frozen
class Page(Generic[T]):
    """One page of a paginated list.

    ``next_cursor`` is ``None`` on the last page; use it as the ``cursor``
    argument of the next call, or use the ``iter_*`` methods of the client.
    """

    data: tuple[T, ...] = attrs.field(converter=_to_tuple)
    has_more: bool = False
    next_cursor: str | None = None


# --- WebSocket payloads ---------------------------------------------------------------


@attrs.frozen
class Hello:
    """The first frame of every WebSocket connection."""

    session_id: str = ""
    heartbeat_interval: float = 30.0


@attrs.frozen
class ChatChanges:
    """The fields of a chat that a ``chat.update`` changed (absent ones unchanged)."""

    type: ChatType | str | None = attrs.field(default=None, converter=_chat_type)
    name: str | None = None
    agent_routing_mode: RoutingMode | str | None = attrs.field(
        default=None, converter=_optional_routing_mode
    )


@attrs.frozen
class ChatUpdate:
    """Payload of ``chat.update``."""

    chat_id: str
    changes: ChatChanges = attrs.field(factory=ChatChanges)


@attrs.frozen
class AgentConfigUpdate:
    """Payload of ``agent_config.update``: the platform config changed."""

    version: int = 0


@attrs.frozen
class RecoveryOverflow:
    """Payload of ``recovery.overflow``: events were lost, run a full catch-up."""
