"""An accounts file: the accounts of a :class:`~parall_bridge.GatewayFleet`, in TOML.

One table per account, named by its account id. Secrets are never written in
the file: an account's API key comes from the environment variable its
``api_key_env`` names. Any other setting is a value, or ``<setting>_env``: the
name of a variable holding it (read as the setting's type: a number, an integer,
or ``true``/``false``). ``parall_url`` and ``org_id`` default to
``PRLL_API_URL`` and ``PRLL_ORG_ID``::

    [support]
    api_key_env = "SUPPORT_PRLL_API_KEY"
    state_path = "state/support.db"

    [sales]
    api_key_env = "SALES_PRLL_API_KEY"
    org_id_env = "SALES_PRLL_ORG_ID"
    shutdown_grace = 20.0
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from ..errors import ConfigurationError
from .config import ENV_API_URL, ENV_ORG_ID, GatewayConfig

__all__ = ["load_accounts"]

ENV_SUFFIX: Final = "_env"
"""A key ending so names the environment variable holding a setting's value."""
FROM_ENV_BY_DEFAULT: Final = {"parall_url": ENV_API_URL, "org_id": ENV_ORG_ID}
"""The settings read from a shared ``PRLL_*`` variable when an account gives neither a
value nor a ``*_env`` name."""


def load_accounts(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> list[GatewayConfig]:
    """The accounts of a TOML accounts file, one :class:`GatewayConfig` each (in the
    file's order), their ``account_id`` the table's name.

    Args:
        path: the file.
        env: the variables named in it (``os.environ`` by default; never changed).

    Raises:
        ConfigurationError: the file cannot be read or is not TOML, an account writes
            its API key inline (or gives none), names a setting twice or one that does
            not exist, or names a variable that is missing; or a value is invalid. The
            file and the account are named; a secret never is.
    """
    source = os.environ if env is None else env
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{where}: not a TOML file: {exc}") from None
    if not data:
        raise ConfigurationError(f"{where}: no account (one table per account)")
    configs: list[GatewayConfig] = []
    for account_id, table in data.items():
        if not isinstance(table, dict):
            raise ConfigurationError(
                f"{where}: {account_id!r} is not a table (one table per account)"
            )
        configs.append(_account(where, account_id, table, source))
    return configs


_VARIABLE: Final = re.compile(r"[A-Z_][A-Z0-9_]*")
"""What the name of an environment variable looks like (by convention: upper case)."""
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _typed(field: attrs.Attribute[Any], text: str, what: str) -> Any:
    """A variable's text as the setting's type (that of its default: a flag, an
    integer, a number of seconds; else the text). The text is never shown."""
    default = field.default
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigurationError(f"{what} ({field.name}) must be true or false")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ConfigurationError(f"{what} ({field.name}) must be {kind}") from None
    return text


def _account(
    where: str, account_id: str, table: Mapping[str, Any], env: Mapping[str, str]
) -> GatewayConfig:
    fields = {field.name for field in attrs.fields(GatewayConfig)}
    what = f"{where}: account {account_id!r}"
    values: dict[str, Any] = {}
    named: dict[str, str] = {}
    for key, value in table.items():
        if key == "api_key":
            raise ConfigurationError(
                f"{what}: never write an API key in the file; name its environment "
                "variable with api_key_env"
            )
        if key == "account_id":
            raise ConfigurationError(f"{what}: the table's name is the account id")
        if key.endswith(ENV_SUFFIX) and key[: -len(ENV_SUFFIX)] in fields:
            if not isinstance(value, str) or not value:
                raise ConfigurationError(f"{what}: {key} must name an environment variable")
            named[key[: -len(ENV_SUFFIX)]] = value
        elif key in fields:
            values[key] = value
        else:
            raise ConfigurationError(f"{what}: unknown setting {key!r}")
    twice = sorted(values.keys() & named.keys())
    if twice:
        raise ConfigurationError(f"{what}: {twice[0]} and {twice[0]}{ENV_SUFFIX} both given")
    if "api_key" not in named:
        raise ConfigurationError(f"{what}: api_key_env is missing (the key's variable)")
    for field, variable in FROM_ENV_BY_DEFAULT.items():
        if field not in values and field not in named:
            named[field] = variable
    types = {field.name: field for field in attrs.fields(GatewayConfig)}
    for field, variable in named.items():
        text = env.get(variable, "").strip()
        if not text:
            if field == "api_key" and not _VARIABLE.fullmatch(variable):
                # Likely the key itself written where its variable's name goes: not shown.
                raise ConfigurationError(
                    f"{what}: api_key_env names no variable that is set (the name is not "
                    "shown: it does not look like one, is it the key itself?)"
                )
            raise ConfigurationError(
                f"{what}: environment variable {variable} ({field}) is missing or empty"
            )
        values[field] = _typed(types[field], text, f"{what}: environment variable {variable}")
    try:
        return GatewayConfig(account_id=account_id, **values)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{what}: {exc}") from None
    except TypeError as exc:  # a value of the wrong type the validators did not name
        raise ConfigurationError(f"{what}: {exc}") from None
