"""GatewayFleet against the emulator: many accounts in one process, isolated, one
shutdown, one shared REST connector and no key crossing accounts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest

from parall_bridge import (
    GatewayConfig,
    GatewayFleet,
    GatewayStats,
    MemoryStateStore,
    ParallConnectionError,
)
from parall_bridge import protocol as p
from parall_bridge.models import Chat, User
from parall_bridge.runtime import GatewayInfo, Turn
from parall_bridge.testing import AgentAccount, FakeParallServer

from ..conftest import library_tasks
from ._harness import FAST_BACKOFF, ScriptedRuntime, make_config

FLEET_LOGGER = "parall_bridge.gateway.fleet"


class Accounts:
    """Agents of the emulator, each with a direct chat with Ada, and the runtimes the
    fleet made for them (one per run of the account's gateway)."""

    def __init__(self, server: FakeParallServer, ada: User) -> None:
        self.server = server
        self.ada = ada
        self.agents: dict[str, AgentAccount] = {}
        self.chats: dict[str, Chat] = {}
        self.runtimes: dict[str, list[ScriptedRuntime]] = {}
        self.make_runtime: Callable[[GatewayConfig], ScriptedRuntime] = lambda _: ScriptedRuntime()

    def add(self, account_id: str, **tunables: Any) -> GatewayConfig:
        agent = self.server.add_agent(f"Bot {account_id}")
        self.agents[account_id] = agent
        self.chats[account_id] = self.server.add_chat(
            type="direct", members=[self.ada.id, agent.user_id]
        )
        return make_config(self.server, agent, account_id=account_id, **tunables)

    def runtime_factory(self, config: GatewayConfig) -> ScriptedRuntime:
        runtime = self.make_runtime(config)
        self.runtimes.setdefault(config.account_id, []).append(runtime)
        return runtime

    def runtime(self, account_id: str) -> ScriptedRuntime:
        """The account's latest runtime."""
        return self.runtimes[account_id][-1]

    def post(self, account_id: str, text: str) -> str:
        return self.server.post_message(self.chats[account_id].id, self.ada.id, text).id

    def acked(self, account_id: str) -> int:
        return self.server.dispatch_count(self.agents[account_id].user_id, acked=True)

    def fleet(self, configs: list[GatewayConfig]) -> GatewayFleet:
        return GatewayFleet(configs, self.runtime_factory, backoff=FAST_BACKOFF)


@pytest.fixture
def accounts(server: FakeParallServer, ada: User) -> Accounts:
    return Accounts(server, ada)


@contextlib.asynccontextmanager
async def running_fleet(fleet: GatewayFleet, *, ready: bool = True) -> AsyncIterator[None]:
    """Run the fleet for the block; then abort it once and check that start() returned
    and left no task of the library behind."""
    before = library_tasks()
    abort = asyncio.Event()
    task = asyncio.get_running_loop().create_task(fleet.start(abort), name="test-fleet")
    try:
        if ready:
            await asyncio.wait_for(fleet.wait_ready(), 10.0)
        yield
    finally:
        abort.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 30.0)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    assert library_tasks(before) == set(), "the fleet left tasks running"


def fleet_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == FLEET_LOGGER and r.levelno == level]


