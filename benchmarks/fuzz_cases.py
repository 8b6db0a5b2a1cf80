"""The hostile inputs of :mod:`benchmarks.fuzz`: WebSocket frames and REST answers, as
hypothesis strategies, drawn reproducibly from a seed.

A case is data, not text: JSON values are built from plain Python values plus three
markers rendered only when the case runs, so that 2,000 cases hold no megabytes:

- :class:`Raw`: JSON text spliced in as is (depth bombs, ``1e400``, a 5,000-digit
  integer, ``NaN``: what a Python value cannot say, or ``json.dumps`` would refuse);
- :class:`Big`: a string of ``size`` characters;
- :class:`Ref`: an id of the rig the case runs in (``chat``, ``agent``...), or a fresh
  fake id (``fake_message``...), filled in by :func:`render`.

The kinds (one row of the report each) are in :data:`WS_KINDS` and :data:`REST_KINDS`.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal

import attrs
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from parall_bridge import protocol as p
from parall_bridge.ws import DEFAULT_MAX_FRAME_SIZE

__all__ = [
    "GATEWAY_ENDPOINTS",
    "LIST_ENDPOINTS",
    "REST_ENDPOINTS",
    "REST_KINDS",
    "WS_KINDS",
    "Answer",
    "Big",
    "Raw",
    "Ref",
    "RestCase",
    "WsCase",
    "draw_cases",
    "render",
    "summary",
]

TS: Final = "2026-11-24T10:00:00.000Z"

# --- JSON values with markers --------------------------------------------------------------


@attrs.frozen
class Raw:
    """JSON text spliced in as is."""

    text: str


@attrs.frozen
class Big:
    """A JSON string of ``size`` characters (built when rendered)."""

    size: int
    char: str = "x"


@attrs.frozen
class Ref:
    """An id of the rig, or a fresh fake id, filled in when rendered."""

    name: str


def render(value: Any, ids: Mapping[str, str]) -> str:
    """The JSON text of ``value`` (markers included), with the rig's ``ids``."""
    parts: list[str] = []
    _render(value, ids, parts, full=True)
    return "".join(parts)


def summary(value: Any, limit: int = 160) -> str:
    """A short, readable rendering of ``value`` for reports (big parts abbreviated)."""
    parts: list[str] = []
    _render(value, {}, parts, full=False)
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _render(value: Any, ids: Mapping[str, str], out: list[str], *, full: bool) -> None:
    if isinstance(value, Raw):
        if full or len(value.text) <= 40:
            out.append(value.text)
        else:
            out.append(f"{value.text[:16]}…<{len(value.text)} chars>…{value.text[-8:]}")
    elif isinstance(value, Big):
        out.append(json.dumps(value.char * value.size) if full else f'"<{value.size} chars>"')
    elif isinstance(value, Ref):
        out.append(json.dumps(ids.get(value.name, f"${value.name}")))
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            out.append(json.dumps(str(key)))
            out.append(":")
            _render(item, ids, out, full=full)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _render(item, ids, out, full=full)
        out.append("]")
    elif isinstance(value, str) and not full and len(value) > 40:
        out.append(json.dumps(value[:24] + "…"))
    else:
        out.append(json.dumps(value))  # str (ASCII-escaped), int, float (NaN...), bool, None


# --- valid-looking objects (PROTOCOL.md "Objects") ----------------------------------------


def _user() -> dict[str, Any]:
    return {
        "id": Ref("agent"),
        "display_name": "Fuzz",
        "type": "agent",
        "status": "active",
        "avatar_url": None,
    }


def _chat() -> dict[str, Any]:
    return {
        "id": Ref("chat"),
        "org_id": Ref("org"),
        "type": "direct",
        "name": None,
        "description": None,
        "agent_routing_mode": "passive",
        "created_at": TS,
        "updated_at": TS,
    }


def _message() -> dict[str, Any]:
    return {
        "id": Ref("fake_message"),
        "chat_id": Ref("chat"),
        "sender_id": Ref("human"),
        "sender": {"id": Ref("human"), "display_name": "Ada", "type": "human"},
        "message_type": "text",
        "content": {"text": "fuzz", "mentions": [{"user_id": Ref("agent")}]},
        "thread_root_id": None,
        "hints": None,
        "attachment_ids": [],
        "attachments": [{"id": "att_fuzz", "file_name": "f.txt", "mime_type": "text/plain"}],
        "created_at": TS,
    }


