"""AgentServer, the agents' port's HTTP/1.1 server, over real loopback sockets with raw HTTP from the test side.

Every async test here also runs on uvloop (the gateway's loop; pytest-asyncio runs asyncio's own), see the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import rawhttp
import uvloop

from gateway import http_server
from gateway.http_server import MAX_HEAD, MAX_HEADERS, AgentServer, BodyTooLarge, ClientGone, Request, Response

MAX_BODY = 1024
GUARD = 5.0  # seconds any one wait may take before the test fails, instead of hanging until the per-test timeout
Handler = Callable[[Request], Awaitable[Response | None]]


# -- a server, a client, requests ----------------------------------------------------------------------------------


@dataclass
class Served:
    server: AgentServer
    port: int
    refusals: list[str] = field(default_factory=list)  # the messages on_bad_request got
    clients: list[Client] = field(default_factory=list)

    async def connect(self) -> Client:
        reader, writer = await within(asyncio.open_connection("127.0.0.1", self.port))
        client = Client(reader, writer)
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def serving(handler: Handler, max_body: int = MAX_BODY,
                  idle_timeout: float = http_server.IDLE_TIMEOUT) -> AsyncIterator[Served]:
    refusals: list[str] = []

    def on_bad_request(message: str) -> Response:
        refusals.append(message)
        return Response(400, b"refused: " + message.encode(), [("Content-Type", "text/plain")])

    server = AgentServer(handler, on_bad_request, max_body, idle_timeout)
    served = Served(server, await server.start("127.0.0.1", 0), refusals)
    try:
        yield served
    finally:
        for client in served.clients:
            await client.close()
        await server.close(0)


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, bodiless: bool = False) -> rawhttp.RawResponse:
        async with asyncio.timeout(GUARD):
            return await rawhttp.read_response(self.reader, bodiless)

    async def line(self) -> bytes:
        async with asyncio.timeout(GUARD):
            return await self.reader.readline()

    async def rest(self) -> bytes:
        """Everything until the server closes (a reset counts as closing); fails if it does not close."""
        async with asyncio.timeout(GUARD):
            try:
                return await self.reader.read()
            except ConnectionResetError:
                return b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def raw(method: str = "GET", target: str = "/", headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
        version: str = "1.1") -> bytes:
    """A request exactly as given, with a Host header (no Content-Length added)."""
    lines = [f"{method} {target} HTTP/{version}", "Host: agents.test", *(f"{n}: {v}" for n, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def post(target: str, body: bytes, headers: Iterable[tuple[str, str]] = (), version: str = "1.1") -> bytes:
    return raw("POST", target, [*headers, ("Content-Length", str(len(body)))], body, version)


async def echo(request: Request) -> Response:
    """Answers with the method, the target and the body it read."""
    body = await request.read()
    return Response(200, f"{request.method} {request.raw_path} ".encode() + body, [("Content-Type", "text/plain")])


async def within(awaitable: Awaitable[Any]) -> Any:
    """`awaitable`'s result, failing after GUARD seconds. Not asyncio.timeout: its cancellation could reach a drain,
    which suppresses it, and the test would pass late instead of failing."""
    task = asyncio.ensure_future(awaitable)
    await asyncio.wait({task}, timeout=GUARD)
    if not task.done():
        task.cancel()
        pytest.fail(f"not done within {GUARD} s")
    return task.result()


def forever() -> Awaitable[bool]:
    return asyncio.Event().wait()


@dataclass
class Stuck:
    """A handler that never answers: `started` once it runs, `cancelled` once it is cancelled."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Future[BaseException] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    async def handler(self, request: Request) -> Response:
        self.started.set()
        try:
            await forever()
        except asyncio.CancelledError as exc:
            self.cancelled.set_result(exc)
            raise
        return Response(200)


# -- keep-alive and pipelining -------------------------------------------------------------------------------------


