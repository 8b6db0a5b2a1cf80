"""ParallWs lifecycle edge cases: disconnect from a handler, async state handlers at
disconnect, a ticket callable that raises anything, connect() while reconnecting, a failed
connect's HTTP session, and wait_closed() begun before connect()."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

from parall_bridge import (
    ParallClient,
    ParallError,
    WebSocketClosedError,
    WsTicket,
)
from parall_bridge import protocol as p
from parall_bridge.testing import FakeParallServer
from parall_bridge.ws import ConnectionState, ParallWs, StateChange

from .conftest import library_tasks
from .gateway._harness import FAST_BACKOFF


async def waiting_for_close(ws: ParallWs) -> asyncio.Task[None]:
    """A supervisor task already waiting in ``ws.wait_closed()``."""
    started = asyncio.Event()

    async def supervise() -> None:
        started.set()
        await ws.wait_closed()

    supervisor = asyncio.get_running_loop().create_task(supervise())
    await started.wait()
    return supervisor


@pytest.mark.asyncio
async def test_disconnect_leaves_no_async_state_handler_task(client: ParallClient) -> None:
    """Issue 7: "await disconnect(): ... cancel and await every task it started ... after it
    no task is left pending"; on_state_change handlers may be async."""
    before = library_tasks()
    seen: list[ConnectionState] = []

    async def on_state(change: StateChange) -> None:
        await asyncio.sleep(0.05)  # e.g. the host reports it over the network
        seen.append(change.state)

    ws = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF)
    ws.on_state_change(on_state)
    await ws.connect()
    await ws.disconnect()
    left = library_tasks(before)
    try:
        assert left == set()
    finally:
        await asyncio.gather(*left, return_exceptions=True)


@pytest.mark.asyncio
async def test_disconnect_from_an_async_handler_completes(
    client: ParallClient, server: FakeParallServer
) -> None:
    """Issue 7: disconnect() closes with 1000 and afterwards wait_closed() returns."""
    before = library_tasks()
    ada = server.add_user("Ada")
    agent_id = (await client.get_me()).id
    room = server.add_chat(type="direct", members=[ada.id, agent_id])
    ws = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF)

    async def on_message(_: object) -> None:
        await ws.disconnect()  # e.g. the bot was told to stop

    ws.on(p.FRAME_MESSAGE_NEW, on_message)
    await ws.connect()
    try:
        server.post_message(room.id, ada.id, "stop")
        await asyncio.wait_for(ws.wait_closed(), 2.0)
        assert ws.state is ConnectionState.DISCONNECTED
    finally:
        # Unblock the handler while it still waits for itself (before it cancels and
        # gathers itself, which never ends), then clean up from outside.
        left = library_tasks(before)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await ws.disconnect()


@pytest.mark.asyncio
async def test_connect_raises_when_get_ticket_raises_a_non_parall_error() -> None:
    """Issue 7: connect() "raises if the first connection cannot be made"."""

    async def get_ticket() -> WsTicket:
        raise RuntimeError("the ticket service is unreachable")

    ws = ParallWs(get_ticket, "ws://127.0.0.1:9/ws", backoff=FAST_BACKOFF)
    outcome: BaseException | None = None
    try:
        try:
            await asyncio.wait_for(ws.connect(), 2.0)
        except (TimeoutError, RuntimeError, ParallError) as exc:
            outcome = exc
        # The ticket's error as raised, or a ParallError: anything but hanging.
        assert isinstance(outcome, RuntimeError | ParallError), f"connect() hung: {outcome!r}"
    finally:
        await ws.disconnect()


@pytest.mark.asyncio
async def test_reconnect_survives_a_ticket_callable_raising_a_non_parall_error(
    client: ParallClient, server: FakeParallServer
) -> None:
    """Issue 7: reconnect with a fresh ticket for every attempt, with backoff."""
    calls = 0

    async def get_ticket() -> WsTicket:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("name resolution failed")  # the host's own ticket fetcher
        return await client.get_ws_ticket()

    ws = ParallWs(get_ticket, backoff=FAST_BACKOFF)
    try:
        await ws.connect()
        await server.close_ws(p.CLOSE_SERVICE_RESTART)
        await server.wait_for(
            lambda: calls >= 3 and ws.state is ConnectionState.CONNECTED, timeout=3.0
        )
    finally:
        await ws.disconnect()


