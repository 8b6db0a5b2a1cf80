"""``GatewayFleet``: many accounts, one process.

Each account (a :class:`GatewayConfig`: its own API key, WebSocket, dispatch
queue and state) runs its own :class:`Gateway`; the fleet starts them
together, keeps them apart, restarts the one that fails for a transient
reason, stops the one that cannot run (a revoked key...) without touching the
others, and shuts them all down at once. What they share is what is safe to
share: one aiohttp connector (the pool of REST connections). Each account's
client keeps its own session, and its API key goes in its own requests'
headers only.

A host does::

    fleet = GatewayFleet(configs, lambda config: MyRuntime(config.account_id))
    await fleet.start(abort_event)   # runs until abort_event is set
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Iterable
from typing import Final, Literal, TypeAlias, TypedDict

import aiohttp

from .._retry import Backoff, is_transient
from .._tasks import TaskSet
from ..client import ParallClient
from ..errors import ParallError
from ..routing import RoutingStrategy
from ..runtime import AgentRuntime
from ..state import StateStore
from .config import GatewayConfig
from .gateway import Gateway, GatewayStats

__all__ = ["AccountState", "AccountStats", "FleetStats", "GatewayFleet"]

_log = logging.getLogger("parall_bridge.gateway.fleet")

AccountState: TypeAlias = Literal["running", "starting", "stopped", "not_held"]
"""Where an account of a fleet is: ``starting`` (its gateway is starting, or waits to
be restarted), ``running`` (ready: connected, first catch-up done), ``stopped`` (it
will not run again in this fleet: refused, failed, removed, or the fleet stopped);
``not_held`` is kept for a shared store's leases, which this release does not have."""

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


