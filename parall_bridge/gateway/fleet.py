"""``GatewayFleet``: many accounts, one process.

Each account (a :class:`GatewayConfig`: its own API key, WebSocket, dispatch
queue and state) runs its own :class:`Gateway`; the fleet starts them
together, keeps them apart, restarts the one that fails for a transient
reason, stops the one that cannot run (a revoked key...) without touching the
others, and shuts them all down at once. What they share is what is safe to
share: one aiohttp connector (the pool of REST connections). Each account's
client keeps its own session, and its API key goes in its own requests'
headers only.

With a shared :class:`~parall_bridge.state.PostgresStateStore`, several fleet
processes (on one machine or many) run the same accounts between them: each
account runs only in the process that holds its lease (see
:class:`GatewayFleet`), and an account whose process dies is taken over by
another once its lease expires.

A host does::

    fleet = GatewayFleet(configs, lambda config: MyRuntime(config.account_id))
    await fleet.start(abort_event)   # runs until abort_event is set
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
from collections.abc import Callable, Iterable
from typing import Final, Literal, TypeAlias, TypedDict

import aiohttp

from .._retry import Backoff, is_transient
from .._tasks import TaskSet
from ..client import ParallClient
from ..errors import LeaseLost, ParallError, StateStoreError
from ..routing import RoutingStrategy
from ..runtime import AgentRuntime
from ..state import PostgresStateStore, StateStore
from .config import GatewayConfig
from .gateway import Gateway, GatewayStats

__all__ = ["AccountState", "AccountStats", "FleetStats", "GatewayFleet"]

_log = logging.getLogger("parall_bridge.gateway.fleet")

AccountState: TypeAlias = Literal["running", "starting", "stopped", "not_held"]
"""Where an account of a fleet is: ``starting`` (its gateway is starting, or waits to
be restarted), ``running`` (ready: connected, first catch-up done), ``stopped`` (it
will not run again in this fleet: refused, failed, removed, or the fleet stopped),
``not_held`` (with a shared store: this process does not hold the account's lease, so
another process runs it, or will; it may take it later)."""

STATES: Final[tuple[AccountState, ...]] = ("running", "starting", "stopped", "not_held")
"""Every :data:`AccountState`, in the order of :meth:`GatewayFleet.stats` ``totals``."""

TOTALLED: Final = (
    "turns_started",
    "turns_succeeded",
    "turns_failed",
    "turns_cancelled",
    "active_turns",
    "queued",
    "forks_open",
    "dead_letters",
    "acks_sent",
    "acks_failed",
    "steps_written",
    "steps_failed",
    "writes_pending",
    "writes_shed",
    "writes_abandoned",
    "cold_start_skipped",
    "journaled_turns",
    "store_writes",
    "store_failures",
)
"""The :class:`GatewayStats` counters summed in :meth:`GatewayFleet.stats` ``totals``."""

_ACCOUNT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "parall_bridge_fleet_account", default=None
)
"""The account whose task logs: set in each account's runner, so its gateway's tasks
(all started from there) inherit it."""


class _AccountFilter(logging.Filter):
    """Gives a record logged in an account's context that account's ``account_id``
    (outside a fleet it leaves records as they are)."""

    def filter(self, record: logging.LogRecord) -> bool:
        account_id = _ACCOUNT.get()
        if account_id is not None and not hasattr(record, "account_id"):
            record.account_id = account_id
        return True


_FILTER: Final = _AccountFilter()


_TAGGING: list[int] = [0]
"""How many fleets run in this process: the filter stays on while one does."""


def _tag_library_loggers() -> None:
    """Put the account filter on the library's loggers (not the emulator's): a logger's
    filters see only the records logged on it, so each gets it. Counted: a fleet that
    starts calls it, and :func:`_untag_library_loggers` when it ends."""
    _TAGGING[0] += 1
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (
            isinstance(logger, logging.Logger)
            and (name == "parall_bridge" or name.startswith("parall_bridge."))
            and not name.startswith("parall_bridge.testing")
            and _FILTER not in logger.filters
        ):
            logger.addFilter(_FILTER)


def _untag_library_loggers() -> None:
    """Take the account filter off once no fleet runs any more."""
    _TAGGING[0] -= 1
    if _TAGGING[0] > 0:
        return
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and _FILTER in logger.filters:
            logger.removeFilter(_FILTER)


FLEET_STOPPED: Final = "the fleet stopped"
"""The ``reason`` of an account stopped by the fleet's shutdown."""
REMOVED: Final = "removed from the fleet"
"""The ``reason`` of an account stopped by :meth:`GatewayFleet.remove` (until it leaves)."""
HELD_ELSEWHERE: Final = "another process holds its lease"
"""The ``reason`` of a ``not_held`` account whose lease another process holds."""
FAIR_SHARE: Final = "this process holds its share of the accounts"
"""The ``reason`` of a ``not_held`` account left to other processes (fair share or
``capacity``)."""
HANDED_OVER: Final = "handed over to another process"
"""The ``reason`` of a ``not_held`` account this process let go (another process joined,
so its fair share shrank)."""
LEASE_LOST: Final = "its lease was lost"
"""The start of the ``reason`` of a ``not_held`` account whose lease was lost while it ran
(not renewed in time, or taken over): its gateway stopped at once."""

