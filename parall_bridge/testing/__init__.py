"""A Parall emulator for tests: :class:`FakeParallServer`, a real aiohttp HTTP +
WebSocket server on a loopback port that implements PROTOCOL.md (REST, WebSocket,
dispatch semantics) with helpers to seed and drive it, records to inspect, and
fault injection.

The pytest plugin :mod:`parall_bridge.testing.pytest_plugin` provides the
``parall_server`` fixture.
"""

from __future__ import annotations

from ._faults import FaultInjector
from ._records import AgentAccount, ClientFrame, RecordedRequest, WsConnectionRecord
from .server import FakeParallServer

__all__ = [
    "AgentAccount",
    "ClientFrame",
    "FakeParallServer",
    "FaultInjector",
    "RecordedRequest",
    "WsConnectionRecord",
]
