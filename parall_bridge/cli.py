"""Command line: ``python -m parall_bridge <command>``.

- ``demo``: run the library against the built-in Parall emulator and show what
  happens (what ``make demo`` runs).
- ``run MODULE:NAME``: run the gateway with a host's runtime (an
  :class:`~parall_bridge.AgentRuntime` subclass, instance or factory, imported
  from ``MODULE``) on the configuration of the ``PRLL_*`` environment variables,
  until SIGINT or SIGTERM. It keeps a durable state file (``--state PATH``, else
  ``PRLL_STATE_PATH``, else ``./.parall_bridge/<agent id>.db``; ``--no-state`` keeps
  it in memory), so a restart never replies twice.
  With ``--accounts FILE`` it runs a :class:`~parall_bridge.GatewayFleet` of the
  accounts of a TOML file instead (:func:`~parall_bridge.gateway.accounts.load_accounts`),
  each with its own runtime (a class or factory, called once per account), its state
  file ``state_path``, else ``./.parall_bridge/<account id>.db``; or, with ``--store
  DSN`` (else ``PRLL_STORE_DSN``), every account's state in a shared PostgreSQL store
  with account leases, so several processes run the same file between them
  (``--capacity N``: the most accounts this process holds).
- ``check``: check that configuration without running anything: the key and
  the agent, the platform config, the dispatch queue, a WebSocket ``hello``.
- ``emulator``: serve the Parall emulator on a local port until interrupted
  (``--port``, 8765 by default; ``--port 0`` takes any free one), printing its URL
  and an agent API key, to point a client or gateway at (``--latency SECONDS``
  delays every REST answer: a simulated round trip). A port it cannot listen on is
  a usage error, said in one line.

Exit status: 0 on success, 1 when the platform refused or failed, 2 on a usage
or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import importlib
import inspect
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from . import protocol as p
from ._retry import RetryPolicy
from .client import ParallClient
from .errors import ConfigurationError, ParallError, StateStoreError
from .gateway import Gateway, GatewayConfig, GatewayFleet
from .gateway.accounts import load_accounts
from .gateway.config import (
    ENV_AGENT_ID,
    ENV_API_KEY,
    ENV_API_URL,
    ENV_ORG_ID,
    ENV_STATE_PATH,
    ENV_STORE_DSN,
    ENV_WS_URL,
)
from .gateway.fleet import FLEET_STOPPED
from .routing import RoutingStrategy, SerialRoutingStrategy
from .runtime import AgentRuntime
from .state import PostgresStateStore, StateStore
from .ws import ParallWs, ws_url_from_base

__all__ = [
    "check",
    "default_state_path",
    "load_runtime",
    "load_runtime_factory",
    "main",
    "resolve_state_path",
    "run_fleet",
    "run_gateway",
]

CHECK_WS_TIMEOUT = 15.0
"""How long ``check`` waits for the WebSocket ``hello``."""
CHECK_REQUEST_TIMEOUT: Final = 10.0
"""How long ``check`` waits for each REST answer."""
CHECK_RETRY: Final = RetryPolicy(max_retries=0)
"""``check`` asks once: it reports what it finds, at once (a refused connection fails in
milliseconds, not after the seconds of backoff a gateway would spend)."""
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EMULATOR_PORT: Final = 8765
"""The port ``emulator`` serves on unless told (``--port 0``: any free port)."""
STATE_DIR: Final = ".parall_bridge"
"""Where ``run`` keeps a state file per agent by default (in the working directory)."""
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.-]")


def _print(text: str = "") -> None:
    """Print a line; once the reader has gone (``| head``), print nothing more."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's documented way out: point stdout at devnull so exit stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _cannot_listen(port: int, exc: OSError) -> str:
    """Why the emulator cannot serve on ``port``, in one line that says what to do."""
    if exc.errno == errno.EADDRINUSE:
        return (
            f"emulator: port {port} on 127.0.0.1 is already in use; choose another with"
            " --port PORT, or --port 0 for any free one"
        )
    return f"emulator: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}"


