"""What only the PostgreSQL store promises, against a real server (tests/state/conftest.py):
accounts sharing one database, schema versions and migrations under an advisory lock,
refusing databases it cannot use, the DSN's password never shown, asyncpg imported lazily."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from urllib.parse import quote, urlsplit

import asyncpg  # type: ignore[import-untyped]  # asyncpg has no type hints
import pytest

from parall_bridge.errors import StateStoreError
from parall_bridge.models import Chat, User
from parall_bridge.runtime import Turn
from parall_bridge.state import (
    PostgresStateStore,
    StateBatch,
    StoreIdentity,
    StoreMeta,
    TurnRow,
)
from parall_bridge.state import postgres as pg_store
from parall_bridge.state.postgres import Migration
from parall_bridge.testing import AgentAccount, FakeParallServer
from parall_bridge.testing import postgres as testing_postgres

from ..gateway._harness import Gate, ScriptedRuntime, running
from ._postgres import SECRET_PASSWORD, SECRET_USER, TestServer, query, row

URL = "https://parall.example/api"
ADA = StoreIdentity(parall_url=URL, org_id="org_1", agent_id="agent_1", account_id="ada")
BOB = StoreIdentity(parall_url=URL, org_id="org_1", agent_id="agent_2", account_id="bob")
OTHER_ORG = StoreIdentity(parall_url=URL, org_id="org_2", agent_id="agent_1")
OTHER_URL = StoreIdentity(parall_url="https://other.example", org_id="org_1", agent_id="agent_1")
ADD_NOTE = Migration(("ALTER TABLE parall_bridge.sources ADD COLUMN note text",))
CURRENT = pg_store.SCHEMA_VERSION
"""The schema version of this code; the tests below add steps after it."""
WITH_NOTE = {**pg_store.MIGRATIONS, CURRENT: ADD_NOTE}
"""This code's migrations, then ``ADD_NOTE`` (to ``CURRENT + 1``)."""


async def version_row(dsn: str) -> list[tuple[object, ...]]:
    return await query(dsn, "SELECT version, oldest_reader FROM parall_bridge.schema_version")


# --- accounts sharing one database ------------------------------------------------------


@pytest.mark.asyncio
async def test_accounts_sharing_a_database_see_only_their_own_rows(postgres_dsn: str) -> None:
    identities = (ADA, BOB, OTHER_ORG, OTHER_URL)
    stores = [PostgresStateStore(postgres_dsn) for _ in identities]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        for n, (store, identity) in enumerate(zip(stores, identities, strict=True)):
            assert (await store.load(identity)).empty
            await store.write(
                StateBatch(
                    sources=(row("same-key", last_error=identity.agent_id + identity.org_id),),
                    turns=(TurnRow("same-turn", ("same-key",), f"session-{n}"),),
                    meta=StoreMeta(last_seq=n + 1, session_id=f"sess-{n}"),
                )
            )
        # Deleting in one account leaves the others' rows with the same keys.
        await stores[0].write(StateBatch(deleted_sources=("same-key",)))
        for n, (store, identity) in enumerate(zip(stores, identities, strict=True)):
            await store.release()
            state = await store.load(identity)
            assert state.meta == StoreMeta(last_seq=n + 1, session_id=f"sess-{n}")
            assert state.turns == (TurnRow("same-turn", ("same-key",), f"session-{n}"),)
            expected = (
                () if n == 0 else (row("same-key", last_error=identity.agent_id + identity.org_id),)
            )
            assert state.sources == expected
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    accounts = await query(
        postgres_dsn,
        "SELECT parall_url, org_id, agent_id, account_id FROM parall_bridge.accounts ORDER BY id",
    )
    assert accounts == [
        (URL, "org_1", "agent_1", "ada"),
        (URL, "org_1", "agent_2", "bob"),
        (URL, "org_2", "agent_1", "default"),
        ("https://other.example", "org_1", "agent_1", "default"),
    ]