def _task() -> dict[str, Any]:
    return {
        "id": Ref("fake_task"),
        "org_id": Ref("org"),
        "identifier": "T-1",
        "title": "fuzz",
        "description": None,
        "status": "todo",
        "priority": "normal",
        "assignee_id": Ref("agent"),
        "creator_id": Ref("human"),
        "created_at": TS,
        "updated_at": TS,
    }


def _dispatch_item() -> dict[str, Any]:
    return {
        "id": Ref("fake_dispatch"),
        "event_type": "message",
        "source_type": "message",
        "source_id": Ref("fake_message"),
        "chat_id": Ref("chat"),
        "task_id": None,
        "status": "pending",
        "delivery_reason": "direct",
        "created_at": TS,
    }


def _session() -> dict[str, Any]:
    return {
        "id": "ses_fuzz",
        "status": "active",
        "runtime_type": "fuzz",
        "runtime_key": "k",
        "runtime_ref": {},
        "created_at": TS,
    }


def _step() -> dict[str, Any]:
    return {
        "id": "stp_fuzz",
        "step_type": "text",
        "target_type": "chat",
        "target_id": Ref("chat"),
        "content": {"text": "x"},
        "group_key": None,
        "created_at": TS,
    }


def _page(item: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def page() -> dict[str, Any]:
        return {"data": [item()], "has_more": False, "next_cursor": None}

    return page


TEMPLATES: Final[dict[str, Callable[[], Any]]] = {
    "user": _user,
    "chat": _chat,
    "message": _message,
    "task": _task,
    "dispatch_item": _dispatch_item,
    "session": _session,
    "step": _step,
    "config": lambda: {"version": 3, "models": ["m"], "defaults": {"model": "m"}},
    "ws_ticket": lambda: {"ticket": "tkt_fuzz", "ws_url": Ref("ws_url"), "expires_at": TS},
    "upload_ticket": lambda: {"attachment_id": "att_fuzz", "upload_url": Ref("upload_url")},
    "file_url": lambda: {"url": Ref("file_url")},
    "acked": lambda: {"acked": 1},
    "empty": lambda: {},
    "chat_page": _page(_chat),
    "message_page": _page(_message),
    "dispatch_page": _page(_dispatch_item),
    "hello": lambda: {"session_id": "wss_fuzz", "heartbeat_interval": 30},
    "chat_update": lambda: {
        "chat_id": Ref("chat"),
        "changes": {"type": "direct", "name": "x", "agent_routing_mode": "active"},
    },
    "config_update": lambda: {"version": 4},
    "pong": lambda: {"ts": 1_700_000_000_000},
}

# --- endpoints -------------------------------------------------------------------------------

REST_ENDPOINTS: Final[dict[p.Endpoint, str]] = {
    p.ME: "user",
    p.AGENT_ME: "user",
    p.LIST_CHATS: "chat_page",
    p.GET_CHAT: "chat",
    p.LIST_MEMBER_CHATS: "chat_page",
    p.LIST_CHAT_MESSAGES: "message_page",
    p.SEND_MESSAGE: "message",
    p.GET_MESSAGE: "message",
    p.LIST_REPLIES: "message_page",
    p.GET_TASK: "task",
    p.UPDATE_TASK: "task",
    p.PRESIGN_UPLOAD: "upload_ticket",
    p.COMPLETE_UPLOAD: "empty",
    p.GET_FILE_URL: "file_url",
    p.WS_TICKET: "ws_ticket",
    p.LIST_DISPATCH: "dispatch_page",
    p.ACK_DISPATCH: "acked",
    p.ACK_DISPATCH_BY_ID: "acked",
    p.MARK_DISPATCH_RECEIVED: "empty",
    p.CREATE_AGENT_SESSION: "session",
    p.UPDATE_AGENT_SESSION: "session",
    p.CREATE_AGENT_STEP: "step",
    p.AGENT_CONFIG: "config",
}
"""Every REST row of PROTOCOL.md (the pre-signed upload PUT aside), with the template of
its answer."""

PAGE_ITEMS: Final = {
    "chat_page": "chat",
    "message_page": "message",
    "dispatch_page": "dispatch_item",
}
"""The item template of each page template."""

LIST_ENDPOINTS: Final = (p.LIST_CHATS, p.LIST_MEMBER_CHATS, p.LIST_REPLIES, p.LIST_DISPATCH)
"""The lists the client walks page by page (``iter_*``)."""

GATEWAY_ENDPOINTS: Final = frozenset(
    {
        p.ME,
        p.CREATE_AGENT_SESSION,
        p.AGENT_CONFIG,
        p.LIST_CHATS,
        p.LIST_DISPATCH,
        p.WS_TICKET,
        p.GET_CHAT,
        p.GET_MESSAGE,
        p.GET_TASK,
        p.GET_FILE_URL,
        p.MARK_DISPATCH_RECEIVED,
        p.CREATE_AGENT_STEP,
        p.UPDATE_AGENT_SESSION,
        p.SEND_MESSAGE,
        p.ACK_DISPATCH,
        p.ACK_DISPATCH_BY_ID,
    }
)
"""The endpoints a running gateway calls (the others are the client's alone)."""

# --- hostile values ------------------------------------------------------------------------

DEPTHS: Final = (10, 100, 500, 990, 1000, 2000, 5000, 10_000)
BIG_SIZES: Final = (10_000, 100_000, 1_000_000)
UNICODE: Final = (
    "\u202eevil\u202c",  # right-to-left override
    "zero\u200bwidth\u200d\ufeff",
    "😀👩‍👩‍👧‍👦🏳️‍🌈",
    "nul\u0000byte",
    "e\u0301\u0301\u0301\u0301",  # combining marks
    "\uffff\ufffe\U0010ffff",
    "\uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48",  # fullwidth
    "line\nbreak\r\n\t",
    "'; DROP TABLE users; --",
    "${jndi:ldap://127.0.0.1/x}",
    "%s%s%s%n",
)
LONE_SURROGATES: Final = ('"\\ud800"', '"x\\udfffy"', '"\\udbff\\udbff"')
HUGE_NUMBERS: Final = (
    "1e400",
    "-1e400",
    "1e-400",
    "NaN",
    "Infinity",
    "-Infinity",
    "-0",
    "1" + "0" * 400,  # 10**400: an int, too large for a float
    "1" + "0" * 5000,  # 10**5000: above Python's 4,300-digit limit
    "123456789012345678901234567890",
    "1.7976931348623157e309",
    "0." + "0" * 500 + "1",
)


def depth_bomb(depth: int, form: int) -> Raw:
    """JSON nested ``depth`` levels deep: arrays, objects, or unclosed arrays."""
    if form == 0:
        return Raw("[" * depth + "]" * depth)
    if form == 1:
        return Raw('{"a":' * depth + "1" + "}" * depth)
    return Raw("[" * depth)


def depth_bombs() -> st.SearchStrategy[Raw]:
    """Depth bombs up to 10,000 levels."""
    return st.builds(depth_bomb, st.sampled_from(DEPTHS), st.integers(0, 2))


@functools.cache
def hostile_values() -> st.SearchStrategy[Any]:
    """A value that does not belong where it is put."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(),
        st.text(max_size=40),
        st.sampled_from(UNICODE),
        st.sampled_from(LONE_SURROGATES).map(Raw),
        st.builds(Big, st.sampled_from(BIG_SIZES)),
        depth_bombs(),
        st.sampled_from(HUGE_NUMBERS).map(Raw),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    )


Path = tuple[str | int, ...]


def _paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every node of a template (the root included)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_paths(item, (*prefix, index)))
    return found


@attrs.frozen
class Mutation:
    """Replace a node (``set``), remove it (``delete``), or add an unknown key (``add``)."""

    op: Literal["set", "delete", "add"]
    path: Path
    value: Any = None


def apply(template: Any, mutations: Sequence[Mutation]) -> Any:
    """A mutated deep copy of ``template``."""
    value = copy.deepcopy(template)
    for mutation in mutations:
        if not mutation.path:
            if mutation.op == "set":
                value = mutation.value
            continue
        parent = value
        try:
            for step in mutation.path[:-1]:
                parent = parent[step]
            last = mutation.path[-1]
            if mutation.op == "set":
                parent[last] = mutation.value
            elif mutation.op == "delete":
                del parent[last]
            elif isinstance(parent[last], dict):
                parent[last][f"unknown_{len(parent[last])}"] = mutation.value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced the way there
    return value


def _is_id(step: str | int) -> bool:
    return isinstance(step, str) and (step == "id" or step.endswith("_id"))


@st.composite
def mutated(draw: st.DrawFn, name: str, *, whole: float = 0.1) -> Any:
    """The template ``name`` with one to three mutations: wrong types, nulls (ids
    favoured), missing fields, unknown fields, huge strings, unicode, depth bombs,
    huge numbers; sometimes the whole value is replaced."""
    template = TEMPLATES[name]()
    paths = _paths(template)
    inner = [path for path in paths if path]
    ids = [path for path in inner if _is_id(path[-1])]
    mutations: list[Mutation] = []
    if draw(st.floats(0, 1)) < whole or not inner:
        mutations.append(Mutation("set", (), draw(hostile_values())))
        return apply(template, mutations)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "null_id", "delete", "add"]))
        if op == "null_id" and ids:
            mutations.append(Mutation("set", draw(st.sampled_from(ids)), None))
        elif op == "delete":
            mutations.append(Mutation("delete", draw(st.sampled_from(inner))))
        elif op == "add":
            mutations.append(Mutation("add", draw(st.sampled_from(paths)), draw(hostile_values())))
        else:
            mutations.append(Mutation("set", draw(st.sampled_from(inner)), draw(hostile_values())))
    return apply(template, mutations)


# --- WebSocket frames --------------------------------------------------------------------------


@attrs.frozen
class WsCase:
    """One hostile text frame, then a good event."""

    kind: str
    frame: Any

    def text(self, ids: Mapping[str, str]) -> str:
        """The frame's text for a rig."""
        return self.frame if isinstance(self.frame, str) else render(self.frame, ids)

    def describe(self) -> str:
        """A short description for reports."""
        if isinstance(self.frame, str):
            text = json.dumps(self.frame)
            return text if len(text) <= 120 else text[:119] + "…"
        return summary(self.frame)


_DATA_FRAMES: Final = {
    p.FRAME_HELLO: "hello",
    p.FRAME_MESSAGE_NEW: "message",
    p.FRAME_CHAT_UPDATE: "chat_update",
    p.FRAME_TASK_ASSIGNED: "task",
    p.FRAME_AGENT_CONFIG_UPDATE: "config_update",
    p.FRAME_RECOVERY_OVERFLOW: "empty",
    p.FRAME_DISPATCH_NEW: "dispatch_item",
    p.FRAME_PONG: "pong",
}
_EVENT_FRAMES: Final = (
    p.FRAME_MESSAGE_NEW,
    p.FRAME_TASK_ASSIGNED,
    p.FRAME_CHAT_UPDATE,
    p.FRAME_AGENT_CONFIG_UPDATE,
    p.FRAME_DISPATCH_NEW,
)
HEARTBEAT_INTERVALS: Final[tuple[Any, ...]] = (
    0,
    0.001,
    -1,
    1e9,
    "x",
    None,
    [],
    {},
    True,
    1e-300,
    10**30,
    Raw("1e400"),
    Raw("NaN"),
    Raw("-Infinity"),
    Raw("1" + "0" * 400),
)
SEQS: Final[tuple[Any, ...]] = (
    -1,
    -(10**12),
    0,
    10**12,
    2**63,
    2**64 + 1,
    1.5,
    1e300,
    "1",
    "abc",
    True,
    None,
    [],
    {},
    Raw("1e400"),
    Raw("NaN"),
    Raw("1" + "0" * 5000),
)
NOT_JSON: Final = (
    "",
    " ",
    "{",
    '{"type": "message.new"',
    "undefined",
    "{'type': 'hello'}",
    "<html><body>502 Bad Gateway</body></html>",
    '\ufeff{"type": "hello", "data": {}}',
    '{"type": "hello",}',
    "\x00\x01\x02",
    '{"type": "hello" "data": {}}',
)
KNOWN_TYPES: Final = frozenset(_DATA_FRAMES)


def _frame(frame_type: Any, data: Any, seq: Any = None, *, with_seq: bool = False) -> Any:
    frame: dict[str, Any] = {"type": frame_type}
    if with_seq:
        frame["seq"] = seq
    frame["data"] = data
    return frame


def _data_kind(frame_type: str) -> st.SearchStrategy[WsCase]:
    name = _DATA_FRAMES[frame_type]
    return mutated(name, whole=0.15).map(
        lambda data: WsCase(f"ws/{frame_type}", _frame(frame_type, data))
    )


@st.composite
def _hello_interval(draw: st.DrawFn) -> WsCase:
    interval = draw(st.sampled_from(HEARTBEAT_INTERVALS))
    return WsCase(
        "ws/hello interval",
        _frame(p.FRAME_HELLO, {"session_id": "wss_fuzz", "heartbeat_interval": interval}),
    )


@st.composite
def _seq(draw: st.DrawFn) -> WsCase:
    frame_type = draw(st.sampled_from(_EVENT_FRAMES))
    data = TEMPLATES[_DATA_FRAMES[frame_type]]()
    seq = draw(st.sampled_from(SEQS))
    return WsCase("ws/seq absurd", _frame(frame_type, data, seq, with_seq=True))


def _not_json() -> st.SearchStrategy[WsCase]:
    def not_json(text: str) -> bool:
        try:
            json.loads(text)
        except ValueError:
            return True
        return False

    texts = st.one_of(st.sampled_from(NOT_JSON), st.text(max_size=60).filter(not_json))
    return texts.map(lambda text: WsCase("ws/not json", text))


def _not_object() -> st.SearchStrategy[WsCase]:
    values = st.one_of(
        st.lists(st.integers(), max_size=4),
        st.integers(),
        st.floats(),
        st.text(max_size=20),
        st.none(),
        st.booleans(),
        st.just([{"type": "message.new", "data": {}}]),
        depth_bombs(),
        st.sampled_from(HUGE_NUMBERS).map(Raw),
    )
    return values.map(lambda value: WsCase("ws/not object", value))


@st.composite
def _no_type(draw: st.DrawFn) -> WsCase:
    data = draw(st.sampled_from(sorted(_DATA_FRAMES.values())))
    shape = draw(st.integers(0, 3))
    frame: dict[str, Any]
    if shape == 0:
        frame = {"seq": draw(st.sampled_from(SEQS)), "data": TEMPLATES[data]()}
    elif shape == 1:
        bad = draw(st.one_of(st.none(), st.integers(), st.lists(st.text(max_size=5), max_size=2)))
        frame = {"type": bad, "data": TEMPLATES[data]()}
    elif shape == 2:
        frame = {"TYPE": "message.new", "Data": TEMPLATES[data]()}
    else:
        frame = {}
    return WsCase("ws/no type", frame)


@st.composite
def _unknown_type(draw: st.DrawFn) -> WsCase:
    frame_type = draw(
        st.one_of(
            st.text(max_size=30).filter(lambda t: t not in KNOWN_TYPES),
            st.sampled_from(
                ["message.New", "message.new ", "hello\u0000", "dispatch.new.v2", "ping", ""]
            ),
            st.builds(Big, st.sampled_from((1_000, 100_000))),
        )
    )
    data = draw(st.one_of(mutated("message"), hostile_values()))
    return WsCase("ws/unknown type", _frame(frame_type, data))


@st.composite
def _oversized(draw: st.DrawFn) -> WsCase:
    size = draw(
        st.sampled_from(
            (
                DEFAULT_MAX_FRAME_SIZE // 2,
                DEFAULT_MAX_FRAME_SIZE - 4096,
                DEFAULT_MAX_FRAME_SIZE + 1,
                DEFAULT_MAX_FRAME_SIZE + 1_000_000,
                2 * DEFAULT_MAX_FRAME_SIZE,
            )
        )
    )
    frame_type = draw(st.sampled_from([p.FRAME_MESSAGE_NEW, p.FRAME_HELLO, "unknown.big"]))
    data = TEMPLATES["message"]()
    data["content"]["text"] = Big(size)
    return WsCase("ws/oversized", _frame(frame_type, data))


@st.composite
def _ws_depth(draw: st.DrawFn) -> WsCase:
    bomb = draw(depth_bombs())
    where = draw(st.integers(0, 2))
    if where == 0:
        return WsCase("ws/depth bomb", bomb)
    frame_type = draw(st.sampled_from(sorted(KNOWN_TYPES)))
    if where == 1:
        return WsCase("ws/depth bomb", _frame(frame_type, bomb))
    data = TEMPLATES[_DATA_FRAMES[frame_type]]()
    data["fuzz"] = bomb
    return WsCase("ws/depth bomb", _frame(frame_type, data))


WS_KINDS: Final[dict[str, Callable[[], st.SearchStrategy[WsCase]]]] = {
    **{f"ws/{name}": functools.partial(_data_kind, name) for name in _DATA_FRAMES},
    "ws/hello interval": _hello_interval,
    "ws/seq absurd": _seq,
    "ws/not json": _not_json,
    "ws/not object": _not_object,
    "ws/no type": _no_type,
    "ws/unknown type": _unknown_type,
    "ws/oversized": _oversized,
    "ws/depth bomb": _ws_depth,
}
"""Each WebSocket frame kind and its strategy."""

# --- REST answers ---------------------------------------------------------------------------

OK_STATUSES: Final = (200, 200, 200, 201, 202, 206, 299)
ERROR_STATUSES: Final = (400, 401, 403, 404, 409, 410, 413, 418, 422, 429, 429, 500, 502, 503, 504)
CONTENT_TYPES: Final = (
    "application/json",
    "application/json",
    "application/json; charset=utf-8",
    "text/html; charset=utf-8",
    "text/plain",
    "application/octet-stream",
    None,
)
RETRY_AFTERS: Final = (
    b"0",
    b"0.05",
    b"1",
    b"-1",
    b"1e400",
    b"nan",
    b"inf",
    b"-inf",
    b"x",
    b"",
    b"Wed, 21 Oct 2015 07:28:00 GMT",
    b"Fri, 31 Dec 9999 23:59:59 GMT",
    b"Mon, 99 Foo 2026 99:99:99 GMT",
    b"99999999999999999999",
    b"\xff\xfe",
)
NOT_JSON_BODIES: Final = (
    b"",
    b" \r\n ",
    b"not json",
    b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
    b"{",
    b'{"id": ',
    b"\xff\xfe\xfa invalid utf-8",
    b'\xef\xbb\xbf{"id": "usr_x"}',  # a byte-order mark
    b"{'id': 'usr_x'}",
    b'{"id": "usr_x",}',
    b"\x00" * 64,
)
BROKEN_HTTP: Final = (
    b"",
    b"HELLO THERE\r\n\r\n",
    b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n{}",
    b"HTTP/2 200\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\n\r\n",
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"id": "usr_x"}',
    b"HTTP/1.1 999 Whatever\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope",
)
TRUNCATION_EXTRA: Final = (1, 10, 1_000, 1_000_000, 2**31)

