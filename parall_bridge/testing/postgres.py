"""A throwaway PostgreSQL server for tests of a shared store (:class:`PostgresServer`).

``initdb`` and ``pg_ctl`` make a cluster in a temporary folder, reached only through a
Unix socket in that folder (no TCP port, so concurrent test runs never collide), with
durability off (``fsync``: it is thrown away). :meth:`PostgresServer.stop` stops it at
once and deletes the folder; a process killed before that leaves its cluster to the
next :class:`PostgresServer` made on the machine, which stops and deletes it.

The binaries come from ``PATH`` or ``/usr/lib/postgresql/*/bin`` (Debian's
``postgresql`` package; ``make postgres-server`` in this repository installs it).
PostgreSQL refuses to run as root, so as root the cluster belongs to ``nobody`` and its
commands run through ``runuser``. asyncpg (``pip install 'parall-bridge[postgres]'``)
is needed for :meth:`PostgresServer.new_database`.

A test does::

    server = PostgresServer()
    server.start()
    try:
        dsn = await server.new_database()
        async with GatewayFleet(..., store=PostgresStateStore(dsn)) ...
    finally:
        server.stop()
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
from typing import Final
from urllib.parse import quote

__all__ = ["INSTALL_HINT", "PostgresServer", "PostgresUnavailable", "find_bindir"]

ADMIN: Final = "postgres"
"""The cluster's superuser (trust authentication over the socket)."""

INSTALL_HINT: Final = (
    "a throwaway PostgreSQL server needs its binaries (initdb, pg_ctl), which are not on "
    "PATH nor under /usr/lib/postgresql/*/bin: run `make postgres-server` in the "
    "parall_bridge repository (it installs Debian's postgresql package), or install "
    "PostgreSQL and put its bin directory on PATH"
)
"""What :class:`PostgresUnavailable` says when the binaries are missing."""

PREFIX: Final = "prll-pg-"
"""How a cluster's temporary folder is named (in the system's temporary directory)."""

OWNER: Final = "owner.pid"
"""The file, in a cluster's folder, that holds the pid of the process that made it."""


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's binaries are missing, or a command of the server failed (the message
    says which, with the server's log)."""


def find_bindir() -> Path:
    """The directory of ``initdb`` and ``pg_ctl``.

    Raises:
        PostgresUnavailable: there is none (with how to install them).
    """
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
    raise PostgresUnavailable(INSTALL_HINT)


def _reap_stale_clusters(bindir: Path, prefix: list[str]) -> None:
    """Stop and delete the clusters of processes that died without stopping theirs (a
    test run killed with SIGKILL): those whose owner's pid is gone. Other processes'
    clusters, and folders without an owner yet, are left alone."""
    for owner in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*", OWNER)):
        root = Path(owner).parent
        try:
            pid = int(Path(owner).read_text(encoding="ascii"))
            os.kill(pid, 0)
        except ProcessLookupError:
            pass  # its process is gone
        except (OSError, ValueError):
            continue  # alive (another user's), or not ours to judge
        else:
            continue  # alive
        if (root / "data" / "postmaster.pid").exists():
            stop = ["-D", str(root / "data"), "-m", "immediate", "-w", "stop"]
            subprocess.run(  # noqa: S603  # our own command line
                [*prefix, str(bindir / "pg_ctl"), *stop],
                cwd=tempfile.gettempdir(),
                capture_output=True,
                check=False,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


class PostgresServer:
    """A throwaway PostgreSQL cluster: :meth:`start` it, make databases with
    :meth:`new_database`, :meth:`stop` it (it is deleted).

    Args:
        max_connections: the server's ``max_connections``.

    Raises:
        PostgresUnavailable: PostgreSQL's binaries are missing.
    """

    def __init__(self, *, max_connections: int = 200) -> None:
        self.bindir = find_bindir()
        self._max_connections = max_connections
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            self._prefix = ["runuser", "-u", "nobody", "--"]
        _reap_stale_clusters(self.bindir, self._prefix)
        # A short path: a Unix socket's path is limited to about 100 bytes.
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX))
        """The cluster's folder (its socket is there)."""
        self.data = self.root / "data"
        """The cluster's data directory."""
        self._started = False
        self._names = itertools.count(1)
        (self.root / OWNER).write_text(str(os.getpid()), encoding="ascii")
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)

    def __repr__(self) -> str:
        return f"PostgresServer(root={str(self.root)!r}, started={self._started})"

    def start(self) -> None:
        """``initdb``, configure (socket only, no fsync) and start the server.

        Raises:
            PostgresUnavailable: a command failed (the folder is deleted).
        """
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
                    f"max_connections = {self._max_connections}\n"
                )
            self.on_configured()
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

    def on_configured(self) -> None:
        """Called after ``initdb`` and the configuration, before the server starts: a
        subclass may edit ``data / "pg_hba.conf"`` here. Does nothing."""
        return

    def stop(self) -> None:
        """Stop the server at once (no checkpoint: it is thrown away) and delete it all.
        Idempotent."""
        try:
            if self._started and self.root.exists():  # (a later run may have reaped it)
                self._started = False
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres", user: str = ADMIN, password: str = "") -> str:
        """A DSN for ``database`` over the server's socket."""
        secret = f":{quote(password, safe='')}" if password else ""
        return f"postgresql://{user}{secret}@/{database}?host={self.root}"

    async def new_database(self, owner: str = ADMIN) -> str:
        """Create a new empty database owned by ``owner``; returns its DSN (as the
        superuser)."""
        import asyncpg  # type: ignore[import-untyped]  # no type hints

        name = f"test_{os.getpid()}_{next(self._names)}"
        conn = await asyncpg.connect(self.dsn())
        try:
            await conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        finally:
            await conn.close()
        return self.dsn(name)

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._prefix, str(self.bindir / tool), *args]
        done = subprocess.run(  # noqa: S603  # our own command line
            command, cwd=self.root, capture_output=True, text=True, check=False, timeout=120
        )
        if done.returncode != 0:
            log = self.root / "server.log"
            server_log = log.read_text(errors="replace") if log.exists() else ""
            raise PostgresUnavailable(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                f"\n{server_log}"
            )
