"""upstream_client: the pooled HTTP/1.1 client against real loopback servers, aiohttp ones and byte-exact ones.

Every async test here also runs on uvloop (the gateway's loop; pytest-asyncio runs asyncio's own): pausing,
TLS and connect errors are the transports' business, and the two loops implement them separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import inspect
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from aiohttp import web
from multidict import CIMultiDict

from gateway import forward
from gateway.errors import GatewayError
from gateway.policy.compile import Upstream
from gateway.policy.spec import Loc, UpstreamSpec, UpstreamTlsSpec
from gateway.upstream_client import (
    HIGH_WATER,
    KEEPALIVE_IDLE,
    Origin,
    UpstreamClosed,
    UpstreamConnectFailed,
    UpstreamPool,
    UpstreamResponse,
)
from gateway.upstream_tls import tls_context

READ_TIMEOUT = 0.3  # seconds, for the tests about it; the others allow 5
BIG = bytes(range(256)) * (32 * 1024)  # 8 MiB


def ok(body: bytes = b"ok", *extra: str) -> bytes:
    """A complete keep-alive HTTP/1.1 answer with a Content-Length."""
    lines = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- servers -----------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class RawConn:
    """One connection accepted by a RawServer."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[bytes] = field(default_factory=list)
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def request(self) -> bytes:
        """One request, head and Content-Length body, exactly as received."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = head + await self.reader.readexactly(length)
        self.requests.append(data)
        return data

    async def answer(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_client_closes(self) -> bytes:
        """Whatever else the client sends, once it has closed the connection."""
        rest = await self.reader.read()
        self.client_closed.set()
        return rest

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


class RawServer:
    """asyncio.start_server on loopback; `handler` writes exact bytes and returns to close the connection."""

    def __init__(self, handler: Callable[[RawConn], Awaitable[None]], tls: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._tls = tls
        self.conns: list[RawConn] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._errors: list[BaseException] = []

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        self.origin = Origin.of(f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        if self._errors and exc[0] is None:
            raise self._errors[0]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn(len(self.conns), reader, writer)
        self.conns.append(conn)
        # A task of our own: cancelling start_server's at the end makes Python 3.11 log an error.
        self._tasks.add(asyncio.create_task(self._serve(conn)))

    async def _serve(self, conn: RawConn) -> None:
        try:
            await self._handler(conn)
        except asyncio.IncompleteReadError:
            conn.client_closed.set()  # closed while a request was awaited
        except (ConnectionError, ssl.SSLError):
            pass
        except Exception as exc:  # an assertion in a handler fails the test that started the server
            self._errors.append(exc)
        finally:
            conn.writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await conn.writer.wait_closed()


def answering(*answers: bytes) -> Callable[[RawConn], Awaitable[None]]:
    """A handler that reads one request per answer on each connection, then waits for the client to close."""

    async def handler(conn: RawConn) -> None:
        for answer in answers:
            await conn.request()
            await conn.answer(answer)
        await conn.until_client_closes()

    return handler


@dataclass
class WebServer:
    origin: Origin
    peers: list[int]  # the client port of every request, in order

    @property
    def connections(self) -> int:
        return len(set(self.peers))


@contextlib.asynccontextmanager
async def web_server(routes: list[web.RouteDef], tls: ssl.SSLContext | None = None) -> AsyncIterator[WebServer]:
    """An aiohttp server on loopback that notes which TCP connection carried each request."""
    peers: list[int] = []

    @web.middleware
    async def note_peer(request: web.Request, handler: Any) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application(middlewares=[note_peer])
    app.add_routes(routes)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield WebServer(Origin.of(f"{'https' if tls else 'http'}://127.0.0.1:{port}"), peers)
    finally:
        await runner.cleanup()


# -- the client ------------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool()
    try:
        yield pool
    finally:
        await pool.close()


async def call(pool: UpstreamPool, origin: Origin, method: str = "GET", path: str = "/", body: bytes = b"", *,
               tls: UpstreamTlsSpec | None = None, connect_timeout: float = 5.0,
               read_timeout: float = 5.0) -> UpstreamResponse:
    length = len(body) if body or method in ("POST", "PUT") else None
    head = forward.request_head(method, path, origin.host_header, CIMultiDict(), length)
    return await pool.request(origin, tls, method, head, body, connect_timeout, read_timeout)


async def fetch(pool: UpstreamPool, origin: Origin, method: str = "GET", path: str = "/", body: bytes = b"",
                **options: Any) -> tuple[int, bytes]:
    async with await call(pool, origin, method, path, body, **options) as response:
        return response.status, await response.read()


async def arrived(response: UpstreamResponse) -> None:
    """Wait, reading nothing, until the whole body is buffered (on the response's own wake-up future)."""
    while not response._done:
        response._waiter = asyncio.get_running_loop().create_future()
        await response._waiter


async def within(seconds: float, awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(seconds):
        return await awaitable


async def client_timeout(awaitable: Awaitable[Any], limit: float = 3.0) -> float:
    """Seconds until `awaitable` raised the client's TimeoutError; the test's own limit is not mistaken for one."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait([task], timeout=limit)
    if not done:
        task.cancel()
        pytest.fail(f"no timeout within {limit} s")
    with pytest.raises(TimeoutError):
        task.result()
    return loop.time() - start


async def drain(response: UpstreamResponse, into: list[bytes]) -> None:
    async for piece in response.iter_any():
        into.append(piece)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- keep-alive ----------------------------------------------------------------------------------------------------


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello {request.path}")


async def test_sequential_requests_reuse_one_connection() -> None:
    async with web_server([web.get("/{name}", _hello)]) as server, client() as pool:
        for name in ("a", "b", "c"):
            async with await call(pool, server.origin, path=f"/{name}") as response:
                assert (response.status, response.reason, response.content_length) == (200, "OK", 8)
                assert await response.read() == f"hello /{name}".encode()
        assert server.connections == 1


async def test_concurrent_requests_open_separate_connections() -> None:
    waiting: list[web.Request] = []
    both = asyncio.Event()

    async def barrier(request: web.Request) -> web.Response:
        waiting.append(request)
        if len(waiting) == 2:
            both.set()
        await both.wait()  # both requests are in flight at once
        return web.Response(text="both")

    async with web_server([web.get("/wait", barrier), web.get("/", _hello)]) as server, client() as pool:
        answers = await within(5, asyncio.gather(fetch(pool, server.origin, path="/wait"),
                                                 fetch(pool, server.origin, path="/wait")))
        assert answers == [(200, b"both")] * 2
        assert server.connections == 2
        await asyncio.gather(fetch(pool, server.origin), fetch(pool, server.origin))
        assert server.connections == 2  # both went back to the pool


async def test_connection_close_from_upstream_is_not_reused() -> None:
    async def closing(request: web.Request) -> web.Response:
        response = web.Response(text="bye")
        response.force_close()
        return response

    async with web_server([web.get("/", closing)]) as server, client() as pool:
        for _ in range(2):
            async with await call(pool, server.origin) as response:
                assert response.headers["Connection"] == "close"
                assert await response.read() == b"bye"
        assert server.connections == 2


async def test_http10_response_without_keep_alive_is_not_reused() -> None:
    async with RawServer(answering(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")) as server, client() as pool:
        assert await fetch(pool, server.origin) == (200, b"ok")
        assert await fetch(pool, server.origin) == (200, b"ok")
        assert len(server.conns) == 2
        await within(2, server.conns[0].client_closed.wait())  # the client closed it: it does not linger


async def test_http10_response_with_keep_alive_is_reused() -> None:
    answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(answering(answer, answer)) as server, client() as pool:
        assert await fetch(pool, server.origin) == (200, b"ok")
        assert await fetch(pool, server.origin) == (200, b"ok")
        assert len(server.conns) == 1


async def test_connection_idle_too_long_is_closed_not_reused() -> None:
    async with RawServer(answering(ok(), ok())) as server, client() as pool:
        async with await call(pool, server.origin) as response:
            await response.read()
        response._conn.idle_since -= KEEPALIVE_IDLE + 1
        assert await fetch(pool, server.origin) == (200, b"ok")
        assert len(server.conns) == 2
        await within(2, server.conns[0].client_closed.wait())


# -- bodies --------------------------------------------------------------------------------------------------------


async def test_chunked_body_arrives_chunk_by_chunk() -> None:
    step = asyncio.Event()

    async def handler(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
        for piece in (b"3\r\ntwo\r\n", b"5\r\nthree\r\n0\r\n\r\n"):
            await step.wait()  # the client has had the previous chunk
            step.clear()
            await conn.answer(piece)
        await conn.request()  # several chunks in one write, a chunk extension and a trailer
        await conn.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"4;name=value\r\nfour\r\n4\r\nfive\r\n0\r\nX-Trailer: yes\r\n\r\n")
        await conn.until_client_closes()

    async with RawServer(handler) as server, client() as pool:
        pieces = []
        async with await call(pool, server.origin) as response:
            assert response.content_length is None
            async for piece in response.iter_any():
                pieces.append(piece)
                step.set()
        assert pieces == [b"one", b"two", b"three"]
        assert await fetch(pool, server.origin) == (200, b"fourfive")
        assert len(server.conns) == 1


async def test_close_delimited_body_ends_cleanly_with_the_connection() -> None:
    async def handler(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ")
        await conn.answer(b"second")
        # returning closes the connection: the end of the body

    async with RawServer(handler) as server, client() as pool:
        assert await within(2, fetch(pool, server.origin)) == (200, b"first second")
        assert await within(2, fetch(pool, server.origin)) == (200, b"first second")
        assert len(server.conns) == 2


async def test_close_delimited_body_cut_by_a_reset_raises() -> None:
    headers_read = asyncio.Event()

    async def handler(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await headers_read.wait()
        conn.reset()

    async with RawServer(handler) as server, client() as pool:
        response = await call(pool, server.origin)
        headers_read.set()
        with pytest.raises(UpstreamClosed):
            await within(2, response.read())
        response.release()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
])
async def test_body_cut_short_raises_upstream_closed(answer: bytes) -> None:
    async def handler(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(answer)

    async with RawServer(handler) as server, client() as pool:
        response = await call(pool, server.origin)
        with pytest.raises(UpstreamClosed, match="closed the connection"):
            await within(2, response.read())
        response.release()


@pytest.mark.parametrize("answer", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
])
async def test_malformed_response_raises_upstream_closed(answer: bytes) -> None:
    async with RawServer(answering(answer)) as server, client() as pool:
        with pytest.raises(UpstreamClosed):
            await within(2, fetch(pool, server.origin))
        await within(2, server.conns[0].client_closed.wait())  # and the connection is closed, not pooled


async def test_204_and_304_have_no_body_and_the_connection_is_reused() -> None:
    answers = (b"HTTP/1.1 204 No Content\r\n\r\n",
               b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"x\"\r\n\r\n",  # the length of the 200
               ok(b"after"))
    async with RawServer(answering(*answers)) as server, client() as pool:
        assert await within(2, fetch(pool, server.origin)) == (204, b"")
        assert await within(2, fetch(pool, server.origin)) == (304, b"")
        assert await within(2, fetch(pool, server.origin)) == (200, b"after")
        assert len(server.conns) == 1


async def test_head_with_content_length_does_not_hang() -> None:
    async def handler(conn: RawConn) -> None:
        while True:
            request = await conn.request()
            if request.startswith(b"HEAD "):  # the length of the GET's body, and no body
                await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            else:
                await conn.answer(ok(b"body"))

    async with RawServer(handler) as server, client() as pool:
        async with await within(2, call(pool, server.origin, "HEAD")) as response:
            assert response.content_length == 100
            assert await within(2, response.read()) == b""
        assert await within(2, fetch(pool, server.origin)) == (200, b"body")
        assert await within(2, fetch(pool, server.origin)) == (200, b"body")
        assert [len(conn.requests) for conn in server.conns] in ([1, 2], [3])  # reused after HEAD or not


async def test_informational_responses_before_the_answer_are_skipped() -> None:
    async def handler(conn: RawConn) -> None:
        for _ in range(2):
            await conn.request()
            await conn.answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            await conn.answer(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final", "X-Final: yes"))
        await conn.until_client_closes()

    async with RawServer(handler) as server, client() as pool:
        for _ in range(2):
            async with await within(2, call(pool, server.origin)) as response:
                assert (response.status, response.headers.get("X-Final"), "Link" in response.headers) == (
                    200, "yes", False)
                assert await response.read() == b"final"
        assert len(server.conns) == 1


async def test_extra_response_after_the_complete_one_is_not_attributed() -> None:
    async def handler(conn: RawConn) -> None:
        await conn.request()
        if conn.index == 0:  # two answers to one request, in one write
            await conn.answer(ok(b"mine") + ok(b"smuggled"))
        else:
            await conn.answer(ok(b"fresh"))
        await conn.until_client_closes()

    async with RawServer(handler) as server, client() as pool:
        assert await within(2, fetch(pool, server.origin)) == (200, b"mine")
        assert await within(2, fetch(pool, server.origin)) == (200, b"fresh")
        assert len(server.conns) == 2


async def test_bytes_on_an_idle_connection_close_it() -> None:
    async def handler(conn: RawConn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.answer(ok(b"mine"))
            await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Le")  # half an answer nobody asked for
        else:
            await conn.answer(ok(b"fresh"))
        await conn.until_client_closes()

    async with RawServer(handler) as server, client() as pool:
        async with await call(pool, server.origin) as response:
            assert await response.read() == b"mine"
        await within(2, response._conn.gone)
        assert await within(2, fetch(pool, server.origin)) == (200, b"fresh")
        assert len(server.conns) == 2


# -- connect errors and timeouts -----------------------------------------------------------------------------------


async def test_refused_connection_raises_connect_failed_without_the_address() -> None:
    port = closed_port()
    async with client() as pool:
        with pytest.raises(UpstreamConnectFailed) as caught:
            await call(pool, Origin.of(f"http://127.0.0.1:{port}"))
    assert str(caught.value) == "connection refused"


async def test_connect_timeout_covers_the_tls_handshake() -> None:
    async def silent(conn: RawConn) -> None:
        await conn.until_client_closes()  # takes the TCP connection, never answers the ClientHello

    async with RawServer(silent) as server, client() as pool:
        origin = Origin.of(f"https://127.0.0.1:{server.port}")
        assert await client_timeout(call(pool, origin, connect_timeout=READ_TIMEOUT)) < READ_TIMEOUT + 1
        await within(2, server.conns[0].client_closed.wait())


async def test_read_timeout_before_the_answer_raises_from_request() -> None:
    async def silent(conn: RawConn) -> None:
        await conn.request()
        await conn.until_client_closes()

    async with RawServer(silent) as server, client() as pool:
        assert READ_TIMEOUT * 0.9 <= await client_timeout(call(pool, server.origin, read_timeout=READ_TIMEOUT)) \
            < READ_TIMEOUT + 1
        await within(2, server.conns[0].client_closed.wait())


async def test_read_timeout_mid_body_raises_from_iter_any() -> None:
    async def stalling(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await conn.until_client_closes()

    async with RawServer(stalling) as server, client() as pool:
        response = await within(2, call(pool, server.origin, read_timeout=READ_TIMEOUT))
        pieces: list[bytes] = []
        assert READ_TIMEOUT * 0.5 <= await client_timeout(drain(response, pieces)) < READ_TIMEOUT + 1
        assert pieces == [b"abc"]
        response.release()
        await within(2, server.conns[0].client_closed.wait())


async def test_read_timeout_is_reported_as_such_to_a_late_reader() -> None:
    async def stalling(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await conn.until_client_closes()

    async with RawServer(stalling) as server, client() as pool:
        response = await within(2, call(pool, server.origin, read_timeout=READ_TIMEOUT))
        await within(3, response._conn.gone)  # timed out and closed while nobody was reading
        with pytest.raises(TimeoutError):  # not the close that followed: a 504, not a 502
            await response.read()
        response.release()


async def test_upstream_stalling_after_a_pause_times_out() -> None:
    async def stalling(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * HIGH_WATER) + BIG[:2 * HIGH_WATER])
        await conn.until_client_closes()

    async with RawServer(stalling) as server, client() as pool:
        response = await within(2, call(pool, server.origin, read_timeout=READ_TIMEOUT))
        while response._buffered <= HIGH_WATER:  # reading pauses
            response._waiter = asyncio.get_running_loop().create_future()
            await within(2, response._waiter)
        pieces: list[bytes] = []
        await client_timeout(drain(response, pieces))  # resumes reading; the read timeout runs again from then
        assert b"".join(pieces) == BIG[:2 * HIGH_WATER]
        response.release()


@pytest.mark.parametrize("first_timeout", [READ_TIMEOUT, 5.0])
async def test_read_timeout_holds_for_the_next_request_on_a_reused_connection(first_timeout: float) -> None:
    # The read timer of a finished request is left running for the next one: shorter or longer, it still counts.
    async def second_unanswered(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(ok(b"first"))
        await conn.request()
        await conn.until_client_closes()

    async with RawServer(second_unanswered) as server, client() as pool:
        assert await within(2, fetch(pool, server.origin, read_timeout=first_timeout)) == (200, b"first")
        assert READ_TIMEOUT * 0.9 <= await client_timeout(call(pool, server.origin, read_timeout=READ_TIMEOUT)) \
            < READ_TIMEOUT + 1
        assert len(server.conns) == 1


async def test_upstream_trickling_faster_than_the_read_timeout_does_not_time_out() -> None:
    answer = ok(b"0123456789abcdef")
    pieces = [answer[i:i + 6] for i in range(0, len(answer), 6)]

    async def trickle(conn: RawConn) -> None:
        await conn.request()
        for piece in pieces:
            await asyncio.sleep(READ_TIMEOUT / 3)  # the upstream's pace, not a synchronisation
            await conn.answer(piece)
        await conn.until_client_closes()

    assert len(pieces) * READ_TIMEOUT / 3 > 2 * READ_TIMEOUT  # longer in all than the timeout
    async with RawServer(trickle) as server, client() as pool:
        assert await within(5, fetch(pool, server.origin, read_timeout=READ_TIMEOUT)) == (200, b"0123456789abcdef")


async def test_slow_reader_does_not_trip_the_read_timeout() -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        return web.Response(body=BIG)

    async with web_server([web.get("/", big)]) as server, client() as pool, \
            await call(pool, server.origin, read_timeout=READ_TIMEOUT) as response:
        # Reading paused at HIGH_WATER; a reader that is slower than the read timeout is not the upstream's
        # fault, and must not cut it off.
        await asyncio.sleep(READ_TIMEOUT * 3)
        assert hashlib.sha256(await within(5, response.read())).digest() == hashlib.sha256(BIG).digest()


# -- dead pooled connections ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_pooled_connection_seen_closed_is_dropped(method: str) -> None:
    async def handler(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(ok(b"first" if conn.index == 0 else b"second"))
        if conn.index > 0:
            await conn.until_client_closes()

    async with RawServer(handler) as server, client() as pool:
        async with await call(pool, server.origin) as response:
            assert await response.read() == b"first"
        await within(2, response._conn.gone)  # the client has seen the close: the pool drops the connection
        assert await within(2, fetch(pool, server.origin, method, body=b"x")) == (200, b"second")
        assert [len(conn.requests) for conn in server.conns] == [1, 1]


def _closing_on_second_request() -> Callable[[RawConn], Awaitable[None]]:
    async def handler(conn: RawConn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.answer(ok(b"first"))
            await conn.request()  # read, then closed unanswered: the close races the request
        else:
            await conn.answer(ok(b"fresh"))
            await conn.until_client_closes()

    return handler


async def test_get_on_a_pooled_connection_closed_unanswered_is_retried() -> None:
    async with RawServer(_closing_on_second_request()) as server, client() as pool:
        assert await within(2, fetch(pool, server.origin)) == (200, b"first")
        assert await within(2, fetch(pool, server.origin, path="/again")) == (200, b"fresh")
        assert [len(conn.requests) for conn in server.conns] == [2, 1]
        assert server.conns[1].requests[0].startswith(b"GET /again ")


async def test_post_on_a_pooled_connection_closed_unanswered_is_not_retried() -> None:
    async with RawServer(_closing_on_second_request()) as server, client() as pool:
        assert await within(2, fetch(pool, server.origin)) == (200, b"first")
        with pytest.raises(UpstreamClosed):
            await within(2, fetch(pool, server.origin, "POST", body=b"pay once"))
        posts = [r for conn in server.conns for r in conn.requests if r.startswith(b"POST")]
        assert len(posts) == 1
        assert len(server.conns) == 1


async def test_get_is_not_retried_after_part_of_an_answer() -> None:
    async def handler(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(ok(b"first"))
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\n")  # some of an answer, then the close

    async with RawServer(handler) as server, client() as pool:
        assert await within(2, fetch(pool, server.origin)) == (200, b"first")
        with pytest.raises(UpstreamClosed):
            await within(2, fetch(pool, server.origin))
        assert len(server.conns) == 1


# -- backpressure and release ----------------------------------------------------------------------------------


async def test_large_body_with_a_slow_reader_pauses_reading_and_arrives_intact() -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(BIG)
        await response.prepare(request)
        for start in range(0, len(BIG), 256 * 1024):
            await response.write(BIG[start:start + 256 * 1024])
        return response

    async with web_server([web.get("/", big)]) as server, client() as pool:
        async with await call(pool, server.origin) as response:
            conn = response._conn
            assert conn.transport is not None
            while response._buffered <= HIGH_WATER:  # not reading: the buffer fills up to the mark
                response._waiter = asyncio.get_running_loop().create_future()
                await within(5, response._waiter)
            assert not conn.transport.is_reading()
            held = response._buffered
            assert held <= HIGH_WATER + 256 * 1024  # at most one read past the mark
            await asyncio.sleep(0.05)  # paused: nothing more arrives, however long the reader takes
            assert response._buffered == held
            digest = hashlib.sha256()
            sizes = []
            async for piece in response.iter_any():
                sizes.append(len(piece))
                digest.update(piece)
                await asyncio.sleep(0.005)  # a slow reader
        assert sizes[0] == held
        assert max(sizes) <= HIGH_WATER + 256 * 1024
        assert digest.digest() == hashlib.sha256(BIG).digest()
        assert await fetch(pool, server.origin) == (200, BIG)  # and the connection was fit to reuse
        assert server.connections == 1


async def test_read_now_gives_a_body_that_arrived_whole_and_frees_the_connection() -> None:
    async with RawServer(answering(ok(b"whole"), ok(b"next"))) as server, client() as pool:
        response = await within(2, call(pool, server.origin))
        await within(2, arrived(response))
        assert response.read_now() == b"whole"
        assert await within(2, fetch(pool, server.origin)) == (200, b"next")  # on the same connection
        assert len(server.conns) == 1


async def test_read_now_waits_for_nothing_while_the_body_is_still_coming() -> None:
    more = asyncio.Event()

    async def in_two(conn: RawConn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        await more.wait()
        await conn.answer(b"def")
        await conn.until_client_closes()

    async with RawServer(in_two) as server, client() as pool, await within(2, call(pool, server.origin)) as response:
        assert await within(2, response.next_chunk()) == b"abc"
        assert response.read_now() is None and not response.exhausted
        more.set()
        assert await within(2, response.next_chunk()) == b"def"
        assert response.exhausted
        assert await within(2, response.next_chunk()) == b""


async def test_release_before_the_body_arrived_closes_the_connection() -> None:
    async def handler(conn: RawConn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        else:
            await conn.answer(ok(b"fresh"))
        await conn.until_client_closes()

    async with RawServer(handler) as server, client() as pool:
        response = await within(2, call(pool, server.origin))
        response.release()
        await within(2, server.conns[0].client_closed.wait())
        assert await within(2, fetch(pool, server.origin)) == (200, b"fresh")
        assert len(server.conns) == 2


async def test_release_of_a_whole_unread_body_keeps_the_connection_usable() -> None:
    body = b"x" * (HIGH_WATER + 1)  # the last byte crosses the mark: reading pauses just as the body completes
    async with RawServer(answering(ok(body), ok(b"next"))) as server, client() as pool:
        response = await within(2, call(pool, server.origin))
        await within(5, arrived(response))
        response.release()  # unread, but nothing of it is left on the connection
        assert await within(2, fetch(pool, server.origin)) == (200, b"next")
        assert len(server.conns) == 1


async def test_cancelled_request_closes_its_connection() -> None:
    requested = asyncio.Event()

    async def silent(conn: RawConn) -> None:
        await conn.request()
        requested.set()
        await conn.until_client_closes()

    async with RawServer(silent) as server, client() as pool:
        task = asyncio.create_task(call(pool, server.origin, read_timeout=30))
        await within(2, requested.wait())  # the request is at the upstream
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # An agent that hung up: the upstream hears of it now, not when the read timeout ends.
        await within(2, server.conns[0].client_closed.wait())


async def test_pool_close_closes_idle_and_busy_connections() -> None:
    async def handler(conn: RawConn) -> None:
        await conn.request()
        # The busy one: a body that ends when the upstream closes; the gateway closing it is no such end.
        await conn.answer(b"HTTP/1.1 200 OK\r\n\r\nabc" if conn.index == 0 else ok())
        await conn.until_client_closes()

    async with RawServer(handler) as server:
        pool = UpstreamPool()
        busy = await within(2, call(pool, server.origin))
        assert await within(2, fetch(pool, server.origin)) == (200, b"ok")
        conns = [busy._conn, *pool._idle[busy._conn.key]]
        assert len({id(conn) for conn in conns}) == 2
        await within(3, pool.close())
        assert all(conn.gone.done() for conn in conns)
        await within(2, asyncio.gather(*(conn.client_closed.wait() for conn in server.conns)))
        with pytest.raises(UpstreamClosed):
            await busy.read()
        with pytest.raises(UpstreamConnectFailed, match="shutting down"):
            await call(pool, server.origin)
        del busy, conns
        gc.collect()  # an unclosed transport would warn here, and warnings are errors


# -- TLS -----------------------------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: str
    client_cert: str  # the client certificate and its key, in one file
    client_cn: str = "gateway-client"

    def server_context(self, require_client: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(context)
        if require_client:
            self.ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def make_pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client_cert = tmp_path / "client.pem"
    ca.issue_cert("client.example", common_name="gateway-client").private_key_and_cert_chain_pem.write_to_path(
        str(client_cert))
    return Pki(ca, str(ca_file), str(client_cert))


async def _peer_cn(request: web.Request) -> web.Response:
    assert request.transport is not None
    cert = request.transport.get_extra_info("peercert")
    names = dict(pair for rdn in cert["subject"] for pair in rdn) if cert else {}
    return web.Response(text=names.get("commonName", "none"))


async def test_tls_upstream_verified_with_its_own_ca_file(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    async with web_server([web.get("/", _peer_cn)], pki.server_context()) as server, client() as pool:
        tls = UpstreamTlsSpec(ca_file=pki.ca_file)
        assert await within(5, fetch(pool, server.origin, tls=tls)) == (200, b"none")
        assert await within(5, fetch(pool, server.origin, tls=tls)) == (200, b"none")
        assert server.connections == 1


async def test_tls_upstream_unknown_to_the_system_cas_fails(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    async with web_server([web.get("/", _peer_cn)], pki.server_context()) as server, client() as pool:
        for tls in (None, UpstreamTlsSpec()):
            with pytest.raises(UpstreamConnectFailed, match=r"^TLS handshake failed: CERTIFICATE_VERIFY_FAILED$"):
                await within(5, call(pool, server.origin, tls=tls))
        assert server.peers == []


async def test_tls_client_certificate_is_presented(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    async with web_server([web.get("/", _peer_cn)], pki.server_context(require_client=True)) as server, \
            client() as pool:
        tls = UpstreamTlsSpec(ca_file=pki.ca_file, cert_file=pki.client_cert)
        assert await within(5, fetch(pool, server.origin, tls=tls)) == (200, pki.client_cn.encode())
        with pytest.raises((UpstreamClosed, UpstreamConnectFailed)):  # without one, the server will not talk
            await within(5, fetch(pool, server.origin, tls=UpstreamTlsSpec(ca_file=pki.ca_file)))
        assert len(server.peers) == 1


async def test_tls_files_that_cannot_be_loaded_fail_the_connect(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    async with web_server([web.get("/", _peer_cn)], pki.server_context()) as server, client() as pool:
        missing = str(tmp_path / "missing.pem")
        for tls in (UpstreamTlsSpec(ca_file=missing), UpstreamTlsSpec(ca_file=pki.ca_file, cert_file=pki.ca_file)):
            with pytest.raises(UpstreamConnectFailed) as caught:
                await within(5, call(pool, server.origin, tls=tls))
            assert str(tmp_path) not in str(caught.value)


def test_tls_context_verifies_and_presents_the_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    context = tls_context(UpstreamTlsSpec(ca_file=pki.ca_file, cert_file=pki.client_cert))
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(context.get_ca_certs()) == 1  # only the upstream's CA, not the system's
    with pytest.raises(ssl.SSLError):
        tls_context(UpstreamTlsSpec(cert_file=pki.ca_file))  # a certificate without its key
    with pytest.raises(OSError):
        tls_context(UpstreamTlsSpec(ca_file=str(tmp_path / "missing.pem")))


def test_pool_caches_a_tls_context_per_settings_and_file_times(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    pool = UpstreamPool()
    tls = UpstreamTlsSpec(ca_file=pki.ca_file, cert_file=pki.client_cert)
    first = pool._context(tls)
    assert pool._context(UpstreamTlsSpec(ca_file=pki.ca_file, cert_file=pki.client_cert)) is first
    assert pool._context(UpstreamTlsSpec(ca_file=pki.ca_file)) is not first
    stat = os.stat(pki.client_cert)
    os.utime(pki.client_cert, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rotated in place
    rotated = pool._context(tls)
    assert rotated is not first
    assert pool._context(tls) is rotated
    assert len(pool._contexts) == 2  # the context of the rotated-out files is not kept


# -- forward.send and its error mapping ----------------------------------------------------------------------------


def _upstream(origin: str, read_timeout: float = 5.0) -> Upstream:
    spec = UpstreamSpec(name="erp", kind="http", url=origin, credential=None, prices={}, routes=(), tools=(),
                        connect_timeout=2.0, read_timeout=read_timeout, loc=Loc("test", 1, 1))
    return Upstream(spec, None, Origin.of(origin))


async def test_send_writes_exactly_the_built_request() -> None:
    async with RawServer(answering(ok(b"done"))) as server, client() as pool:
        upstream = _upstream(f"http://127.0.0.1:{server.port}/base/")
        target = forward.request_target(upstream.origin, "/v1/orders", "a=1&b=%20")
        headers = CIMultiDict([("Content-Type", "application/json"), ("X-Multi", "1"), ("X-Multi", "2")])
        body = b'{"amount": 12}'
        response = await within(2, forward.send(pool, upstream, "POST", target, headers, body))
        assert await forward.read_small(response, upstream.spec) == b"done"
        expected = forward.request_head("POST", target, f"127.0.0.1:{server.port}", headers, len(body)) + body
        assert server.conns[0].requests == [expected]
        assert expected.startswith(b"POST /base/v1/orders?a=1&b=%20 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert await server.conns[0].until_client_closes() == b""  # nothing else was sent


async def test_send_and_body_reads_translate_client_errors_without_the_address() -> None:
    async def handler(conn: RawConn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")  # then the close
        else:
            await conn.until_client_closes()  # never answers

    async with RawServer(handler) as server, client() as pool:
        port = closed_port()
        with pytest.raises(GatewayError) as refused:
            await forward.send(pool, _upstream(f"http://127.0.0.1:{port}"), "GET", "/", CIMultiDict(), b"")
        assert (refused.value.type, refused.value.message) == (
            "upstream_error", "upstream 'erp' failed: cannot connect (connection refused)")
        assert str(port) not in str(refused.value)

        upstream = _upstream(f"http://127.0.0.1:{server.port}", read_timeout=READ_TIMEOUT)
        response = await within(2, forward.send(pool, upstream, "GET", "/", CIMultiDict(), b""))
        with pytest.raises(GatewayError) as broken:
            await within(2, forward.read_small(response, upstream.spec))
        assert broken.value.type == "upstream_error"
        response.release()

        with pytest.raises(GatewayError) as slow:
            await within(3, forward.send(pool, upstream, "GET", "/", CIMultiDict(), b""))
        assert slow.value.type == "upstream_timeout"


# -- the same, on uvloop -------------------------------------------------------------------------------------------


def _async_tests() -> Iterator[Any]:
    for name, test in list(globals().items()):
        if not name.startswith("test_") or not inspect.iscoroutinefunction(test):
            continue
        cases = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
        if not cases:
            yield pytest.param(name, {}, id=name)
            continue
        (argname, values), = (case.args for case in cases)
        for index, value in enumerate(values):
            yield pytest.param(name, {argname: value}, id=f"{name}[{index}]")


@pytest.mark.parametrize(("name", "params"), list(_async_tests()))
def test_on_uvloop(name: str, params: dict[str, Any], tmp_path: Path) -> None:
    test = globals()[name]
    if "tmp_path" in inspect.signature(test).parameters:
        params = {**params, "tmp_path": tmp_path}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(test(**params), 20))
