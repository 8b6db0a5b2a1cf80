"""The examples of the README run against the emulator, so they cannot rot."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
from pathlib import Path
from types import ModuleType

import pytest

from parall_bridge import GatewayConfig, StepType
from parall_bridge.testing import AgentAccount, FakeParallServer

from .conftest import library_tasks

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