async def test_keep_alive_answers_two_requests_on_one_connection_in_order() -> None:
    transports: list[object] = []

    async def handler(request: Request) -> Response:
        transports.append(request.transport)
        return await echo(request)

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw("GET", "/first"))
        first = await client.response()
        client.send(post("/second", b"payload"))
        second = await client.response()
        assert (first.status, first.body, second.status, second.body) == (
            200, b"GET /first ", 200, b"POST /second payload")
        assert "Connection" not in first.headers and "Connection" not in second.headers
        assert len(transports) == 2 and transports[0] is transports[1]


async def test_keep_alive_ends_for_http_1_0() -> None:
    async with serving(echo) as served:
        client = await served.connect()
        client.send(raw("GET", "/old", version="1.0"))
        response = await client.response()
        assert (response.status, response.body) == (200, b"GET /old ")
        assert response.headers["Connection"] == "close"
        assert await client.rest() == b""


async def test_keep_alive_ends_when_the_client_sends_connection_close() -> None:
    async with serving(echo) as served:
        client = await served.connect()
        client.send(raw("GET", "/bye", [("Connection", "close")]))
        response = await client.response()
        assert (response.status, response.headers["Connection"]) == (200, "close")
        assert await client.rest() == b""


async def test_pipelined_requests_are_answered_in_order_one_handler_at_a_time() -> None:
    events: list[str] = []
    first_started, release_first = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Response:
        events.append(f"start {request.raw_path}")
        if request.raw_path == "/1":
            first_started.set()
            await release_first.wait()  # the first is the slowest: its answer must still come first
        response = await echo(request)
        events.append(f"end {request.raw_path}")
        return response

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw("GET", "/1") + post("/2", b"two") + raw("GET", "/3"))
        await within(first_started.wait())
        assert events == ["start /1"]
        release_first.set()
        bodies = [(await client.response()).body for _ in range(3)]
        assert bodies == [b"GET /1 ", b"POST /2 two", b"GET /3 "]
        assert events == ["start /1", "end /1", "start /2", "end /2", "start /3", "end /3"]


async def test_pipelined_requests_beyond_the_queue_limit_are_all_answered() -> None:
    count = http_server.MAX_PIPELINED * 3  # reading pauses past MAX_PIPELINED queued, and must resume
    async with serving(echo) as served:
        client = await served.connect()
        client.send(b"".join(raw("GET", f"/{i}") for i in range(count)))
        bodies = [(await client.response()).body for _ in range(count)]
        assert bodies == [f"GET /{i} ".encode() for i in range(count)]
        client.send(raw("GET", "/after"))
        assert (await client.response()).body == b"GET /after "


async def test_handler_that_answers_nothing_closes_the_connection() -> None:
    async def handler(request: Request) -> None:
        return None

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw())
        assert await client.rest() == b""


# -- request bodies ------------------------------------------------------------------------------------------------


async def test_body_by_content_length_is_read_whole_when_split_over_writes() -> None:
    body = bytes(range(256)) * 3  # every byte value, CR and LF included
    started = asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        return await echo(request)

    async with serving(handler) as served:
        client = await served.connect()
        head = raw("POST", "/split", [("Content-Length", str(len(body)))])
        client.send(head + body[:100])
        await within(started.wait())  # the handler is reading: the rest arrives in later reads
        client.send(body[100:300])
        client.send(body[300:])
        response = await client.response()
        assert response.body == b"POST /split " + body


async def test_body_chunked_is_read_whole() -> None:
    body = bytes(range(256)) * 3
    async with serving(echo) as served:
        client = await served.connect()
        client.send(raw("POST", "/chunked", [("Transfer-Encoding", "chunked")]) + rawhttp.chunked(body, 7))
        response = await client.response()
        assert response.body == b"POST /chunked " + body
        client.send(raw("GET", "/after"))  # the chunked body ended exactly where the parser thought
        assert (await client.response()).body == b"GET /after "


async def test_body_at_the_limit_is_read() -> None:
    body = b"x" * MAX_BODY
    async with serving(echo) as served:
        client = await served.connect()
        client.send(raw("POST", "/", [("Transfer-Encoding", "chunked")]) + rawhttp.chunked(body, 100))
        assert (await client.response()).body == b"POST / " + body


