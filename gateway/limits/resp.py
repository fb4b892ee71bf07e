"""A minimal pipelined RESP2 client for the limits store's hot path: one connection to one Redis server.

Redis answers the commands of a connection in the order it received them, so each caller's future waits in one
FIFO queue and replies are handed out in order. The commands of one event-loop iteration leave in a single write,
packed by hiredis, and hiredis parses the replies: a few µs of CPU per call where redis-py's asyncio client spends
tens. Failures are the built-in `TimeoutError`/`ConnectionError` and redis-py's `ResponseError`/`InvalidResponse`,
which the store turns into `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import InvalidResponse, RedisError, ResponseError

Command = tuple[str | int | float, ...]
_pack = cast(Callable[[Command], bytes], hiredis.pack_command)  # its stub wants a 1-tuple
_EARLY = 0.001  # a timer may fire this much before its deadline (uvloop's clock ticks in milliseconds)


class Unsent(ConnectionError):
    """The connection failed before the command was written, so nothing ran: it may go on a fresh connection."""


@dataclass(frozen=True)
class Endpoint:
    """Where the server is, and how a session on it opens (AUTH, SELECT, CLIENT SETNAME, SCRIPT LOAD)."""

    locate: Callable[[], Awaitable[tuple[str, int]]]  # asked for every new connection: a sentinel's master moves
    tls: Callable[[], ssl.SSLContext] | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    client_name: str | None = None
    scripts: tuple[str, ...] = ()  # Lua scripts loaded before the session's first command

    def hello(self) -> list[Command]:
        commands: list[Command] = []
        if self.username:
            commands.append(("AUTH", self.username, self.password or ""))
        elif self.password:
            commands.append(("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        if self.client_name:
            commands.append(("CLIENT", "SETNAME", self.client_name))
        commands += [("SCRIPT", "LOAD", script) for script in self.scripts]
        return commands


def endpoint(client: Redis) -> Endpoint:
    """The server of a redis-py client for one server or a sentinel-managed master, as redis-py reads its URL.

    redis-py's own reading (defaults, credentials, database, TLS query options) is the one `redis_urls` documents,
    so taking it from the client keeps both paths agreeing on what a URL means.
    """
    pool = client.connection_pool
    # Never connected: only redis-py's reading of the URL.
    settings = pool.make_connection()  # type: ignore[no-untyped-call]
    locate: Callable[[], Awaitable[tuple[str, int]]]
    if isinstance(pool, SentinelConnectionPool):
        locate = pool.get_master_address
    else:
        address = (str(settings.host), int(settings.port))

        async def fixed() -> tuple[str, int]:
            return address

        locate = fixed
    # The context is built (its files read) at the first connection, as redis-py does, not here.
    tls = settings.ssl_context.get if isinstance(settings, SSLConnection) else None
    return Endpoint(locate, tls, settings.username, settings.password, int(settings.db or 0), settings.client_name)


class _Connection(asyncio.Protocol):
    """One socket: `send` queues a command and returns the future of its reply.

    One timer per connection bounds every call: when the oldest unanswered command passes its deadline, the
    connection is deemed hung, and it fails as a whole (every waiting caller, at once). So does any connection or
    protocol error: a reply can never reach the wrong caller, because a failed connection is never used again.
    """

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError, protocolError=InvalidResponse)
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # (reply, deadline), in send order
        self._out: list[bytes] = []  # commands not written yet: always the last len(_out) entries of _waiting
        self._transport: asyncio.Transport | None = None
        self._made = False
        self._ready = False  # the session is open (AUTH and SELECT answered): commands may be written
        self._flush_soon = False
        self._timer: asyncio.TimerHandle | None = None
        self._opening: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None  # set once: a failed connection is never used again
        self.finished: asyncio.Future[None] = self._loop.create_future()  # the socket is gone (or never was)

    def open(self, endpoint: Endpoint) -> None:
        self._opening = self._loop.create_task(self._open(endpoint))

    async def _open(self, endpoint: Endpoint) -> None:
        try:
            host, port = await endpoint.locate()
            await self._loop.create_connection(lambda: self, host, port,
                                               ssl=endpoint.tls() if endpoint.tls is not None else None)
            # The session must be open before any command is written: a command behind a failed SELECT would
            # run on database 0.
            if (hello := endpoint.hello()) and self.failure is None:
                await asyncio.gather(*self._send_first(hello))
        except (RedisError, OSError) as exc:
            self._fail(exc)
        except Exception as exc:  # e.g. a ValueError from the TLS context: still a connection that cannot open
            failure = ConnectionError(f"{type(exc).__name__}: {exc}")
            failure.__cause__ = exc
            self._fail(failure)
        else:
            if self.failure is None:
                self._ready = True
                self._flush()
        finally:
            if not self._made and not self.finished.done():
                self.finished.set_result(None)

    def send(self, command: Command | bytes) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        self._out.append(command if isinstance(command, bytes) else _pack(command))
        self._waiting.append((future, self._loop.time() + self._timeout))
        if self._timer is None:
            self._timer = self._loop.call_at(self._waiting[0][1], self._expire)
        if self._ready and not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)  # after the other callers of this loop iteration: one write for all
        return future

    def _send_first(self, commands: list[Command]) -> list[asyncio.Future[Any]]:
        """Written at once, ahead of every queued command (the session's opening)."""
        assert self._transport is not None
        deadline = self._waiting[0][1] if self._waiting else self._loop.time() + self._timeout
        futures = [self._loop.create_future() for _ in commands]
        for position, future in enumerate(futures):
            self._waiting.insert(position, (future, deadline))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)
        self._transport.write(b"".join(_pack(command) for command in commands))
        return futures

    def _flush(self) -> None:
        self._flush_soon = False
        transport = self._transport
        # A closing transport drops what it is given: left unwritten, the commands can go on a fresh connection.
        if self._out and transport is not None and self.failure is None and not transport.is_closing():
            data = b"".join(self._out)
            self._out.clear()
            transport.write(data)

    def _expire(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        deadline = self._waiting[0][1]  # the oldest command: every later one has a later deadline
        if self._loop.time() + _EARLY >= deadline:
            self._fail(TimeoutError(f"no reply within {self._timeout:g}s"))
        else:
            self._timer = self._loop.call_at(deadline, self._expire)

    def _fail(self, exc: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Commands still unwritten never ran: the caller may resend them on a fresh connection, unless this one
        # never opened (a fresh one would fail alike) or timed out (a hung server must answer fast, not twice).
        resend = self._ready and not isinstance(exc, TimeoutError)
        waiting, self._waiting = self._waiting, deque()
        written = len(waiting) - len(self._out)
        self._out.clear()
        for index, (future, _) in enumerate(waiting):
            if not future.done():
                future.set_exception(Unsent(f"not sent: {exc}") if resend and index >= written else exc)
        if self._transport is not None:
            self._transport.abort()
        if self._opening is not None and not self._opening.done() and self._opening is not asyncio.current_task():
            self._opening.cancel()

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._made = True
        if self.failure is not None:  # timed out while connecting
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        reader, waiting = self._reader, self._waiting
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except InvalidResponse as exc:
                self._fail(exc)
                return
            except UnicodeDecodeError as exc:  # one reply (a foreign value under one of our keys): just its caller
                reply = InvalidResponse(f"a reply that is not UTF-8: {exc}")
            if reply is False:
                return
            if len(waiting) <= len(self._out):
                self._fail(InvalidResponse("redis sent a reply to no command"))
                return
            future = waiting.popleft()[0]
            if isinstance(reply, RedisError):  # an error reply
                if not future.done():
                    future.set_exception(reply)
                if str(reply).startswith("READONLY"):  # a master turned replica (failover): find the new one
                    self._fail(reply)
                    return
            elif not future.done():  # else its caller was cancelled; the reply is dropped, in its turn
                future.set_result(reply)

    def eof_received(self) -> bool:
        self._fail(ConnectionError("redis closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(exc if exc is not None else ConnectionError("redis closed the connection"))
        if not self.finished.done():
            self.finished.set_result(None)

    async def close(self) -> None:
        """Once the calls in flight have their replies (or failed), close the socket and wait until it is gone."""
        if pending := [future for future, _ in self._waiting]:
            await asyncio.wait(pending)
        if self._opening is not None:
            await asyncio.wait([self._opening])
        if self._transport is not None:
            self._transport.close()
        elif not self._made and not self.finished.done():  # an opening cancelled before it even started
            self.finished.set_result(None)
        await self.finished


class RespClient:
    """Pipelined calls on one connection; a failed connection is replaced by a fresh one at the next call."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self._endpoint = endpoint
        self._timeout = timeout
        self._connection: _Connection | None = None
        self._connections: set[_Connection] = set()  # every connection whose socket may still exist
        self._closed = False

    def send(self, command: Command | bytes) -> asyncio.Future[Any]:
        """Queue `command` (or a command already packed as RESP) and return the future of its reply (written
        with this loop iteration's others)."""
        connection = self._connection
        if connection is None or connection.failure is not None:
            connection = self._connect()
        return connection.send(command)

    async def call(self, command: Command | bytes) -> Any:
        try:
            return await self.send(command)
        except Unsent:  # the connection died before the write: nothing ran, so once more on a fresh one
            return await self.send(command)

    def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectionError("the redis store is closed")
        connection = self._connection = _Connection(self._timeout)
        self._connections.add(connection)
        connection.finished.add_done_callback(lambda _: self._connections.discard(connection))
        connection.open(self._endpoint)
        return connection

    async def close(self) -> None:
        """Refuse new calls, let the ones in flight finish (each within the timeout), close every socket."""
        self._closed = True
        await asyncio.gather(*(connection.close() for connection in list(self._connections)))
