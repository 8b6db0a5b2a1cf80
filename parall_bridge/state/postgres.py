"""``PostgresStateStore``: gateways' state in a shared PostgreSQL database (asyncpg).

One database holds the state of many accounts: every row is keyed by its
account, the agent's platform URL, org and agent id (never the gateway's
``account_id`` alone). A store object is one account's view of it: its first
:meth:`~StateStore.load` binds it to that agent and it refuses another, as a
SQLite file does; another object on the same database serves another agent.

The tables live in the PostgreSQL schema ``parall_bridge``. The database records
its schema version and the oldest version of this code that can still use it:
an older database is migrated on open (:data:`MIGRATIONS`, run under a
PostgreSQL advisory lock, so processes that start at once migrate it once); a
database that needs newer code is refused and left as it is.

Account leases (:meth:`~PostgresStateStore.acquire_lease`): at most one holder
per account at any moment, across processes and machines. A lease row per account
(platform URL, org, agent id) names its holder, an epoch bumped on every new
acquisition, and an expiry in the database's clock. Once a store object holds a
lease, every write it makes is fenced: checked against the lease row in its own
transaction and refused with :class:`~parall_bridge.errors.LeaseLost` (nothing
applied) once another holder took the account over or the lease expired. A store
object that never takes a lease writes as before (one process per account).

A :class:`~parall_bridge.GatewayFleet` given the store takes, renews and releases
the leases itself: one :meth:`~PostgresStateStore.view` per account on the store's
connection pool, every lease renewed in one statement
(:meth:`~PostgresStateStore.renew_leases`), and a heartbeat row per process
(:meth:`~PostgresStateStore.heartbeat`, table ``parall_bridge.processes``) from
which each process counts the live ones to take its fair share.

The DSN's password is never shown: :attr:`~PostgresStateStore.description`,
``repr`` and every error name the database without it.

asyncpg (``pip install 'parall-bridge[postgres]'``) is imported when a store
opens, never by ``import parall_bridge``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol
from urllib.parse import SplitResult, quote, unquote, urlsplit

import attrs

from ..errors import LeaseLost, StateStoreError
from .base import SourceRow, StateBatch, StateStore, StoredState, StoreIdentity, StoreMeta, TurnRow

__all__ = [
    "MIGRATIONS",
    "MIGRATION_LOCK",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Lease",
    "Migration",
    "PostgresStateStore",
]

_log = logging.getLogger("parall_bridge.state.postgres")


def _clock() -> float:
    """Seconds on a clock that keeps counting while the machine is suspended (Linux's
    ``CLOCK_BOOTTIME``; ``time.monotonic`` elsewhere): a lease's local deadline must pass
    during a suspend as it does on the database server."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)

SCHEMA = "parall_bridge"
"""The PostgreSQL schema (namespace) that holds the store's tables (spelt out in the SQL)."""

SCHEMA_VERSION = 3
"""The schema version this code reads and writes."""

MIGRATION_LOCK = (0x50524C4C, 1)
"""The advisory lock (two 32-bit keys, ``PRLL`` and 1) held while a store migrates."""


def _statements(values: Iterable[str]) -> tuple[str, ...]:
    return (values,) if isinstance(values, str) else tuple(values)


@attrs.frozen
class Migration:
    """One schema upgrade, from version ``N`` to ``N + 1`` (:data:`MIGRATIONS`).

    Attributes:
        statements: SQL run in order, in the migration's transaction.
        oldest_reader: the oldest code schema version that can still use the database
            once this step ran. ``None`` (an additive step: new tables, new nullable
            columns, new indexes) keeps what the database recorded, so processes of the
            previous version keep running beside the new ones during a rolling deploy.
    """

    statements: tuple[str, ...] = attrs.field(converter=_statements)
    oldest_reader: int | None = None


MIGRATIONS: dict[int, Migration] = {
    # 1 -> 2: account leases (additive: version 1 code ignores the table).
    1: Migration(
        """CREATE TABLE parall_bridge.leases (
            parall_url text NOT NULL, org_id text NOT NULL, agent_id text NOT NULL,
            holder text NOT NULL, epoch bigint NOT NULL, expires_at timestamptz NOT NULL,
            acquired_at timestamptz NOT NULL,
            PRIMARY KEY (parall_url, org_id, agent_id))"""
    ),
    # 2 -> 3: fleet processes' heartbeats (additive: version 2 code ignores the table).
    2: Migration(
        """CREATE TABLE parall_bridge.processes (
            holder text PRIMARY KEY, fleet text NOT NULL, capacity integer,
            started_at timestamptz NOT NULL, expires_at timestamptz NOT NULL)"""
    ),
}
"""Version ``N`` -> the :class:`Migration` that upgrades a database from ``N`` to ``N + 1``.

On open, under :data:`MIGRATION_LOCK`, an older database runs every step up to
:data:`SCHEMA_VERSION` in one transaction. A new database gets the version 1 schema
and then the same steps.
"""

