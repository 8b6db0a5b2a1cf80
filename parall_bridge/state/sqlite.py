"""``SqliteStateStore``: a gateway's state in one SQLite file (DESIGN.md section 8).

Modelled on huey's ``SqliteStorage``: plain tables, every change one short
transaction. The standard library's :mod:`sqlite3` runs on one thread per store,
never on the event loop: the connection is made, used and closed on that thread.

Durability: the file is in WAL mode with ``synchronous=NORMAL``. A committed write
survives the process being killed; an operating-system crash or a power loss may
lose the last transactions (it does not corrupt the file).

The file is locked while a store has it open (``<path>.lock``, which holds the
holder's pid), so two gateways never share it. It is recognised by
``PRAGMA application_id`` and versioned by ``PRAGMA user_version``: an older file
is migrated on open (:data:`MIGRATIONS`); a newer or foreign file is refused and
left as it is. The file and its lock are readable by their owner only (0o600, in a
0o700 directory when the directory has to be created).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeAlias, TypeVar

import attrs

from ..errors import StateStoreError
from .base import SourceRow, StateBatch, StateStore, StoredState, StoreIdentity, StoreMeta, TurnRow

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "Migration", "SqliteStateStore"]

APPLICATION_ID = 0x50524C4C
"""``PRAGMA application_id`` of a parall_bridge state store (``PRLL``)."""

SCHEMA_VERSION = 1
"""The schema version this code reads and writes (``PRAGMA user_version``)."""

Migration: TypeAlias = Callable[[sqlite3.Connection], None] | Sequence[str]
"""One schema upgrade: SQL statements run in order, or a function given the connection."""

MIGRATIONS: dict[int, Migration] = {}
"""Version ``N`` -> the :data:`Migration` that upgrades a file from ``N`` to ``N + 1``.

