"""The store tests' PostgreSQL server: one throwaway cluster for the session (started
only when a test asks for it), and a fresh database per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_asyncio

from ._postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running throwaway PostgreSQL server, stopped and deleted at the session's end.

    It fails (never skips) when PostgreSQL or asyncpg is missing, saying how to install it.
    """
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def postgres_dsn(postgres_server: PostgresServer) -> str:
    """The DSN of a new, empty database of the test's own."""
    return await postgres_server.new_database()
