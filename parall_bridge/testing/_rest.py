"""The emulator's REST side: one handler per row of PROTOCOL.md's REST table,
registered from the :mod:`parall_bridge.protocol` constants, behind one
middleware that authenticates, records every request and applies REST faults.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from ..protocol import (
    ACK_DISPATCH,
    ACK_DISPATCH_BY_ID,
    AGENT_CONFIG,
    AGENT_ME,
    API_PREFIX,
    COMPLETE_UPLOAD,
    CREATE_AGENT_SESSION,
    CREATE_AGENT_STEP,
    GET_CHAT,
    GET_FILE_URL,
    GET_MESSAGE,
    GET_TASK,
    HEADER_AUTHORIZATION,
    HEADER_RETRY_AFTER,
    LIST_CHAT_MESSAGES,
    LIST_CHATS,
    LIST_DISPATCH,
    LIST_MEMBER_CHATS,
    LIST_REPLIES,
    MARK_DISPATCH_RECEIVED,
    ME,
    PRESIGN_UPLOAD,
    QUERY_BEFORE,
    QUERY_CURSOR,
    QUERY_LIMIT,
    SEND_MESSAGE,
    UPDATE_AGENT_SESSION,
    UPDATE_TASK,
    WS_PATH,
    WS_TICKET,
    Endpoint,
)
from ._faults import Fault, FaultInjector
from ._records import RecordedRequest
from ._state import (
    DOWNLOAD_ROUTE,
    UPLOAD_ROUTE,
    BadRequest,
    EmulatorError,
    EmulatorState,
    Forbidden,
    NotFound,
    Wire,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "RestApi",
    "canonical_error",
    "fault_response",
    "malformed_response",
    "parse_json",
]

_log = logging.getLogger("parall_bridge.testing.rest")

DEFAULT_PAGE_SIZE: Final = 50
"""Page size when a list request gives no ``limit``."""
MAX_BODY_SIZE: Final = 64 * 1024 * 1024
"""Largest request body the emulator reads (uploads included)."""
MALFORM_CHUNK: Final = 64 * 1024
"""Bytes written at a time for a ``malform`` fault with a ``size``."""

_ERROR_CODES: Final = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}
_CURSOR_TAG: Final = "pbc1:"

_CALLER: Final = web.RequestKey("parall_bridge_testing_caller", str)
_API_KEY: Final = web.RequestKey("parall_bridge_testing_api_key", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- responses ------------------------------------------------------------------


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def canonical_error(
    status: int, message: str, code: str | None = None, *, headers: dict[str, str] | None = None
) -> web.Response:
    """An error response in the canonical form ``{"error": {"code", "message", "status"}}``."""
    body = {
        "error": {
            "code": code or _ERROR_CODES.get(status, "ERROR"),
            "message": message,
            "status": status,
        }
    }
    return web.json_response(body, status=status, headers=headers)


def _retry_after_text(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return f"{value:g}"


def fault_response(fault: Fault) -> web.Response:
    """The error answer of an injected ``fail`` fault, in its body form."""
    status = fault.status
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers[HEADER_RETRY_AFTER] = _retry_after_text(fault.retry_after)
    text = f"injected fault: {status} {_phrase(status)}"
    if fault.body_form == "canonical":
        return canonical_error(status, text, headers=headers)
    if fault.body_form == "legacy":
        return web.json_response({"error": text}, status=status, headers=headers)
    if fault.body_form == "message":
        return web.json_response({"message": text}, status=status, headers=headers)
    if fault.body_form == "html":
        title = f"{status} {_phrase(status)}"
        page = (
            f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
            f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
            "</body>\r\n</html>\r\n"
        )
        return web.Response(status=status, text=page, content_type="text/html", headers=headers)
    return web.Response(status=status, headers=headers)


async def malformed_response(request: web.Request, fault: Fault) -> web.StreamResponse | None:
    """The raw answer of a ``malform`` fault (see :meth:`FaultInjector.malform_next`);
    ``None`` when the connection was dropped (truncated, or the client hung up)."""
    data = fault.body.encode()
    if fault.size is None and not fault.truncated:
        return web.Response(
            status=fault.status,
            body=data,
            content_type=None,
            headers={"Content-Type": fault.content_type},
        )
    size = len(data) if fault.size is None else fault.size
    response = web.StreamResponse(status=fault.status, headers={"Content-Type": fault.content_type})
    if fault.truncated:
        response.content_length = size
    else:
        response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        await _write_repeated(response, data, size // 2 if fault.truncated else size)
        if not fault.truncated:
            await response.write_eof()
            return response
    except ConnectionError:
        pass  # the client hung up (past its size cap): nothing more to send
    if request.transport is not None:
        request.transport.abort()
    return None


async def _write_repeated(response: web.StreamResponse, pattern: bytes, size: int) -> None:
    """Write ``size`` bytes of ``pattern`` repeated, one chunk at a time."""
    block = pattern * max(1, MALFORM_CHUNK // len(pattern))
    while size > 0:
        chunk = block if size >= len(block) else (pattern * (size // len(pattern) + 1))[:size]
        await response.write(chunk)
        size -= len(chunk)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


# --- pagination ------------------------------------------------------------------


def _encode_cursor(ordinal: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_TAG}{ordinal}".encode()).decode().rstrip("=")


def _decode_cursor(text: str) -> int:
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        decoded = raw.decode("ascii")
        if not decoded.startswith(_CURSOR_TAG):
            raise ValueError(decoded)
        return int(decoded[len(_CURSOR_TAG) :])
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("invalid cursor") from exc


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get(HEADER_AUTHORIZATION)
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def parse_json(raw: bytes) -> Any:
    """The decoded body, ``None`` when empty; raises ``ValueError`` when not JSON (also
    for ``NaN`` and ``Infinity``, which Python's parser takes but JSON has not)."""
    return json.loads(raw, parse_constant=_reject_constant) if raw.strip() else None


async def _body(request: web.Request) -> Any:
    """The JSON body (``None`` when empty); :class:`BadRequest` when not JSON."""
    try:
        return parse_json(await request.read())
    except ValueError as exc:
        raise BadRequest("body is not valid JSON") from exc


def _recorded_json(raw: bytes) -> Any:
    try:
        return parse_json(raw)
    except ValueError:
        return None


class RestApi:
    """The REST handlers of one emulator."""

    def __init__(
        self,
        *,
        state: EmulatorState,
        faults: FaultInjector,
        requests: list[RecordedRequest] | None,
        max_page_size: int,
        include_ws_url_in_ticket: bool,
        closing: asyncio.Event,
        latency: float = 0.0,
    ) -> None:
        self._state = state
        self._faults = faults
        self._requests = requests
        self._latency = latency
        self._max_page_size = max_page_size
        self._include_ws_url = include_ws_url_in_ticket
        self._closing = closing
        self._endpoints: dict[tuple[str, str], Endpoint] = {}

    def register(self, app: web.Application) -> None:
        """Add every protocol route, the private upload/download routes and the middleware."""
        routes: Sequence[tuple[Endpoint, Handler]] = [
            (ME, self.me),
            (AGENT_ME, self.agent_me),
            (LIST_CHATS, self.list_chats),
            (GET_CHAT, self.get_chat),
            (LIST_MEMBER_CHATS, self.list_member_chats),
            (LIST_CHAT_MESSAGES, self.list_chat_messages),
            (SEND_MESSAGE, self.send_message),
            (GET_MESSAGE, self.get_message),
            (LIST_REPLIES, self.list_replies),
            (GET_TASK, self.get_task),
            (UPDATE_TASK, self.update_task),
            (PRESIGN_UPLOAD, self.presign_upload),
            (COMPLETE_UPLOAD, self.complete_upload),
            (GET_FILE_URL, self.get_file_url),
            (WS_TICKET, self.ws_ticket),
            (LIST_DISPATCH, self.list_dispatch),
            (ACK_DISPATCH, self.ack_dispatch),
            (ACK_DISPATCH_BY_ID, self.ack_dispatch_by_id),
            (MARK_DISPATCH_RECEIVED, self.mark_received),
            (CREATE_AGENT_SESSION, self.create_session),
            (UPDATE_AGENT_SESSION, self.update_session),
            (CREATE_AGENT_STEP, self.create_step),
            (AGENT_CONFIG, self.agent_config),
        ]
        for endpoint, handler in routes:
            app.router.add_route(endpoint.method, endpoint.path, handler)
            self._endpoints[(endpoint.method, endpoint.path)] = endpoint
        app.router.add_route("PUT", UPLOAD_ROUTE, self.upload_bytes)
        app.router.add_route("GET", DOWNLOAD_ROUTE, self.download_bytes)
        app.middlewares.append(self.middleware)

    # --- middleware ------------------------------------------------------------------

    def _endpoint_of(self, request: web.Request) -> Endpoint | None:
        resource = request.match_info.route.resource
        if resource is None:
            return None
        return self._endpoints.get((request.method, resource.canonical))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record the request, apply its fault, authenticate ``/api/v1`` calls, map errors."""
        if request.path == WS_PATH:
            return await handler(request)
        received_at = datetime.now(UTC)
        endpoint = self._endpoint_of(request)
        raw = await request.read()
        api_key = _bearer(request)
        status: int | None = None
        try:
            if self._latency:
                # The simulated round trip: the request is acted on and answered this
                # much later, as over a network (faults and errors included).
                await asyncio.sleep(self._latency)
            fault = self._faults.take(endpoint) if endpoint is not None else None
            response = await self._respond(request, handler, fault, api_key)
            if response is None:
                return web.Response()  # never written: the transport is gone
            status = response.status
            return response
        finally:
            if self._requests is not None:
                self._requests.append(self._recorded(request, raw, api_key, status, received_at))

    def _recorded(
        self,
        request: web.Request,
        raw: bytes,
        api_key: str | None,
        status: int | None,
        received_at: datetime,
    ) -> RecordedRequest:
        resource = request.match_info.route.resource
        is_upload = resource is not None and resource.canonical == UPLOAD_ROUTE
        return RecordedRequest(
            method=request.method,
            path=request.rel_url.raw_path,
            query=dict(request.query.items()),
            json=None if is_upload else _recorded_json(raw),
            user_id=self._state.key_owner(api_key) if api_key else None,
            status=status,
            received_at=received_at,
            answered_at=datetime.now(UTC),
        )

    async def _respond(
        self, request: web.Request, handler: Handler, fault: Fault | None, api_key: str | None
    ) -> web.StreamResponse | None:
        if fault is not None:
            _log.debug("fault %s on %s %s", fault.kind, request.method, request.rel_url.raw_path)
            if fault.kind == "delay":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), fault.seconds)
            elif fault.kind == "drop":
                if request.transport is not None:
                    request.transport.abort()
                return None
            elif fault.kind == "malform":
                return await malformed_response(request, fault)
            elif not fault.act_first:
                return fault_response(fault)
        response = await self._handle(request, handler, api_key)
        if fault is not None and fault.kind == "fail":
            return fault_response(fault)
        return response

    async def _handle(
        self, request: web.Request, handler: Handler, api_key: str | None
    ) -> web.StreamResponse:
        try:
            if request.path == API_PREFIX or request.path.startswith(f"{API_PREFIX}/"):
                request[_CALLER] = self._state.authenticate(api_key)
                request[_API_KEY] = api_key or ""
            return await handler(request)
        except EmulatorError as exc:
            return canonical_error(exc.status, exc.message, exc.code)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return canonical_error(exc.status, exc.reason)

    # --- helpers ----------------------------------------------------------------------

    def _org(self, request: web.Request) -> str:
        """The caller, once the path's org is checked (404 for another org)."""
        if request.match_info["org_id"] != self._state.org_id:
            raise NotFound(f"organisation {request.match_info['org_id']!r} not found")
        return request[_CALLER]

    def _own_agent(self, request: web.Request) -> str:
        """The caller, once the path's org and ``agent_id`` are checked (403 for another agent)."""
        caller = self._org(request)
        if request.match_info["agent_id"] != caller:
            raise Forbidden("agent_id is not the caller's own")
        return caller

    def _limit(self, request: web.Request) -> int:
        raw = request.query.get(QUERY_LIMIT)
        if raw is None:
            return min(DEFAULT_PAGE_SIZE, self._max_page_size)
        try:
            limit = int(raw)
        except ValueError as exc:
            raise BadRequest("limit must be an integer") from exc
        if limit < 1:
            raise BadRequest("limit must be at least 1")
        return min(limit, self._max_page_size)

    def _page(
        self,
        request: web.Request,
        items: list[tuple[int, Wire]],
        *,
        cursor_name: str = QUERY_CURSOR,
        newest_first: bool = False,
    ) -> web.Response:
        """One page of ``items`` (in ascending ordinal order) after the request's cursor."""
        limit = self._limit(request)
        raw_cursor = request.query.get(cursor_name)
        if newest_first:
            items = items[::-1]
        if raw_cursor is not None:
            after = _decode_cursor(raw_cursor)
            items = [i for i in items if (i[0] < after if newest_first else i[0] > after)]
        page = items[:limit]
        has_more = len(items) > limit
        return _json(
            {
                "data": [wire for _, wire in page],
                "has_more": has_more,
                "next_cursor": _encode_cursor(page[-1][0]) if has_more else None,
            }
        )

    # --- identity ----------------------------------------------------------------------

    async def me(self, request: web.Request) -> web.Response:
        """``GET /users/me``."""
        return _json(self._state.user(request[_CALLER]))

    async def agent_me(self, request: web.Request) -> web.Response:
        """``GET /orgs/{org}/agents/me``: 403 for a key that is not an agent's."""
        caller = self._org(request)
        if not self._state.is_agent(caller):
            raise Forbidden("this key is not an agent's")
        return _json(self._state.user(caller))

    # --- chats and messages -------------------------------------------------------------

    async def list_chats(self, request: web.Request) -> web.Response:
        """``GET /orgs/{org}/chats``: the caller's chats."""
        return self._page(request, self._state.chats_of(self._org(request)))

    async def get_chat(self, request: web.Request) -> web.Response:
        """``GET /orgs/{org}/chats/{chat_id}``."""
        caller = self._org(request)
        return _json(self._state.visible_chat(caller, request.match_info["chat_id"]))

    async def list_member_chats(self, request: web.Request) -> web.Response:
        """``GET /orgs/{org}/members/{user_id}/chats``: only the caller's own."""
        caller = self._org(request)
        if request.match_info["user_id"] != caller:
            raise Forbidden("a key may only list its own chats")
        return self._page(request, self._state.chats_of(caller))

    async def list_chat_messages(self, request: web.Request) -> web.Response:
        """``GET /orgs/{org}/chats/{chat_id}/messages``: newest first, paged by ``before``."""
        caller = self._org(request)
        chat_id = request.match_info["chat_id"]
        self._state.visible_chat(caller, chat_id)
        items = self._state.chat_messages(chat_id)
        return self._page(request, items, cursor_name=QUERY_BEFORE, newest_first=True)

    async def send_message(self, request: web.Request) -> web.Response:
        """``POST /orgs/{org}/chats/{chat_id}/messages``: 201, or 200 for a seen key."""
        caller = self._org(request)
        body = await _body(request)
        message, created = self._state.send_message(caller, request.match_info["chat_id"], body)
        return _json(message, 201 if created else 200)

    async def get_message(self, request: web.Request) -> web.Response:
        """``GET /messages/{message_id}``."""
        return _json(
            self._state.visible_message(request[_CALLER], request.match_info["message_id"])
        )

    async def list_replies(self, request: web.Request) -> web.Response:
        """``GET /messages/{message_id}/replies``: oldest first."""
        items = self._state.replies(request[_CALLER], request.match_info["message_id"])
        return self._page(request, items)

    # --- tasks ---------------------------------------------------------------------------

    async def get_task(self, request: web.Request) -> web.Response:
        """``GET /orgs/{org}/tasks/{task_id}``."""
        self._org(request)
        return _json(self._state.task(request.match_info["task_id"]))

    async def update_task(self, request: web.Request) -> web.Response:
        """``PATCH /orgs/{org}/tasks/{task_id}``."""
        self._org(request)
        body = await _body(request)
        return _json(self._state.update_task(request.match_info["task_id"], body))

    # --- files ---------------------------------------------------------------------------

    async def presign_upload(self, request: web.Request) -> web.Response:
        """``POST /orgs/{org}/upload/presign``."""
        caller = self._org(request)
        return _json(self._state.presign(caller, await _body(request)))

    async def complete_upload(self, request: web.Request) -> web.Response:
        """``POST /orgs/{org}/upload/complete``."""
        self._org(request)
        return _json(self._state.complete_upload(await _body(request)))

    async def get_file_url(self, request: web.Request) -> web.Response:
        """``GET /files/{attachment_id}/url``."""
        return _json(self._state.file_url(request.match_info["attachment_id"]))

    async def upload_bytes(self, request: web.Request) -> web.Response:
        """``PUT`` to a pre-signed upload URL (emulator-private path, no auth)."""
        data = await request.read()
        content_type = request.headers.get("Content-Type")
        self._state.put_upload(
            request.match_info["attachment_id"],
            request.query.get("sig"),
            data,
            content_type,
            has_authorization=HEADER_AUTHORIZATION in request.headers,
        )
        return web.Response(status=200)

    async def download_bytes(self, request: web.Request) -> web.Response:
        """``GET`` of a download URL (emulator-private path, no auth)."""
        data, mime_type = self._state.download(
            request.match_info["attachment_id"], request.query.get("sig")
        )
        return web.Response(body=data, headers={"Content-Type": mime_type})

    # --- WebSocket ticket ------------------------------------------------------------------

    async def ws_ticket(self, request: web.Request) -> web.Response:
        """``POST /ws/ticket``: an empty body or a JSON object."""
        body = await _body(request)
        if body is not None and not isinstance(body, dict):
            raise BadRequest("body must be empty or a JSON object")
        ticket = self._state.issue_ticket(request[_CALLER], request[_API_KEY])
        if not self._include_ws_url:
            del ticket["ws_url"]
        return _json(ticket)

    # --- dispatch ---------------------------------------------------------------------------

    async def list_dispatch(self, request: web.Request) -> web.Response:
        """``GET /orgs/{org}/dispatch``: the caller's items not yet acked, oldest first
        (a page costs its own rows, not the whole queue: see ``_DispatchQueue``)."""
        caller = self._org(request)
        limit = self._limit(request)
        raw_cursor = request.query.get(QUERY_CURSOR)
        after = None if raw_cursor is None else _decode_cursor(raw_cursor)
        page, has_more = self._state.dispatch_page(caller, after, limit)
        return _json(
            {
                "data": [wire for _, wire in page],
                "has_more": has_more,
                "next_cursor": _encode_cursor(page[-1][0]) if has_more else None,
            }
        )

    async def ack_dispatch(self, request: web.Request) -> web.Response:
        """``POST /orgs/{org}/dispatch/ack`` (by source)."""
        caller = self._org(request)
        return _json({"acked": self._state.ack_by_source(caller, await _body(request))})

    async def ack_dispatch_by_id(self, request: web.Request) -> web.Response:
        """``POST /orgs/{org}/dispatch/{dispatch_id}/ack``."""
        caller = self._org(request)
        return _json({"acked": self._state.ack_by_id(caller, request.match_info["dispatch_id"])})

    async def mark_received(self, request: web.Request) -> web.Response:
        """``POST /orgs/{org}/dispatch/received`` (by source)."""
        caller = self._org(request)
        return _json({"received": self._state.mark_received(caller, await _body(request))})

    # --- agent sessions, steps, config --------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        """``POST /orgs/{org}/agents/{agent_id}/sessions``: 201."""
        agent = self._own_agent(request)
        return _json(self._state.create_session(agent, await _body(request)), 201)

    async def update_session(self, request: web.Request) -> web.Response:
        """``PATCH /orgs/{org}/agents/{agent_id}/sessions/{session_id}``."""
        agent = self._own_agent(request)
        session_id = request.match_info["session_id"]
        return _json(self._state.update_session(agent, session_id, await _body(request)))

    async def create_step(self, request: web.Request) -> web.Response:
        """``POST /orgs/{org}/agents/{agent_id}/sessions/{session_id}/steps``: 201."""
        agent = self._own_agent(request)
        session_id = request.match_info["session_id"]
        return _json(self._state.create_step(agent, session_id, await _body(request)), 201)

    async def agent_config(self, request: web.Request) -> web.Response:
        """``GET /orgs/{org}/agents/{agent_id}/config``."""
        return _json(self._state.agent_config(self._own_agent(request)))
