"""The emulator's REST rows, over a real socket with a raw aiohttp client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from parall_bridge.models import MediaContent, Message, MessageType, TextContent
from parall_bridge.protocol import (
    ACK_DISPATCH,
    AGENT_CONFIG,
    AGENT_ME,
    COMPLETE_UPLOAD,
    CREATE_AGENT_SESSION,
    CREATE_AGENT_STEP,
    GET_CHAT,
    GET_FILE_URL,
    GET_MESSAGE,
    GET_TASK,
    LIST_CHAT_MESSAGES,
    LIST_CHATS,
    LIST_MEMBER_CHATS,
    LIST_REPLIES,
    MARK_DISPATCH_RECEIVED,
    ME,
    PRESIGN_UPLOAD,
    SEND_MESSAGE,
    UPDATE_AGENT_SESSION,
    UPDATE_TASK,
    WS_TICKET,
)
from parall_bridge.testing import FakeParallServer

from ._helpers import Api, Reply

ApiFactory = Callable[[str | None], Api]


def assert_canonical_error(reply: Any, status: int, code: str) -> None:
    assert reply.status == status, reply.text
    assert reply.json == {
        "error": {"code": code, "message": reply.json["error"]["message"], "status": status}
    }
    assert isinstance(reply.json["error"]["message"], str)


def text_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"message_type": "text", "content": {"text": text}, **extra}


# --- auth and identity ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_me_and_agent_me(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent("Bot")
    human = parall_server.add_user("Ada")
    human_key = parall_server.add_api_key(human.id)

    me = await api(agent.api_key).ok(ME)
    assert me == {
        "id": agent.user_id,
        "display_name": "Bot",
        "type": "agent",
        "status": "active",
        "avatar_url": None,
    }
    assert await api(agent.api_key).ok(AGENT_ME) == me
    assert (await api(human_key).ok(ME))["type"] == "human"
    assert_canonical_error(await api(human_key).call(AGENT_ME), 403, "FORBIDDEN")


@pytest.mark.asyncio
async def test_bad_keys_answer_401(
    parall_server: FakeParallServer, api: ApiFactory, http: aiohttp.ClientSession
) -> None:
    agent = parall_server.add_agent()
    assert_canonical_error(await api(None).call(ME), 401, "UNAUTHORIZED")
    assert_canonical_error(await api("nope").call(ME), 401, "UNAUTHORIZED")
    async with http.get(parall_server.url + ME.path, headers={"Authorization": agent.api_key}) as r:
        assert r.status == 401  # not a Bearer header
    parall_server.revoke_key(agent.api_key)
    assert_canonical_error(await api(agent.api_key).call(ME), 401, "UNAUTHORIZED")
    assert_canonical_error(await api(agent.api_key).call(WS_TICKET, body={}), 401, "UNAUTHORIZED")
    # Unknown paths under /api/v1 are authenticated too, then 404.
    async with http.get(parall_server.url + "/api/v1/nothing") as r:
        assert r.status == 401


@pytest.mark.asyncio
async def test_wrong_org_answers_404(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    reply = await api(agent.api_key).call(LIST_CHATS, org_id="org_other")
    assert_canonical_error(reply, 404, "NOT_FOUND")
    reply = await api(agent.api_key).call(AGENT_CONFIG, org_id="org_other", agent_id=agent.user_id)
    assert_canonical_error(reply, 404, "NOT_FOUND")


@pytest.mark.asyncio
async def test_requests_are_recorded_without_the_key(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    await api(agent.api_key).call(LIST_CHATS, params={"limit": "5"})
    await api(agent.api_key).call(WS_TICKET, body={})
    await api(None).call(ME)
    first, second, third = parall_server.requests
    assert (first.method, first.path, dict(first.query)) == (
        "GET",
        f"/api/v1/orgs/{parall_server.org_id}/chats",
        {"limit": "5"},
    )
    assert (first.json, first.user_id, first.status) == (None, agent.user_id, 200)
    assert (second.method, second.json, second.status) == ("POST", {}, 200)
    assert (third.user_id, third.status) == (None, 401)
    assert agent.api_key not in repr(parall_server.requests)
    assert agent.api_key not in repr(agent)


# --- chats --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_chats_are_listed_for_members_and_paged(http: aiohttp.ClientSession) -> None:
    server = FakeParallServer(max_page_size=3)
    async with server:
        agent = server.add_agent()
        other = server.add_user("Ada")
        mine = [
            server.add_chat(type="group", name=f"g{i}", members=[agent.user_id, other.id])
            for i in range(5)
        ]
        server.add_chat(members=[other.id])  # not the agent's
        client = Api(server, http, agent.api_key)

        first = await client.ok(LIST_CHATS, params={"limit": "2"})
        assert [c["id"] for c in first["data"]] == [mine[0].id, mine[1].id]
        assert first["has_more"] is True
        assert isinstance(first["next_cursor"], str)
        chat = first["data"][0]
        assert chat == {
            "id": mine[0].id,
            "org_id": server.org_id,
            "type": "group",
            "name": "g0",
            "description": None,
            "created_at": chat["created_at"],
            "updated_at": chat["updated_at"],
        }
        assert chat["created_at"].endswith("Z")
        assert len(chat["created_at"]) == len("2026-11-24T10:00:00.000Z")
        # limit is capped at max_page_size
        rest = await client.ok(LIST_CHATS, params={"limit": "50", "cursor": first["next_cursor"]})
        assert [c["id"] for c in rest["data"]] == [c.id for c in mine[2:5]]
        assert rest == {"data": rest["data"], "has_more": False, "next_cursor": None}

        members = await client.ok(LIST_MEMBER_CHATS, user_id=agent.user_id)
        assert [c["id"] for c in members["data"]] == [c.id for c in mine[:3]]
        reply = await client.call(LIST_MEMBER_CHATS, user_id=other.id)
        assert_canonical_error(reply, 403, "FORBIDDEN")

        for bad in ({"cursor": "garbage!"}, {"cursor": "Zm9v"}, {"limit": "0"}, {"limit": "x"}):
            assert_canonical_error(await client.call(LIST_CHATS, params=bad), 400, "BAD_REQUEST")


@pytest.mark.asyncio
async def test_get_chat_hides_other_chats(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(
        type="group", name="ops", members=[agent.user_id], agent_routing_mode="smart"
    )
    hidden = parall_server.add_chat(members=[human.id])
    client = api(agent.api_key)
    got = await client.ok(GET_CHAT, chat_id=chat.id)
    assert (got["id"], got["agent_routing_mode"]) == (chat.id, "smart")
    assert_canonical_error(await client.call(GET_CHAT, chat_id=hidden.id), 404, "NOT_FOUND")
    assert_canonical_error(await client.call(GET_CHAT, chat_id="cht_nope"), 404, "NOT_FOUND")


@pytest.mark.asyncio
async def test_chat_messages_newest_first_paged_by_before(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id, agent.user_id])
    sent = [parall_server.post_message(chat.id, human.id, f"m{i}") for i in range(5)]
    parall_server.delete_message(sent[2].id)
    client = api(agent.api_key)

    page = await client.ok(LIST_CHAT_MESSAGES, chat_id=chat.id, params={"limit": "2"})
    assert [m["id"] for m in page["data"]] == [sent[4].id, sent[3].id]
    assert page["has_more"] is True
    page2 = await client.ok(
        LIST_CHAT_MESSAGES, chat_id=chat.id, params={"limit": "2", "before": page["next_cursor"]}
    )
    assert [m["id"] for m in page2["data"]] == [sent[1].id, sent[0].id]
    assert page2["has_more"] is False
    assert page2["next_cursor"] is None
    reply = await client.call(LIST_CHAT_MESSAGES, chat_id=chat.id, params={"before": "%%%"})
    assert_canonical_error(reply, 400, "BAD_REQUEST")
    assert [m.id for m in parall_server.messages(chat.id)] == [
        sent[0].id,
        sent[1].id,
        sent[3].id,
        sent[4].id,
    ]


# --- messages ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_send_message_shape_and_idempotency(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent("Bot")
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id, agent.user_id])
    client = api(agent.api_key)
    body = text_body(
        "hello",
        idempotency_key="pb:evt:1",
        hints={"no_reply": True},
    )
    body["content"]["mentions"] = [{"user_id": human.id}]

    first = await client.call(SEND_MESSAGE, chat_id=chat.id, body=body)
    assert first.status == 201, first.text
    message = first.json
    assert message == {
        "id": message["id"],
        "chat_id": chat.id,
        "sender_id": agent.user_id,
        "sender": {"id": agent.user_id, "display_name": "Bot", "type": "agent"},
        "message_type": "text",
        "content": {"text": "hello", "mentions": [{"user_id": human.id}]},
        "thread_root_id": None,
        "hints": {"no_reply": True},
        "attachment_ids": [],
        "attachments": [],
        "created_at": message["created_at"],
    }
    assert message["id"].startswith("msg_")

    again = await client.call(
        SEND_MESSAGE, chat_id=chat.id, body=text_body("changed", idempotency_key="pb:evt:1")
    )
    assert again.status == 200
    assert again.json == message
    assert [m.id for m in parall_server.messages(chat.id)] == [message["id"]]
    stored = parall_server.messages(chat.id)[0]
    assert isinstance(stored, Message)
    assert stored.message_type is MessageType.TEXT
    assert isinstance(stored.content, TextContent)
    assert stored.no_reply

    # Without a key every send creates a message.
    await client.ok(SEND_MESSAGE, chat_id=chat.id, body=text_body("a"))
    await client.ok(SEND_MESSAGE, chat_id=chat.id, body=text_body("a"))
    assert len(parall_server.messages(chat.id)) == 3


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [
        text_body("x", idempotency_key="reply:abc"),
        text_body("x", idempotency_key="task_update:abc"),
        {"message_type": "file", "content": {"text": "x"}},
        {"content": {"text": "x"}},
        {"message_type": "text", "content": {"text": 3}},
        {"message_type": "text"},
        text_body("x", attachment_ids=["att_missing"]),
        text_body("x", thread_root_id="msg_missing"),
        text_body("x", hints={"no_reply": "yes"}),
        ["not", "an", "object"],
    ],
)
async def test_send_message_rejects_bad_bodies(
    parall_server: FakeParallServer, api: ApiFactory, body: Any
) -> None:
    agent = parall_server.add_agent()
    chat = parall_server.add_chat(members=[agent.user_id])
    reply = await api(agent.api_key).call(SEND_MESSAGE, chat_id=chat.id, body=body)
    assert_canonical_error(reply, 400, "BAD_REQUEST")
    assert parall_server.messages(chat.id) == []


@pytest.mark.asyncio
async def test_send_message_needs_membership(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id])
    reply = await api(agent.api_key).call(SEND_MESSAGE, chat_id=chat.id, body=text_body("x"))
    assert_canonical_error(reply, 404, "NOT_FOUND")


@pytest.mark.asyncio
async def test_get_message_replies_and_deletion(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    outsider = parall_server.add_user("Eve")
    outsider_key = parall_server.add_api_key(outsider.id)
    chat = parall_server.add_chat(type="group", members=[human.id, agent.user_id])
    root = parall_server.post_message(chat.id, human.id, "root")
    replies = [
        parall_server.post_message(chat.id, human.id, f"r{i}", thread_root_id=root.id)
        for i in range(3)
    ]
    client = api(agent.api_key)

    got = await client.ok(GET_MESSAGE, message_id=root.id)
    assert (got["id"], got["content"]["text"]) == (root.id, "root")
    assert_canonical_error(
        await api(outsider_key).call(GET_MESSAGE, message_id=root.id), 404, "NOT_FOUND"
    )

    page = await client.ok(LIST_REPLIES, message_id=root.id, params={"limit": "2"})
    assert [m["id"] for m in page["data"]] == [replies[0].id, replies[1].id]
    assert all(m["thread_root_id"] == root.id for m in page["data"])
    page2 = await client.ok(
        LIST_REPLIES, message_id=root.id, params={"cursor": page["next_cursor"]}
    )
    assert [m["id"] for m in page2["data"]] == [replies[2].id]

    # A reply sent over REST joins the thread.
    sent = await client.ok(
        SEND_MESSAGE, chat_id=chat.id, body=text_body("mine", thread_root_id=root.id)
    )
    assert sent["thread_root_id"] == root.id

    parall_server.delete_message(root.id)
    assert_canonical_error(await client.call(GET_MESSAGE, message_id=root.id), 404, "NOT_FOUND")
    assert_canonical_error(await client.call(LIST_REPLIES, message_id=root.id), 404, "NOT_FOUND")


# --- tasks --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_and_patch_task(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    task = parall_server.assign_task(
        "Write docs",
        assignee_id=agent.user_id,
        creator_id=human.id,
        description="all of them",
        identifier="T-1",
    )
    client = api(agent.api_key)
    got = await client.ok(GET_TASK, task_id=task.id)
    assert got == {
        "id": task.id,
        "org_id": parall_server.org_id,
        "identifier": "T-1",
        "title": "Write docs",
        "description": "all of them",
        "status": "todo",
        "priority": "normal",
        "assignee_id": agent.user_id,
        "creator_id": human.id,
        "created_at": got["created_at"],
        "updated_at": got["updated_at"],
    }

    patched = await client.ok(
        UPDATE_TASK,
        task_id=task.id,
        body={"status": "in_progress", "description": None, "priority": "high", "color": "red"},
    )
    assert (patched["status"], patched["priority"], patched["description"]) == (
        "in_progress",
        "high",
        None,
    )
    assert "color" not in patched
    assert patched["updated_at"] > got["updated_at"]
    assert parall_server.get_task(task.id).status == "in_progress"

    for bad in (
        {"status": "finished"},
        {"priority": "urgent"},
        {"title": None},
        {"assignee_id": "usr_x"},
    ):
        reply = await client.call(UPDATE_TASK, task_id=task.id, body=bad)
        assert_canonical_error(reply, 400, "BAD_REQUEST")

    parall_server.delete_task(task.id)
    assert_canonical_error(await client.call(GET_TASK, task_id=task.id), 404, "NOT_FOUND")
    reply = await client.call(UPDATE_TASK, task_id=task.id, body={"status": "done"})
    assert_canonical_error(reply, 404, "NOT_FOUND")


# --- uploads --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_upload_round_trip(
    parall_server: FakeParallServer, api: ApiFactory, http: aiohttp.ClientSession
) -> None:
    agent = parall_server.add_agent()
    chat = parall_server.add_chat(members=[agent.user_id])
    client = api(agent.api_key)
    data = b"hello, file"
    ticket = await client.ok(
        PRESIGN_UPLOAD,
        body={"file_name": "a.txt", "file_size": len(data), "mime_type": "text/plain"},
    )
    assert set(ticket) == {"attachment_id", "upload_url"}
    attachment_id = ticket["attachment_id"]
    assert ticket["upload_url"].startswith(parall_server.url + "/")

    # Completing before the bytes are there is refused.
    reply = await client.call(COMPLETE_UPLOAD, body={"attachment_id": attachment_id})
    assert_canonical_error(reply, 400, "BAD_REQUEST")
    # The pre-signed URL takes no Authorization header, nor a wrong size or type.
    text_type = {"Content-Type": "text/plain"}
    bad_puts: list[tuple[bytes, dict[str, str]]] = [
        (data, {**text_type, "Authorization": f"Bearer {agent.api_key}"}),
        (data + b"!", text_type),
        (data, {"Content-Type": "image/png"}),
    ]
    for payload, headers in bad_puts:
        async with http.put(ticket["upload_url"], data=payload, headers=headers) as resp:
            assert resp.status == 400
    async with http.put(ticket["upload_url"] + "x", data=data, headers=text_type) as resp:
        assert resp.status == 403  # signature mismatch
    async with http.put(ticket["upload_url"], data=data, headers=text_type) as resp:
        assert resp.status == 200
    assert parall_server.uploaded_bytes(attachment_id) == data
    put = parall_server.requests[-1]
    assert (put.method, put.user_id, put.json, put.status) == ("PUT", None, None, 200)

    assert_canonical_error(
        await client.call(GET_FILE_URL, attachment_id=attachment_id), 404, "NOT_FOUND"
    )
    done = await client.ok(COMPLETE_UPLOAD, body={"attachment_id": attachment_id})
    assert done["id"] == attachment_id
    url = (await client.ok(GET_FILE_URL, attachment_id=attachment_id))["url"]
    assert url.startswith("http://127.0.0.1:")
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain"
        assert await resp.read() == data

    sent = await client.ok(
        SEND_MESSAGE, chat_id=chat.id, body=text_body("see file", attachment_ids=[attachment_id])
    )
    assert sent["attachment_ids"] == [attachment_id]
    assert sent["attachments"] == [
        {
            "id": attachment_id,
            "file_name": "a.txt",
            "mime_type": "text/plain",
            "file_size": len(data),
            "url": url,
        }
    ]


@pytest.mark.asyncio
async def test_presign_validates(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    for bad in (
        {"file_name": "a", "file_size": "1", "mime_type": "text/plain"},
        {"file_name": "", "file_size": 1, "mime_type": "text/plain"},
        {"file_name": "a", "file_size": 1},
    ):
        reply = await api(agent.api_key).call(PRESIGN_UPLOAD, body=bad)
        assert_canonical_error(reply, 400, "BAD_REQUEST")


@pytest.mark.asyncio
async def test_post_file_message(
    parall_server: FakeParallServer, http: aiohttp.ClientSession
) -> None:
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id])
    message = parall_server.post_file(
        chat.id, human.id, b"\x89PNG", file_name="p.png", mime_type="image/png", caption="look"
    )
    assert message.message_type is MessageType.FILE
    attachment = message.attachments[0]
    assert message.content == MediaContent(
        attachment_id=attachment.id,
        file_name="p.png",
        mime_type="image/png",
        file_size=4,
        caption="look",
    )
    assert attachment.url is not None
    async with http.get(attachment.url) as resp:
        assert await resp.read() == b"\x89PNG"


# --- WebSocket ticket -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_ws_ticket(
    parall_server: FakeParallServer, api: ApiFactory, http: aiohttp.ClientSession
) -> None:
    agent = parall_server.add_agent()
    ticket = await api(agent.api_key).ok(WS_TICKET, body={})
    assert set(ticket) == {"ticket", "ws_url", "expires_at"}
    assert (
        ticket["ws_url"] == parall_server.ws_url == parall_server.url.replace("http", "ws") + "/ws"
    )
    assert ticket["expires_at"].endswith("Z")
    # no body at all is fine too; a body that is not an object is not
    assert (await api(agent.api_key).call(WS_TICKET)).status == 200
    assert_canonical_error(await api(agent.api_key).call(WS_TICKET, body=[1]), 400, "BAD_REQUEST")

    async with FakeParallServer(include_ws_url_in_ticket=False) as bare:
        bare_agent = bare.add_agent()
        ticket = await Api(bare, http, bare_agent.api_key).ok(WS_TICKET, body={})
        assert set(ticket) == {"ticket", "expires_at"}


# --- agent sessions, steps, config -------------------------------------------------------


@pytest.mark.asyncio
async def test_sessions_steps_and_config(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    other = parall_server.add_agent()
    client = api(agent.api_key)
    me = agent.user_id
    ref = {"host": "box"}

    created = await client.call(
        CREATE_AGENT_SESSION,
        body={
            "runtime_type": "openai",
            "runtime_key": "agent:main:parall:default",
            "runtime_ref": ref,
        },
        agent_id=me,
    )
    assert created.status == 201
    session = created.json
    assert session == {
        "id": session["id"],
        "status": "active",
        "runtime_type": "openai",
        "runtime_key": "agent:main:parall:default",
        "runtime_ref": ref,
        "created_at": session["created_at"],
    }
    assert session["id"].startswith("ses_")
    sid = session["id"]

    updated = await client.ok(
        UPDATE_AGENT_SESSION, body={"status": "idle"}, agent_id=me, session_id=sid
    )
    assert updated["status"] == "idle"
    reply = await client.call(
        UPDATE_AGENT_SESSION, body={"status": "sleepy"}, agent_id=me, session_id=sid
    )
    assert_canonical_error(reply, 400, "BAD_REQUEST")
    reply = await client.call(
        UPDATE_AGENT_SESSION, body={"status": "idle"}, agent_id=agent.user_id, session_id="ses_x"
    )
    assert_canonical_error(reply, 404, "NOT_FOUND")
    reply = await client.call(
        UPDATE_AGENT_SESSION, body={"status": "idle"}, agent_id=other.user_id, session_id=sid
    )
    assert_canonical_error(reply, 403, "FORBIDDEN")

    step_body = {
        "step_type": "thinking",
        "target_type": "chat",
        "target_id": "cht_1",
        "content": {"text": "hmm"},
        "group_key": "g1",
    }
    step = await client.call(CREATE_AGENT_STEP, body=step_body, agent_id=me, session_id=sid)
    assert step.status == 201
    assert step.json == {
        **step_body,
        "id": step.json["id"],
        "session_id": sid,
        "created_at": step.json["created_at"],
    }
    for bad in (
        {"step_type": 1, "content": {}},
        {"step_type": "text", "content": "x"},
        {"step_type": "text"},
    ):
        reply = await client.call(CREATE_AGENT_STEP, body=bad, agent_id=me, session_id=sid)
        assert_canonical_error(reply, 400, "BAD_REQUEST")
    assert [s.id for s in parall_server.steps(agent.user_id)] == [step.json["id"]]
    assert parall_server.steps(agent.user_id, session["id"])[0].content == {"text": "hmm"}
    assert [s.status for s in parall_server.sessions(agent.user_id)] == ["idle"]

    assert await client.ok(AGENT_CONFIG, agent_id=me) == {
        "version": 1,
        "models": [],
        "defaults": {},
    }
    config = parall_server.set_agent_config(
        agent.user_id, {"models": ["m1"], "defaults": {"model": "m1"}}
    )
    assert config.version == 2
    assert await client.ok(AGENT_CONFIG, agent_id=me) == {
        "version": 2,
        "models": ["m1"],
        "defaults": {"model": "m1"},
    }
    assert_canonical_error(
        await client.call(AGENT_CONFIG, agent_id=other.user_id), 403, "FORBIDDEN"
    )
    reply = await client.call(
        CREATE_AGENT_SESSION, body={"runtime_type": "x", "runtime_key": "y"}, agent_id=other.user_id
    )
    assert_canonical_error(reply, 403, "FORBIDDEN")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("target", "body"),
    [
        ("task", {"status": ["done"]}),
        ("task", {"priority": {"level": "high"}}),
        ("ack", {"source_type": ["message"], "source_id": "msg_x"}),
        ("received", {"source_type": {}, "source_id": "msg_x"}),
        ("session", {"status": ["idle"]}),
    ],
)
async def test_a_field_of_the_wrong_json_type_is_a_canonical_400(
    parall_server: FakeParallServer, api: ApiFactory, target: str, body: dict[str, Any]
) -> None:
    """A client's mistake, not server trouble: never aiohttp's plain-text 500."""
    agent = parall_server.add_agent("Bot")
    human = parall_server.add_user("Ada")
    task = parall_server.assign_task("T", assignee_id=human.id, creator_id=human.id)
    client = api(agent.api_key)
    session = await client.ok(
        CREATE_AGENT_SESSION,
        body={"runtime_type": "test", "runtime_key": "k"},
        agent_id=agent.user_id,
    )
    endpoint, path = {
        "task": (UPDATE_TASK, {"task_id": task.id}),
        "ack": (ACK_DISPATCH, {}),
        "received": (MARK_DISPATCH_RECEIVED, {}),
        "session": (
            UPDATE_AGENT_SESSION,
            {"agent_id": agent.user_id, "session_id": session["id"]},
        ),
    }[target]
    assert_canonical_error(await client.call(endpoint, body=body, **path), 400, "BAD_REQUEST")


@pytest.mark.asyncio
async def test_nan_and_infinity_are_not_json(
    parall_server: FakeParallServer, api: ApiFactory, http: aiohttp.ClientSession
) -> None:
    """Python's parser takes ``NaN`` and ``Infinity``; JSON has neither, so a body with
    them is refused, never stored and echoed to every client as invalid JSON."""
    agent = parall_server.add_agent("Bot")
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(type="direct", members=[human.id, agent.user_id])
    raw = '{"message_type": "text", "content": {"text": "x"}, "hints": {"weight": Infinity}}'
    client = api(agent.api_key)
    async with http.post(
        client.url(SEND_MESSAGE, chat_id=chat.id),
        data=raw,
        headers={"Authorization": f"Bearer {agent.api_key}", "Content-Type": "application/json"},
    ) as resp:
        reply = Reply(resp.status, dict(resp.headers), await resp.text())
    assert_canonical_error(reply, 400, "BAD_REQUEST")
    assert parall_server.messages(chat.id) == []
