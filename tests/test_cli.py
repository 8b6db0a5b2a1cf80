"""The command line: the demo end to end (a smoke test, so it cannot rot), ``check`` and
``run`` against the emulator, and their usage errors."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import aiohttp
import pytest

from parall_bridge import ConfigurationError, GatewayConfig, ParallClient
from parall_bridge.cli import check, load_runtime, main, run_gateway
from parall_bridge.models import Chat, User
from parall_bridge.runtime import Turn
from parall_bridge.testing import AgentAccount, FakeParallServer

from .conftest import library_tasks
from .gateway._harness import ScriptedRuntime, make_config


def test_demo_runs_the_gateway_and_traces_what_happened(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "ready  gateway connected" in out
    routes = [line.split("-> ")[-1] for line in out.splitlines() if "  route  " in line]
    assert routes.count("main") == 1
    assert routes.count("new_fork") == 2  # the group mention and the task ran on forks
    assert routes.count("buffer_main") == 3  # the burst waited for main...
    assert "3 event(s)" in out  # ...and coalesced into one turn
    assert "fork fork-1 released: 1 handled" in out
    assert "for _orchestrator" in out  # the synthetic wake-up delivering fork results
    assert "  ack    " in out
    assert "pending dispatch items left: 0" in out
    assert ": completed" in out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2


# --- check -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_check_reports_each_part_of_a_working_configuration(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat
) -> None:
    server.post_message(room.id, ada.id, "waiting")
    lines: list[str] = []
    assert await check(make_config(server, agent, agent_id=agent.user_id), lines.append) == 0
    assert lines == [
        f"ok    agent: Bot ({agent.user_id}) in {server.org_id}",
        "ok    platform config: version 1",
        "ok    dispatch queue: 1 pending item(s)",
        f"ok    WebSocket: hello received (session {server.ws_connections[0].session_id})",
    ]
    assert [r.method for r in server.requests if r.method != "GET"] == ["POST"]  # the ticket
    assert server.dispatch_items(agent.user_id)  # nothing acked


@pytest.mark.asyncio
async def test_check_fails_on_a_bad_key_without_showing_it(server: FakeParallServer) -> None:
    lines: list[str] = []
    config = GatewayConfig(server.url, "pk_wrong_secret_0123456789", server.org_id)
    assert await check(config, lines.append) == 1
    assert len(lines) == 1
    assert lines[0].startswith("FAIL  agent: AuthenticationError")
    assert "pk_wrong_secret_0123456789" not in lines[0]


@pytest.mark.asyncio
async def test_check_fails_on_a_wrong_agent_id_and_a_refused_websocket(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    server.refuse_ws(1, status=503)
    lines: list[str] = []
    assert await check(make_config(server, agent, agent_id="usr_other"), lines.append) == 1
    assert lines[0] == f"FAIL  agent: the key is {agent.user_id}'s, PRLL_AGENT_ID is usr_other"
    assert lines[-1].startswith("FAIL  WebSocket: ")
    assert not library_tasks()


def test_check_against_a_closed_port_fails_at_once_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing is retried: a refused connection fails the first check in well under a
    second (the client's default retries took 5.7 s), in one line, with exit status 1."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound and never listening: connections are refused
        monkeypatch.setenv("PRLL_API_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        monkeypatch.setenv("PRLL_API_KEY", "pk_unused_0123456789")
        monkeypatch.setenv("PRLL_ORG_ID", "org_x")
        started = time.monotonic()
        assert main(["check"]) == 1
        elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert out.startswith("FAIL  agent: ParallConnectionError: "), out
    assert out.count("\n") == 1, out
    assert "pk_unused_0123456789" not in out + err
    assert elapsed < 1.0


def test_check_help_lists_the_variables_it_reads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  PRLL_")}
    assert listed == {"PRLL_API_URL", "PRLL_API_KEY", "PRLL_ORG_ID", "PRLL_WS_URL", "PRLL_AGENT_ID"}


# --- run ---------------------------------------------------------------------------------------


class NamedRuntime(ScriptedRuntime):
    """A runtime class that ``load_runtime`` can find by name."""


def make_runtime() -> NamedRuntime:
    return NamedRuntime()


INSTANCE = NamedRuntime()
NOT_A_RUNTIME = 42


def needs_an_argument(text: str) -> NamedRuntime:
    return NamedRuntime()


async def async_factory() -> NamedRuntime:
    return NamedRuntime()


def test_load_runtime_takes_a_class_an_instance_or_a_factory() -> None:
    assert isinstance(load_runtime(f"{__name__}:NamedRuntime"), NamedRuntime)
    assert load_runtime(f"{__name__}:INSTANCE") is INSTANCE
    assert isinstance(load_runtime(f"{__name__}:make_runtime"), NamedRuntime)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must be 'module:name'"),
        ("no_such_module_anywhere:X", "cannot import 'no_such_module_anywhere'"),
        (f"{__name__}:Missing", "has no 'Missing'"),
        (f"{__name__}:NOT_A_RUNTIME", "is not an AgentRuntime"),
        (f"{__name__}:needs_an_argument", r"needs_an_argument\(\) failed: TypeError"),
        (f"{__name__}:async_factory", "is an async function"),
    ],
)
def test_load_runtime_explains_a_bad_spec(spec: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_runtime(spec)


@pytest.mark.asyncio
async def test_run_gateway_runs_until_stopped(
    server: FakeParallServer,
    agent: AgentAccount,
    ada: User,
    room: Chat,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    runtime = ScriptedRuntime()
    stop = asyncio.Event()
    lines: list[str] = []
    task = asyncio.get_running_loop().create_task(
        run_gateway(make_config(server, agent), runtime, stop=stop, out=lines.append)
    )
    try:
        await server.wait_for(lambda: bool(server.ws_connections))
        server.post_message(room.id, ada.id, "hello")
        await server.wait_for(lambda: len(runtime.finished) == 1)
        await server.wait_for(lambda: not server.dispatch_items(agent.user_id))
    finally:
        stop.set()
        status = await asyncio.wait_for(task, 30.0)
    assert status == 0
    # By default the state is kept in a file per agent, under ./.parall_bridge/.
    path = f".parall_bridge/{agent.user_id}.db"
    assert lines == [f"state: {path} (a restart resumes from it)"]
    assert (tmp_path / path).is_file()
    assert server.sessions(agent.user_id)[-1].status == "completed"


@pytest.mark.asyncio
async def test_run_gateway_keeps_the_state_where_told_or_in_memory(
    server: FakeParallServer,
    agent: AgentAccount,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for config, durable, expected in (
        (make_config(server, agent, state_path=str(tmp_path / "s.db")), True, "s.db"),
        (make_config(server, agent), False, None),
    ):
        stop = asyncio.Event()
        lines: list[str] = []
        connections = len(server.ws_connections)
        task = asyncio.get_running_loop().create_task(
            run_gateway(config, ScriptedRuntime(), stop=stop, out=lines.append, durable=durable)
        )
        await server.wait_for(partial(opened_since, server, connections))
        stop.set()
        assert await asyncio.wait_for(task, 30.0) == 0
        if expected:
            assert lines == [f"state: {tmp_path / expected} (a restart resumes from it)"]
        else:
            assert lines == ["state: in memory (--no-state: a restart forgets what was in flight)"]
    assert sorted(path.name for path in tmp_path.glob("*.db")) == ["s.db"]  # noqa: ASYNC240


def opened_since(server: FakeParallServer, count: int) -> bool:
    """Whether a WebSocket was opened since there were ``count``."""
    return len(server.ws_connections) > count


@pytest.mark.asyncio
async def test_run_gateway_refuses_a_state_file_in_use(
    server: FakeParallServer, agent: AgentAccount, tmp_path: Path
) -> None:
    """Two gateways never share one file: the second stops at start, naming it."""
    config = make_config(server, agent, state_path=str(tmp_path / "state.db"))
    stop = asyncio.Event()
    first = asyncio.get_running_loop().create_task(
        run_gateway(config, ScriptedRuntime(), stop=stop, out=list[str]().append)
    )
    try:
        await server.wait_for(lambda: bool(server.ws_connections))
        lines: list[str] = []
        assert await run_gateway(config, ScriptedRuntime(), stop=stop, out=lines.append) == 1
        assert lines[-1].startswith("gateway stopped: StateStoreError")
        assert str(tmp_path / "state.db") in lines[-1]
    finally:
        stop.set()
        assert await asyncio.wait_for(first, 30.0) == 0


@pytest.mark.asyncio
async def test_run_gateway_fails_on_a_bad_key(server: FakeParallServer) -> None:
    lines: list[str] = []
    config = GatewayConfig(server.url, "pk_wrong_secret_0123456789", server.org_id)
    assert await run_gateway(config, ScriptedRuntime(), stop=asyncio.Event(), out=lines.append) == 1
    assert lines == [lines[0]]
    assert lines[0].startswith("gateway stopped: AuthenticationError")


# --- main ---------------------------------------------------------------------------------------


def test_check_and_run_need_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("PRLL_API_URL", "PRLL_API_KEY", "PRLL_ORG_ID", "PRLL_WS_URL", "PRLL_AGENT_ID"):
        monkeypatch.delenv(name, raising=False)
    assert main(["check"]) == 2
    assert "PRLL_API_URL" in capsys.readouterr().err
    assert main(["run", f"{__name__}:NamedRuntime"]) == 2


def test_run_with_a_bad_runtime_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PRLL_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PRLL_API_KEY", "pk_unused_0123456789")
    monkeypatch.setenv("PRLL_ORG_ID", "org_x")
    assert main(["run", "no_colon", "--log-level", "warning"]) == 2
    err = capsys.readouterr().err
    assert "must be 'module:name'" in err
    assert "pk_unused_0123456789" not in err


@pytest.mark.asyncio
async def test_the_emulator_command_serves_and_tells_how_to_post_as_the_human() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "parall_bridge",
        "emulator",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(20):
            while not lines or not lines[-1].startswith("Ctrl-C"):
                lines.append((await process.stdout.readline()).decode().strip())
        env = dict(line.split("=", 1) for line in lines if line.startswith("PRLL_"))
        curl = next(line for line in lines if line.startswith("curl "))
        url = curl.split()[4]
        human_key = curl.split("Bearer ")[1].split("'")[0]
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {human_key}"}
            body = {"message_type": "text", "content": {"text": "hello"}}
            async with http.post(url, json=body, headers=headers) as response:
                assert response.status == 201
        async with ParallClient(env["PRLL_API_URL"], env["PRLL_API_KEY"]) as client:
            page = await client.get_dispatch(env["PRLL_ORG_ID"])
        assert len(page.data) == 1  # the agent has it to handle
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 20) == 0


def test_the_emulator_on_a_port_in_use_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["emulator", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"emulator: port {port} on 127.0.0.1 is already in use; choose another with"
        " --port PORT, or --port 0 for any free one\n"
    )


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_an_invalid_emulator_port_is_said_in_one_line(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["emulator", "--port", port]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"emulator: --port must be a whole number in 0..65535 (0: any free port), got {port!r}\n"
    )


def test_the_emulator_help_tells_of_port_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["emulator", "--help"])
    assert info.value.code == 0
    assert "--port 0 takes any free port" in " ".join(capsys.readouterr().out.split())


HOST = """
import asyncio

