"""``ParallClient``: the REST client of the Parall platform.

One :class:`aiohttp.ClientSession` per client (its own, or one the caller
injects and keeps ownership of), typed models in and out, typed errors, and
retries through the policy of :mod:`parall_bridge._retry`.

Whatever the server (or the network) answers, what leaves a method is a
model or a :class:`~parall_bridge.ParallError`: bodies are read streamed up
to a size cap, JSON is decoded with a depth cap and finite numbers only
(:mod:`parall_bridge._json`), models are read strictly, and paginated lists
stop after ``max_pages`` pages.
"""

from __future__ import annotations

import email.utils
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

import aiohttp
import cattrs
from yarl import URL

from . import _json
from . import protocol as p
from ._retry import (
    DEFAULT_RETRY_POLICY,
    RetryPolicy,
    Safety,
    call_with_retries,
    connection_error,
)
from ._serde import structure, unstructure
from .errors import (
    PaginationError,
    ParallAPIError,
    ProtocolError,
    RateLimitedError,
    api_error_for_status,
    excerpt,
)
from .models import (
    AgentConfig,
    AgentSession,
    AgentSessionStatus,
    AgentStep,
    Chat,
    DispatchItem,
    FileUrl,
    Message,
    Page,
    SourceType,
    Task,
    TaskPriority,
    TaskStatus,
    UploadTicket,
    User,
    WsTicket,
)

__all__ = [
    "DEFAULT_MAX_ERROR_BODY_BYTES",
    "DEFAULT_MAX_PAGES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_TIMEOUT",
    "UNSET",
    "ParallClient",
    "Unset",
]

_log = logging.getLogger("parall_bridge.client")

T = TypeVar("T")

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds one request attempt may take, connecting included."""
DEFAULT_MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
"""Largest 2xx body read (bytes); a larger one is abandoned with a ProtocolError. The
largest page of the protocol is a few hundred KB."""
DEFAULT_MAX_ERROR_BODY_BYTES: Final = 64 * 1024
"""Most of an error body read (bytes); the rest is left unread (errors keep 200 characters)."""
DEFAULT_MAX_PAGES: Final = 1000
"""Most pages an ``iter_*`` method fetches before raising :class:`PaginationError`."""
READ_CHUNK: Final = 64 * 1024
"""Bytes asked of the socket at a time while reading a body."""
USER_AGENT: Final = "parall-bridge/0.1"


class Unset(enum.Enum):
    """Type of :data:`UNSET`."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET
"""Marks a keyword argument left out: the field is not sent at all.

Used by :meth:`ParallClient.update_task`, where ``None`` means "send null and
clear the field".
"""


