"""The hostile front of :mod:`benchmarks.fuzz`: a small HTTP server on loopback in front of
a :class:`~parall_bridge.testing.FakeParallServer`.

It forwards every request to the emulator, except the requests a :class:`Rule` targets
(API key, method and path pattern, first N matches): those get the rule's crafted answer
(status, headers, body, a truncated body, a broken response, endless or repeating pages,
or a huge body streamed from a generator). It speaks raw HTTP/1.1 over asyncio streams,
one request per connection (``Connection: close``), so that what it sends is exactly what
was asked for: no ``Content-Type`` at all, a ``Content-Length`` that lies, a status line
that is not HTTP. Clients point their ``parall_url`` at :attr:`HostileFront.url`; the
WebSocket URL the emulator puts in tickets still points at the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qs, urlsplit

import aiohttp
import attrs
from yarl import URL

from parall_bridge import protocol as p

from .fuzz_cases import Answer, render

__all__ = ["BigBody", "HostileFront", "Rule", "endpoint_pattern"]

READ_LIMIT: Final = 1024 * 1024
"""Longest request head the front reads."""
STREAM_CHUNK: Final = 1024 * 1024
"""Bytes written at a time when a body is generated on the fly."""
CLOSE_TIMEOUT: Final = 2.0
"""Seconds :meth:`HostileFront.close` lets its connections end once aborted."""


def endpoint_pattern(endpoint: p.Endpoint) -> re.Pattern[str]:
    """The paths of ``endpoint``: its template with each ``{name}`` one path segment."""
    parts = re.split(r"\{[^}]+\}", endpoint.path)
    return re.compile("^" + "[^/]+".join(re.escape(part) for part in parts) + "$")


@attrs.frozen
class BigBody:
    """A 2xx JSON body of about ``size`` bytes generated on the fly: ``prefix``, then
    ``size`` bytes of ``x``, then ``suffix`` (never held in memory by the front)."""

    prefix: bytes
    size: int
    suffix: bytes

    @property
    def length(self) -> int:
        """The exact ``Content-Length``."""
        return len(self.prefix) + self.size + len(self.suffix)

    def chunks(self) -> Iterator[bytes]:
        """The body, one chunk at a time."""
        yield self.prefix
        block = b"x" * STREAM_CHUNK
        left = self.size
        while left > 0:
            yield block[: min(left, STREAM_CHUNK)]
            left -= STREAM_CHUNK
        yield self.suffix


@attrs.define(eq=False)
class Rule:
    """Answer the first ``times`` matching requests (``None``: all) with ``answer``.

    Attributes:
        api_key: the bearer key a request must carry (so one agent's requests only).
        method: the HTTP method.
        pattern: the path pattern (:func:`endpoint_pattern`).
        answer: the crafted answer (or ``big`` for a streamed body).
        ids: the rig's ids, to render the answer's markers.
        times: how many requests get it.
        big: a body generated on the fly instead of ``answer``'s.
        hits: how many requests got the crafted answer so far.
        listings: of those, how many carried no cursor (a list walked from its start).
    """

    api_key: str
    method: str
    pattern: re.Pattern[str]
    answer: Answer
    ids: Mapping[str, str]
    times: int | None = 1
    big: BigBody | None = None
    hits: int = 0
    listings: int = 0

    def matches(self, method: str, path: str, api_key: str | None) -> bool:
        """Whether this request gets the crafted answer (and counts it if so)."""
        if self.times is not None and self.hits >= self.times:
            return False
        return method == self.method and api_key == self.api_key and bool(self.pattern.match(path))


@attrs.define
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def cursor(self) -> str | None:
        query = parse_qs(urlsplit(self.target).query)
        for name in (p.QUERY_CURSOR, p.QUERY_BEFORE):
            if query.get(name):
                return query[name][0]
        return None

    @property
    def api_key(self) -> str | None:
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Whatever"


class HostileFront:
    """The front: forward, or answer what a rule says.

    Args:
        upstream: the emulator's base URL.
    """

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.rstrip("/")
        self._rules: list[Rule] = []
        self._server: asyncio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._url: str | None = None
        self.forwarded = 0
        self.crafted = 0
        self.errors: list[BaseException] = []
        """Failures of the front itself (a harness bug: the run must not go on)."""

    @property
    def url(self) -> str:
        """The front's base URL (``http://127.0.0.1:PORT``)."""
        if self._url is None:
            raise RuntimeError("the front is not started")
        return self._url

    async def start(self) -> None:
        """Listen on an ephemeral loopback port."""
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=READ_LIMIT)
        host, port = self._server.sockets[0].getsockname()[:2]
        self._url = f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop listening, end every connection, close the forwarding session."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Connections are aborted rather than their tasks cancelled (asyncio's server
        # reports a cancelled handler as an error): each handler then ends on its own.
        for writer in list(self._writers):
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=CLOSE_TIMEOUT)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def arm(self, rule: Rule) -> Rule:
        """Start answering with ``rule`` (before rules armed earlier)."""
        self._rules.insert(0, rule)
        return rule

    def disarm(self, rule: Rule) -> None:
        """Stop answering with ``rule`` (idempotent)."""
        if rule in self._rules:
            self._rules.remove(rule)

    def clear(self) -> None:
        """Disarm every rule."""
        self._rules.clear()

    # --- serving ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            request = await self._read(reader)
            if request is None:
                return
            rule = self._match(request)
            if rule is None:
                await self._forward(request, writer)
            else:
                await self._craft(rule, request, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away: nothing to answer
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
            return _Request(method, target, headers, bytes(body))
        length = int(headers.get("content-length", "0") or "0")
        return _Request(method, target, headers, await reader.readexactly(length))

    def _match(self, request: _Request) -> Rule | None:
        for rule in self._rules:
            if rule.matches(request.method, request.path, request.api_key):
                rule.hits += 1
                if request.cursor is None:
                    rule.listings += 1
                return rule
        return None

    async def _forward(self, request: _Request, writer: asyncio.StreamWriter) -> None:
        self.forwarded += 1
        session = self._session
        assert session is not None
        wanted = ("authorization", "content-type", "accept", "user-agent")
        headers = {name: value for name, value in request.headers.items() if name in wanted}
        try:
            async with session.request(
                request.method,
                URL(self._upstream + request.target, encoded=True),
                headers=headers,
                data=request.body or None,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                status = resp.status
                extra = [
                    (name, resp.headers[name].encode("latin-1"))
                    for name in ("Content-Type", p.HEADER_RETRY_AFTER)
                    if name in resp.headers
                ]
        except aiohttp.ClientError:
            status, extra, body = 502, [], b""
        await self._write_head(writer, status, extra, len(body))
        writer.write(body)
        await writer.drain()

    async def _write_head(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, bytes]],
        length: int,
    ) -> None:
        head = [f"HTTP/1.1 {status} {_reason(status)}".encode("latin-1")]
        head.extend(name.encode("latin-1") + b": " + value for name, value in headers)
        head.append(f"Content-Length: {length}".encode("latin-1"))
        head.append(b"Connection: close")
        writer.write(b"\r\n".join(head) + b"\r\n\r\n")

    async def _craft(self, rule: Rule, request: _Request, writer: asyncio.StreamWriter) -> None:
        self.crafted += 1
        answer = rule.answer
        if answer.raw is not None:
            writer.write(answer.raw)
            await writer.drain()
            return
        headers = list(answer.headers)
        if answer.content_type is not None:
            headers.insert(0, ("Content-Type", answer.content_type.encode("latin-1")))
        if rule.big is not None:
            await self._write_head(writer, answer.status, headers, rule.big.length)
            for chunk in rule.big.chunks():
                writer.write(chunk)
                await writer.drain()
            return
        if answer.pages is not None:
            body = render(answer.page(rule.hits - 1, request.cursor), rule.ids).encode()
        elif isinstance(answer.body, bytes):
            body = answer.body
        else:
            body = render(answer.body, rule.ids).encode()
        if answer.declared_extra:
            await self._write_head(
                writer, answer.status, headers, len(body) + answer.declared_extra
            )
            writer.write(body[: int(len(body) * answer.cut)])
            await writer.drain()
            return  # the connection is closed with the length unmet
        await self._write_head(writer, answer.status, headers, len(body))
        writer.write(body)
        await writer.drain()
