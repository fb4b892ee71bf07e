"""The store's own pipelined RESP connection (`gateway.limits.resp`) on real redis-servers: every reply reaches
its own caller, and a failure (a cut, a death, a pause, garbage, a flush of the scripts) every waiting caller.

The core cases run on both event loops: asyncio, and uvloop, which the gateway runs on. The session (password,
database, TLS, sentinel) is in test_resp_session.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

import hiredis
import pytest
import redis
from conftest import RedisProcess, free_port, redis_command
from resp_plans import NOW, PROMPTLY, RPM, assert_own, budget, plan, run  # noqa: F401 (run: a fixture)

from gateway.limits.redis_store import RedisStore
from gateway.limits.store import StoreUnavailable


# -- FIFO ----------------------------------------------------------------------------------------------------------
def test_replies_reach_their_own_callers_among_250_concurrent_calls(run: Callable[..., None],
                                                                    redis_server: RedisProcess,
                                                                    redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore.from_url(f"{redis_url}?client_name=agw-fifo", timeout=5.0, clock=lambda: NOW)
        try:
            earlier = [assert_own(await store.reserve(plan(i)), i) for i in range(100)]

            async def call(i: int) -> None:
                if i < 50:  # settles of their own reservations: used becomes what was settled
                    settled = await store.settle(earlier[i], 7 * i, 0)
                    assert (settled.applied, settled.used) == (True, (7 * i,)), i
                elif i < 100:  # peeks of counters nothing else touches
                    assert (await store.peek((), (budget(i),), NOW))[1] == (1000 + 2 * i,), i
                else:
                    assert_own(await store.reserve(plan(i)), i)

            await asyncio.gather(*(call(i) for i in range(300)))  # 200 reserves, 50 settles, 50 peeks at once
            assert len(_client_ids(redis_server.port, "agw-fifo")) == 1  # one connection carried them all
        finally:
            await store.close()

    run(scenario())


def test_a_cancelled_caller_leaves_every_other_caller_its_own_reply(run: Callable[..., None],
                                                                    redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore.from_url(redis_url, timeout=5.0, clock=lambda: NOW)
        try:
            await store.peek((RPM,), (), NOW)  # connected: the calls below are written in one batch
            tasks = [asyncio.create_task(store.reserve(plan(i))) for i in range(200)]
            await asyncio.sleep(0)  # every task has sent its call; none can have its reply yet
            for task in tasks[::3]:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for i, result in enumerate(results):
                if i % 3 == 0:
                    assert isinstance(result, asyncio.CancelledError), (i, result)
                else:
                    assert_own(result, i)
            assert_own(await store.reserve(plan(200)), 200)
        finally:
            await store.close()

    run(scenario())


# -- failures ------------------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def cutting_proxy(port: int, replies: int) -> AsyncIterator[int]:
    """A proxy to the Redis on `port` whose first connection passes `replies` replies and then drops, like a
    server that dies in the middle of answering a batch; later connections pass everything."""
    handlers: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def handle(client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        first = not writers
        server_in, server_out = await asyncio.open_connection("127.0.0.1", port)
        writers.extend((client_out, server_out))

        async def requests() -> None:
            while data := await client_in.read(65536):
                server_out.write(data)

        forward = asyncio.create_task(requests())
        reader, passed = hiredis.Reader(), 0
        try:
            while data := await server_in.read(65536):
                if not first:
                    client_out.write(data)
                    continue
                for end in range(1, len(data) + 1):  # byte by byte: where does each reply end?
                    reader.feed(data[end - 1:end])
                    if reader.gets() is not False:
                        passed += 1
                        if passed == replies:
                            client_out.write(data[:end])
                            return
                client_out.write(data)
        finally:
            forward.cancel()
            client_out.close()
            server_out.close()

    def start(client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(handle(client_in, client_out))
        handlers.add(task)

    server = await asyncio.start_server(start, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


def test_a_connection_cut_mid_batch_answers_the_first_callers_and_fails_the_rest(run: Callable[..., None],
                                                                                 redis_url: str,
                                                                                 redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        # The session's opening loads both scripts (two replies); then the batch is 200 EVALSHAs and their replies.
        async with cutting_proxy(redis_server.port, replies=2 + 120) as port:
            store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", timeout=30.0, clock=lambda: NOW)
            try:
                plans = [plan(i) for i in range(200)]
                async with asyncio.timeout(PROMPTLY):  # the cut, not the store timeout, ends the wait
                    results = await asyncio.gather(*(store.reserve(p) for p in plans), return_exceptions=True)
                for i, result in enumerate(results[:120]):
                    assert_own(result, i)
                for result in results[120:]:
                    assert isinstance(result, StoreUnavailable), result
                    assert isinstance(result.__cause__, ConnectionError)
                # Those ran but lost their replies; a retried reserve finds its marker and charges nothing again.
                assert_own(await store.reserve(plans[150]), 150)
                assert (await store.peek((), (budget(150),), NOW))[1] == (1300,)
            finally:
                await store.close()

    run(scenario())


async def written() -> None:
    """Yield to the loop until calls made just before are on the wire: in the first turn the callers queue their
    commands, in the second the connection writes them. (Nothing is timed: a paused server answers nothing.)"""
    for _ in range(2):
        await asyncio.sleep(0)


def kill(server: RedisProcess) -> None:
    """SIGKILL: the server dies at once, whatever it was doing (even stopped), and its sockets reset."""
    assert server._proc is not None
    server._proc.kill()
    server._proc.wait()
    server._proc, server._paused = None, False


@pytest.fixture
def owned_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test's own, which it may pause, kill, restart or demote."""
    server = RedisProcess()
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_a_server_killed_mid_batch_fails_every_waiting_caller_then_the_next_call_works(
        run: Callable[..., None], owned_redis: RedisProcess) -> None:
    async def scenario() -> None:
        store = RedisStore.from_url(owned_redis.url, timeout=30.0, clock=lambda: NOW)
        try:
            assert_own(await store.reserve(plan(0)), 0)
            owned_redis.pause()  # the batch below is accepted by the kernel, and never answered
            calls = asyncio.gather(*(store.reserve(plan(i)) for i in range(1, 201)), return_exceptions=True)
            await written()
            kill(owned_redis)
            async with asyncio.timeout(PROMPTLY):  # the dead connection, not the store timeout, ends the wait
                results = await calls
            assert all(isinstance(result, StoreUnavailable) for result in results), results
            owned_redis.start()
            assert_own(await store.reserve(plan(201)), 201)
        finally:
            await store.close()

    run(scenario())


