"""The agents' port: a small HTTP/1.1 server (httptools' llhttp parser on uvloop) that hands each request to one
handler and writes its answer whole or as a stream.

Why not aiohttp's server (the admin port keeps it): per request it costs about 120k more instructions than this
one (a task that waits for the handler's task, a payload stream, request and response objects with many features
the gateway never uses), and the agents' port pays that on every call. What it did for the gateway is kept here:
keep-alive and pipelining, bodies by length or chunked, `Expect: 100-continue`, bounded heads and bodies, the
handler cancelled when its agent hangs up (a held call must not go on without it), backpressure on streams,
an idle timeout, and a drain that lets calls in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

MAX_HEAD = 16 * 1024  # bytes of request line and headers together (aiohttp allowed 8190 a line)
MAX_HEADERS = 128
IDLE_TIMEOUT = 75.0  # seconds a connection may sit without a request in progress (aiohttp's keep-alive default)
MAX_PIPELINED = 16  # requests parsed ahead of the one being handled before reading pauses

_log = logging.getLogger("agent_gateway.http")
_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_NO_BODY = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyTooLarge(Exception):
    """The request body is (or declared itself) over the server's limit, `limit` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is over the {limit}-byte limit")
        self.limit = limit


class BodyMalformed(Exception):
    """The request body's framing broke (e.g. a bad chunk size): the message says how."""


class ClientGone(ConnectionResetError):
    """The agent's connection closed while its answer was being written."""


@dataclass(slots=True)
class Response:
    """An answer written whole: one write of head and body. `chunked` frames it as a stream would be."""

    status: int
    body: bytes = b""
    headers: Headers = ()
    reason: str | None = None
    chunked: bool = False


Headers = list[tuple[str, str]] | tuple[tuple[str, str], ...] | CIMultiDict[str] | dict[str, str]
Handler = Callable[["Request"], Awaitable[Response | None]]
BadRequestHook = Callable[[str], Response]  # the answer (a 400) to a request that cannot be parsed, given why


