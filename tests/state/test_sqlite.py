"""What only the SQLite store promises: its lock, its schema versions, refusing files
that are not its own, file modes, and surviving a process killed while it writes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from parall_bridge.errors import StateStoreError
from parall_bridge.state import SourceRow, StateBatch, StoredState, StoreIdentity, StoreMeta
from parall_bridge.state import sqlite as sqlite_store
from parall_bridge.state.sqlite import APPLICATION_ID, SCHEMA_VERSION, SqliteStateStore

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes and signals")

ADA = StoreIdentity(parall_url="https://parall.example", org_id="org_1", agent_id="agent_1")
ROW = SourceRow(key="m1", source_type="message", source_id="s1", origin="live", state="queued")
META = StoreMeta(last_seq=42, session_id="sess_1", last_heard_at=1_700_000_000.5)

HOLD_LOCK = """
import asyncio, sys
from parall_bridge.state.sqlite import SqliteStateStore

async def main():
    async with SqliteStateStore(sys.argv[1]):
        print("ready", flush=True)
        sys.stdin.readline()

asyncio.run(main())
"""

WRITE_FOREVER = """
import asyncio, sys
from parall_bridge.state import SourceRow, StateBatch, StoreIdentity
from parall_bridge.state.sqlite import SqliteStateStore