async def _emulator(port: int, latency: float = 0.0) -> int:
    from .testing import FakeParallServer

    server = FakeParallServer(port=port, latency=latency)
    try:
        await server.start()
    except OSError as exc:
        await server.close()
        print(_cannot_listen(port, exc), file=sys.stderr)
        return EXIT_USAGE
    try:
        agent = server.add_agent("Agent")
        human = server.add_user("Human")
        chat = server.add_chat(type="direct", members=[human.id, agent.user_id])
        _print(f"Parall emulator at {server.url} (WebSocket {server.ws_url})")
        _print(f"  PRLL_API_URL={server.url}")
        _print(f"  PRLL_API_KEY={agent.api_key}")
        _print(f"  PRLL_ORG_ID={server.org_id}")
        _print(f"  agent {agent.user_id}, human {human.id}, direct chat {chat.id}")
        if latency:
            _print(f"Every REST answer waits {latency * 1000:g} ms (a simulated round trip).")
        human_key = server.add_api_key(human.id)
        send = server.url + p.SEND_MESSAGE.format(org_id=server.org_id, chat_id=chat.id)
        _print("Post as the human (the agent gets it live and in its dispatch queue):")
        _print(
            f"  curl -s -X POST {send} -H 'Authorization: Bearer {human_key}' "
            "-H 'Content-Type: application/json' "
            """-d '{"message_type": "text", "content": {"text": "hello"}}'"""
        )
        _print("Ctrl-C stops it.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await server.close()
    return 0


def _stop_on_signals(stop: asyncio.Event) -> None:
    """SIGINT or SIGTERM sets ``stop``; the handlers are then removed, so a second Ctrl-C
    interrupts for good (say, when a host's turn will not end)."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal() -> None:
        stop.set()
        for sig in signals:
            loop.remove_signal_handler(sig)

    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)


def _describe(exc: BaseException) -> str:
    """An error as one line: its type and text (never a secret: ours carry none)."""
    return f"{type(exc).__name__}: {exc}"


def load_runtime(spec: str) -> AgentRuntime:
    """The runtime named by ``"module:name"`` (``name`` may be dotted): an
    :class:`AgentRuntime` instance, or a class or factory called without arguments.

    Raises:
        ConfigurationError: the spec is malformed, the module cannot be imported, or
            the name is not a runtime.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"runtime must be 'module:name', got {spec!r}")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.split(".")[0]:
            hint = f" (run imports from {os.getcwd()} and the installed packages)"
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}{hint}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no {attribute!r}") from None
    if isinstance(target, AgentRuntime):
        return target
    if inspect.iscoroutinefunction(target):
        raise ConfigurationError(f"{spec} is an async function: name a runtime or a plain factory")
    if callable(target):
        try:
            made = target()
        except Exception as exc:
            raise ConfigurationError(f"calling {spec}() failed: {_describe(exc)}") from exc
        if isinstance(made, AgentRuntime):
            return made
    raise ConfigurationError(
        f"{spec} is not an AgentRuntime, a subclass of it, or a factory of one"
    )


def load_runtime_factory(spec: str) -> Callable[[GatewayConfig], AgentRuntime]:
    """A factory of runtimes from ``"module:name"``, for a fleet: ``name`` must be an
    :class:`AgentRuntime` class or a factory called without arguments, called once for
    each run of each account (an instance cannot serve two accounts).

    Raises:
        ConfigurationError: as :func:`load_runtime`, or the name is an instance or a
            factory giving the same instance each time.
    """
    module_name, _, attribute = spec.partition(":")
    if module_name and attribute:
        try:
            target: object = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError):
            target = None  # load_runtime explains it below
        if isinstance(target, AgentRuntime):
            raise ConfigurationError(
                f"{spec} is an instance: with --accounts each account needs its own "
                "runtime, name a class or a factory"
            )
    probe = load_runtime(spec)  # checks the spec makes a runtime, with its errors
    if load_runtime(spec) is probe:  # a factory of one shared runtime: accounts would mix
        raise ConfigurationError(
            f"{spec} gives the same runtime each time: with --accounts each account needs "
            "its own runtime, name a class or a factory of new ones"
        )

    def factory(config: GatewayConfig) -> AgentRuntime:
        return load_runtime(spec)

    return factory


