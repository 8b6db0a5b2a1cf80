"""GatewayFleet on a shared PostgreSQL store (a real throwaway server) against the
emulator: accounts run only where their lease is held, processes share them fairly, a
joining process gets its share handed over, a lost lease stops its account at once, and
a takeover runs the journal first without a second reply."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from parall_bridge import GatewayConfig, GatewayFleet, StateStoreError
from parall_bridge.gateway.fleet import HELD_ELSEWHERE
from parall_bridge.models import User
from parall_bridge.runtime import Turn
from parall_bridge.state import PostgresStateStore
from parall_bridge.testing import FakeParallServer

from ..conftest import library_tasks
from ..state._postgres import query
from ._harness import FAST_BACKOFF, ScriptedRuntime
from .test_fleet import Accounts

TTL = 1.5
"""The tests' lease time to live: looks every 0.5 s, takeovers within seconds."""


@pytest.fixture
def accounts(server: FakeParallServer, ada: User) -> Accounts:
    return Accounts(server, ada)


class Process:
    """One fleet "process": its own store object (its own holder) on the shared
    database, running the same accounts."""

    def __init__(
        self,
        dsn: str,
        name: str,
        accounts: Accounts,
        configs: list[GatewayConfig],
        *,
        capacity: int | None = None,
    ) -> None:
        self.name = name
        self.store = PostgresStateStore(dsn, lease_ttl=TTL, holder=name)
        self.fleet = GatewayFleet(
            configs,
            accounts.runtime_factory,
            store=self.store,
            backoff=FAST_BACKOFF,
            capacity=capacity,
        )
        self.abort = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self.fleet.start(self.abort), name=f"test-fleet-{self.name}"
        )

    async def stop(self) -> None:
        self.abort.set()
        if self.task is not None:
            await asyncio.wait_for(asyncio.shield(self.task), 30.0)

    def holding(self) -> set[str]:
        return {
            account_id
            for account_id, account in self.fleet.stats()["accounts"].items()
            if account["state"] == "running"
        }


@contextlib.asynccontextmanager
async def processes(*procs: Process) -> AsyncIterator[None]:
    before = library_tasks()
    try:
        for proc in procs:
            proc.start()
        yield
    finally:
        for proc in procs:
            proc.abort.set()
        for proc in procs:
            if proc.task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(proc.task), 30.0)
                finally:
                    if not proc.task.done():
                        proc.task.cancel()
                        await asyncio.gather(proc.task, return_exceptions=True)
    assert library_tasks(before) == set(), "a fleet left tasks running"


async def until(accounts: Accounts, predicate: Callable[[], bool]) -> None:
    """Poll a condition with a deadline long enough for a takeover on a loaded machine."""
    await accounts.server.wait_for(predicate, timeout=20.0)


async def live_leases(dsn: str) -> dict[str, str]:
    """agent id -> holder of each live lease."""
    rows = await query(
        dsn,
        "SELECT agent_id, holder FROM parall_bridge.leases WHERE expires_at > clock_timestamp()",
    )
    return {str(agent): str(holder) for agent, holder in rows}


def replies(accounts: Accounts, account_id: str) -> list[str]:
    agent = accounts.agents[account_id]
    return [
        m.content.text  # type: ignore[union-attr]
        for m in accounts.server.messages(accounts.chats[account_id].id)
        if m.sender_id == agent.user_id
    ]


async def reply(turn: Turn) -> str | None:
    for event in turn.events:
        await turn.send_message(f"re {event.text}")
    return "ok"


# --- one process ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_fleet_on_a_shared_store_takes_every_lease_runs_and_releases_them(
    postgres_dsn: str, accounts: Accounts
) -> None:
    accounts.make_runtime = lambda _: ScriptedRuntime(reply)
    configs = [accounts.add(name, state_path="ignored.db") for name in ("a", "b", "c")]
    proc = Process(postgres_dsn, "p1", accounts, configs)
    async with processes(proc):
        await asyncio.wait_for(proc.fleet.wait_ready(), 15.0)
        assert proc.holding() == {"a", "b", "c"}
        leases = await live_leases(postgres_dsn)
        assert sorted(leases) == sorted(accounts.agents[n].user_id for n in "abc")
        assert set(leases.values()) == {"p1"}
        stats = proc.fleet.stats()["accounts"]["a"]["gateway"]
        assert stats is not None
        assert stats.store == proc.store.description  # the shared store, not state_path
        for name in "abc":
            accounts.post(name, f"hello {name}")
        await until(accounts, lambda: all(replies(accounts, n) == [f"re hello {n}"] for n in "abc"))
        rows = await query(postgres_dsn, "SELECT holder FROM parall_bridge.processes")
        assert rows == [("p1",)]
    # A graceful shutdown released every lease and deleted the heartbeat row.
    assert await live_leases(postgres_dsn) == {}
    assert await query(postgres_dsn, "SELECT holder FROM parall_bridge.processes") == []
    assert not proc.store.is_open
    assert {a["state"] for a in proc.fleet.stats()["accounts"].values()} == {"stopped"}
    assert all(runtime.stopped for rs in accounts.runtimes.values() for runtime in rs)


