"""Typed errors of the library.

Every error the library raises on purpose is a :class:`ParallError`. REST
failures are :class:`ParallAPIError` subclasses chosen by status code (one
mapping, :func:`api_error_for_status`); no error text ever holds the API key
or a WebSocket ticket.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BODY_EXCERPT_LIMIT",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "LeaseLost",
    "NotFoundError",
    "PaginationError",
    "ParallAPIError",
    "ParallConnectionError",
    "ParallError",
    "ParallTLSError",
    "ParallTimeoutError",
    "PermissionDeniedError",
    "ProtocolError",
    "RateLimitedError",
    "ServerError",
    "StateStoreError",
    "WebSocketClosedError",
    "api_error_for_status",
]

BODY_EXCERPT_LIMIT: Final = 200
"""Longest excerpt of a response body kept in an error (hikari's choice too)."""


def excerpt(text: str, limit: int = BODY_EXCERPT_LIMIT) -> str:
    """Cut ``text`` to ``limit`` characters, marking the cut."""
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ParallError(Exception):
    """Base class of every error raised by parall_bridge."""


class ConfigurationError(ParallError, ValueError):
    """A configuration value is missing or malformed (names the setting)."""


class ParallAPIError(ParallError):
    """The platform answered a REST call with an error status.

    Attributes:
        status: the HTTP status code.
        code: the server's error code (``"NOT_FOUND"``...) when the body had one.
        message: the server's error message, or a short excerpt of the body.
        method: the HTTP method of the request.
        path: the request path (ids only, never a secret).
        body: the response body cut to 200 characters.
    """

    def __init__(
        self,
        *,
        status: int,
        message: str,
        method: str,
        path: str,
        code: str | None = None,
        body: str = "",
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.method = method
        self.path = path
        self.body = excerpt(body)
        super().__init__(str(self))

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        return f"{self.method} {self.path} -> {self.status}{code}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, method={self.method!r}, path={self.path!r})"
        )


class BadRequestError(ParallAPIError):
    """400: the request was malformed."""


class AuthenticationError(ParallAPIError):
    """401: the API key is missing, wrong or revoked."""


class PermissionDeniedError(ParallAPIError):
    """403: the key may not do this."""


class NotFoundError(ParallAPIError):
    """404: no such entity (also how the platform hides what the key may not read)."""


class ConflictError(ParallAPIError):
    """409: the request conflicts with the entity's current state."""


class RateLimitedError(ParallAPIError):
    """429: rate limited, and the wait asked for was longer than the retry policy allows
    (or the retries ran out).

    Attributes:
        retry_after: the wait the server asked for, in seconds, when it said.
    """

    def __init__(
        self,
        *,
        status: int,
        message: str,
        method: str,
        path: str,
        code: str | None = None,
        body: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(
            status=status, message=message, method=method, path=path, code=code, body=body
        )

    def __str__(self) -> str:
        after = f" (retry after {self.retry_after:g} s)" if self.retry_after is not None else ""
        return super().__str__() + after


class ServerError(ParallAPIError):
    """5xx: trouble on the platform's side (raised once retries are exhausted)."""


class ProtocolError(ParallError):
    """A 2xx response (or a WebSocket frame) that is not what the protocol says: not
    JSON, JSON nested too deep or with a number out of range, a body above the size
    cap, a content type that is not JSON, or a shape that does not fit the model.

    The message names the field that did not fit, or says what was wrong with the
    body (never its content).

    Attributes:
        detail: what was wrong.
        method: the HTTP method of the request ("" for a frame).
        path: the request path ("" for a frame).
    """

    def __init__(self, detail: str, *, method: str = "", path: str = "") -> None:
        self.detail = detail
        self.method = method
        self.path = path
        where = f"{method} {path}: " if method or path else ""
        super().__init__(f"{where}unexpected response: {detail}")


class PaginationError(ProtocolError):
    """A paginated list went on past ``max_pages`` pages (new cursors without end).

    The items of the pages before were already yielded; the list stops here.
    """


class ParallConnectionError(ParallError):
    """The platform could not be reached (refused, reset, DNS...) after the retries.

    Attributes:
        request_sent: ``False`` when the connection was never established, so
            the server cannot have acted on the request; ``True`` when it may
            have (a reset or timeout after the request went out).
    """

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        self.request_sent = request_sent
        super().__init__(message)


class ParallTimeoutError(ParallConnectionError):
    """A request or connection attempt timed out after the retries."""


class ParallTLSError(ParallConnectionError):
    """The TLS handshake failed, most often because the server's certificate could not
    be verified (self-signed, expired, another host's). Not retried: a certificate does
    not fix itself. ``verify_tls=False`` turns verification off (for a test server only).
    """


class WebSocketClosedError(ParallError):
    """The WebSocket was closed for good (a fatal close code such as 4003).

    Attributes:
        code: the close code.
        reason: the close reason the server gave (may be empty).
    """

    def __init__(self, code: int | None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        text = f"WebSocket closed with code {code}"
        super().__init__(f"{text}: {reason}" if reason else text)


_BY_STATUS: Final[dict[int, type[ParallAPIError]]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    429: RateLimitedError,
}


def api_error_for_status(status: int) -> type[ParallAPIError]:
    """The error class for an HTTP error status (the one place that maps them)."""
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, ParallAPIError)


class StateStoreError(ParallError):
    """A state store cannot be used: it is held by another gateway, belongs to another
    agent, has a schema this version does not know, or cannot be read or written.

    The message names the store (its file, for SQLite) and the account; it never
    holds a secret.
    """


class LeaseLost(StateStoreError):
    """A store's account lease is no longer its own: another holder took it over (a new
    epoch), it expired, or it was released; or the store takes leases and holds none.

    Raised by :meth:`~parall_bridge.state.PostgresStateStore.renew_lease`, and by every
    write of a store that holds a lease once that lease is lost (fencing): the write was
    refused in its own transaction and nothing of it was applied. It is final for that
    lease: trying again does not help, only acquiring the account's lease again does.
    """
