"""``GatewayConfig``: defaults, shape, validation, secrets, and ``from_env``
(DESIGN.md section 2)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from parall_bridge.errors import ConfigurationError
from parall_bridge.gateway.config import GatewayConfig

URL = "https://api.parall.test"
KEY = "pk_live_very_secret_key_42"
ORG = "org_1"

ENV = {"PRLL_API_URL": URL, "PRLL_API_KEY": KEY, "PRLL_ORG_ID": ORG}
ALL_VARIABLES = (
    "PRLL_API_URL",
    "PRLL_API_KEY",
    "PRLL_ORG_ID",
    "PRLL_WS_URL",
    "PRLL_AGENT_ID",
    "PRLL_STATE_PATH",
)


def make(**kwargs: Any) -> GatewayConfig:
    return GatewayConfig(URL, KEY, ORG, **kwargs)


# --- defaults and shape ----------------------------------------------------------------------


def test_defaults_as_in_the_design() -> None:
    config = make()
    assert config.parall_url == URL
    assert config.api_key == KEY
    assert config.org_id == ORG
    assert config.ws_url is None
    assert config.agent_id is None
    assert config.account_id == "default"
    assert config.cold_start_window == 300.0
    assert config.dedupe_capacity == 5000
    assert config.typing_refresh == 2.0
    assert config.heartbeat_drift_warning == 15.0
    assert config.reconcile_interval == 60.0
    assert config.max_dispatch_attempts == 5
    assert config.shutdown_grace == 10.0
    assert config.turn_timeout == 600.0
    assert config.max_forks == 4
    assert config.ack_dead_letters is True
    assert config.state_path is None  # in memory unless told
    assert config.outage_poll_interval == 5.0
    assert config.max_body_chars == 100_000
    assert config.cancel_grace == 5.0
    assert config.hook_timeout == 30.0
    assert config.fetch_concurrency == 16
    assert config.write_concurrency == 8


def test_three_positional_fields_then_keyword_only() -> None:
    fields = attrs.fields(GatewayConfig)
    positional = [f.name for f in fields if not f.kw_only]
    assert positional == ["parall_url", "api_key", "org_id"]
    with pytest.raises(TypeError):
        GatewayConfig(URL, KEY, ORG, "wss://ws.parall.test/ws")  # type: ignore[call-arg]
    by_keyword = GatewayConfig(parall_url=URL, api_key=KEY, org_id=ORG)
    assert by_keyword == make()


def test_every_setting_can_be_given() -> None:
    config = make(
        ws_url="wss://ws.parall.test/ws",
        agent_id="usr_bot",
        account_id="acct",
        cold_start_window=None,
        dedupe_capacity=10,
        typing_refresh=0.5,
        heartbeat_drift_warning=1.0,
        reconcile_interval=5.0,
        max_dispatch_attempts=1,
        shutdown_grace=0.0,
        turn_timeout=1.0,
        max_forks=0,
        ack_dead_letters=False,
        state_path="bot.db",
    )
    assert config.ws_url == "wss://ws.parall.test/ws"
    assert config.state_path == "bot.db"
    assert config.agent_id == "usr_bot"
    assert config.cold_start_window is None
    assert config.max_forks == 0
    assert config.main_session_key == "agent:main:parall:acct"


def test_frozen() -> None:
    config = make()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.max_forks = 1  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.api_key = "other"  # type: ignore[misc]
    assert attrs.evolve(config, max_forks=1).max_forks == 1
    assert config.max_forks == 4


def test_main_session_key() -> None:
    assert make().main_session_key == "agent:main:parall:default"
    assert make(account_id="team-7").main_session_key == "agent:main:parall:team-7"


def test_the_api_key_never_shows_in_repr() -> None:
    config = make()
    assert KEY not in repr(config)
    assert KEY not in str(config)
    assert "api_key" in repr(config)
    assert URL in repr(config)


def test_ints_are_accepted_as_durations() -> None:
    config = make(typing_refresh=1, reconcile_interval=30)
    assert config.typing_refresh == 1
    assert config.reconcile_interval == 30


# --- validation ------------------------------------------------------------------------------

DURATIONS = [
    "cold_start_window",
    "typing_refresh",
    "heartbeat_drift_warning",
    "reconcile_interval",
    "shutdown_grace",
    "turn_timeout",
]
POSITIVE_DURATIONS = ["typing_refresh", "reconcile_interval", "turn_timeout"]
NON_NEGATIVE_DURATIONS = [
    "cold_start_window",
    "heartbeat_drift_warning",
    "shutdown_grace",
]


def assert_config_error(excinfo: pytest.ExceptionInfo[ConfigurationError], name: str) -> None:
    assert isinstance(excinfo.value, ValueError)
    assert name in str(excinfo.value)
    assert KEY not in str(excinfo.value)


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", [-1.0, -0.001, math.nan, "10", True])
def test_bad_durations(name: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        make(**{name: value})
    assert_config_error(excinfo, name)


@pytest.mark.parametrize("name", POSITIVE_DURATIONS)
def test_zero_where_a_positive_duration_is_needed(name: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        make(**{name: 0})
    assert_config_error(excinfo, name)


@pytest.mark.parametrize("name", NON_NEGATIVE_DURATIONS)
def test_zero_is_fine_where_it_means_none(name: str) -> None:
    assert getattr(make(**{name: 0.0}), name) == 0.0


@pytest.mark.parametrize("name", [n for n in DURATIONS if n != "cold_start_window"])
def test_only_cold_start_window_may_be_none(name: str) -> None:
    assert make(cold_start_window=None).cold_start_window is None
    with pytest.raises(ConfigurationError) as excinfo:
        make(**{name: None})
    assert_config_error(excinfo, name)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("dedupe_capacity", 0),
        ("dedupe_capacity", -5),
        ("dedupe_capacity", 1.5),
        ("max_dispatch_attempts", 0),
        ("max_dispatch_attempts", -1),
        ("max_dispatch_attempts", True),
        ("max_forks", -1),
        ("max_forks", "4"),
    ],
)
def test_bad_counts(name: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        make(**{name: value})
    assert_config_error(excinfo, name)


@pytest.mark.parametrize(
    "url",
    ["", "api.parall.test", "ftp://api.parall.test", "http://", "http:///v1", "localhost:8080"],
)
def test_bad_parall_url(url: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        GatewayConfig(url, KEY, ORG)
    assert_config_error(excinfo, "parall_url")


@pytest.mark.parametrize("url", ["ftp://ws.parall.test", "ws://", "/ws", "ws.parall.test"])
def test_bad_ws_url(url: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        make(ws_url=url)
    assert_config_error(excinfo, "ws_url")


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("parall_url", "http://[::1"),
        ("parall_url", "https://api.parall.test:99999"),
        ("ws_url", "wss://[::1"),
    ],
)
def test_unparsable_urls_are_configuration_errors(name: str, url: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        make(**{name: url}) if name == "ws_url" else GatewayConfig(url, KEY, ORG)
    assert_config_error(excinfo, name)


@pytest.mark.parametrize("url", ["http://localhost:8080", "https://api.parall.test/base"])
def test_good_parall_urls(url: str) -> None:
    assert GatewayConfig(url, KEY, ORG).parall_url == url


@pytest.mark.parametrize("url", ["ws://localhost:8080/ws", "wss://ws.parall.test/ws"])
def test_good_ws_urls(url: str) -> None:
    assert make(ws_url=url).ws_url == url


@pytest.mark.parametrize("value", ["", "   "])
@pytest.mark.parametrize("name", ["api_key", "org_id", "account_id", "agent_id"])
def test_empty_strings(name: str, value: str) -> None:
    values: dict[str, Any] = {"parall_url": URL, "api_key": KEY, "org_id": ORG, name: value}
    with pytest.raises(ConfigurationError) as excinfo:
        GatewayConfig(**values)
    assert_config_error(excinfo, name)


# --- from_env ----------------------------------------------------------------------------------


def test_from_env_required_variables() -> None:
    config = GatewayConfig.from_env(ENV)
    assert config == make()
    assert config.ws_url is None
    assert config.agent_id is None


def test_from_env_optional_variables() -> None:
    env = {
        **ENV,
        "PRLL_WS_URL": "wss://ws.parall.test/ws",
        "PRLL_AGENT_ID": "usr_bot",
        "PRLL_STATE_PATH": "/var/lib/bot/state.db",
    }
    config = GatewayConfig.from_env(env)
    assert config.ws_url == "wss://ws.parall.test/ws"
    assert config.agent_id == "usr_bot"
    assert config.state_path == "/var/lib/bot/state.db"


def test_state_path_takes_a_path_like_and_refuses_an_empty_one() -> None:
    assert make(state_path=Path("state") / "bot.db").state_path == os.path.join("state", "bot.db")
    for bad in ("", "  ", 3):
        with pytest.raises(ConfigurationError, match="state_path must be a non-empty path"):
            make(state_path=bad)


def test_from_env_empty_optional_variables_are_absent() -> None:
    config = GatewayConfig.from_env(
        {**ENV, "PRLL_WS_URL": "", "PRLL_AGENT_ID": "  ", "PRLL_STATE_PATH": ""}
    )
    assert config.ws_url is None
    assert config.agent_id is None
    assert config.state_path is None


@pytest.mark.parametrize("variable", ["PRLL_API_URL", "PRLL_API_KEY", "PRLL_ORG_ID"])
@pytest.mark.parametrize("value", [None, "", "   "])
def test_from_env_missing_variable_is_named(variable: str, value: str | None) -> None:
    env = {k: v for k, v in ENV.items() if k != variable}
    if value is not None:
        env[variable] = value
    with pytest.raises(ConfigurationError) as excinfo:
        GatewayConfig.from_env(env)
    assert_config_error(excinfo, variable)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PRLL_API_URL", "not a url"),
        ("PRLL_API_URL", "ftp://api.parall.test"),
        ("PRLL_WS_URL", "ftp://ws.parall.test"),
        ("PRLL_WS_URL", "ws.parall.test"),
    ],
)
def test_from_env_malformed_variable_is_named(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        GatewayConfig.from_env({**ENV, variable: value})
    assert_config_error(excinfo, variable)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PRLL_API_URL", "http://[::1"), ("PRLL_WS_URL", "wss://host:70000/ws")],
)
def test_from_env_unparsable_url_is_named(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        GatewayConfig.from_env({**ENV, variable: value})
    assert_config_error(excinfo, variable)


def test_from_env_overrides() -> None:
    config = GatewayConfig.from_env(
        {**ENV, "PRLL_AGENT_ID": "usr_env"},
        account_id="acct",
        max_forks=1,
        cold_start_window=None,
        agent_id="usr_override",
        ws_url="ws://localhost:1/ws",
    )
    assert config.account_id == "acct"
    assert config.max_forks == 1
    assert config.cold_start_window is None
    assert config.agent_id == "usr_override"
    assert config.ws_url == "ws://localhost:1/ws"
    assert config.parall_url == URL


def test_from_env_override_of_a_required_value_wins() -> None:
    config = GatewayConfig.from_env(ENV, parall_url="http://localhost:9", org_id="org_2")
    assert config.parall_url == "http://localhost:9"
    assert config.org_id == "org_2"


def test_from_env_bad_override_names_the_setting() -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        GatewayConfig.from_env(ENV, max_forks=-1)
    assert_config_error(excinfo, "max_forks")
    with pytest.raises(ConfigurationError) as excinfo:
        GatewayConfig.from_env(ENV, parall_url="nope")
    assert_config_error(excinfo, "parall_url")


def test_from_env_does_not_change_the_given_mapping() -> None:
    env = dict(ENV)
    GatewayConfig.from_env(env, max_forks=1)
    assert env == ENV


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """``os.environ`` without any ``PRLL_`` variable (restored after the test)."""
    for variable in ALL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def test_from_env_reads_os_environ_by_default(clean_environ: pytest.MonkeyPatch) -> None:
    for variable, value in ENV.items():
        clean_environ.setenv(variable, value)
    clean_environ.setenv("PRLL_AGENT_ID", "usr_bot")
    before = dict(os.environ)
    config = GatewayConfig.from_env()
    assert config == make(agent_id="usr_bot")
    assert dict(os.environ) == before


def test_from_env_missing_in_os_environ(clean_environ: pytest.MonkeyPatch) -> None:
    clean_environ.setenv("PRLL_API_URL", URL)
    clean_environ.setenv("PRLL_API_KEY", KEY)
    before = dict(os.environ)
    with pytest.raises(ConfigurationError) as excinfo:
        GatewayConfig.from_env()
    assert_config_error(excinfo, "PRLL_ORG_ID")
    assert dict(os.environ) == before


def test_from_env_never_changes_os_environ(clean_environ: pytest.MonkeyPatch) -> None:
    for variable, value in ENV.items():
        clean_environ.setenv(variable, value)
    before = dict(os.environ)
    GatewayConfig.from_env(account_id="x", ws_url="wss://ws.parall.test/ws")
    GatewayConfig.from_env({**ENV, "PRLL_WS_URL": "wss://other.test/ws"})
    with pytest.raises(ConfigurationError):
        GatewayConfig.from_env({"PRLL_API_URL": "bad"})
    with pytest.raises(ConfigurationError):
        GatewayConfig.from_env(max_forks=-1)
    assert dict(os.environ) == before


def test_from_env_overrides_may_supply_required_values() -> None:
    config = GatewayConfig.from_env(
        {}, parall_url="https://api.parall.test", api_key="pk_x", org_id="org_1"
    )
    assert config.org_id == "org_1"
    with pytest.raises(ConfigurationError, match="PRLL_ORG_ID"):
        GatewayConfig.from_env({}, parall_url="https://api.parall.test", api_key="pk_x")


def test_from_env_names_every_missing_variable_at_once() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"^environment variables PRLL_API_URL, PRLL_API_KEY, PRLL_ORG_ID are missing",
    ):
        GatewayConfig.from_env({})
    with pytest.raises(ConfigurationError, match=r"^environment variable PRLL_ORG_ID is missing"):
        GatewayConfig.from_env({"PRLL_API_URL": "https://a.test", "PRLL_API_KEY": "pk_x"})


def test_zero_where_a_positive_duration_is_needed_says_positive() -> None:
    with pytest.raises(ConfigurationError, match="reconcile_interval must be a finite, positive"):
        GatewayConfig("https://a.test", "pk_x", "org_1", reconcile_interval=0)


@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_ack_dead_letters_must_be_a_bool(value: object) -> None:
    with pytest.raises(ConfigurationError, match="ack_dead_letters must be True or False"):
        GatewayConfig("https://a.test", "pk_x", "org_1", ack_dead_letters=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("outage_poll_interval", 0, "positive"),
        ("hook_timeout", 0, "positive"),
        ("cancel_grace", -1, "non-negative"),
        ("max_body_chars", 0, "integer >= 1"),
        ("fetch_concurrency", 0, "integer >= 1"),
        ("write_concurrency", 0, "integer >= 1"),
    ],
)
def test_the_hardening_settings_are_checked(name: str, value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{name} must be .*{message}"):
        make(**{name: value})