async def too_large(request: Request) -> Response:
    try:
        await request.read()
    except BodyTooLarge:
        return Response(413, b"too large")
    return Response(200, b"read")


async def test_body_over_the_limit_is_refused_at_once_when_declared() -> None:
    async with serving(too_large) as served:
        client = await served.connect()
        client.send(raw("POST", "/", [("Content-Length", str(MAX_BODY + 1))]))  # and never the body
        response = await client.response()
        assert (response.status, response.headers["Connection"]) == (413, "close")
        assert await client.rest() == b""


async def test_body_over_the_limit_is_refused_when_counted() -> None:
    async with serving(too_large) as served:
        client = await served.connect()
        client.send(raw("POST", "/", [("Transfer-Encoding", "chunked")]) + rawhttp.chunked(b"x" * (MAX_BODY + 1), 256))
        response = await client.response()
        assert (response.status, response.headers["Connection"]) == (413, "close")
        assert await client.rest() == b""


# -- Expect: 100-continue ------------------------------------------------------------------------------------------


async def test_continue_is_sent_when_the_handler_reads_the_body() -> None:
    started, go = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        await go.wait()
        return await echo(request)

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw("POST", "/", [("Content-Length", "5"), ("Expect", "100-continue")]))
        await within(started.wait())
        go.set()
        assert await client.line() == b"HTTP/1.1 100 Continue\r\n"
        assert await client.line() == b"\r\n"
        client.send(b"hello")
        response = await client.response()
        assert (response.status, response.body) == (200, b"POST / hello")


async def test_continue_is_not_sent_when_the_handler_answers_without_reading() -> None:
    async def handler(request: Request) -> Response:
        return Response(403, b"denied")

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw("POST", "/", [("Content-Length", "5"), ("Expect", "100-continue")]))
        response = await client.response()  # the first line read: a 100 would come before it
        assert (response.status, response.headers["Connection"]) == (403, "close")  # the body was never read
        assert await client.rest() == b""


async def test_continue_is_not_sent_when_the_declared_length_is_over_the_limit() -> None:
    async with serving(too_large) as served:
        client = await served.connect()
        client.send(raw("POST", "/", [("Content-Length", str(MAX_BODY + 1)), ("Expect", "100-continue")]))
        response = await client.response()
        assert response.status == 413
        assert await client.rest() == b""


# -- requests that cannot be parsed --------------------------------------------------------------------------------


MALFORMED = {
    "bad request line": (b"GARBAGE\r\n\r\n", "Invalid method"),
    "bare LF after the request line": (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "CRLF"),
    "bare LF after a header": (b"GET / HTTP/1.1\r\nHost: a\n\r\n", "CR"),
    "NUL in a header": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", "header value char"),
    "Content-Length and Transfer-Encoding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding can't be present with Content-Length"),
    "duplicate Content-Length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", "Duplicate Content-Length"),
    "oversized head": (raw(headers=[("X-Big", "b" * MAX_HEAD)]), f"over {MAX_HEAD} bytes"),
    "oversized request line": (raw(target="/" + "p" * MAX_HEAD), f"over {MAX_HEAD} bytes"),
    "too many headers": (raw(headers=[(f"X-H{i}", "v") for i in range(MAX_HEADERS)]),
                         f"over {MAX_HEADERS} header fields"),
    # llhttp parses an HTTP/0.9 request line (no version, no headers, hence no credential): refused.
    "HTTP/0.9": (b"GET /\r\nHost: a\r\n\r\n", "HTTP/0.9 is not supported"),
}


