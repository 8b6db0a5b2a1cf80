"""Records the emulator keeps for inspection by tests: requests, client frames,
WebSocket connections, uploads, and the agent accounts it seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

from ..models import User

__all__ = ["AgentAccount", "ClientFrame", "RecordedRequest", "UploadRecord", "WsConnectionRecord"]


def _redact(_: object) -> str:
    return "'***'"


def _size(data: bytes | None) -> str:
    return "None" if data is None else f"<{len(data)} bytes>"


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
        received_at: when the request arrived (UTC), before any simulated latency or
            injected delay: the gaps between a client's retries are measured on it.
        answered_at: when the answer was ready, or the connection dropped (UTC).
    """

    method: str
    path: str
    query: Mapping[str, str]
    json: Any
    user_id: str | None
    status: int | None
    received_at: datetime
    answered_at: datetime


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
        ticket: the ``ticket`` query value the upgrade carried (``None`` when absent):
            compare it with the ticket a client was issued. Tickets are single-use,
            so keeping it gives nothing away.
        query: every query parameter of the upgrade request (the last value of a
            repeated name wins).
        headers: the upgrade request's headers; the value of an ``Authorization``
            header is kept as ``"***"`` (the protocol wants none: the ticket is the
            credential), never as sent.
    """

    user_id: str | None
    last_seq: int | None
    opened_at: datetime
    ticket_ok: bool = False
    closed_code: int | None = None
    session_id: str | None = None
    ticket: str | None = None
    query: Mapping[str, str] = attrs.field(factory=dict)
    headers: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class UploadRecord:
    """An attachment as the emulator holds it: presigned by a client, or stored with
    :meth:`~parall_bridge.testing.FakeParallServer.add_attachment`.

    Attributes:
        attachment_id: the attachment's id.
        file_name: the file name given at presign.
        mime_type: the MIME type given at presign.
        file_size: the size given at presign, in bytes.
        content_type: the ``Content-Type`` header the bytes were uploaded with, as sent
            (parameters included), or ``None`` until they are.
        data: the bytes uploaded, or ``None`` until they are.
        completed: whether ``upload/complete`` made it usable.
        created_by: the user whose key presigned it (``None`` for an attachment the
            test stored).
    """

    attachment_id: str
    file_name: str
    mime_type: str
    file_size: int
    content_type: str | None
    data: bytes | None = attrs.field(repr=_size)
    completed: bool
    created_by: str | None


@attrs.frozen
class AgentAccount:
    """An agent user seeded into the emulator, with its API key (redacted in the repr)."""

    user: User
    api_key: str = attrs.field(repr=_redact)

    @property
    def user_id(self) -> str:
        """The agent's user id."""
        return self.user.id