import attrs

from parall_bridge import AgentRuntime, Gateway

_init = Gateway.__init__


def _quick(self, config, runtime, **options):
    # The test's speed-up: a short grace, and the stubborn turn abandoned sooner.
    _init(self, attrs.evolve(config, shutdown_grace=0.1, cancel_grace=0.2), runtime, **options)


Gateway.__init__ = _quick


class Stubborn(AgentRuntime):
    async def run_turn(self, turn):
        print("TURN", flush=True)
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass
"""


@pytest.mark.asyncio
async def test_cli_run_exits_after_sigint_with_a_turn_that_ignores_cancellation(
    server: FakeParallServer, agent: AgentAccount, ada: User, room: Chat, tmp_path: Path
) -> None:
    """A host turn that ignores its cancellation: the first SIGINT stops the gateway and
    the process (the turn is abandoned after shutdown_grace and cancel_grace)."""
    (tmp_path / "stubborn_host.py").write_text(textwrap.dedent(HOST))
    env = {
        **os.environ,
        "PRLL_API_URL": server.url,
        "PRLL_API_KEY": agent.api_key,
        "PRLL_ORG_ID": server.org_id,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "parall_bridge",
        "run",
        "stubborn_host:Stubborn",
        "--log-level",
        "warning",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        await server.wait_for(lambda: any(c.ticket_ok for c in server.ws_connections), 15.0)
        server.post_message(room.id, ada.id, "hello")
        line = await asyncio.wait_for(proc.stdout.readline(), 15.0)
        assert line.startswith(b"state: .parall_bridge/")  # the default state file
        line = await asyncio.wait_for(proc.stdout.readline(), 15.0)
        assert line.strip() == b"TURN"
        proc.send_signal(signal.SIGINT)
        # shutdown_grace (0.1 s), then cancel_grace (0.2 s): the turn is abandoned and the
        # process exits, though the host's coroutine never ends.
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
        rest = await asyncio.wait_for(proc.stdout.read(), 5.0)
        assert b"abandoning 1 task(s) that ignore their cancellation" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


class PlainDefRunTurn(ScriptedRuntime):
    def run_turn(self, turn: Turn) -> str | None:  # type: ignore[override]
        return None


@pytest.mark.asyncio
async def test_run_gateway_refuses_a_run_turn_that_is_not_async(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    lines: list[str] = []
    status = await run_gateway(
        make_config(server, agent), PlainDefRunTurn(), stop=asyncio.Event(), out=lines.append
    )
    assert status == 2
    assert lines == [
        "configuration error: PlainDefRunTurn.run_turn must be a coroutine function (async def)"
    ]


def test_an_unknown_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "a:b", "--log-level", "loud"])
    assert info.value.code == 2
    assert "--log-level" in capsys.readouterr().err