# --- many accounts, one unit -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_accounts_reply_in_their_own_chats_and_stop_together(
    server: FakeParallServer, accounts: Accounts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="parall_bridge")
    ids = ["alpha", "beta", "gamma"]
    fleet = accounts.fleet([accounts.add(account_id) for account_id in ids])
    assert fleet.account_ids == tuple(ids)
    async with running_fleet(fleet):
        stats = fleet.stats()
        assert {a: s["state"] for a, s in stats["accounts"].items()} == dict.fromkeys(
            ids, "running"
        )
        posted = {account_id: accounts.post(account_id, f"hi {account_id}") for account_id in ids}
        await server.wait_for(lambda: all(accounts.acked(a) == 1 for a in ids))
        # The server counts an ack before the gateway has read its answer.
        await server.wait_for(lambda: fleet.stats()["totals"]["acks_sent"] == 3)
        for account_id in ids:
            runtime = accounts.runtime(account_id)
            assert runtime.texts() == [[f"hi {account_id}"]]
            assert runtime.turns[0].chat_id == accounts.chats[account_id].id
            assert runtime.turns[0].message_id == posted[account_id]
            assert runtime.turns[0].session_key == f"agent:main:parall:{account_id}"
            assert runtime.info == GatewayInfo(
                agent_id=accounts.agents[account_id].user_id,
                org_id=server.org_id,
                account_id=account_id,
                session_id=runtime.info.session_id if runtime.info else "",
            )
        stats = fleet.stats()
        for account_id in ids:
            entry = stats["accounts"][account_id]
            assert entry["reason"] is None
            assert isinstance(entry["gateway"], GatewayStats)
            assert entry["gateway"].turns_succeeded == 1
        totals = stats["totals"]
        assert (totals["accounts"], totals["running"], totals["starting"]) == (3, 3, 0)
        assert (totals["stopped"], totals["not_held"]) == (0, 0)
        assert (totals["turns_succeeded"], totals["turns_failed"], totals["acks_sent"]) == (3, 0, 3)
        assert (totals["active_turns"], totals["queued"], totals["dead_letters"]) == (0, 0, 0)
    stats = fleet.stats()
    assert {a: (s["state"], s["reason"]) for a, s in stats["accounts"].items()} == dict.fromkeys(
        ids, ("stopped", "the fleet stopped")
    )
    assert stats["totals"]["stopped"] == 3
    for account_id in ids:
        runtime = accounts.runtime(account_id)
        assert runtime.stopped  # each gateway shut down gracefully: on_stop ran
        (session,) = server.sessions(accounts.agents[account_id].user_id)
        assert session.status == "completed"
    # The fleet's own records name their account.
    records = [r for r in caplog.records if r.name == FLEET_LOGGER]
    assert records
    for record in records:
        named = getattr(record, "account_id", None)
        assert named in ids
        assert repr(named) in record.getMessage()
    # And so do the records of each account's gateway, as an attribute.
    authenticated: dict[str, str] = {
        str(getattr(r, "account_id", None)): r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("authenticated as")
    }
    assert set(authenticated) == set(ids)
    for account_id, message in authenticated.items():
        assert accounts.agents[account_id].user_id in message
    gateway_records = [r for r in caplog.records if r.name == "parall_bridge.gateway"]
    assert gateway_records
    assert all(getattr(r, "account_id", None) in ids for r in gateway_records)


@pytest.mark.asyncio
async def test_keys_never_cross_accounts_over_the_shared_connector(
    server: FakeParallServer, accounts: Accounts
) -> None:
    ids = ["alpha", "beta", "gamma"]
    fleet = accounts.fleet([accounts.add(account_id) for account_id in ids])
    async with running_fleet(fleet):
        for round_ in range(2):
            for account_id in ids:
                accounts.post(account_id, f"round {round_}")
        await server.wait_for(lambda: all(accounts.acked(a) == 2 for a in ids))
        connectors = set()
        for account_id in ids:
            gateway = fleet.gateway(account_id)
            assert gateway is not None
            assert gateway._client is not None
            connectors.add(id(gateway._client._ensure_session().connector))
        assert len(connectors) == 1  # one connection pool for every account's REST calls
    users = {accounts.agents[a].user_id: a for a in ids}
    assert server.requests
    for request in server.requests:
        assert request.status is not None, request
        assert request.status < 400, request
        assert request.user_id in users, request
        for user_id in users:  # a path naming an agent is called with that agent's key
            if f"/agents/{user_id}/" in request.path or request.path.endswith(f"/{user_id}"):
                assert request.user_id == user_id, request
    for account_id in ids:
        user_id = accounts.agents[account_id].user_id
        mine = {m.id for m in server.messages(accounts.chats[account_id].id)}
        acks = [r for r in server.requests if r.path.endswith("/dispatch/ack")]
        assert {r.json["source_id"] for r in acks if r.user_id == user_id} == mine
        assert all(
            step.target_id == accounts.chats[account_id].id for step in server.steps(user_id)
        )


