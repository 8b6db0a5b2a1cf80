"""The emulator's in-memory platform: users, keys, chats, messages, tasks,
uploads, tickets, the dispatch queue, agent sessions, steps and configs.

Every entity is kept as the wire-shaped JSON dict of PROTOCOL.md ("Objects"),
so what the REST and WebSocket layers send is exactly the protocol, whatever
the library's own models do. Operations raise :class:`EmulatorError`
subclasses that the REST layer turns into error responses. Live events go to
an :class:`EventSink` (the WebSocket hub) in the order they happen.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import itertools
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import attrs

from .._serde import format_datetime, parse_datetime
from .._tasks import TaskSet
from ..models import (
    AgentSessionStatus,
    ChatType,
    DispatchEventType,
    DispatchStatus,
    MessageType,
    RoutingMode,
    SourceType,
    TaskPriority,
    TaskStatus,
    UserType,
)
from ..protocol import (
    FRAME_AGENT_CONFIG_UPDATE,
    FRAME_CHAT_UPDATE,
    FRAME_DISPATCH_NEW,
    FRAME_MESSAGE_NEW,
    FRAME_TASK_ASSIGNED,
    MENTION_ALL_USER_ID,
    RESERVED_IDEMPOTENCY_PREFIXES,
)

__all__ = [
    "DOWNLOAD_ROUTE",
    "UPLOAD_ROUTE",
    "BadRequest",
    "Conflict",
    "EmulatorError",
    "EmulatorState",
    "EventSink",
    "Forbidden",
    "InvalidTicket",
    "NotFound",
    "SmartRouter",
    "Unauthorized",
    "Wire",
    "now_text",
]

_log = logging.getLogger("parall_bridge.testing.state")

Wire = dict[str, Any]
"""A wire-shaped JSON object."""

SmartRouter = Callable[[Mapping[str, Any], str], bool]
"""Decides whether a ``smart``-mode group message goes to an agent: (message wire dict,
agent user id) -> route it?"""

UPLOAD_ROUTE: Final = "/_uploads/{attachment_id}"
"""Emulator-private path of pre-signed upload URLs (not part of the protocol)."""
DOWNLOAD_ROUTE: Final = "/_files/{attachment_id}"
"""Emulator-private path of file download URLs (not part of the protocol)."""

ACKED_STATUS: Final = "acked"
"""Status the emulator gives an acknowledged dispatch item (never on the wire)."""

DEFAULT_AGENT_CONFIG: Final[Mapping[str, Any]] = {"version": 1, "models": [], "defaults": {}}

_MESSAGE_TYPES_DISPATCHED: Final = frozenset({MessageType.TEXT.value, MessageType.FILE.value})
_TASK_FIELDS: Final = ("title", "status", "priority", "description", "assignee_id")
_CHAT_CHANGE_FIELDS: Final = ("type", "name", "agent_routing_mode")
_TASK_DELIVERY_REASON: Final = "assigned"


# --- errors ---------------------------------------------------------------------


class EmulatorError(Exception):
    """An operation the platform refuses; ``status`` and ``code`` go into the error body."""

    status: int = 400
    code: str = "BAD_REQUEST"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadRequest(EmulatorError, ValueError):
    """400: malformed request or invalid value."""


class Unauthorized(EmulatorError):
    """401: missing, unknown or revoked API key."""

    status = 401
    code = "UNAUTHORIZED"


class Forbidden(EmulatorError):
    """403: the key may not do this."""

    status = 403
    code = "FORBIDDEN"


class NotFound(EmulatorError, KeyError):
    """404: no such entity (or one the caller may not see)."""

    status = 404
    code = "NOT_FOUND"


class Conflict(EmulatorError):
    """409: conflicts with the entity's state."""

    status = 409
    code = "CONFLICT"


class InvalidTicket(Exception):
    """A WebSocket ticket that is unknown, already used or expired."""


# --- helpers ----------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def now_text() -> str:
    """The current time as RFC 3339 with milliseconds and ``Z``."""
    return format_datetime(_now())


def _later_than(previous: str | None) -> str:
    """Now, or 1 ms after ``previous`` when that is not earlier (strictly increasing)."""
    now = _now()
    if previous is not None:
        floor = parse_datetime(previous) + timedelta(milliseconds=1)
        now = max(now, floor)
    return format_datetime(now)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _require_object(body: Any, what: str = "body") -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise BadRequest(f"{what} must be a JSON object")
    return body


def _require_str(body: Mapping[str, Any], name: str, *, non_empty: bool = True) -> str:
    value = body.get(name)
    if not isinstance(value, str) or (non_empty and not value):
        raise BadRequest(f"{name} must be a {'non-empty ' if non_empty else ''}string")
    return value


def _require_choice(value: Any, name: str, choices: frozenset[str]) -> str:
    """``value`` if it is one of ``choices`` (a string), else :class:`BadRequest`."""
    if not isinstance(value, str) or value not in choices:
        raise BadRequest(f"{name} must be one of {sorted(choices)}")
    return value


def _enum_values(enum_cls: Iterable[Any]) -> frozenset[str]:
    return frozenset(str(member.value) for member in enum_cls)


