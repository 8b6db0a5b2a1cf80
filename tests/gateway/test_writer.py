"""The platform writer, against the emulator: coalesced statuses, ordered streams written
concurrently, bounded queues that count what they shed, a counted shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from parall_bridge import AgentSessionStatus, AgentStep, ParallClient, StepType
from parall_bridge import protocol as p
from parall_bridge.gateway.ledger import AckPlan, Ledger
from parall_bridge.gateway.writer import PlatformWriter
from parall_bridge.testing import AgentAccount, FakeParallServer

ORG = "org_test"


def thinking(n: object) -> AgentStep:
    return AgentStep(
        step_type=StepType.THINKING, target_type="chat", target_id="cht_1", content={"n": n}
    )


@pytest_asyncio.fixture
async def session_id(client: ParallClient, agent: AgentAccount) -> str:
    session = await client.create_agent_session(
        ORG, agent.user_id, runtime_type="test", runtime_key="k"
    )
    return session.id


def make_writer(
    client: ParallClient, agent: AgentAccount, *, queue_limit: int = 100, concurrency: int = 8
) -> PlatformWriter:
    ledger = Ledger(capacity=10, max_attempts=3, retry_base=1.0)
    return PlatformWriter(
        client, ORG, agent.user_id, ledger=ledger, queue_limit=queue_limit, concurrency=concurrency
    )


@pytest_asyncio.fixture
async def writer(
    client: ParallClient, agent: AgentAccount, session_id: str
) -> AsyncIterator[PlatformWriter]:
    w = make_writer(client, agent, concurrency=2)
    w.start(session_id)
    try:
        yield w
    finally:
        await w.close(1.0)


def patches(server: FakeParallServer) -> list[object]:
    """The statuses of the session PATCH requests, in the order answered."""
    return [
        r.json.get("status") if isinstance(r.json, dict) else None
        for r in server.requests
        if r.method == "PATCH" and "/sessions/" in r.path
    ]


def step_requests(server: FakeParallServer) -> list[str]:
    return [
        str(r.json["content"]["n"])
        for r in server.requests
        if r.method == "POST" and r.path.endswith("/steps") and isinstance(r.json, dict)
    ]


@pytest.mark.asyncio
async def test_only_the_latest_status_is_written(
    writer: PlatformWriter, server: FakeParallServer, agent: AgentAccount
) -> None:
    writer.status(AgentSessionStatus.ACTIVE)
    assert await writer.flush(5.0)
    # A turn's idle, then the next turn's active, before the writer got to them.
    writer.status(AgentSessionStatus.IDLE)
    writer.status(AgentSessionStatus.ACTIVE)
    assert await writer.flush(5.0)
    writer.status(AgentSessionStatus.IDLE)
    writer.status(AgentSessionStatus.ACTIVE)
    writer.status(AgentSessionStatus.IDLE)
    assert await writer.flush(5.0)
    assert patches(server) == ["active", "idle"]
    assert writer.stats.statuses_written == 2
    assert writer.stats.statuses_coalesced == 4  # six asked for, two written
    assert server.sessions(agent.user_id)[-1].status == AgentSessionStatus.IDLE


@pytest.mark.asyncio
async def test_streams_write_concurrently_and_each_keeps_its_order(
    writer: PlatformWriter, server: FakeParallServer, agent: AgentAccount, session_id: str
) -> None:
    server.delay_next(p.CREATE_AGENT_STEP, 0.5, times=3)
    writer.step(thinking("a1"), "chat-a")
    writer.step(thinking("a2"), "chat-a")
    writer.step(thinking("b1"), "chat-b")
    assert await writer.flush(10.0)
    # a1 and b1 go out together; a2 only once a1 is written. One queue for all (a1, a2,
    # b1 one at a time) would have answered b1 last.
    answered = step_requests(server)
    assert sorted(answered[:2]) == ["a1", "b1"]
    assert answered[2] == "a2"
    written = [s.content["n"] for s in server.steps(agent.user_id, session_id)]
    assert written.index("a1") < written.index("a2")
    assert writer.stats.steps_written == 3


@pytest.mark.asyncio
async def test_a_full_queue_sheds_new_steps_counted_and_logged(
    client: ParallClient,
    server: FakeParallServer,
    agent: AgentAccount,
    session_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = make_writer(client, agent, queue_limit=3)
    writer.start(session_id)
    try:
        with caplog.at_level(logging.WARNING, logger="parall_bridge.gateway.writer"):
            for n in range(6):
                writer.step(thinking(n))
            writer.status(AgentSessionStatus.IDLE)  # past the limit, and still written
        assert await writer.flush(5.0)
    finally:
        await writer.close(1.0)
    written = [s.content for s in server.steps(agent.user_id, session_id)]
    # Nothing ran between the calls (they never block): three steps were queued, the
    # rest shed; what was written of the stream is an ordered prefix.
    assert written == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert writer.stats.shed == 3
    assert server.sessions(agent.user_id)[-1].status == AgentSessionStatus.IDLE
    warnings = [r.getMessage() for r in caplog.records if "shed" in r.getMessage()]
    assert len(warnings) == 1  # one warning per interval, with the running count
    assert "1 shed since start" in warnings[0]


@pytest.mark.asyncio
async def test_mark_received_is_bounded_too(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount, session_id: str
) -> None:
    writer = make_writer(client, agent, queue_limit=2)
    writer.start(session_id)
    try:
        for n in range(5):
            writer.mark_received("message", f"msg_{n}")
        assert await writer.flush(5.0)
    finally:
        await writer.close(1.0)
    assert writer.stats.marks_sent == 2
    assert writer.stats.shed == 3


@pytest.mark.asyncio
async def test_completed_is_written_after_every_step_before_it(
    writer: PlatformWriter, server: FakeParallServer
) -> None:
    server.delay_next(p.CREATE_AGENT_STEP, 0.2, times=2)
    writer.step(thinking(1), "chat-a")
    writer.step(thinking(2), "chat-b")
    writer.status(AgentSessionStatus.COMPLETED)
    assert await writer.flush(5.0)
    kinds = [
        "step" if r.path.endswith("/steps") else "status"
        for r in server.requests
        if "/sessions/" in r.path and r.method in ("POST", "PATCH")
    ]
    assert kinds[-3:] == ["step", "step", "status"]


@pytest.mark.asyncio
async def test_acks_go_before_steps(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount, session_id: str
) -> None:
    writer = make_writer(client, agent, concurrency=1)
    for n in range(3):
        writer.step(thinking(n))
    writer.ack(AckPlan(source=None, dispatch_ids=("dsp_x",), version=0))
    writer.start(session_id)  # nothing is written before the session is known
    try:
        assert await writer.flush(5.0)
    finally:
        await writer.close(1.0)
    order = [
        "ack" if "/dispatch/" in r.path else "step"
        for r in server.requests
        if r.method == "POST" and ("/dispatch/" in r.path or r.path.endswith("/steps"))
    ]
    assert order == ["ack", "step", "step", "step"]


@pytest.mark.asyncio
async def test_shutdown_counts_what_it_abandons(
    client: ParallClient,
    server: FakeParallServer,
    agent: AgentAccount,
    session_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = make_writer(client, agent, concurrency=1)
    writer.start(session_id)
    server.delay_next(p.CREATE_AGENT_STEP, 5.0)
    writer.step(thinking(1))
    writer.step(thinking(2))
    with caplog.at_level(logging.WARNING, logger="parall_bridge.gateway.writer"):
        await writer.close(0.2)
    assert writer.stats.abandoned == 2  # one in flight, one waiting
    assert any("2 platform write(s)" in r.getMessage() for r in caplog.records)
    writer.step(thinking(3))  # after close: queued, never written, nothing running
    assert writer.pending == 2  # the waiting one and this one (the in-flight one stopped)
    assert not any(t.get_name() == "parall-gateway-writer" for t in asyncio.all_tasks())


@pytest.mark.asyncio
async def test_backlog_is_reported(writer: PlatformWriter, server: FakeParallServer) -> None:
    server.delay_next(p.CREATE_AGENT_STEP, 0.2, times=2)
    for n in range(5):
        writer.step(thinking(n), "s")
    assert writer.pending == 5
    assert writer.stats.backlog_max == 5
    assert await writer.flush(5.0)
    assert writer.pending == 0


@pytest.mark.asyncio
async def test_a_mark_received_made_moot_by_its_ack_is_not_sent(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount, session_id: str
) -> None:
    writer = make_writer(client, agent, concurrency=1)
    writer.start(session_id)
    try:
        server.delay_next(p.CREATE_AGENT_STEP, 0.3)
        writer.step(thinking(1))  # the only worker is busy with this one
        writer.mark_received("message", "msg_1", "msg_1")
        writer.mark_received("message", "msg_2", "msg_2")
        writer.ack(AckPlan("msg_1", source=("message", "msg_1"), version=0))  # msg_1 is done
        assert await writer.flush(5.0)
    finally:
        await writer.close(1.0)
    received = [r.json for r in server.requests if r.path.endswith("/dispatch/received")]
    assert received == [{"source_type": "message", "source_id": "msg_2"}]
    assert writer.stats.marks_skipped == 1
    assert writer.stats.marks_sent == 1