Pages = Literal["endless", "repeat"]
REPEAT_PATTERNS: Final = ("same", "alternate", "cycle3", "echo", "empty", "null", "missing")
ENDLESS_PATTERNS: Final = ("counter", "long", "unicode")


@attrs.frozen
class Answer:
    """One crafted HTTP answer (or the recipe of one per request, for pagination).

    Attributes:
        status: the HTTP status.
        content_type: the ``Content-Type`` header (``None``: none sent).
        body: a JSON value (markers included) or raw bytes.
        headers: more headers, values as bytes (``Retry-After``...).
        declared_extra: for a truncated answer, how many bytes ``Content-Length``
            claims beyond what is sent (then the connection is closed).
        cut: for a truncated answer, the share of the body sent (0..1).
        raw: a whole raw response, sent as is (broken HTTP), then the connection closed.
        pages: ``endless`` (a new cursor on every page, ``has_more`` true) or ``repeat``
            (cursors that repeat), built per request.
        pattern: the cursor pattern of ``pages``.
        page_items: items per page (``pages``).
        item: the template of a page item (``pages``).
    """

    status: int = 200
    content_type: str | None = "application/json"
    body: Any = None
    headers: tuple[tuple[str, bytes], ...] = ()
    declared_extra: int = 0
    cut: float = 1.0
    raw: bytes | None = None
    pages: Pages | None = None
    pattern: str = ""
    page_items: int = 0
    item: str = ""

    def describe(self) -> str:
        """A short description for reports."""
        if self.raw is not None:
            text = repr(self.raw[:60]) + (f"…<{len(self.raw)} bytes>" if len(self.raw) > 60 else "")
            return f"raw {text}"
        if self.pages is not None:
            return f"{self.pages} pages ({self.pattern}, {self.page_items} items each)"
        head = f"{self.status} {self.content_type or '<no content type>'}"
        for name, value in self.headers:
            head += f" {name}: {value[:30]!r}"
        body = (
            repr(self.body[:60]) + (f"…<{len(self.body)} bytes>" if len(self.body) > 60 else "")
            if isinstance(self.body, bytes)
            else summary(self.body, 120)
        )
        if self.declared_extra:
            sent = f"{self.cut:.0%} sent, {self.declared_extra} more declared"
            return f"{head} truncated ({sent}) {body}"
        return f"{head} {body}"

    def page(self, hit: int, cursor: str | None) -> Any:
        """The page answered to the ``hit``-th request (0-based) bearing ``cursor``."""
        data = [TEMPLATES[self.item]() for _ in range(self.page_items)]
        page: dict[str, Any] = {"data": data, "has_more": True}
        if self.pages == "endless":
            if self.pattern == "long":
                page["next_cursor"] = f"fz{hit}-" + "c" * 2000
            elif self.pattern == "unicode":
                page["next_cursor"] = f"fz{hit}\u202e😀\u200b"
            else:
                page["next_cursor"] = f"fz{hit}"
            return page
        if self.pattern == "same":
            page["next_cursor"] = "fzA"
        elif self.pattern == "alternate":
            page["next_cursor"] = "fzA" if hit % 2 == 0 else "fzB"
        elif self.pattern == "cycle3":
            page["next_cursor"] = f"fz{hit % 3}"
        elif self.pattern == "echo":
            page["next_cursor"] = cursor or "fzA"
        elif self.pattern == "empty":
            page["next_cursor"] = ""
        elif self.pattern == "null":
            page["next_cursor"] = None
        return page  # "missing": no next_cursor at all


