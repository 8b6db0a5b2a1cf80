"""pytest plugin of parall_bridge (registered as the ``pytest11`` entry point
``parall_bridge``, so installing the package is enough): the ``parall_server`` fixture.

The fixture is async, so it needs pytest-asyncio (``pip install
'parall-bridge[testing]'``); without it, installing parall_bridge never breaks a
pytest run: only a test asking for ``parall_server`` fails, and says why. Set
pytest-asyncio's ``asyncio_default_fixture_loop_scope = "function"`` in your pytest
settings, or every run warns that it is unset.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

import pytest

from .server import FakeParallServer

__all__ = ["parall_server"]

MISSING_PYTEST_ASYNCIO = (
    "the parall_server fixture needs pytest-asyncio: pip install 'parall-bridge[testing]' "
    "(or pytest-asyncio), and mark async tests with @pytest.mark.asyncio"
)


async def _serve() -> AsyncIterator[FakeParallServer]:
    """A started :class:`FakeParallServer` with default settings, closed after the test."""
    async with FakeParallServer() as server:
        yield server


def _missing() -> NoReturn:
    pytest.fail(MISSING_PYTEST_ASYNCIO, pytrace=False)


parall_server: Any
"""The fixture: a started :class:`~parall_bridge.testing.FakeParallServer` with default
settings (an ephemeral port on ``127.0.0.1``), closed after the test. It is
function-scoped and async: ask for it in an ``async def`` test marked
``@pytest.mark.asyncio`` (or with ``asyncio_mode = "auto"``)::

    @pytest.mark.asyncio
    async def test_hello(parall_server: FakeParallServer) -> None:
        agent = parall_server.add_agent("Bot")
        async with running_gateway(parall_server, agent, MyRuntime()) as gateway:
            ...

Needs pytest-asyncio; without it, a test asking for it fails and says why.
"""
try:
    import pytest_asyncio
except ImportError:
    parall_server = pytest.fixture(name="parall_server")(_missing)
else:
    parall_server = pytest_asyncio.fixture(name="parall_server")(_serve)
