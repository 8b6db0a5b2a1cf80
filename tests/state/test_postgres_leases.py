"""Account leases and fencing of the PostgreSQL store, against a real server
(tests/state/conftest.py): at most one holder per account, epochs bumped on every new
acquisition, expiry in the database's clock, and writes of a stale holder refused in
their own transaction with nothing applied."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Sequence

import asyncpg  # type: ignore[import-untyped]  # asyncpg has no type hints
import pytest
import pytest_asyncio

from parall_bridge import LeaseLost
from parall_bridge.errors import StateStoreError
from parall_bridge.models import Chat, User
from parall_bridge.runtime import Turn
from parall_bridge.state import (
    Lease,
    PostgresStateStore,
    StateBatch,
    StoreIdentity,
    StoreMeta,
    TurnRow,
)
from parall_bridge.state import postgres as pg_store
from parall_bridge.testing import AgentAccount, FakeParallServer

from ..gateway._harness import Run, ScriptedRuntime, running
from ._postgres import query, row

URL = "https://parall.example/api"
ADA = StoreIdentity(parall_url=URL, org_id="org_1", agent_id="agent_1", account_id="ada")
BOB = StoreIdentity(parall_url=URL, org_id="org_1", agent_id="agent_2", account_id="bob")
ADA_KEY = (URL, "org_1", "agent_1")
BOB_KEY = (URL, "org_1", "agent_2")
SHORT_TTL = 0.2


async def lease_rows(dsn: str) -> list[tuple[object, ...]]:
    return await query(
        dsn,
        "SELECT parall_url, org_id, agent_id, holder, epoch FROM parall_bridge.leases "
        "ORDER BY agent_id",
    )


async def acquire_within(
    store: PostgresStateStore, key: Sequence[str], timeout: float = 10.0
) -> Lease:
    """Poll :meth:`acquire_lease` until it succeeds (a lease of another expiring)."""
    async with asyncio.timeout(timeout):
        while True:  # the expiry is in the database's clock: poll it, with a deadline
            lease = await store.acquire_lease(*key)
            if lease is not None:
                return lease
            await asyncio.sleep(0.02)


async def until_the_server_says(conn: asyncpg.Connection, sql: str, timeout: float = 10.0) -> None:
    """Poll a yes-or-no query of the server's state, with a deadline."""
    async with asyncio.timeout(timeout):
        while True:
            if await conn.fetchval(sql):
                return
            await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def stores(postgres_dsn: str) -> AsyncIterator[list[PostgresStateStore]]:
    """Two open store objects on one database (two processes, say): holders ``one``,
    ``two``, with a short lease."""
    opened = [
        PostgresStateStore(postgres_dsn, lease_ttl=SHORT_TTL, holder=name)
        for name in ("one", "two")
    ]
    await asyncio.gather(*(store.open() for store in opened))
    try:
        yield opened
    finally:
        await asyncio.gather(*(store.close() for store in opened))


# --- acquiring --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_free_lease_is_taken_at_epoch_1_expiring_in_the_servers_clock(
    postgres_dsn: str,
) -> None:
    async with PostgresStateStore(postgres_dsn, lease_ttl=30.0) as store:
        assert store.lease is None
        lease = await store.acquire_lease(URL + "/", "org_1", "agent_1")  # trailing slash
        assert lease is not None
        assert (lease.key, lease.holder, lease.epoch) == (ADA_KEY, store.holder, 1)
        assert store.lease == lease
        ((server_now,),) = await query(postgres_dsn, "SELECT clock_timestamp()")
        assert isinstance(server_now, datetime.datetime)
        remaining = (lease.expires_at - server_now).total_seconds()
        assert 25.0 < remaining <= 30.0
        assert await lease_rows(postgres_dsn) == [(*ADA_KEY, store.holder, 1)]
        # Taking one's own live lease again renews it: the same epoch, a later expiry.
        again = await store.acquire_lease(*ADA_KEY)
        assert again is not None
        assert again.epoch == 1
        assert again.expires_at >= lease.expires_at
        renewed = await store.renew_lease(again)
        assert (renewed.epoch, store.lease) == (1, renewed)
        assert renewed.expires_at >= again.expires_at


def test_the_default_holder_is_unique_to_the_object() -> None:
    first, second = (PostgresStateStore("postgresql://h/db") for _ in range(2))
    assert first.holder != second.holder
    assert first.holder.count(":") >= 2  # hostname:pid:random
    assert PostgresStateStore("postgresql://h/db", holder="web-1").holder == "web-1"
    for ttl in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lease_ttl"):
            PostgresStateStore("postgresql://h/db", lease_ttl=ttl)