@pytest.mark.parametrize(("data", "problem"), list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_request_gets_the_hooks_answer_and_the_connection_closes(data: bytes, problem: str) -> None:
    handled: list[Request] = []

    async def handler(request: Request) -> Response:
        handled.append(request)
        return Response(200)

    async with serving(handler) as served:
        client = await served.connect()
        client.send(data)
        response = await client.response()
        assert (response.status, response.headers["Connection"]) == (400, "close")
        assert await client.rest() == b""
        assert len(served.refusals) == 1 and problem in served.refusals[0]
        assert response.body == b"refused: " + served.refusals[0].encode()
        assert handled == []


async def test_headers_up_to_the_limit_are_accepted() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, str(len(request.headers)).encode())

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw(headers=[(f"X-H{i}", "v") for i in range(MAX_HEADERS - 1)]))  # and Host
        assert (await client.response()).body == str(MAX_HEADERS).encode()


async def test_head_that_never_ends_is_refused_once_over_the_limit() -> None:
    """A header value sent without end: the parser holds it until the line ends, so the server must count it."""
    async with serving(echo) as served:
        client = await served.connect()
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(GUARD):
                for _ in range(64):  # 16 MiB in all, far more than any read: the server reads it piece by piece
                    client.send(b"v" * 256 * 1024)
                    await client.writer.drain()
        await client.rest()
        assert len(served.refusals) == 1 and f"over {MAX_HEAD} bytes" in served.refusals[0]


async def test_malformed_request_behind_good_ones_is_refused_after_their_answers() -> None:
    """Pipelined: each request gets its answer in order, the malformed one the hook's 400, then the close."""
    release = asyncio.Event()

    async def slow_echo(request: Request) -> Response:
        if request.raw_path == "/first":
            await release.wait()  # the malformed request is parsed while this one is still being handled
        return await echo(request)

    async with serving(slow_echo) as served:
        client = await served.connect()
        client.send(raw("GET", "/first") + raw("GET", "/second") + b"GARBAGE\r\n\r\n")
        release.set()
        first, second = await client.response(), await client.response()
        assert (first.body, second.body) == (b"GET /first ", b"GET /second ")
        assert "Connection" not in first.headers and "Connection" not in second.headers
        refused = await client.response()
        assert (refused.status, refused.headers["Connection"]) == (400, "close")
        assert len(served.refusals) == 1 and "malformed HTTP request" in served.refusals[0]
        assert await client.rest() == b""


