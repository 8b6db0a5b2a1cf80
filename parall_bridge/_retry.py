"""Retrying and backing off, in one place (built on tenacity).

- One rule of what is transient (:func:`is_transient`: 5xx, 429, timeouts,
  connection errors) and one mapping of aiohttp and OS errors to the
  library's own (:func:`connection_error`).
- :class:`RetryPolicy` and :func:`call_with_retries`: the REST client's
  retries. Which failures are retried depends on whether the request is safe
  to repeat:

  - :attr:`Safety.SAFE` (reads, acks, status updates, ``send_message`` thanks
    to its idempotency key, ticket requests): 429 (waiting ``Retry-After``),
    the retryable 5xx statuses, timeouts and connection errors.
  - :attr:`Safety.CREATE` (agent sessions and steps): only when the server
    cannot have acted: 429 and a connection that was never established.
    Never after an ambiguous failure (a 5xx, a timeout, a reset mid-request),
    which could otherwise create the record twice.

  The first attempt runs on its own; tenacity takes over only after a
  failure worth retrying, so a call that succeeds pays nothing for it.
- :class:`Backoff`: the delays of the WebSocket's reconnect loop
  (:func:`repeat`) and of :func:`retry_transient` (what the gateway retries
  at start), computed by tenacity waits.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import aiohttp
import attrs
import tenacity

from .errors import (
    ParallConnectionError,
    ParallTimeoutError,
    ParallTLSError,
    RateLimitedError,
    ServerError,
)

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "Backoff",
    "BackoffCounter",
    "RetryPolicy",
    "Safety",
    "call_with_retries",
    "connection_error",
    "is_transient",
    "repeat",
    "retry_transient",
]

_log = logging.getLogger("parall_bridge.client")
_retry_log = logging.getLogger("parall_bridge.retry")

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

BACKOFF_BASE: Final = 1.85
"""Exponential base of the reconnect delay (hikari's)."""
BACKOFF_MAXIMUM: Final = 60.0
"""Cap of one reconnect delay, in seconds."""
BACKOFF_JITTER: Final = 1.0
"""Up to this many random seconds added to each reconnect delay."""
BACKOFF_RESET_AFTER: Final = 30.0
"""A connection that stayed up this long resets the backoff: the next attempt comes at once
(within the jitter)."""


# --- what is transient, and what an aiohttp error means -------------------------------------


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage worth trying again later: a 5xx, a 429, a timeout or
    a connection error (not a TLS failure: a certificate does not fix itself)."""
    if isinstance(exc, ParallTLSError):
        return False
    return isinstance(exc, ServerError | RateLimitedError | ParallConnectionError)


def connection_error(
    exc: BaseException, what: str, *, timeout: float | None = None
) -> ParallConnectionError:
    """The library's error for an aiohttp, OS or timeout error met doing ``what``.

    The one mapping used by the REST calls, the upload and the WebSocket. The
    message names ``what`` (a method and path, never a URL: a pre-signed URL
    or a ticket would leak) and the host, and says ``TLS`` for a TLS failure.
    ``request_sent`` is ``False`` only when no connection was made, so the
    server cannot have acted.
    """
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        host = f" with {exc.host}" if isinstance(exc, aiohttp.ClientConnectorError) else ""
        return ParallTLSError(f"{what}: TLS failed{host}: {_tls_reason(exc)}", request_sent=False)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ParallTimeoutError(f"{what}: timed out connecting", request_sent=False)
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.strerror or type(exc.os_error).__name__
        return ParallConnectionError(
            f"{what}: cannot connect to {exc.host}:{exc.port}: {reason}", request_sent=False
        )
    if isinstance(exc, TimeoutError):
        within = f" within {timeout:g} s" if timeout is not None else ""
        return ParallTimeoutError(f"{what}: no answer{within}")
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return ParallConnectionError(f"{what}: upgrade refused with status {exc.status}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return ParallConnectionError(f"{what}: the response was cut short")
    return ParallConnectionError(f"{what}: connection failed: {type(exc).__name__}")


def _tls_reason(exc: BaseException) -> str:
    cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
    text = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
    return str(text) if text else type(cause).__name__


# --- the REST client's policy ---------------------------------------------------------------


class Safety(enum.Enum):
    """Whether repeating a request after an ambiguous failure is harmless."""

    SAFE = "safe"
    CREATE = "create"


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        name = type(instance).__name__
        raise ValueError(f"{name}.{attribute.name} must be >= 0, got {value!r}")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be > 0, got {value!r}")


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
        if not is_transient(exc):
            return False
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

    The first attempt runs directly; only a failure worth retrying builds the
    tenacity loop, which starts from that failure (so the attempts, waits and
    log lines are those of one tenacity loop). ``what`` names the request in
    log lines (method and path, never a secret). The last error is raised as is.
    """
    try:
        return await attempt()
    except Exception as exc:
        if policy.max_retries == 0 or not policy.should_retry(exc, safety):
            raise
        first_failure: BaseException | None = exc

    async def replay_then_attempt() -> T:
        nonlocal first_failure
        if first_failure is not None:
            failure, first_failure = first_failure, None
            raise failure  # tenacity's first attempt is the one already made
        return await attempt()

    backoff = tenacity.wait_exponential(
        multiplier=policy.initial_backoff, max=policy.max_backoff
    ) + tenacity.wait_random(0, policy.jitter)

    def wait(state: tenacity.RetryCallState) -> float:
        return policy.wait_for(_failure(state), backoff(state))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        _log.warning(
            "retrying %s after %s (attempt %d of %d) in %.2f s",
            what,
            _describe(_failure(state)),
            state.attempt_number + 1,
            policy.max_retries + 1,
            state.upcoming_sleep,
        )

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.max_retries + 1),
        wait=wait,
        retry=tenacity.retry_if_exception(lambda exc: policy.should_retry(exc, safety)),
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(replay_then_attempt)