@pytest.mark.asyncio
async def test_a_live_lease_of_another_holder_is_not_taken(
    stores: list[PostgresStateStore], postgres_dsn: str
) -> None:
    one, two = stores
    # A long lease for one: two may try as often as it likes while it lives.
    async with PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="one") as long_one:
        lease = await long_one.acquire_lease(*ADA_KEY)
        assert lease is not None
        for _ in range(3):
            assert await two.acquire_lease(*ADA_KEY) is None
        assert await lease_rows(postgres_dsn) == [(*ADA_KEY, "one", 1)]
        # Two found the account held: it writes nothing, not even its load.
        with pytest.raises(LeaseLost, match="holds no lease"):
            await two.load(ADA)
    assert one.lease is None


@pytest.mark.asyncio
async def test_leases_of_two_accounts_are_independent(
    stores: list[PostgresStateStore], postgres_dsn: str
) -> None:
    one, two = stores
    ada = await one.acquire_lease(*ADA_KEY)
    bob = await two.acquire_lease(*BOB_KEY)
    assert ada is not None
    assert bob is not None
    assert (ada.epoch, bob.epoch) == (1, 1)
    await one.load(ADA)
    await two.load(BOB)
    await one.write(StateBatch(sources=(row("a"),)))
    await two.write(StateBatch(sources=(row("b"),)))
    await one.release_lease(ada)  # releasing one account leaves the other alone
    await two.write(StateBatch(sources=(row("b2"),)))
    assert await two.renew_lease(bob) is not None
    assert await lease_rows(postgres_dsn) == [(*ADA_KEY, "one", 1), (*BOB_KEY, "two", 1)]


@pytest.mark.asyncio
async def test_a_store_takes_the_lease_of_its_own_agent_only(postgres_dsn: str) -> None:
    async with PostgresStateStore(postgres_dsn) as ada_store:
        await ada_store.load(ADA)
        with pytest.raises(StateStoreError, match="cannot take the lease of agent agent_2"):
            await ada_store.acquire_lease(*BOB_KEY)
        assert await ada_store.acquire_lease(*ADA_KEY) is not None
    async with PostgresStateStore(postgres_dsn) as bob_store:
        assert await bob_store.acquire_lease(*BOB_KEY) is not None
        with pytest.raises(StateStoreError, match="not for agent agent_1"):
            await bob_store.load(ADA)  # its lease is Bob's
    assert await lease_rows(postgres_dsn) == [
        (*ADA_KEY, ada_store.holder, 1),
        (*BOB_KEY, bob_store.holder, 1),
    ]


@pytest.mark.asyncio
async def test_concurrent_acquires_from_8_store_objects_have_one_winner(
    postgres_dsn: str,
) -> None:
    contenders = [PostgresStateStore(postgres_dsn, lease_ttl=30.0) for _ in range(8)]
    await asyncio.gather(*(store.open() for store in contenders))
    try:
        got = await asyncio.gather(*(store.acquire_lease(*ADA_KEY) for store in contenders))
    finally:
        await asyncio.gather(*(store.close() for store in contenders))
    winners = [lease for lease in got if lease is not None]
    assert len(winners) == 1
    assert winners[0].epoch == 1
    assert await lease_rows(postgres_dsn) == [(*ADA_KEY, winners[0].holder, 1)]


# --- expiry, takeover and fencing -------------------------------------------------------