@pytest.mark.asyncio
async def test_a_new_object_of_the_same_agent_finds_its_rows(postgres_dsn: str) -> None:
    async with PostgresStateStore(postgres_dsn) as store:
        await store.load(ADA)
        await store.write(StateBatch(sources=(row("a"),), meta=StoreMeta(last_seq=7)))
    # Another process, another account name and a trailing slash: the same agent.
    same = StoreIdentity(parall_url=URL + "/", org_id="org_1", agent_id="agent_1")
    async with PostgresStateStore(postgres_dsn) as store:
        state = await store.load(same)
        assert (state.sources, state.meta.last_seq) == ((row("a"),), 7)
    assert await query(postgres_dsn, "SELECT account_id FROM parall_bridge.accounts") == [
        ("default",)
    ]


@pytest.mark.asyncio
async def test_an_object_stays_bound_to_its_first_agent(postgres_dsn: str) -> None:
    store = PostgresStateStore(postgres_dsn)
    await store.open()
    try:
        await store.load(ADA)
        await store.release()
        await store.close()
        await store.open()  # closed and opened again: still ADA's view
        with pytest.raises(StateStoreError, match="belongs to") as refused:
            await store.load(BOB)
        assert ADA.describe() in str(refused.value)
        assert BOB.describe() in str(refused.value)
        assert (await store.load(ADA)).empty
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_failed_write_applies_nothing(postgres_dsn: str) -> None:
    async with PostgresStateStore(postgres_dsn) as store:
        await store.load(ADA)
        await store.write(StateBatch(sources=(row("kept"),)))
        # PostgreSQL text cannot hold NUL: the batch's last statement fails.
        bad = StateBatch(
            deleted_sources=("kept",),
            sources=(row("new"),),
            turns=(TurnRow("t", ("new",), "s\x00"),),
        )
        with pytest.raises(StateStoreError, match="write failed"):
            await store.write(bad)
        await store.release()
        state = await store.load(ADA)
        assert (state.sources, state.turns) == ((row("kept"),), ())


