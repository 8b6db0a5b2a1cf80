"""Records the emulator keeps for inspection by tests: requests, client frames,
WebSocket connections, and the agent accounts it seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

from ..models import User

__all__ = ["AgentAccount", "ClientFrame", "RecordedRequest", "WsConnectionRecord"]


def _redact(_: object) -> str:
    return "'***'"


@attrs.frozen
class RecordedRequest:
    """One HTTP request the emulator answered (or dropped), in the order answered.

    The ``Authorization`` header is never stored.

    Attributes:
        method: the HTTP method.
        path: the request path as received (still percent-encoded), without the query.
        query: the query parameters (the last value of a repeated name wins).
        json: the parsed JSON body, or ``None`` when the body was empty or not JSON.
        user_id: the owner of the API key the request carried, or ``None``.
        status: the status answered, or ``None`` when the connection was dropped.
    """

    method: str
    path: str
    query: Mapping[str, str]
    json: Any
    user_id: str | None
    status: int | None


@attrs.frozen
class ClientFrame:
    """One WebSocket frame received from a client.

    Attributes:
        user_id: the user whose ticket opened the connection.
        type: the frame's ``type``, or ``None`` when the frame was not a JSON
            object with a string ``type``.
        data: the frame's ``data`` object (``{}`` when absent or not an object).
        raw: the frame's text as received.
    """

    user_id: str
    type: str | None
    data: Mapping[str, Any]
    raw: str


@attrs.define
class WsConnectionRecord:
    """One WebSocket upgrade the emulator accepted (refused upgrades are not recorded).

    Attributes:
        user_id: the ticket's user, or ``None`` when the ticket was invalid.
        last_seq: the ``last_seq`` query value, or ``None`` when absent or not an integer.
        opened_at: when the upgrade completed (UTC).
        ticket_ok: whether the ticket was valid (the connection got past the ticket check).
        closed_code: the close code (the server's when it closed the connection,
            else the client's); ``None`` while the connection is open.
        session_id: the ``session_id`` sent in ``hello`` (``None`` before it).
    """

    user_id: str | None
    last_seq: int | None
    opened_at: datetime
    ticket_ok: bool = False
    closed_code: int | None = None
    session_id: str | None = None


@attrs.frozen
class AgentAccount:
    """An agent user seeded into the emulator, with its API key (redacted in the repr)."""

    user: User
    api_key: str = attrs.field(repr=_redact)

    @property
    def user_id(self) -> str:
        """The agent's user id."""
        return self.user.id
