"""A throwaway PostgreSQL server for the store's tests: ``initdb`` and ``pg_ctl`` into a
temporary folder, reached only through a Unix socket in that folder (no TCP port, so
concurrent test runs never collide). Started once per session, stopped with
``pg_ctl stop -m immediate`` and deleted at its end; a session killed before its end
leaves its cluster to the next session, which stops and deletes it.

The binaries come from PATH or ``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql``
package: ``make postgres-server`` installs it). PostgreSQL refuses to run as root, so as
root the cluster belongs to ``nobody`` and its commands run through ``runuser``.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from parall_bridge.state import SourceRow

ADMIN = "postgres"
"""The cluster's superuser (trust authentication over the socket)."""

SECRET_USER = "prll_secret"
"""A role that must give its password (scram-sha-256), for the tests that it never leaks."""

SECRET_PASSWORD = "pw-S3cr3t!x9 %with@odd:chars/"
"""Its password: characters a DSN must percent-encode."""

INSTALL_HINT = (
    "the PostgreSQL store's tests start a throwaway PostgreSQL server, and its binaries "
    "(initdb, pg_ctl) are not on PATH nor under /usr/lib/postgresql/*/bin: run "
    "`make postgres-server` (it installs Debian's postgresql package), or install "
    "PostgreSQL and put its bin directory on PATH"
)


def find_bindir() -> Path:
    """The directory of ``initdb`` and ``pg_ctl``; fails the test with how to install them."""
    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(Path(path) for path in debian)
    for bindir in candidates:
        if (bindir / "pg_ctl").exists() and (bindir / "initdb").exists():
            return bindir
    pytest.fail(INSTALL_HINT, pytrace=False)


PREFIX = "prll-pg-"
"""How a cluster's temporary folder is named (in the system's temporary directory)."""

OWNER = "owner.pid"
"""The file, in a cluster's folder, that holds the pid of the test session that made it."""


def reap_stale_clusters(bindir: Path, prefix: list[str]) -> None:
    """Stop and delete the clusters of test sessions that died without stopping theirs
    (a pytest killed with SIGKILL): those whose owner's pid is gone. Other sessions'
    clusters, and folders without an owner yet, are left alone."""
    for owner in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*", OWNER)):
        root = Path(owner).parent
        try:
            pid = int(Path(owner).read_text(encoding="ascii"))
            os.kill(pid, 0)
        except ProcessLookupError:
            pass  # its session is gone
        except (OSError, ValueError):
            continue  # alive (another user's), or not ours to judge
        else:
            continue  # alive
        if (root / "data" / "postmaster.pid").exists():
            subprocess.run(  # noqa: S603  # our own command line
                [
                    *prefix,
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(root / "data"),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                cwd=tempfile.gettempdir(),
                capture_output=True,
                check=False,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


class PostgresServer:
    """A running throwaway cluster; :meth:`stop` ends it and deletes its folder."""

    def __init__(self) -> None:
        try:
            import asyncpg  # type: ignore[import-untyped]  # noqa: F401  # only: is it there
        except ImportError:
            pytest.fail(
                "asyncpg is missing: install the dev extra (pip install -e '.[dev]')",
                pytrace=False,
            )
        self.bindir = find_bindir()
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            self._prefix = ["runuser", "-u", "nobody", "--"]
        reap_stale_clusters(self.bindir, self._prefix)
        # A short path: a Unix socket's path is limited to about 100 bytes.
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX))
        self.data = self.root / "data"
        self._started = False
        self._names = itertools.count(1)
        (self.root / OWNER).write_text(str(os.getpid()), encoding="ascii")
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)

    def start(self) -> None:
        """initdb, configure (socket only, no fsync) and start the server."""
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                f"--username={ADMIN}",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write(
                    "\nlisten_addresses = ''\n"
                    f"unix_socket_directories = '{self.root}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 200\n"
                )
            hba = self.data / "pg_hba.conf"
            rules = hba.read_text(encoding="utf-8")
            hba.write_text(f"local all {SECRET_USER} scram-sha-256\n{rules}", encoding="utf-8")
            self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.root / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            )
            self._started = True
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server at once (no checkpoint: it is thrown away) and delete it all."""
        try:
            if self._started and self.root.exists():  # (a later session may have reaped it)
                self._started = False
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres", user: str = ADMIN, password: str = "") -> str:
        """A DSN for ``database`` over the server's socket."""
        from urllib.parse import quote

        secret = f":{quote(password, safe='')}" if password else ""
        return f"postgresql://{user}{secret}@/{database}?host={self.root}"

    async def new_database(self, owner: str = ADMIN) -> str:
        """A new empty database, and the DSN of its owner (``SECRET_USER``: with the
        password)."""
        import asyncpg

        name = f"test_{os.getpid()}_{next(self._names)}"
        conn = await asyncpg.connect(self.dsn())
        try:
            await conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        finally:
            await conn.close()
        if owner == SECRET_USER:
            return self.dsn(name, SECRET_USER, SECRET_PASSWORD)
        return self.dsn(name)

    async def create_secret_user(self) -> None:
        """The password-protected role (idempotent)."""
        import asyncpg

        conn = await asyncpg.connect(self.dsn())
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", SECRET_USER)
            if not exists:
                password = SECRET_PASSWORD.replace("'", "''")
                await conn.execute(f"CREATE ROLE {SECRET_USER} LOGIN PASSWORD '{password}'")
        finally:
            await conn.close()

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._prefix, str(self.bindir / tool), *args]
        done = subprocess.run(  # noqa: S603  # our own command line
            command, cwd=self.root, capture_output=True, text=True, check=False, timeout=120
        )
        if done.returncode != 0:
            log = self.root / "server.log"
            server_log = log.read_text(errors="replace") if log.exists() else ""
            pytest.fail(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                f"\n{server_log}",
                pytrace=False,
            )


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