_SCHEMA_V1 = (
    "CREATE SCHEMA IF NOT EXISTS parall_bridge",
    """CREATE TABLE parall_bridge.schema_version (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version integer NOT NULL,
        oldest_reader integer NOT NULL,
        migrated_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE parall_bridge.accounts (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        parall_url text NOT NULL, org_id text NOT NULL, agent_id text NOT NULL,
        account_id text NOT NULL,
        last_seq bigint NOT NULL DEFAULT 0, session_id text, last_heard_at double precision,
        UNIQUE (parall_url, org_id, agent_id))""",
    """CREATE TABLE parall_bridge.sources (
        account bigint NOT NULL REFERENCES parall_bridge.accounts (id) ON DELETE CASCADE,
        key text NOT NULL, source_type text NOT NULL, source_id text NOT NULL,
        origin text NOT NULL, state text NOT NULL, attempts bigint NOT NULL,
        next_attempt_at double precision, last_error text, dispatch_ids text[] NOT NULL,
        ack_pending boolean NOT NULL, turn_id text, event text, ord bigint NOT NULL,
        seq bigint GENERATED ALWAYS AS IDENTITY,
        PRIMARY KEY (account, key))""",
    """CREATE TABLE parall_bridge.turns (
        account bigint NOT NULL REFERENCES parall_bridge.accounts (id) ON DELETE CASCADE,
        turn_id text NOT NULL, keys text[] NOT NULL, session_key text NOT NULL,
        prefix text NOT NULL, attempt bigint NOT NULL, state text NOT NULL,
        ord bigint NOT NULL, seq bigint GENERATED ALWAYS AS IDENTITY,
        PRIMARY KEY (account, turn_id))""",
)
# An update keeps a row's seq, the tie-break of equal orders, as memory and SQLite do.
_PUT_SOURCE = """INSERT INTO parall_bridge.sources (account, key, source_type, source_id, origin,
        state, attempts, next_attempt_at, last_error, dispatch_ids, ack_pending, turn_id,
        event, ord)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
    ON CONFLICT (account, key) DO UPDATE SET source_type = excluded.source_type,
        source_id = excluded.source_id, origin = excluded.origin, state = excluded.state,
        attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
        last_error = excluded.last_error, dispatch_ids = excluded.dispatch_ids,
        ack_pending = excluded.ack_pending, turn_id = excluded.turn_id,
        event = excluded.event, ord = excluded.ord"""
_PUT_TURN = """INSERT INTO parall_bridge.turns (account, turn_id, keys, session_key, prefix,
        attempt, state, ord)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (account, turn_id) DO UPDATE SET keys = excluded.keys,
        session_key = excluded.session_key, prefix = excluded.prefix,
        attempt = excluded.attempt, state = excluded.state, ord = excluded.ord"""
_DELETE_SOURCE = "DELETE FROM parall_bridge.sources WHERE account = $1 AND key = $2"
_DELETE_TURN = "DELETE FROM parall_bridge.turns WHERE account = $1 AND turn_id = $2"
_PUT_META = """UPDATE parall_bridge.accounts SET last_seq = $2, session_id = $3,
    last_heard_at = $4 WHERE id = $1"""
_BIND_ACCOUNT = """INSERT INTO parall_bridge.accounts (parall_url, org_id, agent_id, account_id)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (parall_url, org_id, agent_id) DO UPDATE SET account_id = excluded.account_id
    RETURNING id, last_seq, session_id, last_heard_at"""
_SELECT_SOURCES = """SELECT key, source_type, source_id, origin, state, attempts,
    next_attempt_at, last_error, dispatch_ids, ack_pending, turn_id, event, ord
    FROM parall_bridge.sources WHERE account = $1 ORDER BY ord, seq"""
_SELECT_TURNS = """SELECT turn_id, keys, session_key, prefix, attempt, state, ord
    FROM parall_bridge.turns WHERE account = $1 ORDER BY ord, seq"""
# Leases: every time is the server's (clock_timestamp(): the moment of the statement).
# A new acquisition (free, expired, or released) bumps the epoch; the holder's own live
# lease is renewed as it is; another holder's live lease is left alone (no row returned).
_ACQUIRE_LEASE = """INSERT INTO parall_bridge.leases AS lease (parall_url, org_id, agent_id,
        holder, epoch, expires_at, acquired_at)
    VALUES ($1, $2, $3, $4, 1, clock_timestamp() + make_interval(secs => $5),
        clock_timestamp())
    ON CONFLICT (parall_url, org_id, agent_id) DO UPDATE SET holder = excluded.holder,
        epoch = CASE WHEN lease.expires_at > clock_timestamp() THEN lease.epoch
            ELSE lease.epoch + 1 END,
        acquired_at = CASE WHEN lease.expires_at > clock_timestamp() THEN lease.acquired_at
            ELSE excluded.acquired_at END,
        expires_at = excluded.expires_at
    WHERE lease.expires_at <= clock_timestamp() OR lease.holder = excluded.holder
    RETURNING holder, epoch, expires_at"""
_RENEW_LEASE = """UPDATE parall_bridge.leases
    SET expires_at = clock_timestamp() + make_interval(secs => $6)
    WHERE parall_url = $1 AND org_id = $2 AND agent_id = $3 AND holder = $4 AND epoch = $5
        AND expires_at > clock_timestamp()
    RETURNING holder, epoch, expires_at"""