# --- isolation ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_revoked_key_stops_only_its_account(
    server: FakeParallServer, accounts: Accounts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=FLEET_LOGGER)
    ids = ["alpha", "beta", "gamma"]
    fleet = accounts.fleet([accounts.add(account_id) for account_id in ids])
    server.revoke_key(accounts.agents["alpha"].api_key)  # refused at start
    async with running_fleet(fleet):  # wait_ready: a stopped account does not block it
        stats = fleet.stats()
        alpha = stats["accounts"]["alpha"]
        assert alpha["state"] == "stopped"
        assert alpha["reason"] is not None
        assert "AuthenticationError" in alpha["reason"]
        assert accounts.agents["alpha"].api_key not in alpha["reason"]
        assert (stats["totals"]["running"], stats["totals"]["stopped"]) == (2, 1)
        (error,) = fleet_records(caplog, logging.ERROR)
        assert getattr(error, "account_id", None) == "alpha"
        assert error.getMessage().startswith("account 'alpha' stopped: AuthenticationError")
        for account_id in ("beta", "gamma"):
            accounts.post(account_id, "still there?")
        await server.wait_for(lambda: accounts.acked("beta") == accounts.acked("gamma") == 1)

        # Revoked while running: the platform closes its WebSocket for good (4003).
        server.revoke_key(accounts.agents["beta"].api_key)
        await server.wait_for(lambda: fleet.stats()["accounts"]["beta"]["state"] == "stopped")
        reason = fleet.stats()["accounts"]["beta"]["reason"]
        assert reason is not None
        assert "WebSocketClosedError" in reason
        accounts.post("gamma", "and now?")
        await server.wait_for(lambda: accounts.acked("gamma") == 2)
        assert fleet.stats()["accounts"]["gamma"]["state"] == "running"
        errors = fleet_records(caplog, logging.ERROR)
        assert [getattr(r, "account_id", None) for r in errors] == ["alpha", "beta"]
    assert accounts.runtimes["alpha"] == [accounts.runtime("alpha")]  # not restarted
    assert len(accounts.runtimes["beta"]) == 1


class FailingStart(ScriptedRuntime):
    """A runtime whose ``on_start`` fails with a transient error (the host's own service
    unreachable for a moment)."""

    async def on_start(self, info: GatewayInfo) -> None:
        raise ParallConnectionError("the model server is unreachable")


@pytest.mark.asyncio
async def test_a_transient_failure_restarts_the_account_with_backoff(
    server: FakeParallServer, accounts: Accounts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=FLEET_LOGGER)
    failures = 2

    def make_runtime(config: GatewayConfig) -> ScriptedRuntime:
        runs = len(accounts.runtimes.get(config.account_id, []))
        if config.account_id == "alpha" and runs < failures:
            return FailingStart()
        return ScriptedRuntime()

    accounts.make_runtime = make_runtime
    fleet = accounts.fleet([accounts.add("alpha"), accounts.add("beta")])
    async with running_fleet(fleet):
        assert fleet.stats()["totals"]["running"] == 2
        assert len(accounts.runtimes["alpha"]) == failures + 1
        assert len(accounts.runtimes["beta"]) == 1
        warnings = fleet_records(caplog, logging.WARNING)
        assert len(warnings) == failures
        for record in warnings:
            assert getattr(record, "account_id", None) == "alpha"
            assert "ParallConnectionError: the model server is unreachable" in record.getMessage()
            assert "restarting it in" in record.getMessage()
        assert not fleet_records(caplog, logging.ERROR)
        accounts.post("alpha", "back?")
        await server.wait_for(lambda: accounts.acked("alpha") == 1)
        assert accounts.runtime("alpha").texts() == [["back?"]]
        # Each failed run was shut down: its session completed, its runtime stopped.
        assert all(r.stopped for r in accounts.runtimes["alpha"][:failures])
        statuses = [s.status for s in server.sessions(accounts.agents["alpha"].user_id)]
        assert statuses.count("completed") == failures