async def test_a_body_whose_framing_breaks_is_answered_by_its_handler_then_closed() -> None:
    """A bad chunk size mid-body: the handler's read() fails with BodyMalformed (the gateway answers it in the
    agent's API shape), not the hook, and the connection closes after that answer."""
    failures: list[BaseException] = []

    async def handler(request: Request) -> Response:
        try:
            await request.read()
        except http_server.BodyMalformed as exc:
            failures.append(exc)
            return Response(400, b"bad body")
        return Response(200)

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw("POST", "/", [("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n")
        await client.writer.drain()
        client.send(b"zz\r\n")
        response = await client.response()
        assert (response.status, response.body, response.headers["Connection"]) == (400, b"bad body", "close")
        assert len(failures) == 1 and "Invalid character in chunk size" in str(failures[0])
        assert served.refusals == []
        assert await client.rest() == b""


# -- answers -------------------------------------------------------------------------------------------------------


async def answer_with(request: Request) -> Response | None:
    """Answers as the request's path says: the tests below ask for each kind of answer."""
    path = request.raw_path
    if path == "/whole":
        return Response(200, b"hello", [("Content-Type", "text/plain")])
    if path == "/given-length":
        return Response(200, b"", [("Content-Length", "42")])
    if path in ("/204", "/304"):
        return Response(int(path[1:]), b"ignored", [("ETag", '"x"')])
    if path == "/chunked":
        return Response(200, b"hello", chunked=True)
    if path == "/stream":
        request.start(200, None, [("Content-Type", "text/event-stream")], None)
        for part in (b"one ", b"", b"two "):
            await request.write(part)
        request.finish(b"three")
        return None
    if path == "/stream-with-length":
        request.start(200, None, [], 9)
        await request.write(b"one ")
        request.finish(b"two!!")
        return None
    raise AssertionError(path)


async def test_whole_answer_gets_a_length_a_date_and_no_server_header() -> None:
    async with serving(answer_with) as served:
        client = await served.connect()
        client.send(raw("GET", "/whole"))
        response = await client.response()
        assert (response.status, response.body, response.headers["Content-Length"]) == (200, b"hello", "5")
        assert response.headers["Content-Type"] == "text/plain"
        assert "Date" in response.headers and "Server" not in response.headers
        assert "Transfer-Encoding" not in response.headers


@pytest.mark.parametrize(("target", "length"), [("/whole", "5"), ("/given-length", "42")])
async def test_head_answer_has_a_length_and_no_body(target: str, length: str) -> None:
    async with serving(answer_with) as served:
        client = await served.connect()
        client.send(raw("HEAD", target))
        response = await client.response(bodiless=True)
        assert (response.status, response.headers.getall("Content-Length")) == (200, [length])
        client.send(raw("GET", "/whole"))  # a body sent after the HEAD answer would be read as this status line
        assert (await client.response()).body == b"hello"


async def test_streamed_answer_to_head_sends_no_body_and_keeps_the_connection() -> None:
    """What a streaming handler writes after `start` for a HEAD is dropped, and no framing is needed."""
    async with serving(answer_with) as served:
        client = await served.connect()
        client.send(raw("HEAD", "/stream"))
        response = await client.response(bodiless=True)
        assert response.status == 200 and "Connection" not in response.headers
        assert "Transfer-Encoding" not in response.headers and "Content-Length" not in response.headers
        client.send(raw("GET", "/whole"))  # streamed bytes sent after the HEAD answer would be read as this
        assert (await client.response()).body == b"hello"


@pytest.mark.parametrize("status", [204, 304])
async def test_no_content_answer_has_neither_body_nor_length(status: int) -> None:
    async with serving(answer_with) as served:
        client = await served.connect()
        client.send(raw("GET", f"/{status}"))
        response = await client.response()
        assert response.status == status and response.headers["ETag"] == '"x"'
        assert "Content-Length" not in response.headers and "Transfer-Encoding" not in response.headers
        client.send(raw("GET", "/whole"))  # "ignored" sent after the head would be read as this status line
        assert (await client.response()).body == b"hello"


async def test_chunked_answer_is_chunked_on_http_1_1() -> None:
    async with serving(answer_with) as served:
        client = await served.connect()
        client.send(raw("GET", "/chunked"))
        response = await client.response()
        assert response.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in response.headers
        assert response.body == b"hello"
        client.send(raw("GET", "/whole"))
        assert (await client.response()).body == b"hello"


async def test_chunked_answer_has_a_length_on_http_1_0() -> None:
    async with serving(answer_with) as served:
        client = await served.connect()
        client.send(raw("GET", "/chunked", version="1.0"))
        response = await client.response()
        assert (response.headers["Content-Length"], response.body) == ("5", b"hello")
        assert "Transfer-Encoding" not in response.headers
        assert await client.rest() == b""


async def test_streamed_answer_is_chunked_on_http_1_1() -> None:
    async with serving(answer_with) as served:
        client = await served.connect()
        client.send(raw("GET", "/stream"))
        response = await client.response()
        assert response.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in response.headers
        assert (response.headers["Content-Type"], response.body) == ("text/event-stream", b"one two three")
        assert "Date" in response.headers and "Connection" not in response.headers
        client.send(raw("GET", "/whole"))  # the stream's end was framed: the connection goes on
        assert (await client.response()).body == b"hello"


async def test_streamed_answer_is_delimited_by_closing_on_http_1_0() -> None:
    async with serving(answer_with) as served:
        client = await served.connect()
        client.send(raw("GET", "/stream", [("Connection", "keep-alive")], version="1.0"))
        response = await client.response()  # read until the server closes
        assert response.headers["Connection"] == "close" and response.body == b"one two three"
        assert "Content-Length" not in response.headers and "Transfer-Encoding" not in response.headers


async def test_streamed_answer_with_a_length_is_framed_by_it() -> None:
    async with serving(answer_with) as served:
        client = await served.connect()
        client.send(raw("GET", "/stream-with-length"))
        response = await client.response()
        assert (response.headers["Content-Length"], response.body) == ("9", b"one two!!")
        assert "Transfer-Encoding" not in response.headers
        client.send(raw("GET", "/whole"))
        assert (await client.response()).body == b"hello"


@pytest.mark.parametrize("how", ["returned", "sent", "started"])
@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nX-Injected: 1", "a\rX-Injected: 1"])
async def test_response_header_with_a_line_break_is_never_sent(how: str, value: str) -> None:
    async def handler(request: Request) -> Response | None:
        headers = [("X-Upstream", value)]
        if how == "sent":
            request.send(Response(200, b"body", headers))
            return None
        if how == "started":
            request.start(200, None, headers, None)
            request.finish(b"body")
            return None
        return Response(200, b"body", headers)

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw())
        assert await client.rest() == b""  # cut without a byte of the answer


# -- hang-ups and backpressure -------------------------------------------------------------------------------------


async def test_handler_is_cancelled_when_the_client_hangs_up() -> None:
    stuck = Stuck()
    async with serving(stuck.handler) as served:
        client = await served.connect()
        client.send(raw())
        await within(stuck.started.wait())
        await client.close()
        assert isinstance(await within(stuck.cancelled), asyncio.CancelledError)


@pytest.mark.parametrize("how", ["send", "write"])
async def test_writing_to_a_gone_client_raises_client_gone(how: str) -> None:
    started = asyncio.Event()
    gone = asyncio.get_running_loop().create_future()

    async def handler(request: Request) -> Response:
        if how == "write":
            request.start(200, None, [], None)
            await request.write(b"first")
        started.set()
        try:
            await forever()
        except asyncio.CancelledError:
            try:  # the handler carries on after its cancellation, as one that shields a settlement would
                if how == "send":
                    request.send(Response(200, b"late"))
                else:
                    await request.write(b"late")
            except ClientGone as exc:
                gone.set_result(exc)
            raise
        return Response(200)

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw())
        await within(started.wait())
        await client.close()
        assert isinstance(await within(gone), ConnectionResetError)