@pytest.mark.asyncio
async def test_an_expired_lease_is_taken_over_and_the_old_holder_is_fenced(
    stores: list[PostgresStateStore], postgres_dsn: str
) -> None:
    one, two = stores
    old = await one.acquire_lease(*ADA_KEY)
    assert old is not None
    await one.load(ADA)
    await one.write(StateBatch(sources=(row("before"),), meta=StoreMeta(last_seq=1)))
    # One pauses (no renewal): two takes the account over once the lease expired.
    new = await acquire_within(two, ADA_KEY)
    assert (new.holder, new.epoch) == ("two", old.epoch + 1)
    state = await two.load(ADA)
    assert (state.sources, state.meta.last_seq) == ((row("before"),), 1)
    # One wakes up: every write is refused, and nothing of it is applied.
    stale = StateBatch(
        sources=(row("stale"),),
        deleted_sources=("before",),
        turns=(TurnRow("t", ("stale",), "s"),),
        meta=StoreMeta(last_seq=99),
    )
    for _ in range(2):  # refused again and again: the lease is gone for good
        with pytest.raises(LeaseLost, match="epoch 1\\) was lost") as refused:
            await one.write(stale)
        assert isinstance(refused.value, StateStoreError)
    with pytest.raises(LeaseLost):
        await one.renew_lease(old)
    await one.release_lease(old)  # already lost: leaves the new holder's lease alone
    assert await lease_rows(postgres_dsn) == [(*ADA_KEY, "two", 2)]
    # Taking its own lease again while two holds it: refused, still fenced.
    assert await one.acquire_lease(*ADA_KEY) is None
    with pytest.raises(LeaseLost):
        await one.write(stale)
    # The new holder writes, and reads back only its own writes.
    await two.write(StateBatch(sources=(row("after"),)))
    await two.release()
    state = await two.load(ADA)
    assert [source.key for source in state.sources] == ["before", "after"]
    assert (state.turns, state.meta.last_seq) == ((), 1)
    # The old holder's connections are still good (a refusal is not a broken connection).
    await one.release()
    with pytest.raises(LeaseLost):
        await one.load(ADA)


@pytest.mark.asyncio
async def test_a_takeover_waits_for_a_fenced_write_in_flight(
    stores: list[PostgresStateStore], postgres_dsn: str
) -> None:
    """A write that passed the fence holds the lease row (FOR SHARE) until it commits: a
    takeover that comes meanwhile, even once the lease expired, waits for it, so the new
    holder always reads what the old one committed."""
    one, two = stores
    lease = await one.acquire_lease(*ADA_KEY)
    assert lease is not None
    in_flight = await asyncpg.connect(postgres_dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    taking: asyncio.Task[Lease | None] | None = None
    try:
        write = in_flight.transaction()
        await write.start()
        passed = await in_flight.fetchval(pg_store._FENCE, *ADA_KEY, lease.holder, lease.epoch)
        assert passed == 1
        taking = asyncio.get_running_loop().create_task(
            two.acquire_lease(*ADA_KEY), name="test-takeover"
        )
        # The taker waits on the row lock (asked of the server), and the lease expires.
        await until_the_server_says(
            watcher,
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'",
        )
        await until_the_server_says(
            watcher, "SELECT expires_at <= clock_timestamp() FROM parall_bridge.leases"
        )
        assert not taking.done()
        await write.commit()
        taken = await asyncio.wait_for(taking, 10.0)
        assert taken is not None
        assert (taken.holder, taken.epoch) == ("two", 2)
    finally:
        if taking is not None and not taking.done():
            taking.cancel()
            await asyncio.gather(taking, return_exceptions=True)
        await in_flight.close()
        await watcher.close()


@pytest.mark.asyncio
async def test_a_lease_that_expired_without_a_taker_fences_its_holder_until_taken_and_loaded_again(
    stores: list[PostgresStateStore],
) -> None:
    one, _ = stores
    lease = await one.acquire_lease(*ADA_KEY)
    assert lease is not None
    await one.load(ADA)
    await one.write(StateBatch(sources=(row("a"),)))
    async with asyncio.timeout(10.0):  # wait for the expiry: poll a write until refused
        while True:
            try:
                await one.write(StateBatch(sources=(row("a"),)))
            except LeaseLost:
                break
            await asyncio.sleep(0.02)
    with pytest.raises(LeaseLost):
        await one.renew_lease(lease)
    again = await one.acquire_lease(*ADA_KEY)  # its own, expired: a new acquisition
    assert again is not None
    assert again.epoch == lease.epoch + 1
    with pytest.raises(LeaseLost):  # the old epoch is dead for good
        await one.renew_lease(lease)
    # What was loaded under the old epoch may be stale: writes wait for a new load.
    with pytest.raises(LeaseLost, match="loaded under epoch 1 of its lease, now at epoch 2"):
        await one.write(StateBatch(sources=(row("b"),)))
    await one.release()
    assert [source.key for source in (await one.load(ADA)).sources] == ["a"]
    await one.write(StateBatch(sources=(row("b"),)))


@pytest.mark.asyncio
async def test_a_released_lease_is_taken_at_once_by_another(postgres_dsn: str) -> None:
    one = PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="one")
    two = PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="two")
    async with one, two:
        lease = await one.acquire_lease(*ADA_KEY)
        assert lease is not None
        await one.load(ADA)
        await one.write(StateBatch(sources=(row("a"),)))
        assert await two.acquire_lease(*ADA_KEY) is None
        await one.release_lease(lease)
        taken = await two.acquire_lease(*ADA_KEY)  # no wait for the 30 s
        assert taken is not None
        assert (taken.holder, taken.epoch) == ("two", 2)
        with pytest.raises(LeaseLost):  # the releaser writes nothing after its release
            await one.write(StateBatch(sources=(row("late"),)))
        assert [source.key for source in (await two.load(ADA)).sources] == ["a"]
        await one.release_lease(lease)  # a second release changes nothing
        assert await lease_rows(postgres_dsn) == [(*ADA_KEY, "two", 2)]
        assert await two.renew_lease(taken) is not None


