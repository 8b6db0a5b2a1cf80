"""Running a real Gateway against the emulator, with a scriptable runtime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import attrs

from parall_bridge import ParallClient
from parall_bridge.events import ParallEvent
from parall_bridge.gateway import Gateway, GatewayConfig
from parall_bridge.models import AgentConfig, AgentStep, StepType
from parall_bridge.routing import RoutingStrategy
from parall_bridge.runtime import AgentRuntime, ForkOutcome, GatewayInfo, SessionRef, Turn
from parall_bridge.state import StateStore
from parall_bridge.testing import AgentAccount, FakeParallServer
from parall_bridge.ws import Backoff

from ..conftest import FAST_RETRY, library_tasks

FAST_BACKOFF = Backoff(base=1.5, maximum=0.05, jitter=0.01, reset_after=0.5)

Behaviour = Callable[[Turn], Awaitable[str | None]]


async def reply_ok(turn: Turn) -> str | None:
    """The default turn: nothing but a final text."""
    return "ok"


class ScriptedRuntime(AgentRuntime):
    """A runtime whose turns tests drive: it records everything, and each turn runs
    ``behaviour`` (a coroutine function of the turn)."""

    def __init__(self, behaviour: Behaviour = reply_ok, *, forks: bool = True) -> None:
        self.behaviour = behaviour
        self.forks = forks
        self.turns: list[Turn] = []
        self.finished: list[Turn] = []
        self.active: set[str] = set()
        self.overlaps: list[str] = []
        self.forked: list[SessionRef] = []
        self.released: list[tuple[SessionRef, ForkOutcome]] = []
        self.configs: list[AgentConfig] = []
        self.dead: list[tuple[list[ParallEvent], BaseException]] = []
        self.info: GatewayInfo | None = None
        self.stopped = False
        self.turn_started = asyncio.Event()

    async def run_turn(self, turn: Turn) -> str | None:
        target = turn.event.target_id
        if target in self.active:
            self.overlaps.append(target)
        self.active.add(target)
        self.turns.append(turn)
        self.turn_started.set()
        try:
            return await self.behaviour(turn)
        finally:
            self.active.discard(target)
            self.finished.append(turn)

    async def fork_session(self, parent: SessionRef) -> SessionRef | None:
        if not self.forks:
            return None
        child = SessionRef(f"{parent.key}:fork:{len(self.forked) + 1}")
        self.forked.append(child)
        return child

    async def release_session(self, child: SessionRef, outcome: ForkOutcome) -> None:
        self.released.append((child, outcome))

    async def apply_platform_config(self, config: AgentConfig) -> None:
        self.configs.append(config)

    async def on_start(self, info: GatewayInfo) -> None:
        self.info = info

    async def on_dead_letter(self, events: Sequence[ParallEvent], error: BaseException) -> None:
        self.dead.append((list(events), error))

    async def on_stop(self) -> None:
        self.stopped = True

    def texts(self) -> list[list[str]]:
        """The texts of each turn's events."""
        return [[event.text for event in turn.events] for turn in self.turns]


class Gate:
    """Turns that wait until a test lets them go."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def __call__(self, turn: Turn) -> str | None:
        await self.open.wait()
        return "ok"


@attrs.define
class Run:
    """A running gateway and what it runs against."""

    server: FakeParallServer
    agent: AgentAccount
    gateway: Gateway
    runtime: ScriptedRuntime
    client: ParallClient
    task: asyncio.Task[None]
    abort: asyncio.Event

    @property
    def org(self) -> str:
        return self.server.org_id

    def steps(self, step_type: StepType | None = None) -> list[AgentStep]:
        steps = self.server.steps(self.agent.user_id)
        return [s for s in steps if step_type is None or s.step_type == step_type]

    def pending(self) -> list[str]:
        """Source ids of the agent's pending dispatch items."""
        return [item.source_id or "" for item in self.server.dispatch_items(self.agent.user_id)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        await self.server.wait_for(predicate, timeout=timeout)

    async def stop(self) -> None:
        """Set the abort event and wait for start() to return."""
        self.abort.set()
        await asyncio.wait_for(asyncio.shield(self.task), 30.0)


def make_config(server: FakeParallServer, agent: AgentAccount, **tunables: Any) -> GatewayConfig:
    values: dict[str, Any] = {"shutdown_grace": 2.0, "reconcile_interval": 30.0}
    values.update(tunables)
    return GatewayConfig(server.url, agent.api_key, server.org_id, **values)


@contextlib.asynccontextmanager
async def running(
    server: FakeParallServer,
    agent: AgentAccount,
    runtime: ScriptedRuntime | None = None,
    *,
    routing: RoutingStrategy | None = None,
    ready: bool = True,
    store: StateStore | None = None,
    **tunables: Any,
) -> AsyncIterator[Run]:
    """Run a gateway until the block ends; then stop it and check that start() returned
    cleanly and left no task of the library behind."""
    runtime = runtime or ScriptedRuntime()
    before = library_tasks()
    async with ParallClient(server.url, agent.api_key, retry=FAST_RETRY, timeout=5.0) as client:
        gateway = Gateway(
            make_config(server, agent, **tunables),
            runtime,
            routing=routing,
            client=client,
            store=store,
            backoff=FAST_BACKOFF,
        )
        abort = asyncio.Event()
        task = asyncio.get_running_loop().create_task(gateway.start(abort), name="test-gateway")
        run = Run(server, agent, gateway, runtime, client, task, abort)
        try:
            if ready:
                await asyncio.wait_for(gateway.wait_ready(), 10.0)
            yield run
        finally:
            abort.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), 30.0)
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
    assert library_tasks(before) == set(), "the gateway left tasks running"
