"""A Parall emulator for tests: :class:`FakeParallServer`, a real aiohttp HTTP +
WebSocket server on a loopback port that implements the Parall protocol (REST,
WebSocket, dispatch semantics) with helpers to seed and drive it, records to inspect,
and fault injection; and :func:`running_gateway`, which runs a host's runtime in a
:class:`~parall_bridge.Gateway` against it for the duration of a block.

The pytest plugin :mod:`parall_bridge.testing.pytest_plugin` provides the
``parall_server`` fixture (it needs pytest-asyncio: ``pip install
'parall-bridge[testing]'``).
"""

from __future__ import annotations

from ._faults import FaultInjector
from ._gateway import running_gateway
from ._records import (
    AgentAccount,
    ClientFrame,
    RecordedRequest,
    UploadRecord,
    WsConnectionRecord,
)
from .server import FakeParallServer

__all__ = [
    "AgentAccount",
    "ClientFrame",
    "FakeParallServer",
    "FaultInjector",
    "RecordedRequest",
    "UploadRecord",
    "WsConnectionRecord",
    "running_gateway",
]
