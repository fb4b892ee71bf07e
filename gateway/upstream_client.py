"""The upstream client: pooled keep-alive HTTP/1.1 connections, lean enough for the hot path.

Why not aiohttp's ClientSession here: measured in this process it costs ~55 us of CPU per call (request and
response objects, tracing signals, cookie, redirect and decompression machinery the gateway switches off anyway),
against ~8 us for this client, and the gateway makes one upstream call per agent call. Responses are parsed by
httptools (llhttp, the Node.js parser), so framing (Content-Length, chunked, close-delimited) is as strict as a
mainstream server's. What the gateway needs and nothing more: one request, one response, streamed back with
backpressure; a connect timeout and a read timeout (the longest pause between bytes, not counting the time reading
is paused for a slow reader); TLS with the upstream's own context; no redirects, no decompression, no cookies.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from .policy.spec import UpstreamTlsSpec
from .upstream_tls import file_times, tls_context

# RFC 9110 9.2.2: only these may be sent again when a pooled connection turns out to be dead.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
KEEPALIVE_IDLE = 15.0  # seconds a pooled connection may sit unused before it is closed, not reused
MAX_IDLE_PER_ORIGIN = 256
HIGH_WATER = 1 << 20  # bytes buffered from an upstream before reading from it pauses (a slow agent)
LOW_WATER = 1 << 18


_CONNECT_ERRORS: dict[type[OSError], str] = {
    ConnectionRefusedError: "connection refused", socket.gaierror: "name not resolved",
    ConnectionResetError: "connection reset"}


def _connect_error(exc: OSError) -> str:
    known = _CONNECT_ERRORS.get(type(exc))
    if known is not None:
        return known
    # asyncio's "Multiple exceptions" (every address of a name failed) has no errno, and its text has addresses.
    return os.strerror(exc.errno).lower() if exc.errno else "connection failed"


class UpstreamClosed(Exception):
    """The upstream closed the connection or sent something that is not HTTP/1.1."""


class UpstreamConnectFailed(Exception):
    """No connection could be opened (refused, unresolvable, TLS handshake failed). Timing out is a TimeoutError."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a base URL's requests go: scheme, host and port, the Host header, and the path prefix."""

    host: str
    port: int
    tls: bool
    host_header: str
    base_path: str  # the URL's path without a trailing slash ("" for the root)

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if tls else 80)
        shown = f"[{host}]" if ":" in host else host
        header = shown if port == (443 if tls else 80) else f"{shown}:{port}"
        return cls(host, port, tls, header, parts.path.rstrip("/"))


