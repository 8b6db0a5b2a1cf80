"""The Parall wire protocol as named constants: REST endpoints, WebSocket frame
types, close codes and reserved names.

This is the one module that spells out paths, frame names and wire-level
literals of ``PROTOCOL.md``; the client, the WebSocket client, the gateway
and the emulator in :mod:`parall_bridge.testing` all read them from here, so a
correction to the protocol is a one-line change.

Path templates use ``{name}`` placeholders, the syntax of both
:meth:`str.format` and aiohttp's router, so the emulator registers exactly the
paths the client requests.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

import attrs

__all__ = [
    "ACK_DISPATCH",
    "ACK_DISPATCH_BY_ID",
    "AGENT_CONFIG",
    "AGENT_ME",
    "API_PREFIX",
    "CHAT_ID_PREFIX",
    "CLOSE_FORBIDDEN",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_INVALID_TICKET",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_RATE_LIMITED",
    "CLOSE_SERVICE_RESTART",
    "CLOSE_TRY_AGAIN_LATER",
    "COMPLETE_UPLOAD",
    "CREATE_AGENT_SESSION",
    "CREATE_AGENT_STEP",
    "FRAME_AGENT_CONFIG_UPDATE",
    "FRAME_AGENT_HEARTBEAT",
    "FRAME_CHAT_UPDATE",
    "FRAME_DISPATCH_NEW",
    "FRAME_HELLO",
    "FRAME_MESSAGE_NEW",
    "FRAME_PING",
    "FRAME_PONG",
    "FRAME_RECOVERY_OVERFLOW",
    "FRAME_TASK_ASSIGNED",
    "FRAME_TYPING",
    "GET_CHAT",
    "GET_FILE_URL",
    "GET_MESSAGE",
    "GET_TASK",
    "HEADER_AUTHORIZATION",
    "HEADER_RETRY_AFTER",
    "IDEMPOTENCY_PREFIX",
    "LIST_CHATS",
    "LIST_CHAT_MESSAGES",
    "LIST_DISPATCH",
    "LIST_MEMBER_CHATS",
    "LIST_REPLIES",
    "MARK_DISPATCH_RECEIVED",
    "ME",
    "MENTION_ALL_USER_ID",
    "PRESIGN_UPLOAD",
    "QUERY_BEFORE",
    "QUERY_CURSOR",
    "QUERY_LAST_SEQ",
    "QUERY_LIMIT",
    "QUERY_TICKET",
    "RESERVED_IDEMPOTENCY_PREFIXES",
    "SEND_MESSAGE",
    "UPDATE_AGENT_SESSION",
    "UPDATE_TASK",
    "WS_PATH",
    "WS_TICKET",
    "Endpoint",
]

API_PREFIX: Final = "/api/v1"
"""Every REST path starts with this."""


@attrs.frozen
class Endpoint:
    """One REST operation: an HTTP method and a path template.

    ``path`` holds ``{name}`` placeholders; :meth:`format` fills them with
    URL-encoded values (every id is opaque and may hold any character).
    """

    method: str
    path: str

    def format(self, **params: str) -> str:
        """Return the path with each placeholder replaced by its URL-encoded value."""
        return self.path.format(**{k: quote(str(v), safe="") for k, v in params.items()})

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


# --- identity -----------------------------------------------------------------
ME: Final = Endpoint("GET", f"{API_PREFIX}/users/me")
AGENT_ME: Final = Endpoint("GET", f"{API_PREFIX}/orgs/{{org_id}}/agents/me")

# --- chats and messages -------------------------------------------------------
LIST_CHATS: Final = Endpoint("GET", f"{API_PREFIX}/orgs/{{org_id}}/chats")
GET_CHAT: Final = Endpoint("GET", f"{API_PREFIX}/orgs/{{org_id}}/chats/{{chat_id}}")
LIST_MEMBER_CHATS: Final = Endpoint(
    "GET", f"{API_PREFIX}/orgs/{{org_id}}/members/{{user_id}}/chats"
)
LIST_CHAT_MESSAGES: Final = Endpoint(
    "GET", f"{API_PREFIX}/orgs/{{org_id}}/chats/{{chat_id}}/messages"
)
SEND_MESSAGE: Final = Endpoint("POST", f"{API_PREFIX}/orgs/{{org_id}}/chats/{{chat_id}}/messages")
GET_MESSAGE: Final = Endpoint("GET", f"{API_PREFIX}/messages/{{message_id}}")
LIST_REPLIES: Final = Endpoint("GET", f"{API_PREFIX}/messages/{{message_id}}/replies")

# --- tasks --------------------------------------------------------------------
GET_TASK: Final = Endpoint("GET", f"{API_PREFIX}/orgs/{{org_id}}/tasks/{{task_id}}")
UPDATE_TASK: Final = Endpoint("PATCH", f"{API_PREFIX}/orgs/{{org_id}}/tasks/{{task_id}}")

# --- files --------------------------------------------------------------------
PRESIGN_UPLOAD: Final = Endpoint("POST", f"{API_PREFIX}/orgs/{{org_id}}/upload/presign")
COMPLETE_UPLOAD: Final = Endpoint("POST", f"{API_PREFIX}/orgs/{{org_id}}/upload/complete")
GET_FILE_URL: Final = Endpoint("GET", f"{API_PREFIX}/files/{{attachment_id}}/url")

# --- WebSocket ticket ---------------------------------------------------------
WS_TICKET: Final = Endpoint("POST", f"{API_PREFIX}/ws/ticket")

# --- dispatch queue -----------------------------------------------------------
LIST_DISPATCH: Final = Endpoint("GET", f"{API_PREFIX}/orgs/{{org_id}}/dispatch")
ACK_DISPATCH: Final = Endpoint("POST", f"{API_PREFIX}/orgs/{{org_id}}/dispatch/ack")
ACK_DISPATCH_BY_ID: Final = Endpoint(
    "POST", f"{API_PREFIX}/orgs/{{org_id}}/dispatch/{{dispatch_id}}/ack"
)
MARK_DISPATCH_RECEIVED: Final = Endpoint("POST", f"{API_PREFIX}/orgs/{{org_id}}/dispatch/received")

# --- agent sessions, steps, config --------------------------------------------
CREATE_AGENT_SESSION: Final = Endpoint(
    "POST", f"{API_PREFIX}/orgs/{{org_id}}/agents/{{agent_id}}/sessions"
)
UPDATE_AGENT_SESSION: Final = Endpoint(
    "PATCH", f"{API_PREFIX}/orgs/{{org_id}}/agents/{{agent_id}}/sessions/{{session_id}}"
)
CREATE_AGENT_STEP: Final = Endpoint(
    "POST", f"{API_PREFIX}/orgs/{{org_id}}/agents/{{agent_id}}/sessions/{{session_id}}/steps"
)
AGENT_CONFIG: Final = Endpoint("GET", f"{API_PREFIX}/orgs/{{org_id}}/agents/{{agent_id}}/config")

# --- query parameters and headers ---------------------------------------------
QUERY_LIMIT: Final = "limit"
QUERY_CURSOR: Final = "cursor"
QUERY_BEFORE: Final = "before"
HEADER_AUTHORIZATION: Final = "Authorization"
HEADER_RETRY_AFTER: Final = "Retry-After"

# --- WebSocket ----------------------------------------------------------------
WS_PATH: Final = "/ws"
"""Path of the WebSocket endpoint when neither the ticket nor the caller names a URL."""
QUERY_TICKET: Final = "ticket"
QUERY_LAST_SEQ: Final = "last_seq"

# Server frames.
FRAME_HELLO: Final = "hello"
FRAME_PONG: Final = "pong"
FRAME_RECOVERY_OVERFLOW: Final = "recovery.overflow"
FRAME_MESSAGE_NEW: Final = "message.new"
FRAME_CHAT_UPDATE: Final = "chat.update"
FRAME_TASK_ASSIGNED: Final = "task.assigned"
FRAME_AGENT_CONFIG_UPDATE: Final = "agent_config.update"
FRAME_DISPATCH_NEW: Final = "dispatch.new"
# Client frames.
FRAME_PING: Final = "ping"
FRAME_TYPING: Final = "typing"
FRAME_AGENT_HEARTBEAT: Final = "agent.heartbeat"

# Close codes.
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_TRY_AGAIN_LATER: Final = 1013
CLOSE_INVALID_TICKET: Final = 4001
"""Invalid or expired ticket: reconnect at once with a new ticket."""
CLOSE_FORBIDDEN: Final = 4003
"""Forbidden (key revoked): fatal, stop and raise."""
CLOSE_RATE_LIMITED: Final = 4008
"""Rate limited: reconnect after backoff."""

# --- names --------------------------------------------------------------------
MENTION_ALL_USER_ID: Final = "usr_all"
"""The user id of an ``@all`` mention."""
CHAT_ID_PREFIX: Final = "cht_"
"""Chat ids start with this; the gateway tells chats from tasks by it."""
IDEMPOTENCY_PREFIX: Final = "pb:"
"""Prefix of every idempotency key this library generates."""
RESERVED_IDEMPOTENCY_PREFIXES: Final = ("reply:", "task_update:")
"""Idempotency key prefixes reserved by the platform; a client never uses them."""
