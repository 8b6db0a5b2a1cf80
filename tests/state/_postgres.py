"""The tests' PostgreSQL server: :class:`parall_bridge.testing.postgres.PostgresServer`
(a throwaway cluster on a Unix socket) with a password-protected role for the tests that
the password never leaks; and helpers to read the database directly."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from parall_bridge.state import SourceRow
from parall_bridge.testing.postgres import PostgresServer, PostgresUnavailable

ADMIN = "postgres"
"""The cluster's superuser (trust authentication over the socket)."""

SECRET_USER = "prll_secret"
"""A role that must give its password (scram-sha-256), for the tests that it never leaks."""

SECRET_PASSWORD = "pw-S3cr3t!x9 %with@odd:chars/"
"""Its password: characters a DSN must percent-encode."""


class TestServer(PostgresServer):
    """The throwaway server, with :data:`SECRET_USER` authenticated by password."""

    __test__ = False  # not a test class

    def on_configured(self) -> None:
        hba = self.data / "pg_hba.conf"
        rules = hba.read_text(encoding="utf-8")
        hba.write_text(f"local all {SECRET_USER} scram-sha-256\n{rules}", encoding="utf-8")

    async def new_database(self, owner: str = ADMIN) -> str:
        """A new empty database, and the DSN of its owner (``SECRET_USER``: with the
        password)."""
        dsn = await super().new_database(owner)
        if owner == SECRET_USER:
            database = urlsplit(dsn).path.lstrip("/")
            return self.dsn(database, SECRET_USER, SECRET_PASSWORD)
        return dsn

    async def create_secret_user(self) -> None:
        """The password-protected role (idempotent)."""
        import asyncpg  # type: ignore[import-untyped]  # no type hints

        conn = await asyncpg.connect(self.dsn())
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", SECRET_USER)
            if not exists:
                password = SECRET_PASSWORD.replace("'", "''")
                await conn.execute(f"CREATE ROLE {SECRET_USER} LOGIN PASSWORD '{password}'")
        finally:
            await conn.close()


def start_server() -> TestServer:
    """A started :class:`TestServer`; fails (never skips) the test when PostgreSQL or
    asyncpg is missing, saying how to install it."""
    try:
        import asyncpg  # noqa: F401  # only: is it there
    except ImportError:
        pytest.fail(
            "asyncpg is missing: install the dev extra (pip install -e '.[dev]')", pytrace=False
        )
    try:
        server = TestServer()
        server.start()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    return server


def row(key: str, **fields: object) -> SourceRow:
    """A source row of ``key``: a queued live message unless ``fields`` say otherwise."""
    base: dict[str, object] = {
        "source_type": "message",
        "source_id": f"src-{key}",
        "origin": "live",
        "state": "queued",
    }
    return SourceRow(key=key, **(base | fields))  # type: ignore[arg-type]


async def query(dsn: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Rows of ``sql``, read on a connection of the test's own."""
    import asyncpg  # here: PostgresServer says when it is missing

    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(record) for record in await conn.fetch(sql, *args)]
    finally:
        await conn.close()