class Dates:
    """The Date header, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True).encode()
        return self._value


class Request:
    """One request on the agents' port: method, raw target and headers as sent, the body once it is in, and the
    ways to answer it (whole with `Response`, or `start`/`write`/`finish` for a stream)."""

    __slots__ = ("_bodiless", "_body", "_broken", "_chunks", "_conn", "_continue", "_size", "_started", "_waiter",
                 "complete", "headers", "keep_alive", "method", "raw_path", "responded", "settling", "too_large",
                 "version")

    def __init__(self, conn: _Connection, method: str, raw_path: str, headers: CIMultiDictProxy[str], version: str,
                 keep_alive: bool) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path  # the request target as sent: path and query
        self.headers = headers
        self.version = version  # "1.1" or "1.0"
        self.keep_alive = keep_alive
        length = headers.get("Content-Length")  # llhttp accepted only digits, and only one
        self.complete = False
        self.too_large = length is not None and int(length) > conn.server.max_body
        self._continue = not self.too_large and headers.get("Expect", "").lower() == "100-continue"
        self._chunks: list[bytes] = []
        self._size = 0
        self._body: bytes | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._started = False  # the answer's head is written
        self._bodiless = False  # the streamed answer has no body (HEAD, 204, 304): what is written is dropped
        self._broken: str | None = None  # why the body's framing broke
        self.responded = False  # the whole answer is written
        self.settling: asyncio.Task[None] | None = None  # a settlement the request's trace event waits for

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    async def read(self) -> bytes:
        """The whole body; BodyTooLarge past the server's limit (declared or counted as it arrives), BodyMalformed
        when its framing breaks."""
        while True:
            if self.too_large:
                raise BodyTooLarge(self._conn.server.max_body)
            if self._broken is not None:
                raise BodyMalformed(self._broken)
            if self.complete:
                if self._body is None:
                    self._body = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
                    self._chunks = []
                return self._body
            if self._continue:  # the client waits for our go-ahead before it sends the body
                self._continue = False
                self._conn.write(_CONTINUE)
            self._waiter = self._conn.loop.create_future()
            self._conn.watch_body()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _feed(self, data: bytes) -> None:
        if self.too_large:
            return  # counted out already: the rest is read and dropped, and the connection closes after the answer
        self._size += len(data)
        if self._size > self._conn.server.max_body:
            self.too_large = True
            self._chunks = []
            self._wake()
        else:
            self._chunks.append(data)

    def _break(self, message: str) -> None:
        self._broken = message
        self._wake()

    def _end(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self, error: BaseException | None = None) -> None:
        if self._waiter is not None and not self._waiter.done():
            if error is None:
                self._waiter.set_result(None)
            else:
                self._waiter.set_exception(error)

    def send(self, response: Response) -> None:
        """Write a whole answer (head and body in one write)."""
        if self._started:
            raise RuntimeError("the answer to this request has begun already")
        self._started = True
        self.responded = True
        conn = self._conn
        chunked = response.chunked and self.version == "1.1"
        head = self._head(response.status, response.reason, response.headers,
                          None if chunked else len(response.body), chunked)
        body = response.body
        if self.method == "HEAD" or response.status in _NO_BODY:
            body = b""
        elif chunked:
            body = _last_chunk(body)
        conn.write(head + body)

    def start(self, status: int, reason: str | None, headers: Headers, length: int | None) -> None:
        """Write the head of a streamed answer: framed by `length`, else chunked (HTTP/1.1) or by closing."""
        if self._started:
            raise RuntimeError("the answer to this request has begun already")
        self._started = True
        self._bodiless = self.method == "HEAD" or status in _NO_BODY
        chunked = length is None and self.version == "1.1" and not self._bodiless
        if length is None and not chunked and not self._bodiless:
            self.keep_alive = False  # HTTP/1.0 without a length: the end of the body is the end of the connection
        self._conn.chunked = chunked
        self._conn.write(self._head(status, reason, headers, length, chunked))

    async def write(self, data: bytes) -> None:
        """Write part of a streamed answer; waits while the agent's connection is backed up."""
        conn = self._conn
        if not data or self._bodiless:
            return
        conn.write(b"%x\r\n%b\r\n" % (len(data), data) if conn.chunked else data)
        if conn.paused:
            await conn.drained()

    def finish(self, last: bytes = b"") -> None:
        """Write the last of a streamed answer and its end, in one write."""
        conn = self._conn
        self.responded = True
        if self._bodiless:
            return
        if conn.chunked:
            conn.write(_last_chunk(last))
        elif last:
            conn.write(last)

    def _head(self, status: int, reason: str | None, headers: Headers, length: int | None, chunked: bool) -> bytes:
        conn = self._conn
        if not self.complete or self.too_large or conn.closing_after:
            # An unread body or a drain: nothing more can be read on this connection. A body over the limit closes
            # it too, even if it happened to arrive whole before the answer: whether the connection goes on must not
            # depend on how the agent's bytes were split (and a client sending too much is not served further).
            self.keep_alive = False
        lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}\r\n"]
        items = headers if isinstance(headers, list | tuple) else headers.items()
        has_length = False
        for name, value in items:
            lines.append(f"{name}: {value}\r\n")
            if not has_length and name.lower() == "content-length":
                has_length = True
        if chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        elif length is not None and not has_length and status not in _NO_BODY:
            lines.append(f"Content-Length: {length}\r\n")
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        text = "".join(lines)
        # Header values come from upstream answers and the rules: none may end a line early or smuggle a header.
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise ValueError("a response header holds a line break")
        return b"%bDate: %b\r\n\r\n" % (text.encode("utf-8", "surrogateescape"), conn.server.dates.now())


def _last_chunk(data: bytes) -> bytes:
    """`data` as the last chunk of a chunked body, with the end."""
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"


