"""pytest plugin of parall_bridge (registered as the ``pytest11`` entry point
``parall_bridge``): the ``parall_server`` fixture.

The fixture is async, so it needs pytest-asyncio (``pip install
'parall-bridge[testing]'``); without it, installing parall_bridge never breaks a
pytest run: only a test asking for ``parall_server`` fails, and says why.
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
try:
    import pytest_asyncio
except ImportError:
    parall_server = pytest.fixture(name="parall_server")(_missing)
else:
    parall_server = pytest_asyncio.fixture(name="parall_server")(_serve)
