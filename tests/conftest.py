"""Shared fixtures: the emulator, an agent account, Ada and her direct chat with the agent,
and clients with fast retries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from parall_bridge import ParallClient, RetryPolicy
from parall_bridge.models import Chat, User
from parall_bridge.testing import AgentAccount, FakeParallServer

from .state._postgres import TestServer, start_server

FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, jitter=0.01, max_retry_after=2.0)
"""Retries as the defaults, with delays short enough for tests."""


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeParallServer]:
    """A started emulator."""
    async with FakeParallServer(org_id="org_test") as fake:
        yield fake


@pytest.fixture
def agent(server: FakeParallServer) -> AgentAccount:
    """An agent account with its API key."""
    return server.add_agent("Bot", api_key="pk_test_secret_key_0123456789")


@pytest.fixture
def ada(server: FakeParallServer) -> User:
    """A human user."""
    return server.add_user("Ada")


@pytest.fixture
def room(server: FakeParallServer, agent: AgentAccount, ada: User) -> Chat:
    """The direct chat of Ada and the agent."""
    return server.add_chat(type="direct", members=[ada.id, agent.user_id])


@pytest_asyncio.fixture
async def client(server: FakeParallServer, agent: AgentAccount) -> AsyncIterator[ParallClient]:
    """A client of the agent's key, with fast retries."""
    async with ParallClient(server.url, agent.api_key, retry=FAST_RETRY, timeout=5.0) as c:
        yield c


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every log record of every logger at DEBUG."""
    caplog.set_level(logging.DEBUG)
    return caplog


def library_tasks(before: set[asyncio.Task[object]] | None = None) -> set[asyncio.Task[object]]:
    """Pending tasks started by the library (not the emulator's, not the test's own):
    every task the library creates is named ``parall-...``."""
    return {
        task
        for task in asyncio.all_tasks()
        if not task.done()
        and task.get_name().startswith("parall-")
        and (before is None or task not in before)
    }


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[TestServer]:
    """A running throwaway PostgreSQL server (started only when a test asks for it),
    stopped and deleted at the session's end. It fails (never skips) when PostgreSQL or
    asyncpg is missing, saying how to install it."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def postgres_dsn(postgres_server: TestServer) -> str:
    """The DSN of a new, empty database of the test's own."""
    return await postgres_server.new_database()