@attrs.frozen
class RestCase:
    """One crafted answer for the first ``times`` requests to ``endpoint``
    (``None``: every request until the case ends), then a good call or event."""

    kind: str
    endpoint: p.Endpoint
    answer: Answer
    times: int | None = 1

    def describe(self) -> str:
        """A short description for reports."""
        times = "every" if self.times is None else f"first {self.times}"
        return f"{self.endpoint} ({times}): {self.answer.describe()}"


def _endpoints(only: Sequence[p.Endpoint] | None = None) -> st.SearchStrategy[p.Endpoint]:
    return st.sampled_from(list(only) if only is not None else list(REST_ENDPOINTS))


def _times() -> st.SearchStrategy[int]:
    return st.sampled_from((1, 1, 2, 4))


def _content_type() -> st.SearchStrategy[str | None]:
    return st.sampled_from(CONTENT_TYPES)


@st.composite
def _rest_not_json(draw: st.DrawFn) -> RestCase:
    answer = Answer(
        status=draw(st.sampled_from(OK_STATUSES)),
        content_type=draw(_content_type()),
        body=draw(st.one_of(st.sampled_from(NOT_JSON_BODIES), st.binary(max_size=40))),
    )
    return RestCase("rest/2xx not json", draw(_endpoints()), answer, draw(_times()))


