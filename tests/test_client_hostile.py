"""ParallClient against hostile answers served by the emulator: whatever comes back, what
leaves the client is a model or a ParallError, and it never holds more than its caps."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from parall_bridge import (
    PaginationError,
    ParallClient,
    ParallConnectionError,
    ProtocolError,
    RetryPolicy,
    ServerError,
)
from parall_bridge import protocol as p
from parall_bridge.testing import AgentAccount, FakeParallServer

from .conftest import FAST_RETRY

NO_RETRY = RetryPolicy(max_retries=0)
MB = 1024 * 1024


# --- bodies that are not the JSON they should be -------------------------------------------------


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 64"),
        ('{"id": "usr_1", "display_name": ' + "[" * 2000 + "]" * 2000 + "}", "nested deeper"),
        ('{"id": "usr_1", "n": 1e400}', "too large for a double"),
        ('{"id": "usr_1", "n": NaN}', "NaN is not a JSON number"),
        ('{"id": "usr_1", "n": ' + "9" * 400 + "}", "too large for a double"),
        ('{"id": "usr_1"', "not JSON"),
        ("", None),  # an empty 200: no user at all
        ('"just a string"', "expected an object"),
        ("[1, 2]", "expected an object"),
        ('{"id": null}', r"expected str @ \$\.id"),
        ('{"display_name": "no id"}', r"required field missing @ \$\.id"),
        ('{"id": 42}', r"expected str @ \$\.id"),
        ('{"id": "usr_1", "display_name": 7}', r"\$\.display_name"),
        ('{"id": "usr_1", "type": {"nested": true}}', r"\$\.type"),
    ],
)
@pytest.mark.asyncio
async def test_malformed_user_bodies_are_protocol_errors(
    client: ParallClient, server: FakeParallServer, body: str, match: str | None
) -> None:
    server.malform_next(p.ME, body=body)
    with pytest.raises(ProtocolError, match=match) as info:
        await client.get_me()
    assert info.value.path == p.ME.path
    assert len([r for r in server.requests if r.path == p.ME.path]) == 1  # not retried


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('{"data": "abc", "has_more": false}', r"\$\.data"),
        ('{"data": {"id": "cht_1"}, "has_more": false}', r"\$\.data"),
        ('{"data": [{"id": "cht_1"}], "has_more": "yes"}', r"\$\.has_more"),
        ('{"data": [{"id": "cht_1"}, {"id": null}], "has_more": false}', r"\$\.data\[1\]\.id"),
        ('{"data": [{"id": "cht_1"}], "has_more": true, "next_cursor": 5}', r"next_cursor"),
        ('{"data": [{"id": "cht_1", "created_at": 12}], "has_more": false}', r"created_at"),
    ],
)
@pytest.mark.asyncio
async def test_malformed_pages_are_protocol_errors(
    client: ParallClient, server: FakeParallServer, body: str, match: str
) -> None:
    server.malform_next(p.LIST_CHATS, body=body)
    with pytest.raises(ProtocolError, match=match):
        await client.get_chats("org_test")


@pytest.mark.asyncio
async def test_wrong_types_in_a_message_are_protocol_errors(
    client: ParallClient, server: FakeParallServer
) -> None:
    base = {"id": "msg_1", "chat_id": "cht_1", "sender_id": "usr_1", "message_type": "text"}
    patches: list[tuple[dict[str, Any], str]] = [
        ({"content": {"text": "hi", "mentions": "usr_2"}}, r"mentions"),
        ({"content": [1]}, "content: expected an object"),
        ({"content": {}, "attachment_ids": "att_1"}, r"attachment_ids"),
        ({"content": {}, "hints": {"no_reply": "true"}}, r"no_reply"),
        ({"content": {}, "sender_id": None}, r"sender_id"),
        ({"content": {}, "attachments": [{"id": "att_1", "file_size": "big"}]}, r"file_size"),
    ]
    for patch, match in patches:
        server.malform_next(p.GET_MESSAGE, body=json.dumps({**base, **patch}))
        with pytest.raises(ProtocolError, match=match):
            await client.get_message("msg_1")


@pytest.mark.asyncio
async def test_null_on_a_field_with_a_default_reads_as_absent(
    client: ParallClient, server: FakeParallServer
) -> None:
    """PROTOCOL.md: every field but the ids may be absent; a null there is read as absent."""
    server.malform_next(p.ME, body='{"id": "usr_1", "display_name": null, "type": null}')
    me = await client.get_me()
    assert (me.id, me.display_name, me.type) == ("usr_1", "", None)
    server.malform_next(p.LIST_DISPATCH, body='{"data": [{"id": "dsp_1", "status": null}]}')
    page = await client.get_dispatch("org_test")
    assert page.data[0].status == "pending"
    assert page.has_more is False


@pytest.mark.asyncio
async def test_odd_acked_answers_are_protocol_errors(
    client: ParallClient, server: FakeParallServer
) -> None:
    for body in ('{"acked": true}', '{"acked": "1"}', "[1]"):
        server.malform_next(p.ACK_DISPATCH_BY_ID, body=body)
        with pytest.raises(ProtocolError):
            await client.ack_dispatch_by_id("org_test", "dsp_1")


# --- content type, truncation, size caps -------------------------------------------------------


@pytest.mark.asyncio
async def test_a_2xx_that_is_not_json_by_content_type_is_a_protocol_error(
    client: ParallClient, server: FakeParallServer
) -> None:
    page = "<html><body>Sign in to the proxy</body></html>"
    server.malform_next(p.ME, body=page, content_type="text/html; charset=utf-8")
    with pytest.raises(ProtocolError, match="expected JSON, got text/html"):
        await client.get_me()
    server.malform_next(p.ME, body='{"id": "usr_1"}', content_type="application/problem+json")
    assert (await client.get_me()).id == "usr_1"  # a +json type is JSON


@pytest.mark.asyncio
async def test_a_truncated_body_is_a_connection_error_that_may_have_acted(
    client: ParallClient, server: FakeParallServer, agent: AgentAccount
) -> None:
    body = json.dumps({"id": "ses_1", "status": "active", "pad": "x" * 4000})
    server.malform_next(p.CREATE_AGENT_SESSION, body=body, status=201, truncated=True)
    with pytest.raises(ParallConnectionError, match="cut short") as info:
        await client.create_agent_session(
            "org_test", agent.user_id, runtime_type="t", runtime_key="k"
        )
    assert info.value.request_sent  # a create is therefore not retried
    assert len([r for r in server.requests if r.path.endswith("/sessions")]) == 1
    server.malform_next(p.ME, body=body, truncated=True)
    assert (await client.get_me()).id == agent.user_id  # a read is retried


@pytest.mark.asyncio
async def test_a_body_above_the_cap_is_abandoned(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    async with ParallClient(
        server.url, agent.api_key, retry=NO_RETRY, max_response_bytes=1024
    ) as small:
        server.malform_next(p.ME, body='{"id": "usr_1", "pad": "' + "x" * 2000 + '"}')
        with pytest.raises(ProtocolError, match="body of 2026 bytes is above the 1024-byte cap"):
            await small.get_me()  # announced by Content-Length: not read at all
        server.malform_next(p.ME, body="x", size=5 * MB)
        with pytest.raises(ProtocolError, match="above the 1024-byte cap: abandoned"):
            await small.get_me()  # chunked: read up to the cap, then dropped
        assert (await small.get_me()).id == agent.user_id  # the client is still usable


def _reset_peak_memory() -> None:
    """Reset VmHWM to the current RSS (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def _memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


@pytest.mark.asyncio
async def test_a_100_mb_body_does_not_raise_peak_memory_past_the_cap(
    client: ParallClient, server: FakeParallServer
) -> None:
    """The body is read streamed and abandoned at the 16 MiB cap, never buffered whole:
    the peak RSS (VmHWM, reset first) grows by about the cap, not by 100 MB."""
    try:
        _reset_peak_memory()
        before = _memory_kb("VmRSS")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak RSS")
    server.malform_next(p.ME, body="x" * 4096, size=100 * MB)
    with pytest.raises(ProtocolError, match="16777216-byte cap"):
        await client.get_me()
    grown_mb = (_memory_kb("VmHWM") - before) / 1024
    logging.getLogger(__name__).info("peak RSS grew by %.1f MB", grown_mb)
    assert grown_mb < 48, f"peak RSS grew by {grown_mb:.1f} MB reading a 100 MB body"


@pytest.mark.asyncio
async def test_an_error_body_is_read_once_and_capped(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    async with ParallClient(server.url, agent.api_key, retry=NO_RETRY) as c:
        server.malform_next(p.ME, status=502, body="<p>bad gateway</p>", size=100 * MB)
        with pytest.raises(ServerError) as info:
            await c.get_me()
    assert info.value.status == 502
    assert info.value.body.startswith("<p>bad gateway</p>")
    assert len(info.value.body) <= 200


# --- pagination ----------------------------------------------------------------------------------


def _page(ids: list[str], cursor: str | None) -> str:
    return json.dumps(
        {"data": [{"id": i} for i in ids], "has_more": cursor is not None, "next_cursor": cursor}
    )


@pytest.mark.asyncio
async def test_a_repeated_cursor_ends_the_list_with_a_warning(
    client: ParallClient, server: FakeParallServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.malform_next(p.LIST_DISPATCH, body=_page(["dsp_1"], "c1"))
    server.malform_next(p.LIST_DISPATCH, body=_page(["dsp_2"], "c1"))
    items = [item.id async for item in client.iter_dispatch("org_test")]
    assert items == ["dsp_1", "dsp_2"]
    assert "repeated a cursor" in caplog.text
    assert any(r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.asyncio
async def test_endless_new_cursors_stop_at_max_pages_keeping_what_was_yielded(
    server: FakeParallServer, agent: AgentAccount
) -> None:
    for i in range(20):
        server.malform_next(p.LIST_DISPATCH, body=_page([f"dsp_{i}"], f"c{i}"))
    async with ParallClient(server.url, agent.api_key, retry=FAST_RETRY, max_pages=3) as c:
        got: list[str] = []

        async def walk(max_pages: int | None = None) -> None:
            async for item in c.iter_dispatch("org_test", max_pages=max_pages):
                got.append(item.id)

        with pytest.raises(PaginationError, match="more than 3 pages") as info:
            await walk()
        assert got == ["dsp_0", "dsp_1", "dsp_2"]
        assert isinstance(info.value, ProtocolError)
        assert info.value.path == p.LIST_DISPATCH.path
        got.clear()
        with pytest.raises(PaginationError, match="more than 5 pages"):
            await walk(max_pages=5)  # the per-call override
        assert got == [f"dsp_{i}" for i in range(3, 8)]


@pytest.mark.asyncio
async def test_a_list_ending_exactly_at_max_pages_is_not_an_error(
    client: ParallClient, server: FakeParallServer
) -> None:
    server.malform_next(p.LIST_CHATS, body=_page(["cht_1"], "c1"))
    server.malform_next(p.LIST_CHATS, body=_page(["cht_2"], None))
    assert [c.id async for c in client.iter_chats("org_test", max_pages=2)] == ["cht_1", "cht_2"]


# --- uploads: what the presign answer may point at ------------------------------------------------


@pytest.mark.asyncio
async def test_upload_urls_that_are_not_urls_or_unreachable_are_typed_errors(
    client: ParallClient, server: FakeParallServer
) -> None:
    server.malform_next(p.PRESIGN_UPLOAD, body='{"attachment_id": "att_1", "upload_url": "ftp:x"}')
    with pytest.raises(ProtocolError, match="upload_url"):
        await client.upload_file("org_test", b"x", file_name="a", mime_type="text/plain")
    secret = "http://127.0.0.1:1/upload?sig=SECRET-SIGNATURE"
    server.malform_next(
        p.PRESIGN_UPLOAD, body=json.dumps({"attachment_id": "att_1", "upload_url": secret})
    )
    with pytest.raises(ParallConnectionError, match=r"PUT <upload_url>: cannot connect") as info:
        await client.upload_file("org_test", b"x", file_name="a", mime_type="text/plain")
    assert "SECRET" not in f"{info.value}{info.value!r}"


@pytest.mark.parametrize(
    "body",
    [
        "[" * 10_000,
        '{"id": "u", "x": -Infinity}',
        '{"id": ["u"]}',
        '{"id": "u", "avatar_url": 3.5}',
        '"\\ud800"',
        "null",
        "true",
        '{"id": "u", "status": [1]}',
        '{"id": "u", "display_name": "' + "x" * 5000 + '" ',
    ],
)
@pytest.mark.asyncio
async def test_nothing_but_a_parall_error_leaves_the_client(
    client: ParallClient, server: FakeParallServer, body: str
) -> None:
    server.malform_next(p.ME, body=body)
    with pytest.raises(ProtocolError):
        await client.get_me()
