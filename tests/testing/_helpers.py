"""Helpers for the emulator's tests: a raw aiohttp client (never the library's
ParallClient) and WebSocket helpers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp
import attrs
import pytest

from parall_bridge.protocol import (
    QUERY_LAST_SEQ,
    QUERY_TICKET,
    WS_TICKET,
    Endpoint,
)
from parall_bridge.testing import FakeParallServer

__all__ = ["Api", "Reply", "nothing_arrives", "receive", "receive_close"]

RECEIVE_TIMEOUT = 2.0
"""How long a test waits for a frame it expects."""
QUIET_WINDOW = 0.15
"""How long a test watches to prove that nothing arrives."""

_NO_BODY: Any = object()


@attrs.frozen
class Reply:
    """A response, read in full."""

    status: int
    headers: Mapping[str, str]
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


@attrs.frozen
class Api:
    """Raw REST calls to the emulator with one API key."""

    server: FakeParallServer
    session: aiohttp.ClientSession
    api_key: str | None

    def url(self, endpoint: Endpoint, **path: str) -> str:
        params = {"org_id": self.server.org_id, **path}
        return self.server.url + endpoint.format(**params)

    async def call(
        self,
        endpoint: Endpoint,
        *,
        body: Any = _NO_BODY,
        params: Mapping[str, str] | None = None,
        **path: str,
    ) -> Reply:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        kwargs: dict[str, Any] = {"headers": headers, "params": params}
        if body is not _NO_BODY:
            kwargs["json"] = body
        async with self.session.request(
            endpoint.method, self.url(endpoint, **path), **kwargs
        ) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.text())

    async def ok(self, endpoint: Endpoint, **kwargs: Any) -> Any:
        """Call and expect a 2xx; return the decoded body."""
        reply = await self.call(endpoint, **kwargs)
        assert 200 <= reply.status < 300, (reply.status, reply.text)
        return reply.json

    async def connect(
        self, *, last_seq: int | None = None, max_msg_size: int = 4 * 1024 * 1024
    ) -> aiohttp.ClientWebSocketResponse:
        """Get a ticket and open a WebSocket (no hello read)."""
        ticket = await self.ok(WS_TICKET, body={})
        params = {QUERY_TICKET: ticket["ticket"]}
        if last_seq is not None:
            params[QUERY_LAST_SEQ] = str(last_seq)
        return await self.session.ws_connect(
            ticket["ws_url"], params=params, autoping=False, max_msg_size=max_msg_size
        )

    async def open_ws(self, *, last_seq: int | None = None) -> aiohttp.ClientWebSocketResponse:
        """Open a WebSocket and read its hello."""
        ws = await self.connect(last_seq=last_seq)
        hello = await receive(ws)
        assert hello["type"] == "hello", hello
        return ws


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = RECEIVE_TIMEOUT) -> Any:
    """The next text frame, decoded (fails on anything else)."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def receive_close(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read until the server's close frame; return its code."""
    while True:
        msg = await ws.receive(timeout=RECEIVE_TIMEOUT)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code
        assert msg.type is not aiohttp.WSMsgType.ERROR, msg


async def nothing_arrives(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Prove that no frame arrives within a short window."""
    with pytest.raises(TimeoutError):
        await ws.receive(timeout=QUIET_WINDOW)