async def test_streaming_handler_waits_in_write_while_the_client_does_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    chunk, count = b"s" * 256 * 1024, 128  # 32 MiB: more than the socket buffers on both sides hold
    paused = asyncio.Event()
    finished = asyncio.Event()
    pause_writing = http_server._Connection.pause_writing

    def observed_pause(conn: http_server._Connection) -> None:
        pause_writing(conn)
        paused.set()

    monkeypatch.setattr(http_server._Connection, "pause_writing", observed_pause)

    async def handler(request: Request) -> None:
        request.start(200, None, [], None)
        for _ in range(count):
            await request.write(chunk)
        request.finish()
        finished.set()

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw())
        await within(paused.wait())
        assert not finished.is_set()  # the handler waits in write(), rather than buffering the rest
        response = await client.response()  # reading lets it go on
        assert response.body == chunk * count
        assert finished.is_set()


async def test_handler_error_is_answered_500_and_the_connection_closes(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request) -> Response:
        raise RuntimeError("handler bug")

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw("GET", "/boom"))
        response = await client.response()
        assert (response.status, response.headers["Connection"]) == (500, "close")
        assert await client.rest() == b""
    (record,) = [r for r in caplog.records if r.name == "agent_gateway.http"]
    assert record.levelno == logging.ERROR and "GET /boom" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_handler_error_after_the_answer_began_cuts_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request) -> Response:
        request.start(200, None, [], None)
        await request.write(b"partial")
        raise RuntimeError("handler bug mid-stream")

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw())
        data = await client.rest()
        assert b"0\r\n\r\n" not in data  # never framed as complete: the agent sees a broken stream
    assert any(r.exc_info is not None and isinstance(r.exc_info[1], RuntimeError) for r in caplog.records)


# -- the idle timeout ----------------------------------------------------------------------------------------------

IDLE = 0.1