@pytest.mark.asyncio
async def test_a_store_without_a_lease_writes_as_before(postgres_dsn: str) -> None:
    """Single-process use: an object that never takes a lease is never fenced."""
    async with PostgresStateStore(postgres_dsn) as store:
        await store.load(ADA)
        await store.write(StateBatch(sources=(row("a"),)))
        assert store.lease is None
    assert await lease_rows(postgres_dsn) == []


# --- a gateway on a fenced store ----------------------------------------------------------


@pytest.mark.asyncio
async def test_a_gateway_whose_store_lost_its_lease_posts_no_reply_and_acks_nothing(
    postgres_dsn: str,
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A process paused past its lease's time to live wakes up after another took its
    account over: its next durable write is refused, and the gateway stops at once with
    ``LeaseLost`` (its ``start()`` raises it): nothing is posted and nothing acked (the new
    holder runs the event instead)."""

    async def reply(turn: Turn) -> str | None:
        await turn.send_message(f"re {turn.event.text}")
        return "ok"

    def replies() -> list[str]:
        return [
            m.content.text  # type: ignore[union-attr]
            for m in server.messages(room.id)
            if m.sender_id == agent.user_id
        ]

    key = (server.url, server.org_id, agent.user_id)
    paused = PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="paused")
    taker = PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="taker")
    runtime = ScriptedRuntime(reply)
    async with paused, taker:
        assert await paused.acquire_lease(*key) is not None
        runs: list[Run] = []

        async def scenario() -> None:
            async with running(server, agent, runtime, store=paused, shutdown_grace=0.3) as run:
                runs.append(run)
                server.post_message(room.id, ada.id, "one")
                await run.wait_for(lambda: replies() == ["re one"] and not run.pending())
                # The pause outlives the lease (expired in the server's clock); another
                # process takes the account over.
                await query(
                    postgres_dsn, "UPDATE parall_bridge.leases SET expires_at = clock_timestamp()"
                )
                taken = await taker.acquire_lease(*key)
                assert taken is not None
                assert taken.epoch == 2
                server.post_message(room.id, ada.id, "two")
                await asyncio.wait({run.task}, timeout=10.0)
                assert run.task.done()  # it stopped by itself

        with pytest.raises(LeaseLost, match="was lost"):
            await scenario()
        (run,) = runs
        assert replies() == ["re one"]
        assert len(run.pending()) == 1  # "two" is not acked
        lost = [r.getMessage() for r in caplog.records if "was lost" in r.getMessage()]
        assert lost, "the persister logs the refused write"
        assert "(not tried again: the lease is lost)" in lost[0]
        # The new holder finds what the paused one wrote while it held the lease.
        state = await taker.load(StoreIdentity(*key))
        assert state.meta.last_seq > 0


@pytest.mark.asyncio
async def test_a_gateway_sends_nothing_once_its_lease_may_have_expired_locally(
    postgres_dsn: str,
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
) -> None:
    """With the database unreachable for renewals, a lease runs out in this machine's
    clock before the server's: a turn that wants to send after that (its journal entry
    durable long ago) sends nothing, and the gateway stops with ``LeaseLost``."""
    release = asyncio.Event()
    started = asyncio.Event()

    async def reply(turn: Turn) -> str | None:
        started.set()
        await release.wait()
        await turn.send_message(f"re {turn.event.text}")
        return "ok"

    key = (server.url, server.org_id, agent.user_id)
    store = PostgresStateStore(postgres_dsn, lease_ttl=1.0, holder="slow")
    runtime = ScriptedRuntime(reply)
    async with store:
        lease = await store.acquire_lease(*key)
        assert lease is not None
        runs: list[Run] = []

        async def scenario() -> None:
            async with running(server, agent, runtime, store=store, shutdown_grace=0.3) as run:
                runs.append(run)
                server.post_message(room.id, ada.id, "one")
                await asyncio.wait_for(started.wait(), 5.0)
                await run.wait_for(lambda: not _held(store))  # never renewed: gone in 1 s
                release.set()
                await asyncio.wait({run.task}, timeout=10.0)
                assert run.task.done()  # it stopped by itself

        with pytest.raises(LeaseLost, match="expired"):
            await scenario()
        (run,) = runs
        assert [m for m in server.messages(room.id) if m.sender_id == agent.user_id] == []
        assert len(run.pending()) == 1


def _held(store: PostgresStateStore) -> bool:
    try:
        store.check_held()
    except LeaseLost:
        return False
    return True


# --- schema ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_database_of_the_previous_version_gains_leases_and_old_code_still_opens_it(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pg_store.SCHEMA_VERSION >= 2
    assert pg_store.MIGRATIONS[1].oldest_reader is None  # additive
    with monkeypatch.context() as previous:
        previous.setattr(pg_store, "SCHEMA_VERSION", 1)
        previous.setattr(pg_store, "MIGRATIONS", {})
        async with PostgresStateStore(postgres_dsn) as store:
            await store.load(ADA)
            await store.write(StateBatch(sources=(row("old"),), meta=StoreMeta(last_seq=3)))
    version = "SELECT version, oldest_reader FROM parall_bridge.schema_version"
    assert await query(postgres_dsn, version) == [(1, 1)]
    assert await query(postgres_dsn, "SELECT to_regclass('parall_bridge.leases')") == [(None,)]
    async with PostgresStateStore(postgres_dsn, lease_ttl=30.0) as store:
        lease = await store.acquire_lease(*ADA_KEY)
        assert lease is not None
        state = await store.load(ADA)
        assert (state.sources, state.meta.last_seq) == ((row("old"),), 3)
        await store.write(StateBatch(sources=(row("new"),)))
        await store.release_lease(lease)
    assert await query(postgres_dsn, version) == [(pg_store.SCHEMA_VERSION, 1)]
    # A process of the previous version (a rolling deploy) still opens, reads and writes it.
    with monkeypatch.context() as previous:
        previous.setattr(pg_store, "SCHEMA_VERSION", 1)
        previous.setattr(pg_store, "MIGRATIONS", {})
        async with PostgresStateStore(postgres_dsn) as store:
            assert [source.key for source in (await store.load(ADA)).sources] == ["old", "new"]
            await store.write(StateBatch(deleted_sources=("old",)))
    assert await query(postgres_dsn, version) == [(pg_store.SCHEMA_VERSION, 1)]


# --- views, many leases at once, process heartbeats ------------------------------------


@pytest.mark.asyncio
async def test_views_share_the_pool_and_holder_and_keep_their_own_account(
    postgres_dsn: str,
) -> None:
    parent = PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="fleet-1", pool_size=2)
    ada, bob = parent.view(), parent.view()
    with pytest.raises(StateStoreError, match="opens once the store it is a view of is open"):
        await ada.open()
    async with parent:
        await ada.open()
        await bob.open()
        assert (ada.holder, bob.holder, ada.lease_ttl) == ("fleet-1", "fleet-1", 30.0)
        assert await ada.acquire_lease(*ADA_KEY) is not None
        assert await bob.acquire_lease(*BOB_KEY) is not None
        await ada.load(ADA)
        await bob.load(BOB)
        with pytest.raises(StateStoreError, match="cannot take the lease of agent agent_2"):
            await ada.acquire_lease(*BOB_KEY)
        await ada.write(StateBatch(sources=(row("a"),)))
        await bob.write(StateBatch(sources=(row("b"),)))
        await ada.close()  # a view's close leaves the shared pool open
        await bob.write(StateBatch(sources=(row("b2"),)))
    keys = await query(postgres_dsn, "SELECT key FROM parall_bridge.sources ORDER BY key")
    assert keys == [("a",), ("b",), ("b2",)]
    with pytest.raises(StateStoreError, match="is not open"):
        await bob.write(StateBatch(sources=(row("late"),)))


@pytest.mark.asyncio
async def test_renew_leases_renews_many_in_one_go_and_names_the_lost(
    postgres_dsn: str,
) -> None:
    async with (
        PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="fleet-1") as parent,
        PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="fleet-2") as other,
    ):
        ada, bob, never = parent.view(), parent.view(), parent.view()
        for view in (ada, bob, never):
            await view.open()
        first_ada = await ada.acquire_lease(*ADA_KEY)
        first_bob = await bob.acquire_lease(*BOB_KEY)
        assert first_ada is not None
        assert first_bob is not None
        assert await parent.renew_leases([ada, bob]) == []
        assert ada.lease is not None
        assert ada.lease.expires_at >= first_ada.expires_at
        # Bob's lease expires and another process takes it: Bob is lost, Ada is not.
        await query(
            postgres_dsn,
            "UPDATE parall_bridge.leases SET expires_at = clock_timestamp() WHERE agent_id = $1",
            "agent_2",
        )
        assert await other.acquire_lease(*BOB_KEY) is not None
        assert await parent.renew_leases([ada, bob, never]) == [bob, never]
        ada.check_held()
        with pytest.raises(StateStoreError, match="another holder"):
            await parent.renew_leases([other])
        assert await parent.held_by_others() == {BOB_KEY}
        assert await other.held_by_others() == {ADA_KEY}


@pytest.mark.asyncio
async def test_heartbeats_count_the_live_processes_of_one_fleet(postgres_dsn: str) -> None:
    async with (
        PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="p1") as p1,
        PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="p2") as p2,
        PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="p3") as p3,
    ):
        assert await p1.heartbeat("fleet-a") == [None]
        assert await p2.heartbeat("fleet-a", capacity=5) == [None, 5]  # by holder
        assert await p3.heartbeat("fleet-b") == [None]  # another fleet on the same database
        assert await p1.heartbeat("fleet-a") == [None, 5]
        rows = await query(
            postgres_dsn, "SELECT holder, fleet, capacity FROM parall_bridge.processes ORDER BY 1"
        )
        assert rows == [("p1", "fleet-a", None), ("p2", "fleet-a", 5), ("p3", "fleet-b", None)]
        await p2.leave()
        assert await p1.heartbeat("fleet-a") == [None]
        # A process gone without leaving stops counting once its row expires.
        await p2.heartbeat("fleet-a", lasts=0.0)
        assert await p1.heartbeat("fleet-a") == [None]


@pytest.mark.asyncio
async def test_a_view_made_to_release_its_lease_releases_it_with_the_gateway(
    postgres_dsn: str,
) -> None:
    async with PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="fleet-1") as parent:
        keeps, releases = parent.view(), parent.view(release_lease=True)
        await keeps.open()
        await releases.open()
        assert await keeps.acquire_lease(*ADA_KEY) is not None
        assert await releases.acquire_lease(*BOB_KEY) is not None
        await keeps.load(ADA)
        await releases.load(BOB)
        await keeps.release()
        await releases.release()
        live = await query(
            postgres_dsn,
            "SELECT agent_id FROM parall_bridge.leases WHERE expires_at > clock_timestamp()",
        )
        assert live == [("agent_1",)]
        with pytest.raises(LeaseLost):
            releases.check_held()
        keeps.check_held()


@pytest.mark.asyncio
async def test_the_store_refuses_bad_settings() -> None:
    for kwargs in ({"pool_size": 0}, {"pool_size": True}, {"op_timeout": 0.0}):
        with pytest.raises(ValueError, match="must be a positive"):
            PostgresStateStore("postgresql://x@/db", **kwargs)


@pytest.mark.asyncio
async def test_a_renewal_answered_after_a_release_does_not_revive_the_lease_here(
    postgres_dsn: str,
) -> None:
    async with PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="p1") as store:
        lease = await store.acquire_lease(*ADA_KEY)
        assert lease is not None
        await store.release_lease(lease)
        store._renewed(lease, asked=0.0)  # a renewal in flight, answered after the release
        with pytest.raises(LeaseLost):
            store.check_held()


@pytest.mark.asyncio
async def test_release_all_leases_releases_every_live_lease_of_the_holder(
    postgres_dsn: str,
) -> None:
    async with (
        PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="p1") as parent,
        PostgresStateStore(postgres_dsn, lease_ttl=30.0, holder="p2") as other,
    ):
        ada, bob = parent.view(), parent.view()
        for view in (ada, bob):
            await view.open()
        assert await ada.acquire_lease(*ADA_KEY) is not None
        assert await other.acquire_lease(*BOB_KEY) is not None
        assert await parent.release_all_leases() == 1
        assert await parent.release_all_leases() == 0
        assert await other.held_by_others() == set()
        assert await parent.held_by_others() == {BOB_KEY}
