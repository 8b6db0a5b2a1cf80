"""The :class:`StateStore` contract, run against every store.

Each test gets an opened store through a :class:`Harness`. Its :meth:`~Harness.reopen`
stands for a gateway restart: the memory store is released (the same object is
given to the next gateway); the SQLite store is released too, or, in its
``sqlite-reopened`` variant, closed and replaced by a fresh object on the same file.

The PostgreSQL store runs on a fresh database of a real server (tests/state/conftest.py).
Its ``postgres-reopened`` variant closes the store and opens the same object again (new
connections): the object is one account's view of a shared database, so a fresh object
on it may serve another agent, and what a fresh object of the same agent finds is tested
by :func:`test_async_with_opens_and_closes` and tests/state/test_postgres.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from parall_bridge.errors import StateStoreError
from parall_bridge.state import (
    MemoryStateStore,
    SourceRow,
    StateBatch,
    StateStore,
    StoredState,
    StoreIdentity,
    StoreMeta,
    TurnRow,
)
from parall_bridge.state.postgres import PostgresStateStore
from parall_bridge.state.sqlite import SqliteStateStore

from ._postgres import TestServer

URL = "https://parall.example/api"
ADA = StoreIdentity(parall_url=URL, org_id="org_1", agent_id="agent_1", account_id="main")
OTHER_AGENT = StoreIdentity(parall_url=URL, org_id="org_1", agent_id="agent_2")
OTHER_ORG = StoreIdentity(parall_url=URL, org_id="org_2", agent_id="agent_1")
OTHER_URL = StoreIdentity(
    parall_url="https://other.example/api", org_id="org_1", agent_id="agent_1"
)


class Harness:
    """An opened store of one kind, and how to restart it.

    ``restart``: ``release`` (the same open object), ``new`` (closed, and a new object
    opened) or ``reopen`` (closed, and the same object opened again).
    """

    def __init__(self, make: Callable[[], StateStore], restart: str) -> None:
        self.make = make
        self.restart = restart
        self.store = make()

    async def reopen(self) -> StateStore:
        """A restart: the store is released, or closed and opened again."""
        await self.store.release()
        if self.restart != "release":
            await self.store.close()
            if self.restart == "new":
                self.store = self.make()
            await self.store.open()
        return self.store

    async def reload(self) -> StoredState:
        """What the next gateway loads after a restart."""
        return await (await self.reopen()).load(ADA)


@pytest_asyncio.fixture(
    params=["memory", "sqlite", "sqlite-reopened", "postgres", "postgres-reopened"]
)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """An opened store of each kind, closed after the test."""
    kind: str = request.param
    make: Callable[[], StateStore]
    restart = "release"
    if kind == "memory":
        memory = MemoryStateStore()  # one object: its content is the store
        make = lambda: memory  # noqa: E731
    elif kind.startswith("sqlite"):
        make = lambda: SqliteStateStore(tmp_path / "state.db")  # noqa: E731
        restart = "new" if kind == "sqlite-reopened" else "release"
    else:
        server: TestServer = request.getfixturevalue("postgres_server")
        dsn = await server.new_database()
        make = lambda: PostgresStateStore(dsn)  # noqa: E731
        restart = "reopen" if kind == "postgres-reopened" else "release"
    h = Harness(make, restart)
    await h.store.open()
    try:
        yield h
    finally:
        await h.store.close()


def source(key: str, order: int = 0, **fields: object) -> SourceRow:
    """A source row with defaults for what a test does not care about."""
    base: dict[str, object] = {
        "source_type": "message",
        "source_id": f"src-{key}",
        "origin": "live",
        "state": "queued",
    }
    return SourceRow(key=key, order=order, **(base | fields))  # type: ignore[arg-type]


LONG_EVENT = json.dumps(
    {"type": "message.new", "text": "événement 🦊 " * 20_000, "ids": list(range(2000))},
    ensure_ascii=False,
)

FULL = SourceRow(
    key="msg_é🦊",
    source_type="task_activity",
    source_id="task_1",
    origin="catch_up",
    state="failed",
    attempts=3,
    next_attempt_at=1_700_000_000.123456,
    last_error="boom: 💥 «quoted» \n second line",
    dispatch_ids=("d3", "d1", "d2"),
    ack_pending=True,
    turn_id="turn_1",
    event=LONG_EVENT,
    order=7,
)
MINIMAL = SourceRow(key="m", source_type="message", source_id="s", origin="live", state="claimed")
TURN = TurnRow(
    turn_id="turn_1",
    keys=("z", "a", "msg_é🦊", "m"),
    session_key="sess_ü",
    prefix="prefix 🧵",
    attempt=2,
    state="pinned",
    order=5,
)


@pytest.mark.asyncio
async def test_an_empty_store_loads_nothing(harness: Harness) -> None:
    state = await harness.store.load(ADA)
    assert state == StoredState()
    assert state.empty
    assert (await harness.reload()).empty


@pytest.mark.asyncio
async def test_rows_and_meta_are_loaded_back_equal(harness: Harness) -> None:
    await harness.store.load(ADA)
    meta = StoreMeta(last_seq=12345, session_id="sess_🦊", last_heard_at=1_700_000_001.5)
    await harness.store.write(StateBatch(sources=(FULL, MINIMAL), turns=(TURN,), meta=meta))
    state = await harness.reload()
    assert state == StoredState(sources=(MINIMAL, FULL), turns=(TURN,), meta=meta)
    assert not state.empty


@pytest.mark.asyncio
async def test_a_put_replaces_the_row(harness: Harness) -> None:
    await harness.store.load(ADA)
    await harness.store.write(StateBatch(sources=(FULL,), turns=(TURN,)))
    newer = source(FULL.key, order=1, state="done", dispatch_ids=("d9",))
    newer_turn = TurnRow(turn_id=TURN.turn_id, keys=("m",), session_key="s2")
    await harness.store.write(StateBatch(sources=(newer,), turns=(newer_turn,)))
    state = await harness.reload()
    assert state.sources == (newer,)
    assert state.turns == (newer_turn,)


@pytest.mark.asyncio
async def test_a_delete_removes_the_row(harness: Harness) -> None:
    await harness.store.load(ADA)
    rows = (source("a", 1), source("b", 2), source("c", 3))
    turns = (TurnRow("t1", ("a",), "s"), TurnRow("t2", ("b",), "s"))
    await harness.store.write(StateBatch(sources=rows, turns=turns))
    await harness.store.write(
        StateBatch(deleted_sources=("b", "missing"), deleted_turns=("t1", "missing"))
    )
    state = await harness.reload()
    assert state.sources == (rows[0], rows[2])
    assert state.turns == (turns[1],)


@pytest.mark.asyncio
async def test_a_batch_deletes_then_puts(harness: Harness) -> None:
    await harness.store.load(ADA)
    await harness.store.write(StateBatch(sources=(source("a", 1),)))
    again = source("a", 2, state="running")
    await harness.store.write(StateBatch(sources=(again,), deleted_sources=("a",)))
    assert (await harness.reload()).sources == (again,)


@pytest.mark.asyncio
async def test_a_turn_keeps_its_keys_in_order(harness: Harness) -> None:
    await harness.store.load(ADA)
    keys = ("k9", "k1", "k5", "k1b", "k0")
    await harness.store.write(StateBatch(turns=(TurnRow("t", keys, "s"),)))
    assert (await harness.reload()).turns[0].keys == keys


@pytest.mark.asyncio
async def test_load_follows_order_not_keys_or_writes(harness: Harness) -> None:
    await harness.store.load(ADA)
    await harness.store.write(StateBatch(sources=(source("a", 30), source("b", 10))))
    await harness.store.write(StateBatch(sources=(source("c", 20), source("d", -5))))
    turns = (TurnRow("ta", (), "s", order=3), TurnRow("tb", (), "s", order=1))
    await harness.store.write(StateBatch(turns=turns))
    state = await harness.reload()
    assert [row.key for row in state.sources] == ["d", "b", "c", "a"]
    assert [turn.turn_id for turn in state.turns] == ["tb", "ta"]


@pytest.mark.asyncio
async def test_meta_round_trip_and_partial_updates(harness: Harness) -> None:
    await harness.store.load(ADA)
    first = StoreMeta(last_seq=1, session_id="sess_1", last_heard_at=10.25)
    await harness.store.write(StateBatch(meta=first))
    assert (await harness.reload()).meta == first
    # A batch without meta keeps it; one with only meta keeps the rows.
    await harness.store.write(StateBatch(sources=(MINIMAL,)))
    state = await harness.reload()
    assert (state.meta, state.sources) == (first, (MINIMAL,))
    cleared = StoreMeta(last_seq=2)
    await harness.store.write(StateBatch(meta=cleared))
    state = await harness.reload()
    assert (state.meta, state.sources) == (cleared, (MINIMAL,))
    await harness.store.write(StateBatch(meta=StoreMeta()))
    assert (await harness.reload()).meta == StoreMeta()


@pytest.mark.asyncio
async def test_an_empty_batch_writes_nothing(harness: Harness) -> None:
    loaded = await harness.store.load(ADA)
    await harness.store.write(StateBatch())
    assert await harness.reload() == loaded
    await harness.store.write(StateBatch(sources=(MINIMAL,)))
    before = await harness.reload()
    await harness.store.write(StateBatch())
    assert await harness.reload() == before


@pytest.mark.asyncio
async def test_the_identity_is_recorded_at_first_load(harness: Harness) -> None:
    await harness.store.load(ADA)
    await harness.store.write(StateBatch(sources=(MINIMAL,)))
    for other in (OTHER_AGENT, OTHER_ORG, OTHER_URL):
        store = await harness.reopen()
        with pytest.raises(StateStoreError) as refused:
            await store.load(other)
        message = str(refused.value)
        assert store.description in message
        assert ADA.describe() in message
        assert other.describe() in message
    # A refusal binds nothing; the same agent (another account name, a trailing
    # slash) is accepted, and finds what it wrote.
    same = StoreIdentity(parall_url=URL + "/", org_id="org_1", agent_id="agent_1")
    store = await harness.reopen()
    assert (await store.load(same)).sources == (MINIMAL,)
    assert (await harness.reload()).sources == (MINIMAL,)


@pytest.mark.asyncio
async def test_the_first_identity_stays_the_owner(harness: Harness) -> None:
    await harness.store.load(OTHER_AGENT)
    store = await harness.reopen()
    with pytest.raises(StateStoreError):
        await store.load(ADA)
    assert (await (await harness.reopen()).load(OTHER_AGENT)).empty


@pytest.mark.asyncio
async def test_load_while_in_use_is_refused(harness: Harness) -> None:
    await harness.store.load(ADA)
    with pytest.raises(StateStoreError, match="in use by another gateway") as refused:
        await harness.store.load(ADA)
    assert harness.store.description in str(refused.value)


@pytest.mark.asyncio
async def test_write_before_load_or_after_release_is_refused(harness: Harness) -> None:
    with pytest.raises(StateStoreError, match="not loaded"):
        await harness.store.write(StateBatch(sources=(MINIMAL,)))
    with pytest.raises(StateStoreError, match="not loaded"):
        await harness.store.write(StateBatch())
    await harness.store.load(ADA)
    await harness.store.release()
    with pytest.raises(StateStoreError, match="not loaded"):
        await harness.store.write(StateBatch(sources=(MINIMAL,)))
    assert (await harness.reload()).empty


@pytest.mark.asyncio
async def test_open_and_close_are_idempotent(harness: Harness) -> None:
    store = harness.store
    await store.open()
    assert store.is_open
    await store.load(ADA)
    await store.close()
    await store.close()
    assert not store.is_open
    with pytest.raises(StateStoreError, match="not open"):
        await store.load(ADA)
    await store.open()  # open again, and not bound to a gateway
    await store.open()
    assert store.is_open
    assert (await store.load(ADA)).empty


@pytest.mark.asyncio
async def test_async_with_opens_and_closes(harness: Harness) -> None:
    await harness.store.close()
    fresh = harness.make()
    async with fresh as store:
        assert store is fresh
        assert store.is_open
        await store.load(ADA)
        await store.write(StateBatch(sources=(MINIMAL,)))
    assert not fresh.is_open
    async with harness.make() as store:
        assert (await store.load(ADA)).sources == (MINIMAL,)
