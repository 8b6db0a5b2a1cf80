"""GatewayFleet on a shared PostgreSQL store (a real throwaway server) against the
emulator: accounts run only where their lease is held, processes share them fairly, a
joining process gets its share handed over, a lost lease stops its account at once, and
a takeover runs the journal first without a second reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from parall_bridge import GatewayConfig, GatewayFleet, StateStoreError
from parall_bridge.cli import run_fleet
from parall_bridge.gateway.fleet import HELD_ELSEWHERE, fair_share
from parall_bridge.models import User
from parall_bridge.runtime import Turn
from parall_bridge.state import PostgresStateStore, StoredState, StoreIdentity
from parall_bridge.testing import FakeParallServer

from ..conftest import library_tasks
from ..state._postgres import query
from ._harness import FAST_BACKOFF, ScriptedRuntime
from .test_fleet import Accounts, FailingStart

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
        lease_ttl: float = TTL,
    ) -> None:
        self.name = name
        self.store = PostgresStateStore(dsn, lease_ttl=lease_ttl, holder=name)
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
        assert (capped.fleet.count("running"), capped.fleet.count("not_held")) == (1, 2)
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


# --- shares, failures, and the lease loops ------------------------------------------------


def test_the_fair_share_covers_every_account_under_the_capacities() -> None:
    assert fair_share(300, [None, None, None]) == 100
    assert fair_share(301, [None, None, None]) == 101
    assert fair_share(4, [1, None]) == 3  # the capped process takes 1, the other 3
    assert fair_share(10, [2, 2, None]) == 6
    assert fair_share(10, [2, 3]) == 3  # the caps are short: each takes all it may
    assert fair_share(0, [None]) == 0
    assert fair_share(5, []) == 5


@pytest.mark.asyncio
async def test_a_capped_process_beside_an_uncapped_one_leaves_no_account_unheld(
    postgres_dsn: str, accounts: Accounts
) -> None:
    configs = [accounts.add(name) for name in ("a", "b", "c", "d")]
    capped = Process(postgres_dsn, "capped", accounts, configs, capacity=1)
    free = Process(postgres_dsn, "free", accounts, configs)
    async with processes(capped, free):
        await until(
            accounts,
            lambda: len(capped.holding()) == 1 and len(free.holding()) == 3,
        )
        assert capped.holding() | free.holding() == {"a", "b", "c", "d"}


@pytest.mark.asyncio
async def test_a_store_error_at_start_up_restarts_the_account_instead_of_stopping_it(
    postgres_dsn: str, accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = PostgresStateStore._load
    loads = 0

    async def blip_once(self: PostgresStateStore, identity: StoreIdentity) -> StoredState:
        nonlocal loads
        loads += 1
        if loads == 1:
            raise StateStoreError("state store: load failed: ConnectionResetError (a blip)")
        return await real_load(self, identity)

    monkeypatch.setattr(PostgresStateStore, "_load", blip_once)
    proc = Process(postgres_dsn, "p1", accounts, [accounts.add("a")])
    async with processes(proc):
        await until(accounts, lambda: proc.holding() == {"a"})
    assert loads == 2


@pytest.mark.asyncio
async def test_a_restart_after_a_transient_failure_keeps_the_lease(
    postgres_dsn: str, accounts: Accounts, caplog: pytest.LogCaptureFixture
) -> None:
    """The account's lease stays this process's across its restarts (the same epoch, no
    lease lost), and the backoff grows as it would without a store."""
    caplog.set_level(logging.INFO, logger="parall_bridge.gateway.fleet")

    def make(config: GatewayConfig) -> ScriptedRuntime:
        runs = len(accounts.runtimes.get(config.account_id, []))
        return FailingStart() if runs < 3 else ScriptedRuntime(reply)

    accounts.make_runtime = make
    proc = Process(postgres_dsn, "p1", accounts, [accounts.add("a")])
    async with processes(proc):
        await until(accounts, lambda: proc.holding() == {"a"})
        epochs = await query(postgres_dsn, "SELECT epoch FROM parall_bridge.leases")
        assert epochs == [(1,)]
    assert len(accounts.runtimes["a"]) == 4
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "lease was lost" in m]
    assert len([m for m in messages if "restarting it in" in m]) == 3


@pytest.mark.asyncio
async def test_an_unreachable_store_fails_the_start_and_wait_ready_returns_after_any_end(
    postgres_dsn: str, accounts: Accounts
) -> None:
    nowhere = postgres_dsn.replace("host=", "host=/nonexistent")
    broken = GatewayFleet(
        [accounts.add("a")],
        accounts.runtime_factory,
        store=PostgresStateStore(nowhere, op_timeout=2.0),
    )
    start = asyncio.get_running_loop().create_task(broken.start(asyncio.Event()))
    waiter = asyncio.get_running_loop().create_task(broken.wait_ready())
    with pytest.raises(StateStoreError, match="open failed"):
        await start
    await asyncio.wait_for(waiter, 5.0)
    assert accounts.runtimes == {}  # nothing ran
    aborted = asyncio.Event()
    aborted.set()
    quick = GatewayFleet(
        [accounts.add("b")], accounts.runtime_factory, store=PostgresStateStore(postgres_dsn)
    )
    await asyncio.wait_for(quick.start(aborted), 15.0)
    await asyncio.wait_for(quick.wait_ready(), 5.0)
    assert quick.stats()["accounts"]["b"]["state"] == "stopped"


@pytest.mark.asyncio
async def test_run_fleet_exits_0_when_accounts_were_left_to_other_processes(
    postgres_dsn: str, accounts: Accounts
) -> None:
    configs = [accounts.add(name) for name in ("a", "b")]
    stop = asyncio.Event()
    lines: list[str] = []
    task = asyncio.get_running_loop().create_task(
        run_fleet(
            configs,
            accounts.runtime_factory,
            stop=stop,
            out=lines.append,
            store=PostgresStateStore(postgres_dsn, lease_ttl=TTL),
            capacity=1,
        )
    )
    try:
        await until(accounts, lambda: sum(len(r) for r in accounts.runtimes.values()) == 1)
        await until(
            accounts, lambda: any(r[0].info is not None for r in accounts.runtimes.values())
        )
    finally:
        stop.set()
        status = await asyncio.wait_for(task, 30.0)
    assert status == 0, lines


@pytest.mark.asyncio
async def test_a_failing_look_is_logged_and_the_next_one_goes_on(
    postgres_dsn: str,
    accounts: Accounts,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    accounts.make_runtime = lambda _: ScriptedRuntime(reply)
    real_heartbeat = PostgresStateStore.heartbeat
    beats = 0

    async def buggy_once(
        self: PostgresStateStore, fleet: str, capacity: int | None = None, **kwargs: Any
    ) -> list[int | None]:
        nonlocal beats
        beats += 1
        if beats == 2:
            raise TypeError("a bug")
        return await real_heartbeat(self, fleet, capacity, **kwargs)

    monkeypatch.setattr(PostgresStateStore, "heartbeat", buggy_once)
    proc = Process(postgres_dsn, "p1", accounts, [accounts.add("a")])
    async with processes(proc):
        await asyncio.wait_for(proc.fleet.wait_ready(), 15.0)
        await until(accounts, lambda: beats >= 4)  # looks went on after the failure
        failed = [r for r in caplog.records if "the look failed" in r.getMessage()]
        assert len(failed) == 1
        assert failed[0].exc_info is not None
        accounts.post("a", "still")
        await until(accounts, lambda: replies(accounts, "a") == ["re still"])


@pytest.mark.asyncio
async def test_a_rolling_stop_moves_an_idle_account_while_a_busy_one_finishes(
    postgres_dsn: str, accounts: Accounts
) -> None:
    """The stopping process is counted out at once and releases each account once it is
    flushed: the idle one moves long before the busy one's turn ends, well within the
    issue's 15 seconds (with the default 30-second lease)."""
    hang = asyncio.Event()

    async def slow(turn: Turn) -> str | None:
        await hang.wait()
        return "ok"

    accounts.make_runtime = lambda _: ScriptedRuntime(slow)
    configs = [accounts.add(name, shutdown_grace=20.0) for name in ("a", "b", "c", "d")]
    first = Process(postgres_dsn, "A", accounts, configs, lease_ttl=30.0)
    second = Process(postgres_dsn, "B", accounts, configs, lease_ttl=30.0)
    try:
        async with processes(first, second):
            await until(accounts, lambda: len(first.holding()) == 2 and len(second.holding()) == 2)
            busy, idle = sorted(first.holding())
            accounts.post(busy, "busy")
            await until(accounts, lambda: bool(accounts.runtime(busy).active))
            first.abort.set()
            loop = asyncio.get_running_loop()
            began = loop.time()
            await until(accounts, lambda: idle in second.holding())
            moved_after = loop.time() - began
            assert busy not in second.holding()  # still finishing its turn in A
            hang.set()
            await until(accounts, lambda: second.holding() == {"a", "b", "c", "d"})
        assert moved_after < 15.0
    finally:
        hang.set()


