"""pytest plugin of parall_bridge (registered as the ``pytest11`` entry point
``parall_bridge``): the ``parall_server`` fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from .server import FakeParallServer

__all__ = ["parall_server"]


@pytest_asyncio.fixture
async def parall_server() -> AsyncIterator[FakeParallServer]:
    """A started :class:`FakeParallServer` with default settings, closed after the test."""
    async with FakeParallServer() as server:
        yield server
