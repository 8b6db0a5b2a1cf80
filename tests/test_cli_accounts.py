"""``run --accounts FILE``: the accounts file, the runtime factory, and a fleet run from
the command line against the emulator."""

from __future__ import annotations

import asyncio
import gc
import textwrap
from pathlib import Path

import pytest

from parall_bridge import ConfigurationError, GatewayConfig
from parall_bridge.cli import load_runtime_factory, main, run_fleet
from parall_bridge.gateway.accounts import load_accounts
from parall_bridge.models import User
from parall_bridge.state import PostgresStateStore
from parall_bridge.testing import FakeParallServer

from .conftest import library_tasks
from .gateway._harness import ScriptedRuntime

URL = "https://api.parall.example"
ENV = {
    "PRLL_API_URL": URL,
    "PRLL_ORG_ID": "org_1",
    "SUPPORT_KEY": "pk_support_secret",
    "SALES_KEY": "pk_sales_secret",
    "SALES_ORG": "org_2",
}


def write(tmp_path: Path, text: str, name: str = "accounts.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


class FleetRuntime(ScriptedRuntime):
    """A runtime class that ``load_runtime_factory`` can find by name."""


MADE: list[FleetRuntime] = []


def make_runtime() -> FleetRuntime:
    MADE.append(FleetRuntime())
    return MADE[-1]


INSTANCE = FleetRuntime()


def the_instance() -> FleetRuntime:
    """A factory of one shared runtime: fine for ``run``, not for a fleet."""
    return INSTANCE


def test_an_accounts_file_gives_one_config_per_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [support]
        api_key_env = "SUPPORT_KEY"
        state_path = "state/support.db"

        [sales]
        api_key_env = "SALES_KEY"
        org_id_env = "SALES_ORG"
        shutdown_grace = 20.0
        """,
    )
    support, sales = load_accounts(path, ENV)
    assert support == GatewayConfig(
        URL, "pk_support_secret", "org_1", account_id="support", state_path="state/support.db"
    )
    assert sales == GatewayConfig(
        URL, "pk_sales_secret", "org_2", account_id="sales", shutdown_grace=20.0
    )


def test_a_setting_from_a_variable_has_the_setting_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [support]
        api_key_env = "SUPPORT_KEY"
        shutdown_grace_env = "GRACE"
        max_forks_env = "FORKS"
        verify_tls_env = "VERIFY"
        """,
    )
    env = {**ENV, "GRACE": "2.5", "FORKS": "0", "VERIFY": "false"}
    (support,) = load_accounts(path, env)
    assert (support.shutdown_grace, support.max_forks, support.verify_tls) == (2.5, 0, False)
    for name, value, message in [
        ("GRACE", "soon", "GRACE \\(shutdown_grace\\) must be a number"),
        ("FORKS", "1.5", "FORKS \\(max_forks\\) must be an integer"),
        ("VERIFY", "maybe", "VERIFY \\(verify_tls\\) must be true or false"),
    ]:
        with pytest.raises(ConfigurationError, match=message) as refused:
            load_accounts(path, {**env, name: value})
        assert value not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[a]\napi_key = "pk_inline_secret"\n', "never write an API key in the file"),
        ('[a]\norg_id = "o"\n', "api_key_env is missing"),
        ('[a]\napi_key_env = "SUPPORT_KEY"\ncolour = "blue"\n', "unknown setting 'colour'"),
        ('[a]\napi_key_env = "SUPPORT_KEY"\naccount_id = "b"\n', "the table's name is"),
        (
            '[a]\napi_key_env = "SUPPORT_KEY"\norg_id = "o"\norg_id_env = "SALES_ORG"\n',
            "org_id and org_id_env both given",
        ),
        ('[a]\napi_key_env = "NOPE"\n', "environment variable NOPE \\(api_key\\) is missing"),
        # The key itself where its variable's name goes: said, never shown.
        ('[a]\napi_key_env = "pk_live_secret-Xy1"\n', "api_key_env names no variable that is set"),
        ('[a]\napi_key_env = "SUPPORT_KEY"\nmax_forks = -1\n', "account 'a': max_forks"),
        ("[a]\napi_key_env = 3\n", "api_key_env must name an environment variable"),
        ("a = 1\n", "'a' is not a table"),
        ("[a\n", "not a TOML file"),
        ("", "no account"),
    ],
)
def test_an_accounts_file_is_checked(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError, match=message) as refused:
        load_accounts(path, ENV)
    assert "secret" not in str(refused.value)
    assert str(path) in str(refused.value)