def _tag_library_loggers() -> None:
    """Put the account filter on the library's loggers (not the emulator's): a logger's
    filters see only the records logged on it, so each gets it. Idempotent."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (
            isinstance(logger, logging.Logger)
            and (name == "parall_bridge" or name.startswith("parall_bridge."))
            and not name.startswith("parall_bridge.testing")
            and _FILTER not in logger.filters
        ):
            logger.addFilter(_FILTER)


FLEET_STOPPED: Final = "the fleet stopped"
"""The ``reason`` of an account stopped by the fleet's shutdown."""
REMOVED: Final = "removed from the fleet"
"""The ``reason`` of an account stopped by :meth:`GatewayFleet.remove` (until it leaves)."""


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

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.abort = asyncio.Event()  # set: this account's gateway shuts down for good
        self.stop_reason = FLEET_STOPPED
        self.state: AccountState = "starting"
        self.reason: str | None = None
        self.gateway: Gateway | None = None
        self.task: asyncio.Task[None] | None = None
        self.log = logging.LoggerAdapter(_log, {"account_id": config.account_id})

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

    Every log record of the fleet's own carries the account id (the record's
    ``account_id`` attribute, and the message), and so does every record the library
    logs for an account (its gateway, client, WebSocket: the ``account_id`` attribute,
    for a formatter's ``%(account_id)s``, with ``defaults={"account_id": "-"}`` for the
    records of no account). For that, :meth:`start` puts a filter on the
    library's loggers (those of ``parall_bridge`` modules imported by then); it only
    adds the attribute to records logged from an account's tasks.

    Args:
        accounts: one :class:`GatewayConfig` per account.
        runtime_factory: makes an account's runtime; called with the account's config
            each time its gateway is made (at start, and again for each restart: a
            gateway's runtime has seen ``on_stop`` when it ends).
        store: a state store shared by every account. Not supported yet (a later
            release brings a PostgreSQL store with account leases): give ``None``,
            and each account keeps its own state as the bare :class:`Gateway` does
            (a SQLite file at its config's ``state_path``, else memory).
        routing_factory: makes an account's routing strategy, like
            ``runtime_factory``; by default each gateway's default strategy.
        backoff: delays between restarts of an account after a transient failure,
            also given to each gateway (its start-up retries and reconnects).

    Raises:
        ValueError: two accounts have the same ``account_id`` or API key, or a
            ``store`` was given.
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
    ) -> None:
        if store is not None:
            raise ValueError(
                "GatewayFleet(store=...): a store shared by the accounts is not supported "
                "yet; leave it None and each account keeps its own state (state_path)"
            )
        self._runtime_factory = runtime_factory
        self._routing_factory = routing_factory
        self._backoff = backoff or Backoff()
        self._accounts: dict[str, _Account] = {}
        for config in accounts:
            self._admit(config)
        self._runners = TaskSet(_log)
        self._connector: aiohttp.TCPConnector | None = None
        self._started = False
        self._abort: asyncio.Event | None = None
        self._stopping = False
        self._changed = asyncio.Event()

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

    async def start(self, abort_event: asyncio.Event) -> None:
        """Run every account until ``abort_event`` is set, then shut them all down at
        once: each gateway's graceful shutdown (its ``shutdown_grace``) runs alongside
        the others', so the fleet's takes as long as the longest one, not their sum.

        Returns once every account's gateway has stopped and every task the fleet
        started is done; an account that failed does not make it fail.
        """
        if self._started:
            raise RuntimeError("a GatewayFleet runs once; make a new one")
        self._started = True
        self._abort = abort_event
        _tag_library_loggers()
        self._connector = aiohttp.TCPConnector(limit=0)  # no cap shared across accounts
        try:
            for account in self._accounts.values():
                self._launch(account)
            await abort_event.wait()
        finally:
            self._stopping = True
            for account in self._accounts.values():
                account.abort.set()
            try:
                await self._runners.wait(None)
            finally:
                await self._runners.cancel()
                await self._connector.close()
                self._notify()

    async def wait_ready(self) -> None:
        """Return once every account is ready (``running``) or ``stopped``: an account
        that cannot run does not block it, nor does a fleet without accounts. Look at
        :meth:`stats` for which is which."""
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

    async def add(self, config: GatewayConfig) -> None:
        """Add an account; while the fleet runs its gateway starts at once (this returns
        without waiting for it to be ready: see :meth:`wait_ready` and :meth:`stats`).

        Raises:
            ValueError: its ``account_id`` or API key is already in the fleet (also
                while an account of that id is being removed).
            RuntimeError: the fleet is shutting down or has stopped.
        """
        if self._stopping or (self._abort is not None and self._abort.is_set()):
            # Once abort is set, before start() has woken up to it too.
            raise RuntimeError("the fleet is shutting down: no account can be added")
        account = self._admit(config)
        if self._started:
            self._launch(account)
        self._notify()

    async def remove(self, account_id: str) -> None:
        """Shut an account's gateway down gracefully (its ``shutdown_grace``, flushes,
        ``on_stop``) and drop the account; returns once that is done.

        Raises:
            KeyError: no such account.
        """
        account = self._accounts[account_id]
        account.stop_reason = REMOVED
        account.abort.set()
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

    def _admit(self, config: GatewayConfig) -> _Account:
        if not isinstance(config, GatewayConfig):
            raise TypeError(f"an account must be a GatewayConfig, got {type(config).__name__}")
        account_id = config.account_id
        if account_id in self._accounts:
            raise ValueError(f"account {account_id!r} is already in the fleet")
        for other in self._accounts.values():
            if (other.config.parall_url, other.config.api_key) == (
                config.parall_url,
                config.api_key,
            ):
                raise ValueError(
                    f"accounts {other.account_id!r} and {account_id!r} have the same API key"
                )
        account = _Account(config)
        self._accounts[account_id] = account
        return account

    def _launch(self, account: _Account) -> None:
        account.task = self._runners.spawn(
            self._run(account), name=f"parall-fleet-account-{account.account_id}"
        )

    def _notify(self) -> None:
        """Wake :meth:`wait_ready`: something changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _settled(self) -> bool:
        return all(a.state in ("running", "stopped") for a in self._accounts.values())

    def _set(self, account: _Account, state: AccountState, reason: str | None) -> None:
        account.state = state
        account.reason = reason
        self._notify()

    async def _run(self, account: _Account) -> None:
        """Run an account's gateway; restart it after a transient failure, with backoff,
        until the account is removed or the fleet stops; stop it after any other."""
        log = account.log
        account_id = account.account_id
        _ACCOUNT.set(account_id)  # this task's own context: its gateway's tasks inherit it
        failures = 0
        while not account.abort.is_set():
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
            error, was_ready = await self._run_gateway(account, gateway, client)
            if account.abort.is_set():
                break
            if was_ready:
                failures = 0
            if error is not None and is_transient(error):
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
        self._set(account, "stopped", account.stop_reason)
        log.info("account %r stopped: %s", account_id, account.stop_reason)

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
        gateway = Gateway(config, runtime, routing=routing, client=client, backoff=self._backoff)
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