@pytest.mark.asyncio
async def test_a_lease_taken_as_the_fleet_stops_is_released_at_the_end(
    postgres_dsn: str, accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look is cancelled at shutdown while a take awaits its answer (committed on the
    server): the fleet releases that lease at the end, instead of leaving it live for its
    time to live with no process running the account."""
    real_acquire = PostgresStateStore.acquire_lease
    in_take = asyncio.Event()
    never = asyncio.Event()

    async def slow_answer(self: PostgresStateStore, *key: str) -> Any:
        lease = await real_acquire(self, *key)  # committed on the server
        in_take.set()
        await never.wait()  # the answer on its way (a slow network, a busy pool)
        return lease

    monkeypatch.setattr(PostgresStateStore, "acquire_lease", slow_answer)
    proc = Process(postgres_dsn, "p1", accounts, [accounts.add("a")], lease_ttl=30.0)
    async with processes(proc):
        await asyncio.wait_for(in_take.wait(), 15.0)
        assert set((await live_leases(postgres_dsn)).values()) == {"p1"}
        proc.abort.set()
    assert await live_leases(postgres_dsn) == {}


@pytest.mark.asyncio
async def test_run_fleet_freezes_the_collector_again_as_accounts_are_handed_over(
    postgres_dsn: str, accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process joining a shared store's fleet is ready holding nothing: the accounts
    handed over to it later are frozen too."""
    import gc

    from parall_bridge import cli

    freezes: list[int] = []
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(1))
    monkeypatch.setattr(gc, "unfreeze", lambda: None)
    monkeypatch.setattr(cli, "REFREEZE_EVERY", 0.05)
    configs = [accounts.add(name) for name in ("a", "b")]
    first = Process(postgres_dsn, "p1", accounts, configs)
    stop = asyncio.Event()
    lines: list[str] = []
    async with processes(first):
        await asyncio.wait_for(first.fleet.wait_ready(), 15.0)
        assert first.holding() == {"a", "b"}
        joining = asyncio.get_running_loop().create_task(
            run_fleet(
                configs,
                accounts.runtime_factory,
                stop=stop,
                out=lines.append,
                store=PostgresStateStore(postgres_dsn, lease_ttl=TTL, holder="p2"),
            )
        )
        try:
            await until(accounts, lambda: len(freezes) == 1)  # ready, holding none
            await until(accounts, lambda: len(first.holding()) == 1)
            await until(accounts, lambda: len(freezes) == 2)  # the account handed over
        finally:
            stop.set()
            assert await asyncio.wait_for(joining, 30.0) == 0
