"""A fleet's periodic work spread in time: the first timed reconciliation pass and the
first heartbeat after a hello come at a random point within their interval (issue 18:
2,000 gateways started together must not all fire in the same second)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from parall_bridge import ParallClient
from parall_bridge.gateway.pipeline import ItemPipeline
from parall_bridge.gateway.presence import Presence
from parall_bridge.gateway.reconciler import Reconciler
from parall_bridge.gateway.sources import Sources
from parall_bridge.ws import ConnectionState, ParallWs


class _Sources:
    def retry_due(self) -> None:
        pass


class _Passes:
    """A reconciler whose passes are noted (clock time) instead of run."""

    def __init__(self, interval: float, jitter: list[float]) -> None:
        self.times: list[float] = []
        self.draws = list(jitter)
        self.changed = asyncio.Event()
        self.reconciler = Reconciler(
            client=cast(ParallClient, None),
            org_id="org_1",
            sources=cast(Sources, _Sources()),
            pipeline=cast(ItemPipeline, None),
            next_retry_at=lambda: None,
            interval=interval,
            outage_interval=interval,
            connected=lambda: True,
            cold_start_window=None,
            previous_heard=None,
            clock=time.monotonic,
            heard=lambda: None,
            ready=lambda: None,
            wake=asyncio.Event(),
            jitter=lambda: self.draws.pop(0),
        )

        async def catch_up() -> None:
            self.times.append(time.monotonic())
            self.changed.set()

        self.reconciler.catch_up = catch_up  # type: ignore[method-assign]

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(5.0):
            while len(self.times) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.mark.asyncio
async def test_the_first_timed_pass_comes_at_a_random_point_within_the_interval() -> None:
    # Interval 0.6 s, drawn 0.75: the pass at start, the first timed one 0.15 s later,
    # then one every 0.6 s.
    passes = _Passes(0.6, [0.75])
    task = asyncio.get_running_loop().create_task(passes.reconciler.run())
    try:
        await passes.wait(3)
    finally:
        passes.reconciler.stop()
        await task
    first, second, third = passes.times[:3]
    assert second - first < 0.45  # early: not a whole interval after the pass at start
    assert third - second >= 0.6 - 0.02  # then the whole interval (timer resolution)
    assert passes.draws == []  # drawn once: after the pass at start, not after timed ones


@pytest.mark.asyncio
async def test_a_hello_draws_a_new_point_for_the_next_timed_pass() -> None:
    # A long interval: only the jitter brings the timed pass within the test's timeout.
    passes = _Passes(100.0, [0.0, 0.999])
    task = asyncio.get_running_loop().create_task(passes.reconciler.run())
    try:
        await passes.wait(1)  # the pass at start; the next timed one 100 s later
        passes.reconciler.request(hello=True)
        await passes.wait(2)  # the hello's pass, drawn 0.999: the next 0.1 s later
        await passes.wait(3)
    finally:
        passes.reconciler.stop()
        await task
    assert passes.times[2] - passes.times[1] < 1.0


class _Ws:
    """What the heartbeat uses of a ParallWs: its state, and a frame sent."""

    state = ConnectionState.CONNECTED

    def __init__(self) -> None:
        self.beats: list[float] = []
        self.changed = asyncio.Event()

    async def send_agent_heartbeat(self, session_id: str, metrics: Any) -> bool:
        self.beats.append(time.monotonic())
        self.changed.set()
        return True


@pytest.mark.asyncio
async def test_the_first_heartbeat_after_a_hello_comes_at_a_random_point_within_the_interval() -> (
    None
):
    ws = _Ws()
    draws = [0.8]
    presence = Presence(
        cast(ParallWs, ws), typing_refresh=5.0, drift_warning=15.0, jitter=lambda: draws.pop(0)
    )
    started = time.monotonic()
    presence.restart_heartbeat("ses_1", 0.5)  # the first beat after 0.1 s, then every 0.5 s
    try:
        async with asyncio.timeout(5.0):
            while len(ws.beats) < 2:
                ws.changed.clear()
                await ws.changed.wait()
    finally:
        await presence.close()
    assert ws.beats[0] - started < 0.4
    assert ws.beats[1] - ws.beats[0] >= 0.5 - 0.02
    assert draws == []