@st.composite
def _rest_depth(draw: st.DrawFn) -> RestCase:
    endpoint = draw(_endpoints())
    bomb = draw(depth_bombs())
    if draw(st.booleans()):
        body: Any = bomb
    else:
        body = TEMPLATES[REST_ENDPOINTS[endpoint]]()
        if isinstance(body, dict) and body:
            body[draw(st.sampled_from(sorted(body)))] = bomb
        else:
            body = {"fuzz": bomb}
    answer = Answer(status=200, content_type=draw(_content_type()), body=body)
    return RestCase("rest/2xx depth bomb", endpoint, answer, draw(_times()))


@st.composite
def _rest_numbers(draw: st.DrawFn) -> RestCase:
    endpoint = draw(_endpoints())
    number = Raw(draw(st.sampled_from(HUGE_NUMBERS)))
    template = TEMPLATES[REST_ENDPOINTS[endpoint]]()
    paths = [path for path in _paths(template) if path]
    if not paths or draw(st.integers(0, 4)) == 0:
        body: Any = number
    else:
        body = apply(template, [Mutation("set", draw(st.sampled_from(paths)), number)])
    answer = Answer(status=200, content_type=draw(_content_type()), body=body)
    return RestCase("rest/2xx huge numbers", endpoint, answer, draw(_times()))


