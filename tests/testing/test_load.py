"""What the emulator offers long runs and benchmarks: a simulated round trip on every
REST answer, recording that can be turned off, counts that are cheap to poll, and a
dispatch queue whose pages and acks cost the rows they touch."""

from __future__ import annotations

import asyncio
import math
import signal
import sys
import time
from collections.abc import Callable

import aiohttp
import pytest

from parall_bridge.cli import main
from parall_bridge.protocol import (
    ACK_DISPATCH,
    ACK_DISPATCH_BY_ID,
    CREATE_AGENT_SESSION,
    CREATE_AGENT_STEP,
    LIST_DISPATCH,
    MARK_DISPATCH_RECEIVED,
    ME,
)
from parall_bridge.testing import FakeParallServer

from ._helpers import Api, receive

ApiFactory = Callable[[str | None], Api]

LATENCY = 0.25
"""The simulated round trip of the latency test: far above a loopback request's time."""


def test_latency_is_validated() -> None:
    for bad in (-0.001, math.nan, math.inf):
        with pytest.raises(ValueError, match="latency"):
            FakeParallServer(latency=bad)
    assert FakeParallServer().latency == 0.0
    assert FakeParallServer(latency=0.002).latency == 0.002


@pytest.mark.asyncio
async def test_latency_delays_every_rest_answer(http: aiohttp.ClientSession) -> None:
    """Each request, answered or refused, takes at least the round trip; the WebSocket's
    frames are not delayed."""
    async with FakeParallServer(latency=LATENCY) as server:
        agent = server.add_agent()
        human = server.add_user("Ada")
        chat = server.add_chat(members=[human.id, agent.user_id])
        api = Api(server, http, agent.api_key)
        for key in (agent.api_key, None):  # a 200, then a 401
            started = time.monotonic()
            reply = await Api(server, http, key).call(ME)
            elapsed = time.monotonic() - started
            assert reply.status == (200 if key else 401)
            assert elapsed >= LATENCY, elapsed

        ws = await api.open_ws()  # the ticket took LATENCY; the frames do not
        started = time.monotonic()
        message = server.post_message(chat.id, human.id, "hi")
        frame = await receive(ws)
        assert frame["data"]["id"] == message.id
        assert time.monotonic() - started < LATENCY
        await ws.close()


@pytest.mark.asyncio
async def test_recording_can_be_turned_off(http: aiohttp.ClientSession) -> None:
    async with FakeParallServer(record_requests=False, record_ws_frames=False) as server:
        agent = server.add_agent()
        api = Api(server, http, agent.api_key)
        await api.ok(ME)
        ws = await api.open_ws()
        await ws.send_json({"type": "ping", "data": {"ts": 1}})
        assert (await receive(ws))["type"] == "pong"  # the frame was read, not kept
        await ws.close()
        assert server.requests == []
        assert server.ws_frames == []
    async with FakeParallServer() as server:  # the default keeps both
        agent = server.add_agent()
        api = Api(server, http, agent.api_key)
        await api.ok(ME)
        ws = await api.open_ws()
        await ws.send_json({"type": "ping", "data": {}})
        await receive(ws)
        await ws.close()
        assert [r.path for r in server.requests][-2:] == ["/api/v1/users/me", "/api/v1/ws/ticket"]
        assert [f.type for f in server.ws_frames] == ["ping"]


@pytest.mark.asyncio
async def test_counts(parall_server: FakeParallServer, api: ApiFactory) -> None:
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chat = parall_server.add_chat(members=[human.id, agent.user_id])
    assert parall_server.dispatch_count(agent.user_id) == 0
    assert parall_server.dispatch_count(agent.user_id, acked=True) == 0
    assert parall_server.step_count(agent.user_id) == 0
    messages = [parall_server.post_message(chat.id, human.id, str(i)) for i in range(3)]
    client = api(agent.api_key)
    await client.ok(ACK_DISPATCH, body={"source_type": "message", "source_id": messages[0].id})
    assert parall_server.dispatch_count(agent.user_id) == 2
    assert parall_server.dispatch_count(agent.user_id, acked=True) == 1

    session = await client.ok(
        CREATE_AGENT_SESSION,
        agent_id=agent.user_id,
        body={"runtime_type": "t", "runtime_key": "k"},
    )
    for _ in range(2):
        await client.ok(
            CREATE_AGENT_STEP,
            agent_id=agent.user_id,
            session_id=session["id"],
            body={"step_type": "input", "content": {}},
        )
    assert parall_server.step_count(agent.user_id) == 2 == len(parall_server.steps(agent.user_id))


