"""Working while the WebSocket is down (the hardening issue, item 4): catch-up runs at
once at start, before and independently of the WebSocket, and while it is not connected
reconciliation polls every ``outage_poll_interval``, so an outage degrades to polling."""

from __future__ import annotations

import pytest

from parall_bridge.models import Chat, User
from parall_bridge.testing import AgentAccount, FakeParallServer

from ._harness import ScriptedRuntime, running


@pytest.mark.asyncio
async def test_a_pending_message_is_handled_at_start_though_the_websocket_never_connects(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """The first catch-up does not wait for a hello, nor for a reconcile_interval."""
    server.post_message(room.id, ada.id, "while you were away")
    server.refuse_ws(100_000)  # the WebSocket is refused for the whole test
    runtime = ScriptedRuntime()
    async with running(server, agent, runtime, ready=False, reconcile_interval=600.0) as run:
        await run.wait_for(lambda: runtime.texts() == [["while you were away"]])
        await run.wait_for(lambda: not run.pending())
        assert run.gateway.stats().connection != "connected"


@pytest.mark.asyncio
async def test_messages_posted_during_an_outage_are_handled_by_polling(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """With the WebSocket down, the dispatch queue is polled every outage_poll_interval
    (not every reconcile_interval): a message posted during the outage runs within it."""
    runtime = ScriptedRuntime()
    async with running(
        server, agent, runtime, reconcile_interval=600.0, outage_poll_interval=0.5
    ) as run:
        server.refuse_ws(100_000)
        await server.close_ws(1012, "going away")
        await run.wait_for(lambda: run.gateway.stats().connection != "connected")
        server.post_message(room.id, ada.id, "during the outage")
        await run.wait_for(lambda: runtime.texts() == [["during the outage"]], timeout=3.0)
        await run.wait_for(lambda: not run.pending(), timeout=3.0)
        assert run.gateway.stats().connection != "connected"