_TASK_STATUSES: Final = _enum_values(TaskStatus)
_TASK_PRIORITIES: Final = _enum_values(TaskPriority)
_SESSION_STATUSES: Final = _enum_values(AgentSessionStatus)
_SOURCE_TYPES: Final = _enum_values(SourceType)


class EventSink(Protocol):
    """Where live events go (the WebSocket hub)."""

    def emit(self, user_id: str, frame_type: str, data: Mapping[str, Any]) -> int:
        """Number and buffer an event frame for ``user_id``, send it to their connections."""
        ...


def _route_everything(message: Mapping[str, Any], agent_id: str) -> bool:
    return True


# --- records ----------------------------------------------------------------------


@attrs.define
class _MessageRecord:
    wire: Wire
    ordinal: int
    deleted: bool = False


@attrs.define(eq=False)
class _DispatchRecord:
    wire: Wire
    ordinal: int
    acked: bool = False


COMPACT_MIN_STALE: Final = 64
"""Acked rows a dispatch queue tolerates in its pending list before it compacts it."""


class _DispatchQueue:
    """One agent's dispatch items, indexed so that every operation costs no more than
    the rows it touches: listing a page (bisect on the cursor), acking by id or by
    source, marking received, counting. Acking 10,000 pending items is then linear,
    not quadratic (each used to scan every row the agent ever had).

    ``records`` keeps every item, acked or not, in FIFO order (for inspection). The
    pending list drops acked rows lazily: ``_head`` skips the acked prefix (acks come
    mostly in FIFO order), and the list is compacted once acked rows are more than
    half of it, so a page skips at most as many acked rows as there are pending ones.
    """

    def __init__(self) -> None:
        self.records: list[_DispatchRecord] = []
        self.pending = 0
        self.acked = 0
        self._by_id: dict[str, _DispatchRecord] = {}
        self._by_source: dict[tuple[str, str], list[_DispatchRecord]] = {}
        self._live: list[_DispatchRecord] = []
        self._ordinals: list[int] = []
        self._head = 0
        self._stale = 0

    def add(self, record: _DispatchRecord) -> None:
        """Append a new pending item (ordinals only grow, so the lists stay sorted)."""
        wire = record.wire
        self.records.append(record)
        self._by_id[wire["id"]] = record
        self._by_source.setdefault((wire["source_type"], wire["source_id"]), []).append(record)
        self._live.append(record)
        self._ordinals.append(record.ordinal)
        self.pending += 1

    def by_id(self, dispatch_id: str) -> _DispatchRecord | None:
        """The item with this id, acked or not."""
        return self._by_id.get(dispatch_id)

    def by_source(self, source_type: str, source_id: str) -> list[_DispatchRecord]:
        """The pending items of this source, oldest first."""
        return list(self._by_source.get((source_type, source_id), ()))

    def ack(self, record: _DispatchRecord) -> None:
        """Mark an item acked (acking an acked item changes nothing)."""
        if record.acked:
            return
        record.acked = True
        record.wire["status"] = ACKED_STATUS
        self.pending -= 1
        self.acked += 1
        key = (record.wire["source_type"], record.wire["source_id"])
        same = self._by_source[key]
        same.remove(record)
        if not same:
            del self._by_source[key]
        self._stale += 1
        live = self._live
        while self._head < len(live) and live[self._head].acked:
            self._head += 1
        if self._stale >= COMPACT_MIN_STALE and 2 * self._stale > len(live):
            self._live = [r for r in live[self._head :] if not r.acked]
            self._ordinals = [r.ordinal for r in self._live]
            self._head = 0
            self._stale = 0

    def page(self, after: int | None, limit: int) -> tuple[list[_DispatchRecord], bool]:
        """Up to ``limit`` pending items with an ordinal above ``after`` (all when
        ``None``), oldest first, and whether more follow."""
        live = self._live
        start = self._head
        if after is not None:
            start = max(start, bisect.bisect_right(self._ordinals, after))
        found: list[_DispatchRecord] = []
        for index in range(start, len(live)):
            record = live[index]
            if not record.acked:
                if len(found) == limit:
                    return found, True
                found.append(record)
        return found, False

    def pending_records(self) -> list[_DispatchRecord]:
        """The pending items, oldest first."""
        return [r for r in self._live[self._head :] if not r.acked]


@attrs.define
class _Upload:
    id: str
    file_name: str
    mime_type: str
    file_size: int
    upload_sig: str
    download_sig: str
    data: bytes | None = None
    content_type: str | None = None
    completed: bool = False
    created_by: str | None = None


@attrs.frozen
class _Ticket:
    user_id: str
    api_key: str = attrs.field(repr=False)
    expires: float


# --- the state ----------------------------------------------------------------------


