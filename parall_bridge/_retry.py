"""Retry policy of the REST client, in one place (built on tenacity).

Which failures are retried depends on whether the request is safe to repeat:

- :attr:`Safety.SAFE` (reads, acks, status updates, ``send_message`` thanks to
  its idempotency key, ticket requests): 429 (waiting ``Retry-After``), the
  retryable 5xx statuses, timeouts and connection errors.
- :attr:`Safety.CREATE` (agent sessions and steps): only when the server
  cannot have acted: 429 and a connection that was never established. Never
  after an ambiguous failure (a 5xx, a timeout, a reset mid-request), which
  could otherwise create the record twice.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import attrs
import tenacity

from .errors import ParallConnectionError, RateLimitedError, ServerError

__all__ = ["DEFAULT_RETRY_POLICY", "RetryPolicy", "Safety", "call_with_retries"]

_log = logging.getLogger("parall_bridge.client")

T = TypeVar("T")

DEFAULT_MAX_RETRIES: Final = 3
"""Retries after the first attempt (so 4 attempts in all)."""
DEFAULT_INITIAL_BACKOFF: Final = 0.5
"""First backoff delay in seconds; it doubles with each retry."""
DEFAULT_MAX_BACKOFF: Final = 16.0
"""Cap of one backoff delay in seconds."""
DEFAULT_JITTER: Final = 1.0
"""Up to this many seconds of random jitter added to each backoff delay."""
DEFAULT_MAX_RETRY_AFTER: Final = 60.0
"""Longest ``Retry-After`` the client waits; a longer one raises :class:`RateLimitedError`."""
DEFAULT_RETRY_STATUSES: Final = frozenset({500, 502, 503, 504})


class Safety(enum.Enum):
    """Whether repeating a request after an ambiguous failure is harmless."""

    SAFE = "safe"
    CREATE = "create"


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"RetryPolicy.{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class RetryPolicy:
    """How :class:`~parall_bridge.ParallClient` retries failed requests.

    Attributes:
        max_retries: retries after the first attempt (0 turns retrying off).
        initial_backoff: first backoff delay in seconds, doubled per retry.
        max_backoff: cap of one backoff delay in seconds.
        jitter: up to this many random seconds added to each backoff delay.
        max_retry_after: longest ``Retry-After`` (seconds) honoured; a 429
            asking for longer raises :class:`~parall_bridge.RateLimitedError`
            at once.
        retry_statuses: 5xx statuses retried for safe requests.
    """

    max_retries: int = attrs.field(default=DEFAULT_MAX_RETRIES, validator=_non_negative)
    initial_backoff: float = attrs.field(default=DEFAULT_INITIAL_BACKOFF, validator=_non_negative)
    max_backoff: float = attrs.field(default=DEFAULT_MAX_BACKOFF, validator=_non_negative)
    jitter: float = attrs.field(default=DEFAULT_JITTER, validator=_non_negative)
    max_retry_after: float = attrs.field(default=DEFAULT_MAX_RETRY_AFTER, validator=_non_negative)
    retry_statuses: frozenset[int] = attrs.field(
        default=DEFAULT_RETRY_STATUSES, converter=frozenset
    )

    def should_retry(self, exc: BaseException, safety: Safety) -> bool:
        """Whether ``exc`` is worth another attempt of a request of this safety."""
        if isinstance(exc, RateLimitedError):
            return exc.retry_after is None or exc.retry_after <= self.max_retry_after
        if isinstance(exc, ParallConnectionError):
            return safety is Safety.SAFE or not exc.request_sent
        if isinstance(exc, ServerError):
            return safety is Safety.SAFE and exc.status in self.retry_statuses
        return False

    def wait_for(self, exc: BaseException | None, backoff_delay: float) -> float:
        """The delay before the next attempt after ``exc``: ``Retry-After`` when the
        server named one, else the backoff delay."""
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            return max(0.0, exc.retry_after)
        return backoff_delay


DEFAULT_RETRY_POLICY: Final = RetryPolicy()


async def call_with_retries(
    policy: RetryPolicy,
    safety: Safety,
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
) -> T:
    """Run ``attempt`` until it succeeds, or fails in a way ``policy`` does not retry.

    ``what`` names the request in log lines (method and path, never a secret).
    The last error is raised as is.
    """
    backoff = tenacity.wait_exponential(
        multiplier=policy.initial_backoff, max=policy.max_backoff
    ) + tenacity.wait_random(0, policy.jitter)

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return policy.wait_for(exc, backoff(state))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.upcoming_sleep
        _log.warning(
            "retrying %s after %s (attempt %d of %d) in %.2f s",
            what,
            _describe(exc),
            state.attempt_number + 1,
            policy.max_retries + 1,
            delay,
        )

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.max_retries + 1),
        wait=wait,
        retry=tenacity.retry_if_exception(lambda exc: policy.should_retry(exc, safety)),
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(attempt)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "a failure"
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return f"status {status}"
    return type(exc).__name__