@st.composite
def _rest_shape(draw: st.DrawFn) -> RestCase:
    endpoint = draw(_endpoints())
    body = draw(mutated(REST_ENDPOINTS[endpoint], whole=0.2))
    answer = Answer(
        status=draw(st.sampled_from(OK_STATUSES)), content_type=draw(_content_type()), body=body
    )
    return RestCase("rest/2xx wrong shape", endpoint, answer, draw(_times()))


@st.composite
def _error_body(draw: st.DrawFn, status: int) -> Any:
    text = st.one_of(st.text(max_size=30), hostile_values())
    form = draw(st.integers(0, 4))
    if form == 0:
        return {
            "error": {
                "code": draw(st.one_of(st.just("NOT_FOUND"), text)),
                "message": draw(text),
                "status": draw(st.one_of(st.just(status), hostile_values())),
                "details": draw(hostile_values()),
            }
        }
    if form == 1:
        return {"error": draw(text)}
    if form == 2:
        return {"message": draw(text)}
    if form == 3:
        return draw(st.one_of(st.sampled_from(NOT_JSON_BODIES), st.binary(max_size=40)))
    return draw(hostile_values())


@st.composite
def _rest_error(draw: st.DrawFn) -> RestCase:
    status = draw(st.sampled_from(ERROR_STATUSES))
    headers: tuple[tuple[str, bytes], ...] = ()
    if status in (429, 503) or draw(st.integers(0, 5)) == 0:
        headers = (("Retry-After", draw(st.sampled_from(RETRY_AFTERS))),)
    answer = Answer(
        status=status,
        content_type=draw(_content_type()),
        body=draw(_error_body(status)),
        headers=headers,
    )
    return RestCase("rest/error status", draw(_endpoints()), answer, draw(_times()))