@pytest.mark.asyncio
async def test_a_crash_at_start_stops_the_account_with_its_traceback(
    server: FakeParallServer, accounts: Accounts, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(ScriptedRuntime):
        async def on_start(self, info: GatewayInfo) -> None:
            raise RuntimeError("bug in the host")

    accounts.make_runtime = lambda config: (
        Broken() if config.account_id == "alpha" else ScriptedRuntime()
    )
    fleet = accounts.fleet([accounts.add("alpha"), accounts.add("beta")])
    async with running_fleet(fleet):
        alpha = fleet.stats()["accounts"]["alpha"]
        assert (alpha["state"], alpha["reason"]) == ("stopped", "RuntimeError: bug in the host")
        (error,) = fleet_records(caplog, logging.ERROR)
        assert error.exc_info is not None  # a crash of the host's code: its traceback
        accounts.post("beta", "hello")
        await server.wait_for(lambda: accounts.acked("beta") == 1)
    assert len(accounts.runtimes["alpha"]) == 1


@pytest.mark.asyncio
async def test_a_hung_turn_slows_only_its_account(
    server: FakeParallServer, accounts: Accounts
) -> None:
    hang = asyncio.Event()  # never set: alpha's turns hang until shutdown cancels them

    async def hung(turn: Turn) -> str | None:
        await hang.wait()
        return "never"

    accounts.make_runtime = lambda config: (
        ScriptedRuntime(hung) if config.account_id == "alpha" else ScriptedRuntime()
    )
    tunables = {"shutdown_grace": 0.2, "cancel_grace": 0.2}
    fleet = accounts.fleet([accounts.add(a, **tunables) for a in ("alpha", "beta", "gamma")])
    async with running_fleet(fleet):
        accounts.post("alpha", "take your time")
        await accounts.runtime("alpha").turn_started.wait()
        for n in range(3):
            accounts.post("beta", f"b{n}")
            accounts.post("gamma", f"g{n}")
        await server.wait_for(lambda: accounts.acked("beta") == accounts.acked("gamma") == 3)
        await server.wait_for(lambda: fleet.stats()["totals"]["active_turns"] == 1)
        assert fleet.stats()["totals"]["turns_failed"] == 0
        for account_id in ("beta", "gamma"):  # a chat's queued messages may share a turn
            texts = [text for turn in accounts.runtime(account_id).texts() for text in turn]
            assert texts == [f"{account_id[0]}{n}" for n in range(3)]
        assert accounts.acked("alpha") == 0
    # One shutdown: the hung turn was cancelled after the grace period, and start() returned.
    assert fleet.stats()["totals"]["stopped"] == 3
    assert accounts.runtime("alpha").stopped


# --- changing the fleet while it runs ----------------------------------------------------------


@pytest.mark.asyncio
async def test_add_and_remove_while_running(server: FakeParallServer, accounts: Accounts) -> None:
    fleet = accounts.fleet([accounts.add("alpha")])
    async with running_fleet(fleet):
        # The new account's first calls fail (past the client's own retries): its gateway
        # retries them with backoff, and the account is "starting" meanwhile.
        server.fail_next(p.ME, status=429, retry_after=0.01, times=6)
        await fleet.add(accounts.add("beta"))
        assert fleet.stats()["accounts"]["beta"]["state"] == "starting"
        await asyncio.wait_for(fleet.wait_ready(), 20.0)
        assert fleet.stats()["accounts"]["beta"]["state"] == "running"
        assert server.faults.pending(p.ME) == 0
        accounts.post("beta", "welcome")
        await server.wait_for(lambda: accounts.acked("beta") == 1)

        with pytest.raises(ValueError, match="'beta' is already in the fleet"):
            await fleet.add(make_config(server, server.add_agent(), account_id="beta"))
        with pytest.raises(ValueError, match="same API key"):
            await fleet.add(make_config(server, accounts.agents["beta"], account_id="other"))

        await fleet.remove("alpha")
        assert fleet.account_ids == ("beta",)
        assert "alpha" not in fleet.stats()["accounts"]
        assert accounts.runtime("alpha").stopped  # shut down gracefully: on_stop ran
        (session,) = server.sessions(accounts.agents["alpha"].user_id)
        assert session.status == "completed"
        with pytest.raises(KeyError):
            await fleet.remove("alpha")
        accounts.post("alpha", "anyone?")  # nobody runs alpha any more
        accounts.post("beta", "still here")
        await server.wait_for(lambda: accounts.acked("beta") == 2)
        assert accounts.acked("alpha") == 0
        # Its id can come back, with a new gateway.
        await fleet.add(make_config(server, accounts.agents["alpha"], account_id="alpha"))
        await asyncio.wait_for(fleet.wait_ready(), 10.0)
        await server.wait_for(lambda: accounts.acked("alpha") == 1)
        assert len(accounts.runtimes["alpha"]) == 2
    with pytest.raises(RuntimeError, match="shutting down"):
        await fleet.add(accounts.add("late"))


@pytest.mark.asyncio
async def test_a_cancelled_remove_still_lets_the_account_leave(
    server: FakeParallServer, accounts: Accounts
) -> None:
    hang = asyncio.Event()  # never set: alpha's turn holds its shutdown for its grace

    async def hung(turn: Turn) -> str | None:
        await hang.wait()
        return "never"

    accounts.make_runtime = lambda config: ScriptedRuntime(hung)
    fleet = accounts.fleet([accounts.add("alpha", shutdown_grace=0.3, cancel_grace=0.1)])
    async with running_fleet(fleet):
        accounts.post("alpha", "take your time")
        await accounts.runtime("alpha").turn_started.wait()
        removing = asyncio.get_running_loop().create_task(fleet.remove("alpha"))
        await asyncio.sleep(0.05)  # its gateway is shutting down, the turn holding it
        assert not removing.done()
        removing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await removing
        # The gateway still stops, and the account still leaves: its id is free again.
        await server.wait_for(lambda: fleet.account_ids == ())
        assert accounts.runtime("alpha").stopped
        accounts.make_runtime = lambda config: ScriptedRuntime()
        await fleet.add(make_config(server, accounts.agents["alpha"], account_id="alpha"))
        await asyncio.wait_for(fleet.wait_ready(), 10.0)
        assert fleet.stats()["accounts"]["alpha"]["state"] == "running"


@pytest.mark.asyncio
async def test_no_account_is_added_once_abort_is_set(accounts: Accounts) -> None:
    fleet = accounts.fleet([accounts.add("alpha")])
    abort = asyncio.Event()
    task = asyncio.get_running_loop().create_task(fleet.start(abort), name="test-fleet")
    await asyncio.wait_for(fleet.wait_ready(), 10.0)
    abort.set()  # start() has not woken up to it yet: the fleet is shutting down all the same
    try:
        with pytest.raises(RuntimeError, match="shutting down"):
            await fleet.add(accounts.add("late"))
    finally:
        await asyncio.wait_for(task, 30.0)
    assert fleet.account_ids == ("alpha",)
    assert "late" not in accounts.runtimes


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_duplicates_a_store_of_one_account_and_a_bad_capacity_are_refused(
    server: FakeParallServer, accounts: Accounts
) -> None:
    alpha = accounts.add("alpha")
    agent = accounts.agents["alpha"]
    with pytest.raises(ValueError, match="'alpha' is already in the fleet"):
        accounts.fleet([alpha, accounts.add("alpha")])
    with pytest.raises(ValueError, match="'alpha' and 'copy' have the same API key") as refused:
        accounts.fleet([alpha, make_config(server, agent, account_id="copy")])
    assert agent.api_key not in str(refused.value)
    with pytest.raises(ValueError, match="a MemoryStateStore serves one account"):
        GatewayFleet([alpha], accounts.runtime_factory, store=MemoryStateStore())
    with pytest.raises(ValueError, match="it needs a shared store"):
        GatewayFleet([alpha], accounts.runtime_factory, capacity=3)
    slash = attrs.evolve(
        make_config(server, agent, account_id="slash"), parall_url=server.url + "/"
    )
    with pytest.raises(ValueError, match="the same API key"):
        accounts.fleet([alpha, slash])
    with pytest.raises(TypeError, match="GatewayConfig"):
        GatewayFleet([object()], accounts.runtime_factory)  # type: ignore[list-item]
    assert accounts.runtimes == {}  # nothing made before start


@pytest.mark.asyncio
async def test_an_empty_fleet_is_ready_and_stops(accounts: Accounts) -> None:
    fleet = accounts.fleet([])
    async with running_fleet(fleet):
        assert fleet.stats()["accounts"] == {}
        assert set(fleet.stats()["totals"].values()) == {0}
    with pytest.raises(RuntimeError, match="runs once"):
        await fleet.start(asyncio.Event())


@pytest.mark.asyncio
async def test_a_wrong_agent_id_stops_its_account_without_a_traceback(
    server: FakeParallServer, accounts: Accounts, caplog: pytest.LogCaptureFixture
) -> None:
    beta = accounts.add("beta")
    alpha = accounts.add("alpha", agent_id=accounts.agents["beta"].user_id)
    fleet = accounts.fleet([alpha, beta])
    async with running_fleet(fleet):
        stats = fleet.stats()["accounts"]
        assert stats["alpha"]["state"] == "stopped"
        assert (stats["alpha"]["reason"] or "").startswith("ConfigurationError: agent_id")
        assert stats["beta"]["state"] == "running"
        (error,) = fleet_records(caplog, logging.ERROR)
        assert error.exc_info is None  # a refusal, not a crash: one line is enough


@pytest.mark.asyncio
async def test_cancelling_start_shuts_every_account_down(
    server: FakeParallServer, accounts: Accounts
) -> None:
    before = library_tasks()
    fleet = accounts.fleet([accounts.add("alpha"), accounts.add("beta")])
    task = asyncio.get_running_loop().create_task(fleet.start(asyncio.Event()), name="test")
    await asyncio.wait_for(fleet.wait_ready(), 10.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert library_tasks(before) == set()
    assert fleet.stats()["totals"]["stopped"] == 2
    assert all(
        runtime.stopped for runtime in accounts.runtimes["alpha"] + accounts.runtimes["beta"]
    )


@pytest.mark.asyncio
async def test_the_account_filter_is_on_while_a_fleet_runs_and_off_after(
    accounts: Accounts,
) -> None:
    from parall_bridge.gateway import fleet as fleet_module

    gateway_logger = logging.getLogger("parall_bridge.gateway")
    first, second = accounts.fleet([accounts.add("a")]), accounts.fleet([accounts.add("b")])
    async with running_fleet(first):
        assert fleet_module._FILTER in gateway_logger.filters
        async with running_fleet(second):
            assert fleet_module._FILTER in gateway_logger.filters
        assert fleet_module._FILTER in gateway_logger.filters  # the first still runs
    assert fleet_module._FILTER not in gateway_logger.filters
