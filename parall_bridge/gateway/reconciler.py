"""Reconciliation: catch-up passes over the dispatch queue, and retries when they fall due.

A pass runs at once at start, before and independently of the WebSocket;
after every ``hello`` and on ``recovery.overflow`` (asked for by the intake);
and on a timer: every ``reconcile_interval`` while the WebSocket is connected,
every ``outage_poll_interval`` while it is not, so an outage degrades to
polling the dispatch queue over REST. The first timed pass after a pass asked
for (the one at start, after a ``hello``) comes at a random point within the
interval, then every interval: the thousands of gateways of a fleet, started or
reconnected together, do not all reconcile in the same second. The ledger's
failed events are dispatched again as their retry times come.

On the process's first pass, the cold-start rule settles, without a turn,
pending items older than ``cold_start_window``. With a durable store their age
is measured against the moment the previous run last heard from the
platform, so what arrived while the gateway was down is never skipped, and a
source the ledger already knows is never skipped at all.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

from ..client import ParallClient
from ..errors import ParallError
from ..events import EventOrigin
from ..models import DispatchItem
from .pipeline import ItemPipeline
from .sources import ItemOutcome, Sources, item_key

__all__ = ["Reconciler"]

_log = logging.getLogger("parall_bridge.gateway")

DISPATCH_PAGE_SIZE: Final = 50


class Reconciler:
    """Catch-up and retry timing of one gateway.

    Args:
        client: the REST client.
        org_id: the organisation.
        sources: handles each dispatch item and dispatches due retries.
        pipeline: runs the items' handlers, ``fetch_concurrency`` at a time, each
            chat's in order.
        next_retry_at: when the ledger's next failed event falls due.
        interval: seconds between timed passes while connected (``reconcile_interval``).
        outage_interval: seconds between timed passes while not connected
            (``outage_poll_interval``).
        connected: whether the WebSocket is connected now.
        cold_start_window: the cold-start rule's window (``None``: off).
        previous_heard: when the previous run last heard from the platform
            (seconds since the epoch), if a store knows it.
        clock: the ledger's clock.
        heard: called when the platform answered.
        ready: called after the first pass that follows a ``hello``.
        wake: set to make it look at the retry times again (a failed turn).
        jitter: a number in [0, 1) drawn after each pass asked for: the next timed
            pass comes that fraction of the interval early (``random.random``).
    """

    def __init__(
        self,
        *,
        client: ParallClient,
        org_id: str,
        sources: Sources,
        pipeline: ItemPipeline,
        next_retry_at: Callable[[], float | None],
        interval: float,
        outage_interval: float,
        connected: Callable[[], bool],
        cold_start_window: float | None,
        previous_heard: float | None,
        clock: Callable[[], float],
        heard: Callable[[], None],
        ready: Callable[[], None],
        wake: asyncio.Event,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._org_id = org_id
        self._sources = sources
        self._pipeline = pipeline
        self._next_retry_at = next_retry_at
        self._interval = interval
        self._outage_interval = outage_interval
        self._connected = connected
        self._window = cold_start_window
        self._previous_heard = previous_heard
        self._clock = clock
        self._heard = heard
        self._ready = ready
        self._wake = wake
        self._jitter = jitter
        self._phase = 0.0  # the fraction of the interval the next timed pass comes early
        self._requested = True  # the first pass runs at once, before any hello
        self._hello_seen = False
        self._stopping = False
        self.passes = 0
        self.cold_start_skipped = 0

    def request(self, *, hello: bool = False) -> None:
        """Ask for a catch-up pass now (after a ``hello``, or ``recovery.overflow``)."""
        self._hello_seen |= hello
        self._requested = True
        self._wake.set()

    def poke(self) -> None:
        """The next retry time may have changed: look again."""
        self._wake.set()

    def stop(self) -> None:
        """End :meth:`run` (shutdown)."""
        self._stopping = True
        self._wake.set()

    def _next_interval(self) -> float:
        interval = self._interval if self._connected() else self._outage_interval
        return interval * (1.0 - self._phase)

    async def run(self) -> None:
        """Catch-up at once, after every hello and on overflow, on a timer (shorter while
        the WebSocket is down), and retries of failed events when they fall due; until
        :meth:`stop`."""
        last_pass = self._clock()
        while not self._stopping:
            next_pass = last_pass + self._next_interval()
            wake_at = next_pass
            retry_at = self._next_retry_at()
            if retry_at is not None:
                wake_at = min(wake_at, retry_at)
            if not self._requested:
                try:
                    async with asyncio.timeout(max(0.0, wake_at - self._clock())):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            if self._stopping:
                return
            try:
                if self._requested or self._clock() >= last_pass + self._next_interval():
                    asked, self._requested = self._requested, False
                    # After a pass asked for (at start, after a hello: every gateway of
                    # a fleet at once), the next timed one comes at a random point
                    # within the interval; then every interval.
                    self._phase = min(max(self._jitter(), 0.0), 1.0) if asked else 0.0
                    await self.catch_up()
                    last_pass = self._clock()
                self._sources.retry_due()
            except Exception:
                # A bug must not end reconciliation for the rest of the run: the next
                # pass (on the timer, or the next request) tries again.
                _log.exception("reconciliation pass failed")
                last_pass = self._clock()

    def _cutoff(self) -> datetime | None:
        """Items created before this are skipped on the first pass (cold start)."""
        if self.passes or self._window is None:
            return None
        if self._previous_heard is not None:
            reference = datetime.fromtimestamp(self._previous_heard, UTC)
        else:
            reference = datetime.now(UTC)
        return reference - timedelta(seconds=self._window)

    async def catch_up(self) -> None:
        """One pass over the pending dispatch items, oldest first."""
        cutoff = self._cutoff()
        items: list[DispatchItem] = []
        complete = False
        try:
            # Listed fully before any is handled: acks during paging must not shift pages.
            async for item in self._client.iter_dispatch(
                self._org_id, page_size=DISPATCH_PAGE_SIZE
            ):
                items.append(item)
            complete = True
        except ParallError as exc:
            _log.warning(
                "catch-up could not list the whole dispatch queue (%d item(s) listed): %s",
                len(items),
                str(exc),
            )
            if not items:
                return
        self._heard()
        if complete:
            self.passes += 1
        if self._stopping:
            return
        # Every item's message or task is fetched through the pipeline, many at once;
        # each reaches its lane after the items before it in its chat, and what waits
        # in a lane is coalesced into the next turn.
        handle = self._sources.on_item
        futures = [
            self._pipeline.put(
                item_key(item),
                functools.partial(handle, item, EventOrigin.CATCH_UP, cutoff),
                f"dispatch item {item.id}",
            )
            for item in items
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        outcomes: dict[ItemOutcome, int] = {}
        oldest: datetime | None = None
        for item, result in zip(items, results, strict=True):
            # An item the pipeline dropped (shutdown) stays pending for the next pass.
            outcome = result if isinstance(result, ItemOutcome) else ItemOutcome.LEFT_PENDING
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome is ItemOutcome.SKIPPED_OLD and item.created_at is not None:
                oldest = item.created_at if oldest is None else min(oldest, item.created_at)
        skipped = outcomes.get(ItemOutcome.SKIPPED_OLD, 0)
        if skipped:
            self.cold_start_skipped += skipped
            age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
            _log.warning(
                "cold start: acked %d dispatch item(s) older than %g s without a turn "
                "(the oldest %.0f s old)%s",
                skipped,
                self._window,
                age,
                "" if self._previous_heard is None else ", measured from the previous run",
            )
        if items:
            _log.info(
                "catch-up: %d pending item(s): %s",
                len(items),
                ", ".join(f"{n} {o.value}" for o, n in outcomes.items()),
            )
        if self._hello_seen:
            self._ready()
