"""Models and the converter: wire shapes, unknown fields and enum values, datetimes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import cattrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parall_bridge import (
    MENTION_ALL_USER_ID,
    AgentConfig,
    AgentSession,
    AgentStep,
    Chat,
    ChatType,
    ChatUpdate,
    DispatchEventType,
    DispatchItem,
    DispatchStatus,
    Hello,
    MediaContent,
    Mention,
    Message,
    MessageType,
    Page,
    RoutingMode,
    SourceType,
    StepType,
    TargetType,
    Task,
    TaskPriority,
    TaskStatus,
    TextContent,
    User,
    WsTicket,
)
from parall_bridge._serde import format_datetime, parse_datetime, structure, unstructure

MESSAGE = {
    "id": "msg_1",
    "chat_id": "cht_1",
    "sender_id": "usr_1",
    "sender": {"id": "usr_1", "display_name": "Ada", "type": "human"},
    "message_type": "text",
    "content": {"text": "hello @bot", "mentions": [{"user_id": "usr_bot"}]},
    "thread_root_id": None,
    "hints": {"no_reply": True},
    "attachment_ids": ["att_1"],
    "attachments": [{"id": "att_1", "file_name": "a.png", "mime_type": "image/png"}],
    "created_at": "2026-11-24T10:00:00.000Z",
}


def test_message_text_content_is_typed() -> None:
    message = structure(MESSAGE, Message)
    assert message.message_type is MessageType.TEXT
    assert isinstance(message.content, TextContent)
    assert message.content.mentions_user("usr_bot")
    assert not message.content.mentions_user("usr_other")
    assert message.no_reply
    assert message.sender_name == "Ada"
    assert message.attachments[0].mime_type == "image/png"
    assert message.created_at == datetime(2026, 11, 24, 10, tzinfo=UTC)


def test_mention_all_counts_as_a_mention_of_everyone() -> None:
    content = TextContent(text="hi all", mentions=[Mention(user_id=MENTION_ALL_USER_ID)])
    assert content.mentions == (Mention(user_id="usr_all"),)
    assert content.mentions_user("usr_anyone")


def test_message_file_content_and_unknown_type() -> None:
    file_message = structure(
        {
            **MESSAGE,
            "message_type": "file",
            "content": {
                "attachment_id": "att_9",
                "file_name": "r.pdf",
                "mime_type": "application/pdf",
            },
        },
        Message,
    )
    assert isinstance(file_message.content, MediaContent)
    assert file_message.content.file_name == "r.pdf"
    sticker = structure({**MESSAGE, "message_type": "sticker", "content": {"pack": 3}}, Message)
    assert sticker.message_type == "sticker"
    assert sticker.content == {"pack": 3}


def test_sender_name_falls_back_to_the_sender_id() -> None:
    message = structure({k: v for k, v in MESSAGE.items() if k != "sender"}, Message)
    assert message.sender_name == "usr_1"


def test_attachment_alternative_field_names_are_read() -> None:
    message = structure(
        {
            **MESSAGE,
            "attachments": [
                {
                    "id": "att_2",
                    "name": "b.txt",
                    "content_type": "text/plain",
                    "size": 4,
                    "download_url": "https://files.example/b",
                }
            ],
        },
        Message,
    )
    attachment = message.attachments[0]
    assert (attachment.file_name, attachment.mime_type, attachment.file_size, attachment.url) == (
        "b.txt",
        "text/plain",
        4,
        "https://files.example/b",
    )


def test_unknown_fields_are_ignored_and_absent_fields_default() -> None:
    chat = structure({"id": "cht_1", "brand_new_field": {"x": 1}}, Chat)
    assert chat == Chat(id="cht_1")
    assert chat.agent_routing_mode is RoutingMode.PASSIVE  # PROTOCOL: passive when absent
    assert structure({"id": "dsp_1"}, DispatchItem).status is DispatchStatus.PENDING


def test_unknown_enum_values_are_kept_as_strings() -> None:
    chat = structure({"id": "cht_1", "type": "channel", "agent_routing_mode": "psychic"}, Chat)
    assert chat.type == "channel"
    assert not isinstance(chat.type, ChatType)
    assert chat.agent_routing_mode == "psychic"
    task = structure({"id": "tsk_1", "status": "blocked", "priority": "urgent"}, Task)
    assert (task.status, task.priority) == ("blocked", "urgent")


def test_known_enum_values_become_members_through_the_attrs_converter() -> None:
    step = AgentStep(step_type="thinking", content={"text": "hmm"})
    assert step.step_type is StepType.THINKING
    assert step == AgentStep(step_type=StepType.THINKING, content={"text": "hmm"})
    assert AgentStep(step_type="new_kind").step_type == "new_kind"
    assert Task(id="t", status="in_progress").status is TaskStatus.IN_PROGRESS


def test_none_valued_fields_are_left_out_on_output() -> None:
    step = AgentStep(
        step_type=StepType.TEXT,
        target_type=TargetType.CHAT,
        target_id="cht_1",
        content={"text": "hi", "suppressed": True},
    )
    assert unstructure(step) == {
        "step_type": "text",
        "target_type": "chat",
        "target_id": "cht_1",
        "content": {"text": "hi", "suppressed": True},
    }
    assert unstructure(AgentStep(step_type="input"))["target_type"] == ""


def test_enums_unstructure_to_plain_strings() -> None:
    data = unstructure(Task(id="t", status=TaskStatus.DONE, priority=TaskPriority.LOW))
    assert type(data["status"]) is str
    assert data["status"] == "done"
    assert type(data["priority"]) is str


def test_agent_config_keeps_the_rest_as_extra() -> None:
    config = structure({"version": 7, "models": ["m1"], "defaults": {"model": "m1"}}, AgentConfig)
    assert config.version == 7
    assert config.extra == {"models": ["m1"], "defaults": {"model": "m1"}}
    assert unstructure(config) == {"version": 7, "models": ["m1"], "defaults": {"model": "m1"}}
    assert structure({}, AgentConfig).version == 0


def test_generic_page() -> None:
    page = structure(
        {"data": [{"id": "cht_1"}, {"id": "cht_2"}], "has_more": True, "next_cursor": "c2"},
        Page[Chat],
    )
    assert [c.id for c in page.data] == ["cht_1", "cht_2"]
    assert page.has_more
    assert page.next_cursor == "c2"
    bare = structure({"data": []}, Page[Chat])
    assert not bare.has_more
    assert bare.next_cursor is None


def test_ws_payloads() -> None:
    assert structure({"session_id": "s", "heartbeat_interval": 12}, Hello) == Hello("s", 12.0)
    update = structure({"chat_id": "cht_1", "changes": {"agent_routing_mode": "smart"}}, ChatUpdate)
    assert update.changes.agent_routing_mode is RoutingMode.SMART
    assert update.changes.name is None


def test_dispatch_item_enums() -> None:
    item = structure(
        {
            "id": "d",
            "event_type": "task_assign",
            "source_type": "task_activity",
            "source_id": "tsk_1",
            "task_id": "tsk_1",
            "status": "received",
            "created_at": "2026-11-24T10:00:00Z",
        },
        DispatchItem,
    )
    assert item.event_type is DispatchEventType.TASK_ASSIGN
    assert item.source_type is SourceType.TASK_ACTIVITY
    assert item.status is DispatchStatus.RECEIVED


def test_ticket_repr_is_redacted() -> None:
    ticket = WsTicket(ticket="very-secret-ticket", ws_url="ws://x/ws")
    assert "very-secret-ticket" not in repr(ticket)
    assert "very-secret-ticket" not in str(ticket)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-24T10:00:00.000Z", datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24T10:00:00Z", datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24T12:00:00.5+02:00", datetime(2026, 11, 24, 10, 0, 0, 500000, tzinfo=UTC)),
        ("2026-11-24T10:00:00.123456789Z", datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_rfc3339_datetimes(text: str, expected: datetime) -> None:
    assert parse_datetime(text) == expected


def test_datetime_formatting_is_utc_with_z() -> None:
    local = datetime(2026, 11, 24, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert format_datetime(local) == "2026-11-24T10:00:00.000Z"


def test_malformed_payload_raises_naming_the_field() -> None:
    with pytest.raises(cattrs.ClassValidationError) as info:
        structure({"chat_id": "x"}, Message)
    assert "required field missing @ $.id" in cattrs.transform_error(info.value)


# --- property: payloads from a newer server never break the client -----------------------------

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
_json_scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=20)
_unknown_fields = st.dictionaries(_names.map(lambda n: "x_" + n), _json_scalars, max_size=4)
_enum_value = st.one_of(
    st.sampled_from(["direct", "group", "passive", "smart", "todo", "done"]), _names
)
_timestamps = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
).map(format_datetime)


@st.composite
def chat_payloads(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"id": "cht_" + draw(_names)}
    if draw(st.booleans()):
        data["type"] = draw(_enum_value)
    if draw(st.booleans()):
        data["agent_routing_mode"] = draw(_enum_value)
    if draw(st.booleans()):
        data["name"] = draw(st.none() | st.text(max_size=30))
    if draw(st.booleans()):
        data["created_at"] = draw(_timestamps)
    data.update(draw(_unknown_fields))
    return data


@st.composite
def message_payloads(draw: st.DrawFn) -> dict[str, Any]:
    message_type = draw(st.sampled_from(["text", "file"]) | _names)
    if message_type == "text":
        content: dict[str, Any] = {
            "text": draw(st.text(max_size=40)),
            "mentions": [{"user_id": draw(_names)}],
        }
    elif message_type == "file":
        content = {
            "attachment_id": "att_1",
            "file_name": draw(st.text(max_size=10)),
            "mime_type": "text/plain",
        }
    else:
        content = draw(st.dictionaries(_names, _json_scalars, max_size=3))
    content.update(draw(_unknown_fields))
    data: dict[str, Any] = {
        "id": "msg_" + draw(_names),
        "chat_id": "cht_1",
        "sender_id": "usr_1",
        "message_type": message_type,
        "content": content,
    }
    if draw(st.booleans()):
        data["hints"] = {"no_reply": draw(st.booleans()), **draw(_unknown_fields)}
    if draw(st.booleans()):
        data["created_at"] = draw(_timestamps)
    data.update(draw(_unknown_fields))
    return data


@st.composite
def task_payloads(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"id": "tsk_" + draw(_names)}
    for name in ("status", "priority"):
        if draw(st.booleans()):
            data[name] = draw(_enum_value)
    if draw(st.booleans()):
        data["updated_at"] = draw(_timestamps)
    data.update(draw(_unknown_fields))
    return data


@st.composite
def dispatch_payloads(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"id": "dsp_" + draw(_names)}
    for name in ("event_type", "source_type", "status"):
        if draw(st.booleans()):
            data[name] = draw(_enum_value)
    data.update(draw(_unknown_fields))
    return data


@st.composite
def step_payloads(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {
        "step_type": draw(_enum_value),
        "target_type": draw(st.sampled_from(["chat", "task", ""]) | _names),
        "content": draw(st.dictionaries(_names, _json_scalars, max_size=3)),
        "id": "stp_1",
    }
    data.update(draw(_unknown_fields))
    return data


_MODELS: list[tuple[type[Any], Any]] = [
    (Chat, chat_payloads()),
    (Message, message_payloads()),
    (Task, task_payloads()),
    (DispatchItem, dispatch_payloads()),
    (AgentStep, step_payloads()),
]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(_MODELS).flatmap(lambda pair: st.tuples(st.just(pair[0]), pair[1])))
def test_payloads_with_unknown_fields_and_values_round_trip(
    case: tuple[type[Any], dict[str, Any]],
) -> None:
    cls, payload = case
    model = structure(payload, cls)
    again = structure(unstructure(model), cls)
    assert again == model
    for key in payload:
        if key.startswith("x_"):
            assert key not in unstructure(model)


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(_names, _json_scalars | st.lists(_json_scalars, max_size=3), max_size=6),
    st.integers(0, 10**6),
)
def test_agent_config_round_trips_any_settings(settings_: dict[str, Any], version: int) -> None:
    settings_.pop("version", None)
    config = structure({"version": version, **settings_}, AgentConfig)
    assert unstructure(config) == {"version": version, **settings_}


def test_user_and_session_defaults() -> None:
    assert structure({"id": "usr_1"}, User).display_name == ""
    session = structure({"id": "ses_1", "status": "active", "runtime_lane_key": "x"}, AgentSession)
    assert session.status == "active"


# --- read strictly: never coerce what the server sent ------------------------------------------


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"id": None}, "$.id"),
        ({"id": 42}, "$.id"),
        ({}, "$.id"),
        ({"id": "usr_1", "display_name": ["x"]}, "$.display_name"),
        ({"id": "usr_1", "type": 3}, "$.type"),
    ],
)
def test_a_user_of_the_wrong_shape_is_refused(data: dict[str, Any], where: str) -> None:
    with pytest.raises(cattrs.ClassValidationError) as info:
        structure(data, User)
    assert any(where in line for line in cattrs.transform_error(info.value))


@pytest.mark.parametrize(
    ("data", "cls"),
    [
        ({"data": "abc"}, Page[Chat]),
        ({"data": [], "has_more": 1}, Page[Chat]),
        ({"data": [], "next_cursor": 7}, Page[Chat]),
        (
            {"id": "m", "chat_id": "c", "sender_id": None, "message_type": "text", "content": {}},
            Message,
        ),
        ({"id": "t", "status": ["done"]}, Task),
        ({"id": "d", "status": 1}, DispatchItem),
        ({"session_id": "s", "heartbeat_interval": "30"}, Hello),
        ({"session_id": "s", "heartbeat_interval": float("nan")}, Hello),
        ({"version": "2"}, AgentConfig),
    ],
)
def test_wrong_types_are_refused_not_coerced(data: dict[str, Any], cls: Any) -> None:
    with pytest.raises((cattrs.BaseValidationError, TypeError)):
        structure(data, cls)


def test_null_on_a_field_with_a_default_is_the_default() -> None:
    user = structure({"id": "usr_1", "display_name": None}, User)
    assert user.display_name == ""
    item = structure({"id": "dsp_1", "status": None}, DispatchItem)
    assert item.status is DispatchStatus.PENDING
    page = structure({"data": [], "has_more": None}, Page[Chat])
    assert page.has_more is False
    assert structure({"version": None}, AgentConfig).version == 0
    assert structure({"version": 3.0}, AgentConfig).version == 3  # an integral float