def default_state_path(agent_id: str, directory: str | os.PathLike[str] = STATE_DIR) -> str:
    """The state file ``run`` keeps for an agent by default: one per agent, named after
    its id, under ``./.parall_bridge/``."""
    return str(Path(directory) / f"{_UNSAFE.sub('_', agent_id)}.db")


async def resolve_state_path(config: GatewayConfig) -> GatewayConfig:
    """``config`` with a ``state_path``: its own, else the agent's default file (the
    agent's id from ``PRLL_AGENT_ID``, else asked of the platform).

    Raises:
        ParallError: the platform could not say who the key belongs to.
    """
    if config.state_path is not None:
        return config
    agent_id = config.agent_id
    if agent_id is None:
        async with ParallClient(config.parall_url, config.api_key) as client:
            agent_id = (await client.get_me()).id
    return attrs.evolve(config, state_path=default_state_path(agent_id))


async def run_gateway(
    config: GatewayConfig,
    runtime: AgentRuntime,
    *,
    routing: RoutingStrategy | None = None,
    stop: asyncio.Event | None = None,
    out: Callable[[str], None] = _print,
    durable: bool = True,
) -> int:
    """Run a gateway until ``stop`` is set (SIGINT or SIGTERM when not given); returns
    the exit status (1 when the platform refused the key or closed for good, or the
    state file cannot be used).

    With ``durable`` (the default) the gateway keeps its state in ``config.state_path``,
    or in the agent's default file (:func:`default_state_path`), and says where;
    without, in memory (a restart forgets what was in flight)."""
    if stop is None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
    try:
        if durable:
            config = await resolve_state_path(config)
        else:
            config = attrs.evolve(config, state_path=None)
        gateway = Gateway(config, runtime, routing=routing)
    except TypeError as exc:  # not a runtime, or a run_turn that is not async
        out(f"configuration error: {exc}")
        return EXIT_USAGE
    except ParallError as exc:
        out(f"gateway stopped: {_describe(exc)}")
        return EXIT_FAILED
    if config.state_path is not None:
        out(f"state: {config.state_path} (a restart resumes from it)")
    else:
        out("state: in memory (--no-state: a restart forgets what was in flight)")
    try:
        await gateway.start(stop)
    except ParallError as exc:
        out(f"gateway stopped: {_describe(exc)}")
        return EXIT_FAILED
    return EXIT_OK


async def check(config: GatewayConfig, out: Callable[[str], None] = _print) -> int:
    """Check a configuration against the platform, printing one line per check; returns
    the exit status (1 when a check failed). Nothing is written to the platform, and
    nothing is retried: a platform that cannot be reached fails the first check at once."""
    failed = False

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal failed
        failed = failed or not ok
        out(f"{'ok  ' if ok else 'FAIL'}  {what}: {detail}")

    async with ParallClient(
        config.parall_url,
        config.api_key,
        retry=CHECK_RETRY,
        timeout=CHECK_REQUEST_TIMEOUT,
        verify_tls=config.verify_tls,
    ) as client:
        try:
            me = await client.get_agent_me(config.org_id)
        except ParallError as exc:
            report(False, "agent", _describe(exc))
            return EXIT_FAILED
        if config.agent_id is not None and me.id != config.agent_id:
            report(False, "agent", f"the key is {me.id}'s, PRLL_AGENT_ID is {config.agent_id}")
        else:
            report(True, "agent", f"{me.display_name or me.id} ({me.id}) in {config.org_id}")
        try:
            platform = await client.get_agent_config(config.org_id, me.id)
            report(True, "platform config", f"version {platform.version}")
        except ParallError as exc:
            report(False, "platform config", _describe(exc))
        try:
            page = await client.get_dispatch(config.org_id, limit=100)
            count = f"{len(page.data)}{'+' if page.has_more else ''}"
            report(True, "dispatch queue", f"{count} pending item(s)")
        except ParallError as exc:
            report(False, "dispatch queue", _describe(exc))
        ws = ParallWs(
            client.get_ws_ticket,
            config.ws_url or ws_url_from_base(config.parall_url),
            reconnect=False,
            verify_tls=config.verify_tls,
        )
        try:
            async with asyncio.timeout(CHECK_WS_TIMEOUT):
                await ws.connect()
            report(True, "WebSocket", f"hello received (session {ws.session_id})")
        except (ParallError, TimeoutError) as exc:
            report(False, "WebSocket", _describe(exc))
        finally:
            await ws.disconnect()
    return EXIT_FAILED if failed else EXIT_OK


