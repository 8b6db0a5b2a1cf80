"""TLS verification, for real: a loopback HTTPS (and WSS) server with a self-signed
certificate made for the test. Verified by default; ``verify_tls=False`` turns it off."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from parall_bridge import (
    AgentRuntime,
    Gateway,
    GatewayConfig,
    NotFoundError,
    ParallClient,
    ParallConnectionError,
    ParallTLSError,
    ParallWs,
    Turn,
    WsTicket,
)
from parall_bridge import protocol as p

from .conftest import FAST_RETRY


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the ``openssl`` binary."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl binary is needed to make a self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(  # noqa: S603 - a fixed command line, no shell
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest_asyncio.fixture
async def https_url(certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    """An HTTPS server on loopback answering ``/users/me`` and a WebSocket at ``/ws``."""

    async def me(_: web.Request) -> web.Response:
        return web.json_response({"id": "usr_tls", "display_name": "Secure"})

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_json({"type": p.FRAME_HELLO, "data": {"session_id": "wss_tls"}})
        async for _ in socket:
            pass
        return socket

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    app = web.Application()
    app.router.add_get(p.ME.path, me)
    app.router.add_get(p.WS_PATH, ws)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_rest_verifies_certificates_by_default(
    https_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with ParallClient(https_url, "pk_tls", retry=FAST_RETRY) as client:
        with pytest.raises(ParallTLSError, match=r"TLS failed with 127\.0\.0\.1") as info:
            await client.get_me()
    assert isinstance(info.value, ParallConnectionError)
    assert not info.value.request_sent
    assert "retrying" not in caplog.text  # a certificate does not fix itself
    assert "self-signed" in str(info.value) or "certificate" in str(info.value)


@pytest.mark.asyncio
async def test_rest_verify_tls_false_works_and_warns(
    https_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with ParallClient(https_url, "pk_tls", verify_tls=False) as client:
        assert (await client.get_me()).id == "usr_tls"
        await client.get_me()
    warnings = [r for r in caplog.records if "verification is OFF" in r.getMessage()]
    assert [r.levelname for r in warnings] == ["WARNING"]  # once, at construction


@pytest.mark.asyncio
async def test_websocket_verifies_certificates_by_default_and_can_be_told_not_to(
    https_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    wss_url = "wss" + https_url.removeprefix("https") + p.WS_PATH

    async def ticket() -> WsTicket:
        return WsTicket(ticket="wst_tls", ws_url=wss_url)

    strict = ParallWs(ticket)
    with pytest.raises(ParallTLSError, match="WebSocket connection: TLS failed"):
        await strict.connect()
    await strict.disconnect()
    relaxed = ParallWs(ticket, verify_tls=False)
    try:
        await relaxed.connect()
        assert relaxed.session_id == "wss_tls"
    finally:
        await relaxed.disconnect()
    assert "verification is OFF for the WebSocket" in caplog.text


@pytest.mark.asyncio
async def test_a_gateway_verifies_certificates_unless_its_config_says_not_to(
    https_url: str,
) -> None:
    """GatewayConfig.verify_tls reaches the client the gateway makes: by default a
    self-signed certificate stops start() at once (a TLS failure is not retried); with
    verify_tls=False it gets past TLS (this tiny server then refuses the agent session)."""
    runtime = _Idle()
    strict = Gateway(GatewayConfig(https_url, "pk_tls", "org_tls"), runtime)
    with pytest.raises(ParallTLSError):
        await asyncio.wait_for(strict.start(asyncio.Event()), 10)
    relaxed = Gateway(GatewayConfig(https_url, "pk_tls", "org_tls", verify_tls=False), runtime)
    with pytest.raises(NotFoundError):
        await asyncio.wait_for(relaxed.start(asyncio.Event()), 10)
    assert relaxed.agent_id == "usr_tls"  # authenticated over TLS


class _Idle(AgentRuntime):
    async def run_turn(self, turn: Turn) -> str | None:
        return None
