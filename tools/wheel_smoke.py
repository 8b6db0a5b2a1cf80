"""Package smoke test: what a user gets from ``pip install parall-bridge``.

Builds the sdist and a wheel from it (``python -m build``), checks that the sdist holds
the whole project (every file git tracks under the project's roots: tests, docs,
examples, benchmarks, LICENSE, CHANGELOG...), installs the wheel with its base
dependencies only (no extras) in a fresh venv, and runs the installed command line from
a directory outside the checkout: ``--help``, ``emulator --help``, the emulator itself,
``check`` against it, and the README's command for an installed package
(``run parall_bridge.demo:DemoRuntime``) answering a human.

``make wheel-smoke`` runs it (``make test`` too) with the dev venv's Python, which has
``build``. Every package comes from pip's configured index and cache, so it needs no
other network. Exit status 0 when all passed, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import venv
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Final

REPO: Final = Path(__file__).resolve().parents[1]
SDIST_ROOTS: Final = (
    ".ci/",
    "benchmarks/",
    "docs/",
    "examples/",
    "parall_bridge/",
    "tests/",
    "tools/",
    "CHANGELOG.md",
    "LICENSE",
    "MANIFEST.in",
    "Makefile",
    "README.md",
    "mkdocs.yml",
    "pyproject.toml",
)
"""What the sdist must hold: every tracked file under these roots."""
INSTALLED_RUN: Final = "from anywhere, package installed"
"""The comment of the README's ``run`` command for an installed package."""
STEP_TIMEOUT: Final = 120.0
"""Seconds a build or install may take."""
WAIT_TIMEOUT: Final = 30.0
"""Seconds to wait for a process to say something, or for the agent's reply."""
POLL_INTERVAL: Final = 0.1
"""How often the agent's reply is looked for."""


class SmokeError(Exception):
    """A check failed; the message says which and what was seen."""


def say(text: str) -> None:
    """Report progress."""
    print(f"wheel-smoke: {text}", flush=True)


def run(command: Sequence[str | Path], *, cwd: Path, env: Mapping[str, str] | None = None) -> str:
    """Run a command to its end; return its output (stdout and stderr), or raise with it."""
    done = subprocess.run(  # noqa: S603 (our own interpreters and arguments)
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise SmokeError(f"{shlex.join(map(str, command))} exited {done.returncode}:\n{output}")
    return output


class Lines:
    """A running process whose output lines are read by a thread, to wait on with a timeout."""

    def __init__(self, process: subprocess.Popen[str], stream: IO[str]) -> None:
        self.process = process
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def until(self, pattern: str, timeout: float = WAIT_TIMEOUT) -> str:
        """The first line (from now on) matching ``pattern``; raise if none comes in time."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SmokeError(
                    f"no line matching {pattern!r} in {timeout:g} s: {self.seen}"
                ) from None
            if line is None:
                raise SmokeError(f"output ended without {pattern!r}: {self.seen}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def stop(self) -> int:
        """SIGINT (Ctrl-C), then the exit status."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=WAIT_TIMEOUT)


@contextmanager
def started(
    command: Sequence[str | Path], *, cwd: Path, env: Mapping[str, str], stderr: bool = False
) -> Iterator[Lines]:
    """Start a process, read its stdout (or its stderr), and kill it if it is left running."""
    process = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
        [str(part) for part in command],
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.DEVNULL if stderr else subprocess.PIPE,
        stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
        text=True,
    )
    stream = process.stderr if stderr else process.stdout
    assert stream is not None
    try:
        yield Lines(process, stream)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


IGNORED_WITHOUT_GIT: Final = shutil.ignore_patterns(
    ".git", ".venv", "*.egg-info", "build", "dist", "site", "__pycache__", ".*_cache"
)
"""What a copy of the tree leaves out when git cannot say what is ignored."""


def project_files() -> list[str] | None:
    """The project's files as git sees them (tracked, or new and not ignored), or ``None``
    outside a git checkout."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        return None
    command = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    return [name for name in run(command, cwd=REPO).splitlines() if (REPO / name).is_file()]


def copy_tree(files: list[str] | None, target: Path) -> None:
    """Copy the project to ``target``: what git lists, else the tree without what a
    build or a venv leaves. The build then runs on that copy, so nothing left in the
    checkout (a stale ``*.egg-info`` whose file list setuptools would reuse) can hide a
    file missing from the sdist, and the checkout is not written to."""
    if files is None:
        shutil.copytree(REPO, target, ignore=IGNORED_WITHOUT_GIT)
        return
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)


def check_sdist(sdist: Path, files: list[str] | None) -> None:
    """The sdist holds every project file under :data:`SDIST_ROOTS`."""
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = [name for name in files or () if name.startswith(SDIST_ROOTS)]
    missing = sorted(set(expected) - names)
    if missing:
        raise SmokeError(f"the sdist lacks {len(missing)} file(s): {missing[:20]}")
    for root in SDIST_ROOTS:
        if not any(name == root or name.startswith(root) for name in names):
            raise SmokeError(f"the sdist has nothing of {root}")
    say(f"the sdist holds the project ({len(names)} files, {len(expected)} checked by name)")


def readme_installed_run() -> list[str]:
    """The README's ``run`` command for an installed package, as arguments after ``python``."""
    for line in (REPO / "README.md").read_text().splitlines():
        command, _, comment = line.partition("#")
        if command.startswith("python -m parall_bridge run ") and INSTALLED_RUN in comment:
            return shlex.split(command)[1:]
    raise SmokeError(f"the README shows no run command {INSTALLED_RUN!r}")