async def run_fleet(
    configs: Sequence[GatewayConfig],
    runtime_factory: Callable[[GatewayConfig], AgentRuntime],
    *,
    routing_factory: Callable[[GatewayConfig], RoutingStrategy] | None = None,
    stop: asyncio.Event | None = None,
    out: Callable[[str], None] = _print,
    durable: bool = True,
    store: StateStore | None = None,
    capacity: int | None = None,
    freeze_gc: bool = True,
) -> int:
    """Run a fleet of ``configs`` until ``stop`` is set (SIGINT or SIGTERM when not
    given); returns the exit status: 1 when an account stopped for an error (each such
    account is said in one line) or the store could not be opened, else 0.

    With ``freeze_gc`` (the default: this is the host program), once every account is
    ready the garbage collector is run and its survivors frozen (``gc.freeze()``), so
    that its full passes no longer walk the accounts' long-lived objects (with 2,000
    accounts, about a million, and a pause of up to a second each); unfrozen once the
    fleet has stopped.

    With a ``store`` (a :class:`~parall_bridge.state.PostgresStateStore`) every account
    keeps its state there, under its lease (``capacity``: the most accounts this process
    holds). Else, with ``durable`` (the default) each account keeps its state in its
    ``state_path``, else in ``./.parall_bridge/<account id>.db``; without, in memory."""
    if stop is None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
    if store is None:
        configs = [
            attrs.evolve(
                config,
                state_path=(config.state_path or default_state_path(config.account_id))
                if durable
                else None,
            )
            for config in configs
        ]
    try:
        fleet = GatewayFleet(
            configs,
            runtime_factory,
            routing_factory=routing_factory,
            store=store,
            capacity=capacity,
        )
    except ValueError as exc:
        out(f"configuration error: {exc}")
        return EXIT_USAGE
    if store is not None:
        out(
            f"{len(configs)} account(s): state in {store.description}, each run by the "
            "process holding its lease"
        )
    else:
        for config in configs:
            where = config.state_path or "in memory"
            out(f"account {config.account_id}: state {where}")
    freezer = _GcFreezer(fleet)
    freezing = (
        asyncio.get_running_loop().create_task(freezer.run(), name="fleet-gc")
        if freeze_gc
        else None
    )
    try:
        await fleet.start(stop)
    except StateStoreError as exc:
        out(f"the shared store failed: {exc}")
        return EXIT_FAILED
    finally:
        if freezing is not None:
            freezing.cancel()
            await asyncio.gather(freezing, return_exceptions=True)
            if freezer.frozen:
                gc.unfreeze()  # the fleet's objects are garbage now
    status = EXIT_OK
    for account_id, account in fleet.stats()["accounts"].items():
        if account["reason"] not in (None, FLEET_STOPPED):
            out(f"account {account_id} stopped: {account['reason']}")
            status = EXIT_FAILED
    return status


