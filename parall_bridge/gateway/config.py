"""``GatewayConfig``: who the gateway runs as, and its tunables."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Final, Self

import attrs
from yarl import URL

from ..errors import ConfigurationError

__all__ = ["GatewayConfig"]

ENV_API_URL: Final = "PRLL_API_URL"
ENV_API_KEY: Final = "PRLL_API_KEY"
ENV_ORG_ID: Final = "PRLL_ORG_ID"
ENV_WS_URL: Final = "PRLL_WS_URL"
ENV_AGENT_ID: Final = "PRLL_AGENT_ID"
ENV_STATE_PATH: Final = "PRLL_STATE_PATH"
ENV_STORE_DSN: Final = "PRLL_STORE_DSN"
"""A fleet's shared PostgreSQL store (``run --accounts FILE``; ``--store`` overrides it)."""


def _parse_url(name: str, value: object, schemes: tuple[str, ...], what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{name} must be an absolute {what} URL")
    try:
        url = URL(value)
        port = url.port  # yarl checks the port lazily
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be an absolute {what} URL ({exc})") from None
    if url.scheme not in schemes or not url.host or (port is not None and not 0 < port < 65536):
        raise ConfigurationError(f"{name} must be an absolute {what} URL")


def _http_url(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    _parse_url(attribute.name, value, ("http", "https"), "http(s)")


def _ws_url(instance: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        _parse_url(attribute.name, value, ("ws", "wss", "http", "https"), "ws(s)")


def _non_empty(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{attribute.name} must be a non-empty string")


def _optional_non_empty(instance: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        _non_empty(instance, attribute, value)


def _check_duration(name: str, value: object, *, positive: bool) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        kind = "positive" if positive else "non-negative"
        raise ConfigurationError(
            f"{name} must be a finite, {kind} number of seconds, got {value!r}"
        )


def _duration(instance: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is None and attribute.name == "cold_start_window":
        return
    _check_duration(attribute.name, value, positive=False)


def _positive_duration(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    _check_duration(attribute.name, value, positive=True)


def _flag(instance: Any, attribute: attrs.Attribute[Any], value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{attribute.name} must be True or False, got {value!r}")


def _count(minimum: int) -> Any:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigurationError(f"{attribute.name} must be an integer >= {minimum}")

    return check


def _optional_path(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigurationError(f"{attribute.name} must be a non-empty path or None")


def _path_text(value: object) -> object:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _redacted(_: object) -> str:
    return "'***'"


@attrs.frozen(kw_only=False)
class GatewayConfig:
    """Configuration of a :class:`~parall_bridge.Gateway`.

    Attributes:
        parall_url: the API base URL (``PRLL_API_URL``).
        api_key: the agent's API key (``PRLL_API_KEY``); never shown in a repr or log.
        org_id: the organisation (``PRLL_ORG_ID``).
        ws_url: the WebSocket URL, when neither the ticket nor the default
            (``parall_url`` with ``ws`` and ``/ws``) is right.
        agent_id: the agent's user id, checked against ``get_me`` at start.
        account_id: names the main session (``agent:main:parall:<account_id>``).
        cold_start_window: on a process's first catch-up, pending items older
            than this many seconds are acked without a turn; ``None`` turns it off.
        dedupe_capacity: most events remembered for dedupe; finished ones are forgotten
            first, and work still in flight never is (so a backlog larger than this is
            held until it is done).
        typing_refresh: seconds between typing refreshes while a turn runs.
        heartbeat_drift_warning: warn when a heartbeat comes this many seconds late.
        reconcile_interval: seconds between reconciliation passes (catch-up
            on a timer), and the first retry delay of a failed event.
        max_dispatch_attempts: failed turns before an event is dead-lettered.
        shutdown_grace: seconds running turns get to finish at shutdown.
        turn_timeout: seconds one turn may run before it is cancelled (a failure).
        max_forks: the fork cap of the default routing strategy.
        ack_dead_letters: ack dead-lettered events (so the platform stops
            redelivering them); ``False`` leaves them pending.
        outage_poll_interval: seconds between reconciliation passes while the
            WebSocket is not connected (an outage degrades to polling the dispatch
            queue over REST).
        max_body_chars: longest message text (or task description) handed to a turn;
            a longer one is cut, with a visible marker and a WARNING.
        cancel_grace: seconds a cancelled turn may take to end. At shutdown a turn
            still running after it is abandoned (``start()`` returns anyway); after a
            ``turn_timeout`` its session keeps waiting for it (one turn per session),
            and an ERROR names the chat.
        hook_timeout: seconds a runtime hook (``apply_platform_config``,
            ``release_session``, ``on_dead_letter``, ``on_stop``) may take before it is
            cancelled.
        verify_tls: verify the platform's TLS certificate (REST and WebSocket); only an
            explicit ``False`` turns it off (logged at WARNING). A client given to the
            gateway keeps its own setting.
        fetch_concurrency: most messages and tasks fetched at once for dispatch items
            (catch-up, ``dispatch.new``); each chat still gets its items in dispatch
            order.
        write_concurrency: most platform writes (acks, mark-received, steps, session
            status) in flight at once; steps stay in order within a session.
        state_path: a SQLite file that keeps what must survive a restart
            (``PRLL_STATE_PATH``): the turn journal, retries, acks owed, ``last_seq``.
            ``None`` keeps it in memory (a restart forgets it). A ``store`` given to
            the :class:`~parall_bridge.Gateway` wins over it.
    """

    parall_url: str = attrs.field(validator=_http_url)
    api_key: str = attrs.field(validator=_non_empty, repr=_redacted)
    org_id: str = attrs.field(validator=_non_empty)
    ws_url: str | None = attrs.field(default=None, kw_only=True, validator=_ws_url)
    agent_id: str | None = attrs.field(default=None, kw_only=True, validator=_optional_non_empty)
    account_id: str = attrs.field(default="default", kw_only=True, validator=_non_empty)
    cold_start_window: float | None = attrs.field(default=300.0, kw_only=True, validator=_duration)
    dedupe_capacity: int = attrs.field(default=5000, kw_only=True, validator=_count(1))
    typing_refresh: float = attrs.field(default=2.0, kw_only=True, validator=_positive_duration)
    heartbeat_drift_warning: float = attrs.field(default=15.0, kw_only=True, validator=_duration)
    reconcile_interval: float = attrs.field(
        default=60.0, kw_only=True, validator=_positive_duration
    )
    max_dispatch_attempts: int = attrs.field(default=5, kw_only=True, validator=_count(1))
    shutdown_grace: float = attrs.field(default=10.0, kw_only=True, validator=_duration)
    turn_timeout: float = attrs.field(default=600.0, kw_only=True, validator=_positive_duration)
    max_forks: int = attrs.field(default=4, kw_only=True, validator=_count(0))
    ack_dead_letters: bool = attrs.field(default=True, kw_only=True, validator=_flag)
    state_path: str | None = attrs.field(
        default=None, kw_only=True, converter=_path_text, validator=_optional_path
    )
    outage_poll_interval: float = attrs.field(
        default=5.0, kw_only=True, validator=_positive_duration
    )
    max_body_chars: int = attrs.field(default=100_000, kw_only=True, validator=_count(1))
    cancel_grace: float = attrs.field(default=5.0, kw_only=True, validator=_duration)
    hook_timeout: float = attrs.field(default=30.0, kw_only=True, validator=_positive_duration)
    verify_tls: bool = attrs.field(default=True, kw_only=True, validator=_flag)
    fetch_concurrency: int = attrs.field(default=16, kw_only=True, validator=_count(1))
    write_concurrency: int = attrs.field(default=8, kw_only=True, validator=_count(1))

    @property
    def main_session_key(self) -> str:
        """The main session's key: ``agent:main:parall:<account_id>``."""
        return f"agent:main:parall:{self.account_id}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Build a config from ``PRLL_API_URL``, ``PRLL_API_KEY``, ``PRLL_ORG_ID`` and the
        optional ``PRLL_WS_URL``, ``PRLL_AGENT_ID`` and ``PRLL_STATE_PATH``.

        Args:
            env: the variables to read (``os.environ`` by default; never changed).
            overrides: any other keyword of the constructor.

        Raises:
            ConfigurationError: a variable is missing or malformed (it is named).
        """
        source = os.environ if env is None else env

        names = {
            "parall_url": ENV_API_URL,
            "api_key": ENV_API_KEY,
            "org_id": ENV_ORG_ID,
            "ws_url": ENV_WS_URL,
            "agent_id": ENV_AGENT_ID,
            "state_path": ENV_STATE_PATH,
        }
        required = ("parall_url", "api_key", "org_id")
        values: dict[str, Any] = {}
        missing: list[str] = []
        for field, variable in names.items():
            if field in overrides:
                continue
            value = source.get(variable, "").strip()
            if value:
                values[field] = value
            elif field in required:
                missing.append(variable)
        if missing:
            plural = "s" if len(missing) > 1 else ""
            verb = "are" if len(missing) > 1 else "is"
            raise ConfigurationError(
                f"environment variable{plural} {', '.join(missing)} {verb} missing or empty"
            )
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigurationError as exc:
            for field, variable in names.items():
                if str(exc).startswith(field + " ") and field not in overrides:
                    raise ConfigurationError(
                        f"environment variable {variable}: {str(exc)[len(field) + 1 :]}"
                    ) from None
            raise