@pytest.mark.asyncio
async def test_an_unreachable_store_fails_the_fleet_start(
    postgres_dsn: str, accounts: Accounts
) -> None:
    nowhere = postgres_dsn.replace("host=", "host=/nonexistent")
    fleet = GatewayFleet(
        [accounts.add("a")],
        accounts.runtime_factory,
        store=PostgresStateStore(nowhere, op_timeout=2.0),
    )
    with pytest.raises(StateStoreError, match="open failed"):
        await fleet.start(asyncio.Event())
    assert accounts.runtimes == {}


# --- several processes -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_joining_process_gets_its_fair_share_handed_over(
    postgres_dsn: str, accounts: Accounts
) -> None:
    accounts.make_runtime = lambda _: ScriptedRuntime(reply)
    names = ["a", "b", "c", "d"]
    configs = [accounts.add(name) for name in names]
    first = Process(postgres_dsn, "p1", accounts, configs)
    second = Process(postgres_dsn, "p2", accounts, configs)
    async with processes(first):
        await asyncio.wait_for(first.fleet.wait_ready(), 15.0)
        assert first.holding() == set(names)
        async with processes(second):
            await until(accounts, lambda: len(first.holding()) == 2 and len(second.holding()) == 2)
            assert first.holding() | second.holding() == set(names)
            moved = second.holding()
            states = first.fleet.stats()["accounts"]
            assert {states[n]["state"] for n in moved} == {"not_held"}
            leases = await live_leases(postgres_dsn)
            assert sorted(leases.values()) == ["p1", "p1", "p2", "p2"]
            for name in names:
                accounts.post(name, f"hi {name}")
            await until(
                accounts, lambda: all(replies(accounts, n) == [f"re hi {n}"] for n in names)
            )
        # The second process left gracefully: the first takes everything back.
        await until(accounts, lambda: first.holding() == set(names))
    for name in names:
        assert replies(accounts, name) == [f"re hi {name}"]


@pytest.mark.asyncio
async def test_capacity_caps_a_process_and_a_full_fleet_is_ready_holding_none(
    postgres_dsn: str, accounts: Accounts
) -> None:
    configs = [accounts.add(name) for name in ("a", "b", "c")]
    capped = Process(postgres_dsn, "capped", accounts, configs, capacity=1)
    async with processes(capped):
        await asyncio.wait_for(capped.fleet.wait_ready(), 15.0)
        assert len(capped.holding()) == 1
        totals = capped.fleet.stats()["totals"]
        assert (totals["running"], totals["not_held"]) == (1, 2)
        late = Process(postgres_dsn, "late", accounts, configs, capacity=3)
        async with processes(late):
            await until(accounts, lambda: len(late.holding()) == 2)
            assert late.holding().isdisjoint(capped.holding())
            # A third process finds nothing free: it is ready at once, holding none.
            idle = Process(postgres_dsn, "idle", accounts, configs, capacity=1)
            async with processes(idle):
                await asyncio.wait_for(idle.fleet.wait_ready(), 15.0)
                assert idle.holding() == set()
                assert idle.fleet.stats()["totals"]["not_held"] == 3


