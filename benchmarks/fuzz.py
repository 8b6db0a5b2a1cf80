"""Fuzzing: hostile WebSocket frames and REST answers against the real client and a running
gateway, over real sockets (issue 15, "Hostile input and outages", item 8).

Cases come from hypothesis strategies (:mod:`benchmarks.fuzz_cases`), reproducible from
``--seed`` and split over the kinds of the report (an endless list gets a quarter share):

- WebSocket frames (``ws/...``): valid-looking frames of every type PROTOCOL.md names with
  mutated ``data`` (wrong types, nulls, missing ids, huge strings, unicode, depth bombs up
  to 10,000 levels, ``1e400``, ``10**5000``), absurd ``seq`` values, ``hello`` with an
  absurd ``heartbeat_interval``, text that is not JSON, JSON that is not an object, frames
  without a type or of an unknown type, oversized frames. Each is sent with the emulator's
  ``send_raw``, then a good event follows (a human posts a message).
- REST answers (``rest/...``): for every endpoint of PROTOCOL.md, the first N requests get
  a crafted answer from a hostile front (:mod:`benchmarks.fuzz_front`) that forwards
  everything else to the emulator: 2xx with bodies that are not JSON, depth bombs, huge
  numbers, wrong shapes, nulls where ids go, missing fields, long strings; error statuses
  with the three error body forms and garbage (and absurd ``Retry-After``); truncated
  bodies (a ``Content-Length`` above what is sent, then the connection closed); broken
  HTTP; pagination that never ends and cursors that repeat. Content types vary (JSON,
  HTML, none).

Each case runs against two targets at once (each has its own agent, chat, key and log
capture), over loopback sockets:

- ``client``: the real :class:`~parall_bridge.ParallClient` (the endpoint's method:
  ``get_message``, ``iter_dispatch``...) or the real :class:`~parall_bridge.ParallWs`
  (connected; the frame, then the good ``message.new`` must be delivered);
- ``gateway``: a running :class:`~parall_bridge.Gateway` (endpoints it calls only): the
  hostile answer or frame is provoked (a turn, a ``hello``, a reconnect, a smart-mode
  message...), then the next good message must start a turn within ``--bound`` seconds,
  and then a ``chat.update`` of an unknown chat must still reach its WebSocket (a catch-up
  can handle the good message while the WebSocket no longer delivers anything).

Every case gets one outcome per target:

- ``typed``: a :class:`~parall_bridge.ParallError` reached the caller (the gateway: it
  stopped with one, as for a revoked key);
- ``skipped``: nothing reached the caller (the call returned; the WebSocket or the gateway
  dropped the input, logged it and went on);
- ``non-library``: an exception that is not a ``ParallError`` left the client, or a library
  task logged an ERROR with a traceback (a task of the gateway or of ``ParallWs`` crashed),
  or a turn's ``send_message`` raised one to the runtime;
- ``stuck``: the call did not return within the bound, the WebSocket stopped delivering, the
  next good event was not handled within the bound, or the gateway kept walking a list
  that never ends.

So that an outcome belongs to its case, every target starts a case sound: a target is
replaced after any case that was not ``skipped``; a new ``ParallWs`` or gateway handles one
event before its first case (a client without a ``seq`` yet has nothing to resume from);
the gateway's timed catch-up is an hour away (:data:`RECONCILE_INTERVAL`). Clients retry
with short delays (:data:`RETRY`). Several rigs (emulator, front, both targets) run side by
side, each rebuilt every :data:`BATCH` cases. The 100 MB case (a valid message whose text is
100 MiB, streamed by the front from a generator) runs in a child process per target, which
reports the growth of its peak RSS (``VmHWM``, read before and after).

Run ``make fuzz`` (or ``python -m benchmarks.fuzz``); it prints the table, the 100 MB
line and the distinct findings, and exits 1 when a case was ``non-library`` or ``stuck``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import contextvars
import enum
import itertools
import json
import logging
import resource
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs

from parall_bridge import (
    AgentRuntime,
    AgentStep,
    Gateway,
    GatewayConfig,
    Message,
    ParallClient,
    ParallError,
    ParallWs,
    RetryPolicy,
    Turn,
)
from parall_bridge import protocol as p
from parall_bridge.testing import AgentAccount, FakeParallServer
from parall_bridge.ws import Backoff, ConnectionState

from . import _common
from .fuzz_cases import (
    GATEWAY_ENDPOINTS,
    REST_KINDS,
    WS_KINDS,
    Answer,
    Case,
    RestCase,
    WsCase,
    draw_cases,
)
from .fuzz_front import BigBody, HostileFront, Rule, endpoint_pattern

__all__ = ["BigResult", "Finding", "FuzzReport", "Outcome", "Target", "fuzz", "main"]

T = TypeVar("T")

DEFAULT_CASES: Final = 2000
DEFAULT_BOUND: Final = 10.0
"""Seconds within which a call must return, or the next good event be handled."""
DEFAULT_RIGS: Final = 6
"""Rigs run side by side (a stuck case waits out the bound without holding up the rest)."""
BATCH: Final = 100
"""Cases one rig runs before it is rebuilt."""
BIG_BODY_MIB: Final = 100
_BIG_ANSWER: Final = Answer(status=200, content_type="application/json")
"""The head of the big body's answer (its body is generated by :class:`BigBody`)."""
CLIENT_TIMEOUT: Final = 5.0
"""The clients' per-attempt timeout."""
MAX_PAGES: Final = 100
"""The clients' ``max_pages`` (the library's default is 1,000, tested in
``tests/test_client.py``): an endless list then ends in a fraction of the bound on a
loaded machine, so the bound judges the rule, not the speed of loopback."""
RETRY: Final = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, jitter=0.01, max_retry_after=2.0)
"""The default retry policy with short delays (a ``Retry-After`` above 2 s raises at once)."""
BACKOFF: Final = Backoff(maximum=0.5, jitter=0.1, reset_after=1.0)
"""Reconnect and start-up delays of the WebSocket and the gateway, short for the run."""
PROBE_PREFIX: Final = "cht_fuzzprobe"
"""Chat ids of the probes that check a gateway's WebSocket still delivers."""
RECONCILE_INTERVAL: Final = 3600.0
"""The gateway target's timed catch-up: never within a case. Only the live path and the
catch-ups a ``hello`` or ``recovery.overflow`` asks for can handle the good event, so a
timed pass cannot hide a WebSocket that stopped delivering (and leave the damage to be
charged to the next case)."""
SETUP_TIMEOUT: Final = 30.0
"""Seconds a new target gets to be ready (its start is not a case: no outcome hangs on it)."""
STOP_TIMEOUT: Final = 15.0
"""Seconds a gateway gets to stop before it is cancelled."""
POLL: Final = 0.005
LAG_PROBE: Final = 0.1
"""Seconds between two probes of the harness's own event-loop lag."""
CHILD_TIMEOUT: Final = 300.0
FINDINGS_SHOWN: Final = 40
ROOT: Final = Path(__file__).resolve().parent.parent
"""The checkout: the big-body child runs from it."""
LIBRARY_LOGGER: Final = "parall_bridge"
EMULATOR_LOGGERS: Final = "parall_bridge.testing"