async def main():
    async with SqliteStateStore(sys.argv[1]) as store:
        await store.load(StoreIdentity("https://parall.example", "org_1", "agent_1"))
        batch = int(sys.argv[2])
        while True:
            batch += 1
            rows = tuple(
                SourceRow(key=f"k{i}", source_type="message", source_id=f"s{i}", origin="live",
                          state="failed", attempts=batch, last_error=f"batch {batch}",
                          event="x" * 4000, order=i)
                for i in range(20)
            )
            await store.write(StateBatch(sources=rows))
            print(batch, flush=True)

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def child(script: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Python process running ``script``, killed (if still running) and reaped at the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.close()
        await proc.stdout.read()
        await proc.wait()


async def read_line(proc: asyncio.subprocess.Process) -> str:
    """The child's next line of output (it must come within a generous time)."""
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        line = await proc.stdout.readline()
    assert line, f"the child exited ({await proc.wait()}) before writing a line"
    return line.decode().strip()


def store_threads() -> list[threading.Thread]:
    """The store threads still running."""
    return [t for t in threading.enumerate() if t.name.startswith("parall-sqlite")]


async def fill(path: Path) -> None:
    """Write a row and the meta to a store file with the real store."""
    async with SqliteStateStore(path) as store:
        await store.load(ADA)
        await store.write(StateBatch(sources=(ROW,), meta=META))


async def reload(path: Path) -> StoredState:
    """What a fresh store object on ``path`` loads."""
    async with SqliteStateStore(path) as store:
        return await store.load(ADA)


@contextlib.contextmanager
def plain(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to ``path``, closed at the end."""
    conn = sqlite3.connect(path)
    try:
        yield conn
    finally:
        conn.close()


def pragma(path: Path, name: str) -> Any:
    """The value of ``PRAGMA name`` in the file."""
    with plain(path) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def content(path: Path) -> bytes:
    """The file's bytes."""
    return path.read_bytes()


async def assert_refused(path: Path, match: str) -> None:
    """Opening ``path`` fails naming it, leaves its bytes as they were and no thread."""
    before = content(path)
    store = SqliteStateStore(path)
    with pytest.raises(StateStoreError, match=match) as refused:
        await store.open()
    assert str(path) in str(refused.value)
    assert not store.is_open
    assert content(path) == before
    assert store_threads() == []


# --- creating, and running off the event loop ---------------------------------------------


@pytest.mark.asyncio
async def test_a_new_file_is_created_at_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    assert store.description == str(path)
    assert str(path) in repr(store)
    await fill(path)
    assert pragma(path, "application_id") == APPLICATION_ID
    assert pragma(path, "user_version") == SCHEMA_VERSION
    assert pragma(path, "journal_mode") == "wal"
    with plain(path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    assert {"sources", "turns", "meta"} <= tables
    assert await reload(path) == StoredState(sources=(ROW,), meta=META)


@pytest.mark.asyncio
async def test_sqlite_runs_on_the_store_thread_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections are made on the store's thread; sqlite3 refuses their use elsewhere."""
    threads: list[str] = []
    connect = sqlite3.connect

    def recording_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        threads.append(threading.current_thread().name)
        conn: sqlite3.Connection = connect(*args, **kwargs)
        return conn

    monkeypatch.setattr(sqlite3, "connect", recording_connect)
    await fill(tmp_path / "state.db")
    assert threads
    assert all(name.startswith("parall-sqlite") for name in threads)
    assert store_threads() == []


@pytest.mark.asyncio
async def test_a_failed_write_applies_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await fill(path)
    too_big = SourceRow("m3", "message", "s3", "live", "queued", attempts=2**70)
    async with SqliteStateStore(path) as store:
        await store.load(ADA)
        batch = StateBatch(
            sources=(SourceRow("m2", "message", "s2", "live", "queued"), too_big),
            deleted_sources=(ROW.key,),
            meta=StoreMeta(last_seq=99),
        )
        with pytest.raises(StateStoreError, match="write failed") as failed:
            await store.write(batch)
        assert str(path) in str(failed.value)
    assert await reload(path) == StoredState(sources=(ROW,), meta=META)


# --- the lock -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_second_store_in_the_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStateStore(path)
    second = SqliteStateStore(path)
    await first.open()
    try:
        with pytest.raises(StateStoreError, match="in use by another gateway") as refused:
            await second.open()
        assert str(path) in str(refused.value)
        assert f"pid {os.getpid()}" in str(refused.value)
        assert not second.is_open
        assert len(store_threads()) == 1  # the second one's thread is gone
    finally:
        await first.close()
    try:
        await second.open()
        assert (await second.load(ADA)).empty
    finally:
        await second.close()


@pytest.mark.asyncio
async def test_a_store_held_by_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with child(HOLD_LOCK, str(path)) as proc:
        assert await read_line(proc) == "ready"
        with pytest.raises(StateStoreError, match="in use by another gateway") as refused:
            await SqliteStateStore(path).open()
        assert str(path) in str(refused.value)
        assert f"pid {proc.pid}" in str(refused.value)
        assert proc.stdin is not None
        proc.stdin.close()  # the child closes its store and exits
        assert await proc.wait() == 0
    assert (await reload(path)).empty


@pytest.mark.asyncio
async def test_an_open_cancelled_midway_releases_everything(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    opening = asyncio.create_task(store.open())
    await asyncio.sleep(0)  # let it start its job on the store thread
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert not store.is_open
    assert store_threads() == []
    assert (await reload(path)).empty  # the lock was released


# --- schema versions and foreign files ---------------------------------------------------


@pytest.mark.asyncio
async def test_a_newer_schema_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await fill(path)
    with plain(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    await assert_refused(
        path,
        rf"written by a newer parall_bridge \(schema version {SCHEMA_VERSION + 1}; "
        rf"this version knows up to {SCHEMA_VERSION}\)",
    )
    assert pragma(path, "user_version") == SCHEMA_VERSION + 1


def _another_app(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute("INSERT INTO notes VALUES ('keep me')")
    conn.execute("PRAGMA application_id = 4660")


def _no_application_id(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE sources (key TEXT)")


def _our_id_without_tables(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE other (a)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_another_app, "application_id 0x1234"),
        (_no_application_id, "application_id 0x0"),
        (_our_id_without_tables, "tables are missing"),
    ],
)
async def test_a_foreign_sqlite_database_is_refused(
    tmp_path: Path, make: Callable[[sqlite3.Connection], None], match: str
) -> None:
    path = tmp_path / "other.db"
    with plain(path) as conn:
        make(conn)
        conn.commit()
    await assert_refused(path, rf"is not a parall_bridge state store \(.*{match}")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "content",
    [os.urandom(4096), b"just some notes\n", b"SQLite format 3\x00" + os.urandom(4080)],
    ids=["random", "text", "sqlite-magic-then-garbage"],
)
async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(content)
    await assert_refused(path, "is not a parall_bridge state store")


def _add_column(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE sources ADD COLUMN note TEXT DEFAULT 'migrated'")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "migration",
    [
        ("ALTER TABLE sources ADD COLUMN note TEXT DEFAULT 'migrated'",),
        "ALTER TABLE sources ADD COLUMN note TEXT DEFAULT 'migrated'",
        _add_column,
    ],
    ids=["statements", "one-statement", "function"],
)
async def test_an_older_schema_is_migrated_keeping_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migration: sqlite_store.Migration
) -> None:
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    await fill(old)
    monkeypatch.setattr(sqlite_store, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(sqlite_store.MIGRATIONS, 1, migration)
    assert await reload(old) == StoredState(sources=(ROW,), meta=META)
    await fill(new)  # a new file runs the same steps
    for path in (old, new):
        assert pragma(path, "user_version") == 2
        assert pragma(path, "application_id") == APPLICATION_ID
        with plain(path) as conn:
            assert conn.execute("SELECT key, note FROM sources").fetchall() == [("m1", "migrated")]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("migrations", "match"),
    [({1: ("ALTER TABLE nowhere ADD COLUMN x",)}, "no such table"), ({}, "no migration from")],
)
async def test_a_failed_migration_changes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    migrations: dict[int, sqlite_store.Migration],
    match: str,
) -> None:
    path = tmp_path / "state.db"
    await fill(path)
    with monkeypatch.context() as patch:
        patch.setattr(sqlite_store, "SCHEMA_VERSION", 2)
        patch.setattr(sqlite_store, "MIGRATIONS", migrations)
        with pytest.raises(StateStoreError, match=match) as failed:
            await SqliteStateStore(path).open()
        assert str(path) in str(failed.value)
    assert store_threads() == []
    assert pragma(path, "user_version") == 1
    assert await reload(path) == StoredState(sources=(ROW,), meta=META)


# --- file modes -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "new_dir" / "state.db"
    umask = os.umask(0o022)
    try:
        async with SqliteStateStore(path) as store:
            await store.load(ADA)
            await store.write(StateBatch(sources=(ROW,)))
            modes = {
                name: os.stat(f"{path}{name}").st_mode & 0o777
                for name in ("", "-wal", "-shm", ".lock")
            }
    finally:
        os.umask(umask)
    assert os.stat(path.parent).st_mode & 0o777 == 0o700
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600, ".lock": 0o600}


# --- a process killed while it writes --------------------------------------------------------


@pytest.mark.asyncio
async def test_a_process_killed_during_writes_leaves_whole_batches(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    rng = random.Random()
    committed = 0
    for _ in range(5):
        async with child(WRITE_FOREVER, str(path), str(committed)) as proc:
            reported = [int(await read_line(proc))]  # it is writing
            await asyncio.sleep(rng.uniform(0, 0.05))  # not a wait: a random moment to kill it
            proc.kill()
            await proc.wait()
            assert proc.stdout is not None
            reported += [int(line) for line in (await proc.stdout.read()).split()]
        with contextlib.closing(sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = (await reload(path)).sources
        assert [row.key for row in rows] == [f"k{i}" for i in range(20)]
        batches = {(row.attempts, row.last_error) for row in rows}
        assert len(batches) == 1, f"rows from several batches: {sorted(batches)}"
        committed, last_error = batches.pop()
        assert last_error == f"batch {committed}"
        assert committed >= max(reported)  # every batch it reported written survived
