"""The retry module on its own: the transient rule, the error mapping, retry_transient."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
import tenacity

from parall_bridge import (
    AuthenticationError,
    Backoff,
    NotFoundError,
    ParallClient,
    ParallConnectionError,
    ParallTimeoutError,
    ParallTLSError,
    ProtocolError,
    RateLimitedError,
    ServerError,
)
from parall_bridge import protocol as p
from parall_bridge._retry import (
    connection_error,
    exponential_delay,
    is_transient,
    retry_transient,
)
from parall_bridge.testing import FakeParallServer

FAST = Backoff(base=1.5, maximum=0.01, jitter=0.0, reset_after=0.5)


def api_error(cls: type[ServerError] | type[NotFoundError], status: int) -> Exception:
    return cls(status=status, message="x", method="GET", path="/p")


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (api_error(ServerError, 503), True),
        (api_error(ServerError, 501), True),
        (RateLimitedError(status=429, message="x", method="GET", path="/p"), True),
        (ParallConnectionError("reset"), True),
        (ParallTimeoutError("slow"), True),
        (ParallTLSError("bad certificate", request_sent=False), False),
        (api_error(NotFoundError, 404), False),
        (AuthenticationError(status=401, message="x", method="GET", path="/p"), False),
        (ProtocolError("not JSON"), False),
        (ValueError("a bug"), False),
    ],
)
def test_is_transient(exc: Exception, transient: bool) -> None:
    assert is_transient(exc) is transient


@pytest.mark.asyncio
async def test_connection_error_is_the_one_mapping() -> None:
    refused: aiohttp.ClientConnectorError | None = None
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    async with aiohttp.ClientSession() as session:
        try:
            await session.get(f"http://127.0.0.1:{port}/?ticket=SECRET")
        except aiohttp.ClientConnectorError as exc:
            refused = exc
    assert refused is not None
    error = connection_error(refused, "GET /x")
    assert type(error) is ParallConnectionError
    assert not error.request_sent
    assert f"GET /x: cannot connect to 127.0.0.1:{port}" in str(error)
    timeout = connection_error(TimeoutError(), "GET /x", timeout=2.5)
    assert isinstance(timeout, ParallTimeoutError)
    assert timeout.request_sent
    assert "no answer within 2.5 s" in str(timeout)
    payload = connection_error(aiohttp.ClientPayloadError("cut"), "GET /x")
    assert payload.request_sent
    assert "cut short" in str(payload)
    reset = connection_error(ConnectionResetError("peer"), "WebSocket connection")
    assert "connection failed: ConnectionResetError" in str(reset)
    assert "SECRET" not in "".join(str(e) for e in (error, timeout, payload, reset))


@pytest.mark.asyncio
async def test_retry_transient_retries_outages_then_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise api_error(ServerError, 503)
        if calls == 2:
            raise ParallConnectionError("refused", request_sent=False)
        return "ok"

    stop = asyncio.Event()
    assert await retry_transient(flaky, backoff=FAST, stop=stop, what="authenticate") == "ok"
    assert calls == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("could not authenticate (GET /p -> 503")


@pytest.mark.asyncio
async def test_retry_transient_raises_other_errors_at_once() -> None:
    calls = 0

    async def refused() -> str:
        nonlocal calls
        calls += 1
        raise AuthenticationError(status=401, message="bad key", method="GET", path="/me")

    with pytest.raises(AuthenticationError):
        await retry_transient(refused, backoff=FAST, stop=asyncio.Event(), what="authenticate")
    assert calls == 1


@pytest.mark.asyncio
async def test_retry_transient_returns_none_once_stop_is_set() -> None:
    stop = asyncio.Event()
    calls = 0

    async def down() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            stop.set()  # set while the call runs: seen by the wait that follows
        raise ParallConnectionError("refused", request_sent=False)

    slow = Backoff(base=2.0, maximum=3600.0, jitter=0.0)  # a wait that would never end
    result = await asyncio.wait_for(
        retry_transient(down, backoff=slow, stop=stop, what="connect"), timeout=5.0
    )
    assert result is None
    assert calls == 2
    assert await retry_transient(down, backoff=slow, stop=stop, what="connect") is None
    assert calls == 2  # stop already set: not called at all


def test_backoff_schedule_is_that_of_its_tenacity_wait() -> None:
    backoff = Backoff(base=2.0, maximum=10.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(6)] == [0.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.delay(10**6) == 10.0
    assert Backoff(base=0.5, maximum=10.0, jitter=0.0).delay(3) == 0.125


@pytest.mark.asyncio
async def test_a_successful_call_builds_no_tenacity_loop(
    client: ParallClient, server: FakeParallServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []

    class Counting(tenacity.AsyncRetrying):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tenacity, "AsyncRetrying", Counting)
    await client.get_me()
    await client.get_chats("org_test")
    assert built == []
    server.fail_next(p.ME, status=503)
    await client.get_me()
    assert len(built) == 1  # a retryable failure hands over to tenacity
    assert [r.status for r in server.requests if r.path == p.ME.path][-2:] == [503, 200]


@pytest.mark.asyncio
async def test_retry_transient_awaits_what_a_plain_callable_returns() -> None:
    """A lambda returning a coroutine (as the gateway passes) is awaited, not returned."""

    async def value() -> str:
        return "ok"

    assert (
        await retry_transient(lambda: value(), backoff=FAST, stop=asyncio.Event(), what="x") == "ok"
    )


@pytest.mark.asyncio
async def test_retry_transient_takes_another_rule_for_what_is_worth_retrying() -> None:
    calls = 0

    async def malformed_once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ProtocolError("not JSON", method="POST", path="/ws/ticket")
        return "ok"

    def rule(exc: BaseException) -> bool:
        return is_transient(exc) or isinstance(exc, ProtocolError)

    result = await retry_transient(
        malformed_once, backoff=FAST, stop=asyncio.Event(), what="connect", transient=rule
    )
    assert (result, calls) == ("ok", 2)


def test_exponential_delay_doubles_from_the_base_capped() -> None:
    delays = [exponential_delay(n, base=60.0, maximum=600.0) for n in (1, 2, 3, 4, 5, 64)]
    assert delays == [60.0, 120.0, 240.0, 480.0, 600.0, 600.0]
    assert exponential_delay(0, base=1.0, maximum=10.0) == 1.0  # no attempt yet: the base