def http_json(url: str, key: str, body: object | None = None) -> object:
    """A JSON request with a bearer key (POST when there is a body)."""
    request = urllib.request.Request(  # noqa: S310 (the emulator's http URL)
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=WAIT_TIMEOUT) as response:  # noqa: S310
        return json.loads(response.read())


def smoke_installed(python: Path, work: Path) -> None:
    """Run the installed command line from ``work`` (outside the checkout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRLL_", "PYTHONPATH"))}
    where = run([python, "-c", "import parall_bridge; print(parall_bridge.__file__)"], cwd=work)
    if not Path(where.strip()).is_relative_to(python.parents[1]):
        raise SmokeError(f"parall_bridge was imported from {where.strip()}, not the venv")
    if "emulator" not in run([python, "-m", "parall_bridge", "--help"], cwd=work, env=env):
        raise SmokeError("--help does not list the emulator command")
    emulator_help = run([python, "-m", "parall_bridge", "emulator", "--help"], cwd=work, env=env)
    if "--port 0" not in emulator_help:
        raise SmokeError(f"emulator --help does not tell of --port 0:\n{emulator_help}")
    say("the installed package imports from the venv; --help and emulator --help answer")

    emulator_command: list[str | Path] = [python, "-m", "parall_bridge", "emulator", "--port", "0"]
    with started(emulator_command, cwd=work, env=env) as emulator:
        emulator.until(r"^Ctrl-C")
        settings = dict(
            line.strip().split("=", 1) for line in emulator.seen if line.strip().startswith("PRLL_")
        )
        curl = next(line for line in emulator.seen if line.strip().startswith("curl "))
        send_url = curl.split()[4]
        human_key = curl.split("Bearer ")[1].split("'")[0]
        agent_env = {**env, **settings}

        checked = run([python, "-m", "parall_bridge", "check"], cwd=work, env=agent_env)
        if [line[:4] for line in checked.splitlines()] != ["ok  "] * 4:
            raise SmokeError(f"check against the emulator did not pass:\n{checked}")
        say("check passes against the installed emulator")

        state = {**agent_env, "PRLL_STATE_PATH": str(work / "state.db")}
        command: list[str | Path] = [python, *readme_installed_run()]
        with started(command, cwd=work, env=state, stderr=True) as gw:
            gw.until(r"parall_bridge\.gateway: connected;")
            http_json(send_url, human_key, {"message_type": "text", "content": {"text": "hi"}})
            deadline = time.monotonic() + WAIT_TIMEOUT
            while True:
                page = http_json(send_url, human_key)
                assert isinstance(page, dict)
                newest = page["data"][0]
                if newest["content"].get("text") == "Done: hi":
                    break
                if time.monotonic() > deadline:
                    raise SmokeError(f"no reply from the agent in {WAIT_TIMEOUT:g} s: {newest}")
                time.sleep(POLL_INTERVAL)
            if (status := gw.stop()) != 0:
                raise SmokeError(f"run exited {status} after SIGINT: {gw.seen}")
        say(f"the README's `python {shlex.join(readme_installed_run())}` answers a human")
        if (status := emulator.stop()) != 0:
            raise SmokeError(f"the emulator exited {status} after SIGINT")


def main() -> int:
    """Build, check the sdist, install the wheel in a fresh venv, smoke-run it."""
    started_at = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="parall-wheel-smoke-") as name:
        tmp = Path(name)
        try:
            files = project_files()
            copy_tree(files, tmp / "tree")
            run([sys.executable, "-m", "build", "--outdir", tmp / "dist", tmp / "tree"], cwd=tmp)
            [sdist] = (tmp / "dist").glob("*.tar.gz")
            [wheel] = (tmp / "dist").glob("*.whl")
            say(f"built {sdist.name} from a copy of the tree and, from the sdist, {wheel.name}")
            check_sdist(sdist, files)
            venv.create(tmp / "venv", with_pip=False)
            python = tmp / "venv" / "bin" / "python"
            pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", python, "install"]
            run([*pip, "--quiet", wheel], cwd=tmp)  # the base package only: no extras
            say("installed the wheel and its base dependencies in a fresh venv")
            (tmp / "work").mkdir()
            smoke_installed(python, tmp / "work")
        except (SmokeError, subprocess.TimeoutExpired) as exc:
            say(f"FAILED: {exc}")
            return 1
    say(f"passed in {time.monotonic() - started_at:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
