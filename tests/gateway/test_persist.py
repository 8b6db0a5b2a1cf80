"""The persister: the ledger's transitions reach the state store in the background, whoever
needs one durable waits for it, and a store that fails holds back sends and acks instead
of letting them go out on a state that is not on disk."""

from __future__ import annotations

import asyncio
import time

import pytest

from parall_bridge import LeaseLost, StateStoreError
from parall_bridge.events import EventOrigin, ParallEvent
from parall_bridge.gateway.ledger import Ledger
from parall_bridge.gateway.persist import Persister
from parall_bridge.models import Chat, User
from parall_bridge.runtime import Turn
from parall_bridge.state import MemoryStateStore, StateBatch, StoreIdentity, StoreMeta
from parall_bridge.testing import AgentAccount, FakeParallServer

from ._harness import ScriptedRuntime, running

IDENTITY = StoreIdentity("http://127.0.0.1:1", "org_test", "usr_bot")


class FlakyStore(MemoryStateStore):
    """A memory store whose next ``failures`` writes fail (a full disk, say)."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.batches: list[StateBatch] = []

    async def _write(self, batch: StateBatch) -> None:
        if self.failures:
            self.failures -= 1
            raise StateStoreError("state store flaky: disk full")
        self.batches.append(batch)
        await super()._write(batch)


async def started(store: MemoryStateStore, ledger: Ledger) -> Persister:
    await store.open()
    state = await store.load(IDENTITY)
    persister = Persister(store, ledger, state.meta, clock=time.monotonic)
    persister.start()
    return persister


def claim_and_queue(ledger: Ledger, key: str) -> None:
    ledger.claim(key, source_type="message", source_id=key, origin=EventOrigin.LIVE, now=0.0)
    ledger.offer(
        key,
        ParallEvent.message(
            chat_id="cht_1", message_id=key, sender_id="usr_ada", sender_name="Ada", text=key
        ),
    )
    ledger.queued(key)


@pytest.mark.asyncio
async def test_transitions_are_written_in_batches_and_waits_resolve() -> None:
    store = FlakyStore()
    ledger = Ledger(capacity=10, max_attempts=3, retry_base=1.0)
    persister = await started(store, ledger)
    try:
        claim_and_queue(ledger, "msg_1")
        claim_and_queue(ledger, "msg_2")
        entry = ledger.start_turn(["msg_1", "msg_2"], session_key="main")
        await asyncio.wait_for(persister.durable(ledger.version), 5)
        # Everything so far in one transaction: the claims, the queueing, the journal.
        (batch,) = store.batches
        assert {row.key for row in batch.sources} == {"msg_1", "msg_2"}
        assert [turn.turn_id for turn in batch.turns] == [entry.turn_id]
        await persister.durable(0)  # already durable: returns at once
        assert persister.writes == 1
    finally:
        assert await persister.close(5)


@pytest.mark.asyncio
async def test_a_failing_store_fails_the_waits_until_a_write_succeeds() -> None:
    store = FlakyStore(failures=2)
    ledger = Ledger(capacity=10, max_attempts=3, retry_base=1.0)
    persister = await started(store, ledger)
    try:
        claim_and_queue(ledger, "msg_1")
        with pytest.raises(StateStoreError, match="disk full"):
            await persister.durable(ledger.version)
        assert persister.failures >= 1
        # Tried again with backoff; what failed is written then, whole.
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            try:
                await persister.durable(ledger.version)
                break
            except StateStoreError:
                assert asyncio.get_running_loop().time() < deadline, "never recovered"
                await asyncio.sleep(0.05)  # the persister's backoff runs meanwhile
        assert persister.failures == 2
        state = await store._load(IDENTITY)
        assert [row.key for row in state.sources] == ["msg_1"]
        assert state.sources[0].state == "queued"
    finally:
        await persister.close(5)


class LostLeaseStore(FlakyStore):
    """A store whose lease was taken over after ``ok`` writes: every write after is
    refused (the PostgreSQL store's fencing)."""

    def __init__(self, ok: int) -> None:
        super().__init__()
        self.ok = ok
        self.refused = 0

    async def _write(self, batch: StateBatch) -> None:
        if self.ok <= 0:
            self.refused += 1
            raise LeaseLost("state store fenced: lease of agent usr_bot (epoch 1) was lost")
        self.ok -= 1
        await super()._write(batch)


@pytest.mark.asyncio
async def test_a_lost_lease_is_final_no_retry_every_wait_fails_and_close_does_not_wait() -> None:
    store = LostLeaseStore(ok=1)
    ledger = Ledger(capacity=10, max_attempts=3, retry_base=1.0)
    persister = await started(store, ledger)
    claim_and_queue(ledger, "msg_1")
    await asyncio.wait_for(persister.durable(ledger.version), 5)
    assert persister.lease_lost is None
    claim_and_queue(ledger, "msg_2")
    with pytest.raises(LeaseLost, match="was lost"):
        await asyncio.wait_for(persister.durable(ledger.version), 5)
    lost = persister.lease_lost
    assert isinstance(lost, LeaseLost)
    # Every later wait fails at once with it; nothing is tried again.
    claim_and_queue(ledger, "msg_3")
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(persister.durable(ledger.version), 5)
    assert store.refused == 1
    started_at = time.monotonic()
    assert not await persister.close(10)
    assert time.monotonic() - started_at < 5  # shutdown does not wait for the store
    assert store.refused == 1
    assert [row.key for row in (await store._load(IDENTITY)).sources] == ["msg_1"]


@pytest.mark.asyncio
async def test_meta_is_written_with_the_changes_and_heard_at_a_bounded_rate() -> None:
    store = FlakyStore()
    ledger = Ledger(capacity=10, max_attempts=3, retry_base=1.0)
    persister = await started(store, ledger)
    try:
        persister.set_last_seq(7)
        persister.set_session("ses_1")
        persister.heard()
        assert await persister.flush_once()  # (or the background write took it first)
        (written,) = [batch.meta for batch in store.batches if batch.meta is not None]
        assert (written.last_seq, written.session_id) == (7, "ses_1")
        assert written.last_heard_at is not None
        before = len(store.batches)
        persister.heard()  # within HEARD_RESOLUTION (5 s) of the last write: not written alone
        assert persister.meta.last_heard_at is not None
        assert persister.meta.last_heard_at >= written.last_heard_at
        assert await persister.flush_once()
        assert len(store.batches) == before
    finally:
        await persister.close(5)
    assert (await store._load(IDENTITY)).meta.last_seq == 7


@pytest.mark.asyncio
async def test_a_send_waits_for_the_journal_and_a_failing_store_fails_the_turn(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """No reply goes out while its turn's journal entry cannot be written: the turn fails
    (an error step, a retry later), and once the store writes again it replies once."""
    store = FlakyStore()

    async def reply(turn: Turn) -> str | None:
        await turn.send_message("re " + turn.event.text)
        return "ok"

    runtime = ScriptedRuntime(reply)
    async with running(server, agent, runtime, store=store, reconcile_interval=0.2) as run:
        store.failures = 3  # the next writes fail: the journal entry of the coming turn
        server.post_message(room.id, ada.id, "hello")
        await run.wait_for(lambda: run.gateway.stats().turns_failed >= 1)
        await run.wait_for(lambda: not run.pending() and run.gateway.stats().turns_succeeded == 1)
        assert run.gateway.stats().store_failures >= 1
    replies = [m for m in server.messages(room.id) if m.sender_id == agent.user_id]
    assert len(replies) == 1
    errors = [s for s in run.steps() if s.step_type == "error"]
    assert any("disk full" in s.content["message"] for s in errors)


@pytest.mark.asyncio
async def test_a_run_keeps_its_session_and_last_seq_in_the_store(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    store = MemoryStateStore()
    async with running(server, agent, store=store) as run:
        server.post_message(room.id, ada.id, "hello")
        await run.wait_for(lambda: not run.pending())

        async def session_stored() -> StoreMeta:
            return (await store._load(StoreIdentity(server.url, server.org_id, agent.user_id))).meta

        deadline = asyncio.get_running_loop().time() + 5
        while (await session_stored()).session_id != run.gateway.session_id:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)  # polled
        last_seq = run.gateway.ws.last_seq if run.gateway.ws else 0
    meta = await session_stored()
    assert meta.session_id is None  # shut down: nothing to complete at the next start
    assert meta.last_seq == last_seq > 0
    assert meta.last_heard_at is not None