async def test_idle_connection_is_closed_after_the_idle_timeout() -> None:
    async with serving(echo, idle_timeout=IDLE) as served:
        client = await served.connect()
        client.send(raw())
        assert (await client.response()).status == 200
        assert await client.rest() == b""  # closed without a request from us


@pytest.mark.parametrize("busy_first", [False, True], ids=["reading at once", "busy first"])
async def test_stalled_body_is_cut_by_the_idle_timeout_and_read_fails(busy_first: bool) -> None:
    """Busy first: the idle timer skips a busy handler and is not re-armed then, so reading a body must re-arm it."""
    started, go = asyncio.Event(), asyncio.Event()
    failed = asyncio.get_running_loop().create_future()

    async def handler(request: Request) -> Response:
        started.set()
        if busy_first:
            await go.wait()
        try:
            await request.read()
        except BaseException as exc:
            failed.set_result(exc)
            raise
        return Response(200)

    async with serving(handler, idle_timeout=IDLE) as served:
        client = await served.connect()
        client.send(raw("POST", "/", [("Content-Length", "10")], b"abc"))  # and never the other 7 bytes
        if busy_first:
            await within(started.wait())
            clock = await served.connect()
            assert await clock.rest() == b""  # an idle timeout has passed: the check skipped the busy handler
            go.set()
        assert isinstance(await within(failed), asyncio.CancelledError | ClientGone)
        assert await client.rest() == b""


async def test_busy_handler_is_not_cut_by_the_idle_timeout() -> None:
    started, go = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        await go.wait()  # as an upstream or a human approval would
        return Response(200, b"late")

    async with serving(handler, idle_timeout=IDLE) as served:
        busy = await served.connect()
        busy.send(raw())
        await within(started.wait())
        idle = await served.connect()
        assert await idle.rest() == b""  # the idle timer has run out, for the busy connection first
        go.set()
        assert (await busy.response()).body == b"late"


# -- drain ---------------------------------------------------------------------------------------------------------


def held() -> tuple[asyncio.Event, asyncio.Event, Handler]:
    started, go = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        await go.wait()
        return Response(200, b"finished")

    return started, go, handler


async def test_drain_closes_idle_connections_at_once_and_refuses_new_ones() -> None:
    started, go, handler = held()
    async with serving(handler) as served:
        fresh = await served.connect()
        kept_alive = await served.connect()
        kept_alive.send(raw())
        go.set()
        assert (await kept_alive.response()).status == 200
        started.clear()
        go.clear()
        busy = await served.connect()
        busy.send(raw())
        await within(started.wait())
        draining = asyncio.create_task(served.server.close(GUARD))
        assert await fresh.rest() == b"" and await kept_alive.rest() == b""
        assert not draining.done()  # the busy call still holds the drain: the idle ones did not wait for it
        with pytest.raises(ConnectionRefusedError):
            await served.connect()
        go.set()
        assert (await busy.response()).status == 200
        await within(draining)


async def test_drain_lets_an_in_flight_call_finish_with_connection_close() -> None:
    started, go, handler = held()
    async with serving(handler) as served:
        busy = await served.connect()
        idle = await served.connect()
        busy.send(raw())
        await within(started.wait())
        draining = asyncio.create_task(served.server.close(GUARD))
        assert await idle.rest() == b""  # the drain has begun
        go.set()
        response = await busy.response()
        assert (response.status, response.body, response.headers["Connection"]) == (200, b"finished", "close")
        assert await busy.rest() == b""
        await within(draining)


async def test_drain_delivers_a_large_answer_whole() -> None:
    body = b"L" * 32 * 1024 * 1024  # more than the socket buffers hold: the rest waits in the transport's buffer
    started, go = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        await go.wait()
        return Response(200, body)

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw())
        await within(started.wait())
        draining = asyncio.create_task(served.server.close(GUARD))
        reading = asyncio.create_task(client.response())
        go.set()
        response = await reading
        assert response.headers["Connection"] == "close" and len(response.body) == len(body)
        await within(draining)