@pytest.mark.asyncio
async def test_dispatch_pages_and_acks_in_any_order(
    parall_server: FakeParallServer, api: ApiFactory
) -> None:
    """Acks by id and by source, in and out of order, well past the point where the
    pending list is compacted, never make a page skip or repeat an item; a cursor on an
    item acked since still pages on from it."""
    agent = parall_server.add_agent()
    human = parall_server.add_user("Ada")
    chats = [parall_server.add_chat(members=[human.id, agent.user_id]) for _ in range(3)]
    count = 400
    posted = [
        parall_server.post_message(chats[i % 3].id, human.id, str(i)).id for i in range(count)
    ]
    items = {item.source_id: item.id for item in parall_server.dispatch_items(agent.user_id)}
    client = api(agent.api_key)
    pending = list(posted)

    async def listed(limit: int) -> list[str]:
        sources: list[str] = []
        cursor: str | None = None
        while True:
            params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
            page = await client.ok(LIST_DISPATCH, params=params)
            sources += [row["source_id"] for row in page["data"]]
            assert len(page["data"]) <= limit
            if not page["has_more"]:
                assert page["next_cursor"] is None
                return sources
            cursor = page["next_cursor"]

    # Out of order: every third by id, then a run from the front by source, then the
    # back half's odd ones; a page is read between the rounds with its cursor on an
    # item that is acked before the next page.
    rounds = [pending[::3], pending[1:150:3], pending[201::2]]
    for number, batch in enumerate(rounds):
        page = await client.ok(LIST_DISPATCH, params={"limit": "7"})
        for source in batch:
            if number == 1:
                body = {"source_type": "message", "source_id": source}
                await client.ok(MARK_DISPATCH_RECEIVED, body=body)
                assert await client.ok(ACK_DISPATCH, body=body) == {"acked": 1}
            else:
                await client.ok(ACK_DISPATCH_BY_ID, dispatch_id=items[source])
        done = set(batch)
        pending = [source for source in pending if source not in done]
        rest = await client.ok(LIST_DISPATCH, params={"limit": "5", "cursor": page["next_cursor"]})
        last = page["data"][-1]["source_id"]
        after = [source for source in pending if posted.index(source) > posted.index(last)]
        assert [row["source_id"] for row in rest["data"]] == after[:5]
        assert await listed(limit=13) == pending
        assert parall_server.dispatch_count(agent.user_id) == len(pending)
        assert parall_server.dispatch_count(agent.user_id, acked=True) == count - len(pending)
        assert [i.source_id for i in parall_server.dispatch_items(agent.user_id)] == pending

    # Acking an acked item again is fine, and changes nothing.
    assert await client.ok(ACK_DISPATCH_BY_ID, dispatch_id=items[posted[0]]) == {"acked": 1}
    assert parall_server.dispatch_count(agent.user_id, acked=True) == count - len(pending)
    for source in pending:
        await client.ok(ACK_DISPATCH_BY_ID, dispatch_id=items[source])
    assert await listed(limit=50) == []
    everything = parall_server.dispatch_items(agent.user_id, include_acked=True)
    assert [i.source_id for i in everything] == posted
    assert {i.status for i in everything} == {"acked"}


def test_the_emulator_command_refuses_a_bad_latency(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as exited:
            main(["emulator", "--latency", bad])
        assert exited.value.code == 2
        assert "--latency" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_the_emulator_command_serves_with_latency(http: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "parall_bridge",
        "emulator",
        "--port",
        "0",
        "--latency",
        str(LATENCY),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(20):
            while not lines or not lines[-1].startswith("Ctrl-C"):
                lines.append((await process.stdout.readline()).decode().strip())
        assert f"Every REST answer waits {LATENCY * 1000:g} ms" in "\n".join(lines)
        env = dict(line.split("=", 1) for line in lines if line.startswith("PRLL_"))
        headers = {"Authorization": f"Bearer {env['PRLL_API_KEY']}"}
        started = time.monotonic()
        async with http.get(env["PRLL_API_URL"] + ME.path, headers=headers) as response:
            assert response.status == 200
        assert time.monotonic() - started >= LATENCY
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        try:
            assert await asyncio.wait_for(process.wait(), 20) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
