"""Fixtures of the emulator's tests.

``parall_server`` comes from the package's pytest plugin (the ``pytest11`` entry point
``parall_bridge``), so these tests also check that it is registered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
import pytest_asyncio

from parall_bridge.testing import FakeParallServer

from ._helpers import Api

__all__ = ["api", "http"]


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp session."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def api(
    parall_server: FakeParallServer, http: aiohttp.ClientSession
) -> Callable[[str | None], Api]:
    """Build an :class:`Api` for a key."""

    def make(api_key: str | None) -> Api:
        return Api(parall_server, http, api_key)

    return make
