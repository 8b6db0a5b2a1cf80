"""ParallClient against the emulator, over real sockets."""

from __future__ import annotations

import asyncio
import email.utils
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from parall_bridge import (
    UNSET,
    AgentStep,
    AuthenticationError,
    BadRequestError,
    Chat,
    ConflictError,
    DispatchEventType,
    MediaContent,
    NotFoundError,
    ParallAPIError,
    ParallClient,
    ParallConnectionError,
    ParallTimeoutError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    SourceType,
    StepType,
    TaskPriority,
    TaskStatus,
    TextContent,
)
from parall_bridge import protocol as p
from parall_bridge.testing import AgentAccount, FakeParallServer

from .conftest import FAST_RETRY

# --- identity and reads ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_me_and_agent_me(client: ParallClient, agent: AgentAccount) -> None:
    me = await client.get_me()
    assert me.id == agent.user_id
    assert me.display_name == "Bot"
    assert (await client.get_agent_me("org_test")).id == agent.user_id


@pytest.mark.asyncio
async def test_chats_paginate_across_pages(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    created = [
        server.add_chat(type="group", name=f"room {i}", members=[ada.id, agent.user_id])
        for i in range(7)
    ]
    first = await client.get_chats("org_test", limit=3)
    assert len(first.data) == 3
    assert first.has_more
    assert first.next_cursor
    second = await client.get_chats("org_test", limit=3, cursor=first.next_cursor)
    assert {c.id for c in first.data}.isdisjoint(c.id for c in second.data)
    every = [chat async for chat in client.iter_chats("org_test", page_size=2)]
    assert sorted(c.id for c in every) == sorted(c.id for c in created)
    pages = [r for r in server.requests if r.path.endswith("/chats") and r.method == "GET"]
    assert len(pages) >= 2 + 4  # two direct calls, then four pages of two


@pytest.mark.asyncio
async def test_member_chats_and_get_chat(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    server.add_chat(type="direct", members=[ada.id])  # not the agent's
    mine = [c async for c in client.iter_member_chats("org_test", agent.user_id, page_size=1)]
    assert [c.id for c in mine] == [chat.id]
    page = await client.get_member_chats("org_test", agent.user_id)
    assert [c.id for c in page.data] == [chat.id]
    fetched = await client.get_chat("org_test", chat.id)
    assert isinstance(fetched, Chat)
    assert fetched.type == "direct"


@pytest.mark.asyncio
async def test_messages_history_newest_first_with_before(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    posted = [server.post_message(chat.id, ada.id, f"m{i}") for i in range(5)]
    page = await client.get_chat_messages("org_test", chat.id, limit=2)
    assert [m.id for m in page.data] == [posted[4].id, posted[3].id]
    assert page.next_cursor
    older = await client.get_chat_messages("org_test", chat.id, limit=2, before=page.next_cursor)
    assert [m.id for m in older.data] == [posted[2].id, posted[1].id]
    message = await client.get_message(posted[0].id)
    assert isinstance(message.content, TextContent)
    assert message.content.text == "m0"
    assert message.sender_name == "Ada"


@pytest.mark.asyncio
async def test_thread_replies(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    root = server.post_message(chat.id, ada.id, "root")
    replies = [
        server.post_message(chat.id, ada.id, f"r{i}", thread_root_id=root.id) for i in range(3)
    ]
    page = await client.get_replies(root.id, limit=2)
    assert [m.id for m in page.data] == [replies[0].id, replies[1].id]
    every = [m async for m in client.iter_replies(root.id, page_size=2)]
    assert [m.id for m in every] == [r.id for r in replies]


@pytest.mark.asyncio
async def test_tasks_get_and_update_with_unset(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    boss = server.add_user("Boss")
    task = server.assign_task(
        "Write docs", assignee_id=agent.user_id, creator_id=boss.id, description="all of them"
    )
    fetched = await client.get_task("org_test", task.id)
    assert fetched.title == "Write docs"
    assert fetched.status is TaskStatus.TODO
    updated = await client.update_task(
        "org_test", task.id, status=TaskStatus.IN_PROGRESS, description=None
    )
    assert updated.status is TaskStatus.IN_PROGRESS
    assert updated.description is None
    assert updated.title == "Write docs"
    body = [r.json for r in server.requests if r.method == "PATCH"][-1]
    assert body == {"status": "in_progress", "description": None}  # UNSET fields not sent
    again = await client.update_task("org_test", task.id, priority=TaskPriority.HIGH, title=UNSET)
    assert again.priority is TaskPriority.HIGH
    assert [r.json for r in server.requests if r.method == "PATCH"][-1] == {"priority": "high"}


# --- sending ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_send_message_shape_and_generated_key(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="group", name="team", members=[ada.id, agent.user_id])
    root = server.post_message(chat.id, ada.id, "root")
    sent = await client.send_message(
        "org_test", chat.id, "hello", mentions=[ada.id], thread_root_id=root.id, no_reply=True
    )
    assert sent.sender_id == agent.user_id
    assert sent.thread_root_id == root.id
    body = [r.json for r in server.requests if r.method == "POST" and r.path.endswith("/messages")][
        -1
    ]
    assert body is not None
    assert body["message_type"] == "text"
    assert body["content"] == {"text": "hello", "mentions": [{"user_id": ada.id}]}
    assert body["thread_root_id"] == root.id
    assert body["hints"] == {"no_reply": True}
    assert body["idempotency_key"].startswith("pb:")
    assert "attachment_ids" not in body


@pytest.mark.asyncio
async def test_send_message_same_key_posts_once(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    first = await client.send_message("org_test", chat.id, "once", idempotency_key="pb:k1")
    second = await client.send_message("org_test", chat.id, "once", idempotency_key="pb:k1")
    assert first.id == second.id
    assert [m.id for m in server.messages(chat.id)] == [first.id]


@pytest.mark.parametrize("key", ["reply:abc", "task_update:1"])
@pytest.mark.asyncio
async def test_reserved_idempotency_prefix_is_refused_before_any_request(
    client: ParallClient, server: FakeParallServer, key: str
) -> None:
    before = len(server.requests)
    with pytest.raises(ValueError, match="reserved"):
        await client.send_message("org_test", "cht_x", "hi", idempotency_key=key)
    assert len(server.requests) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": {"text": "hi"}}, "text must be a str, got dict"),
        ({"text": "hi", "mentions": "usr_1"}, r"mentions is a collection of ids"),
        ({"text": "hi", "attachment_ids": "att_1"}, r"attachment_ids is a collection of ids"),
    ],
)
@pytest.mark.asyncio
async def test_send_message_argument_mistakes_are_refused_before_any_request(
    client: ParallClient, server: FakeParallServer, kwargs: dict[str, Any], message: str
) -> None:
    before = len(server.requests)
    with pytest.raises(TypeError, match=message):
        await client.send_message("org_test", "cht_x", **kwargs)
    assert len(server.requests) == before


@pytest.mark.asyncio
async def test_send_retried_after_acted_then_500_posts_exactly_one_message(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    server.fail_next(p.SEND_MESSAGE, status=500, act_first=True)
    sent = await client.send_message("org_test", chat.id, "exactly once")
    stored = server.messages(chat.id)
    assert [m.id for m in stored] == [sent.id]
    sends = [r for r in server.requests if r.method == "POST" and r.path.endswith("/messages")]
    assert len(sends) == 2
    assert sends[0].json is not None
    assert sends[1].json is not None
    assert sends[0].json["idempotency_key"] == sends[1].json["idempotency_key"]


@pytest.mark.asyncio
async def test_upload_round_trip(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    data = b"\x89PNG fake image bytes" * 10
    attachment_id = await client.upload_file(
        "org_test", data, file_name="pic.png", mime_type="image/png"
    )
    assert server.uploaded_bytes(attachment_id) == data
    sent = await client.send_message("org_test", chat.id, "see pic", attachment_ids=[attachment_id])
    assert [a.id for a in sent.attachments] == [attachment_id]
    assert sent.attachments[0].mime_type == "image/png"
    url = await client.get_file_url(attachment_id)
    async with aiohttp.ClientSession() as http, http.get(url.url) as resp:
        assert await resp.read() == data


@pytest.mark.asyncio
async def test_file_message_content(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    posted = server.post_file(
        chat.id, ada.id, b"%PDF", file_name="r.pdf", mime_type="application/pdf", caption="report"
    )
    message = await client.get_message(posted.id)
    assert isinstance(message.content, MediaContent)
    assert message.content.file_name == "r.pdf"
    assert message.content.caption == "report"


# --- dispatch, sessions, steps, config, ticket ---------------------------------------------------


@pytest.mark.asyncio
async def test_dispatch_list_ack_and_received(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    ada = server.add_user("Ada")
    chat = server.add_chat(type="direct", members=[ada.id, agent.user_id])
    messages = [server.post_message(chat.id, ada.id, f"m{i}") for i in range(5)]
    items = [item async for item in client.iter_dispatch("org_test", page_size=2)]
    assert [i.source_id for i in items] == [m.id for m in messages]  # FIFO
    assert items[0].event_type is DispatchEventType.MESSAGE
    await client.mark_dispatch_received(
        "org_test", source_type=SourceType.MESSAGE, source_id=messages[0].id
    )
    assert server.dispatch_items(agent.user_id)[0].status == "received"
    acked = await client.ack_dispatch(
        "org_test", source_type=SourceType.MESSAGE, source_id=messages[0].id
    )
    assert acked == 1
    assert await client.ack_dispatch_by_id("org_test", items[1].id) == 1
    assert await client.ack_dispatch_by_id("org_test", items[1].id) == 1  # idempotent
    page = await client.get_dispatch("org_test", limit=10)
    assert [i.source_id for i in page.data] == [m.id for m in messages[2:]]


@pytest.mark.asyncio
async def test_agent_session_steps_and_config(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    session = await client.create_agent_session(
        "org_test",
        agent.user_id,
        runtime_type="test",
        runtime_key="agent:main:parall:default",
        runtime_ref={"pid": 1},
    )
    updated = await client.update_agent_session(
        "org_test", agent.user_id, session.id, status="idle"
    )
    assert updated.status == "idle"
    step = await client.create_agent_step(
        "org_test",
        agent.user_id,
        session.id,
        AgentStep(
            step_type="thinking",
            target_type="chat",
            target_id="cht_1",
            content={"text": "hmm"},
            group_key="g1",
        ),
    )
    assert step.id
    assert step.session_id == session.id
    assert step.step_type is StepType.THINKING
    assert [s.content for s in server.steps(agent.user_id)] == [{"text": "hmm"}]
    server.set_agent_config(agent.user_id, {"models": ["m1"], "defaults": {"model": "m1"}})
    config = await client.get_agent_config("org_test", agent.user_id)
    assert config.version >= 2
    assert config.extra["models"] == ["m1"]


@pytest.mark.asyncio
async def test_ws_ticket(client: ParallClient, server: FakeParallServer) -> None:
    ticket = await client.get_ws_ticket()
    assert ticket.ticket
    assert ticket.ws_url == server.ws_url
    assert ticket.ticket not in repr(ticket)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, ParallAPIError),
        (501, ServerError),
    ],
)
@pytest.mark.parametrize("body_form", ["canonical", "legacy", "message", "html", "empty"])
@pytest.mark.asyncio
async def test_every_error_class_and_body_form(
    client: ParallClient,
    server: FakeParallServer,
    status: int,
    cls: type[ParallAPIError],
    body_form: str,
) -> None:
    server.fail_next(p.ME, status=status, body_form=body_form)
    with pytest.raises(cls) as info:
        await client.get_me()
    error = info.value
    assert type(error) is cls
    assert error.status == status
    assert error.method == "GET"
    assert error.path == "/api/v1/users/me"
    assert len(error.body) <= 200
    if body_form == "canonical":
        assert error.code
        assert error.message
    elif body_form in ("legacy", "message"):
        assert error.code is None
        assert error.message
    elif body_form == "html":
        assert "non-JSON" in error.message
        assert "<" in error.body


@pytest.mark.asyncio
async def test_wrong_key_is_authentication_error(server: FakeParallServer) -> None:
    async with ParallClient(server.url, "pk_wrong", retry=FAST_RETRY) as bad:
        with pytest.raises(AuthenticationError) as info:
            await bad.get_me()
    assert info.value.status == 401
    assert "pk_wrong" not in str(info.value)


@pytest.mark.asyncio
async def test_not_found_carries_status_and_code(client: ParallClient) -> None:
    with pytest.raises(NotFoundError) as info:
        await client.get_message("msg_missing")
    assert info.value.status == 404
    assert info.value.code == "NOT_FOUND"


@pytest.mark.asyncio
async def test_ids_are_url_encoded(client: ParallClient, server: FakeParallServer) -> None:
    with pytest.raises(NotFoundError):
        await client.get_message("msg/../../users/me?x=1 #")
    assert server.requests[-1].path == "/api/v1/messages/msg%2F..%2F..%2Fusers%2Fme%3Fx%3D1%20%23"


# --- retries -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_429_waits_retry_after_then_succeeds(
    client: ParallClient, server: FakeParallServer
) -> None:
    server.fail_next(p.ME, status=429, retry_after=0.4)
    started = time.monotonic()
    await client.get_me()
    assert time.monotonic() - started >= 0.4
    assert [r.status for r in server.requests if r.path == "/api/v1/users/me"] == [429, 200]


@pytest.mark.asyncio
async def test_429_with_an_http_date(client: ParallClient, server: FakeParallServer) -> None:
    when = datetime.now(UTC) + timedelta(seconds=1.5)
    server.fail_next(p.ME, status=429, retry_after=email.utils.format_datetime(when, usegmt=True))
    started = time.monotonic()
    await client.get_me()
    assert time.monotonic() - started >= 0.4  # the date has one-second resolution


@pytest.mark.asyncio
async def test_429_beyond_the_cap_raises_at_once(
    client: ParallClient, server: FakeParallServer
) -> None:
    server.fail_next(p.ME, status=429, retry_after=120)
    started = time.monotonic()
    with pytest.raises(RateLimitedError) as info:
        await client.get_me()
    assert time.monotonic() - started < 1.0
    assert info.value.retry_after == 120
    assert len([r for r in server.requests if r.path == "/api/v1/users/me"]) == 1


@pytest.mark.asyncio
async def test_5xx_retried_then_succeeding(client: ParallClient, server: FakeParallServer) -> None:
    server.fail_next(p.ME, status=503, times=2)
    await client.get_me()
    assert [r.status for r in server.requests if r.path == "/api/v1/users/me"] == [503, 503, 200]


@pytest.mark.asyncio
async def test_5xx_exhausted_raises_server_error(
    client: ParallClient, server: FakeParallServer
) -> None:
    server.fail_next(p.ME, status=502, times=10)
    with pytest.raises(ServerError) as info:
        await client.get_me()
    assert info.value.status == 502
    assert len([r for r in server.requests if r.path == "/api/v1/users/me"]) == 4  # 1 + 3 retries


@pytest.mark.asyncio
async def test_step_create_not_retried_after_ambiguous_500(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    session = await client.create_agent_session(
        "org_test", agent.user_id, runtime_type="t", runtime_key="k"
    )
    server.fail_next(p.CREATE_AGENT_STEP, status=500, act_first=True)
    with pytest.raises(ServerError):
        await client.create_agent_step(
            "org_test",
            agent.user_id,
            session.id,
            AgentStep(step_type="text", content={"text": "x"}),
        )
    assert len(server.steps(agent.user_id)) == 1  # the server acted once; no second copy
    assert len([r for r in server.requests if r.path.endswith("/steps")]) == 1


@pytest.mark.asyncio
async def test_step_create_retried_on_429(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    session = await client.create_agent_session(
        "org_test", agent.user_id, runtime_type="t", runtime_key="k"
    )
    server.fail_next(p.CREATE_AGENT_STEP, status=429, retry_after=0.05)
    await client.create_agent_step(
        "org_test", agent.user_id, session.id, AgentStep(step_type="text", content={"text": "x"})
    )
    assert len(server.steps(agent.user_id)) == 1


@pytest.mark.asyncio
async def test_dropped_connection_is_retried_for_reads(
    client: ParallClient, server: FakeParallServer
) -> None:
    server.drop_next(p.ME)
    await client.get_me()
    assert len([r for r in server.requests if r.path == "/api/v1/users/me"]) == 2


@pytest.mark.asyncio
async def test_dropped_connection_is_not_retried_for_creates(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    server.drop_next(p.CREATE_AGENT_SESSION)
    with pytest.raises(ParallConnectionError) as info:
        await client.create_agent_session(
            "org_test", agent.user_id, runtime_type="t", runtime_key="k"
        )
    assert info.value.request_sent


@pytest.mark.asyncio
async def test_timeout_raises_parall_timeout_error(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    server.delay_next(p.ME, 2.0, times=5)
    async with ParallClient(
        server.url,
        agent.api_key,
        timeout=0.2,
        retry=RetryPolicy(max_retries=1, initial_backoff=0.01, jitter=0),
    ) as slow:
        with pytest.raises(ParallTimeoutError):
            await slow.get_me()


@pytest.mark.asyncio
async def test_refused_connection_after_retries() -> None:
    # A port nothing listens on: bind one, then close it.
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    async with ParallClient(f"http://127.0.0.1:{port}", "pk_x", retry=FAST_RETRY) as c:
        with pytest.raises(ParallConnectionError) as info:
            await c.get_me()
    assert not info.value.request_sent
    assert not isinstance(info.value, ParallTimeoutError)


def test_create_requests_retry_when_the_server_cannot_have_acted() -> None:
    from parall_bridge._retry import Safety

    policy = RetryPolicy()
    refused = ParallConnectionError("refused", request_sent=False)
    reset = ParallConnectionError("reset", request_sent=True)
    assert policy.should_retry(refused, Safety.CREATE)
    assert not policy.should_retry(reset, Safety.CREATE)
    assert policy.should_retry(reset, Safety.SAFE)
    error = ServerError(status=503, message="x", method="POST", path="/p")
    assert not policy.should_retry(error, Safety.CREATE)
    assert policy.should_retry(error, Safety.SAFE)
    assert not policy.should_retry(
        ServerError(status=501, message="x", method="GET", path="/p"), Safety.SAFE
    )


def test_retry_policy_validates() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)


@pytest.mark.asyncio
async def test_malformed_2xx_raises_protocol_error(
    client: ParallClient, server: FakeParallServer
) -> None:
    server.malform_next(p.ME, body="<html>oops</html>")
    with pytest.raises(ProtocolError, match="not JSON"):
        await client.get_me()
    server.malform_next(p.ME, body='{"display_name": "no id"}')
    with pytest.raises(ProtocolError, match=r"\$\.id"):
        await client.get_me()
    server.malform_next(p.LIST_CHATS, body='{"has_more": false}')
    with pytest.raises(ProtocolError, match=r"\$\.data"):
        await client.get_chats("org_test")


# --- ownership, secrets ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_injected_session_is_not_closed(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    async with aiohttp.ClientSession() as session:
        async with ParallClient(server.url, agent.api_key, session=session) as c:
            await c.get_me()
        assert not session.closed
    own = ParallClient(server.url, agent.api_key)
    await own.get_me()
    await own.close()
    await own.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await own.get_me()


@pytest.mark.asyncio
async def test_shared_connector_keeps_each_key_to_its_client(server: FakeParallServer) -> None:
    bots = [server.add_agent(f"Bot {n}") for n in range(3)]
    connector = aiohttp.TCPConnector()
    try:
        clients = [ParallClient(server.url, bot.api_key, connector=connector) for bot in bots]
        for _ in range(2):  # the second round goes over connections another key used
            for bot, c in zip(bots, clients, strict=True):
                assert (await c.get_me()).id == bot.user_id
        assert all(c._ensure_session().connector is connector for c in clients)
        for c in clients:
            await c.close()
        assert not connector.closed  # the caller's
        assert [r.user_id for r in server.requests] == [b.user_id for b in bots] * 2
    finally:
        await connector.close()
    with pytest.raises(ValueError, match="not both"):
        async with aiohttp.ClientSession() as session:
            ParallClient(server.url, "k", session=session, connector=connector)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="base_url"):
        ParallClient("api.parall.example", "k")
    with pytest.raises(ValueError, match="api_key"):
        ParallClient("https://api.parall.example", "")


@pytest.mark.asyncio
async def test_api_key_never_in_logs_errors_or_reprs(
    server: FakeParallServer, agent: AgentAccount, all_logs: pytest.LogCaptureFixture
) -> None:
    key = agent.api_key
    errors: list[BaseException] = []
    async with ParallClient(server.url, key, retry=FAST_RETRY) as c:
        assert key not in repr(c)
        server.fail_next(p.ME, status=503, times=2)
        await c.get_me()
        for status in (400, 401, 404, 429, 500):
            server.fail_next(p.ME, status=status, times=5, retry_after=0.01)
            try:
                await c.get_me()
            except Exception as exc:
                errors.append(exc)
        server.drop_next(p.ME, times=5)
        try:
            await c.get_me()
        except Exception as exc:
            errors.append(exc)
        server.malform_next(p.ME)
        try:
            await c.get_me()
        except Exception as exc:
            errors.append(exc)
    assert len(errors) == 7
    text = all_logs.text + "".join(f"{e}{e!r}{e.__cause__!r}{e.__context__!r}" for e in errors)
    assert any(r.levelname == "WARNING" for r in all_logs.records)  # retries were logged
    assert key not in text
    assert all(key not in str(r.__dict__) for r in all_logs.records)


@pytest.mark.asyncio
async def test_an_error_body_echoing_the_api_key_is_redacted() -> None:
    """A server or proxy that echoes the request's credentials in its error page must not
    carry the key into the exception (message, body excerpt, str or repr)."""
    key = "pk_live_echoed_secret_0123456789"

    async def echo(request: web.Request) -> web.Response:
        auth = request.headers.get(p.HEADER_AUTHORIZATION, "")
        return web.json_response(
            {"error": {"code": "UNAUTHORIZED", "message": f"bad credentials: {auth}"}},
            status=401,
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with ParallClient(f"http://127.0.0.1:{port}", key, retry=FAST_RETRY) as c:
            with pytest.raises(AuthenticationError) as caught:
                await c.get_me()
    finally:
        await runner.cleanup()
    error = caught.value
    assert "bad credentials: Bearer ***" in error.message
    for text in (error.message, error.body, str(error), repr(error)):
        assert key not in text
