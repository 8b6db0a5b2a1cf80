"""The persister: writes the ledger's transitions and the run's meta to the state store.

It runs beside the gateway, never in front of it: a transition marks what
changed and wakes it; it takes everything that changed since its last write
(:meth:`Ledger.changes`) and writes it as one batch, one transaction, while
new transitions accumulate for the next one. Whoever needs a transition
durable before acting on it (a turn's first send, an ack) awaits
:meth:`Persister.durable` with the ledger version it needs; nothing before a
turn starts waits for it.

A failed write is logged and tried again (with backoff); what waits on it
fails with the :class:`~parall_bridge.StateStoreError` meanwhile, so no send or
ack goes out on a state that is not on disk. A write refused because the store's
account lease was lost (:class:`~parall_bridge.LeaseLost`) is final: it is not
tried again, every wait fails with it from then on (also a wait for what is
durable already: a lease the store says may have expired,
:meth:`~parall_bridge.StateStore.check_held`, counts as lost), shutdown does not
wait for the store, and ``on_lease_lost`` stops the gateway
(:attr:`Persister.lease_lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final

import attrs

from ..errors import LeaseLost, StateStoreError
from ..state.base import StateStore, StoreMeta
from .ledger import Ledger

__all__ = ["Persister"]

_log = logging.getLogger("parall_bridge.gateway.persist")

HEARD_RESOLUTION: Final = 5.0
"""Seconds between two writes of ``last_heard_at`` alone (it only bounds the cold start)."""
RETRY_DELAYS: Final = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Waits before trying a failed write again (the last one repeats)."""
BATCH_DELAY: Final = 0.002
"""Seconds a write waits after the first change, unless someone waits on it: the turn
whose start caused the change runs first, and what follows joins the same transaction."""