@st.composite
def _rest_truncated(draw: st.DrawFn) -> RestCase:
    endpoint = draw(_endpoints())
    status = draw(st.sampled_from((200, 200, 201, 404, 500)))
    body = TEMPLATES[REST_ENDPOINTS[endpoint]]() if status < 400 else draw(_error_body(status))
    answer = Answer(
        status=status,
        content_type=draw(_content_type()),
        body=body,
        declared_extra=draw(st.sampled_from(TRUNCATION_EXTRA)),
        cut=draw(st.sampled_from((0.0, 0.5, 0.99, 1.0))),
    )
    return RestCase("rest/truncated", endpoint, answer, draw(_times()))


@st.composite
def _rest_broken(draw: st.DrawFn) -> RestCase:
    raw = draw(st.one_of(st.sampled_from(BROKEN_HTTP), st.binary(min_size=1, max_size=80)))
    return RestCase("rest/broken http", draw(_endpoints()), Answer(raw=raw), draw(_times()))


@st.composite
def _rest_pages(draw: st.DrawFn, pages: Pages) -> RestCase:
    endpoint = draw(_endpoints(LIST_ENDPOINTS))
    patterns = ENDLESS_PATTERNS if pages == "endless" else REPEAT_PATTERNS
    item = PAGE_ITEMS[REST_ENDPOINTS[endpoint]]
    answer = Answer(
        content_type=draw(_content_type()),
        pages=pages,
        pattern=draw(st.sampled_from(patterns)),
        page_items=draw(st.integers(0, 3)),
        item=item,
    )
    kind = "rest/endless pages" if pages == "endless" else "rest/repeating cursor"
    return RestCase(kind, endpoint, answer, None)