@pytest.mark.asyncio
async def test_a_lost_lease_stops_its_account_at_once_and_another_process_takes_it(
    postgres_dsn: str, accounts: Accounts, caplog: pytest.LogCaptureFixture
) -> None:
    accounts.make_runtime = lambda _: ScriptedRuntime(reply)
    configs = [accounts.add(name) for name in ("a", "b")]
    first = Process(postgres_dsn, "p1", accounts, configs)
    async with processes(first):
        await asyncio.wait_for(first.fleet.wait_ready(), 15.0)
        agent_a = accounts.agents["a"].user_id
        # Another holder takes account a's lease (its expiry forced: a pause, say).
        await query(
            postgres_dsn,
            "UPDATE parall_bridge.leases SET expires_at = clock_timestamp() WHERE agent_id = $1",
            agent_a,
        )
        async with PostgresStateStore(postgres_dsn, lease_ttl=60.0, holder="thief") as thief:
            assert await thief.acquire_lease(accounts.server.url, accounts.server.org_id, agent_a)
            await until(
                accounts, lambda: first.fleet.stats()["accounts"]["a"]["state"] == "not_held"
            )
            assert any("account 'a': its lease was lost" in r.getMessage() for r in caplog.records)
            # Then it shows who has it (the fleet tried to take it back).
            await until(
                accounts,
                lambda: first.fleet.stats()["accounts"]["a"]["reason"] == HELD_ELSEWHERE,
            )
            assert first.fleet.stats()["accounts"]["b"]["state"] == "running"
            accounts.post("a", "while stolen")
            accounts.post("b", "still here")
            await until(accounts, lambda: replies(accounts, "b") == ["re still here"])
            assert replies(accounts, "a") == []  # nobody runs it: the thief runs no gateway
            # The thief lets it go: the fleet takes it back and answers what waited.
            lease = thief.lease
            assert lease is not None
            await thief.release_lease(lease)
            await until(accounts, lambda: replies(accounts, "a") == ["re while stolen"])
            assert first.fleet.stats()["accounts"]["a"]["state"] == "running"


@pytest.mark.asyncio
async def test_a_takeover_runs_the_journal_first_without_a_second_reply(
    postgres_dsn: str, accounts: Accounts
) -> None:
    """A process whose turn replied and then hung loses its lease (it stopped renewing:
    a long pause); the process that takes the account over runs that turn again first,
    with the same reply keys, so the platform keeps one reply; and the first process
    posts nothing more."""
    hang = asyncio.Event()
    first_runtimes: list[ScriptedRuntime] = []

    async def reply_then_hang(turn: Turn) -> str | None:
        await turn.send_message(f"re {turn.event.text}")
        await hang.wait()
        return "ok"

    def make(config: GatewayConfig) -> ScriptedRuntime:
        runtime = ScriptedRuntime(reply_then_hang if not first_runtimes else reply)
        first_runtimes.append(runtime)
        return runtime

    accounts.make_runtime = make
    configs = [accounts.add("a", shutdown_grace=0.2)]
    first = Process(postgres_dsn, "p1", accounts, configs)
    try:
        async with processes(first):
            await asyncio.wait_for(first.fleet.wait_ready(), 15.0)
            accounts.post("a", "once")
            await until(accounts, lambda: replies(accounts, "a") == ["re once"])
            # The pause: p1's lease runs out; p2 takes the account over.
            await query(
                postgres_dsn, "UPDATE parall_bridge.leases SET expires_at = clock_timestamp()"
            )
            second = Process(postgres_dsn, "p2", accounts, configs)
            async with processes(second):
                await until(accounts, lambda: second.holding() == {"a"})
                await until(accounts, lambda: accounts.acked("a") == 1)
                await until(
                    accounts,
                    lambda: first.fleet.stats()["accounts"]["a"]["state"] == "not_held",
                )
                run_again = first_runtimes[-1]
                assert [t.event.text for t in run_again.finished] == ["once"]
                assert replies(accounts, "a") == ["re once"]  # one reply, kept by its key
    finally:
        hang.set()
    assert replies(accounts, "a") == ["re once"]


@pytest.mark.asyncio
async def test_add_and_remove_on_a_shared_store(postgres_dsn: str, accounts: Accounts) -> None:
    accounts.make_runtime = lambda _: ScriptedRuntime(reply)
    proc = Process(postgres_dsn, "p1", accounts, [accounts.add("a")])
    async with processes(proc):
        await asyncio.wait_for(proc.fleet.wait_ready(), 15.0)
        await proc.fleet.add(accounts.add("b"))
        await until(accounts, lambda: proc.holding() == {"a", "b"})
        accounts.post("b", "new")
        await until(accounts, lambda: replies(accounts, "b") == ["re new"])
        await proc.fleet.remove("a")
        assert proc.fleet.account_ids == ("b",)
        leases = await live_leases(postgres_dsn)
        assert set(leases) == {accounts.agents["b"].user_id}