_TAG: contextvars.ContextVar[str | None] = contextvars.ContextVar("fuzz_target", default=None)
"""Which target (rig and generation) a task belongs to: log records are charged to it."""
_TAGS: Final = itertools.count(1)
"""Numbers the tags: a tag is never used twice in a process."""


def new_tag(what: str) -> str:
    """A tag no other target of this process has had."""
    return f"{what}#{next(_TAGS)}"


class Target(enum.StrEnum):
    """What a case runs against."""

    CLIENT = "client"
    GATEWAY = "gateway"


class Outcome(enum.StrEnum):
    """What became of one case on one target (see the module's docstring)."""

    TYPED = "typed"
    SKIPPED = "skipped"
    NON_LIBRARY = "non-library"
    STUCK = "stuck"


OUTCOMES: Final = tuple(Outcome)


@attrs.frozen
class Verdict:
    """One target's outcome for one case, with what to group findings by."""

    outcome: Outcome
    reason: str = ""
    signature: str = ""


@attrs.frozen
class Finding:
    """One distinct defect (a non-library exception or a way of getting stuck)."""

    outcome: Outcome
    signature: str
    kind: str
    target: Target
    reason: str
    example: str
    count: int = 1


@attrs.frozen
class BigResult:
    """The 100 MB case on one target."""

    target: Target
    outcome: Outcome | None
    reason: str
    rss_growth_mib: float
    seconds: float


# --- capture: log records and loop errors, charged to the target that produced them -------


@attrs.frozen
class Logged:
    """An ERROR record with a traceback (or a loop error) of the library."""

    logger: str
    message: str
    exc_type: str
    where: str

    def signature(self) -> str:
        return f"{self.exc_type} at {self.where}, logged as {self.message!r}"