class EmulatorState:
    """The platform's data and rules (dispatch semantics included)."""

    def __init__(
        self,
        *,
        org_id: str,
        sink: EventSink,
        tasks: TaskSet,
        ticket_ttl: float,
        dispatch_delay: float | None,
    ) -> None:
        self.org_id = org_id
        self.smart_router: SmartRouter = _route_everything
        self.base_url = ""
        self.ws_url = ""
        self._sink = sink
        self._tasks = tasks
        self._ticket_ttl = ticket_ttl
        self._dispatch_delay = dispatch_delay
        self._ordinals = itertools.count(1)

        self.users: dict[str, Wire] = {}
        self._keys: dict[str, str] = {}
        self._revoked: set[str] = set()
        self._chats: dict[str, Wire] = {}
        self._members: dict[str, list[str]] = {}
        self._chat_ordinals: dict[str, int] = {}
        self._messages: dict[str, _MessageRecord] = {}
        self._chat_messages: dict[str, list[str]] = {}
        self._idempotency: dict[str, str] = {}
        self._tasks_by_id: dict[str, Wire] = {}
        self._uploads: dict[str, _Upload] = {}
        self._dispatch: dict[str, _DispatchQueue] = {}
        self._sessions: dict[str, dict[str, Wire]] = {}
        self._steps: dict[str, list[Wire]] = {}
        self._configs: dict[str, Wire] = {}
        self._tickets: dict[str, _Ticket] = {}

    # --- ids ----------------------------------------------------------------------

    @staticmethod
    def _new_id(prefix: str) -> str:
        return f"{prefix}{uuid.uuid4().hex[:16]}"

    # --- users and keys -------------------------------------------------------------

    def add_user(self, display_name: str, *, user_id: str | None, type: str) -> Wire:
        """Create a user (``human``, ``agent``...)."""
        if user_id is None:
            user_id = self._new_id("usr_")
        elif user_id in self.users:
            raise ValueError(f"user {user_id!r} already exists")
        user: Wire = {
            "id": user_id,
            "display_name": display_name,
            "type": type,
            "status": "active",
            "avatar_url": None,
        }
        self.users[user_id] = user
        return user

    def add_api_key(self, user_id: str, api_key: str | None) -> str:
        """Give ``user_id`` an API key (generated when ``None``)."""
        self.user(user_id)
        if api_key is None:
            api_key = f"pk_test_{secrets.token_urlsafe(18)}"
        elif not api_key or api_key in self._keys:
            raise ValueError("api_key must be non-empty and not already in use")
        self._keys[api_key] = user_id
        return api_key

    def revoke_key(self, api_key: str) -> str:
        """Revoke a key; return its owner."""
        owner = self._keys.get(api_key)
        if owner is None:
            raise KeyError("unknown API key")
        self._revoked.add(api_key)
        return owner

    def key_owner(self, api_key: str) -> str | None:
        """The user a key belongs to (revoked or not), or ``None``."""
        return self._keys.get(api_key)

    def authenticate(self, api_key: str | None) -> str:
        """The caller behind a key; :class:`Unauthorized` when missing, unknown or revoked."""
        if not api_key:
            raise Unauthorized("missing API key")
        owner = self._keys.get(api_key)
        if owner is None or api_key in self._revoked:
            raise Unauthorized("invalid or revoked API key")
        return owner

    def user(self, user_id: str) -> Wire:
        """A user's wire dict (:class:`NotFound` when unknown)."""
        user = self.users.get(user_id)
        if user is None:
            raise NotFound(f"user {user_id!r} not found")
        return user

    def is_agent(self, user_id: str) -> bool:
        """Whether ``user_id`` is an agent."""
        user = self.users.get(user_id)
        return user is not None and user.get("type") == UserType.AGENT.value

    def _user_summary(self, user_id: str) -> Wire:
        user = self.users.get(user_id, {"id": user_id, "display_name": "", "type": None})
        return {"id": user_id, "display_name": user["display_name"], "type": user["type"]}

    # --- chats ------------------------------------------------------------------------

    def add_chat(
        self,
        *,
        type: str,
        name: str | None,
        members: Sequence[str],
        agent_routing_mode: str | None,
        chat_id: str | None,
    ) -> Wire:
        """Create a chat with these members."""
        for member in members:
            self.user(member)
        if chat_id is None:
            chat_id = self._new_id("cht_")
        elif chat_id in self._chats:
            raise ValueError(f"chat {chat_id!r} already exists")
        stamp = now_text()
        chat: Wire = {
            "id": chat_id,
            "org_id": self.org_id,
            "type": type,
            "name": name,
            "description": None,
            "created_at": stamp,
            "updated_at": stamp,
        }
        if agent_routing_mode is not None:
            chat["agent_routing_mode"] = agent_routing_mode
        self._chats[chat_id] = chat
        self._members[chat_id] = list(dict.fromkeys(members))
        self._chat_ordinals[chat_id] = next(self._ordinals)
        self._chat_messages[chat_id] = []
        return chat

    def chat(self, chat_id: str) -> Wire:
        """A chat's wire dict (:class:`NotFound` when unknown)."""
        chat = self._chats.get(chat_id)
        if chat is None:
            raise NotFound(f"chat {chat_id!r} not found")
        return chat

    def members(self, chat_id: str) -> list[str]:
        """The members of a chat, in the order they joined."""
        self.chat(chat_id)
        return list(self._members[chat_id])

    def add_member(self, chat_id: str, user_id: str) -> Wire:
        """Add a user to a chat's members: the messages posted from now on reach them."""
        self.chat(chat_id)
        self.user(user_id)
        members = self._members[chat_id]
        if user_id in members:
            raise ValueError(f"{user_id!r} is already a member of chat {chat_id!r}")
        members.append(user_id)
        return self._chats[chat_id]

    def visible_chat(self, caller: str, chat_id: str) -> Wire:
        """A chat the caller is a member of (:class:`NotFound` otherwise)."""
        chat = self.chat(chat_id)
        if caller not in self._members[chat_id]:
            raise NotFound(f"chat {chat_id!r} not found")
        return chat

    def chats_of(self, user_id: str) -> list[tuple[int, Wire]]:
        """The chats ``user_id`` is a member of, oldest first, with their ordinals."""
        return [
            (self._chat_ordinals[chat_id], chat)
            for chat_id, chat in self._chats.items()
            if user_id in self._members[chat_id]
        ]

    def update_chat(self, chat_id: str, changes: Mapping[str, Any]) -> Wire:
        """Change a chat's ``type``/``name``/``agent_routing_mode``; ``chat.update`` to members."""
        chat = self.chat(chat_id)
        unknown = set(changes) - set(_CHAT_CHANGE_FIELDS)
        if unknown:
            raise ValueError(f"a chat update may only change {_CHAT_CHANGE_FIELDS}: {unknown}")
        chat.update(changes)
        chat["updated_at"] = _later_than(chat["updated_at"])
        data = {"chat_id": chat_id, "changes": dict(changes)}
        for member in self._members[chat_id]:
            self._sink.emit(member, FRAME_CHAT_UPDATE, data)
        return chat

    # --- messages ---------------------------------------------------------------------

    def _attachment_wire(self, attachment_id: str) -> Wire:
        upload = self._uploads.get(attachment_id)
        if upload is None or not upload.completed:
            raise BadRequest(f"attachment {attachment_id!r} is not a completed upload")
        return {
            "id": upload.id,
            "file_name": upload.file_name,
            "mime_type": upload.mime_type,
            "file_size": upload.file_size,
            "url": self.download_url(upload.id),
        }

    def _check_thread_root(self, chat_id: str, thread_root_id: str) -> None:
        record = self._messages.get(thread_root_id)
        if record is None or record.deleted or record.wire["chat_id"] != chat_id:
            raise BadRequest(f"thread_root_id {thread_root_id!r} is not a message of this chat")

    def create_message(
        self,
        chat_id: str,
        sender_id: str,
        *,
        message_type: str,
        content: Mapping[str, Any],
        thread_root_id: str | None = None,
        hints: Mapping[str, Any] | None = None,
        attachment_ids: Sequence[str] = (),
    ) -> Wire:
        """Store a message from a member, push ``message.new`` to every member, route it."""
        self.user(sender_id)
        if sender_id not in self.members(chat_id):
            raise ValueError(f"{sender_id!r} is not a member of chat {chat_id!r}")
        if thread_root_id is not None:
            self._check_thread_root(chat_id, thread_root_id)
        attachments = [self._attachment_wire(a) for a in attachment_ids]
        message: Wire = {
            "id": self._new_id("msg_"),
            "chat_id": chat_id,
            "sender_id": sender_id,
            "sender": self._user_summary(sender_id),
            "message_type": message_type,
            "content": copy.deepcopy(dict(content)),
            "thread_root_id": thread_root_id,
            "hints": dict(hints) if hints is not None else None,
            "attachment_ids": list(attachment_ids),
            "attachments": attachments,
            "created_at": now_text(),
        }
        self._messages[message["id"]] = _MessageRecord(message, next(self._ordinals))
        self._chat_messages[chat_id].append(message["id"])
        _log.debug("message %s in %s from %s", message["id"], chat_id, sender_id)
        for member in self._members[chat_id]:
            self._sink.emit(member, FRAME_MESSAGE_NEW, message)
        self._route_message(message)
        return message

    def send_message(self, caller: str, chat_id: str, body: Any) -> tuple[Wire, bool]:
        """``POST .../messages``: return (message, created); a seen key answers the first."""
        self.visible_chat(caller, chat_id)
        body = _require_object(body)
        key = body.get("idempotency_key")
        if key is not None:
            if not isinstance(key, str) or not key:
                raise BadRequest("idempotency_key must be a non-empty string")
            if key.startswith(RESERVED_IDEMPOTENCY_PREFIXES):
                raise BadRequest(
                    f"idempotency_key prefixes {RESERVED_IDEMPOTENCY_PREFIXES} are reserved"
                )
            first = self._idempotency.get(key)
            if first is not None:
                return self._messages[first].wire, False
        if body.get("message_type") != MessageType.TEXT.value:
            raise BadRequest('message_type must be "text"')
        content = _require_object(body.get("content"), "content")
        text = content.get("text")
        if not isinstance(text, str):
            raise BadRequest("content.text must be a string")
        mentions = content.get("mentions", [])
        if mentions is None:
            mentions = []
        if not isinstance(mentions, list) or not all(
            isinstance(m, Mapping) and isinstance(m.get("user_id"), str) for m in mentions
        ):
            raise BadRequest("content.mentions must be a list of {user_id}")
        attachment_ids = body.get("attachment_ids") or []
        if not isinstance(attachment_ids, list) or not all(map(_is_str, attachment_ids)):
            raise BadRequest("attachment_ids must be a list of strings")
        thread_root_id = body.get("thread_root_id")
        if thread_root_id is not None and not isinstance(thread_root_id, str):
            raise BadRequest("thread_root_id must be a string")
        hints = body.get("hints")
        if hints is not None:
            hints = _require_object(hints, "hints")
            if not isinstance(hints.get("no_reply", False), bool):
                raise BadRequest("hints.no_reply must be a boolean")
        message = self.create_message(
            chat_id,
            caller,
            message_type=MessageType.TEXT.value,
            content={
                "text": text,
                "mentions": [{"user_id": m["user_id"]} for m in mentions],
            },
            thread_root_id=thread_root_id,
            hints=hints,
            attachment_ids=attachment_ids,
        )
        if key is not None:
            self._idempotency[key] = message["id"]
        return message, True

    def message(self, message_id: str) -> Wire:
        """A message that is not deleted (:class:`NotFound` otherwise)."""
        record = self._messages.get(message_id)
        if record is None or record.deleted:
            raise NotFound(f"message {message_id!r} not found")
        return record.wire

    def visible_message(self, caller: str, message_id: str) -> Wire:
        """A message of a chat the caller is in (:class:`NotFound` otherwise)."""
        message = self.message(message_id)
        if caller not in self._members.get(message["chat_id"], ()):
            raise NotFound(f"message {message_id!r} not found")
        return message

    def chat_messages(self, chat_id: str) -> list[tuple[int, Wire]]:
        """The live messages of a chat, oldest first, with their ordinals."""
        self.chat(chat_id)
        records = (self._messages[m] for m in self._chat_messages[chat_id])
        return [(r.ordinal, r.wire) for r in records if not r.deleted]

    def org_messages(self) -> list[Wire]:
        """Every live message of the org (every chat), in the order posted."""
        return [r.wire for r in self._messages.values() if not r.deleted]

    def idempotency_keys(self) -> dict[str, str]:
        """Every ``idempotency_key`` a send carried, in the order first seen, with the
        id of the message its first use created."""
        return dict(self._idempotency)

    def replies(self, caller: str, message_id: str) -> list[tuple[int, Wire]]:
        """The replies in the thread of a message, oldest first."""
        root = self.visible_message(caller, message_id)
        return [
            (ordinal, wire)
            for ordinal, wire in self.chat_messages(root["chat_id"])
            if wire.get("thread_root_id") == message_id
        ]

    def delete_message(self, message_id: str) -> None:
        """Delete a message: later reads answer 404, lists leave it out."""
        self.message(message_id)
        self._messages[message_id].deleted = True

    # --- dispatch ---------------------------------------------------------------------

    def _delivery_reason(
        self, chat: Mapping[str, Any], message: Mapping[str, Any], agent: str
    ) -> str | None:
        if chat.get("type") == ChatType.DIRECT.value:
            return "direct"
        mode = chat.get("agent_routing_mode") or RoutingMode.PASSIVE.value
        if mode == RoutingMode.ACTIVE.value:
            return "active"
        mentions: list[Any] = []
        if message["message_type"] == MessageType.TEXT.value:
            mentions = (message.get("content") or {}).get("mentions") or []
        if any(m.get("user_id") in (agent, MENTION_ALL_USER_ID) for m in mentions):
            return "mention"
        if mode == RoutingMode.SMART.value and self.smart_router(copy.deepcopy(message), agent):
            return "smart"
        return None

    def _route_message(self, message: Wire) -> None:
        if message["message_type"] not in _MESSAGE_TYPES_DISPATCHED:
            return
        chat = self._chats[message["chat_id"]]
        for member in self._members[message["chat_id"]]:
            if member == message["sender_id"] or not self.is_agent(member):
                continue
            reason = self._delivery_reason(chat, message, member)
            if reason is not None:
                self._queue_dispatch(
                    member,
                    {
                        "event_type": DispatchEventType.MESSAGE.value,
                        "source_type": SourceType.MESSAGE.value,
                        "source_id": message["id"],
                        "chat_id": message["chat_id"],
                    },
                    reason,
                )

    def _queue_dispatch(self, agent: str, fields: Wire, reason: str) -> None:
        if self._dispatch_delay is None:
            self._create_dispatch(agent, fields, reason)
            return

        async def later(delay: float) -> None:
            await asyncio.sleep(delay)
            self._create_dispatch(agent, fields, reason)

        self._tasks.spawn(later(self._dispatch_delay), name=f"dispatch-delay-{agent}")

    def _create_dispatch(self, agent: str, fields: Wire, reason: str) -> Wire:
        queue = self._dispatch.get(agent)
        if queue is None:
            queue = self._dispatch[agent] = _DispatchQueue()
        item: Wire = {
            "id": self._new_id("dsp_"),
            **fields,
            "status": DispatchStatus.PENDING.value,
            "delivery_reason": reason,
            "created_at": now_text(),
        }
        queue.add(_DispatchRecord(item, next(self._ordinals)))
        _log.debug("dispatch item %s for %s (%s)", item["id"], agent, reason)
        self._sink.emit(agent, FRAME_DISPATCH_NEW, item)
        return item

    def dispatch_page(
        self, agent: str, after: int | None, limit: int
    ) -> tuple[list[tuple[int, Wire]], bool]:
        """Up to ``limit`` of the agent's items not yet acked with an ordinal above
        ``after`` (from the first when ``None``), FIFO, with their ordinals; and whether
        more follow."""
        queue = self._dispatch.get(agent)
        if queue is None:
            return [], False
        records, more = queue.page(after, limit)
        return [(r.ordinal, r.wire) for r in records], more

    def pending_dispatch(self, agent: str) -> list[tuple[int, Wire]]:
        """The agent's items not yet acked, FIFO, with their ordinals."""
        queue = self._dispatch.get(agent)
        return [] if queue is None else [(r.ordinal, r.wire) for r in queue.pending_records()]

    def dispatch_records(self, agent: str, *, include_acked: bool) -> list[Wire]:
        """The agent's items, FIFO (acked ones have status ``acked``)."""
        queue = self._dispatch.get(agent)
        if queue is None:
            return []
        return [r.wire for r in queue.records if include_acked or not r.acked]

    def dispatch_count(self, agent: str, *, acked: bool) -> int:
        """How many of the agent's items are pending (or, with ``acked``, acked)."""
        queue = self._dispatch.get(agent)
        if queue is None:
            return 0
        return queue.acked if acked else queue.pending

    @staticmethod
    def _source_of(body: Any) -> tuple[str, str]:
        body = _require_object(body)
        source_type = _require_choice(body.get("source_type"), "source_type", _SOURCE_TYPES)
        return source_type, _require_str(body, "source_id")

    def _matching(self, agent: str, body: Any) -> list[_DispatchRecord]:
        source_type, source_id = self._source_of(body)
        queue = self._dispatch.get(agent)
        return [] if queue is None else queue.by_source(source_type, source_id)

    def ack_by_source(self, agent: str, body: Any) -> int:
        """Ack every pending item of the agent with this source; return how many."""
        source_type, source_id = self._source_of(body)
        queue = self._dispatch.get(agent)
        if queue is None:
            return 0
        records = queue.by_source(source_type, source_id)
        for record in records:
            queue.ack(record)
        return len(records)

    def ack_by_id(self, agent: str, dispatch_id: str) -> int:
        """Ack one item of the agent (acking an acked item is fine); return 1."""
        queue = self._dispatch.get(agent)
        record = None if queue is None else queue.by_id(dispatch_id)
        if queue is None or record is None:
            raise NotFound(f"dispatch item {dispatch_id!r} not found")
        queue.ack(record)
        return 1

    def mark_received(self, agent: str, body: Any) -> int:
        """Mark the agent's pending items with this source ``received``; return how many."""
        records = self._matching(agent, body)
        for record in records:
            record.wire["status"] = DispatchStatus.RECEIVED.value
        return len(records)

    def age_dispatch(self, seconds: float, agent: str | None) -> None:
        """Move ``created_at`` of pending items back by ``seconds``."""
        agents = [agent] if agent is not None else list(self._dispatch)
        for each in agents:
            queue = self._dispatch.get(each)
            for record in [] if queue is None else queue.pending_records():
                created = parse_datetime(record.wire["created_at"])
                record.wire["created_at"] = format_datetime(created - timedelta(seconds=seconds))

    # --- tasks ------------------------------------------------------------------------

    def task(self, task_id: str) -> Wire:
        """A task (:class:`NotFound` when unknown or deleted)."""
        task = self._tasks_by_id.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id!r} not found")
        return task

    def _announce_assignment(self, task: Wire) -> None:
        assignee = task["assignee_id"]
        self._sink.emit(assignee, FRAME_TASK_ASSIGNED, task)
        if self.is_agent(assignee):
            self._queue_dispatch(
                assignee,
                {
                    "event_type": DispatchEventType.TASK_ASSIGN.value,
                    "source_type": SourceType.TASK_ACTIVITY.value,
                    "source_id": task["id"],
                    "task_id": task["id"],
                },
                _TASK_DELIVERY_REASON,
            )

    def assign_task(
        self,
        title: str,
        *,
        assignee_id: str,
        creator_id: str,
        status: str,
        priority: str,
        description: str | None,
        identifier: str | None,
        task_id: str | None,
    ) -> Wire:
        """Create a task for ``assignee_id`` (or reassign task ``task_id`` to them)."""
        self.user(assignee_id)
        if task_id is not None and task_id in self._tasks_by_id:
            task = self._tasks_by_id[task_id]
            task["assignee_id"] = assignee_id
            task["updated_at"] = _later_than(task["updated_at"])
        else:
            self.user(creator_id)
            self._check_task_values({"status": status, "priority": priority})
            stamp = now_text()
            task = {
                "id": task_id if task_id is not None else self._new_id("tsk_"),
                "org_id": self.org_id,
                "identifier": identifier,
                "title": title,
                "description": description,
                "status": status,
                "priority": priority,
                "assignee_id": assignee_id,
                "creator_id": creator_id,
                "created_at": stamp,
                "updated_at": stamp,
            }
            self._tasks_by_id[task["id"]] = task
        self._announce_assignment(task)
        return task

    def _check_task_values(self, changes: Mapping[str, Any]) -> None:
        if "title" in changes and not isinstance(changes["title"], str):
            raise BadRequest("title must be a string")
        if "status" in changes:
            _require_choice(changes["status"], "status", _TASK_STATUSES)
        if "priority" in changes:
            _require_choice(changes["priority"], "priority", _TASK_PRIORITIES)
        description = changes.get("description")
        if description is not None and not isinstance(description, str):
            raise BadRequest("description must be a string or null")
        assignee = changes.get("assignee_id")
        if assignee is not None and (not isinstance(assignee, str) or assignee not in self.users):
            raise BadRequest("assignee_id must be the id of a user or null")

    def update_task(self, task_id: str, body: Any) -> Wire:
        """``PATCH`` a task: known fields only, ``null`` clears; a new assignee is announced."""
        task = self.task(task_id)
        changes = {k: v for k, v in _require_object(body).items() if k in _TASK_FIELDS}
        self._check_task_values(changes)
        previous_assignee = task["assignee_id"]
        task.update(changes)
        task["updated_at"] = _later_than(task["updated_at"])
        if task["assignee_id"] is not None and task["assignee_id"] != previous_assignee:
            self._announce_assignment(task)
        return task

    def delete_task(self, task_id: str) -> None:
        """Delete a task: later reads answer 404."""
        self.task(task_id)
        del self._tasks_by_id[task_id]

    # --- uploads ------------------------------------------------------------------------

    def upload_url(self, upload: _Upload) -> str:
        """The absolute pre-signed upload URL of an attachment."""
        path = UPLOAD_ROUTE.format(attachment_id=upload.id)
        return f"{self.base_url}{path}?sig={upload.upload_sig}"

    def download_url(self, attachment_id: str) -> str:
        """The absolute download URL of an attachment."""
        upload = self._uploads[attachment_id]
        path = DOWNLOAD_ROUTE.format(attachment_id=upload.id)
        return f"{self.base_url}{path}?sig={upload.download_sig}"

    def presign(self, caller: str, body: Any) -> Wire:
        """``POST upload/presign``: reserve an attachment id and an upload URL."""
        body = _require_object(body)
        file_name = _require_str(body, "file_name")
        mime_type = _require_str(body, "mime_type")
        file_size = body.get("file_size")
        if not isinstance(file_size, int) or isinstance(file_size, bool) or file_size < 0:
            raise BadRequest("file_size must be a non-negative integer")
        upload = _Upload(
            id=self._new_id("att_"),
            file_name=file_name,
            mime_type=mime_type,
            file_size=file_size,
            upload_sig=secrets.token_urlsafe(12),
            download_sig=secrets.token_urlsafe(12),
            created_by=caller,
        )
        self._uploads[upload.id] = upload
        return {"attachment_id": upload.id, "upload_url": self.upload_url(upload)}

    def _signed_upload(self, attachment_id: str, sig: str | None, *, download: bool) -> _Upload:
        upload = self._uploads.get(attachment_id)
        expected = (
            None if upload is None else (upload.download_sig if download else upload.upload_sig)
        )
        if upload is None or sig is None or not secrets.compare_digest(sig, expected or ""):
            raise Forbidden("signature does not match")
        return upload

    def put_upload(
        self,
        attachment_id: str,
        sig: str | None,
        data: bytes,
        content_type: str | None,
        *,
        has_authorization: bool,
    ) -> None:
        """The ``PUT`` to a pre-signed URL: store the bytes."""
        if has_authorization:
            raise BadRequest(
                "a pre-signed upload URL takes no Authorization header"
                " (only one auth mechanism allowed)"
            )
        upload = self._signed_upload(attachment_id, sig, download=False)
        if upload.completed:
            raise Conflict(f"attachment {attachment_id!r} is already completed")
        if _media_type(content_type) != _media_type(upload.mime_type):
            raise BadRequest(
                f"Content-Type {content_type!r} does not match"
                f" the presigned mime_type {upload.mime_type!r}"
            )
        if len(data) != upload.file_size:
            raise BadRequest(
                f"body is {len(data)} bytes, the presigned file_size is {upload.file_size}"
            )
        upload.data = data
        upload.content_type = content_type

    def complete_upload(self, body: Any) -> Wire:
        """``POST upload/complete``: the uploaded attachment becomes usable."""
        attachment_id = _require_str(_require_object(body), "attachment_id")
        upload = self._uploads.get(attachment_id)
        if upload is None:
            raise NotFound(f"attachment {attachment_id!r} not found")
        if upload.data is None:
            raise BadRequest(f"attachment {attachment_id!r} has not been uploaded")
        upload.completed = True
        return self._attachment_wire(attachment_id)

    def add_attachment(self, data: bytes, *, file_name: str, mime_type: str) -> str:
        """Store a completed upload directly; return its id."""
        upload = _Upload(
            id=self._new_id("att_"),
            file_name=file_name,
            mime_type=mime_type,
            file_size=len(data),
            upload_sig=secrets.token_urlsafe(12),
            download_sig=secrets.token_urlsafe(12),
            data=bytes(data),
            content_type=mime_type,
            completed=True,
        )
        self._uploads[upload.id] = upload
        return upload.id

    def file_url(self, attachment_id: str) -> Wire:
        """``GET files/{id}/url``: the download URL of a completed attachment."""
        upload = self._uploads.get(attachment_id)
        if upload is None or not upload.completed:
            raise NotFound(f"attachment {attachment_id!r} not found")
        return {"url": self.download_url(attachment_id)}

    def download(self, attachment_id: str, sig: str | None) -> tuple[bytes, str]:
        """The bytes and MIME type behind a download URL."""
        upload = self._signed_upload(attachment_id, sig, download=True)
        if upload.data is None or not upload.completed:
            raise NotFound(f"attachment {attachment_id!r} not found")
        return upload.data, upload.mime_type

    def uploaded_bytes(self, attachment_id: str) -> bytes:
        """The bytes stored for an attachment (:class:`NotFound` when none)."""
        upload = self._uploads.get(attachment_id)
        if upload is None or upload.data is None:
            raise NotFound(f"no bytes stored for attachment {attachment_id!r}")
        return upload.data

    def uploads(self) -> list[_Upload]:
        """Every attachment, presigned or stored, in the order created."""
        return list(self._uploads.values())

    def upload(self, attachment_id: str) -> _Upload:
        """One attachment (:class:`NotFound` when unknown)."""
        upload = self._uploads.get(attachment_id)
        if upload is None:
            raise NotFound(f"attachment {attachment_id!r} not found")
        return upload

    # --- WebSocket tickets --------------------------------------------------------------

    def issue_ticket(self, caller: str, api_key: str) -> Wire:
        """``POST ws/ticket``: a single-use ticket valid for ``ticket_ttl`` seconds."""
        ticket = f"wst_{secrets.token_urlsafe(24)}"
        self._tickets[ticket] = _Ticket(caller, api_key, time.monotonic() + self._ticket_ttl)
        expires_at = format_datetime(_now() + timedelta(seconds=self._ticket_ttl))
        return {"ticket": ticket, "ws_url": self.ws_url, "expires_at": expires_at}

    def redeem_ticket(self, ticket: str) -> tuple[str, str, bool]:
        """Use up a ticket; return (its user, the key it was issued to, whether that key
        was revoked since)."""
        record = self._tickets.pop(ticket, None)
        if record is None or time.monotonic() > record.expires:
            raise InvalidTicket("invalid, used or expired ticket")
        return record.user_id, record.api_key, record.api_key in self._revoked

    # --- agent sessions, steps, config ---------------------------------------------------

    def create_session(self, agent: str, body: Any) -> Wire:
        """``POST .../sessions``: a new ``active`` session."""
        body = _require_object(body)
        runtime_ref = body.get("runtime_ref")
        if runtime_ref is not None and not isinstance(runtime_ref, Mapping):
            raise BadRequest("runtime_ref must be an object")
        sessions = self._sessions.setdefault(agent, {})
        session: Wire = {
            "id": self._new_id("ses_"),
            "status": AgentSessionStatus.ACTIVE.value,
            "runtime_type": _require_str(body, "runtime_type"),
            "runtime_key": _require_str(body, "runtime_key"),
            "runtime_ref": copy.deepcopy(runtime_ref),
            "created_at": now_text(),
        }
        sessions[session["id"]] = session
        return session

    def session(self, agent: str, session_id: str) -> Wire:
        """One of the agent's sessions (:class:`NotFound` otherwise)."""
        session = self._sessions.get(agent, {}).get(session_id)
        if session is None:
            raise NotFound(f"session {session_id!r} not found")
        return session

    def update_session(self, agent: str, session_id: str, body: Any) -> Wire:
        """``PATCH .../sessions/{id}``: change the status."""
        session = self.session(agent, session_id)
        status = _require_choice(_require_object(body).get("status"), "status", _SESSION_STATUSES)
        session["status"] = status
        return session

    def sessions_of(self, agent: str) -> list[Wire]:
        """The agent's sessions, oldest first."""
        return list(self._sessions.get(agent, {}).values())

    def create_step(self, agent: str, session_id: str, body: Any) -> Wire:
        """``POST .../steps``: record the step as sent, plus ``id``, ``session_id``
        and ``created_at``."""
        self.session(agent, session_id)
        body = _require_object(body)
        if not isinstance(body.get("step_type"), str):
            raise BadRequest("step_type must be a string")
        if not isinstance(body.get("content"), Mapping):
            raise BadRequest("content must be an object")
        steps = self._steps.setdefault(agent, [])
        step: Wire = {
            **copy.deepcopy(dict(body)),
            "id": self._new_id("stp_"),
            "session_id": session_id,
            "created_at": now_text(),
        }
        steps.append(step)
        return step

    def step_count(self, agent: str) -> int:
        """How many steps the agent wrote."""
        return len(self._steps.get(agent, ()))

    def steps_of(self, agent: str, session_id: str | None) -> list[Wire]:
        """The agent's steps in arrival order (of one session, or all)."""
        steps = self._steps.get(agent, [])
        return [s for s in steps if session_id is None or s["session_id"] == session_id]

    def agent_config(self, agent: str) -> Wire:
        """The agent's platform config."""
        return self._configs.get(agent) or copy.deepcopy(dict(DEFAULT_AGENT_CONFIG))

    def set_agent_config(self, agent: str, settings: Mapping[str, Any]) -> Wire:
        """Replace the agent's settings, bump the version, push ``agent_config.update``."""
        version = int(self.agent_config(agent)["version"]) + 1
        config: Wire = {**copy.deepcopy(dict(settings)), "version": version}
        self._configs[agent] = config
        self._sink.emit(agent, FRAME_AGENT_CONFIG_UPDATE, {"version": version})
        return config