# Every lease of one holder renewed in one statement (a fleet's accounts).
_RENEW_LEASES = """UPDATE parall_bridge.leases AS lease
    SET expires_at = clock_timestamp() + make_interval(secs => $2)
    FROM unnest($3::text[], $4::text[], $5::text[], $6::bigint[])
        AS mine (parall_url, org_id, agent_id, epoch)
    WHERE lease.parall_url = mine.parall_url AND lease.org_id = mine.org_id
        AND lease.agent_id = mine.agent_id AND lease.epoch = mine.epoch
        AND lease.holder = $1 AND lease.expires_at > clock_timestamp()
    RETURNING lease.parall_url, lease.org_id, lease.agent_id, lease.expires_at"""
# A fleet process's heartbeat: its row lives for a lease's time to live; rows of
# processes gone for a while are deleted on the way. Returns the live processes of the
# same fleet (this one included).
_HEARTBEAT = """INSERT INTO parall_bridge.processes AS process (holder, fleet, capacity,
        started_at, expires_at)
    VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp() + make_interval(secs => $4))
    ON CONFLICT (holder) DO UPDATE SET fleet = excluded.fleet, capacity = excluded.capacity,
        expires_at = excluded.expires_at"""
_FORGET_GONE = """DELETE FROM parall_bridge.processes
    WHERE expires_at < clock_timestamp() - make_interval(secs => $1)"""
_LIVE_PROCESSES = """SELECT capacity FROM parall_bridge.processes
    WHERE fleet = $1 AND expires_at > clock_timestamp() ORDER BY holder"""
_LEAVE = "DELETE FROM parall_bridge.processes WHERE holder = $1"
_RELEASE_ALL = """UPDATE parall_bridge.leases SET expires_at = clock_timestamp()
    WHERE holder = $1 AND expires_at > clock_timestamp()"""
_HELD_BY_OTHERS = """SELECT parall_url, org_id, agent_id FROM parall_bridge.leases
    WHERE holder <> $1 AND expires_at > clock_timestamp()"""
_RELEASE_LEASE = """UPDATE parall_bridge.leases SET expires_at = clock_timestamp()
    WHERE parall_url = $1 AND org_id = $2 AND agent_id = $3 AND holder = $4 AND epoch = $5
        AND expires_at > clock_timestamp()"""
# The fence: first statement of a fenced transaction. FOR SHARE holds the row until the
# transaction ends, so a takeover (an UPDATE of the row) waits for the write to commit
# and the new holder reads it; a write that starts after the takeover finds no row.
_FENCE = """SELECT 1 FROM parall_bridge.leases
    WHERE parall_url = $1 AND org_id = $2 AND agent_id = $3 AND holder = $4 AND epoch = $5
        AND expires_at > clock_timestamp()
    FOR SHARE"""


@attrs.frozen
class Lease:
    """An account's lease, as a store acquired or renewed it
    (:meth:`PostgresStateStore.acquire_lease`).

    Attributes:
        parall_url: the platform's API base URL (without a trailing slash).
        org_id: the organisation.
        agent_id: the agent's user id.
        holder: who holds it (the store's :attr:`~PostgresStateStore.holder`).
        epoch: bumped on every new acquisition of the account's lease (never on a
            renewal): a write fenced by an older epoch is refused.
        expires_at: when it expires unless renewed, in the database server's clock
            (timezone-aware); compare it with the server's time, not this machine's.
    """

    parall_url: str
    org_id: str
    agent_id: str
    holder: str
    epoch: int
    expires_at: datetime.datetime

    @property
    def key(self) -> tuple[str, str, str]:
        """The account it is for: platform URL, org, agent id."""
        return (self.parall_url, self.org_id, self.agent_id)

    def describe(self) -> str:
        """A one-line description for logs and errors."""
        return (
            f"lease of agent {self.agent_id} of {self.org_id} at {self.parall_url} "
            f"(holder {self.holder!r}, epoch {self.epoch})"
        )


class _Connection(Protocol):
    """The part of ``asyncpg.Connection`` the store uses (asyncpg has no type hints)."""

    async def execute(self, query: str, *args: object) -> str: ...
    async def executemany(self, command: str, args: Iterable[Sequence[object]]) -> None: ...
    async def fetch(self, query: str, *args: object) -> list[Mapping[str, Any]]: ...
    async def fetchrow(self, query: str, *args: object) -> Mapping[str, Any] | None: ...
    async def fetchval(self, query: str, *args: object) -> Any: ...
    def transaction(self) -> AbstractAsyncContextManager[object]: ...
    def terminate(self) -> None: ...