@dataclass(eq=False, slots=True)
class UpstreamResponse:
    """Status and headers as soon as they arrive; the body through `read()` or `iter_any()`."""

    status: int
    reason: str
    headers: CIMultiDict[str]
    _conn: _Connection
    _chunks: deque[bytes] = field(default_factory=deque)
    _buffered: int = 0
    _done: bool = False  # the whole body has arrived
    _error: Exception | None = None
    _waiter: asyncio.Future[None] | None = None
    _released: bool = False

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def exhausted(self) -> bool:
        """All of the body has arrived and been taken."""
        return self._done and not self._chunks

    def read_now(self) -> bytes | None:
        """The rest of the body if all of it has arrived (the connection goes back to the pool), else None.

        Never waits: a short answer, or a stream from a fast upstream, often arrives with its headers.
        """
        if not self._done:
            return None
        data = self._take() if self._chunks else b""
        self.release()
        return data

    async def read(self) -> bytes:
        """The whole body."""
        data = self.read_now()
        if data is not None:
            return data
        parts = [chunk async for chunk in self.iter_any()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def next_chunk(self) -> bytes:
        """Whatever has arrived and not been taken, joined, waiting for some if none has; b"" at the end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                self.release()
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take()

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever is buffered, joined, at each step."""
        while chunk := await self.next_chunk():
            yield chunk

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        self._conn.drained()
        return data

    def release(self) -> None:
        """Done with this response: a complete one returns its connection to the pool, any other closes it."""
        if not self._released:
            self._released = True
            self._conn.finished(self)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    # -- fed by the connection -----------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _finish(self, error: Exception | None) -> None:
        if self._done or self._error is not None:  # the first outcome stands: a timeout stays a timeout
            return
        if error is None:
            self._done = True
        else:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an upstream; one request at a time."""

    def __init__(self, pool: UpstreamPool, key: _Key) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._reason = b""
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._informational = False
        self.complete = False  # the current response has been read to its end
        self.closed = False
        self.received = False  # any byte since the current request was sent
        self.idle_since = 0.0
        self._paused = False
        self._read_timeout = 0.0
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._no_body = False
        self._until_close = False  # the current body has no length: it ends when the upstream closes
        self.gone: asyncio.Future[None] = self._loop.create_future()  # done once the transport is closed

    # -- asyncio.Protocol -----------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.closed:  # failed, or its last response is complete: nothing more is read from it
            return
        self.received = True
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamClosed("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"the upstream sent malformed HTTP ({exc})"))

    def eof_received(self) -> bool:
        return False  # close the transport: a half-closed upstream connection is no use

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete:
            # A body without a length ends with the connection, cleanly: if the upstream closed it (not a reset,
            # not the gateway itself giving up on it).
            if exc is None and self._until_close and not self.closed and self._response is not None:
                self.complete = True
                self._response._finish(None)
            else:
                self._fail(UpstreamClosed("the upstream closed the connection"))
        self.closed = True
        self._cancel_timer()
        self._pool.forget(self)
        if not self.gone.done():
            self.gone.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------------------------------
    # After a failure, llhttp goes on with the rest of the bytes it was given: they are ignored (`closed`), so the
    # body of an answer nobody asked for never reaches the previous response.
    def on_message_begin(self) -> None:
        if self._head is None or self.complete:  # a response, or part of one, with no request outstanding
            self._fail(UpstreamClosed("the upstream sent an unexpected response"))

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._names.append(name)
        self._values.append(value)

    def on_headers_complete(self) -> None:
        if self.closed:
            return
        status = self._parser.get_status_code()
        names, values = self._names, self._values
        self._names, self._values = [], []
        reason, self._reason = self._reason, b""
        if 100 <= status < 200:  # 103 Early Hints and the like: the real answer follows
            self._informational = True
            return
        if self._head is None or self._head.done():  # an answer nobody asked for: this connection is broken
            self._fail(UpstreamClosed("the upstream sent an unexpected response"))
            return
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in zip(names, values):  # noqa: B905 (hot; the parser pairs them)
            headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        response = UpstreamResponse(status, reason.decode("latin-1"), headers, self)
        self._response = response
        self._until_close = "Content-Length" not in headers and "chunked" not in headers.get(
            "Transfer-Encoding", "").lower() and status not in (204, 304)
        self._head.set_result(response)
        if self._no_body:  # the answer to a HEAD: llhttp cannot be told, so no body is read and no reuse
            self.complete = True
            self.closed = True
            response._finish(None)
            if self.transport is not None:
                self.transport.close()

    def on_body(self, body: bytes) -> None:
        if body and self._response is not None and not self.closed:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self.closed:
            return
        if self._informational:
            self._informational = False
            return
        self.complete = True  # the read timer lapses on its own, or serves the next request (see _arm)
        if not self._parser.should_keep_alive():
            self.closed = True
        if self._response is not None:
            self._response._finish(None)

    # -- the pool's side -------------------------------------------------------------------------------------------
    def send(self, data: bytes, read_timeout: float, no_body: bool) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self._head = self._loop.create_future()
        self._response = None
        self._until_close = False
        self.complete = False
        self.received = False
        self._no_body = no_body
        self._read_timeout = read_timeout
        self._arm()
        self.transport.write(data)
        return self._head

    def _arm(self) -> None:
        self._last_data = now = self._loop.time()
        deadline = now + self._read_timeout
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return  # a timer left from the last request fires first, and re-arms itself for the rest
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._check_timeout)

    def _check_timeout(self) -> None:
        # Re-armed lazily: data_received only stamps the time, so a busy stream costs no timer churn.
        self._timer = None
        if self.complete or self.closed:
            return
        deadline = self._last_data + self._read_timeout
        if self._loop.time() >= deadline:
            self._fail(TimeoutError())
            if self.transport is not None:
                self.transport.abort()
        else:
            self._timer = self._loop.call_at(deadline, self._check_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: Exception) -> None:
        self.closed = True
        self._cancel_timer()
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: a caller that gave up must not leave an unretrieved warning
        if self._response is not None:
            self._response._finish(error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()
            self._cancel_timer()  # a slow reader is not a stalled upstream: the read timeout waits for it

    def drained(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            response = self._response
            if response is None or response._buffered < LOW_WATER:
                self._resume()

    def _resume(self) -> None:
        assert self.transport is not None
        self._paused = False
        self.transport.resume_reading()
        if not self.complete:
            self._arm()  # the upstream's time to send counts from now

    def finished(self, response: UpstreamResponse) -> None:
        reusable = self.complete and not self.closed and response is self._response
        if reusable and self._paused:  # the last bytes of a body nobody read paused it: the next answer must flow
            self._resume()
        self._pool.release(self, reusable)

    def close(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()


_Key = tuple[str, int, bool, "UpstreamTlsSpec | None"]  # host, port, https, its TLS settings


async def _exchange(conn: _Connection, data: bytes, read_timeout: float, no_body: bool) -> UpstreamResponse:
    try:
        return await conn.send(data, read_timeout, no_body)
    except asyncio.CancelledError:
        # The caller gave up (its agent hung up): close now, so the upstream stops working for nobody instead
        # of answering into a connection that waits out the read timeout.
        conn.close()
        raise


class UpstreamPool:
    """Idle connections per origin (host, port, TLS settings), reused most-recent first."""

    def __init__(self) -> None:
        self._idle: dict[_Key, list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._contexts: dict[UpstreamTlsSpec | None, tuple[tuple[float, ...], ssl.SSLContext]] = {}
        self._closing = False

    async def request(self, origin: Origin, tls: UpstreamTlsSpec | None, method: str, head: bytes, body: bytes,
                      connect_timeout: float, read_timeout: float) -> UpstreamResponse:
        """Send `head` (request line and headers, ending in a blank line) and `body`; the response's head."""
        # TLS files are stat()ed only when a new connection is needed, never on a pooled one.
        key: _Key = (origin.host, origin.port, origin.tls, tls if origin.tls else None)
        data = head + body if body else head
        no_body = method == "HEAD"
        conn = self._pooled(key)
        if conn is not None:
            try:
                return await _exchange(conn, data, read_timeout, no_body)
            except UpstreamClosed:
                # A pooled connection the upstream had closed: safe to send again only if nothing came back
                # and the method may be repeated (RFC 9112 9.3.1).
                if conn.received or method not in IDEMPOTENT_METHODS:
                    raise
        conn = await self._connect(key, origin, tls, connect_timeout)
        return await _exchange(conn, data, read_timeout, no_body)

    def _context(self, tls: UpstreamTlsSpec | None) -> ssl.SSLContext:
        times = file_times(tls)
        cached = self._contexts.get(tls)
        if cached is not None and cached[0] == times:
            return cached[1]
        context = tls_context(tls)
        self._contexts[tls] = (times, context)  # replaces the context of files since rotated
        return context

    def _pooled(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing() or \
                    now - conn.idle_since > KEEPALIVE_IDLE:
                conn.close()
                continue
            self._busy.add(conn)
            return conn
        return None

    async def _connect(self, key: _Key, origin: Origin, tls: UpstreamTlsSpec | None,
                       connect_timeout: float) -> _Connection:
        if self._closing:
            raise UpstreamConnectFailed("the gateway is shutting down")
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if origin.tls:
            try:
                context = self._context(tls)
            except (OSError, ssl.SSLError) as exc:  # named by kind: the paths are the operator's business
                raise UpstreamConnectFailed("its TLS CA, certificate or key file cannot be loaded") from exc
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key), origin.host, origin.port,
                    ssl=context, server_hostname=origin.host if origin.tls else None)
        except TimeoutError:
            raise  # a connect timeout is a timeout, as a read timeout is (an OSError too, so caught first)
        except ssl.SSLError as exc:
            raise UpstreamConnectFailed(f"TLS handshake failed: {exc.reason or exc}") from exc
        except OSError as exc:
            # Named by kind only: the agent sees this message, and the upstream's address is not its business.
            raise UpstreamConnectFailed(_connect_error(exc)) from exc
        self._busy.add(conn)
        return conn

    def release(self, conn: _Connection, reusable: bool) -> None:
        self._busy.discard(conn)
        idle = self._idle.setdefault(conn.key, [])
        if reusable and not self._closing and len(idle) < MAX_IDLE_PER_ORIGIN:
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: _Connection) -> None:
        """A connection that closed: out of the pool (an idle one closed by the upstream included)."""
        self._busy.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        self._closing = True
        conns = [c for idle in self._idle.values() for c in idle] + list(self._busy)
        self._idle.clear()
        for conn in conns:
            conn.close()
        # Wait for connection_lost, so nothing is left open when the loop closes (a TLS close takes a round trip).
        waiting = [c.gone for c in conns if c.transport is not None]
        if waiting:
            await asyncio.wait(waiting, timeout=1.0)
            for conn in conns:
                if not conn.gone.done() and conn.transport is not None:
                    conn.transport.abort()
