"""``MemoryStateStore``: the store of a bare :class:`~parall_bridge.Gateway`.

It keeps the rows in dictionaries: what it holds outlives a gateway (two
gateways given the same store one after the other see each other's state) but
not the process. It is the default when no ``state_path`` is configured.
"""

from __future__ import annotations

from ..errors import StateStoreError
from .base import SourceRow, StateBatch, StateStore, StoredState, StoreIdentity, StoreMeta, TurnRow

__all__ = ["MemoryStateStore"]


class MemoryStateStore(StateStore):
    """A :class:`StateStore` in memory: nothing survives the process."""

    durable = False

    def __init__(self) -> None:
        super().__init__()
        self._identity: StoreIdentity | None = None
        self._sources: dict[str, SourceRow] = {}
        self._turns: dict[str, TurnRow] = {}
        self._meta = StoreMeta()

    @property
    def description(self) -> str:
        """``memory``."""
        return "memory"

    def __repr__(self) -> str:
        return f"MemoryStateStore(sources={len(self._sources)}, turns={len(self._turns)})"

    async def _open_store(self) -> None:
        return None

    async def _close_store(self) -> None:
        return None

    async def _load(self, identity: StoreIdentity) -> StoredState:
        if self._identity is None:
            self._identity = identity
        elif not self._identity.same_agent(identity):
            raise StateStoreError(
                f"state store {self.description} belongs to {self._identity.describe()}, "
                f"not {identity.describe()}"
            )
        return StoredState(
            sources=tuple(sorted(self._sources.values(), key=lambda row: row.order)),
            turns=tuple(sorted(self._turns.values(), key=lambda row: row.order)),
            meta=self._meta,
        )

    async def _write(self, batch: StateBatch) -> None:
        for key in batch.deleted_sources:
            self._sources.pop(key, None)
        for row in batch.sources:
            self._sources[row.key] = row
        for turn_id in batch.deleted_turns:
            self._turns.pop(turn_id, None)
        for turn in batch.turns:
            self._turns[turn.turn_id] = turn
        if batch.meta is not None:
            self._meta = batch.meta