def _failure(state: tenacity.RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "a failure"
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return f"status {status}"
    return type(exc).__name__


# --- backoff: reconnects and retries at start ----------------------------------------------------


@attrs.frozen
class Backoff:
    """Delays between attempts: ``min(maximum, base ** n) + uniform(0, jitter)`` after
    the n-th failed attempt in a row (n >= 1); the first attempt after a connection
    that stayed up (n = 0) waits only the jitter.

    Used by the WebSocket's reconnects and the gateway's retries at start; the
    schedule is a tenacity wait (:meth:`wait`).

    Attributes:
        base: exponential base (1.85).
        maximum: cap of the exponential part, in seconds (60).
        jitter: up to this many random seconds added (1).
        reset_after: seconds a connection must stay up to reset the count (30).
    """

    base: float = attrs.field(default=BACKOFF_BASE, validator=_positive)
    maximum: float = attrs.field(default=BACKOFF_MAXIMUM, validator=_non_negative)
    jitter: float = attrs.field(default=BACKOFF_JITTER, validator=_non_negative)
    reset_after: float = attrs.field(default=BACKOFF_RESET_AFTER, validator=_non_negative)

    def wait(self, rng: random.Random | None = None) -> Callable[[tenacity.RetryCallState], float]:
        """The schedule as a tenacity wait: attempt number k waits ``delay(k - 1)``."""
        exponential = tenacity.wait_exponential(multiplier=1, exp_base=self.base, max=self.maximum)

        def wait(state: tenacity.RetryCallState) -> float:
            jitter = (rng or random).uniform(0.0, self.jitter) if self.jitter else 0.0
            # wait_exponential gives base ** (attempt_number - 1): n failures -> attempt n + 1.
            return (exponential(state) if state.attempt_number > 1 else 0.0) + jitter

        return wait

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next attempt, after ``failures`` failed attempts
        in a row (0: the connection had stayed up)."""
        state = _call_state()
        state.attempt_number = max(0, failures) + 1
        return self.wait(rng)(state)


def _call_state() -> tenacity.RetryCallState:
    """A tenacity call state outside a tenacity loop, to evaluate a wait for a count."""
    return tenacity.RetryCallState(tenacity.Retrying(), None, (), {})


class BackoffCounter:
    """The failures in a row of a reconnect loop, and the delay they call for."""

    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff
        self._wait = backoff.wait()
        self._state = _call_state()
        self.failures = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        self._state.attempt_number = self.failures + 1
        self.failures += 1
        return self._wait(self._state)

    def reset(self) -> None:
        """A connection stayed up: the next attempt comes at once (within the jitter)."""
        self.failures = 0


async def repeat(attempt: Callable[[], Awaitable[float | None]]) -> None:
    """Call ``attempt`` until it returns ``None``; each other result is the delay, in
    seconds, before calling it again (the WebSocket's reconnect loop: the attempt
    decides, from how the connection ended, whether and when to go again)."""

    def again(delay: float | None) -> bool:
        return delay is not None

    def wait(state: tenacity.RetryCallState) -> float:
        assert state.outcome is not None
        delay = state.outcome.result()
        return float(delay) if delay is not None else 0.0

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_result(again), wait=wait, stop=tenacity.stop_never, reraise=True
    )
    await retrying(attempt)


class _Stopped(Exception):
    """The stop event was set while waiting to retry."""


async def retry_transient(
    call: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff,
    stop: asyncio.Event,
    what: str,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T | None:
    """Call until it succeeds, retrying transient failures (:func:`is_transient`, or the
    ``transient`` rule given) with ``backoff``, for as long as it takes; ``None`` once
    ``stop`` is set (checked before the first call and while waiting). Any other error
    is raised at once.

    ``what`` completes "could not ..." in the WARNING logged before each wait.
    """
    if stop.is_set():
        return None

    async def sleep(delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
        except TimeoutError:
            return
        raise _Stopped

    def before_sleep(state: tenacity.RetryCallState) -> None:
        _retry_log.warning(
            "could not %s (%s); retrying in %.1f s", what, _failure(state), state.upcoming_sleep
        )

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(transient),
        wait=backoff.wait(),
        stop=tenacity.stop_never,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )

    async def attempt() -> T:
        # Awaited here: ``call`` may be a plain callable returning an awaitable (a lambda),
        # which tenacity would otherwise take for a synchronous function.
        return await call()

    try:
        return await retrying(attempt)
    except _Stopped:
        return None


def exponential_delay(attempts: int, *, base: float, maximum: float) -> float:
    """The delay before retry number ``attempts`` (1: the first) of a schedule that starts at
    ``base`` seconds and doubles per attempt, capped at ``maximum``: the ledger's retry
    delays of failed events (the same tenacity wait as the REST backoff, without jitter)."""
    wait = tenacity.wait_exponential(multiplier=base, max=maximum)
    state = _call_state()
    state.attempt_number = max(1, min(attempts, 64))
    return float(wait(state))