REFREEZE_EVERY: Final = 5.0
"""Seconds between two looks of ``run_fleet`` at how many accounts run (to freeze the
collector again over the ones that started since: a process joining a shared store's
fleet holds none when it is first ready)."""


class _GcFreezer:
    """Freezes the collector over a fleet's accounts (see :func:`run_fleet`)."""

    def __init__(self, fleet: GatewayFleet) -> None:
        self._fleet = fleet
        self.frozen = False  # gc.freeze() was called: unfreeze at the end

    async def run(self) -> None:
        """Once every account is ready: collect, then ``gc.freeze()`` what survived (the
        accounts' long-lived objects), out of every later collection; and again whenever
        more accounts run than at the last freeze and all are ready (accounts handed over
        by another process, added ones)."""
        fleet = self._fleet
        await fleet.wait_ready()
        frozen_at = -1
        while True:
            running = fleet.count("running")  # (stats() would cost every account's)
            if running > frozen_at:
                gc.collect()
                gc.freeze()
                self.frozen = True
                frozen_at = running
            await asyncio.sleep(REFREEZE_EVERY)
            await fleet.wait_ready()


def _environment_help(*, state: bool) -> str:
    """The ``PRLL_*`` variables a command reads, for its ``--help``."""
    lines = [
        "environment variables:",
        f"  {ENV_API_URL:<16} the platform's base URL, e.g. https://api.parall.example (required)",
        f"  {ENV_API_KEY:<16} the agent's API key (required; never printed)",
        f"  {ENV_ORG_ID:<16} the organisation id (required)",
        f"  {ENV_WS_URL:<16} the WebSocket URL when a ticket names none (optional;",
        f"  {'':<16} default: the base URL as ws(s)://.../ws)",
        f"  {ENV_AGENT_ID:<16} the agent's user id (optional; must be the key's)",
    ]
    if state:
        lines.append(f"  {ENV_STATE_PATH:<16} the state file (optional; --state overrides it)")
        lines.append(
            f"  {ENV_STORE_DSN:<16} with --accounts: a shared PostgreSQL store, a postgresql:// URL"
        )
        lines.append(f"  {'':<16} (optional; --store overrides it; its password is never printed)")
    lines.append("`python -m parall_bridge emulator` prints a set for a local emulator.")
    return "\n".join(lines)