def test_a_missing_accounts_file_is_said(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read it"):
        load_accounts(tmp_path / "none.toml", ENV)


def test_a_fleet_needs_a_runtime_class_or_factory() -> None:
    factory = load_runtime_factory(f"{__name__}:FleetRuntime")
    config = GatewayConfig(URL, "k", "o")
    first, second = factory(config), factory(config)
    assert isinstance(first, FleetRuntime)
    assert first is not second
    with pytest.raises(ConfigurationError, match="is an instance"):
        load_runtime_factory(f"{__name__}:INSTANCE")
    with pytest.raises(ConfigurationError, match="gives the same runtime each time"):
        load_runtime_factory(f"{__name__}:the_instance")
    with pytest.raises(ConfigurationError, match="has no 'Missing'"):
        load_runtime_factory(f"{__name__}:Missing")


def test_run_accounts_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = write(tmp_path, '[a]\napi_key_env = "SUPPORT_KEY"\n')
    assert main(["run", f"{__name__}:FleetRuntime", "--accounts", str(path), "--state", "x"]) == 2
    assert "with --accounts, give state_path" in capsys.readouterr().err
    bad = write(tmp_path, '[a]\napi_key = "pk_inline_secret"\n', "bad.toml")
    assert main(["run", f"{__name__}:FleetRuntime", "--accounts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "never write an API key" in err
    assert "pk_inline_secret" not in err
    assert main(["run", f"{__name__}:INSTANCE", "--accounts", str(path)]) == 2
    assert "is an instance" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_run_fleet_runs_the_accounts_of_a_file_until_stopped(
    server: FakeParallServer, ada: User, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = library_tasks()
    support, sales, gone = (server.add_agent(name) for name in ("Support", "Sales", "Gone"))
    env = {
        "PRLL_API_URL": server.url,
        "PRLL_ORG_ID": server.org_id,
        "SUPPORT_KEY": support.api_key,
        "SALES_KEY": sales.api_key,
        "GONE_KEY": gone.api_key,
    }
    path = write(
        tmp_path,
        """
        [support]
        api_key_env = "SUPPORT_KEY"
        state_path = "support.db"

        [sales]
        api_key_env = "SALES_KEY"

        [gone]
        api_key_env = "GONE_KEY"
        """,
    )
    server.revoke_key(gone.api_key)
    configs = load_accounts(path, env)
    factory = load_runtime_factory(f"{__name__}:make_runtime")
    MADE.clear()  # made once to check the spec
    stop = asyncio.Event()
    lines: list[str] = []
    task = asyncio.get_running_loop().create_task(
        run_fleet(configs, factory, stop=stop, out=lines.append), name="test-run-fleet"
    )
    try:
        chats = [
            server.add_chat(type="direct", members=[ada.id, agent.user_id])
            for agent in (support, sales)
        ]
        await server.wait_for(lambda: len(server.ws_connections) == 2)
        for chat in chats:
            server.post_message(chat.id, ada.id, "hello")
        await server.wait_for(
            lambda: all(
                server.dispatch_count(agent.user_id, acked=True) == 1 for agent in (support, sales)
            )
        )
        # The revoked key was refused (on a loaded machine, maybe only now).
        await server.wait_for(lambda: any(r.status == 401 for r in server.requests))
    finally:
        stop.set()
        status = await asyncio.wait_for(task, 30.0)
    assert status == 1  # an account stopped for an error
    assert lines[:3] == [
        "account support: state support.db",
        "account sales: state .parall_bridge/sales.db",
        "account gone: state .parall_bridge/gone.db",
    ]
    (stopped,) = lines[3:]
    assert stopped.startswith("account gone stopped: AuthenticationError")
    assert gone.api_key not in stopped
    assert (tmp_path / "support.db").is_file()
    assert (tmp_path / ".parall_bridge/sales.db").is_file()
    assert sorted(len(r.turns) for r in MADE) == [0, 1, 1]
    assert library_tasks(before) == set()


@pytest.mark.asyncio
@pytest.mark.parametrize("freeze_gc", [True, False])
async def test_run_fleet_freezes_the_collector_once_ready_and_unfreezes_at_the_end(
    server: FakeParallServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    freeze_gc: bool,
) -> None:
    monkeypatch.chdir(tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    agent = server.add_agent("Support")
    configs = [
        GatewayConfig(server.url, agent.api_key, server.org_id, account_id="support"),
    ]
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        run_fleet(
            configs,
            lambda _config: FleetRuntime(),
            stop=stop,
            out=lambda _: None,
            durable=False,
            freeze_gc=freeze_gc,
        ),
        name="test-run-fleet-gc",
    )
    try:
        await server.wait_for(lambda: len(server.ws_connections) == 1)
        if freeze_gc:
            await server.wait_for(lambda: calls == ["freeze"])  # once the account is ready
    finally:
        stop.set()
        status = await asyncio.wait_for(task, 30.0)
    assert status == 0
    assert calls == (["freeze", "unfreeze"] if freeze_gc else [])


def test_store_and_capacity_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PRLL_STORE_DSN", raising=False)
    path = write(tmp_path, '[a]\napi_key_env = "SUPPORT_KEY"\n')
    runtime = f"{__name__}:FleetRuntime"
    assert main(["run", runtime, "--store", "postgresql://u:pw-secret@/db"]) == 2
    assert "--store and --capacity are for a fleet" in capsys.readouterr().err
    assert main(["run", runtime, "--accounts", str(path), "--capacity", "2"]) == 2
    assert "--capacity needs a shared store" in capsys.readouterr().err
    monkeypatch.setenv("PRLL_STORE_DSN", "postgresql://u:pw-secret@/db")
    assert main(["run", runtime, "--accounts", str(path), "--no-state"]) == 2
    err = capsys.readouterr().err
    assert "--no-state and a shared store contradict" in err
    assert "pw-secret" not in err
    with pytest.raises(SystemExit):
        main(["run", runtime, "--accounts", str(path), "--capacity", "0"])
    assert "must be a whole number above 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "PRLL_STORE_DSN" in out
    assert "--store DSN" in out


@pytest.mark.asyncio
async def test_run_fleet_on_a_shared_store_keeps_no_state_file(
    server: FakeParallServer,
    ada: User,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgres_dsn: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    support = server.add_agent("Support")
    path = write(tmp_path, '[support]\napi_key_env = "SUPPORT_KEY"\nstate_path = "support.db"\n')
    env = {"PRLL_API_URL": server.url, "PRLL_ORG_ID": server.org_id}
    configs = load_accounts(path, env | {"SUPPORT_KEY": support.api_key})
    factory = load_runtime_factory(f"{__name__}:make_runtime")
    MADE.clear()
    stop = asyncio.Event()
    lines: list[str] = []
    store = PostgresStateStore(postgres_dsn)
    task = asyncio.get_running_loop().create_task(
        run_fleet(configs, factory, stop=stop, out=lines.append, store=store, capacity=5),
        name="test-run-fleet-store",
    )
    try:
        chat = server.add_chat(type="direct", members=[ada.id, support.user_id])
        await server.wait_for(lambda: len(server.ws_connections) == 1, timeout=15.0)
        server.post_message(chat.id, ada.id, "hello")
        await server.wait_for(lambda: server.dispatch_count(support.user_id, acked=True) == 1)
    finally:
        stop.set()
        status = await asyncio.wait_for(task, 30.0)
    assert status == 0
    assert lines == [
        f"1 account(s): state in {store.description}, each run by the process holding its lease"
    ]
    assert not (tmp_path / "support.db").exists()
    assert not (tmp_path / ".parall_bridge").exists()


@pytest.mark.asyncio
async def test_run_fleet_says_when_the_store_cannot_be_opened(
    postgres_dsn: str, tmp_path: Path
) -> None:
    configs = [GatewayConfig(URL, "pk_x", "org_1", account_id="a")]
    lines: list[str] = []
    nowhere = PostgresStateStore(postgres_dsn.replace("host=", "host=/nonexistent"), op_timeout=2)
    factory = load_runtime_factory(f"{__name__}:make_runtime")
    status = await run_fleet(
        configs, factory, stop=asyncio.Event(), out=lines.append, store=nowhere
    )
    assert status == 1
    (line,) = lines[1:]
    assert line.startswith("the shared store failed: state store postgresql://")