class _Connection(asyncio.Protocol):
    """One agent connection: parses requests as bytes arrive, runs their handler one at a time, in order."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0
        self._in_head = False  # between a request's first byte and the end of its headers
        self._head_read = 0  # bytes read while a head was open, past the read it began in
        self._head_error: str | None = None
        self._parsing: Request | None = None  # between its headers and the end of its body
        self._pending: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._request: Request | None = None  # whose handler runs
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost: asyncio.Future[None] | None = None  # done when the connection has closed (a drain waits on it)
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.paused = False  # our writes are backed up (the agent reads slowly)
        self.chunked = False  # the current streamed answer is chunked
        self.closing_after = False  # close once the current answer is written (a drain, an upgrade)
        self._refusal: str | None = None  # why the next request cannot be parsed: answered once those before are
        self.closed = False

    # --- asyncio.Protocol ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not registered subclasses
        self.server.connections.add(self)
        if self.server.draining:
            self.transport.close()
            return
        self._idle()

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        if self._in_head:
            # httptools holds a header line until it ends and calls on_header only then: without this count a head
            # sent without end (one endless header value) would grow in memory without bound.
            self._head_read += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # What follows is not HTTP (a WebSocket, a CONNECT tunnel): answer the request and close.
            if self._parsing is not None:
                self._parsing._end()
                self._parsing = None
            self.closing_after = True
            if self.transport is not None:
                self.transport.pause_reading()
        except httptools.HttpParserError as exc:
            self._refuse(f"malformed HTTP request: {exc}")
            return
        if self._in_head and self._head_read > MAX_HEAD and self._head_error is None:
            self._head_error = f"request line and headers are over {MAX_HEAD} bytes"
        if self._head_error is not None:
            self._refuse(self._head_error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gone = ClientGone("the agent closed the connection")
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(gone)
        self._drain_waiters.clear()
        for request in (self._request, self._parsing, *self._pending):
            if request is not None:
                request._wake(gone)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the agent is gone: a held call must not be forwarded, a stream stops
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # --- httptools callbacks ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = []
        self._headers = []
        self._head_size = 0
        self._in_head = True
        self._head_read = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_size += len(url)
        if self._head_size > MAX_HEAD:
            self._head_error = f"request line and headers are over {MAX_HEAD} bytes"

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD or len(self._headers) >= MAX_HEADERS:
            if self._head_error is None:
                self._head_error = (f"request line and headers are over {MAX_HEAD} bytes"
                                    if self._head_size > MAX_HEAD else f"request has over {MAX_HEADERS} header fields")
            return
        self._headers.append((name.decode("utf-8", "surrogateescape"),
                              value.rstrip(b" \t").decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_error is not None:
            return
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):  # llhttp lets HTTP/0.9 through: it has no headers, hence no credential
            self._head_error = f"HTTP/{version} is not supported"
            return
        raw = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        request = Request(self, parser.get_method().decode("ascii"), raw.decode("utf-8", "surrogateescape"),
                          CIMultiDictProxy(CIMultiDict(self._headers)), version, parser.should_keep_alive())
        self._parsing = request
        self._pending.append(request)
        if self._task is None:
            self._dispatch()
        elif len(self._pending) > MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()  # resumed when the queue has been worked off

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing._feed(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing._end()
            self._parsing = None

    # --- requests -----------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        request = self._pending.popleft()
        self._request = request
        self._task = self.loop.create_task(self._run(request))  # the idle timer stays: it skips busy connections

    async def _run(self, request: Request) -> None:
        try:
            response = await self.server.handler(request)
        except asyncio.CancelledError:
            self._abort()  # the agent hung up, or a pause or the end of a drain cut the call: no answer follows
            raise
        except Exception:
            _log.exception("the agents' port handler failed on %s %s", request.method, request.raw_path)
            response = None
            if request._started:
                self._abort()
                return
            request.keep_alive = False
            response = Response(500, b"500 Internal Server Error: see the gateway's log",
                                [("Content-Type", "text/plain; charset=utf-8")])
        if not request._started and response is not None and self.transport is not None:
            try:
                request.send(response)
            except ValueError:
                _log.exception("unsendable answer on %s %s", request.method, request.raw_path)
                self._abort()
                return
        self._done(request)

    def _done(self, request: Request) -> None:
        self._task = None
        self._request = None
        if self.transport is None:  # the agent is gone: nothing queued behind this request is answered
            return
        if not request.responded or not request.keep_alive or self.server.draining:
            self.close()
            return
        if self._pending:  # pipelined requests go on, even past a refusal that follows them
            if self.transport is not None and self._refusal is None and not self.closing_after \
                    and len(self._pending) <= MAX_PIPELINED:
                self.transport.resume_reading()
            self._dispatch()
        elif self._refusal is not None:
            self._send_refusal(self._refusal)
        elif self.closing_after:
            self.close()
        else:
            self._idle()

    def _refuse(self, message: str) -> None:
        """Input that cannot be parsed (or is too big to): the requests before it are answered first, then the
        refusal (a 400 from the on_bad_request hook), then the connection closes. Nothing more is read."""
        self._head_error = None
        if self.transport is not None:
            self.transport.pause_reading()
        parsing, self._parsing = self._parsing, None
        if parsing is not None:
            # The body of a request already given to its handler broke: the handler answers it (in its API's own
            # shape), and the connection closes after that answer, as the body was never read to its end.
            parsing._break(message)
            return
        if self._task is not None:
            self._refusal = message
            return
        self._send_refusal(message)

    def _send_refusal(self, message: str) -> None:
        self._refusal = None
        if self.transport is None:
            return
        response = self.server.on_bad_request(message)
        request = Request(self, "GET", "", CIMultiDictProxy(CIMultiDict()), "1.1", False)
        request.complete = True
        request.send(response)
        self.close()

    # --- writing and closing ------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ClientGone("the agent closed the connection")
        transport.write(data)

    async def drained(self) -> None:
        if self.paused and not self.closed:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _idle(self) -> None:
        if self.server.draining:
            self.close()
            return
        self._last_data = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(self._last_data + self.server.idle_timeout, self._check_idle)

    def watch_body(self) -> None:
        """A handler waits for the rest of a body: the idle timeout applies until it is in."""
        if self._timer is None:
            self._timer = self.loop.call_at(self._last_data + self.server.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        # Re-armed lazily: data_received only stamps the time, so a busy connection costs no timer churn.
        self._timer = None
        if self.closed:
            return
        request = self._request
        if self._task is not None and (request is None or request._waiter is None):
            return  # a handler at work (waiting for an upstream or a human): not idle
        deadline = self._last_data + self.server.idle_timeout
        if self.loop.time() >= deadline:
            self.close()
        else:
            self._timer = self.loop.call_at(deadline, self._check_idle)

    @property
    def busy(self) -> bool:
        return self._task is not None

    def lost(self) -> asyncio.Future[None]:
        """Done once the connection has closed."""
        if self._lost is None:
            self._lost = self.loop.create_future()
            if self.closed:
                self._lost.set_result(None)
        return self._lost


class AgentServer:
    """The listener and its connections. `close` drains: no new connections, idle ones close, calls in flight
    get `drain_timeout` seconds to finish before they are cancelled."""

    def __init__(self, handler: Handler, on_bad_request: BadRequestHook, max_body: int,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.handler = handler
        self.on_bad_request = on_bad_request
        self.max_body = max_body
        self.dates = Dates()
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.draining = False
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, ssl: Any = None, reuse_port: bool = False) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await self.loop.create_server(lambda: _Connection(self), host, port, ssl=ssl,
                                                     reuse_port=reuse_port or None, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self, drain_timeout: float) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.closing_after = True
            if not conn.busy:
                conn.close()
        deadline = self.loop.time() + drain_timeout
        while (busy := [c for c in self.connections if c.busy]) and self.loop.time() < deadline:
            tasks = [c._task for c in busy if c._task is not None]
            await asyncio.wait(tasks, timeout=deadline - self.loop.time())
        # An answer written whole may still sit in its transport's buffer (an agent reading slowly): closing
        # connections get the rest of the drain time to flush it, else the abort below would cut it short.
        flushing = [conn.lost() for conn in self.connections if not conn.busy]
        if flushing and self.loop.time() < deadline:
            await asyncio.wait(flushing, timeout=deadline - self.loop.time())
        for conn in list(self.connections):
            if conn._task is not None:
                conn._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await conn._task
            conn._abort()
        if self._server is not None:
            await self._server.wait_closed()
