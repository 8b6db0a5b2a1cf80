"""The emulator's public inspection API, each part driven by a raw client over real
sockets: uploads, every message of the org, idempotency keys, request times, WebSocket
upgrades and their tickets, the current seq, and a member added to a chat."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from parall_bridge.protocol import (
    COMPLETE_UPLOAD,
    GET_CHAT,
    ME,
    PRESIGN_UPLOAD,
    SEND_MESSAGE,
    WS_TICKET,
)
from parall_bridge.testing import FakeParallServer, UploadRecord

from ._helpers import Api, receive

ApiFactory = Callable[[str | None], Api]


def text_body(text: str, **extra: object) -> dict[str, object]:
    """A send-message body."""
    return {"message_type": "text", "content": {"text": text}, **extra}


@pytest.mark.asyncio
async def test_uploads_keep_their_content_type_bytes_and_uploader(
    parall_server: FakeParallServer, api: ApiFactory, http: aiohttp.ClientSession
) -> None:
    agent = parall_server.add_agent()
    stored = parall_server.add_attachment(b"seeded", file_name="s.bin", mime_type="image/png")
    client = api(agent.api_key)
    data = b"hello, file"
    ticket = await client.ok(
        PRESIGN_UPLOAD,
        body={"file_name": "a.txt", "file_size": len(data), "mime_type": "text/plain"},
    )
    attachment_id = ticket["attachment_id"]
    waiting = parall_server.upload(attachment_id)
    assert (waiting.content_type, waiting.data, waiting.completed) == (None, None, False)

    headers = {"Content-Type": "text/plain; charset=utf-8"}
    async with http.put(ticket["upload_url"], data=data, headers=headers) as resp:
        assert resp.status == 200
    await client.ok(COMPLETE_UPLOAD, body={"attachment_id": attachment_id})

    assert parall_server.uploads() == [
        UploadRecord(
            attachment_id=stored,
            file_name="s.bin",
            mime_type="image/png",
            file_size=6,
            content_type="image/png",
            data=b"seeded",
            completed=True,
            created_by=None,
        ),
        UploadRecord(
            attachment_id=attachment_id,
            file_name="a.txt",
            mime_type="text/plain",
            file_size=len(data),
            content_type="text/plain; charset=utf-8",  # as sent, parameters included
            data=data,
            completed=True,
            created_by=agent.user_id,
        ),
    ]
    assert parall_server.upload(attachment_id) == parall_server.uploads()[1]
    assert "<11 bytes>" in repr(parall_server.upload(attachment_id))
    with pytest.raises(KeyError):
        parall_server.upload("att_unknown")


@pytest.mark.asyncio
async def test_messages_without_a_chat_are_every_message_of_the_org(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    ada = parall_server.add_user("Ada")
    direct = parall_server.add_chat(members=[ada.id, agent.user_id])
    group = parall_server.add_chat(type="group", name="Team", members=[ada.id, agent.user_id])
    first = parall_server.post_message(direct.id, ada.id, "one")
    sent = await api(agent.api_key).ok(SEND_MESSAGE, chat_id=group.id, body=text_body("two"))
    gone = parall_server.post_message(group.id, ada.id, "deleted")
    last = parall_server.post_message(direct.id, ada.id, "three")
    parall_server.delete_message(gone.id)

    everything = parall_server.messages()
    assert [m.id for m in everything] == [first.id, sent["id"], last.id]
    assert [m.chat_id for m in everything] == [direct.id, group.id, direct.id]
    assert [m.id for m in parall_server.messages(group.id)] == [sent["id"]]


@pytest.mark.asyncio
async def test_idempotency_keys_map_each_key_to_its_first_message(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    chat = parall_server.add_chat(members=[agent.user_id])
    client = api(agent.api_key)
    first = await client.ok(
        SEND_MESSAGE, chat_id=chat.id, body=text_body("a", idempotency_key="k1")
    )
    again = await client.call(
        SEND_MESSAGE, chat_id=chat.id, body=text_body("a", idempotency_key="k1")
    )
    assert again.status == 200  # a repeat answers the first message
    second = await client.ok(
        SEND_MESSAGE, chat_id=chat.id, body=text_body("b", idempotency_key="k2")
    )
    await client.ok(SEND_MESSAGE, chat_id=chat.id, body=text_body("no key"))

    assert parall_server.idempotency_keys() == {"k1": first["id"], "k2": second["id"]}
    uses = [r.json.get("idempotency_key") for r in parall_server.requests if r.method == "POST"]
    assert uses == ["k1", "k1", "k2", None]  # each use, in the recorded requests


@pytest.mark.asyncio
async def test_requests_carry_when_they_arrived_and_were_answered(
    http: aiohttp.ClientSession,
) -> None:
    latency = 0.05
    async with FakeParallServer(latency=latency) as server:
        agent = server.add_agent()
        client = Api(server, http, agent.api_key)
        before = datetime.now(UTC)
        await client.ok(ME)
        await client.ok(ME)
        after = datetime.now(UTC)
    first, second = server.requests
    assert before <= first.received_at <= first.answered_at <= second.received_at
    assert second.answered_at <= after
    for record in (first, second):
        assert record.answered_at - record.received_at >= timedelta(seconds=latency)
        assert record.received_at.tzinfo is UTC


@pytest.mark.asyncio
async def test_an_upgrade_is_recorded_with_its_ticket_query_and_headers(
    parall_server: FakeParallServer, api: ApiFactory, http: aiohttp.ClientSession
) -> None:
    agent = parall_server.add_agent()
    client = api(agent.api_key)
    parall_server.emit(agent.user_id, "custom", {"i": 1})
    parall_server.emit(agent.user_id, "custom", {"i": 2})

    ticket = await client.ok(WS_TICKET, body={})
    ws = await http.ws_connect(
        ticket["ws_url"],
        params={"ticket": ticket["ticket"], "last_seq": "1"},
        headers={"Authorization": f"Bearer {agent.api_key}", "X-Client": "third-party"},
        autoping=False,
    )
    assert (await receive(ws))["type"] == "hello"
    assert (await receive(ws))["seq"] == 2  # the replay after last_seq
    plain = await client.open_ws()

    first, second = parall_server.ws_connections
    assert first.ticket == ticket["ticket"]
    assert first.query == {"ticket": ticket["ticket"], "last_seq": "1"}
    assert first.last_seq == 1
    assert first.headers["X-Client"] == "third-party"
    assert first.headers["Authorization"] == "***"  # sent (the protocol wants none), not kept
    assert agent.api_key not in repr(parall_server.ws_connections)
    assert second.ticket is not None
    assert second.ticket != first.ticket  # a fresh ticket for every connection
    assert "Authorization" not in second.headers
    assert second.query == {"ticket": second.ticket}
    await ws.close()
    await plain.close()


@pytest.mark.asyncio
async def test_seq_is_the_last_one_numbered_for_the_user(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    ada = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[ada.id, agent.user_id])
    assert parall_server.seq(agent.user_id) == 0
    ws = await api(agent.api_key).open_ws()
    parall_server.post_message(chat.id, ada.id, "hi")  # message.new, then dispatch.new
    frames = [await receive(ws), await receive(ws)]
    assert [f["type"] for f in frames] == ["message.new", "dispatch.new"]
    assert parall_server.seq(agent.user_id) == frames[-1]["seq"] == 2
    assert parall_server.seq(ada.id) == 1  # her own message.new
    parall_server.reset_seq(agent.user_id)
    assert parall_server.seq(agent.user_id) == 0
    await ws.close()


@pytest.mark.asyncio
async def test_a_member_added_to_a_chat_gets_what_is_posted_from_then_on(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    ada = parall_server.add_user("Ada")
    bob = parall_server.add_user("Bob")
    team = parall_server.add_chat(
        type="group", name="Team", members=[ada.id], agent_routing_mode="active"
    )
    parall_server.post_message(team.id, ada.id, "before")
    bob_api = api(parall_server.add_api_key(bob.id))
    assert (await bob_api.call(GET_CHAT, chat_id=team.id)).status == 404

    assert parall_server.add_member(team.id, bob.id).id == team.id
    parall_server.add_member(team.id, agent.user_id)
    assert parall_server.members(team.id) == [ada.id, bob.id, agent.user_id]
    assert (await bob_api.ok(GET_CHAT, chat_id=team.id))["id"] == team.id
    ws = await bob_api.open_ws()
    after = parall_server.post_message(team.id, ada.id, "after")
    frame = await receive(ws)
    assert (frame["type"], frame["data"]["id"]) == ("message.new", after.id)
    [item] = parall_server.dispatch_items(agent.user_id)  # only what came after
    assert item.source_id == after.id
    await ws.close()

    with pytest.raises(ValueError, match="already a member"):
        parall_server.add_member(team.id, bob.id)
    with pytest.raises(KeyError):
        parall_server.add_member("cht_unknown", bob.id)
    with pytest.raises(KeyError):
        parall_server.add_member(team.id, "usr_unknown")