REST_KINDS: Final[dict[str, Callable[[], st.SearchStrategy[RestCase]]]] = {
    "rest/2xx not json": _rest_not_json,
    "rest/2xx depth bomb": _rest_depth,
    "rest/2xx huge numbers": _rest_numbers,
    "rest/2xx wrong shape": _rest_shape,
    "rest/error status": _rest_error,
    "rest/truncated": _rest_truncated,
    "rest/broken http": _rest_broken,
    "rest/endless pages": lambda: _rest_pages("endless"),
    "rest/repeating cursor": lambda: _rest_pages("repeat"),
}
"""Each REST answer kind and its strategy."""

# --- drawing ---------------------------------------------------------------------------------

Case = WsCase | RestCase


def _draw(strategy: st.SearchStrategy[Case], count: int, seed: int) -> list[Case]:
    """``count`` examples of ``strategy``, the same for the same seed (repeated when the
    strategy has fewer distinct ones)."""
    found: list[Case] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(case: Case) -> None:
        found.append(case)

    collect()
    if not found:
        raise RuntimeError("hypothesis drew no example")
    return [found[i % len(found)] for i in range(count)]


WEIGHTS: Final = {"rest/endless pages": 0.25}
"""Shares of the kinds, relative to 1 (a list that never ends costs a case a whole walk up
to ``max_pages``, whatever its details: a few cases tell it)."""


def plan(cases: int) -> dict[str, int]:
    """How many cases of each kind: ``cases`` split over every kind by :data:`WEIGHTS`
    (each kind gets one at least)."""
    kinds = [*WS_KINDS, *REST_KINDS]
    weights = {kind: WEIGHTS.get(kind, 1.0) for kind in kinds}
    total = sum(weights.values())
    shares = {kind: cases * weight / total for kind, weight in weights.items()}
    counts = {kind: max(1, int(share)) for kind, share in shares.items()}
    by_remainder = sorted(kinds, key=lambda kind: int(shares[kind]) - shares[kind])
    for kind in by_remainder[: max(0, cases - sum(counts.values()))]:
        counts[kind] += 1
    return counts


def draw_cases(cases: int, seed: int) -> list[Case]:
    """``cases`` hostile cases over every kind, reproducible from ``seed``, interleaved
    so that any prefix covers every kind."""
    strategies: dict[str, Callable[[], st.SearchStrategy[Case]]] = {**WS_KINDS, **REST_KINDS}
    drawn: dict[str, list[Case]] = {}
    for index, (kind, count) in enumerate(plan(cases).items()):
        drawn[kind] = _draw(strategies[kind](), count, seed * 1_000 + index)
    ordered: list[Case] = []
    while any(drawn.values()):
        for kind in list(drawn):
            if drawn[kind]:
                ordered.append(drawn[kind].pop(0))
    return ordered