class _Pool(Protocol):
    """The part of ``asyncpg.Pool`` the store uses."""

    def acquire(
        self, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[_Connection]: ...
    async def close(self) -> None: ...
    def terminate(self) -> None: ...


class PostgresStateStore(StateStore):
    """A :class:`StateStore` in a PostgreSQL database that many accounts can share.

    Args:
        dsn: the database's URL, ``postgresql://user:password@host:port/database``
            (asyncpg's form; the password may also come from ``PGPASSWORD`` or a
            ``.pgpass`` file). It is never shown: :attr:`description` leaves the
            password out.
        lease_ttl: seconds an account lease lasts unless renewed
            (:meth:`acquire_lease`); renew well within it (a third of it, say).
        holder: who this object is when it holds a lease (logged, and stored in the
            lease row); by default unique to the object: ``hostname:pid:random``.
        pool_size: the most connections it opens to the database (its :meth:`view` s
            share them).
        op_timeout: seconds one database operation (a connection from the pool, then
            a statement) may take before it fails with a
            :class:`~parall_bridge.errors.StateStoreError`; keep it under a third of
            ``lease_ttl``, so that a hung database shows before leases expire.

    The object is one account's view of the database: its first :meth:`load` binds it to
    that agent (platform URL, org, agent id), and it refuses another agent after that, as
    a SQLite file does. Several objects on one database serve several accounts, each
    seeing only its own rows.

    Leases and fencing: an object that never calls :meth:`acquire_lease` writes as a
    single process would, unfenced (run each account in one process at a time). Once it
    called :meth:`acquire_lease`, it is fenced for good: :meth:`load` and every
    :meth:`write` check, in their own transaction, that its lease is still its own at
    its epoch and not expired, and raise :class:`~parall_bridge.errors.LeaseLost`
    without applying anything otherwise (also after :meth:`release_lease`, and while
    :meth:`acquire_lease` found the account held by another). A lease lost and then
    acquired again (a new epoch) does not revive the writes of what was loaded before:
    they stay refused until :meth:`load` runs again (another holder may have run the
    account meanwhile). A gateway on such a store sends no reply and no ack after its
    lease is lost: both wait on a durable write.
    """

    def __init__(
        self,
        dsn: str,
        *,
        lease_ttl: float = 30.0,
        holder: str | None = None,
        pool_size: int = 10,
        op_timeout: float = 10.0,
    ) -> None:
        if not (math.isfinite(lease_ttl) and lease_ttl > 0):
            raise ValueError(f"lease_ttl must be a positive number of seconds, not {lease_ttl!r}")
        if not (math.isfinite(op_timeout) and op_timeout > 0):
            raise ValueError(f"op_timeout must be a positive number of seconds, not {op_timeout!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be a positive integer, not {pool_size!r}")
        if holder is not None and not holder:
            raise ValueError("holder must not be empty")
        super().__init__()
        self._lease_ttl = float(lease_ttl)
        self._op_timeout = float(op_timeout)
        self._pool_size = pool_size
        self._holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._parent: PostgresStateStore | None = None  # set on a view: its pool is the parent's
        self.release_lease_with_gateway = False
        """Whether :meth:`release` (a gateway done with the store, in its shutdown once
        flushed) releases the lease too: set by :meth:`view` ``release_lease``, and by a
        fleet before it stops an account for good (not when it restarts one)."""
        self._fenced = False
        self._loaded_epoch: int | None = None  # the lease epoch its load ran under
        self._lease: Lease | None = None
        # _clock() by which the lease surely expired, unless renewed: counted from
        # before the statement that set its expiry, so never later than the server's.
        self._deadline = -math.inf
        self._dsn = dsn
        self._secrets = _secrets_of(dsn)
        self._description = _describe(dsn)
        self._pool: _Pool | None = None
        self._lease_pool: _Pool | None = None
        self._server_error: type[Exception] = Exception  # asyncpg.PostgresError, once open
        self._owner: StoreIdentity | None = None
        self._account: int | None = None

    @property
    def description(self) -> str:
        """The database's URL without its password."""
        return self._description

    @property
    def holder(self) -> str:
        """Who this object is in the lease rows it takes."""
        return self._holder

    @property
    def lease_ttl(self) -> float:
        """Seconds a lease lasts unless renewed."""
        return self._lease_ttl

    @property
    def lease(self) -> Lease | None:
        """The lease its writes are fenced by, as last acquired or renewed (it may have
        been lost since: only the database knows), or ``None``."""
        return self._lease

    @property
    def op_timeout(self) -> float:
        """Seconds one database operation may take."""
        return self._op_timeout

    def __repr__(self) -> str:
        return f"PostgresStateStore({self._description!r})"

    def view(self, *, release_lease: bool = False) -> PostgresStateStore:
        """Another account's view of the same database: a store object of its own (bound
        to its own agent by its first :meth:`load`, with its own lease and fencing) that
        shares this object's connection pool, holder and settings. A fleet gives one to
        each of its accounts.

        It opens once this object is open (its :meth:`open` takes nothing of its own) and
        its :meth:`close` leaves the pool to this object, which closes it.

        Args:
            release_lease: when the gateway using the view is done with it
                (:meth:`release`: in its shutdown, once its turns and writes are flushed
                and before ``on_stop``), release the view's lease too, so that another
                process can take the account at once.
        """
        if self._parent is not None:
            return self._parent.view(release_lease=release_lease)
        child = PostgresStateStore(
            self._dsn,
            lease_ttl=self._lease_ttl,
            holder=self._holder,
            pool_size=self._pool_size,
            op_timeout=self._op_timeout,
        )
        child._parent = self
        child.release_lease_with_gateway = release_lease
        return child

    def check_held(self) -> None:
        """Raise :class:`~parall_bridge.errors.LeaseLost` when this object takes leases and
        its lease may have expired by now: its last acquisition or renewal was longer
        than :attr:`lease_ttl` ago in this machine's clock (no database round trip). A
        gateway checks it before each send and ack, on top of the fenced writes they wait
        on: a process paused past its lease sends nothing once it wakes up."""
        if not self._fenced:
            return
        lease = self._lease
        if lease is None:
            raise LeaseLost(
                f"state store {self._description} holds no lease (another holder has it)"
            )
        if _clock() >= self._deadline:
            raise LeaseLost(
                f"state store {self._description}: {lease.describe()} expired (not renewed "
                f"within {self._lease_ttl:g} s)"
            )

    # --- leases ---------------------------------------------------------------------------

    async def acquire_lease(self, parall_url: str, org_id: str, agent_id: str) -> Lease | None:
        """Take the account's lease, if it is free or expired (a new epoch), or renew it if
        this object's holder has it already (the same epoch).

        From the first call on, this object's writes are fenced by the lease it holds
        (see the class); the account must be the one the object is bound to, if any.

        Returns:
            The lease, or ``None`` when another holder has a live lease on the account
            (this object's writes are refused meanwhile).

        Raises:
            StateStoreError: the store is not open, is bound to another agent, or the
                database failed.
        """
        key = self._lease_key(parall_url, org_id, agent_id)
        self._fenced = True
        asked = _clock()
        async with self._errors("acquire a lease"), self._connection() as conn:
            row = await conn.fetchrow(_ACQUIRE_LEASE, *key, self._holder, self._lease_ttl)
        if row is None:
            return None
        lease = Lease(
            *key, holder=row["holder"], epoch=int(row["epoch"]), expires_at=row["expires_at"]
        )
        self._lease = lease
        self._deadline = asked + self._lease_ttl
        return lease

    async def renew_lease(self, lease: Lease) -> Lease:
        """Extend ``lease`` by :attr:`lease_ttl` from now (the same epoch).

        Raises:
            LeaseLost: it is no longer this holder's at that epoch, or it expired.
            StateStoreError: the store is not open, or the database failed.
        """
        self._check_holder(lease)
        asked = _clock()
        async with self._errors("renew a lease"), self._connection() as conn:
            row = await conn.fetchrow(
                _RENEW_LEASE, *lease.key, lease.holder, lease.epoch, self._lease_ttl
            )
        if row is None:
            raise LeaseLost(
                f"state store {self._description}: {lease.describe()} was lost (expired, "
                "released, or taken over)"
            )
        renewed = attrs.evolve(lease, expires_at=row["expires_at"])
        self._renewed(renewed, asked)
        return renewed

    def _renewed(self, renewed: Lease, asked: float) -> None:
        current = self._lease
        if self._deadline == -math.inf:
            return  # released meanwhile (a renewal in flight must not revive it here)
        if current is not None and current.key == renewed.key and current.epoch == renewed.epoch:
            self._lease = renewed
            self._deadline = asked + self._lease_ttl

    async def renew_leases(self, views: Iterable[PostgresStateStore]) -> list[PostgresStateStore]:
        """Renew the leases of many views of this store (:meth:`view`) in one statement:
        what a fleet does every third of :attr:`lease_ttl`.

        Returns:
            The views whose lease was lost (expired, released, or taken over), or that
            hold none: stop what runs on them.

        Raises:
            StateStoreError: the store is not open, or the database failed (nothing is
                known of the leases then: try again before they expire).
        """
        views = list(views)
        held = [(view, view._lease) for view in views]
        leases = [lease for _, lease in held if lease is not None]
        for view, _ in held:
            if view._holder != self._holder:
                raise StateStoreError(
                    f"state store {self._description}: a view of another holder "
                    f"({view._holder!r}) cannot be renewed with this store's"
                )
        renewed: dict[tuple[str, str, str], datetime.datetime] = {}
        asked = _clock()
        if leases:
            async with self._errors("renew leases"), self._lease_connection() as conn:
                rows = await conn.fetch(
                    _RENEW_LEASES,
                    self._holder,
                    self._lease_ttl,
                    [lease.parall_url for lease in leases],
                    [lease.org_id for lease in leases],
                    [lease.agent_id for lease in leases],
                    [lease.epoch for lease in leases],
                )
            renewed = {
                (row["parall_url"], row["org_id"], row["agent_id"]): row["expires_at"]
                for row in rows
            }
        lost: list[PostgresStateStore] = []
        for view, lease in held:
            expires_at = renewed.get(lease.key) if lease is not None else None
            if lease is not None and expires_at is not None:
                view._renewed(attrs.evolve(lease, expires_at=expires_at), asked)
            elif view._lease is lease:  # (not acquired again meanwhile)
                lost.append(view)
        return lost

    async def heartbeat(
        self, fleet: str, capacity: int | None = None, *, lasts: float | None = None
    ) -> list[int | None]:
        """Say this holder's fleet process is alive (its row in ``parall_bridge.processes``
        lives ``lasts`` seconds, :attr:`lease_ttl` by default) and list the live processes
        of ``fleet`` (this one included) by their ``capacity`` (``None``: no cap): what a
        fleet shares its accounts out by. Rows of processes gone for ten times the time
        to live are deleted.

        Raises:
            StateStoreError: the store is not open, or the database failed.
        """
        lasts = self._lease_ttl if lasts is None else lasts
        async with self._errors("heartbeat"), self._lease_connection() as conn:
            async with conn.transaction():
                await conn.execute(_HEARTBEAT, self._holder, fleet, capacity, lasts)
                await conn.execute(_FORGET_GONE, 10 * self._lease_ttl)
            rows = await conn.fetch(_LIVE_PROCESSES, fleet)
        return [None if row["capacity"] is None else int(row["capacity"]) for row in rows]

    async def held_by_others(self) -> set[tuple[str, str, str]]:
        """The accounts (platform URL, org, agent id) whose lease another holder has, live
        now: those a fleet need not ask for (one statement, instead of one per account).

        Raises:
            StateStoreError: the store is not open, or the database failed.
        """
        async with self._errors("list leases"), self._lease_connection() as conn:
            rows = await conn.fetch(_HELD_BY_OTHERS, self._holder)
        return {(row["parall_url"], row["org_id"], row["agent_id"]) for row in rows}

    async def release_all_leases(self) -> int:
        """Release every live lease of this holder (its views' included): what a fleet
        does last, once none of its accounts runs any more, so that a lease taken as the
        shutdown began (and never run) does not wait out its time to live. Returns how
        many were released.

        Raises:
            StateStoreError: the store is not open, or the database failed.
        """
        async with self._errors("release leases"), self._lease_connection() as conn:
            done = await conn.execute(_RELEASE_ALL, self._holder)
        return int(done.rsplit(" ", 1)[-1]) if done.startswith("UPDATE") else 0

    async def leave(self) -> None:
        """Delete this holder's process row: the other processes count one fewer at their
        next heartbeat.

        Raises:
            StateStoreError: the store is not open, or the database failed.
        """
        async with self._errors("leave"), self._lease_connection() as conn:
            await conn.execute(_LEAVE, self._holder)

    async def release_lease(self, lease: Lease) -> None:
        """Let another holder take the account at once (its lease expires now). A lease
        already lost is left alone. This object's writes are refused from now on, until
        it acquires the lease again.

        Raises:
            StateStoreError: the store is not open, or the database failed.
        """
        self._check_holder(lease)
        if self._lease is not None and self._lease.key == lease.key:
            self._deadline = -math.inf  # refused from now on, whatever the database says
        async with self._errors("release a lease"), self._connection() as conn:
            await conn.execute(_RELEASE_LEASE, *lease.key, lease.holder, lease.epoch)

    def _lease_key(self, parall_url: str, org_id: str, agent_id: str) -> tuple[str, str, str]:
        key = (parall_url.rstrip("/"), org_id, agent_id)
        owner = self._owner._agent() if self._owner is not None else None
        held = self._lease.key if self._lease is not None else None
        for bound in (owner, held):
            if bound is not None and bound != key:
                raise StateStoreError(
                    f"state store {self._description} is the view of agent {bound[2]} of "
                    f"{bound[1]} at {bound[0]}; it cannot take the lease of agent {agent_id} "
                    f"of {org_id} at {parall_url} (use another store object)"
                )
        return key

    def _check_holder(self, lease: Lease) -> None:
        if lease.holder != self._holder:
            raise StateStoreError(
                f"state store {self._description}: {lease.describe()} belongs to another "
                f"holder than this store's ({self._holder!r})"
            )

    async def _fence(
        self, conn: _Connection, key: tuple[str, str, str], epoch: int | None = None
    ) -> None:
        """In a fenced object's transaction: refuse it unless its lease is still its own,
        at its epoch (``epoch``, when given: the one the store was loaded under) and live
        (the row stays locked until the transaction ends)."""
        lease = self._lease
        if lease is None:
            raise LeaseLost(
                f"state store {self._description} holds no lease on agent {key[2]} of "
                f"{key[1]} at {key[0]} (another holder has it): nothing was written"
            )
        if lease.key != key:
            raise StateStoreError(
                f"state store {self._description}: its {lease.describe()} is not for agent "
                f"{key[2]} of {key[1]} at {key[0]}"
            )
        if epoch is not None and epoch != lease.epoch:
            # Lost, then acquired again: what the gateway holds in memory was read under
            # the old epoch and may be stale (another holder ran the account meanwhile).
            raise LeaseLost(
                f"state store {self._description} was loaded under epoch {epoch} of its "
                f"lease, now at epoch {lease.epoch}: load it again (nothing was written)"
            )
        if await conn.fetchval(_FENCE, *key, lease.holder, lease.epoch) is None:
            raise LeaseLost(
                f"state store {self._description}: {lease.describe()} was lost (expired, "
                "released, or taken over): nothing was written"
            )

    async def _open_store(self) -> None:
        try:
            import asyncpg  # type: ignore[import-untyped]  # no type hints: see _Pool
        except ImportError:
            raise StateStoreError(
                f"state store {self._description}: PostgresStateStore needs asyncpg "
                "(pip install 'parall-bridge[postgres]')"
            ) from None
        self._server_error = asyncpg.PostgresError
        parent = self._parent
        if parent is not None:
            if parent._pool is None:
                raise StateStoreError(
                    f"state store {self._description}: a view opens once the store it is a "
                    "view of is open"
                )
            self._pool = parent._pool
            return
        async with self._errors("open"):
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=self._op_timeout,
                timeout=self._op_timeout,
            )
            # Leases and heartbeats have a connection of their own (opened when first
            # used): they never queue behind the accounts' writes.
            self._lease_pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=1,
                command_timeout=self._op_timeout,
                timeout=self._op_timeout,
            )
        try:
            async with self._errors("open"), self._connection() as conn:
                await self._migrate(conn)
        except BaseException:
            await self._close_store()
            raise

    async def _close_store(self) -> None:
        pool, self._pool = self._pool, None
        lease_pool, self._lease_pool = self._lease_pool, None
        self._account = None
        if self._parent is not None:
            return  # a view's pools are its parent's to close
        if lease_pool is not None:
            await self._close_pool(lease_pool)
        if pool is not None:
            await self._close_pool(pool)

    @staticmethod
    async def _close_pool(pool: _Pool) -> None:
        try:
            await pool.close()
        except Exception:  # a connection already broken: nothing left to close cleanly
            pool.terminate()
        except BaseException:  # cancelled: drop the connections, and stop
            pool.terminate()
            raise

    async def _load(self, identity: StoreIdentity) -> StoredState:
        if self._owner is not None and not self._owner.same_agent(identity):
            raise StateStoreError(
                f"state store {self._description} belongs to {self._owner.describe()}, "
                f"not {identity.describe()}"
            )
        # The account's key, as StoreIdentity.same_agent compares it.
        key = (identity.parall_url.rstrip("/"), identity.org_id, identity.agent_id)
        async with self._errors("load"), self._connection() as conn, conn.transaction():
            if self._fenced:
                await self._fence(conn, key)
                assert self._lease is not None  # the fence passed
                loaded_epoch: int | None = self._lease.epoch
            else:
                loaded_epoch = None
            account = await conn.fetchrow(_BIND_ACCOUNT, *key, identity.account_id)
            assert account is not None  # RETURNING always gives the row
            sources = await conn.fetch(_SELECT_SOURCES, account["id"])
            turns = await conn.fetch(_SELECT_TURNS, account["id"])
        self._owner = self._owner or identity
        self._account = int(account["id"])
        self._loaded_epoch = loaded_epoch
        return StoredState(
            sources=tuple(_source_row(row) for row in sources),
            turns=tuple(_turn_row(row) for row in turns),
            meta=StoreMeta(
                last_seq=int(account["last_seq"]),
                session_id=account["session_id"],
                last_heard_at=account["last_heard_at"],
            ),
        )

    async def _write(self, batch: StateBatch) -> None:
        account = self._account
        if account is None:
            raise StateStoreError(f"state store {self._description} is not loaded by a gateway")
        async with self._errors("write"), self._connection() as conn, conn.transaction():
            if self._fenced:
                assert self._owner is not None  # loaded: _account is set
                await self._fence(conn, self._owner._agent(), self._loaded_epoch)
            if batch.deleted_sources:
                await conn.executemany(
                    _DELETE_SOURCE, [(account, key) for key in batch.deleted_sources]
                )
            if batch.sources:
                await conn.executemany(
                    _PUT_SOURCE, [_source_params(account, row) for row in batch.sources]
                )
            if batch.deleted_turns:
                await conn.executemany(
                    _DELETE_TURN, [(account, turn_id) for turn_id in batch.deleted_turns]
                )
            if batch.turns:
                await conn.executemany(
                    _PUT_TURN, [_turn_params(account, turn) for turn in batch.turns]
                )
            if batch.meta is not None:
                meta = batch.meta
                await conn.execute(
                    _PUT_META, account, meta.last_seq, meta.session_id, meta.last_heard_at
                )

    async def release(self) -> None:
        """The gateway is done with the store (it stays open, bound to its agent). A
        :meth:`view` made with ``release_lease=True`` releases its lease too (a lease
        already lost is left alone; a database error is logged, and the lease then
        expires after its time to live)."""
        self._account = None
        await super().release()
        lease = self._lease
        if self.release_lease_with_gateway and lease is not None:
            try:
                await self.release_lease(lease)
            except StateStoreError as exc:
                _log.warning("%s (it expires in %g s)", str(exc), self._lease_ttl)

    # --- helpers ------------------------------------------------------------------------

    def _lease_connection(self) -> AbstractAsyncContextManager[_Connection]:
        """A connection for lease and heartbeat statements: the lease pool's."""
        return self._connection(lease=True)

    @contextlib.asynccontextmanager
    async def _connection(self, *, lease: bool = False) -> AsyncIterator[_Connection]:
        if self._pool is None:
            raise StateStoreError(f"state store {self._description} is not open")
        if self._parent is not None and self._parent._pool is not self._pool:
            raise StateStoreError(
                f"state store {self._description} is not open (the store it is a view of "
                "was closed)"
            )
        pool = self._lease_pool if lease and self._lease_pool is not None else self._pool
        async with pool.acquire(timeout=self._op_timeout) as conn:
            try:
                yield conn
            except (self._server_error, StateStoreError):
                raise  # the server refused a statement, or the store did: the connection is fine
            except BaseException:
                # Lost, or in a state the driver cannot vouch for (asyncpg's
                # InternalClientError after the server ended the session): the pool
                # must not hand it out again, so it is dropped and replaced.
                conn.terminate()
                raise

    @contextlib.asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        """Turn a driver's error into a :class:`StateStoreError` without the password
        (and without the original exception, whose text could carry it)."""
        try:
            yield
        except StateStoreError:
            raise
        except Exception as exc:
            text = _redact(f"{type(exc).__name__}: {exc}", self._secrets)
            raise StateStoreError(
                f"state store {self._description}: {what} failed: {text}"
            ) from None

    async def _migrate(self, conn: _Connection) -> None:
        """Create or upgrade the schema under the migration lock; refuse a database this
        code cannot use (left as it is: the transaction is rolled back)."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *MIGRATION_LOCK)
            table = await conn.fetchval("SELECT to_regclass($1)", "parall_bridge.schema_version")
            if table is None:
                foreign = await conn.fetchval(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = $1", SCHEMA
                )
                if foreign:
                    raise StateStoreError(
                        f"state store {self._description} is not a parall_bridge state store "
                        f"(its schema {SCHEMA!r} has tables but no schema_version); it was "
                        "left as it is"
                    )
                for statement in _SCHEMA_V1:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO parall_bridge.schema_version (version, oldest_reader) "
                    "VALUES (1, 1)"
                )
            row = await conn.fetchrow(
                "SELECT version, oldest_reader FROM parall_bridge.schema_version"
            )
            if row is None:
                raise StateStoreError(
                    f"state store {self._description} has no schema version row; it was "
                    "left as it is"
                )
            version, oldest = int(row["version"]), int(row["oldest_reader"])
            if oldest > SCHEMA_VERSION:
                raise StateStoreError(
                    f"state store {self._description} needs a newer parall_bridge (its "
                    f"schema version {version} can be used from schema version {oldest} on; "
                    f"this version knows up to {SCHEMA_VERSION}); it was left as it is"
                )
            if version >= SCHEMA_VERSION:
                return  # up to date, or newer and still readable by this version
            for step in range(version, SCHEMA_VERSION):
                migration = MIGRATIONS.get(step)
                if migration is None:
                    raise StateStoreError(
                        f"state store {self._description}: no migration from schema version "
                        f"{step} to {step + 1}"
                    )
                for statement in migration.statements:
                    await conn.execute(statement)
                if migration.oldest_reader is not None:
                    oldest = max(oldest, migration.oldest_reader)
            await conn.execute(
                "UPDATE parall_bridge.schema_version SET version = $1, oldest_reader = $2, "
                "migrated_at = now()",
                SCHEMA_VERSION,
                oldest,
            )


def _source_params(account: int, row: SourceRow) -> tuple[object, ...]:
    return (
        account,
        row.key,
        row.source_type,
        row.source_id,
        row.origin,
        row.state,
        row.attempts,
        row.next_attempt_at,
        row.last_error,
        list(row.dispatch_ids),
        row.ack_pending,
        row.turn_id,
        row.event,
        row.order,
    )


def _source_row(values: Mapping[str, Any]) -> SourceRow:
    return SourceRow(
        key=values["key"],
        source_type=values["source_type"],
        source_id=values["source_id"],
        origin=values["origin"],
        state=values["state"],
        attempts=values["attempts"],
        next_attempt_at=values["next_attempt_at"],
        last_error=values["last_error"],
        dispatch_ids=values["dispatch_ids"],
        ack_pending=values["ack_pending"],
        turn_id=values["turn_id"],
        event=values["event"],
        order=values["ord"],
    )


def _turn_params(account: int, turn: TurnRow) -> tuple[object, ...]:
    return (
        account,
        turn.turn_id,
        list(turn.keys),
        turn.session_key,
        turn.prefix,
        turn.attempt,
        turn.state,
        turn.order,
    )


def _turn_row(values: Mapping[str, Any]) -> TurnRow:
    return TurnRow(
        turn_id=values["turn_id"],
        keys=values["keys"],
        session_key=values["session_key"],
        prefix=values["prefix"],
        attempt=values["attempt"],
        state=values["state"],
        order=values["ord"],
    )


def _url_parts(dsn: str) -> SplitResult | None:
    """The DSN as a ``postgres://`` or ``postgresql://`` URL, or ``None`` (asyncpg reads
    no other form)."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return None
    return parts if parts.scheme in ("postgres", "postgresql") else None


def _secrets_of(dsn: str) -> tuple[str, ...]:
    """The password(s) a DSN carries, as written and decoded (longest first). A DSN that
    is not a URL is a secret as a whole."""
    parts = _url_parts(dsn)
    if parts is None:
        return (dsn,) if dsn else ()
    found: set[str] = set()
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at:
        _, colon, password = userinfo.partition(":")
        if colon and password:
            found.update((password, unquote(password), quote(unquote(password), safe="")))
    for item in parts.query.split("&"):
        name, _, value = item.partition("=")
        if unquote(name) == "password" and value:
            decoded = unquote(value.replace("+", " "))
            found.update((value, unquote(value), decoded, quote(decoded, safe="")))
    return tuple(sorted((secret for secret in found if secret), key=len, reverse=True))


def _describe(dsn: str) -> str:
    """The DSN without its password (in the user part or in the query)."""
    parts = _url_parts(dsn)
    if parts is None:
        return "a PostgreSQL DSN that is not a postgresql:// URL (not shown)"
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}@{hosts}" if at else hosts
    query = "&".join(
        item for item in parts.query.split("&") if unquote(item.partition("=")[0]) != "password"
    )
    text = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    return _redact(text, _secrets_of(dsn))


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