@pytest.mark.asyncio
async def test_connect_while_reconnecting_returns_once_connected(
    client: ParallClient, server: FakeParallServer
) -> None:
    """DESIGN.md 2 / issue 7: "await connect() (returns once hello arrived)"."""
    ws = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF)
    try:
        await ws.connect()
        server.refuse_ws(3)
        await server.close_ws(p.CLOSE_SERVICE_RESTART)
        await server.wait_for(lambda: ws.state is ConnectionState.RECONNECTING)
        await asyncio.wait_for(ws.connect(), 5.0)
        assert ws.state is ConnectionState.CONNECTED
    finally:
        await ws.disconnect()


@pytest.mark.asyncio
async def test_a_failed_connect_does_not_leak_its_http_session(server: FakeParallServer) -> None:
    """Issue 7: connect() raises when the first connection cannot be made and the caller
    decides what to do; no "Unclosed client session" should follow a caller giving up."""
    server.refuse_ws(1, status=503)
    other = server.add_agent("Other", api_key="pk_other_key_0123456789")
    async with ParallClient(server.url, other.api_key) as c:
        ws = ParallWs(c.get_ws_ticket, backoff=FAST_BACKOFF)
        with pytest.raises(ParallError):
            await ws.connect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del ws
        gc.collect()
    assert [str(w.message) for w in caught if "Unclosed" in str(w.message)] == []


@pytest.mark.asyncio
async def test_wait_closed_started_before_connect_sees_a_fatal_close(
    client: ParallClient, server: FakeParallServer
) -> None:
    """Issue 7: a fatal close "makes await wait_closed() raise WebSocketClosedError"."""
    ws = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF)
    supervisor = await waiting_for_close(ws)  # before the connection is made
    try:
        await ws.connect()
        await server.close_ws(p.CLOSE_FORBIDDEN, "key revoked")
        with pytest.raises(WebSocketClosedError):
            await asyncio.wait_for(asyncio.shield(supervisor), 3.0)
    finally:
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)
        await ws.disconnect()


@pytest.mark.asyncio
async def test_connect_right_after_a_close_for_good_does_not_hang(
    client: ParallClient, server: FakeParallServer
) -> None:
    """A connect() made while the client is ending (closed for good) waits for the end,
    then connects afresh."""
    ws = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF, reconnect=False)
    try:
        await ws.connect()
        await server.close_ws(p.CLOSE_SERVICE_RESTART)
        with pytest.raises(WebSocketClosedError):
            async with asyncio.timeout(3.0):
                await ws.wait_closed()
        try:
            async with asyncio.timeout(3.0):
                await ws.connect()  # the caller's retry after a lost connection
        except TimeoutError:
            pytest.fail("connect() after a close for good hung")
        assert ws.state is ConnectionState.CONNECTED
    finally:
        await ws.disconnect()


@pytest.mark.asyncio
async def test_disconnect_from_a_handler_through_wait_for_completes(
    client: ParallClient, server: FakeParallServer
) -> None:
    """A handler bounding its disconnect() with asyncio.wait_for (a task of its own) is
    not waited for by that disconnect(), which completes and closes its HTTP session."""
    ada = server.add_user("Ada")
    agent_id = (await client.get_me()).id
    room = server.add_chat(type="direct", members=[ada.id, agent_id])
    ws = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF, handler_shutdown_timeout=1.0)
    outcome: list[str] = []

    async def on_message(_: object) -> None:
        try:
            await asyncio.wait_for(ws.disconnect(), 5.0)
            outcome.append("disconnected")
        except BaseException as exc:
            outcome.append(type(exc).__name__)
            raise

    ws.on(p.FRAME_MESSAGE_NEW, on_message)
    await ws.connect()
    try:
        server.post_message(room.id, ada.id, "stop")
        await server.wait_for(lambda: bool(outcome), timeout=4.0)
        assert outcome == ["disconnected"]
        assert ws._session is None  # the HTTP session it made was closed
    finally:
        await ws.disconnect()


@pytest.mark.asyncio
async def test_wait_closed_begun_before_a_failed_first_connect_returns(
    client: ParallClient, server: FakeParallServer
) -> None:
    """After a failed first connect() nothing runs: a wait_closed() begun earlier returns."""
    server.refuse_ws(1, status=503)
    ws = ParallWs(client.get_ws_ticket, backoff=FAST_BACKOFF)
    supervisor = await waiting_for_close(ws)
    try:
        with pytest.raises(ParallError):
            await ws.connect()
        assert ws.state is ConnectionState.DISCONNECTED
        done, _ = await asyncio.wait({supervisor}, timeout=2.0)
        assert done, "wait_closed() still waits after the failed connect"
    finally:
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)
        await ws.disconnect()