def test_a_paused_server_fails_every_waiting_caller_within_the_timeout_then_recovers(
        run: Callable[..., None], owned_redis: RedisProcess) -> None:
    async def scenario() -> None:
        store = RedisStore.from_url(owned_redis.url, timeout=0.5, clock=lambda: NOW)
        try:
            assert_own(await store.reserve(plan(0)), 0)
            owned_redis.pause()
            try:
                started = time.monotonic()
                async with asyncio.timeout(PROMPTLY):
                    results = await asyncio.gather(*(store.reserve(plan(i)) for i in range(1, 101)),
                                                   return_exceptions=True)
                assert time.monotonic() - started >= 0.5
                for result in results:
                    assert isinstance(result, StoreUnavailable), result
                    assert "no answer within 0.5s" in str(result)
            finally:
                owned_redis.resume()
            # The timed-out connection was dropped: its late replies can reach nobody.
            for i, result in enumerate(await asyncio.gather(*(store.reserve(plan(i)) for i in range(101, 201)))):
                assert_own(result, 101 + i)
        finally:
            await store.close()

    run(scenario())


def test_scripts_flushed_under_load_are_loaded_once_each_and_every_caller_served(
        run: Callable[..., None], redis_url: str, redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        store = RedisStore.from_url(redis_url, timeout=5.0, clock=lambda: NOW)
        try:
            earlier = [assert_own(await store.reserve(plan(i)), i) for i in range(50)]
            await store.settle(earlier.pop(), 0, 0)  # both scripts loaded
            with redis.Redis(port=redis_server.port) as raw:
                raw.script_flush()
                raw.config_resetstat()

            async def call(i: int) -> None:
                if i < 49:
                    assert (await store.settle(earlier[i], 3 * i, 0)).used == (3 * i,), i
                else:
                    assert_own(await store.reserve(plan(i)), i)

            await asyncio.gather(*(call(i) for i in range(249)))
            with redis.Redis(port=redis_server.port, decode_responses=True) as raw:
                assert raw.info("commandstats")["cmdstat_script|load"]["calls"] == 2
                assert raw.script_exists(*store._shas.values()) == [True, True]
        finally:
            await store.close()

    run(scenario())


def test_a_call_queued_on_a_connection_that_dies_before_the_write_goes_on_a_fresh_one(
        run: Callable[..., None], redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore.from_url(redis_url, timeout=5.0, clock=lambda: NOW)
        try:
            assert_own(await store.reserve(plan(0)), 0)
            assert store._resp is not None and store._resp._connection is not None
            transport = store._resp._connection._transport
            assert transport is not None
            call = asyncio.create_task(store.reserve(plan(1)))
            await asyncio.sleep(0)  # the call is queued; its write is the next loop turn's
            transport.abort()  # as when the loop finds the peer gone: the connection is closing, nothing was sent
            assert_own(await call, 1)
        finally:
            await store.close()

    run(scenario())


async def test_a_master_turned_replica_is_unavailable_and_its_connection_dropped(
        owned_redis: RedisProcess) -> None:
    store = RedisStore.from_url(f"{owned_redis.url}?client_name=agw-ro", timeout=5.0, clock=lambda: NOW)
    try:
        assert_own(await store.reserve(plan(0)), 0)
        before = _client_ids(owned_redis.port, "agw-ro")
        nowhere = str(free_port())  # a replica of a master it cannot reach is read-only all the same
        assert redis_command(owned_redis.port, "REPLICAOF", "127.0.0.1", nowhere) == b"+OK"
        with pytest.raises(StoreUnavailable, match="READONLY"):
            await store.reserve(plan(1))
        assert redis_command(owned_redis.port, "REPLICAOF", "NO", "ONE") == b"+OK"
        assert_own(await store.reserve(plan(2)), 2)
        assert _client_ids(owned_redis.port, "agw-ro") - before  # served by a new connection
    finally:
        await store.close()


def _client_ids(port: int, name: str) -> set[int]:
    with redis.Redis(port=port, socket_timeout=5) as client:
        return {int(c["id"]) for c in client.client_list() if c["name"] == name}


async def test_a_redis_that_answers_garbage_is_unavailable_and_the_connection_replaced() -> None:
    connections = 0

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionError):
            await reader.read(65536)
            writer.write(b"?what\r\n")
            await writer.drain()
            await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    store = RedisStore.from_url(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", timeout=30.0)
    try:
        for attempt in (1, 2):
            async with asyncio.timeout(PROMPTLY):
                with pytest.raises(StoreUnavailable, match="Protocol error"):
                    await store.reserve(plan(0))
            assert connections == attempt
    finally:
        await store.close()
        server.close()
        await server.wait_closed()


async def test_close_waits_for_the_calls_in_flight_then_refuses_new_ones(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, timeout=5.0, clock=lambda: NOW)
    calls = asyncio.gather(*(store.reserve(plan(i)) for i in range(100)))
    await asyncio.sleep(0)  # sent (on a connection still opening)
    await store.close()
    for i, result in enumerate(await calls):
        assert_own(result, i)
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.reserve(plan(100))
