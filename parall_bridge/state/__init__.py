"""What a gateway keeps across restarts: the :class:`StateStore` contract and its stores.

- :class:`MemoryStateStore`: in memory (the bare gateway's default): nothing
  survives the process.
- :class:`SqliteStateStore`: a SQLite file (``GatewayConfig(state_path=...)``):
  the embedded durable default, one file per account.
- :class:`PostgresStateStore`: a PostgreSQL database that many accounts share
  (extra ``postgres``; asyncpg is imported only when such a store opens).
"""

from .base import (
    SourceRow,
    StateBatch,
    StateStore,
    StoredState,
    StoreIdentity,
    StoreMeta,
    TurnRow,
)
from .memory import MemoryStateStore
from .postgres import Lease, PostgresStateStore
from .sqlite import SqliteStateStore

__all__ = [
    "Lease",
    "MemoryStateStore",
    "PostgresStateStore",
    "SourceRow",
    "SqliteStateStore",
    "StateBatch",
    "StateStore",
    "StoreIdentity",
    "StoreMeta",
    "StoredState",
    "TurnRow",
]
