"""Redis outages: a store that is down or silent fails fast with StoreUnavailable, and recovers by itself."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from conftest import RedisProcess

from gateway.limits.enforce import Settler
from gateway.limits.redis_store import RedisStore
from gateway.limits.store import BudgetCounter, Plan, RateCounter, Reservation, StoreUnavailable
from gateway.trace.event import TraceEvent
from gateway.trace.sinks import MemorySink

NOW = 1_700_000_000.0
TAG = "agw:{bot}"
TIMEOUT = 0.5
# Guards, not timing assertions: each failure must arrive well inside this, or the guard fails the test.
PROMPTLY = 3.0
RPM = RateCounter("rpm", f"{TAG}:rl:rpm", 1000, 60.0, 1, 0, 0)
DAILY = BudgetCounter("daily", f"{TAG}:b:daily:2023-11-14", f"{TAG}:a:daily:2023-11-14", 10_000, 1, 1,
                      "2023-11-14", NOW + 3600, 90_000, (), "tokens")


def plan(input: int = 0, output: int = 0) -> Plan:
    return Plan("bot", f"{TAG}:res:{uuid.uuid4().hex}", 600, (RPM,), (DAILY,), input, output, None, NOW)


async def admit(store: RedisStore, input: int = 0, output: int = 0) -> Reservation:
    result = await store.reserve(plan(input, output))
    assert isinstance(result, Reservation), result
    return result


@pytest.fixture
def owned_redis() -> Iterator[RedisProcess]:
    """A redis-server this test may stop, restart and pause; its data survives a restart (append-only file)."""
    server = RedisProcess(persistent=True)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
async def store(owned_redis: RedisProcess) -> AsyncIterator[RedisStore]:
    s = RedisStore.from_url(owned_redis.url, timeout=TIMEOUT, clock=lambda: NOW)
    yield s
    await s.close()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung Redis, as clients see one."""
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # kept open, never written to

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()
        for writer in writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_a_redis_that_never_answers_is_unavailable_within_the_timeout() -> None:
    async with silent_server() as port:
        silent = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", timeout=TIMEOUT)
        try:
            async with asyncio.timeout(PROMPTLY):
                with pytest.raises(StoreUnavailable):
                    await silent.reserve(plan())
            reservation = Reservation(plan(), 0, (0,), (0,))
            async with asyncio.timeout(PROMPTLY):
                with pytest.raises(StoreUnavailable):
                    await silent.settle(reservation, 1, 1)
            async with asyncio.timeout(PROMPTLY):
                with pytest.raises(StoreUnavailable):
                    await silent.peek((RPM,), (DAILY,), NOW)
        finally:
            await silent.close()


async def test_a_stopped_redis_is_unavailable_then_works_again_after_a_restart(
        owned_redis: RedisProcess, store: RedisStore) -> None:
    await admit(store)  # the pool now holds a connection that the stop will break
    owned_redis.stop()
    async with asyncio.timeout(PROMPTLY):
        for _ in range(2):  # the broken pooled connection, then a refused new one
            with pytest.raises(StoreUnavailable) as caught:
                await store.reserve(plan())
            assert caught.value.__cause__ is not None
        with pytest.raises(StoreUnavailable):
            await store.peek((RPM,), (DAILY,), NOW)
    owned_redis.start()
    assert (await admit(store)).remaining == (998,)  # same store object, and the data survived the restart


async def test_a_paused_redis_is_unavailable_within_the_timeout_then_works_after_resume(
        owned_redis: RedisProcess, store: RedisStore) -> None:
    await admit(store)
    owned_redis.pause()
    try:
        async with asyncio.timeout(PROMPTLY):
            with pytest.raises(StoreUnavailable):
                await store.reserve(plan())  # on the pooled connection
        async with asyncio.timeout(PROMPTLY):
            with pytest.raises(StoreUnavailable):
                await store.reserve(plan())  # on a new connection: the kernel accepts it, nobody answers
    finally:
        owned_redis.resume()
    await admit(store)


async def test_a_settle_retried_across_a_restart_applies_exactly_once(
        owned_redis: RedisProcess, store: RedisStore) -> None:
    reservation = await admit(store, input=100, output=900)
    assert reservation.used == (1000,)
    owned_redis.stop()
    async with asyncio.timeout(PROMPTLY):
        for _ in range(3):  # what the settler's retries see while the store is down
            with pytest.raises(StoreUnavailable):
                await store.settle(reservation, 100, 100)
    owned_redis.start()
    first = await store.settle(reservation, 100, 100)
    assert (first.applied, first.used) == (True, (200,))
    again = await store.settle(reservation, 100, 100)
    assert (again.applied, again.used) == (False, (200,))
    assert (await store.peek((RPM,), (DAILY,), NOW))[1] == (200,)


async def test_a_settle_retried_across_a_pause_applies_exactly_once(
        owned_redis: RedisProcess, store: RedisStore) -> None:
    reservation = await admit(store, input=100, output=900)
    owned_redis.pause()
    try:
        async with asyncio.timeout(PROMPTLY):
            with pytest.raises(StoreUnavailable):
                await store.settle(reservation, 100, 100)
    finally:
        owned_redis.resume()
    # The timed-out attempt may still run once Redis resumes (its request was already sent): either way the
    # marker lets exactly one attempt apply.
    first = await store.settle(reservation, 100, 100)
    again = await store.settle(reservation, 100, 100)
    assert again.applied is False and first.used == again.used == (200,)
    assert (await store.peek((RPM,), (DAILY,), NOW))[1] == (200,)


async def test_a_trace_shows_the_reservations_budget_while_its_settlement_waits_then_the_settled_one(
        owned_redis: RedisProcess, store: RedisStore) -> None:
    """The settlement records the budget: the reservation's totals while the store is down (all the trace can
    show then), the settled ones once it applies."""
    settler = Settler(store, MemorySink(), lambda reservation, settlement: None)
    reservation = await admit(store, input=100, output=900)
    owned_redis.stop()
    waiting = TraceEvent(trace_id="0" * 32, span_id="0" * 16)
    async with asyncio.timeout(PROMPTLY):
        await settler.settle(reservation, 100, 100, waiting)
    assert waiting.budget is not None and waiting.budget["used"] == 1000
    assert waiting.limits and "queued, retried until it applies" in waiting.limits[0]
    owned_redis.start()
    settled = TraceEvent(trace_id="1" * 32, span_id="1" * 16)
    await settler.close()  # its last attempt applies the queued settlement
    await settler.settle(reservation, 100, 100, settled)  # already applied: the reservation's totals again
    assert settled.budget is not None and settled.budget["used"] == 1000
    assert (await store.peek((RPM,), (DAILY,), NOW))[1] == (200,)
    fresh = await admit(store, input=10, output=90)
    applied = TraceEvent(trace_id="2" * 32, span_id="2" * 16)
    await settler.settle(fresh, 10, 10, applied)
    assert applied.budget is not None and applied.budget["used"] == 220