MAX_TICK: Final = 2.0
"""The most seconds between two looks at the leases (a heartbeat, free leases taken,
surplus handed over); renewals come every third of ``lease_ttl``."""


class AccountStats(TypedDict):
    """One account in :meth:`GatewayFleet.stats`.

    Keys:
        state: the :data:`AccountState`.
        reason: why it is stopped, or why it waits to be restarted; else ``None``.
        gateway: the stats of its latest gateway (the current run's, or the last
            one's once stopped: a restart starts the counters over); ``None`` before
            its first gateway is made.
    """

    state: AccountState
    reason: str | None
    gateway: GatewayStats | None


class FleetStats(TypedDict):
    """What :meth:`GatewayFleet.stats` returns.

    Keys:
        accounts: each account's :class:`AccountStats`, by account id.
        totals: ``accounts`` (how many), one count per :data:`AccountState`
            (``running``, ``starting``, ``stopped``, ``not_held``), and the sums over
            the accounts' gateway stats of ``turns_started``, ``turns_succeeded``,
            ``turns_failed``, ``turns_cancelled``, ``active_turns``, ``queued``,
            ``forks_open``, ``dead_letters``, ``acks_sent``, ``acks_failed``,
            ``steps_written``, ``steps_failed``, ``writes_pending``, ``writes_shed``,
            ``writes_abandoned``, ``cold_start_skipped``, ``journaled_turns``,
            ``store_writes`` and ``store_failures``.
    """

    accounts: dict[str, AccountStats]
    totals: dict[str, int]


class _Account:
    """One account of a fleet: its config, where it is, and the task running it."""

    def __init__(self, config: GatewayConfig, view: PostgresStateStore | None) -> None:
        self.config = config
        self.abort = asyncio.Event()  # set: this run of the account's gateway ends
        self.stop_state: AccountState = "stopped"  # where an abort leaves it
        self.stop_reason = FLEET_STOPPED
        self.state: AccountState = "starting" if view is None else "not_held"
        self.reason: str | None = None
        self.gateway: Gateway | None = None
        self.task: asyncio.Task[None] | None = None
        self.log = logging.LoggerAdapter(_log, {"account_id": config.account_id})
        self.view = view  # its view of the shared store, if any
        self.agent_id = config.agent_id  # the lease's key needs it: from get_me if unset
        self.removed = False

    def stop(self, state: AccountState, reason: str) -> None:
        """End the account's current run: its gateway shuts down (releasing the lease once
        flushed, with a shared store), and it ends ``state``."""
        if not self.abort.is_set():
            self.stop_state = state
            self.stop_reason = reason
            if self.view is not None:
                self.view.release_lease_with_gateway = True
            self.abort.set()

    @property
    def active(self) -> bool:
        """Whether its runner is running (holding its lease, with a store)."""
        return self.task is not None and not self.task.done()

    def lease_key(self) -> tuple[str, str, str] | None:
        if self.agent_id is None:
            return None
        return (self.config.parall_url.rstrip("/"), self.config.org_id, self.agent_id)

    def rank(self, holder: str) -> str:
        """This account's place in ``holder``'s order of preference (rendezvous hashing:
        each process prefers different accounts, so they rarely contend)."""
        key = f"{holder}\0{self.config.parall_url}\0{self.config.org_id}\0{self.account_id}"
        return hashlib.sha256(key.encode()).hexdigest()

    @property
    def account_id(self) -> str:
        return self.config.account_id


