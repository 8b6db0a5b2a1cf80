"""Fault injection: scripted failures of REST endpoints and WebSocket upgrades."""

from __future__ import annotations

from collections import deque
from typing import Final, Literal

import attrs

from ..protocol import Endpoint

__all__ = ["BODY_FORMS", "Fault", "FaultInjector", "FaultKind"]

FaultKind = Literal["fail", "malform", "delay", "drop"]

BODY_FORMS: Final = frozenset({"canonical", "legacy", "message", "html", "empty"})
"""The error body forms :meth:`FaultInjector.fail_next` can answer with."""


@attrs.frozen
class Fault:
    """One scripted fault, as taken by the server for one request."""

    kind: FaultKind
    status: int = 500
    body_form: str = "canonical"
    retry_after: float | str | None = None
    act_first: bool = False
    body: str = ""
    seconds: float = 0.0
    content_type: str = "application/json"
    size: int | None = None
    truncated: bool = False


@attrs.define
class _Scripted:
    fault: Fault
    remaining: int


def _check_times(times: int) -> None:
    if times < 1:
        raise ValueError(f"times must be at least 1, got {times}")


class FaultInjector:
    """The scripted faults of one emulator.

    REST faults are keyed by :class:`~parall_bridge.protocol.Endpoint` (method
    and route template): each request to that endpoint takes the oldest
    scripted fault, which lasts for its ``times`` requests; faults scripted for
    one endpoint are consumed in the order they were scripted.
    """

    def __init__(self) -> None:
        self._rest: dict[Endpoint, deque[_Scripted]] = {}
        self._ws_refusals: deque[_Scripted] = deque()

    def _add(self, endpoint: Endpoint, fault: Fault, times: int) -> None:
        if not isinstance(endpoint, Endpoint):
            raise TypeError(f"expected a parall_bridge.protocol.Endpoint, got {endpoint!r}")
        _check_times(times)
        self._rest.setdefault(endpoint, deque()).append(_Scripted(fault, times))

    def fail_next(
        self,
        endpoint: Endpoint,
        *,
        times: int = 1,
        status: int = 500,
        body_form: str = "canonical",
        retry_after: float | str | None = None,
        act_first: bool = False,
    ) -> None:
        """Answer the next ``times`` requests to ``endpoint`` with an error.

        Args:
            endpoint: the endpoint to fail.
            times: how many requests fail.
            status: the HTTP status of the error (400 or above).
            body_form: ``"canonical"`` ``{"error": {"code", "message", "status"}}``,
                ``"legacy"`` ``{"error": "<text>"}``, ``"message"``
                ``{"message": "<text>"}``, ``"html"`` (a proxy's HTML page) or
                ``"empty"`` (no body).
            retry_after: sent as the ``Retry-After`` header when given (seconds,
                or a string such as an HTTP date, sent as is).
            act_first: perform the request's effect first, then answer the error
                (an ambiguous failure).
        """
        if status < 400:
            raise ValueError(f"status must be an error status (>= 400), got {status}")
        if body_form not in BODY_FORMS:
            raise ValueError(f"body_form must be one of {sorted(BODY_FORMS)}, got {body_form!r}")
        fault = Fault(
            "fail",
            status=status,
            body_form=body_form,
            retry_after=retry_after,
            act_first=act_first,
        )
        self._add(endpoint, fault, times)

    def malform_next(
        self,
        endpoint: Endpoint,
        *,
        times: int = 1,
        body: str = "not json",
        status: int = 200,
        content_type: str = "application/json",
        size: int | None = None,
        truncated: bool = False,
    ) -> None:
        """Answer the next ``times`` requests to ``endpoint`` with this raw answer, without
        performing them.

        Args:
            endpoint: the endpoint to answer.
            times: how many requests get it.
            body: the body (UTF-8), or with ``size`` the text repeated.
            status: the HTTP status (any: a 2xx by default, an error status works too).
            content_type: the ``Content-Type`` header.
            size: send exactly this many bytes (``body`` repeated), streamed in chunks
                without a ``Content-Length`` (the client learns the size only by
                reading; the emulator holds one chunk at a time, so 100 MB is cheap).
            truncated: announce the whole body in ``Content-Length`` but send only its
                first half, then drop the connection.
        """
        if size is not None and (size < 0 or not body):
            raise ValueError("size must be >= 0, with a non-empty body to repeat")
        fault = Fault(
            "malform",
            status=status,
            body=body,
            content_type=content_type,
            size=size,
            truncated=truncated,
        )
        self._add(endpoint, fault, times)

    def delay_next(self, endpoint: Endpoint, seconds: float, *, times: int = 1) -> None:
        """Wait ``seconds`` before handling each of the next ``times`` requests to
        ``endpoint`` (the request is then performed and answered normally)."""
        if seconds < 0:
            raise ValueError(f"seconds must not be negative, got {seconds}")
        self._add(endpoint, Fault("delay", seconds=seconds), times)

    def drop_next(self, endpoint: Endpoint, *, times: int = 1) -> None:
        """Close the TCP connection of the next ``times`` requests to ``endpoint``
        without answering (and without performing them)."""
        self._add(endpoint, Fault("drop"), times)

    def refuse_ws(self, times: int, status: int = 503) -> None:
        """Answer the next ``times`` WebSocket upgrade requests with this HTTP error."""
        _check_times(times)
        if status < 400:
            raise ValueError(f"status must be an error status (>= 400), got {status}")
        self._ws_refusals.append(_Scripted(Fault("fail", status=status), times))

    def take(self, endpoint: Endpoint) -> Fault | None:
        """Consume one request's worth of the oldest fault scripted for ``endpoint``."""
        queue = self._rest.get(endpoint)
        if not queue:
            return None
        return self._consume(queue)

    def take_ws_refusal(self) -> int | None:
        """Consume one scripted WebSocket refusal; return its status, or ``None``."""
        if not self._ws_refusals:
            return None
        return self._consume(self._ws_refusals).status

    @staticmethod
    def _consume(queue: deque[_Scripted]) -> Fault:
        head = queue[0]
        head.remaining -= 1
        if head.remaining == 0:
            queue.popleft()
        return head.fault

    def pending(self, endpoint: Endpoint | None = None) -> int:
        """How many requests (to ``endpoint``, or to any endpoint) faults remain for."""
        queues = self._rest.values() if endpoint is None else [self._rest.get(endpoint, deque())]
        return sum(s.remaining for queue in queues for s in queue)

    def clear(self) -> None:
        """Drop every scripted fault (REST and WebSocket)."""
        self._rest.clear()
        self._ws_refusals.clear()
