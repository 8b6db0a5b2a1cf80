"""The :class:`StateStore` contract: what a gateway keeps across restarts, as plain rows.

A gateway's ledger is the one owner of every event's state while it runs;
a store keeps a copy of it that survives the process (DESIGN.md section 8):

- one :class:`SourceRow` per message or task version the ledger remembers
  (its state, attempts, retry time, dispatch ids, whether an ack is owed, the
  turn it belongs to, and the event itself while it may run again);
- one :class:`TurnRow` per journaled turn (a turn that started and has not
  completed: its sources in order, session key, attempt, state);
- :class:`StoreMeta`: the WebSocket's ``last_seq``, the agent session id of the
  run, and when the run last heard from the platform.

The gateway writes :class:`StateBatch` es (each one transaction) and reads a
:class:`StoredState` once at start. The contract is small on purpose, so that a
shared database can implement it with one active gateway per account.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterable
from types import TracebackType
from typing import Self

import attrs

from ..errors import StateStoreError

__all__ = [
    "SourceRow",
    "StateBatch",
    "StateStore",
    "StoreIdentity",
    "StoreMeta",
    "StoredState",
    "TurnRow",
]


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen
class StoreIdentity:
    """Who a store belongs to: a store serves one agent of one org on one platform.

    Attributes:
        parall_url: the platform's API base URL.
        org_id: the organisation.
        agent_id: the agent's user id.
        account_id: the gateway's account id (named in errors; not part of the
            identity a store checks).
    """

    parall_url: str
    org_id: str
    agent_id: str
    account_id: str = "default"

    def same_agent(self, other: StoreIdentity) -> bool:
        """Whether ``other`` is the same agent of the same org on the same platform (the
        account id may differ: it only names the gateway's main session)."""
        return self._agent() == other._agent()

    def _agent(self) -> tuple[str, str, str]:
        return (self.parall_url.rstrip("/"), self.org_id, self.agent_id)

    def describe(self) -> str:
        """A one-line description for logs and errors (no secret in it)."""
        return (
            f"account {self.account_id!r} (agent {self.agent_id} of {self.org_id} "
            f"at {self.parall_url})"
        )


@attrs.frozen
class SourceRow:
    """The stored record of one message or task version (one ledger record).

    Attributes:
        key: the ledger key (the message id, or ``task id @ updated_at``).
        source_type: ``message`` or ``task_activity``.
        source_id: the dispatch source id.
        origin: how the gateway learnt of it (``live``, ``dispatch_new``, ``catch_up``).
        state: the ledger state (``claimed``, ``queued``, ``running``, ``done``,
            ``acked``, ``failed``, ``dead``).
        attempts: failed turns so far.
        next_attempt_at: when a failed record may run again (seconds since the epoch).
        last_error: the last failure's message.
        dispatch_ids: the dispatch rows known for it (acked by id when it is settled).
        ack_pending: its turn completed (or it was given up on) and its acks have not
            been confirmed yet.
        turn_id: the journaled turn it belongs to, if any.
        event: the event as JSON, kept while it may run again.
        order: the ledger's order (oldest first), for eviction after a restart.
    """

    key: str
    source_type: str
    source_id: str
    origin: str
    state: str
    attempts: int = 0
    next_attempt_at: float | None = None
    last_error: str | None = None
    dispatch_ids: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    ack_pending: bool = False
    turn_id: str | None = None
    event: str | None = None
    order: int = 0


@attrs.frozen
class TurnRow:
    """A journaled turn: started and not completed (DESIGN.md section 8).

    Attributes:
        turn_id: the turn's id (derived from its sources, or random for a turn
            without one); its replies' idempotency keys derive from it.
        keys: the ledger keys of its sources, in order.
        session_key: the session it ran on.
        prefix: the fork-result prefix it was given.
        attempt: how many times it has started.
        state: ``running`` (found at start: the process died during it),
            ``interrupted`` (shutdown cancelled it) or ``pinned`` (it failed after
            sending: it runs again with the same sources).
        order: the journal's order (oldest first).
    """

    turn_id: str
    keys: tuple[str, ...] = attrs.field(converter=_strings)
    session_key: str
    prefix: str = ""
    attempt: int = 1
    state: str = "running"
    order: int = 0


@attrs.frozen
class StoreMeta:
    """What a gateway keeps about its run (not about one event).

    Attributes:
        last_seq: the WebSocket's last delivered sequence number (resume from it).
        session_id: the platform AgentSession of the run that wrote it, while that
            run is not shut down (a restart that finds one marks it completed).
        last_heard_at: when the run last heard from the platform (seconds since the
            epoch); the cold-start window is measured against it.
    """

    last_seq: int = 0
    session_id: str | None = None
    last_heard_at: float | None = None


@attrs.frozen
class StoredState:
    """Everything a store holds for its agent, read once at start."""

    sources: tuple[SourceRow, ...] = ()
    """Ledger records, oldest first."""
    turns: tuple[TurnRow, ...] = ()
    """Journaled turns, oldest first."""
    meta: StoreMeta = StoreMeta()

    @property
    def empty(self) -> bool:
        """Whether nothing was ever stored (a first run)."""
        return not self.sources and not self.turns and self.meta == StoreMeta()


@attrs.frozen
class StateBatch:
    """Changes written in one transaction: rows put (inserted or replaced), rows
    deleted, and the meta when it changed. Deletions apply before puts (a key both
    deleted and put is kept, as put)."""

    sources: tuple[SourceRow, ...] = ()
    deleted_sources: tuple[str, ...] = ()
    turns: tuple[TurnRow, ...] = ()
    deleted_turns: tuple[str, ...] = ()
    meta: StoreMeta | None = None

    def __bool__(self) -> bool:
        return bool(
            self.sources
            or self.deleted_sources
            or self.turns
            or self.deleted_turns
            or self.meta is not None
        )


class StateStore(abc.ABC):
    """Where a gateway keeps what must survive a restart (DESIGN.md section 8).

    A store is opened (:meth:`open`, or ``async with``), then used by one gateway
    at a time: :meth:`load` binds it to the gateway's agent and returns what it
    holds, :meth:`write` applies a batch in one transaction, :meth:`release`
    unbinds it. A store records the agent it belongs to and refuses another.

    Implementations override the underscored methods; this class keeps the
    bookkeeping (open, bound to one gateway) and the errors in one place.
    """

    durable: bool = True
    """Whether what is written survives the process."""

    def __init__(self) -> None:
        self._open = False
        self._in_use: StoreIdentity | None = None
        self._opening: asyncio.Lock | None = None

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """What the store is, for logs and errors (a file path, a database name)."""

    @property
    def is_open(self) -> bool:
        """Whether :meth:`open` was called and :meth:`close` was not."""
        return self._open

    async def open(self) -> None:
        """Open the store (create or migrate it, take its lock). Idempotent.

        Raises:
            StateStoreError: it cannot be opened (held by another process, a schema
                this version does not know, not a store at all).
        """
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # two concurrent opens open once
            if not self._open:
                await self._open_store()
                self._open = True

    async def close(self) -> None:
        """Close the store (release its lock). Idempotent."""
        if self._open:
            self._open = False
            self._in_use = None
            await self._close_store()

    async def load(self, identity: StoreIdentity) -> StoredState:
        """Bind the store to the gateway of ``identity`` and return what it holds.

        Raises:
            StateStoreError: the store is not open, is in use by another gateway, or
                belongs to another agent.
        """
        if not self._open:
            raise StateStoreError(f"state store {self.description} is not open")
        if self._in_use is not None:
            raise StateStoreError(
                f"state store {self.description} is in use by another gateway "
                f"({self._in_use.describe()}); {identity.describe()} cannot share it"
            )
        self._in_use = identity  # taken before the await: a concurrent load is refused
        try:
            return await self._load(identity)
        except BaseException:
            self._in_use = None
            raise

    async def write(self, batch: StateBatch) -> None:
        """Apply ``batch`` in one transaction (all of it or none of it).

        Raises:
            StateStoreError: the write failed (nothing of the batch was applied).
        """
        if self._in_use is None:
            raise StateStoreError(f"state store {self.description} is not loaded by a gateway")
        if batch:
            await self._write(batch)

    async def release(self) -> None:
        """The gateway is done with the store (it stays open). A gateway calls it in its
        shutdown once its turns and writes are flushed, before ``on_stop``."""
        self._in_use = None

    def check_held(self) -> None:
        """Raise :class:`~parall_bridge.errors.LeaseLost` when the store writes under an
        account lease that may have expired (no I/O: a local check a gateway makes before
        each send and ack). Stores without leases never raise."""
        return

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- what an implementation provides ---------------------------------------------------

    @abc.abstractmethod
    async def _open_store(self) -> None:
        """Open the backing storage; raise :class:`StateStoreError` when it cannot be."""

    @abc.abstractmethod
    async def _close_store(self) -> None:
        """Close the backing storage."""

    @abc.abstractmethod
    async def _load(self, identity: StoreIdentity) -> StoredState:
        """Check (or, on first use, record) the identity, then read everything."""

    @abc.abstractmethod
    async def _write(self, batch: StateBatch) -> None:
        """Apply a non-empty batch in one transaction."""