def _check_reserved_key(key: str) -> None:
    for prefix in p.RESERVED_IDEMPOTENCY_PREFIXES:
        if key.startswith(prefix):
            raise ValueError(
                f"idempotency keys starting with {prefix!r} are reserved by the platform"
            )


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a (fractional) number or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _is_json_type(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` header announces JSON (an absent one is given the
    benefit of the doubt: the body must still parse)."""
    if content_type is None:
        return True
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytearray, bool]:
    """Read the body streamed, keeping at most ``limit`` bytes; returns the bytes and
    whether that was the whole body. Never holds more than ``limit`` plus one chunk."""
    body = bytearray()
    while chunk := await resp.content.read(READ_CHUNK):
        if len(body) + len(chunk) > limit:
            body += chunk[: limit - len(body)]
            return body, False
        body += chunk
    return body, True


def _parse_error_body(text: str) -> tuple[str | None, str | None]:
    """Read the server's error code and message from any of the error body forms."""
    try:
        data = _json.loads(text)
    except ProtocolError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    error = data.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message")
        return (
            str(code) if code is not None else None,
            str(message) if message is not None else None,
        )
    if isinstance(error, str):
        return None, error
    message = data.get("message")
    if isinstance(message, str):
        return None, message
    return None, None


class ParallClient:
    """Async client of the Parall REST API.

    Use it as an async context manager (or call :meth:`close`)::

        async with ParallClient("https://api.parall.example", api_key) as client:
            me = await client.get_me()

    Args:
        base_url: the API base URL (``PRLL_API_URL``), without ``/api/v1``.
        api_key: the API key; sent only as a bearer token, never logged or shown.
        session: an aiohttp session to use instead of creating one; the client
            then leaves closing it to the caller.
        connector: an aiohttp connector (a pool of connections) for the session the
            client creates, shared with other clients: the caller keeps ownership and
            closes it after the clients. The session stays the client's own (its own
            cookie jar and headers); the API key goes in each request's headers only,
            never into the connector, so clients of different keys can share one (as
            :class:`~parall_bridge.GatewayFleet` does). Not with ``session``.
        timeout: seconds one request attempt may take.
        retry: the :class:`RetryPolicy` (3 retries, backoff capped at 16 s by default).
        max_response_bytes: largest 2xx body read (16 MiB); a larger one is abandoned
            (its connection closed) with a :class:`ProtocolError`, never buffered whole.
        max_error_body_bytes: most of an error body read (64 KiB).
        max_pages: most pages an ``iter_*`` method fetches before raising
            :class:`PaginationError` (1,000; each method also takes ``max_pages``).
        verify_tls: verify the server's TLS certificate (the default). ``False`` is
            for a test server with a self-signed certificate only; it logs a warning.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        session: aiohttp.ClientSession | None = None,
        connector: aiohttp.BaseConnector | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_error_body_bytes: int = DEFAULT_MAX_ERROR_BODY_BYTES,
        max_pages: int = DEFAULT_MAX_PAGES,
        verify_tls: bool = True,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("base_url must be an absolute http(s) URL")
        if not api_key:
            raise ValueError("api_key must not be empty")
        if session is not None and connector is not None:
            raise ValueError("give a session or a connector, not both")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        for name, value in (
            ("max_response_bytes", max_response_bytes),
            ("max_error_body_bytes", max_error_body_bytes),
            ("max_pages", max_pages),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if not verify_tls:
            _log.warning("TLS certificate verification is OFF for %s (verify_tls=False)", url.host)
        self._base_url = base_url.rstrip("/")
        self.__api_key = api_key
        self._session = session
        self._owns_session = session is None
        self._connector = connector
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retry = retry
        self._max_response_bytes = max_response_bytes
        self._max_error_body_bytes = max_error_body_bytes
        self._max_pages = max_pages
        self._verify_tls = verify_tls
        self._closed = False

    def __repr__(self) -> str:
        return f"ParallClient(base_url={self._base_url!r})"

    @property
    def base_url(self) -> str:
        """The API base URL, without a trailing slash."""
        return self._base_url

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy in use."""
        return self._retry

    # --- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if the client created it (idempotent)."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this ParallClient is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": USER_AGENT},
                connector=self._connector,
                connector_owner=self._connector is None,
            )
            self._owns_session = True
        return self._session

    # --- the request pipeline -----------------------------------------------------

    async def _request(
        self,
        endpoint: p.Endpoint,
        *,
        params: Mapping[str, str | int | None] | None = None,
        json_body: Any = None,
        safety: Safety = Safety.SAFE,
        path_params: Mapping[str, str] | None = None,
    ) -> Any:
        """Send one API request, with retries; return the decoded JSON body (or None)."""
        path = endpoint.format(**(path_params or {}))
        url = URL(self._base_url + path, encoded=True)
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        what = f"{endpoint.method} {path}"

        async def attempt() -> Any:
            return await self._send(endpoint.method, url, path, query, json_body)

        return await call_with_retries(self._retry, safety, attempt, what=what)

    async def _send(
        self,
        method: str,
        url: URL,
        path: str,
        query: Mapping[str, str],
        json_body: Any,
    ) -> Any:
        session = self._ensure_session()
        what = f"{method} {path}"
        headers = {
            p.HEADER_AUTHORIZATION: f"Bearer {self.__api_key}",
            "Accept": "application/json",
        }
        started = time.monotonic()
        try:
            async with session.request(
                method,
                url,
                params=query or None,
                json=json_body,
                headers=headers,
                timeout=self._timeout,
                ssl=self._verify_tls,
            ) as resp:
                if resp.status >= 400:
                    body, _ = await _read_capped(resp, self._max_error_body_bytes)
                    text = body.decode("utf-8", errors="replace")
                    retry_after = resp.headers.get(p.HEADER_RETRY_AFTER)
                    raise self._api_error(
                        resp.status, resp.reason or "", text, method, path, retry_after
                    )
                body = await self._read_success(resp, method, path)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise connection_error(exc, what, timeout=self._timeout.total) from None
        _log.debug("%s -> %d in %.3f s", what, resp.status, time.monotonic() - started)
        if not body or body.isspace():
            return None
        try:
            return _json.loads(body)
        except ProtocolError as exc:
            raise ProtocolError(exc.detail, method=method, path=path) from None

    async def _read_success(
        self, resp: aiohttp.ClientResponse, method: str, path: str
    ) -> bytearray:
        """A 2xx body, read streamed up to the cap; a body that is too large or not
        announced as JSON is abandoned (the connection closed, not reused)."""
        limit = self._max_response_bytes
        content_type = resp.headers.get(aiohttp.hdrs.CONTENT_TYPE)
        if resp.content_length == 0:
            return bytearray()
        if not _is_json_type(content_type):
            resp.close()
            raise ProtocolError(
                f"expected JSON, got {excerpt(str(content_type), 60)}", method=method, path=path
            )
        if resp.content_length is not None and resp.content_length > limit:
            resp.close()
            raise ProtocolError(
                f"body of {resp.content_length} bytes is above the {limit}-byte cap",
                method=method,
                path=path,
            )
        body, complete = await _read_capped(resp, limit)
        if not complete:
            resp.close()
            raise ProtocolError(
                f"body is above the {limit}-byte cap: abandoned", method=method, path=path
            )
        return body

    def _api_error(
        self, status: int, reason: str, text: str, method: str, path: str, retry_after: str | None
    ) -> ParallAPIError:
        if self.__api_key and self.__api_key in text:
            # A server (or a proxy) echoing the request's key: it must not reach an error.
            text = text.replace(self.__api_key, "***")
        code, message = _parse_error_body(text)
        if message is None:
            message = f"{reason or 'HTTP error'} (non-JSON body)" if text.strip() else reason
        cls = api_error_for_status(status)
        if cls is RateLimitedError:
            return RateLimitedError(
                status=status,
                code=code,
                message=message,
                method=method,
                path=path,
                body=text,
                retry_after=_parse_retry_after(retry_after),
            )
        return cls(status=status, code=code, message=message, method=method, path=path, body=text)

    @staticmethod
    def _structure(data: Any, cls: type[T], endpoint: p.Endpoint) -> T:
        try:
            return structure(data, cls)
        except cattrs.BaseValidationError as exc:
            detail = "; ".join(cattrs.transform_error(exc))
            raise ProtocolError(detail, method=endpoint.method, path=endpoint.path) from None
        except Exception as exc:  # whatever else a shape the converter did not expect raises
            name = getattr(cls, "__name__", "model")
            raise ProtocolError(
                f"{name}: {type(exc).__name__}: {excerpt(str(exc), 80)}",
                method=endpoint.method,
                path=endpoint.path,
            ) from None

    async def _get_model(
        self,
        endpoint: p.Endpoint,
        cls: type[T],
        *,
        params: Mapping[str, str | int | None] | None = None,
        **path_params: str,
    ) -> T:
        data = await self._request(endpoint, params=params, path_params=path_params)
        return self._structure(data, cls, endpoint)

    async def _get_page(
        self,
        endpoint: p.Endpoint,
        item: type[T],
        params: Mapping[str, str | int | None],
        **path_params: str,
    ) -> Page[T]:
        data = await self._request(endpoint, params=params, path_params=path_params)
        return self._structure(data, Page[item], endpoint)  # type: ignore[valid-type]

    async def _iterate(
        self,
        endpoint: p.Endpoint,
        fetch: Callable[[str | None], Awaitable[Page[T]]],
        max_pages: int | None,
    ) -> AsyncIterator[T]:
        """Walk the pages: stop when ``has_more`` is false or missing, or the cursor is
        missing or repeats (logged); raise :class:`PaginationError` rather than fetch
        more than ``max_pages`` pages. Items already yielded stay yielded."""
        limit = self._max_pages if max_pages is None else max_pages
        if limit < 1:
            raise ValueError(f"max_pages must be >= 1, got {limit!r}")
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(limit):
            page = await fetch(cursor)
            for item in page.data:
                yield item
            cursor = page.next_cursor
            if not page.has_more or not cursor:
                return
            if cursor in seen:
                _log.warning(
                    "%s %s: the server repeated a cursor; the list ends here",
                    endpoint.method,
                    endpoint.path,
                )
                return
            seen.add(cursor)
        raise PaginationError(
            f"more than {limit} pages (max_pages): the list was cut short",
            method=endpoint.method,
            path=endpoint.path,
        )

    # --- identity ------------------------------------------------------------------

    async def get_me(self) -> User:
        """The user the API key belongs to (for an agent key: the agent)."""
        return await self._get_model(p.ME, User)

    async def get_agent_me(self, org_id: str) -> User:
        """The agent the API key belongs to, within ``org_id``."""
        return await self._get_model(p.AGENT_ME, User, org_id=org_id)

    # --- chats ------------------------------------------------------------------------

    async def get_chats(
        self, org_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[Chat]:
        """One page of the chats the caller belongs to."""
        params = {p.QUERY_LIMIT: limit, p.QUERY_CURSOR: cursor}
        return await self._get_page(p.LIST_CHATS, Chat, params, org_id=org_id)

    def iter_chats(
        self, org_id: str, *, page_size: int | None = None, max_pages: int | None = None
    ) -> AsyncIterator[Chat]:
        """Every chat the caller belongs to, across all pages (at most ``max_pages``,
        the client's by default, then :class:`PaginationError`)."""
        return self._iterate(
            p.LIST_CHATS,
            lambda cursor: self.get_chats(org_id, limit=page_size, cursor=cursor),
            max_pages,
        )

    async def get_chat(self, org_id: str, chat_id: str) -> Chat:
        """One chat."""
        return await self._get_model(p.GET_CHAT, Chat, org_id=org_id, chat_id=chat_id)

    async def get_member_chats(
        self,
        org_id: str,
        user_id: str,
        *,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Chat]:
        """One page of the chats ``user_id`` joined (an agent key lists its own this way)."""
        params = {p.QUERY_LIMIT: limit, p.QUERY_CURSOR: cursor}
        return await self._get_page(
            p.LIST_MEMBER_CHATS, Chat, params, org_id=org_id, user_id=user_id
        )

    def iter_member_chats(
        self,
        org_id: str,
        user_id: str,
        *,
        page_size: int | None = None,
        max_pages: int | None = None,
    ) -> AsyncIterator[Chat]:
        """Every chat ``user_id`` joined, across all pages (at most ``max_pages``)."""
        return self._iterate(
            p.LIST_MEMBER_CHATS,
            lambda cursor: self.get_member_chats(org_id, user_id, limit=page_size, cursor=cursor),
            max_pages,
        )

    # --- messages -----------------------------------------------------------------------

    async def get_chat_messages(
        self,
        org_id: str,
        chat_id: str,
        *,
        limit: int | None = None,
        before: str | None = None,
    ) -> Page[Message]:
        """One page of a chat's history, newest first; pass ``next_cursor`` as ``before``."""
        params = {p.QUERY_LIMIT: limit, p.QUERY_BEFORE: before}
        return await self._get_page(
            p.LIST_CHAT_MESSAGES, Message, params, org_id=org_id, chat_id=chat_id
        )

    async def get_message(self, message_id: str) -> Message:
        """One message."""
        return await self._get_model(p.GET_MESSAGE, Message, message_id=message_id)

    async def get_replies(
        self, message_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[Message]:
        """One page of the replies in the thread rooted at ``message_id``."""
        params = {p.QUERY_LIMIT: limit, p.QUERY_CURSOR: cursor}
        return await self._get_page(p.LIST_REPLIES, Message, params, message_id=message_id)

    def iter_replies(
        self, message_id: str, *, page_size: int | None = None, max_pages: int | None = None
    ) -> AsyncIterator[Message]:
        """Every reply in the thread rooted at ``message_id``, across all pages (at most
        ``max_pages``)."""
        return self._iterate(
            p.LIST_REPLIES,
            lambda cursor: self.get_replies(message_id, limit=page_size, cursor=cursor),
            max_pages,
        )

    async def send_message(
        self,
        org_id: str,
        chat_id: str,
        text: str,
        *,
        mentions: Iterable[str] = (),
        attachment_ids: Iterable[str] = (),
        thread_root_id: str | None = None,
        no_reply: bool = False,
        idempotency_key: str | None = None,
    ) -> Message:
        """Post a text message to a chat.

        Every send carries an idempotency key (``idempotency_key``, or a fresh
        ``pb:`` one), so it is retried safely: a repeat creates nothing and
        answers the first message.

        Args:
            mentions: user ids to @mention (``MENTION_ALL_USER_ID`` for @all).
            attachment_ids: ids from :meth:`upload_file`.
            thread_root_id: reply in the thread of this message.
            no_reply: hint that the message expects no reply.
            idempotency_key: a caller-chosen key; keys starting with ``reply:``
                or ``task_update:`` are reserved and raise :class:`ValueError`.

        Raises:
            TypeError: ``text`` is not a string, or ``mentions``/``attachment_ids`` is
                a single string rather than a collection of ids (before any request).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        for name, ids in (("mentions", mentions), ("attachment_ids", attachment_ids)):
            if isinstance(ids, str):
                raise TypeError(f"{name} is a collection of ids, not one str: use [{ids!r}]")
        if idempotency_key is None:
            idempotency_key = f"{p.IDEMPOTENCY_PREFIX}{uuid.uuid4().hex}"
        else:
            _check_reserved_key(idempotency_key)
        content: dict[str, Any] = {"text": text}
        mention_list = [{"user_id": user_id} for user_id in mentions]
        if mention_list:
            content["mentions"] = mention_list
        body: dict[str, Any] = {
            "message_type": "text",
            "content": content,
            "idempotency_key": idempotency_key,
        }
        attachments = list(attachment_ids)
        if attachments:
            body["attachment_ids"] = attachments
        if thread_root_id is not None:
            body["thread_root_id"] = thread_root_id
        if no_reply:
            body["hints"] = {"no_reply": True}
        data = await self._request(
            p.SEND_MESSAGE, json_body=body, path_params={"org_id": org_id, "chat_id": chat_id}
        )
        return self._structure(data, Message, p.SEND_MESSAGE)

    # --- tasks --------------------------------------------------------------------------

    async def get_task(self, org_id: str, task_id: str) -> Task:
        """One task."""
        return await self._get_model(p.GET_TASK, Task, org_id=org_id, task_id=task_id)

    async def update_task(
        self,
        org_id: str,
        task_id: str,
        *,
        title: str | Unset = UNSET,
        status: TaskStatus | str | Unset = UNSET,
        priority: TaskPriority | str | Unset = UNSET,
        description: str | Unset | None = UNSET,
        assignee_id: str | Unset | None = UNSET,
    ) -> Task:
        """Change some fields of a task and return it.

        A keyword left out is not sent; ``None`` is sent as ``null`` and clears
        the field (``description``, ``assignee_id``).
        """
        fields: dict[str, object] = {
            "title": title,
            "status": status,
            "priority": priority,
            "description": description,
            "assignee_id": assignee_id,
        }
        body = {
            name: (value.value if isinstance(value, enum.Enum) else value)
            for name, value in fields.items()
            if value is not UNSET
        }
        data = await self._request(
            p.UPDATE_TASK, json_body=body, path_params={"org_id": org_id, "task_id": task_id}
        )
        return self._structure(data, Task, p.UPDATE_TASK)

    # --- files ----------------------------------------------------------------------------

    async def get_file_url(self, attachment_id: str) -> FileUrl:
        """A download URL for an attachment."""
        return await self._get_model(p.GET_FILE_URL, FileUrl, attachment_id=attachment_id)

    async def upload_file(self, org_id: str, data: bytes, *, file_name: str, mime_type: str) -> str:
        """Upload a file and return its attachment id (for ``send_message``).

        Presigns the upload, ``PUT``s the bytes to the pre-signed URL (without
        the Authorization header), then completes it.
        """
        payload = bytes(data)
        presigned = await self._request(
            p.PRESIGN_UPLOAD,
            json_body={"file_name": file_name, "file_size": len(payload), "mime_type": mime_type},
            path_params={"org_id": org_id},
        )
        ticket = self._structure(presigned, UploadTicket, p.PRESIGN_UPLOAD)

        async def put() -> None:
            await self._put_bytes(ticket.upload_url, payload, mime_type)

        await call_with_retries(self._retry, Safety.SAFE, put, what="PUT <upload_url>")
        await self._request(
            p.COMPLETE_UPLOAD,
            json_body={"attachment_id": ticket.attachment_id},
            path_params={"org_id": org_id},
        )
        return ticket.attachment_id

    async def _put_bytes(self, upload_url: str, payload: bytes, mime_type: str) -> None:
        session = self._ensure_session()
        what = "PUT <upload_url>"  # the pre-signed URL carries a signature: never shown
        try:
            url = URL(upload_url, encoded=True)
        except (TypeError, ValueError):
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ProtocolError(
                "upload_url is not an absolute http(s) URL", method="PUT", path="<upload_url>"
            )
        try:
            async with session.put(
                url,
                data=payload,
                headers={"Content-Type": mime_type},
                timeout=self._timeout,
                ssl=self._verify_tls,
            ) as resp:
                if resp.status >= 300:
                    body, _ = await _read_capped(resp, self._max_error_body_bytes)
                    raise self._api_error(
                        resp.status,
                        resp.reason or "",
                        body.decode("utf-8", errors="replace"),
                        "PUT",
                        "<upload_url>",
                        resp.headers.get(p.HEADER_RETRY_AFTER),
                    )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise connection_error(exc, what, timeout=self._timeout.total) from None

    # --- WebSocket ticket ---------------------------------------------------------------

    async def get_ws_ticket(self) -> WsTicket:
        """A fresh single-use WebSocket ticket (one per connection attempt)."""
        data = await self._request(p.WS_TICKET, json_body={})
        return self._structure(data, WsTicket, p.WS_TICKET)

    # --- dispatch ----------------------------------------------------------------------------

    async def get_dispatch(
        self, org_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[DispatchItem]:
        """One page of the agent's pending dispatch items, oldest first."""
        params = {p.QUERY_LIMIT: limit, p.QUERY_CURSOR: cursor}
        return await self._get_page(p.LIST_DISPATCH, DispatchItem, params, org_id=org_id)

    def iter_dispatch(
        self, org_id: str, *, page_size: int | None = None, max_pages: int | None = None
    ) -> AsyncIterator[DispatchItem]:
        """Every pending dispatch item, oldest first, across all pages (at most
        ``max_pages``)."""
        return self._iterate(
            p.LIST_DISPATCH,
            lambda cursor: self.get_dispatch(org_id, limit=page_size, cursor=cursor),
            max_pages,
        )

    async def ack_dispatch(
        self, org_id: str, *, source_type: SourceType | str, source_id: str
    ) -> int:
        """Acknowledge every pending item with this source; returns how many were acked."""
        data = await self._request(
            p.ACK_DISPATCH,
            json_body={"source_type": str(source_type), "source_id": source_id},
            path_params={"org_id": org_id},
        )
        return self._acked(data, p.ACK_DISPATCH)

    async def ack_dispatch_by_id(self, org_id: str, dispatch_id: str) -> int:
        """Acknowledge one dispatch item (idempotent); returns how many were acked."""
        data = await self._request(
            p.ACK_DISPATCH_BY_ID,
            json_body={},
            path_params={"org_id": org_id, "dispatch_id": dispatch_id},
        )
        return self._acked(data, p.ACK_DISPATCH_BY_ID)

    @staticmethod
    def _acked(data: Any, endpoint: p.Endpoint) -> int:
        if data is None:
            return 0
        if not isinstance(data, dict):
            raise ProtocolError("expected an object", method=endpoint.method, path=endpoint.path)
        acked = data.get("acked", 0)
        if not isinstance(acked, int) or isinstance(acked, bool):
            raise ProtocolError(
                "acked: expected an integer", method=endpoint.method, path=endpoint.path
            )
        return acked

    async def mark_dispatch_received(
        self, org_id: str, *, source_type: SourceType | str, source_id: str
    ) -> None:
        """Tell the platform work on this source started (the human sees "reading")."""
        await self._request(
            p.MARK_DISPATCH_RECEIVED,
            json_body={"source_type": str(source_type), "source_id": source_id},
            path_params={"org_id": org_id},
        )

    # --- agent sessions, steps, config -------------------------------------------------------

    async def create_agent_session(
        self,
        org_id: str,
        agent_user_id: str,
        *,
        runtime_type: str,
        runtime_key: str,
        runtime_ref: Mapping[str, Any] | None = None,
    ) -> AgentSession:
        """Create an agent session (retried only when the server cannot have acted)."""
        body: dict[str, Any] = {"runtime_type": runtime_type, "runtime_key": runtime_key}
        if runtime_ref is not None:
            body["runtime_ref"] = dict(runtime_ref)
        data = await self._request(
            p.CREATE_AGENT_SESSION,
            json_body=body,
            safety=Safety.CREATE,
            path_params={"org_id": org_id, "agent_id": agent_user_id},
        )
        return self._structure(data, AgentSession, p.CREATE_AGENT_SESSION)

    async def update_agent_session(
        self,
        org_id: str,
        agent_user_id: str,
        session_id: str,
        *,
        status: AgentSessionStatus | Literal["active", "idle", "completed"] | str,
    ) -> AgentSession:
        """Set an agent session's status (``active``, ``idle`` or ``completed``)."""
        data = await self._request(
            p.UPDATE_AGENT_SESSION,
            json_body={"status": str(status)},
            path_params={"org_id": org_id, "agent_id": agent_user_id, "session_id": session_id},
        )
        return self._structure(data, AgentSession, p.UPDATE_AGENT_SESSION)

    async def create_agent_step(
        self, org_id: str, agent_user_id: str, session_id: str, step: AgentStep
    ) -> AgentStep:
        """Record a step in an agent session (retried only when the server cannot have acted)."""
        body = unstructure(step)
        for server_field in ("id", "session_id", "created_at"):
            body.pop(server_field, None)
        data = await self._request(
            p.CREATE_AGENT_STEP,
            json_body=body,
            safety=Safety.CREATE,
            path_params={"org_id": org_id, "agent_id": agent_user_id, "session_id": session_id},
        )
        return self._structure(data, AgentStep, p.CREATE_AGENT_STEP)

    async def get_agent_config(self, org_id: str, agent_user_id: str) -> AgentConfig:
        """The agent's platform configuration."""
        return await self._get_model(
            p.AGENT_CONFIG, AgentConfig, org_id=org_id, agent_id=agent_user_id
        )
