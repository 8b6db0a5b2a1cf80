"""Running a :class:`~parall_bridge.Gateway` against the emulator for a test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ..gateway import Gateway, GatewayConfig
from ..routing import RoutingStrategy
from ..runtime import AgentRuntime
from ..state import StateStore
from ._records import AgentAccount
from .server import FakeParallServer

__all__ = ["running_gateway"]

READY_TIMEOUT = 10.0
"""Seconds :func:`running_gateway` waits for the gateway to be ready."""


@contextlib.asynccontextmanager
async def running_gateway(
    server: FakeParallServer,
    agent: AgentAccount,
    runtime: AgentRuntime,
    *,
    routing: RoutingStrategy | None = None,
    store: StateStore | None = None,
    **tunables: Any,
) -> AsyncIterator[Gateway]:
    """Run a gateway for ``agent`` against ``server`` for the duration of the block.

    The block starts once the gateway is ready (connected, first catch-up done). On
    leaving it the gateway is shut down and ``start()`` awaited: every step, status
    and ack it wrote is on the server then, and an error of ``start()`` (a refused
    key...) is raised here.

    Args:
        server: the emulator.
        agent: the agent account (from :meth:`FakeParallServer.add_agent`).
        runtime: the host runtime under test.
        routing: the routing strategy (the gateway's default when ``None``).
        store: a state store (stays the caller's; give the same one to a later block
            to test what a restart does), else the gateway's default.
        tunables: any keyword of :class:`~parall_bridge.GatewayConfig`
            (``reconcile_interval=0.2``, ``max_dispatch_attempts=2``...).

    Example::

        async with running_gateway(server, agent, MyRuntime()) as gateway:
            server.post_message(chat.id, ada.id, "hello")
            await server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
        assert server.steps(agent.user_id)  # all written once the block is left
    """
    config = GatewayConfig(server.url, agent.api_key, server.org_id, **tunables)
    gateway = Gateway(config, runtime, routing=routing, store=store)
    abort = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        gateway.start(abort), name="parall-testing-gateway"
    )
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await gateway.wait_ready()
        yield gateway
    except BaseException:
        abort.set()
        await asyncio.gather(task, return_exceptions=True)
        raise
    abort.set()
    await task
