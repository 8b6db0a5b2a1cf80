"""The examples of the README run against the emulator, so they cannot rot."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from parall_bridge import GatewayConfig, StepType
from parall_bridge.testing import AgentAccount, FakeParallServer

from .conftest import library_tasks

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REPO = EXAMPLES.parent
FROM_THE_CHECKOUT = "from the repository root"
"""What the README says of a ``run`` command that needs a checkout (``examples/``)."""
INSTALLED = "from anywhere, package installed"
"""What the README says of a ``run`` command that needs only the installed package."""


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def run_example(
    module: ModuleType,
    server: FakeParallServer,
    agent: AgentAccount,
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
) -> asyncio.Task[None]:
    monkeypatch.chdir(workdir)  # where an example keeps its state file
    monkeypatch.setenv("PRLL_API_URL", server.url)
    monkeypatch.setenv("PRLL_API_KEY", agent.api_key)
    monkeypatch.setenv("PRLL_ORG_ID", server.org_id)
    assert GatewayConfig.from_env().org_id == server.org_id
    return asyncio.get_running_loop().create_task(module.main())


def test_the_readme_shows_the_echo_host_as_it_is() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    block = readme.split("This is `examples/echo_host.py`:\n\n```python\n", 1)[1]
    shown = block.split("```", 1)[0]
    source = (EXAMPLES / "echo_host.py").read_text()
    assert source.endswith(shown)


@pytest.mark.asyncio
async def test_echo_host_replies_and_stops_on_sigint(
    server: FakeParallServer,
    agent: AgentAccount,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    module = load("echo_host")
    task = await run_example(module, server, agent, monkeypatch, tmp_path)
    server.post_message(chat.id, ada.id, "ping")
    await server.wait_for(
        lambda: any(m.sender_id == agent.user_id for m in server.messages(chat.id)), timeout=10
    )
    reply = next(m for m in server.messages(chat.id) if m.sender_id == agent.user_id)
    assert reply.content.text == "You said: ping"  # type: ignore[union-attr]
    await server.wait_for(lambda: not server.dispatch_items(agent.user_id))
    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the example's handler sets abort
    await asyncio.wait_for(task, 15)
    assert library_tasks() == set()
    steps = [s.step_type for s in server.steps(agent.user_id)]
    assert steps == [StepType.INPUT, StepType.THINKING, StepType.TEXT]
    assert (tmp_path / "echo_host.db").is_file()  # its state, for the next start


@pytest.mark.asyncio
async def test_echo_host_run_as_a_script_says_it_connected(
    server: FakeParallServer, agent: AgentAccount, tmp_path: Path
) -> None:
    """``python examples/echo_host.py`` logs at INFO on stderr, as the README says: a
    line once connected, one when stopped."""
    env = {
        **os.environ,
        "PRLL_API_URL": server.url,
        "PRLL_API_KEY": agent.api_key,
        "PRLL_ORG_ID": server.org_id,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "echo_host.py"),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []
    try:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            while not lines or not lines[-1].startswith("INFO:parall_bridge.gateway:connected;"):
                line = await process.stderr.readline()
                assert line, f"stderr ended: {lines}"
                lines.append(line.decode().rstrip())
        process.send_signal(signal.SIGINT)
        _, rest = await asyncio.wait_for(process.communicate(), 15)
        assert process.returncode == 0, lines
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert lines[-1] == "INFO:parall_bridge.gateway:connected; 0 chat(s) cached"  # none yet
    assert "INFO:parall_bridge.gateway:gateway stopped" in (rest or b"").decode().splitlines()


@pytest.mark.asyncio
async def test_streaming_host_records_the_stream_as_steps(
    server: FakeParallServer,
    agent: AgentAccount,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    module = load("streaming_host")
    task = await run_example(module, server, agent, monkeypatch, tmp_path)
    server.post_message(chat.id, ada.id, "weather?")
    await server.wait_for(lambda: len(server.steps(agent.user_id)) == 5, timeout=10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    steps = server.steps(agent.user_id)
    assert [s.step_type for s in steps] == ["input", "thinking", "tool_call", "tool_result", "text"]
    assert steps[1].content == {"text": "Looking up the weather."}
    assert steps[4].content == {"text": "Told them: sunny.", "suppressed": True}
    assert library_tasks() == set()


def readme_run_command(where: str) -> list[str]:
    """The README's ``python -m parall_bridge run`` command whose comment says ``where``,
    as arguments (``python`` replaced by this interpreter)."""
    readme = (REPO / "README.md").read_text()
    for line in readme.splitlines():
        command, _, comment = line.partition("#")
        if command.startswith("python -m parall_bridge run ") and where in comment:
            return [sys.executable, *shlex.split(command)[1:]]
    raise AssertionError(f"the README shows no run command {where!r}")


def test_examples_import_from_the_repository_root_only(tmp_path: Path) -> None:
    """What the README says of ``examples.echo_host``: elsewhere it cannot be imported
    (it is not in the package), and ``run`` says so."""
    env = {
        **os.environ,
        "PRLL_API_URL": "http://127.0.0.1:9",
        "PRLL_API_KEY": "pk_unused_0123456789",
        "PRLL_ORG_ID": "org_x",
    }
    env.pop("PYTHONPATH", None)
    done = subprocess.run(  # noqa: S603 (our own interpreter and the README's arguments)
        readme_run_command(FROM_THE_CHECKOUT),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "configuration error: cannot import 'examples.echo_host': No module named 'examples'"
        f" (run imports from {tmp_path} and the installed packages)\n"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("where", "in_checkout", "reply"),
    [(FROM_THE_CHECKOUT, True, "You said: hello"), (INSTALLED, False, "Done: hello")],
)
async def test_the_readme_run_commands_serve_a_human(
    where: str,
    in_checkout: bool,
    reply: str,
    server: FakeParallServer,
    agent: AgentAccount,
    tmp_path: Path,
) -> None:
    """Each ``run`` command of the README, as shown, where it says it works: the agent
    answers a human, and Ctrl-C stops it."""
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    env = {
        **os.environ,
        "PRLL_API_URL": server.url,
        "PRLL_API_KEY": agent.api_key,
        "PRLL_ORG_ID": server.org_id,
        "PRLL_STATE_PATH": str(tmp_path / "state.db"),  # not in the checkout
    }
    env.pop("PYTHONPATH", None)
    process = await asyncio.create_subprocess_exec(
        *readme_run_command(where),
        cwd=REPO if in_checkout else tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await server.wait_for(lambda: any(c.ticket_ok for c in server.ws_connections), 15)
        server.post_message(chat.id, ada.id, "hello")
        await server.wait_for(
            lambda: any(m.sender_id == agent.user_id for m in server.messages(chat.id)), 15
        )
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 15)
        assert process.returncode == 0, err.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    answer = next(m for m in server.messages(chat.id) if m.sender_id == agent.user_id)
    assert answer.content.text == reply  # type: ignore[union-attr]
