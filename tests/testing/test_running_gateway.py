"""``running_gateway``: a host's runtime in a real gateway against the emulator."""

from __future__ import annotations

import pytest

from parall_bridge import (
    AgentRuntime,
    AuthenticationError,
    MemoryStateStore,
    StepType,
    Turn,
    protocol,
)
from parall_bridge.testing import AgentAccount, FakeParallServer, running_gateway

from ..conftest import library_tasks


class Reverse(AgentRuntime):
    async def run_turn(self, turn: Turn) -> str | None:
        turn.reasoning("reversing", done=True)
        await turn.send_message(turn.event.text[::-1])
        return "done"


@pytest.mark.asyncio
async def test_the_block_runs_a_ready_gateway_and_leaving_it_flushes_everything(
    parall_server: FakeParallServer,
) -> None:
    server = parall_server
    agent = server.add_agent("Bot")
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    async with running_gateway(server, agent, Reverse(), reconcile_interval=5.0) as gateway:
        assert gateway.stats().connection == "connected"
        server.post_message(chat.id, ada.id, "hello")
        await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
    assert [m.content.text for m in server.messages(chat.id)] == ["hello", "olleh"]  # type: ignore[union-attr]
    types = [s.step_type for s in server.steps(agent.user_id)]
    assert types == [StepType.INPUT, StepType.THINKING, StepType.TEXT]
    assert server.sessions(agent.user_id)[-1].status == "completed"
    assert server.dispatch_items(agent.user_id) == []
    assert not library_tasks()


@pytest.mark.asyncio
async def test_a_refused_key_is_raised_from_the_block(parall_server: FakeParallServer) -> None:
    agent = AgentAccount(user=parall_server.add_user("Nobody"), api_key="pk_not_issued_0123")
    with pytest.raises(AuthenticationError):
        async with running_gateway(parall_server, agent, Reverse()):
            pytest.fail("the block must not run")  # pragma: no cover


@pytest.mark.asyncio
async def test_an_error_in_the_block_stops_the_gateway_and_propagates(
    parall_server: FakeParallServer,
) -> None:
    agent = parall_server.add_agent("Bot")
    with pytest.raises(LookupError, match="the test's own"):
        async with running_gateway(parall_server, agent, Reverse()):
            raise LookupError("the test's own")
    assert parall_server.sessions(agent.user_id)[-1].status == "completed"
    assert not library_tasks()


@pytest.mark.asyncio
async def test_a_store_given_to_two_blocks_carries_state_across_the_restart(
    parall_server: FakeParallServer,
) -> None:
    """A host tests what a restart does: an ack lost to an outage is sent by the next
    gateway on the same store, without running the turn again."""
    server = parall_server
    agent = server.add_agent("Bot")
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    store = MemoryStateStore()
    runtime = Reverse()
    server.fail_next(protocol.ACK_DISPATCH, status=503, times=1000)
    async with running_gateway(server, agent, runtime, store=store) as gateway:
        server.post_message(chat.id, ada.id, "hello")
        # the client retries the ack with its default backoff first (seconds)
        await server.wait_for(lambda: gateway.stats().acks_failed == 1, timeout=60)
    assert server.dispatch_items(agent.user_id)  # the ack never arrived
    server.faults.clear()
    async with running_gateway(server, agent, runtime, store=store) as gateway:
        await server.wait_for(lambda: not server.dispatch_items(agent.user_id))
        assert gateway.stats().turns_started == 0