async def test_requests_queued_behind_a_gone_client_are_not_handled() -> None:
    """A handler that answers, then outlives its client's hang-up (as the relay does while a settlement on a
    cluster finishes: it swallows the cancellation) ends the connection's work: the request pipelined behind it
    is never handed to a handler."""
    started, done = asyncio.Event(), asyncio.Event()
    handled: list[str] = []

    async def handler(request: Request) -> None:
        handled.append(request.raw_path)
        request.send(Response(200, b"answered"))
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await forever()
        done.set()

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw("GET", "/first") + raw("GET", "/second"))
        await within(started.wait())
        await client.close()
        await within(done.wait())
        await within(served.server.close(1.0))  # would wait for, or cancel, a second handler
        assert handled == ["/first"]


async def test_drain_cancels_a_handler_that_outlasts_the_timeout() -> None:
    stuck = Stuck()
    async with serving(stuck.handler) as served:
        client = await served.connect()
        client.send(raw())
        await within(stuck.started.wait())
        await within(served.server.close(0.05))
        assert stuck.cancelled.done()
        assert await client.rest() == b""  # no answer, the connection cut


# -- upgrades and request headers ----------------------------------------------------------------------------------


async def test_upgrade_request_is_answered_then_the_connection_closes() -> None:
    seen: list[str] = []

    async def handler(request: Request) -> Response:
        seen.append(request.headers["Upgrade"])
        return Response(426, b"no websockets here")

    async with serving(handler) as served:
        client = await served.connect()
        client.send(raw("GET", "/ws", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                       ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                       ("Sec-WebSocket-Version", "13")]) + b"\x81\x05hello")
        response = await client.response()
        assert (response.status, response.body, response.headers["Connection"]) == (426, b"no websockets here",
                                                                                     "close")
        assert await client.rest() == b""
        assert seen == ["websocket"]


async def test_header_values_keep_utf8_lose_trailing_whitespace_and_keep_repeats() -> None:
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return Response(200)

    async with serving(handler) as served:
        client = await served.connect()
        client.send("GET /caf%C3%A9?q=%C3%A9 HTTP/1.1\r\nHost: a\r\nX-Name: caf\u00e9 \u2603\r\nX-Padded: value \t \r\n"
                    "X-Repeat: one\r\nX-Repeat: two\r\nx-repeat: three\r\n\r\n".encode())
        assert (await client.response()).status == 200
        (request,) = seen
        assert request.raw_path == "/caf%C3%A9?q=%C3%A9"  # as sent
        assert request.headers["X-Name"] == "caf\u00e9 \u2603"
        assert request.headers["X-Padded"] == "value"
        assert request.headers.getall("X-Repeat") == ["one", "two", "three"]
        assert (request.method, request.version, request.keep_alive) == ("GET", "1.1", True)


# -- the same, on uvloop -------------------------------------------------------------------------------------------


def _async_tests() -> Iterator[Any]:
    for name, test in list(globals().items()):
        if not name.startswith("test_") or not inspect.iscoroutinefunction(test):
            continue
        cases: list[list[tuple[str, Any]]] = [[]]
        for mark in getattr(test, "pytestmark", []):
            if mark.name != "parametrize":
                continue
            names = mark.args[0].split(",") if isinstance(mark.args[0], str) else list(mark.args[0])
            names = [n.strip() for n in names]
            values = [v if len(names) > 1 else (v,) for v in mark.args[1]]
            cases = [case + list(zip(names, value, strict=True)) for case in cases for value in values]
        for index, case in enumerate(cases):
            yield pytest.param(name, dict(case), id=f"{name}[{index}]" if len(cases) > 1 else name)


@pytest.mark.parametrize(("name", "params"), list(_async_tests()))
def test_on_uvloop(name: str, params: dict[str, Any], request: pytest.FixtureRequest) -> None:
    test = globals()[name]
    for fixture in ("caplog", "monkeypatch"):
        if fixture in inspect.signature(test).parameters:
            params = {**params, fixture: request.getfixturevalue(fixture)}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(test(**params), 20))