async def _ready(gateway: Gateway) -> bool:
    """Wait until a gateway is ready (``True``) or stopped before (``False``: its
    ``start()`` raises the start-up error)."""
    try:
        await gateway.wait_ready()
    except Exception:
        return False
    return True


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class GatewayFleet:
    """Many accounts in one process, each its own :class:`Gateway`, run as one unit.

    An account is a :class:`GatewayConfig`; its id is the config's ``account_id``
    (the same id as :attr:`GatewayInfo.account_id <parall_bridge.GatewayInfo>`), which
    must be unique in the fleet, and so must its API key.

    Accounts are isolated: each has its own client session, WebSocket, dispatch
    queue, lanes and state store, so a hung turn in one does not slow the others.
    When an account's ``Gateway.start()`` fails with a transient error (a 5xx, a
    429, a timeout, a connection error: what the gateway itself does not retry), the
    fleet restarts that account with ``backoff``; any other failure (a refused key, a
    mismatched ``agent_id``, a state file held elsewhere, a crash of the host's code)
    stops that account only: it is ``stopped`` in :meth:`stats` with its reason, and
    an ERROR names it. :meth:`start` does not fail because an account failed.

    Shared: one aiohttp connector (REST connection pool) for every account's
    client; nothing that carries an API key is shared (see
    :class:`~parall_bridge.ParallClient`'s ``connector``). Each account's WebSocket
    has its own connection, as it must.

    **Many processes, one shared store.** With ``store`` (a
    :class:`~parall_bridge.state.PostgresStateStore`), each account keeps its state in
    that database (its ``state_path`` is ignored) and runs only while this process
    holds the account's lease (keyed by platform URL, org and agent id), so the same
    accounts file can run in several processes, on several machines, without a
    coordinator: each process runs the accounts it holds and shows the others as
    ``not_held``.

    - Every ``min(lease_ttl / 3, 2)`` seconds a process writes its heartbeat row, counts
      the live processes of its fleet (those started with the same accounts), and
      takes free or expired leases up to its **fair share** (the accounts divided by
      the live processes, rounded up), capped by ``capacity``. When another process
      joins and the share shrinks, it hands the surplus over gracefully (idle accounts
      first): each such gateway shuts down, its lease is released once its turns and
      writes are flushed, and the other process takes it.
    - Leases are renewed every third of ``lease_ttl``, in one statement. An account
      whose lease is lost (not renewed in time, or taken over) stops at once; its
      gateway sends and acks nothing more (every send and ack waits on a write fenced
      by the lease, and checks the lease's time first).
    - A process that dies holds its leases until they expire (``lease_ttl``); then
      another process takes the accounts over, and each gateway runs the journal's
      interrupted turns first (same sources, same reply keys) and then catches up.
    - A graceful shutdown releases each account's lease as soon as that account's
      turns and writes are flushed (before ``on_stop``), so a rolling deploy moves
      idle accounts within a few seconds.

    The fleet opens the store at :meth:`start` (running its migrations once, under an
    advisory lock) and closes it at the end; it makes one :meth:`view
    <parall_bridge.state.PostgresStateStore.view>` per account, all on the store's pool.

    Every log record of the fleet's own carries the account id (the record's
    ``account_id`` attribute, and the message), and so does every record the library
    logs for an account (its gateway, client, WebSocket: the ``account_id`` attribute,
    for a formatter's ``%(account_id)s``, with ``defaults={"account_id": "-"}`` for the
    records of no account). For that, :meth:`start` puts a filter on the
    library's loggers (those of ``parall_bridge`` modules imported by then) and takes
    it off at the end; it only adds the attribute to records logged from an account's
    tasks.

    Args:
        accounts: one :class:`GatewayConfig` per account.
        runtime_factory: makes an account's runtime; called with the account's config
            each time its gateway is made (at start, and again for each restart: a
            gateway's runtime has seen ``on_stop`` when it ends).
        store: a :class:`~parall_bridge.state.PostgresStateStore` shared by every
            account (and by other fleet processes), or ``None``: each account keeps its
            own state as the bare :class:`Gateway` does (a SQLite file at its config's
            ``state_path``, else memory) and no leases are taken.
        routing_factory: makes an account's routing strategy, like
            ``runtime_factory``; by default each gateway's default strategy.
        backoff: delays between restarts of an account after a transient failure,
            also given to each gateway (its start-up retries and reconnects).
        capacity: with a ``store``, the most accounts this process holds at once
            (``None``: its fair share only).

    Raises:
        ValueError: two accounts have the same ``account_id`` or API key; ``store`` is
            not a store the accounts can share; ``capacity`` without a ``store``, or not
            a positive integer.
        TypeError: an account is not a :class:`GatewayConfig`.
    """

    def __init__(
        self,
        accounts: Iterable[GatewayConfig],
        runtime_factory: Callable[[GatewayConfig], AgentRuntime],
        *,
        store: StateStore | None = None,
        routing_factory: Callable[[GatewayConfig], RoutingStrategy] | None = None,
        backoff: Backoff | None = None,
        capacity: int | None = None,
    ) -> None:
        if store is not None and not isinstance(store, PostgresStateStore):
            raise ValueError(
                f"GatewayFleet(store=...): a {type(store).__name__} serves one account; the "
                "accounts of a fleet share a PostgresStateStore (or give None, and each "
                "account keeps its own state: state_path)"
            )
        if capacity is not None:
            if store is None:
                raise ValueError(
                    "GatewayFleet(capacity=...) caps the account leases a process holds: "
                    "it needs a shared store (store=PostgresStateStore(...))"
                )
            if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
                raise ValueError(f"capacity must be a positive integer, not {capacity!r}")
        self._store = store
        self._capacity = capacity
        self._runtime_factory = runtime_factory
        self._routing_factory = routing_factory
        self._backoff = backoff or Backoff()
        self._accounts: dict[str, _Account] = {}
        for config in accounts:
            self._admit(config)
        self._fleet_name = self._name()
        self._runners = TaskSet(_log)
        self._connector: aiohttp.TCPConnector | None = None
        self._started = False
        self._abort: asyncio.Event | None = None
        self._stopping = False
        self._changed = asyncio.Event()
        self._leases_looked = store is None  # wait_ready waits for the first look
        self._ended = False
        self._look_now = asyncio.Event()
        self._live_processes = 1

    def __repr__(self) -> str:
        return f"GatewayFleet(accounts={len(self._accounts)})"

    # --- public surface -----------------------------------------------------------------

    @property
    def account_ids(self) -> tuple[str, ...]:
        """The accounts' ids, in the order they were added (removed ones leave once
        their gateway has stopped)."""
        return tuple(self._accounts)

    def gateway(self, account_id: str) -> Gateway | None:
        """An account's current (or last) gateway; ``None`` before its first is made.

        Raises:
            KeyError: no such account.
        """
        return self._accounts[account_id].gateway

    @property
    def store(self) -> PostgresStateStore | None:
        """The store the accounts share, if any."""
        return self._store

    @property
    def capacity(self) -> int | None:
        """The most accounts this process holds at once, with a shared store."""
        return self._capacity

    async def start(self, abort_event: asyncio.Event) -> None:
        """Run every account until ``abort_event`` is set, then shut them all down at
        once: each gateway's graceful shutdown (its ``shutdown_grace``) runs alongside
        the others', so the fleet's takes as long as the longest one, not their sum.

        Returns once every account's gateway has stopped and every task the fleet
        started is done; an account that failed does not make it fail.

        Raises:
            StateStoreError: the shared store cannot be opened (unreachable, refused,
                a schema this version cannot use): nothing ran.
        """
        if self._started:
            raise RuntimeError("a GatewayFleet runs once; make a new one")
        self._started = True
        self._abort = abort_event
        try:
            await self._run_fleet(abort_event)
        finally:
            self._ended = True  # wait_ready() returns from now on
            self._notify()

    async def _run_fleet(self, abort_event: asyncio.Event) -> None:
        store = self._store
        if store is not None:
            await store.open()  # migrations run once, under the store's advisory lock
        _tag_library_loggers()
        self._connector = aiohttp.TCPConnector(limit=0)  # no cap shared across accounts
        renewing, balancing = TaskSet(_log), TaskSet(_log)
        try:
            if store is None:
                for account in self._accounts.values():
                    self._launch(account)
            else:
                for account in self._accounts.values():
                    assert account.view is not None  # made with the store
                    await account.view.open()
                renewing.spawn(self._renew_loop(store), name="parall-fleet-renew")
                balancing.spawn(self._balance_loop(store), name="parall-fleet-leases")
            await abort_event.wait()
        finally:
            self._stopping = True
            for account in self._accounts.values():
                account.stop("stopped", FLEET_STOPPED)
            try:
                await balancing.cancel()  # no heartbeat after this process left
                if store is not None:
                    # Counted out at once: the others take each account as it is released.
                    await self._leave(store)
                await self._runners.wait(None)  # leases still renewed meanwhile
            finally:
                await self._runners.cancel()
                await renewing.cancel()
                if store is not None:
                    await self._release_leftovers(store)
                await self._connector.close()
                if store is not None:
                    await store.close()
                _untag_library_loggers()
                for account in self._accounts.values():
                    if account.state != "stopped":  # not_held: not run here any more either
                        self._set(account, "stopped", FLEET_STOPPED)

    async def wait_ready(self) -> None:
        """Return once every account this process holds is ready (``running``) or
        ``stopped``, and, with a shared store, once it has looked at the leases once: an
        account that cannot run does not block it, nor does a fleet without accounts or
        one that holds none yet (``not_held``). Look at :meth:`stats` for which is
        which."""
        while not self._settled():
            changed = self._changed
            await changed.wait()

    def stats(self) -> FleetStats:
        """A snapshot of every account (state, reason, its gateway's stats) and the
        totals (see :class:`FleetStats`)."""
        accounts: dict[str, AccountStats] = {}
        totals: dict[str, int] = {"accounts": len(self._accounts)}
        totals.update(dict.fromkeys(STATES, 0))
        totals.update(dict.fromkeys(TOTALLED, 0))
        for account_id, account in self._accounts.items():
            gateway_stats = account.gateway.stats() if account.gateway is not None else None
            accounts[account_id] = AccountStats(
                state=account.state, reason=account.reason, gateway=gateway_stats
            )
            totals[account.state] += 1
            if gateway_stats is not None:
                for name in TOTALLED:
                    totals[name] += getattr(gateway_stats, name)
        return FleetStats(accounts=accounts, totals=totals)

    def count(self, state: AccountState) -> int:
        """How many accounts are in ``state``: cheap, unlike :meth:`stats` (which takes
        every account's gateway stats), for a host that looks often."""
        return sum(1 for account in self._accounts.values() if account.state == state)

    async def add(self, config: GatewayConfig) -> None:
        """Add an account; while the fleet runs its gateway starts at once (with a shared
        store: once this process takes its lease), and this returns without waiting for
        it to be ready (see :meth:`wait_ready` and :meth:`stats`).

        Raises:
            ValueError: its ``account_id`` or API key is already in the fleet (also
                while an account of that id is being removed).
            RuntimeError: the fleet is shutting down or has stopped.
            StateStoreError: with a shared store, its view could not be opened.
        """
        if self._stopping or (self._abort is not None and self._abort.is_set()):
            # Once abort is set, before start() has woken up to it too.
            raise RuntimeError("the fleet is shutting down: no account can be added")
        account = self._admit(config)
        if self._started:
            if account.view is None:
                self._launch(account)
            else:
                try:
                    await account.view.open()
                except BaseException:
                    self._forget(account)  # not admitted: the caller may try again
                    raise
                self._look_now.set()
        self._notify()

    async def remove(self, account_id: str) -> None:
        """Shut an account's gateway down gracefully (its ``shutdown_grace``, flushes,
        its lease released, ``on_stop``) and drop the account; returns once that is
        done.

        Raises:
            KeyError: no such account.
        """
        account = self._accounts[account_id]
        account.removed = True
        account.stop("stopped", REMOVED)
        task = account.task
        if task is None or task.done():
            self._forget(account)
            return
        # The account leaves when its gateway has stopped, even if this caller is
        # cancelled meanwhile (else it would stay, stopped, its id never free again).
        task.add_done_callback(lambda _: self._forget(account))
        await asyncio.wait({task})

    def _forget(self, account: _Account) -> None:
        if self._accounts.get(account.account_id) is account:
            del self._accounts[account.account_id]
            self._notify()

    # --- accounts -----------------------------------------------------------------------------

    def _name(self) -> str:
        """The fleet's name in the processes' heartbeat rows: processes started with the
        same accounts (platform URL, org, account id) count each other for the fair
        share, and no others."""
        keys = sorted(
            f"{a.config.parall_url.rstrip('/')}\0{a.config.org_id}\0{a.account_id}"
            for a in self._accounts.values()
        )
        return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]

    def _admit(self, config: GatewayConfig) -> _Account:
        if not isinstance(config, GatewayConfig):
            raise TypeError(f"an account must be a GatewayConfig, got {type(config).__name__}")
        account_id = config.account_id
        if account_id in self._accounts:
            raise ValueError(f"account {account_id!r} is already in the fleet")
        for other in self._accounts.values():
            if (other.config.parall_url.rstrip("/"), other.config.api_key) == (
                config.parall_url.rstrip("/"),
                config.api_key,
            ):
                raise ValueError(
                    f"accounts {other.account_id!r} and {account_id!r} have the same API key"
                )
        view = self._store.view() if self._store is not None else None
        account = _Account(config, view)
        if view is not None:
            account.reason = FAIR_SHARE
        self._accounts[account_id] = account
        return account

    def _launch(self, account: _Account) -> None:
        account.abort = asyncio.Event()
        account.stop_state, account.stop_reason = "stopped", FLEET_STOPPED
        if account.view is not None:
            # A restart after a transient failure keeps the lease; a stop releases it.
            account.view.release_lease_with_gateway = False
        account.task = self._runners.spawn(
            self._run(account), name=f"parall-fleet-account-{account.account_id}"
        )

    def _notify(self) -> None:
        """Wake :meth:`wait_ready`: something changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _settled(self) -> bool:
        if self._ended:
            return True
        return self._leases_looked and all(
            a.state in ("running", "stopped", "not_held") for a in self._accounts.values()
        )

    def _set(self, account: _Account, state: AccountState, reason: str | None) -> None:
        account.state = state
        account.reason = reason
        self._notify()

    async def _run(self, account: _Account) -> None:
        """Run an account's gateway; restart it after a transient failure, with backoff,
        until the account is removed or the fleet stops; stop it after any other. With a
        shared store it runs while this process holds the account's lease (taken before
        the first run, and again before each restart) and releases the lease at the end."""
        _ACCOUNT.set(account.account_id)  # this task's own context: its gateway's tasks inherit it
        try:
            await self._run_account(account)
        finally:
            if account.view is not None:
                await self._let_go(account)

    async def _run_account(self, account: _Account) -> None:
        log = account.log
        account_id = account.account_id
        failures = 0
        first = True
        while not account.abort.is_set():
            if account.view is not None and not first and not await self._retake(account):
                return
            first = False
            try:
                gateway, client = self._make(account)
            except Exception as exc:
                log.exception(
                    "account %r stopped: its gateway could not be made: %s",
                    account_id,
                    _describe(exc),
                )
                self._set(account, "stopped", f"its gateway could not be made: {_describe(exc)}")
                return
            account.gateway = gateway
            if account.state != "starting":
                self._set(account, "starting", None)
            error, was_ready = await self._run_gateway(account, gateway, client)
            final = (
                error is not None
                and not isinstance(error, LeaseLost)
                and not self._restartable(account, error)
            )
            if account.abort.is_set() and not final:
                break  # (a refusal as the fleet stops is still said, below)
            if isinstance(error, LeaseLost):
                log.warning("account %r: %s: %s", account_id, LEASE_LOST, str(error))
                self._set(account, "not_held", f"{LEASE_LOST}: {error}")
                return
            if was_ready:
                failures = 0
            if error is not None and self._restartable(account, error):
                failures += 1
                delay = self._backoff.delay(failures)
                reason = f"{_describe(error)} (restart {failures} in {delay:.1f} s)"
                log.warning(
                    "account %r: its gateway failed (%s); restarting it in %.1f s",
                    account_id,
                    _describe(error),
                    delay,
                )
                self._set(account, "starting", reason)
                try:
                    async with asyncio.timeout(delay):
                        await account.abort.wait()
                except TimeoutError:
                    pass
                continue
            reason = _describe(error) if error is not None else "its gateway stopped by itself"
            crash = error if not isinstance(error, ParallError) else None  # a traceback helps
            log.error("account %r stopped: %s", account_id, reason, exc_info=crash)
            self._set(account, "stopped", reason)
            return
        self._set(account, account.stop_state, account.stop_reason)
        log.info("account %r %s: %s", account_id, account.stop_state, account.stop_reason)

    @staticmethod
    def _restartable(account: _Account, error: BaseException) -> bool:
        """A transient failure; with a shared store also a store error (a database blip
        at start-up, a pool timeout): the database is shared, so it is not the account's
        fault, and the account must not stay stopped while no process runs it."""
        return is_transient(error) or (
            account.view is not None and isinstance(error, StateStoreError)
        )

    async def _retake(self, account: _Account) -> bool:
        """Before a restart: take the lease again (renewed if still this process's, a
        new epoch if it expired meanwhile); ``False`` (and ``not_held``) when another
        process has it, or the store failed."""
        view, key = account.view, account.lease_key()
        assert view is not None
        assert key is not None  # leased once: the key was known
        try:
            lease = await view.acquire_lease(*key)
        except StateStoreError as exc:
            self._set(account, "not_held", f"its lease could not be taken again: {exc}")
            return False
        if lease is None:
            self._set(account, "not_held", HELD_ELSEWHERE)
            return False
        return True

    async def _let_go(self, account: _Account) -> None:
        """After an account's run, with a shared store: release its lease if this process
        still holds it (its gateway released it already when its shutdown got that
        far), so another process can take the account at once."""
        view = account.view
        assert view is not None
        lease = view.lease
        if lease is None:
            return
        try:
            view.check_held()
        except LeaseLost:
            return  # lost or released already
        try:
            await view.release_lease(lease)
        except StateStoreError as exc:
            account.log.warning(
                "account %r: its lease was not released (%s); it expires in %g s",
                account.account_id,
                str(exc),
                view.lease_ttl,
            )

    def _make(self, account: _Account) -> tuple[Gateway, ParallClient]:
        config = account.config
        runtime = self._runtime_factory(config)
        routing = self._routing_factory(config) if self._routing_factory is not None else None
        client = ParallClient(
            config.parall_url,
            config.api_key,
            verify_tls=config.verify_tls,
            connector=self._connector,
        )
        gateway = Gateway(
            config,
            runtime,
            routing=routing,
            client=client,
            store=account.view,
            backoff=self._backoff,
        )
        return gateway, client

    async def _run_gateway(
        self, account: _Account, gateway: Gateway, client: ParallClient
    ) -> tuple[BaseException | None, bool]:
        """One run of a gateway: the error ``start()`` ended with (or ``None``) and
        whether it was ready first."""
        loop = asyncio.get_running_loop()
        start = loop.create_task(
            gateway.start(account.abort), name=f"parall-fleet-gateway-{account.account_id}"
        )
        try:
            ready = await _ready(gateway)
            if ready and not account.abort.is_set():
                self._set(account, "running", None)
                account.log.info("account %r ready", account.account_id)
            try:
                await start
            except Exception as exc:
                return exc, ready
            return None, ready
        finally:
            if not start.done():
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
            await client.close()

    # --- leases (a shared store) ------------------------------------------------------------

    def _tick(self, store: PostgresStateStore) -> float:
        return min(store.lease_ttl / 3, MAX_TICK)

    async def _renew_loop(self, store: PostgresStateStore) -> None:
        """Renew every held lease in one statement every third of ``lease_ttl`` (every
        look while renewals fail), and stop an account whose lease is lost or has run
        out in this machine's clock. Its own task, so that nothing the balancing waits
        for (a slow platform, many takes) delays a renewal. Runs until the fleet's
        runners are done (a shutting-down account keeps its lease until released)."""
        tick = self._tick(store)
        renew_every = store.lease_ttl / 3
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()
        failing = False
        while True:
            if loop.time() - renewed_at >= renew_every * 0.95 or failing:
                try:
                    await self._renew(store)
                except StateStoreError as exc:
                    if not failing:
                        _log.warning("leases not renewed: %s (tried again)", str(exc))
                    failing = True
                except Exception:
                    _log.exception("leases not renewed (tried again)")
                    failing = True
                else:
                    renewed_at = loop.time()
                    if failing:
                        _log.info("leases renewed again")
                    failing = False
            self._expire_unrenewed()
            await asyncio.sleep(tick)

    async def _balance_loop(self, store: PostgresStateStore) -> None:
        """Look at the leases every ``min(lease_ttl / 3, 2)`` seconds (sooner when an
        account is added or its run ends): heartbeat, hand the surplus over, take free
        leases up to this process's share. Stops looking once the fleet shuts down."""
        tick = self._tick(store)
        failing = False
        while not self._stopping:
            self._look_now.clear()
            try:
                await self._balance(store, lasts=3 * tick)
            except StateStoreError as exc:
                if not failing:
                    _log.warning("leases: %s (tried again)", str(exc))
                failing = True
            except Exception:
                _log.exception("leases: the look failed (tried again)")
                failing = True
            else:
                if failing:
                    _log.info("the shared store answers again")
                failing = False
            finally:
                if not self._leases_looked:
                    self._leases_looked = True
                    self._notify()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._look_now.wait()

    def _held(self) -> list[_Account]:
        return [a for a in self._accounts.values() if a.active]

    async def _renew(self, store: PostgresStateStore) -> None:
        held = self._held()  # also those shutting down: their flush writes under the lease
        views = [a.view for a in held if a.view is not None and a.view.lease is not None]
        if not views:
            return
        lost = {id(view) for view in await store.renew_leases(views)}
        for account in held:
            # One shutting down may have released its lease already (after its flush).
            if id(account.view) in lost and not account.abort.is_set():
                account.log.warning(
                    "account %r: %s (not renewed in time, or taken over): stopping it",
                    account.account_id,
                    LEASE_LOST,
                )
                self._lose(account, f"{LEASE_LOST} (not renewed in time, or taken over)")

    def _expire_unrenewed(self) -> None:
        """The store does not answer: stop the accounts whose lease may have expired by
        now in this machine's clock (another process may have taken them over)."""
        for account in self._held():
            view = account.view
            assert view is not None
            if account.abort.is_set():
                continue  # shutting down: its lease may be released already
            try:
                view.check_held()
            except LeaseLost:
                self._lose(account, f"{LEASE_LOST} (the store did not answer)")

    def _lose(self, account: _Account, reason: str) -> None:
        """A held account's lease is lost: stop its gateway, and show it ``not_held`` at
        once (its shutdown is under way, and another process may run it already)."""
        account.stop("not_held", reason)
        self._set(account, "not_held", reason)

    def _share(self, capacities: list[int | None]) -> int:
        """This process's share of the accounts: the least level that the live processes,
        each taking up to the level or its capacity, cover every account with (the
        accounts divided by the processes, rounded up, without capacities)."""
        share = fair_share(len(self._accounts), capacities)
        return share if self._capacity is None else min(share, self._capacity)

    async def _balance(self, store: PostgresStateStore, *, lasts: float) -> None:
        """One look: heartbeat, then hand the surplus over or take free leases."""
        capacities = await store.heartbeat(self._fleet_name, self._capacity, lasts=lasts)
        if len(capacities) != self._live_processes:
            _log.info("%d fleet process(es) share the accounts", len(capacities))
            self._live_processes = len(capacities)
        share = self._share(capacities)
        held = [a for a in self._held() if not a.abort.is_set()]
        if len(held) > share:
            self._hand_over(held, len(held) - share, share, store.holder)
            return
        wanted = share - len(held)
        waiting = sorted(
            (a for a in self._accounts.values() if not a.active and a.state == "not_held"),
            key=lambda a: a.rank(store.holder),
        )
        elsewhere = await store.held_by_others() if wanted > 0 and waiting else set()
        loop = asyncio.get_running_loop()
        beat_at = loop.time()
        for account in waiting:
            if self._stopping or account.removed:
                break
            if loop.time() - beat_at >= lasts / 3:  # a long look: stay counted
                await store.heartbeat(self._fleet_name, self._capacity, lasts=lasts)
                beat_at = loop.time()
            key = account.lease_key()
            if key is not None and key in elsewhere:
                if account.reason != HELD_ELSEWHERE:
                    self._set(account, "not_held", HELD_ELSEWHERE)
                continue
            if wanted <= 0:
                if account.reason not in (HELD_ELSEWHERE, FAIR_SHARE):
                    self._set(account, "not_held", FAIR_SHARE)
                continue
            if await self._take(account):
                wanted -= 1

    def _hand_over(self, held: list[_Account], surplus: int, share: int, holder: str) -> None:
        """Let ``surplus`` accounts go to other processes, idle ones first (then those
        ``holder`` prefers least)."""

        def busy(account: _Account) -> tuple[int, str]:
            gateway = account.gateway
            stats = gateway.stats() if gateway is not None else None
            load = (stats.active_turns + stats.queued) if stats is not None else 0
            return (load, account.rank(holder))

        for account in sorted(held, key=busy)[:surplus]:
            account.log.info(
                "account %r: handed over (this process's share is now %d)",
                account.account_id,
                share,
            )
            account.stop("not_held", HANDED_OVER)

    async def _take(self, account: _Account) -> bool:
        """Take an account's lease and start it; ``False`` when another process holds it
        (or it cannot run: its key is refused, and so on)."""
        view = account.view
        assert view is not None
        if account.agent_id is None and not await self._learn_agent(account):
            return False
        key = account.lease_key()
        assert key is not None
        lease = await view.acquire_lease(*key)
        if lease is None:
            if account.reason != HELD_ELSEWHERE:
                self._set(account, "not_held", HELD_ELSEWHERE)
            return False
        if self._stopping or account.removed or account.account_id not in self._accounts:
            await view.release_lease(lease)  # removed, or shutting down, meanwhile
            return False
        account.log.info("account %r: lease taken (epoch %d)", account.account_id, lease.epoch)
        self._set(account, "starting", None)
        self._launch(account)
        account.task.add_done_callback(lambda _: self._look_now.set())  # type: ignore[union-attr]
        return True

    async def _learn_agent(self, account: _Account) -> bool:
        """The agent id of an account whose config has none (its lease is keyed by it):
        asked once with its key. A refused key stops the account; a transient failure
        is tried again at the next look."""
        config = account.config
        client = ParallClient(
            config.parall_url,
            config.api_key,
            verify_tls=config.verify_tls,
            connector=self._connector,
        )
        try:
            me = await client.get_me()
        except ParallError as exc:
            if is_transient(exc):
                account.log.warning(
                    "account %r: who its key is could not be asked (%s); tried again",
                    account.account_id,
                    _describe(exc),
                )
                return False
            account.log.error("account %r stopped: %s", account.account_id, _describe(exc))
            self._set(account, "stopped", _describe(exc))
            return False
        finally:
            await client.close()
        account.agent_id = me.id
        return True

    async def _release_leftovers(self, store: PostgresStateStore) -> None:
        """Last: no account runs here any more, so any lease this process still holds
        (taken as the shutdown began, its look cancelled before it ran) is released now,
        not after its time to live."""
        try:
            released = await store.release_all_leases()
        except StateStoreError as exc:
            _log.warning("leases left to expire: %s", str(exc))
            return
        if released:
            _log.info("released %d lease(s) taken as the fleet stopped", released)

    async def _leave(self, store: PostgresStateStore) -> None:
        """At the start of the shutdown: delete this process's heartbeat row, so the
        others count it out at once."""
        try:
            await store.leave()
        except StateStoreError as exc:
            _log.warning("the fleet's heartbeat row was not deleted: %s", str(exc))


def fair_share(accounts: int, capacities: Iterable[int | None]) -> int:
    """The least number of accounts ``L`` such that the processes, each holding
    ``min(L, its capacity)`` (``None``: no cap), hold every account; when their
    capacities add up to fewer than ``accounts``, the largest capacity (every process
    then takes all it may). Without capacities: ``accounts`` divided by the processes,
    rounded up."""
    caps = list(capacities) or [None]
    if accounts <= 0:
        return 0
    if all(cap is not None for cap in caps) and sum(c for c in caps if c is not None) < accounts:
        return max(c for c in caps if c is not None)
    low, high = 1, accounts
    while low < high:  # the least level that covers every account
        level = (low + high) // 2
        if sum(level if cap is None else min(level, cap) for cap in caps) >= accounts:
            high = level
        else:
            low = level + 1
    return low