@pytest.mark.asyncio
async def test_a_dropped_connection_fails_one_write_and_the_next_one_reconnects(
    postgres_dsn: str, postgres_server: TestServer
) -> None:
    async with PostgresStateStore(postgres_dsn) as store:
        await store.load(ADA)
        await store.write(StateBatch(sources=(row("a"),)))
        name = urlsplit(postgres_dsn).path.lstrip("/")
        terminated = await query(
            postgres_server.dsn(),
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        assert terminated == [(True,)]
        failures: list[str] = []
        for _ in range(2):  # the pool may notice the dead connection before using it
            try:
                await store.write(StateBatch(sources=(row("b"),)))
                break
            except StateStoreError as exc:
                failures.append(str(exc))
        assert len(failures) <= 1
        assert all("write failed" in failure for failure in failures)
        for n in range(5):  # no broken connection was given back to the pool
            await store.write(StateBatch(sources=(row(f"c{n}"),)))
        await store.release()
        state = await store.load(ADA)
        assert [source.key for source in state.sources] == ["a", "b", "c0", "c1", "c2", "c3", "c4"]


# --- a gateway on it --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_gateway_restarted_on_a_new_store_object_runs_its_interrupted_turn_first(
    postgres_dsn: str, server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    """The turn replied, then shutdown cancelled it; the next run (another store object on
    the same database, as another process would have) runs it again first as the same
    turn, so the human sees one reply."""
    gate = Gate()

    async def reply_then_hang(turn: Turn) -> str | None:
        await turn.send_message(f"re {turn.event.text}")
        return await gate(turn)

    async def reply(turn: Turn) -> str | None:
        await turn.send_message(f"re {turn.event.text}")
        return "ok"

    def replies() -> list[str]:
        return [
            m.content.text  # type: ignore[union-attr]
            for m in server.messages(room.id)
            if m.sender_id == agent.user_id
        ]

    first = ScriptedRuntime(reply_then_hang)
    first_store = PostgresStateStore(postgres_dsn)
    async with (
        first_store,
        running(server, agent, first, store=first_store, shutdown_grace=0.1) as run,
    ):
        server.post_message(room.id, ada.id, "one")
        await run.wait_for(lambda: replies() == ["re one"])
    server.post_message(room.id, ada.id, "two")  # while the gateway is down
    second = ScriptedRuntime(reply)
    second_store = PostgresStateStore(postgres_dsn)
    async with second_store, running(server, agent, second, store=second_store) as run:
        await run.wait_for(lambda: not run.pending() and len(second.finished) == 2)
    assert second.texts() == [["one"], ["two"]]
    assert second.turns[0].turn_id == first.turns[0].turn_id
    assert replies() == ["re one", "re two"]


# --- schema versions and migrations -----------------------------------------------------


@pytest.mark.asyncio
async def test_a_new_database_gets_the_schema_and_its_version(postgres_dsn: str) -> None:
    async with PostgresStateStore(postgres_dsn):
        pass
    assert await version_row(postgres_dsn) == [(pg_store.SCHEMA_VERSION, 1)]
    tables = await query(
        postgres_dsn,
        "SELECT tablename FROM pg_tables WHERE schemaname = 'parall_bridge' ORDER BY 1",
    )
    assert tables == [
        ("accounts",),
        ("leases",),
        ("processes",),
        ("schema_version",),
        ("sources",),
        ("turns",),
    ]


@pytest.mark.asyncio
async def test_concurrent_opens_of_a_new_database_create_it_once(postgres_dsn: str) -> None:
    stores = [PostgresStateStore(postgres_dsn) for _ in range(8)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert await version_row(postgres_dsn) == [(CURRENT, 1)]


OPEN_ON_GO = """
import asyncio, sys
from parall_bridge.state import PostgresStateStore

async def main():
    store = PostgresStateStore(sys.argv[1])
    sys.stdin.readline()  # every process is up: open at once
    async with store:
        print("opened", flush=True)

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_processes_starting_at_once_on_a_new_database_all_open_it(
    postgres_dsn: str,
) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            OPEN_ON_GO,
            postgres_dsn,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    try:
        outputs = await asyncio.wait_for(
            asyncio.gather(*(proc.communicate(b"go\n") for proc in procs)), 60
        )
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert (proc.returncode, out) == (0, b"opened\n"), err.decode()
    assert await version_row(postgres_dsn) == [(CURRENT, 1)]


@pytest.mark.asyncio
async def test_concurrent_opens_migrate_once(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStateStore(postgres_dsn):
        pass
    # A step that fails if it runs twice: only the advisory lock keeps it to once.
    monkeypatch.setattr(pg_store, "SCHEMA_VERSION", CURRENT + 1)
    monkeypatch.setattr(pg_store, "MIGRATIONS", WITH_NOTE)
    stores = [PostgresStateStore(postgres_dsn) for _ in range(8)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert await version_row(postgres_dsn) == [(CURRENT + 1, 1)]


@pytest.mark.asyncio
async def test_an_additive_migration_keeps_older_code_running(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStateStore(postgres_dsn) as store:
        await store.load(ADA)
        await store.write(StateBatch(sources=(row("old"),)))
    with monkeypatch.context() as newer:
        newer.setattr(pg_store, "SCHEMA_VERSION", CURRENT + 1)
        newer.setattr(pg_store, "MIGRATIONS", WITH_NOTE)
        async with PostgresStateStore(postgres_dsn) as store:
            assert (await store.load(ADA)).sources == (row("old"),)
            await store.write(StateBatch(sources=(row("new"),)))
    assert await version_row(postgres_dsn) == [(CURRENT + 1, 1)]
    # The previous version (a rolling deploy's old processes) still reads and writes it,
    # and leaves its version alone.
    async with PostgresStateStore(postgres_dsn) as store:
        assert (await store.load(ADA)).sources == (row("old"), row("new"))
        await store.write(StateBatch(deleted_sources=("old",)))
    assert await version_row(postgres_dsn) == [(CURRENT + 1, 1)]


@pytest.mark.asyncio
async def test_a_database_that_needs_newer_code_is_refused_and_left_as_it_is(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStateStore(postgres_dsn) as store:
        await store.load(ADA)
        await store.write(StateBatch(sources=(row("a"),)))
    newest_version = CURRENT + 2
    breaking = Migration(("ALTER TABLE parall_bridge.sources DROP COLUMN origin",), newest_version)
    with monkeypatch.context() as newest:
        newest.setattr(pg_store, "SCHEMA_VERSION", newest_version)
        newest.setattr(pg_store, "MIGRATIONS", {**WITH_NOTE, CURRENT + 1: breaking})
        async with PostgresStateStore(postgres_dsn):
            pass
    assert await version_row(postgres_dsn) == [(newest_version, newest_version)]
    for version in (CURRENT, CURRENT + 1):
        monkeypatch.setattr(pg_store, "SCHEMA_VERSION", version)
        store = PostgresStateStore(postgres_dsn)
        with pytest.raises(StateStoreError) as refused:
            await store.open()
        assert not store.is_open
        message = str(refused.value)
        assert "needs a newer parall_bridge" in message
        assert (
            f"can be used from schema version {newest_version} on; this version knows up "
            f"to {version}"
        ) in message
        assert "left as it is" in message
    assert await version_row(postgres_dsn) == [(newest_version, newest_version)]


@pytest.mark.asyncio
async def test_a_missing_migration_step_is_an_error_and_changes_nothing(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStateStore(postgres_dsn):
        pass
    monkeypatch.setattr(pg_store, "SCHEMA_VERSION", CURRENT + 2)
    monkeypatch.setattr(pg_store, "MIGRATIONS", WITH_NOTE)
    missing = f"no migration from schema version {CURRENT + 1} to {CURRENT + 2}"
    with pytest.raises(StateStoreError, match=missing):
        await PostgresStateStore(postgres_dsn).open()
    assert await version_row(postgres_dsn) == [(CURRENT, 1)]
    columns = await query(
        postgres_dsn,
        "SELECT 1 FROM information_schema.columns WHERE table_schema = 'parall_bridge' "
        "AND table_name = 'sources' AND column_name = 'note'",
    )
    assert columns == []  # the first step was rolled back with the rest


@pytest.mark.asyncio
async def test_a_foreign_parall_bridge_schema_is_refused(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("CREATE SCHEMA parall_bridge")
        await conn.execute("CREATE TABLE parall_bridge.sources (mine integer)")
    finally:
        await conn.close()
    with pytest.raises(StateStoreError, match="not a parall_bridge state store"):
        await PostgresStateStore(postgres_dsn).open()
    tables = await query(
        postgres_dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'parall_bridge'"
    )
    assert tables == [("sources",)]


# --- the DSN's password -----------------------------------------------------------------


def assert_no_secret(text: str) -> None:
    for secret in (SECRET_PASSWORD, quote(SECRET_PASSWORD, safe="")):
        assert secret not in text


@pytest.mark.asyncio
async def test_the_password_is_never_shown(
    postgres_server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await postgres_server.create_secret_user()
    dsn = await postgres_server.new_database(owner=SECRET_USER)
    assert quote(SECRET_PASSWORD, safe="") in dsn
    store = PostgresStateStore(dsn)
    shown = [repr(store), store.description, str(store.description)]
    assert f"{SECRET_USER}@" in store.description
    # The password's own server (scram-sha-256) accepts it.
    async with store:
        await store.load(ADA)
        await store.write(StateBatch(sources=(row("a"),)))
    failures: list[StateStoreError] = []
    name = urlsplit(dsn).path.lstrip("/")
    assert name.startswith("test_")
    wrong = dsn.replace(quote(SECRET_PASSWORD, safe=""), quote(SECRET_PASSWORD[::-1], safe=""))
    bad_dsns = [
        wrong,  # refused by the server
        dsn.replace(name, "no_such_database"),
        dsn.replace(str(postgres_server.root), str(postgres_server.root / "nowhere")),
        dsn.replace("@/", "@localhost:notaport/"),  # not even a DSN
        f"postgresql:///{name}?user={SECRET_USER}&password={quote(SECRET_PASSWORD, safe='')}"
        f"&host={postgres_server.root}/nowhere",
    ]
    for bad in bad_dsns:
        candidate = PostgresStateStore(bad)
        shown += [repr(candidate), candidate.description]
        with pytest.raises(StateStoreError) as refused:
            await candidate.open()
        failures.append(refused.value)
    assert "password authentication failed" in str(failures[0])
    assert "no_such_database" in str(failures[1])
    for failure in failures:
        assert failure.__cause__ is None
        assert failure.__suppress_context__
        shown += [str(failure), repr(failure)]
    shown += [record.getMessage() for record in caplog.records]
    shown += [str(record.args) for record in caplog.records]
    for text in shown:
        assert_no_secret(text)
    # The reversed password did not leak either (it is a password too).
    for text in shown:
        assert SECRET_PASSWORD[::-1] not in text
        assert quote(SECRET_PASSWORD[::-1], safe="") not in text


def test_the_description_keeps_everything_but_the_password() -> None:
    store = PostgresStateStore(
        "postgresql://bob:s%40cr3t@db.example:5433/prll?sslmode=require&password=x2y&host=h"
    )
    assert store.description == "postgresql://bob@db.example:5433/prll?sslmode=require&host=h"
    assert repr(store) == f"PostgresStateStore({store.description!r})"
    for dsn in ("postgresql://db.example/prll", "postgres:///prll?host=/run/pg"):
        assert PostgresStateStore(dsn).description == dsn
    plus = PostgresStateStore("postgresql://db.example/prll?password=a+b%2Bc&user=u")
    assert plus.description == "postgresql://db.example/prll?user=u"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "dsn",
    [
        "host=db.example user=bob password=kv-s3cret dbname=prll",  # libpq's other form
        "mysql://bob:kv-s3cret@db.example/prll",
        "postgresql://bob:kv-s3cret@[::1/prll",  # not even a URL
    ],
)
async def test_a_dsn_that_is_not_a_postgresql_url_is_never_shown(dsn: str) -> None:
    store = PostgresStateStore(dsn)
    with pytest.raises(StateStoreError) as refused:
        await store.open()
    for text in (repr(store), store.description, str(refused.value)):
        assert "kv-s3cret" not in text
        assert "not shown" in text


# --- the test server itself -------------------------------------------------------------


def process_runs(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, left for an init that reaps late, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_a_cluster_left_by_a_killed_session_is_stopped_by_the_next_one() -> None:
    leftover = TestServer()
    leftover.start()
    try:
        gone = subprocess.Popen(["true"])  # noqa: S607
        gone.wait()
        (leftover.root / testing_postgres.OWNER).write_text(str(gone.pid), encoding="ascii")
        postmaster = int((leftover.data / "postmaster.pid").read_text().split()[0])
        TestServer().stop()  # its start-up reaps the leftover
        assert not leftover.root.exists()
        assert not process_runs(postmaster)
    finally:
        leftover.stop()


# --- packaging --------------------------------------------------------------------------


def test_importing_parall_bridge_does_not_import_asyncpg() -> None:
    script = (
        "import sys\n"
        "import parall_bridge, parall_bridge.state\n"
        "from parall_bridge.state import PostgresStateStore\n"
        "PostgresStateStore('postgresql://u:p@h/db')\n"
        "assert 'asyncpg' not in sys.modules, 'asyncpg was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)  # noqa: S603
