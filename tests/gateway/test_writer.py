"""The ordered platform writer, against the emulator."""

from __future__ import annotations

import pytest

from parall_bridge import AgentSessionStatus, AgentStep, ParallClient, StepType
from parall_bridge.gateway.ledger import Ledger
from parall_bridge.gateway.writer import PlatformWriter
from parall_bridge.testing import AgentAccount, FakeParallServer


def thinking(n: int) -> AgentStep:
    return AgentStep(
        step_type=StepType.THINKING, target_type="chat", target_id="cht_1", content={"n": n}
    )


@pytest.mark.asyncio
async def test_a_full_queue_drops_new_steps_but_never_a_status(
    client: ParallClient,
    server: FakeParallServer,
    agent: AgentAccount,
) -> None:
    session = await client.create_agent_session(
        "org_test", agent.user_id, runtime_type="test", runtime_key="k"
    )
    ledger = Ledger(capacity=10, max_attempts=3, retry_base=1.0)
    writer = PlatformWriter(client, "org_test", agent.user_id, ledger=ledger, queue_limit=3)
    writer.start(session.id)
    try:
        for n in range(6):
            writer.step(thinking(n))
        writer.status(AgentSessionStatus.IDLE)  # past the limit, and still queued
        assert await writer.flush(5.0)
    finally:
        await writer.close(1.0)
    written = [s.content for s in server.steps(agent.user_id, session.id)]
    # Nothing ran between the calls (they never block): three steps were queued, the
    # rest dropped; what was written is an ordered prefix.
    assert written == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert writer.stats.dropped == 3
    assert server.sessions(agent.user_id)[-1].status == AgentSessionStatus.IDLE
