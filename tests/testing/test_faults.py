"""REST fault injection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
import pytest

from parall_bridge.protocol import GET_CHAT, LIST_CHATS, ME, SEND_MESSAGE, UPDATE_TASK, Endpoint
from parall_bridge.testing import FakeParallServer, FaultInjector

from ._helpers import Api

ApiFactory = Callable[[str | None], Api]
BODY = {"message_type": "text", "content": {"text": "hi"}, "idempotency_key": "pb:k:1"}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body_form", "status", "check"),
    [
        (
            "canonical",
            503,
            lambda text: (
                json.loads(text)["error"]["code"] == "SERVICE_UNAVAILABLE"
                and json.loads(text)["error"]["status"] == 503
            ),
        ),
        ("legacy", 500, lambda text: isinstance(json.loads(text)["error"], str)),
        ("message", 429, lambda text: isinstance(json.loads(text)["message"], str)),
        ("html", 502, lambda text: text.startswith("<html>") and "502 Bad Gateway" in text),
        ("empty", 500, lambda text: text == ""),
    ],
)
async def test_fail_next_body_forms(
    parall_server: FakeParallServer,
    api: ApiFactory,
    body_form: str,
    status: int,
    check: Callable[[str], bool],
) -> None:
    agent = parall_server.add_agent()
    parall_server.fail_next(ME, status=status, body_form=body_form, retry_after=1.5)
    reply = await api(agent.api_key).call(ME)
    assert reply.status == status
    assert reply.headers["Retry-After"] == "1.5"
    assert check(reply.text), reply.text
    if body_form == "html":
        assert reply.headers["Content-Type"].startswith("text/html")
    # One failure only, then the real answer.
    assert (await api(agent.api_key).call(ME)).status == 200
    assert [r.status for r in parall_server.requests] == [status, 200]


@pytest.mark.asyncio
async def test_fail_next_times_and_order(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    client = api(agent.api_key)
    parall_server.fail_next(ME, times=2, status=503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")
    parall_server.fail_next(ME, status=429, retry_after=0)
    parall_server.fail_next(LIST_CHATS, status=500)
    statuses = [(await client.call(ME)).status for _ in range(4)]
    assert statuses == [503, 503, 429, 200]
    assert parall_server.requests[0].user_id == agent.user_id
    assert parall_server.faults.pending() == 1
    assert parall_server.faults.pending(LIST_CHATS) == 1
    assert (await client.call(LIST_CHATS)).status == 500
    assert parall_server.faults.pending() == 0


@pytest.mark.asyncio
async def test_fail_without_act_first_does_nothing(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    chat = parall_server.add_chat(members=[agent.user_id])
    parall_server.fail_next(SEND_MESSAGE, status=500)
    assert (await api(agent.api_key).call(SEND_MESSAGE, chat_id=chat.id, body=BODY)).status == 500
    assert parall_server.messages(chat.id) == []


@pytest.mark.asyncio
async def test_act_first_acts_then_fails(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    chat = parall_server.add_chat(members=[agent.user_id])
    client = api(agent.api_key)
    parall_server.fail_next(SEND_MESSAGE, status=502, act_first=True)
    assert (await client.call(SEND_MESSAGE, chat_id=chat.id, body=BODY)).status == 502
    [stored] = parall_server.messages(chat.id)
    # The retry with the same key is answered with the first message.
    retry = await client.call(SEND_MESSAGE, chat_id=chat.id, body=BODY)
    assert (retry.status, retry.json["id"]) == (200, stored.id)
    assert len(parall_server.messages(chat.id)) == 1


@pytest.mark.asyncio
async def test_malform_next(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    task = parall_server.assign_task("T", assignee_id=agent.user_id, creator_id=human.id)
    client = api(agent.api_key)
    parall_server.malform_next(UPDATE_TASK, body='{"id": ')
    reply = await client.call(UPDATE_TASK, task_id=task.id, body={"status": "done"})
    assert (reply.status, reply.text) == (200, '{"id": ')
    assert reply.headers["Content-Type"].startswith("application/json")
    assert parall_server.get_task(task.id).status == "todo"
    parall_server.malform_next(ME, times=2)
    assert [(await client.call(ME)).text for _ in range(3)][:2] == ["not json", "not json"]


@pytest.mark.asyncio
async def test_malform_next_status_content_type_and_size(
    parall_server: FakeParallServer, api: ApiFactory, http: aiohttp.ClientSession
) -> None:
    agent = parall_server.add_agent()
    client = api(agent.api_key)
    parall_server.malform_next(ME, status=503, body="<h1>down</h1>", content_type="text/html")
    reply = await client.call(ME)
    assert (reply.status, reply.headers["Content-Type"], reply.text) == (
        503,
        "text/html",
        "<h1>down</h1>",
    )
    parall_server.malform_next(ME, body="abc", size=200_000)
    headers = {"Authorization": f"Bearer {agent.api_key}"}
    async with http.get(parall_server.url + ME.path, headers=headers) as resp:
        assert resp.content_length is None  # chunked: the size is known only by reading
        assert resp.headers["Transfer-Encoding"] == "chunked"
        body = await resp.read()
    assert body == (b"abc" * 70_000)[:200_000]
    with pytest.raises(ValueError, match="size"):
        parall_server.malform_next(ME, body="", size=10)


@pytest.mark.asyncio
async def test_malform_next_truncated(
    parall_server: FakeParallServer, http: aiohttp.ClientSession
) -> None:
    agent = parall_server.add_agent()
    parall_server.malform_next(ME, body='{"id": "usr_1"}' * 10, truncated=True)
    headers = {"Authorization": f"Bearer {agent.api_key}"}
    async with http.get(parall_server.url + ME.path, headers=headers) as resp:
        assert resp.content_length == 150
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()  # 75 bytes, then the connection drops
    assert parall_server.faults.pending() == 0


@pytest.mark.asyncio
async def test_delay_next(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    chat = parall_server.add_chat(members=[agent.user_id])
    client = api(agent.api_key)
    parall_server.delay_next(GET_CHAT, 0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await client.call(GET_CHAT, chat_id=chat.id)
    assert reply.status == 200
    assert loop.time() - started >= 0.2
    started = loop.time()
    await client.call(GET_CHAT, chat_id=chat.id)
    assert loop.time() - started < 0.2


@pytest.mark.asyncio
async def test_delayed_request_still_acts_after_the_client_gave_up(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    chat = parall_server.add_chat(members=[agent.user_id])
    parall_server.delay_next(SEND_MESSAGE, 0.2)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await api(agent.api_key).call(SEND_MESSAGE, chat_id=chat.id, body=BODY)
    await parall_server.wait_for(lambda: len(parall_server.messages(chat.id)) == 1)


@pytest.mark.asyncio
async def test_drop_next_closes_the_connection(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    agent = parall_server.add_agent()
    chat = parall_server.add_chat(members=[agent.user_id])
    client = api(agent.api_key)
    parall_server.drop_next(SEND_MESSAGE)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.call(SEND_MESSAGE, chat_id=chat.id, body=BODY)
    assert parall_server.messages(chat.id) == []
    dropped = parall_server.requests[-1]
    assert (dropped.method, dropped.status, dropped.json) == ("POST", None, BODY)
    assert (await client.call(SEND_MESSAGE, chat_id=chat.id, body=BODY)).status == 201


@pytest.mark.asyncio
async def test_drop_next_on_a_get(parall_server: FakeParallServer, api: ApiFactory) -> None:
    # aiohttp's client retries an idempotent request once on a fresh connection
    # after a disconnect: two drops are needed for it to see one.
    agent = parall_server.add_agent()
    parall_server.drop_next(ME, times=2)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api(agent.api_key).call(ME)
    assert [r.status for r in parall_server.requests] == [None, None]


def test_fault_injector_validates() -> None:
    faults = FaultInjector()
    with pytest.raises(ValueError, match="times"):
        faults.fail_next(ME, times=0)
    with pytest.raises(ValueError, match="body_form"):
        faults.fail_next(ME, body_form="xml")
    with pytest.raises(ValueError, match="status"):
        faults.fail_next(ME, status=200)
    with pytest.raises(TypeError):
        faults.drop_next("GET /api/v1/users/me")  # type: ignore[arg-type]
    faults.delay_next(Endpoint("GET", "/api/v1/users/me"), 1.0)
    assert faults.pending(ME) == 1  # endpoints compare by value
    faults.clear()
    assert faults.pending() == 0