def _where(exc: BaseException) -> str:
    """The innermost frame of the library in ``exc``'s traceback (``file:line in name``)."""
    frames = traceback.extract_tb(exc.__traceback__)
    library = [f for f in frames if "parall_bridge" in f.filename] or frames
    if not library:
        return "?"
    frame = library[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


class LogSink(logging.Handler):
    """Keeps the library's ERROR records with a traceback, per target tag, and counts
    every record by level (the emulator's own loggers are left out)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: collections.defaultdict[str, list[Logged]] = collections.defaultdict(list)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(EMULATOR_LOGGERS):
            return
        self.counts[record.levelname] += 1
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and exc is not None:
            template = record.msg if isinstance(record.msg, str) else repr(record.msg)
            self.errors[_TAG.get() or "?"].append(
                Logged(record.name, template, type(exc).__name__, _where(exc))
            )

    def loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An event-loop exception handler: a library task that died unobserved."""
        exc = context.get("exception")
        task = context.get("task") or context.get("future")
        name = task.get_name() if isinstance(task, asyncio.Task) else ""
        if not isinstance(exc, BaseException) or not name.startswith("parall-"):
            loop.default_exception_handler(context)
            return
        get_context = getattr(task, "get_context", None)  # Python 3.12+
        tag = get_context().get(_TAG) if get_context is not None else None
        message = str(context.get("message", ""))
        self.errors[tag or "?"].append(Logged("asyncio", message, type(exc).__name__, _where(exc)))

    def mark(self, tag: str) -> int:
        """Where ``tag``'s records stand now."""
        return len(self.errors[tag])

    def since(self, tag: str, mark: int) -> list[Logged]:
        """``tag``'s records after ``mark``."""
        return self.errors[tag][mark:]


def _tagged(tag: str, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """Run ``coro`` as a task (and every task it starts) charged to ``tag``."""
    context = contextvars.copy_context()
    context.run(_TAG.set, tag)
    return asyncio.get_running_loop().create_task(coro, name=name, context=context)


async def _settle(task: asyncio.Task[Any], within: float) -> bool:
    """Wait up to ``within`` seconds for ``task``; whether it finished. Cancelling the wait
    cancels the task too (nothing is left running on its own)."""
    try:
        done, _ = await asyncio.wait({task}, timeout=within)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    return bool(done)


async def _probe_lag(report: FuzzReport) -> None:
    """Keep the worst lag of this event loop (how late a 0.1 s sleep wakes up): the bound
    means little when the loop itself is seconds late."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(LAG_PROBE)
        report.lag_max = max(report.lag_max, loop.time() - started - LAG_PROBE)


async def wait_until(predicate: Callable[[], bool], within: float) -> bool:
    """:func:`benchmarks._common.wait_until`, polling every :data:`POLL` seconds."""
    return await _common.wait_until(predicate, within, POLL)


def peak_rss_kib() -> int:
    """The process's peak resident set size so far (``VmHWM``, else ``ru_maxrss``), KiB."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# --- the runtime of the gateway target --------------------------------------------------------


class _RecordingRuntime(AgentRuntime):
    """Records the message (or task) ids of every turn, and replies in chats; an exception
    of ``send_message`` that is not a ``ParallError`` is kept (it left the client)."""

    def __init__(self) -> None:
        self.handled: set[str] = set()
        self.send_errors: list[BaseException] = []

    async def run_turn(self, turn: Turn) -> str | None:
        for event in turn.events:
            self.handled.add(event.message_id)
        if turn.chat_id:
            try:
                await turn.send_message("ok")
            except ParallError:
                pass
            except Exception as exc:  # a non-library exception reached the runtime
                self.send_errors.append(exc)
        return "ok"


# --- one rig ---------------------------------------------------------------------------------

_HELLO_FRAME: Final = json.dumps(
    {"type": p.FRAME_HELLO, "data": {"session_id": "wss_fuzz", "heartbeat_interval": 30}}
)
_OVERFLOW_FRAME: Final = json.dumps({"type": p.FRAME_RECOVERY_OVERFLOW, "data": {}})

_TRIGGERS: Final[dict[p.Endpoint, str]] = {
    p.ME: "start",
    p.CREATE_AGENT_SESSION: "start",
    p.AGENT_CONFIG: "config",
    p.LIST_CHATS: "hello",
    p.LIST_DISPATCH: "overflow",
    p.WS_TICKET: "reconnect",
    p.GET_CHAT: "new chat",
    p.GET_MESSAGE: "smart",
    p.ACK_DISPATCH_BY_ID: "smart",
    p.GET_TASK: "task",
    p.GET_FILE_URL: "file",
    p.MARK_DISPATCH_RECEIVED: "turn",
    p.CREATE_AGENT_STEP: "turn",
    p.UPDATE_AGENT_SESSION: "turn",
    p.SEND_MESSAGE: "turn",
    p.ACK_DISPATCH: "turn",
}
"""How the gateway is made to call each endpoint it calls."""
assert set(_TRIGGERS) == GATEWAY_ENDPOINTS


class RigBroken(RuntimeError):
    """A target could not be made ready again (a harness failure, not a case outcome)."""


class Rig:
    """An emulator, the hostile front before it, and the two targets: agent A's client and
    ``ParallWs``, agent G's gateway (each agent has its own direct chat with Ada)."""

    def __init__(self, index: int, sink: LogSink, bound: float) -> None:
        self.index = index
        self.sink = sink
        self.bound = bound
        self.server = FakeParallServer(org_id="org_fuzz")
        self.front = HostileFront("http://127.0.0.1")  # its upstream is set in open()
        self._serial = 0
        self._ws: ParallWs | None = None
        self._ws_seen: set[str] = set()
        self._ws_tag = ""
        self._gateway: Gateway | None = None
        self._gateway_task: asyncio.Task[None] | None = None
        self._gateway_client: ParallClient | None = None
        self._abort = asyncio.Event()
        self._runtime = _RecordingRuntime()
        self._gateway_tag = ""
        self._probes: set[str] = set()
        self._client_tag = new_tag(f"rig{index}/client")
        self._client: ParallClient | None = None
        self.notes: collections.Counter[str] = collections.Counter()
        """What happened besides the verdicts (restarts, cases not counted)."""
        self.hangs: collections.Counter[str] = collections.Counter()
        """Targets that did not stop when asked (a defect, though of no case)."""

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the emulator and the front, seed them, connect both targets."""
        server = self.server
        await server.start()
        self.front = HostileFront(server.url)
        await self.front.start()
        self.org = server.org_id
        self.ada = server.add_user("Ada")
        self.a: AgentAccount = server.add_agent("Client target")
        self.g: AgentAccount = server.add_agent("Gateway target")
        members = [self.ada.id]
        self.chat_a = server.add_chat(type="direct", members=[*members, self.a.user_id]).id
        self.chat_g = server.add_chat(type="direct", members=[*members, self.g.user_id]).id
        self.smart_g = server.add_chat(
            type="group",
            name="smart",
            members=[*members, self.g.user_id],
            agent_routing_mode="smart",
        ).id
        self.message_a = server.post_message(self.chat_a, self.ada.id, "seed").id
        self.task_a = server.assign_task(
            "seed", assignee_id=self.a.user_id, creator_id=self.ada.id
        ).id
        self.attachment_a = server.add_attachment(
            b"fuzz", file_name="f.txt", mime_type="text/plain"
        )
        self.dispatch_a = server.dispatch_items(self.a.user_id)[0].id
        self._client = ParallClient(
            self.front.url,
            self.a.api_key,
            retry=RETRY,
            timeout=CLIENT_TIMEOUT,
            max_pages=MAX_PAGES,
        )
        session = await self.client.create_agent_session(
            self.org, self.a.user_id, runtime_type="fuzz", runtime_key="fuzz"
        )
        self.session_a = session.id
        self._calls = self._client_calls()
        await self._start_ws()
        if await self._start_gateway() is not None:
            raise RigBroken("the gateway did not start on a fresh rig")
        await self._warm_gateway()

    @property
    def client(self) -> ParallClient:
        """Agent A's client (the client target)."""
        if self._client is None:
            raise RuntimeError("the rig is not open")
        return self._client

    async def close(self) -> None:
        """Stop the targets, the front and the emulator (also after a failed :meth:`open`)."""
        try:
            await self._stop_gateway()
            await self._stop_ws()
            if self._client is not None:
                await self._client.close()
        finally:
            try:
                await self.front.close()
            finally:
                await self.server.close()

    def _ids(self, target: Target) -> dict[str, str]:
        self._serial += 1
        n = f"{self.index}x{self._serial}"
        agent, chat = (self.a, self.chat_a) if target is Target.CLIENT else (self.g, self.chat_g)
        return {
            "org": self.org,
            "agent": agent.user_id,
            "human": self.ada.id,
            "chat": chat,
            "fake_message": f"msg_fz{n}",
            "fake_task": f"tsk_fz{n}",
            "fake_dispatch": f"dsp_fz{n}",
            "ws_url": self.server.ws_url,
            "upload_url": f"{self.front.url}/fuzz/upload/{n}",
            "file_url": f"{self.front.url}/fuzz/file/{n}",
        }

    def _ws_open(self, user_id: str) -> bool:
        return any(
            r.user_id == user_id and r.ticket_ok and r.closed_code is None
            for r in reversed(self.server.ws_connections)
        )

    # --- the ParallWs target ---------------------------------------------------------------

    async def _start_ws(self) -> None:
        self._ws_tag = new_tag(f"rig{self.index}/ws")
        ws = ParallWs(self.client.get_ws_ticket, backoff=BACKOFF)
        seen: set[str] = set()

        def on_message(message: Any) -> None:
            if isinstance(message, Message):
                seen.add(message.id)

        ws.on(p.FRAME_MESSAGE_NEW, on_message)
        self._ws, self._ws_seen = ws, seen
        connect = _tagged(self._ws_tag, ws.connect(), "fuzz-ws-connect")
        if not await _settle(connect, SETUP_TIMEOUT):
            connect.cancel()
            await asyncio.gather(connect, return_exceptions=True)
            raise RigBroken("ParallWs did not connect")
        connect.result()
        # One event first, so that every case starts with a point to resume from: a client
        # with no seq yet reconnects without last_seq (PROTOCOL.md), and what is sent in
        # the gap is then lost to a bare ParallWs whatever the case was.
        first = self.server.post_message(self.chat_a, self.ada.id, "first")
        if not await wait_until(lambda: first.id in seen, SETUP_TIMEOUT):
            raise RigBroken("ParallWs did not deliver its first event")

    async def _stop_ws(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            stop = _tagged(self._ws_tag, ws.disconnect(), "fuzz-ws-disconnect")
            if not await _settle(stop, STOP_TIMEOUT):
                self.hangs[f"ParallWs.disconnect() did not return within {STOP_TIMEOUT:g} s"] += 1
                stop.cancel()
            await asyncio.gather(stop, return_exceptions=True)

    async def _ws_ready(self) -> None:
        ws = self._ws
        if ws is not None and await wait_until(
            lambda: ws.state is ConnectionState.CONNECTED and self._ws_open(self.a.user_id),
            self.bound,
        ):
            return
        self.notes["ParallWs restarted: not connected before its next case"] += 1
        await self._stop_ws()
        await self._start_ws()

    # --- the gateway target ---------------------------------------------------------------

    async def _start_gateway(self, within: float = SETUP_TIMEOUT) -> Verdict | None:
        """Start a gateway; ``None`` once it is ready (within ``within`` seconds), else the
        verdict of its start."""
        self._gateway_tag = new_tag(f"rig{self.index}/gateway")
        client = ParallClient(
            self.front.url,
            self.g.api_key,
            retry=RETRY,
            timeout=CLIENT_TIMEOUT,
            max_pages=MAX_PAGES,
        )
        config = GatewayConfig(
            self.front.url,
            self.g.api_key,
            self.org,
            cold_start_window=None,
            shutdown_grace=1.0,
            reconcile_interval=RECONCILE_INTERVAL,
        )
        self._runtime = _RecordingRuntime()
        self._gateway_client = client
        self._gateway = gateway = Gateway(config, self._runtime, client=client, backoff=BACKOFF)
        self._abort = abort = asyncio.Event()
        self._gateway_task = task = _tagged(self._gateway_tag, gateway.start(abort), "fuzz-gateway")
        ready = asyncio.ensure_future(gateway.wait_ready())
        try:
            done, _ = await asyncio.wait(
                {ready, task}, timeout=within, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not ready.done():
                ready.cancel()
                await asyncio.gather(ready, return_exceptions=True)
        if ready in done and ready.exception() is None:
            ws = gateway.ws
            assert ws is not None
            ws.on(p.FRAME_CHAT_UPDATE, self._on_probe)
            return None
        if ready in done:
            # wait_ready() raises the error start() is about to stop with: let it stop.
            await _settle(task, self.bound)
        if task.done():
            return self._ended(task)
        why = f"the gateway was not ready within {within:g} s"
        return Verdict(Outcome.STUCK, why, why)

    async def _stop_gateway(self) -> None:
        task, self._gateway_task = self._gateway_task, None
        self._abort.set()
        if task is not None:
            if not await _settle(task, STOP_TIMEOUT):
                self.hangs[f"a gateway did not stop within {STOP_TIMEOUT:g} s"] += 1
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        client, self._gateway_client = self._gateway_client, None
        if client is not None:
            await client.close()
        self._gateway = None

    async def _restart_gateway(self) -> None:
        await self._stop_gateway()
        if await self._start_gateway() is not None:
            raise RigBroken("the gateway did not start again")
        await self._warm_gateway()

    async def _warm_gateway(self) -> None:
        """One event first, so that the new gateway has a ``last_seq`` to resume from (as
        for the ``ParallWs`` target)."""
        if not await self._good_event(within=SETUP_TIMEOUT):
            raise RigBroken("a new gateway did not handle its first event")

    def _on_probe(self, update: Any) -> None:
        chat_id = getattr(update, "chat_id", None)
        if isinstance(chat_id, str) and chat_id.startswith(PROBE_PREFIX):
            self._probes.add(chat_id)

    async def _still_delivering(self) -> bool:
        """Whether the gateway's WebSocket still delivers: a ``chat.update`` of an unknown
        chat (which changes nothing) sent now must reach it within the bound."""
        self._serial += 1
        probe = f"{PROBE_PREFIX}{self.index}x{self._serial}"
        self.server.emit(self.g.user_id, p.FRAME_CHAT_UPDATE, {"chat_id": probe, "changes": {}})
        task = self._gateway_task
        return (
            await wait_until(
                lambda: probe in self._probes or task is None or task.done(), self.bound
            )
            and probe in self._probes
        )

    async def _gateway_ready(self) -> None:
        gateway, task = self._gateway, self._gateway_task
        if (
            gateway is not None
            and task is not None
            and await wait_until(
                lambda: (
                    task.done()
                    or (
                        gateway.ws is not None
                        and gateway.ws.state is ConnectionState.CONNECTED
                        and self._ws_open(self.g.user_id)
                    )
                ),
                self.bound,
            )
            and not task.done()
        ):
            return
        self.notes["gateway restarted: not connected before its next case"] += 1
        await self._restart_gateway()

    @staticmethod
    def _ended(task: asyncio.Task[None]) -> Verdict:
        if task.cancelled():
            return Verdict(Outcome.STUCK, "the gateway was cancelled", "")
        exc = task.exception()
        if exc is None:
            return Verdict(Outcome.STUCK, "the gateway stopped on its own", "gateway stopped")
        if isinstance(exc, ParallError):
            return Verdict(Outcome.TYPED, f"the gateway stopped: {type(exc).__name__}")
        return Verdict(
            Outcome.NON_LIBRARY,
            f"the gateway stopped with {type(exc).__name__}: {str(exc)[:100]}",
            f"{type(exc).__name__} at {_where(exc)}, raised by Gateway.start",
        )

    async def _judge_gateway(self, mark: int, sends: int, handled: bool, why: str) -> Verdict:
        """The gateway's outcome after a case: its crashes first, then whether it stopped,
        then whether the good event was handled, then whether its WebSocket still delivers
        (a good event a catch-up handled can hide one that stopped)."""
        logged = self.sink.since(self._gateway_tag, mark)
        if logged:
            return Verdict(Outcome.NON_LIBRARY, logged[0].signature(), logged[0].signature())
        errors = self._runtime.send_errors[sends:]
        if errors:
            exc = errors[0]
            signature = f"{type(exc).__name__} at {_where(exc)}, raised by Turn.send_message"
            return Verdict(Outcome.NON_LIBRARY, signature, signature)
        task = self._gateway_task
        if task is not None and task.done():
            return self._ended(task)
        if why:
            return Verdict(Outcome.STUCK, f"{why} ({self._gateway_state()})", why)
        if not handled:
            why = f"the next message was not handled within {self.bound:g} s"
            return Verdict(Outcome.STUCK, f"{why} ({self._gateway_state()})", why)
        if not await self._still_delivering():
            if task is not None and task.done():
                return self._ended(task)
            why = "the WebSocket stopped delivering (a chat.update sent after the case never came)"
            return Verdict(Outcome.STUCK, f"{why} ({self._gateway_state()})", why)
        return Verdict(Outcome.SKIPPED)

    def _gateway_state(self) -> str:
        """What the gateway is doing, for a stuck case's reason."""
        gateway = self._gateway
        if gateway is None:
            return "no gateway"
        stats = gateway.stats()
        ws = gateway.ws
        return (
            f"connection {stats.connection}, last_seq {ws.last_seq if ws else '-'}, "
            f"queued {stats.queued}, active turns {stats.active_turns}, "
            f"turns started {stats.turns_started}"
        )

    async def _good_event(
        self, also: Callable[[], bool] = lambda: True, *, within: float | None = None
    ) -> bool:
        """Post a message to the gateway's agent; whether its turn started within the bound
        (waiting, within the same bound, for ``also`` to hold too)."""
        good = self.server.post_message(self.chat_g, self.ada.id, "good")
        task = self._gateway_task
        await wait_until(
            lambda: task is None or task.done() or (good.id in self._runtime.handled and also()),
            self.bound if within is None else within,
        )
        return good.id in self._runtime.handled

    # --- cases -------------------------------------------------------------------------------

    async def run(self, case: Case) -> list[tuple[Target, Verdict]]:
        """Run ``case`` on every target it applies to.

        Raises:
            RuntimeError: the hostile front itself failed (a bug of the harness).
        """
        # The targets are independent (their own agent, key, chat, rules and log tag): a
        # case runs on both at once, so a stuck one costs the bound once, not twice.
        runs: dict[Target, Coroutine[Any, Any, Verdict | None]]
        if isinstance(case, WsCase):
            runs = {
                Target.CLIENT: self._ws_client(case),
                Target.GATEWAY: self._ws_gateway(case),
            }
        else:
            runs = {Target.CLIENT: self._rest_client(case)}
            if case.endpoint in GATEWAY_ENDPOINTS:
                runs[Target.GATEWAY] = self._rest_gateway(case)
        results = await asyncio.gather(*runs.values(), return_exceptions=True)
        verdicts: list[tuple[Target, Verdict]] = []
        for target, result in zip(runs, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            if result is not None:
                verdicts.append((target, result))
        if self.front.errors:
            error = self.front.errors[0]
            raise RuntimeError(f"the hostile front failed on {case.describe()}") from error
        return verdicts

    async def _ws_client(self, case: WsCase) -> Verdict:
        await self._ws_ready()
        ws = self._ws
        assert ws is not None
        tag = self._ws_tag
        mark = self.sink.mark(tag)
        connections = len(self.server.ws_connections)
        await self.server.send_raw(case.text(self._ids(Target.CLIENT)), user_id=self.a.user_id)
        good = self.server.post_message(self.chat_a, self.ada.id, "good")
        seen = self._ws_seen
        delivered = await wait_until(
            lambda: good.id in seen or ws.state is ConnectionState.CLOSED, self.bound
        )
        logged = self.sink.since(tag, mark)
        if logged:
            verdict = Verdict(Outcome.NON_LIBRARY, logged[0].signature(), logged[0].signature())
        elif ws.state is ConnectionState.CLOSED:
            verdict = Verdict(Outcome.TYPED, "the WebSocket closed for good")
        elif not delivered or good.id not in seen:
            why = f"the next message.new was not delivered within {self.bound:g} s"
            opened = len(self.server.ws_connections) - connections
            state = (
                f"{why} (state {ws.state.value}, last_seq {ws.last_seq}, "
                f"{opened} connection(s) opened meanwhile)"
            )
            verdict = Verdict(Outcome.STUCK, state, why)
        else:
            verdict = Verdict(Outcome.SKIPPED)
        if verdict.outcome is not Outcome.SKIPPED:
            await self._stop_ws()
            await self._start_ws()
        return verdict

    async def _ws_gateway(self, case: WsCase) -> Verdict:
        await self._gateway_ready()
        mark = self.sink.mark(self._gateway_tag)
        sends = len(self._runtime.send_errors)
        await self.server.send_raw(case.text(self._ids(Target.GATEWAY)), user_id=self.g.user_id)
        handled = await self._good_event()
        verdict = await self._judge_gateway(mark, sends, handled, "")
        await self._after_gateway_case(verdict)
        return verdict

    async def _after_gateway_case(self, verdict: Verdict) -> None:
        """A gateway whose case was not ``skipped`` is replaced by a new one (what it
        logs while stopping belongs to a case already judged)."""
        if verdict.outcome is not Outcome.SKIPPED:
            await self._restart_gateway()

    async def _rest_client(self, case: RestCase) -> Verdict:
        endpoint = case.endpoint
        rule = self.front.arm(
            Rule(
                self.a.api_key,
                endpoint.method,
                endpoint_pattern(endpoint),
                case.answer,
                self._ids(Target.CLIENT),
                case.times,
            )
        )
        try:
            return await self._call_client(endpoint, rule)
        finally:
            self.front.disarm(rule)

    async def _call_client(self, endpoint: p.Endpoint, rule: Rule) -> Verdict:
        """Call the client method of ``endpoint`` (its rule armed) and judge the result."""
        tag = self._client_tag
        mark = self.sink.mark(tag)
        call = _tagged(tag, self._calls[endpoint](), "fuzz-client-call")
        if not await _settle(call, self.bound):
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            why = f"the call did not return within {self.bound:g} s ({rule.hits} crafted answers)"
            return Verdict(Outcome.STUCK, why, f"{endpoint}: the call did not return")
        exc = call.exception()
        logged = self.sink.since(tag, mark)
        if logged:
            return Verdict(Outcome.NON_LIBRARY, logged[0].signature(), logged[0].signature())
        if exc is None:
            return Verdict(Outcome.SKIPPED)
        if isinstance(exc, ParallError):
            return Verdict(Outcome.TYPED, f"{type(exc).__name__}: {str(exc)[:100]}")
        signature = f"{type(exc).__name__} at {_where(exc)}, raised by ParallClient"
        return Verdict(Outcome.NON_LIBRARY, f"{signature}: {str(exc)[:100]}", signature)

    async def _rest_gateway(self, case: RestCase) -> Verdict | None:
        """The gateway's outcome, or ``None`` when the trigger never reached the endpoint."""
        endpoint = case.endpoint
        trigger = _TRIGGERS[endpoint]
        ids = self._ids(Target.GATEWAY)
        rule = Rule(
            self.g.api_key,
            endpoint.method,
            endpoint_pattern(endpoint),
            case.answer,
            ids,
            case.times,
        )
        if trigger == "start":
            await self._stop_gateway()
            self.front.arm(rule)
            try:
                started = await self._start_gateway(self.bound)  # a new tag: records from 0
                if started is None:
                    verdict = await self._judge_gateway(0, 0, await self._good_event(), "")
                else:
                    logged = self.sink.since(self._gateway_tag, 0)
                    verdict = started
                    if logged and started.outcome is not Outcome.NON_LIBRARY:
                        signature = logged[0].signature()
                        verdict = Verdict(Outcome.NON_LIBRARY, signature, signature)
            finally:
                self.front.disarm(rule)
            await self._after_gateway_case(verdict)
            return verdict
        await self._gateway_ready()
        mark = self.sink.mark(self._gateway_tag)
        sends = len(self._runtime.send_errors)
        task = self._gateway_task
        assert task is not None
        self.front.arm(rule)
        why = ""
        try:
            await self._trigger(trigger)
            if not await wait_until(lambda: rule.hits > 0 or task.done(), self.bound):
                self.notes[f"gateway case not counted: {endpoint} was never requested"] += 1
                return None
            paged = case.answer.pages is not None and not task.done()
            if paged:
                # Asked again: a new walk from the first page starts only once the one
                # under way ended (passes and hellos are handled one at a time).
                await self._trigger(trigger)
            handled = await self._good_event(lambda: not paged or rule.listings >= 2)
            if paged and rule.listings < 2:
                why = "the gateway kept walking a list that never ends"
        finally:
            self.front.disarm(rule)
        verdict = await self._judge_gateway(mark, sends, handled, why)
        await self._after_gateway_case(verdict)
        return verdict

    async def _trigger(self, trigger: str) -> None:
        """Make the gateway call the endpoints of ``trigger``."""
        server, g, ada = self.server, self.g.user_id, self.ada.id
        if trigger == "config":
            server.set_agent_config(g, {"fuzz": self._serial})
        elif trigger == "hello":
            await server.send_raw(_HELLO_FRAME, user_id=g)
        elif trigger == "overflow":
            await server.send_raw(_OVERFLOW_FRAME, user_id=g)
        elif trigger == "reconnect":
            await server.close_ws(p.CLOSE_SERVICE_RESTART, "fuzz", user_id=g)
        elif trigger == "new chat":
            chat = server.add_chat(type="direct", members=[ada, g])
            server.post_message(chat.id, ada, "in a new chat")
        elif trigger == "smart":
            server.post_message(self.smart_g, ada, "smart")
        elif trigger == "task":
            server.assign_task("fuzz", assignee_id=g, creator_id=ada)
        elif trigger == "file":
            server.post_file(self.chat_g, ada, b"fuzz", file_name="f.txt", mime_type="text/plain")
        elif trigger == "turn":
            server.post_message(self.chat_g, ada, "trigger")
        else:
            raise ValueError(trigger)

    def _client_calls(self) -> dict[p.Endpoint, Callable[[], Coroutine[Any, Any, object]]]:
        """The client method called for each endpoint."""
        c, org, a = self.client, self.org, self.a.user_id

        async def drain(items: AsyncIterator[object]) -> int:
            count = 0
            async for _ in items:
                count += 1
            return count

        async def upload() -> str:
            return await c.upload_file(org, b"fuzz", file_name="f.txt", mime_type="text/plain")

        step = AgentStep(step_type="text", content={"text": "fuzz"})
        calls: dict[p.Endpoint, Callable[[], Awaitable[object]]] = {
            p.ME: c.get_me,
            p.AGENT_ME: lambda: c.get_agent_me(org),
            p.LIST_CHATS: lambda: drain(c.iter_chats(org)),
            p.GET_CHAT: lambda: c.get_chat(org, self.chat_a),
            p.LIST_MEMBER_CHATS: lambda: drain(c.iter_member_chats(org, a)),
            p.LIST_CHAT_MESSAGES: lambda: c.get_chat_messages(org, self.chat_a),
            p.SEND_MESSAGE: lambda: c.send_message(org, self.chat_a, "fuzz"),
            p.GET_MESSAGE: lambda: c.get_message(self.message_a),
            p.LIST_REPLIES: lambda: drain(c.iter_replies(self.message_a)),
            p.GET_TASK: lambda: c.get_task(org, self.task_a),
            p.UPDATE_TASK: lambda: c.update_task(org, self.task_a, title="fuzz"),
            p.PRESIGN_UPLOAD: upload,
            p.COMPLETE_UPLOAD: upload,
            p.GET_FILE_URL: lambda: c.get_file_url(self.attachment_a),
            p.WS_TICKET: c.get_ws_ticket,
            p.LIST_DISPATCH: lambda: drain(c.iter_dispatch(org)),
            p.ACK_DISPATCH: lambda: c.ack_dispatch(
                org, source_type="message", source_id=self.message_a
            ),
            p.ACK_DISPATCH_BY_ID: lambda: c.ack_dispatch_by_id(org, self.dispatch_a),
            p.MARK_DISPATCH_RECEIVED: lambda: c.mark_dispatch_received(
                org, source_type="message", source_id=self.message_a
            ),
            p.CREATE_AGENT_SESSION: lambda: c.create_agent_session(
                org, a, runtime_type="fuzz", runtime_key="fuzz"
            ),
            p.UPDATE_AGENT_SESSION: lambda: c.update_agent_session(
                org, a, self.session_a, status="active"
            ),
            p.CREATE_AGENT_STEP: lambda: c.create_agent_step(org, a, self.session_a, step),
            p.AGENT_CONFIG: lambda: c.get_agent_config(org, a),
        }

        def as_coroutine(
            call: Callable[[], Awaitable[object]],
        ) -> Callable[[], Coroutine[Any, Any, object]]:
            async def run() -> object:
                return await call()

            return run

        return {endpoint: as_coroutine(call) for endpoint, call in calls.items()}

    # --- the 100 MB body -----------------------------------------------------------------------

    async def big_body(self, target: Target, mib: int) -> tuple[Verdict, int, int]:
        """Answer one ``GET /messages/{id}`` with a valid message (the one asked for) whose
        text is ``mib`` MiB, streamed; return the verdict and the peak RSS (KiB) before
        and after. The client gets it from ``get_message``, the gateway when a smart-mode
        message's ``dispatch.new`` makes it fetch the message."""

        def rule(agent: AgentAccount, chat_id: str, message_id: str) -> Rule:
            head = {
                "id": message_id,
                "chat_id": chat_id,
                "sender_id": self.ada.id,
                "message_type": "text",
                "content": {"text": ""},
            }
            text = json.dumps(head).encode()
            cut = text.rindex(b'""}}') + 1  # the text's opening quote ends the prefix
            big = BigBody(text[:cut], mib * 1024 * 1024, text[cut:])
            pattern = endpoint_pattern(p.GET_MESSAGE)
            return Rule(agent.api_key, "GET", pattern, _BIG_ANSWER, {}, times=1, big=big)

        if target is Target.CLIENT:
            await self.client.get_message(self.message_a)  # warm: every code path loaded
            before = peak_rss_kib()
            armed = self.front.arm(rule(self.a, self.chat_a, self.message_a))
            try:
                verdict = await self._call_client(p.GET_MESSAGE, armed)
            finally:
                self.front.disarm(armed)
            if verdict.outcome is Outcome.SKIPPED:
                verdict = Verdict(Outcome.SKIPPED, f"the {mib} MiB message was accepted")
            return verdict, before, peak_rss_kib()
        warm = self.server.post_message(self.smart_g, self.ada.id, "warm")
        if not await wait_until(lambda: warm.id in self._runtime.handled, self.bound):
            raise RigBroken("the gateway did not handle the warm-up message")
        mark = self.sink.mark(self._gateway_tag)
        sends = len(self._runtime.send_errors)
        before = peak_rss_kib()
        # post_message only queues the frames: the rule is armed before the gateway fetches.
        message = self.server.post_message(self.smart_g, self.ada.id, "big")
        armed = self.front.arm(rule(self.g, self.smart_g, message.id))
        try:
            why = ""
            if not await wait_until(lambda: armed.hits > 0, self.bound):
                why = "the gateway never fetched the message"
            handled = await self._good_event()
        finally:
            self.front.disarm(armed)
        verdict = await self._judge_gateway(mark, sends, handled, why)
        if verdict.outcome is Outcome.SKIPPED:
            accepted = message.id in self._runtime.handled
            what = "a turn ran for it" if accepted else "no turn for it"
            verdict = Verdict(Outcome.SKIPPED, f"the {mib} MiB message: {what}")
        return verdict, before, peak_rss_kib()


# --- the report --------------------------------------------------------------------------------


@attrs.define
class FuzzReport:
    """Outcomes by kind and target, the distinct findings, and the 100 MB figures."""

    cases: int = 0
    seed: int = 0
    bound: float = DEFAULT_BOUND
    seconds: float = 0.0
    rows: dict[tuple[str, Target], collections.Counter[Outcome]] = attrs.field(factory=dict)
    findings: dict[str, Finding] = attrs.field(factory=dict)
    notes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    hangs: collections.Counter[str] = attrs.field(factory=collections.Counter)
    lag_max: float = 0.0
    leftover: list[str] = attrs.field(factory=list)
    """Tasks of the library (``parall-...``) or of the harness (``fuzz-...``) still running
    once every rig was closed."""
    unattributed: list[str] = attrs.field(factory=list)
    big: list[BigResult] = attrs.field(factory=list)
    big_mib: int = 0
    logged: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def add(self, case: Case, target: Target, verdict: Verdict) -> None:
        """Count one outcome (and keep a finding for a defect)."""
        self.rows.setdefault((case.kind, target), collections.Counter())[verdict.outcome] += 1
        if verdict.outcome not in (Outcome.NON_LIBRARY, Outcome.STUCK):
            return
        if verdict.outcome is Outcome.STUCK:
            key = f"stuck: {target} {case.kind}: {verdict.signature or verdict.reason}"
        else:
            key = f"non-library: {target}: {verdict.signature or verdict.reason}"
        example = case.describe()
        found = self.findings.get(key)
        if found is None:
            self.findings[key] = Finding(
                verdict.outcome, key, case.kind, target, verdict.reason, example
            )
        else:
            shorter = example if len(example) < len(found.example) else found.example
            self.findings[key] = attrs.evolve(found, example=shorter, count=found.count + 1)

    @property
    def unreached(self) -> int:
        """Gateway cases not counted: the trigger never made the gateway call the endpoint."""
        return sum(n for note, n in self.notes.items() if note.startswith("gateway case not"))

    def total(self, outcome: Outcome) -> int:
        """Cases with ``outcome``, over every kind and target."""
        return sum(counter[outcome] for counter in self.rows.values())

    @property
    def ok(self) -> bool:
        """No case was ``non-library`` or ``stuck`` (the 100 MB one included), and no
        library task died unobserved."""
        big = any(r.outcome in (Outcome.NON_LIBRARY, Outcome.STUCK, None) for r in self.big)
        return (
            not self.total(Outcome.NON_LIBRARY)
            and not self.total(Outcome.STUCK)
            and not self.unattributed
            and not self.hangs
            and not self.leftover
            and not big
        )

    def table(self) -> list[str]:
        """One line per kind and target: cases, then each outcome."""
        width = max([len(kind) for kind, _ in self.rows] + [len("kind")])
        header = f"{'kind':<{width}}  {'target':<7}  {'cases':>5}" + "".join(
            f"  {outcome.value:>11}" for outcome in OUTCOMES
        )
        lines = [header, "-" * len(header)]
        order = {kind: i for i, kind in enumerate([*WS_KINDS, *REST_KINDS])}
        for kind, target in sorted(self.rows, key=lambda r: (order.get(r[0], 99), r[0], r[1])):
            counter = self.rows[(kind, target)]
            cells = "".join(f"  {counter[outcome]:>11}" for outcome in OUTCOMES)
            lines.append(f"{kind:<{width}}  {target.value:<7}  {sum(counter.values()):>5}{cells}")
        lines.append("-" * len(header))
        totals = "".join(f"  {self.total(outcome):>11}" for outcome in OUTCOMES)
        cases = sum(sum(c.values()) for c in self.rows.values())
        lines.append(f"{'total':<{width}}  {'':<7}  {cases:>5}{totals}")
        return lines

    def lines(self) -> list[str]:
        """The whole report: a summary, the table, the 100 MB line, the findings."""
        lines = [
            f"fuzz: {self.cases} cases (seed {self.seed}) in {self.seconds:.0f} s, "
            f"bound {self.bound:g} s, worst event-loop lag {self.lag_max:.2f} s",
            *self.table(),
            "(client: ParallClient for rest/ rows, ParallWs for ws/ rows; gateway: a running "
            "Gateway, for the endpoints it calls)",
        ]
        for note, count in sorted(self.notes.items()):
            lines.append(f"({count} x {note})")
        for hang, count in sorted(self.hangs.items()):
            lines.append(f"[stuck] {count} x {hang}")
        if self.leftover:
            lines.append(f"[stuck] tasks left running: {', '.join(sorted(self.leftover))}")
        for result in self.big:
            outcome = result.outcome.value if result.outcome else "did not run"
            lines.append(
                f"{self.big_mib} MiB body ({p.GET_MESSAGE}, 2xx, streamed) on the {result.target}: "
                f"{outcome} in {result.seconds:.1f} s, peak RSS +{result.rss_growth_mib:.0f} MiB "
                f"(VmHWM growth of a child process){': ' + result.reason if result.reason else ''}"
            )
        for text in self.unattributed:
            lines.append(f"library task died unobserved: {text}")
        findings = sorted(self.findings.values(), key=lambda f: (f.outcome, -f.count))
        if findings:
            lines.append(f"findings ({len(findings)} distinct):")
        for finding in findings[:FINDINGS_SHOWN]:
            lines.append(f"- [{finding.outcome}] {finding.signature} ({finding.count} case(s))")
            lines.append(f"    e.g. {finding.example}")
            if finding.reason and finding.reason not in finding.signature:
                lines.append(f"    first seen: {finding.reason}")
        if len(findings) > FINDINGS_SHOWN:
            lines.append(f"  ... and {len(findings) - FINDINGS_SHOWN} more")
        lines.append("result: " + ("no defect found" if self.ok else "defects found"))
        return lines


# --- running ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _capture(sink: LogSink) -> Iterator[None]:
    """Install ``sink`` on the library's logger (WARNING and up) and as the loop's exception
    handler, for the duration of the block."""
    library = logging.getLogger(LIBRARY_LOGGER)
    level = library.level
    library.addHandler(sink)
    if library.level == logging.NOTSET or library.level > logging.WARNING:
        library.setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(sink.loop_error)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
        library.removeHandler(sink)
        library.setLevel(level)


async def _worker(
    index: int,
    queue: collections.deque[Case],
    report: FuzzReport,
    sink: LogSink,
    bound: float,
) -> None:
    """Take cases from ``queue`` until it is empty, on a rig rebuilt every :data:`BATCH`
    cases (and when a target cannot be made ready again: the case then runs on a new rig,
    once)."""
    rig: Rig | None = None
    done = 0
    broken: Case | None = None

    async def retire(rig: Rig) -> None:
        try:
            await rig.close()
        finally:
            report.notes.update(rig.notes)
            report.hangs.update(rig.hangs)

    try:
        while queue:
            case = queue.popleft()
            if rig is None:
                rig = Rig(index, sink, bound)
                try:
                    await rig.open()
                except BaseException:
                    await retire(rig)
                    raise
            try:
                verdicts = await rig.run(case)
            except RigBroken:
                if broken is case:
                    raise  # twice in a row: a harness failure
                broken = case
                rig.notes["rig rebuilt: a target could not be made ready again"] += 1
                await retire(rig)
                rig = None
                queue.appendleft(case)
                continue
            broken = None
            for target, verdict in verdicts:
                report.add(case, target, verdict)
            done += 1
            if done % BATCH == 0:
                await retire(rig)
                rig = None
    finally:
        if rig is not None:
            await retire(rig)


async def fuzz(
    cases: int,
    seed: int,
    *,
    bound: float = DEFAULT_BOUND,
    rigs: int = DEFAULT_RIGS,
    big_body_mib: int = 0,
) -> FuzzReport:
    """Run ``cases`` hostile cases (seeded) on both targets and return the report.

    Args:
        cases: how many cases, split evenly over the kinds (each kind gets one at least).
        seed: the seed of the cases.
        bound: seconds a call or the next good event may take.
        rigs: rigs run side by side.
        big_body_mib: size of the big-body case (run in child processes); 0 skips it.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    drawn = draw_cases(cases, seed)
    report = FuzzReport(cases=len(drawn), seed=seed, bound=bound, big_mib=big_body_mib)
    # The big body runs in one child process per target, alongside the cases (each child
    # measures its own peak RSS).
    children = [
        loop.create_task(_big_body(target, big_body_mib, bound), name=f"fuzz-big-{target}")
        for target in (Target if big_body_mib > 0 else ())
    ]
    sink = LogSink()
    queue = collections.deque(drawn)
    with _capture(sink):
        probe = loop.create_task(_probe_lag(report), name="fuzz-lag")
        workers = [
            loop.create_task(_worker(i, queue, report, sink, bound), name=f"fuzz-worker-{i}")
            for i in range(max(1, min(rigs, len(drawn))))
        ]
        try:
            await asyncio.gather(*workers)
            report.big = list(await asyncio.gather(*children))
        finally:
            tasks = [*workers, *children, probe]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    current = asyncio.current_task()
    report.leftover = [
        task.get_name()
        for task in asyncio.all_tasks()
        if task is not current and task.get_name().startswith(("parall-", "fuzz-"))
    ]
    report.unattributed = [f"{e.exc_type} at {e.where}: {e.message}" for e in sink.errors["?"]]
    report.logged = sink.counts
    report.seconds = time.monotonic() - started
    return report


# --- the 100 MB case, in a child process ------------------------------------------------------


async def _big_body(target: Target, mib: int, bound: float) -> BigResult:
    """Run the big-body case on ``target`` in a child process (so that its peak RSS is the
    case's, not the harness's) and read its result line."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.fuzz",
        "--big-body-child",
        target.value,
        "--big-body-mib",
        str(mib),
        "--bound",
        str(bound),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return BigResult(target, Outcome.STUCK, "the child did not finish", 0.0, CHILD_TIMEOUT)
    except BaseException:  # cancelled (the run failed): no child outlives it
        proc.kill()
        await proc.wait()
        raise
    seconds = time.monotonic() - started
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        data = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return BigResult(target, None, f"the child failed: {tail[0]}", 0.0, seconds)
    growth = (int(data["after_kib"]) - int(data["before_kib"])) / 1024
    return BigResult(target, Outcome(data["outcome"]), str(data["reason"]), growth, seconds)


async def _big_body_child(target: Target, mib: int, bound: float) -> dict[str, object]:
    sink = LogSink()
    with _capture(sink):
        rig = Rig(0, sink, bound)
        try:
            await rig.open()
            verdict, before, after = await rig.big_body(target, mib)
        finally:
            await rig.close()
    return {
        "outcome": verdict.outcome.value,
        "reason": verdict.reason,
        "before_kib": before,
        "after_kib": after,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer and print its report; exit 1 if a case was non-library or stuck."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__)
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bound", type=float, default=DEFAULT_BOUND)
    parser.add_argument("--rigs", type=int, default=DEFAULT_RIGS)
    parser.add_argument("--big-body-mib", type=int, default=BIG_BODY_MIB)
    parser.add_argument(
        "--big-body-child", choices=[t.value for t in Target], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    logging.getLogger(LIBRARY_LOGGER).propagate = False  # counted, not printed
    if args.big_body_child:
        result = asyncio.run(
            _big_body_child(Target(args.big_body_child), args.big_body_mib, args.bound)
        )
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    report = asyncio.run(
        fuzz(
            args.cases, args.seed, bound=args.bound, rigs=args.rigs, big_body_mib=args.big_body_mib
        )
    )
    for line in report.lines():
        sys.stdout.write(line + "\n")
    logged = ", ".join(f"{n} {level}" for level, n in sorted(report.logged.items()))
    sys.stdout.write(f"library log records: {logged or 'none'}\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