def _seconds(text: str) -> float:
    """A finite number of seconds >= 0 (an argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _port(text: str) -> int | None:
    """A TCP port number (0: any free one), or ``None`` when ``text`` is not one."""
    try:
        port = int(text)
    except ValueError:
        return None
    return port if 0 <= port <= 65535 else None


def _usage_error(exc: Exception) -> int:
    print(f"configuration error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="parall-bridge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the library against the built-in emulator")
    run = commands.add_parser(
        "run",
        help="run the gateway with a host's runtime",
        description="Run the gateway with a host's runtime until SIGINT or SIGTERM.",
        epilog=_environment_help(state=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("runtime", help="MODULE:NAME of an AgentRuntime (class, instance, factory)")
    run.add_argument("--serial", action="store_true", help="never fork (SerialRoutingStrategy)")
    run.add_argument(
        "--accounts",
        metavar="FILE",
        help="run a fleet of the accounts of this TOML file (keys from the env vars it names)",
    )
    run.add_argument(
        "--store",
        metavar="DSN",
        help=(
            f"with --accounts: keep every account's state in this PostgreSQL database "
            f"({ENV_STORE_DSN}), taking account leases, so several processes share the accounts"
        ),
    )
    run.add_argument(
        "--capacity",
        metavar="N",
        type=_positive_int,
        help="with --store: the most accounts this process holds (default: its fair share)",
    )
    state = run.add_mutually_exclusive_group()
    state.add_argument(
        "--state",
        metavar="PATH",
        help="the state file (PRLL_STATE_PATH; default ./.parall_bridge/<agent id>.db)",
    )
    state.add_argument(
        "--no-state", action="store_true", help="keep the state in memory (not durable)"
    )
    run.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (INFO)",
    )
    commands.add_parser(
        "check",
        help="check the PRLL_* configuration against the platform",
        description=(
            "Check the configuration against the platform, one line per check: the key and\n"
            "the agent, the platform config, the dispatch queue, a WebSocket hello. Nothing\n"
            "is written and nothing is retried. Exit status: 0 when all pass, 1 when one\n"
            "fails, 2 when a variable is missing or malformed."
        ),
        epilog=_environment_help(state=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    emulator = commands.add_parser("emulator", help="serve the Parall emulator locally")
    emulator.add_argument(
        "--port",
        default=str(EMULATOR_PORT),
        help=f"port on 127.0.0.1 ({EMULATOR_PORT}); --port 0 takes any free port (printed)",
    )
    emulator.add_argument(
        "--latency",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait this long before every REST answer, a simulated round trip (0)",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return asyncio.run(run_demo(_print))
    if args.command == "emulator":
        port = _port(args.port)
        if port is None:
            print(
                f"emulator: --port must be a whole number in 0..65535 (0: any free port),"
                f" got {args.port!r}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return asyncio.run(_emulator(port, args.latency))
    if getattr(args, "accounts", None):
        return _run_accounts(args)
    if getattr(args, "store", None) or getattr(args, "capacity", None):
        return _usage_error(
            ConfigurationError("--store and --capacity are for a fleet: give --accounts FILE")
        )
    try:
        overrides = {"state_path": args.state} if getattr(args, "state", None) else {}
        config = GatewayConfig.from_env(**overrides)
    except ConfigurationError as exc:
        return _usage_error(exc)
    if args.command == "check":
        return asyncio.run(check(config))
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # "examples.echo_host:EchoRuntime" from a checkout
    try:
        runtime = load_runtime(args.runtime)
    except ConfigurationError as exc:
        return _usage_error(exc)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    routing = SerialRoutingStrategy() if args.serial else None
    return _run_abandoning(run_gateway(config, runtime, routing=routing, durable=not args.no_state))


def _run_accounts(args: argparse.Namespace) -> int:
    """``run --accounts FILE``: a fleet of the file's accounts."""
    if args.state:
        return _usage_error(
            ConfigurationError("--state names one file: with --accounts, give state_path")
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        configs = load_accounts(args.accounts)
        factory = load_runtime_factory(args.runtime)
    except ConfigurationError as exc:
        return _usage_error(exc)
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(account_id)s]: %(message)s",
            defaults={"account_id": "-"},  # a record of no account
        )
    )
    logging.basicConfig(level=args.log_level, handlers=[handler])
    routing = (lambda _: SerialRoutingStrategy()) if args.serial else None
    dsn = args.store or os.environ.get(ENV_STORE_DSN) or None
    if dsn is not None and args.no_state:
        return _usage_error(ConfigurationError("--no-state and a shared store contradict"))
    if args.capacity is not None and dsn is None:
        return _usage_error(
            ConfigurationError(f"--capacity needs a shared store: --store DSN or {ENV_STORE_DSN}")
        )
    store = PostgresStateStore(dsn) if dsn is not None else None
    return _run_abandoning(
        run_fleet(
            configs,
            factory,
            routing_factory=routing,
            durable=not args.no_state,
            store=store,
            capacity=args.capacity,
        )
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {text!r}")
    return value


def _run_abandoning(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` in a new event loop and close it without waiting again for tasks still
    pending: the gateway already gave its turns ``shutdown_grace`` and then
    ``cancel_grace``, and abandoned a host turn that ignores its cancellation
    (``asyncio.run`` would wait for it forever). Async generators are closed as usual."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            left = [task for task in asyncio.all_tasks(loop) if not task.done()]
            if left:
                _print(f"abandoning {len(left)} task(s) that ignore their cancellation")
                for task in left:
                    task.cancel()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