On open, an older file runs every step up to :data:`SCHEMA_VERSION` in one
transaction. A new file gets the version 1 schema and then the same steps.
"""

BUSY_TIMEOUT_MS = 5000
"""How long a statement waits for another connection's lock (a reader, say)."""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_TABLES = frozenset({"sources", "turns", "meta"})
_SCHEMA_V1 = (
    """CREATE TABLE sources (
        key TEXT PRIMARY KEY, source_type TEXT NOT NULL, source_id TEXT NOT NULL,
        origin TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
        next_attempt_at REAL, last_error TEXT, dispatch_ids TEXT NOT NULL,
        ack_pending INTEGER NOT NULL, turn_id TEXT, event TEXT, ord INTEGER NOT NULL)""",
    """CREATE TABLE turns (
        turn_id TEXT PRIMARY KEY, keys TEXT NOT NULL, session_key TEXT NOT NULL,
        prefix TEXT NOT NULL, attempt INTEGER NOT NULL, state TEXT NOT NULL,
        ord INTEGER NOT NULL)""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
)
# Upserts (not REPLACE) keep a row's rowid, the tie-break of equal orders, as memory does.
_PUT_SOURCE = """INSERT INTO sources (key, source_type, source_id, origin, state, attempts,
        next_attempt_at, last_error, dispatch_ids, ack_pending, turn_id, event, ord)
    VALUES (:key, :source_type, :source_id, :origin, :state, :attempts, :next_attempt_at,
        :last_error, :dispatch_ids, :ack_pending, :turn_id, :event, :order)
    ON CONFLICT (key) DO UPDATE SET source_type = excluded.source_type,
        source_id = excluded.source_id, origin = excluded.origin, state = excluded.state,
        attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
        last_error = excluded.last_error, dispatch_ids = excluded.dispatch_ids,
        ack_pending = excluded.ack_pending, turn_id = excluded.turn_id,
        event = excluded.event, ord = excluded.ord"""
_PUT_TURN = """INSERT INTO turns (turn_id, keys, session_key, prefix, attempt, state, ord)
    VALUES (:turn_id, :keys, :session_key, :prefix, :attempt, :state, :order)
    ON CONFLICT (turn_id) DO UPDATE SET keys = excluded.keys,
        session_key = excluded.session_key, prefix = excluded.prefix,
        attempt = excluded.attempt, state = excluded.state, ord = excluded.ord"""
_DELETE_SOURCE = "DELETE FROM sources WHERE key = ?"
_DELETE_TURN = "DELETE FROM turns WHERE turn_id = ?"
_PUT_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_SELECT_SOURCES = """SELECT key, source_type, source_id, origin, state, attempts,
    next_attempt_at, last_error, dispatch_ids, ack_pending, turn_id, event, ord AS "order"
    FROM sources ORDER BY ord, rowid"""
_SELECT_TURNS = """SELECT turn_id, keys, session_key, prefix, attempt, state, ord AS "order"
    FROM turns ORDER BY ord, rowid"""

_T = TypeVar("_T")


class SqliteStateStore(StateStore):
    """A :class:`StateStore` in one SQLite file: what it holds survives the process."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self._path = os.path.abspath(os.fspath(path))
        self._executor: ThreadPoolExecutor | None = None
        # Both are made, used and closed on the executor's thread only.
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    @property
    def description(self) -> str:
        """The database file's path."""
        return self._path

    def __repr__(self) -> str:
        return f"SqliteStateStore({self._path!r})"

    # --- the event loop's side: every call runs on the store's thread ---------------------

    async def _open_store(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parall-sqlite")
        try:
            await self._call("open", self._open_sync)
        except BaseException:
            await self._close_store()
            raise

    async def _close_store(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        future = asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        executor.shutdown(wait=False)  # the close still runs (even if this is cancelled)
        await asyncio.shield(future)
        executor.shutdown(wait=True)  # the thread is idle by now: this returns at once

    async def _load(self, identity: StoreIdentity) -> StoredState:
        return await self._call("load", lambda: self._load_sync(identity))

    async def _write(self, batch: StateBatch) -> None:
        await self._call("write", lambda: self._write_sync(batch))

    async def _call(self, what: str, job: Callable[[], _T]) -> _T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, job)
        except StateStoreError:
            raise
        except Exception as exc:
            raise StateStoreError(f"state store {self._path}: {what} failed: {exc}") from exc

    # --- the store's thread ---------------------------------------------------------------

    def _open_sync(self) -> None:
        self._lock_fd = self._lock_sync()
        # The file exists before SQLite opens it, so it is made with our mode (and
        # SQLite gives its -wal and -shm files the same mode).
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
        version = self._inspect_sync()
        conn = sqlite3.connect(self._path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        self._conn = conn  # closed by _close_sync if the rest fails
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        if version < SCHEMA_VERSION:
            with _transaction(conn):
                _upgrade(conn, version)

    def _lock_sync(self) -> int:
        os.makedirs(os.path.dirname(self._path), mode=0o700, exist_ok=True)
        fd = os.open(self._path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not _try_lock(fd):
                raise StateStoreError(
                    f"state store {self._path} is in use by another gateway (pid {_read_pid(fd)})"
                )
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid():<20}\n".encode())  # fixed width: no stale digits
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _inspect_sync(self) -> int:
        """The file's schema version (0: a new file); refuse a foreign or newer file.

        It reads with a read-only connection, so a refused file is never written.
        """
        with open(self._path, "rb") as file:
            magic = file.read(len(_SQLITE_MAGIC))
        if magic and magic != _SQLITE_MAGIC:
            raise self._foreign("it is not a SQLite database")
        conn = sqlite3.connect(Path(self._path).as_uri() + "?mode=ro", uri=True)
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as exc:
            raise self._foreign(f"it does not read as a SQLite database: {exc}") from None
        finally:
            conn.close()
        if app_id == 0 and version == 0 and not tables:
            return 0
        if app_id != APPLICATION_ID:
            raise self._foreign(f"another application's database, application_id {app_id:#x}")
        if version > SCHEMA_VERSION:
            raise StateStoreError(
                f"state store {self._path} was written by a newer parall_bridge (schema "
                f"version {version}; this version knows up to {SCHEMA_VERSION}); it was left "
                "as it is"
            )
        if version < 1 or not tables >= _TABLES:
            raise self._foreign("its tables are missing")
        return int(version)

    def _foreign(self, reason: str) -> StateStoreError:
        return StateStoreError(
            f"state store {self._path} is not a parall_bridge state store ({reason}); "
            "it was left as it is"
        )

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        fd, self._lock_fd = self._lock_fd, None
        try:
            if conn is not None:
                conn.close()
        finally:
            if fd is not None:
                _unlock(fd)
                os.close(fd)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateStoreError(f"state store {self._path} is not open")
        return self._conn

    def _load_sync(self, identity: StoreIdentity) -> StoredState:
        conn = self._connection()
        with _transaction(conn):
            meta: dict[str, str | None] = {
                row["key"]: row["value"] for row in conn.execute("SELECT key, value FROM meta")
            }
            if meta.get("agent_id") is None:
                conn.executemany(_PUT_META, _identity_params(identity))
            else:
                owner = StoreIdentity(
                    parall_url=meta.get("parall_url") or "",
                    org_id=meta.get("org_id") or "",
                    agent_id=meta.get("agent_id") or "",
                    account_id=meta.get("account_id") or "",
                )
                if not owner.same_agent(identity):
                    raise StateStoreError(
                        f"state store {self._path} belongs to {owner.describe()}, "
                        f"not {identity.describe()}"
                    )
            sources = tuple(_source_row(values) for values in conn.execute(_SELECT_SOURCES))
            turns = tuple(_turn_row(values) for values in conn.execute(_SELECT_TURNS))
        heard = meta.get("last_heard_at")
        return StoredState(
            sources=sources,
            turns=turns,
            meta=StoreMeta(
                last_seq=int(meta.get("last_seq") or 0),
                session_id=meta.get("session_id"),
                last_heard_at=None if heard is None else float(heard),
            ),
        )

    def _write_sync(self, batch: StateBatch) -> None:
        conn = self._connection()
        with _transaction(conn):
            conn.executemany(_DELETE_SOURCE, [(key,) for key in batch.deleted_sources])
            conn.executemany(_PUT_SOURCE, [_source_params(row) for row in batch.sources])
            conn.executemany(_DELETE_TURN, [(turn_id,) for turn_id in batch.deleted_turns])
            conn.executemany(_PUT_TURN, [_turn_params(turn) for turn in batch.turns])
            if batch.meta is not None:
                conn.executemany(_PUT_META, _meta_params(batch.meta))


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _upgrade(conn: sqlite3.Connection, version: int) -> None:
    """Bring a file at ``version`` (0: new) to :data:`SCHEMA_VERSION`, in the caller's
    transaction."""
    if version == 0:
        for statement in _SCHEMA_V1:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        version = 1
    for step in range(version, SCHEMA_VERSION):
        migration = MIGRATIONS.get(step)
        if migration is None:
            raise LookupError(f"no migration from schema version {step} to {step + 1}")
        if callable(migration):
            migration(conn)
        else:
            for statement in (migration,) if isinstance(migration, str) else migration:
                conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _source_params(row: SourceRow) -> dict[str, object]:
    return attrs.asdict(row, recurse=False) | {
        "dispatch_ids": json.dumps(row.dispatch_ids),
        "ack_pending": int(row.ack_pending),
    }


def _source_row(values: sqlite3.Row) -> SourceRow:
    fields = dict(values)
    fields["dispatch_ids"] = tuple(json.loads(fields["dispatch_ids"]))
    fields["ack_pending"] = bool(fields["ack_pending"])
    return SourceRow(**fields)


def _turn_params(turn: TurnRow) -> dict[str, object]:
    return attrs.asdict(turn, recurse=False) | {"keys": json.dumps(turn.keys)}


def _turn_row(values: sqlite3.Row) -> TurnRow:
    fields = dict(values)
    fields["keys"] = tuple(json.loads(fields["keys"]))
    return TurnRow(**fields)


def _identity_params(identity: StoreIdentity) -> list[tuple[str, str]]:
    return [
        ("parall_url", identity.parall_url),
        ("org_id", identity.org_id),
        ("agent_id", identity.agent_id),
        ("account_id", identity.account_id),
    ]


def _meta_params(meta: StoreMeta) -> list[tuple[str, str | None]]:
    heard = meta.last_heard_at
    return [
        ("last_seq", str(meta.last_seq)),
        ("session_id", meta.session_id),
        ("last_heard_at", None if heard is None else repr(heard)),
    ]


if sys.platform == "win32":

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:

    def _try_lock(fd: int) -> bool:
        """Take the lock of an open file description without waiting; whether it was free."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_pid(fd: int) -> str:
    """The pid a lock's holder wrote in it (``unknown`` when it cannot be read)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return str(int(os.read(fd, 64).split()[0]))
    except (OSError, ValueError, IndexError):
        return "unknown"