class Persister:
    """Keeps a :class:`StateStore` up to date with a :class:`Ledger`.

    Args:
        store: the store (loaded by the gateway).
        ledger: the ledger whose transitions it writes.
        meta: what the store held of the run's meta at start.
        clock: the ledger's clock (``time.monotonic`` in a gateway).
        on_lease_lost: called once, with the refusal, when the store's lease is found
            lost (a refused write, or :meth:`StateStore.check_held` before a send).
    """

    def __init__(
        self,
        store: StateStore,
        ledger: Ledger,
        meta: StoreMeta,
        *,
        clock: Callable[[], float],
        on_lease_lost: Callable[[LeaseLost], None] | None = None,
    ) -> None:
        self._store = store
        self._on_lease_lost = on_lease_lost
        self._ledger = ledger
        self._clock = clock
        self._meta = meta
        self._meta_dirty = False
        self._written_heard = meta.last_heard_at
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._durable_version = ledger.version if not ledger.dirty else -1
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._error: StateStoreError | None = None
        self._lost: LeaseLost | None = None
        self._task: asyncio.Task[None] | None = None
        self.writes = 0
        self.failures = 0

    @property
    def store(self) -> StateStore:
        """The store written to."""
        return self._store

    @property
    def lease_lost(self) -> LeaseLost | None:
        """The refusal of a write because the store's lease was lost, if one was: nothing
        is written after it."""
        return self._lost

    @property
    def meta(self) -> StoreMeta:
        """The run's meta as last set (written or about to be)."""
        return self._meta

    def start(self) -> None:
        """Start writing in the background, woken by every transition of the ledger."""
        self._ledger.on_change = self.poke
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="parall-gateway-persist"
            )
        self.poke()

    def poke(self) -> None:
        """Something changed: write it soon."""
        self._wake.set()

    # --- the run's meta ----------------------------------------------------------------

    def set_last_seq(self, seq: int) -> None:
        """The WebSocket's last delivered sequence number."""
        if seq != self._meta.last_seq:
            self._set_meta(last_seq=seq)

    def set_session(self, session_id: str | None) -> None:
        """The platform AgentSession of this run (``None`` once it is completed)."""
        if session_id != self._meta.session_id:
            self._set_meta(session_id=session_id)

    def heard(self) -> None:
        """The platform answered or sent something just now."""
        now = time.time()
        self._meta = attrs.evolve(self._meta, last_heard_at=now)
        if self._written_heard is None or now - self._written_heard >= HEARD_RESOLUTION:
            self._meta_dirty = True
            self.poke()

    def _set_meta(self, **changes: object) -> None:
        self._meta = attrs.evolve(self._meta, **changes)  # type: ignore[arg-type]
        self._meta_dirty = True
        self.poke()

    # --- durability ----------------------------------------------------------------------

    async def durable(self, version: int) -> None:
        """Wait until the ledger is durable up to ``version``.

        Raises:
            LeaseLost: the store's lease is lost, or may have expired
                (:meth:`StateStore.check_held`), even when the version is durable:
                nothing goes out on a lease this process may no longer hold.
            StateStoreError: the store failed to write it (it is tried again; a later
                wait may succeed).
        """
        if self._lost is not None:
            raise self._lost
        try:
            self._store.check_held()
        except LeaseLost as exc:
            self._lose(exc)
            raise
        if version <= self._durable_version:
            return
        if self._error is not None:
            raise self._error
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((version, future))
        self._urgent.set()
        self.poke()
        await future

    def _settle_waiters(self, error: StateStoreError | None = None) -> None:
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for version, future in self._waiters:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            elif version <= self._durable_version:
                future.set_result(None)
            else:
                keep.append((version, future))
        self._waiters = keep

    # --- the work ---------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            if not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BATCH_DELAY):
                        await self._urgent.wait()
            self._wake.clear()
            self._urgent.clear()
            if self._lost is not None:
                self._settle_waiters(self._lost)
                continue  # final: nothing is written any more
            if not await self.flush_once():
                failures += 1
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS)) - 1]
                await asyncio.sleep(delay)
                self._wake.set()
            else:
                failures = 0

    async def flush_once(self) -> bool:
        """Write what changed, in one transaction; returns whether it succeeded (or there
        was nothing to write)."""
        if self._lost is not None:
            return False
        ledger = self._ledger
        version = ledger.version
        batch = ledger.changes(now=self._clock(), wall=time.time())
        if self._meta_dirty:
            batch = attrs.evolve(batch, meta=self._meta)
            self._meta_dirty = False
        if not batch:
            self._durable_version = max(self._durable_version, version)
            self._settle_waiters()
            return True
        try:
            await self._store.write(batch)
        except Exception as exc:
            # Put the batch back: its rows are rewritten (from the ledger as it is then)
            # by the next attempt.
            ledger.remark(batch)
            if batch.meta is not None:
                self._meta_dirty = True
            self.failures += 1
            error = (
                exc
                if isinstance(exc, StateStoreError)
                else StateStoreError(
                    f"state store {self._store.description} write failed: "
                    f"{type(exc).__name__}: {exc}"
                )
            )
            self._error = error
            if isinstance(error, LeaseLost):
                self._lose(error)
            else:
                _log.error("%s (tried again)", str(error))
            self._settle_waiters(error)
            return False
        self.writes += 1
        self._error = None
        if batch.meta is not None and batch.meta.last_heard_at is not None:
            self._written_heard = batch.meta.last_heard_at
        self._durable_version = max(self._durable_version, version)
        self._settle_waiters()
        return True

    def _lose(self, error: LeaseLost) -> None:
        if self._lost is not None:
            return
        self._lost = error
        _log.error("%s (not tried again: the lease is lost)", str(error))
        if self._on_lease_lost is not None:
            self._on_lease_lost(error)

    async def close(self, within: float) -> bool:
        """Write what is left (for up to ``within`` seconds), then stop; returns whether
        everything was written."""
        self._ledger.on_change = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        ok = False
        try:
            async with asyncio.timeout(within):
                while not ok and self._lost is None:
                    ok = await self.flush_once()
                    if not ok and self._lost is None:
                        await asyncio.sleep(RETRY_DELAYS[0])
        except TimeoutError:
            _log.error("state store %s: the last changes were not written", self._store.description)
        if self._lost is not None:
            _log.error(
                "state store %s: the last changes were not written (its lease is lost)",
                self._store.description,
            )
        closed = self._lost or StateStoreError(f"state store {self._store.description} is closed")
        self._settle_waiters(None if ok else closed)
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(
                    StateStoreError(f"state store {self._store.description} is closed")
                )
        self._waiters = []
        return ok
