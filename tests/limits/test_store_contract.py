"""One contract, two stores: the memory store is the reference and the Redis store must agree with it exactly."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import pytest
import redis.asyncio
import trustme
from conftest import RedisProcess, free_port

from gateway.limits.memory_store import MemoryStore
from gateway.limits.redis_store import RedisStore
from gateway.limits.store import (
    BudgetCounter,
    Plan,
    RateCounter,
    Refusal,
    Reservation,
    Store,
    StoreUnavailable,
)

NOW = 1_700_000_000.0
AGENT = "bot"
TAG = f"agw:{{{AGENT}}}"  # every key of a plan carries the agent's hash tag, as plan.py builds them


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    store: Store
    clock: Clock

    async def reserve(self, **kwargs: object) -> Reservation | Refusal:
        return await self.store.reserve(plan(now=self.clock.now, **kwargs))  # type: ignore[arg-type]

    async def admit(self, **kwargs: object) -> Reservation:
        result = await self.reserve(**kwargs)
        assert isinstance(result, Reservation), result
        return result

    async def peek(self, rates: tuple[RateCounter, ...] = (), budgets: tuple[BudgetCounter, ...] = ()
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return await self.store.peek(rates, budgets, self.clock.now)


def refused(result: Reservation | Refusal) -> tuple[object, ...]:
    assert isinstance(result, Refusal), result
    return result.type, result.counter, result.retry_after, result.detail


def rate(id: str = "rpm", limit: int = 5, period: float = 10.0, per_call: int = 1, per_input: int = 0,
         per_output: int = 0, kind: Literal["rate", "loop"] = "rate") -> RateCounter:
    return RateCounter(id, f"{TAG}:rl:{id}", limit, period, per_call, per_input, per_output, kind)


def budget(id: str = "daily", limit: int = 1000, per_input: int = 1, per_output: int = 1, window: str = "2023-11-14",
           alert_at: tuple[float, ...] = (), unit: Literal["tokens", "usd_nanos"] = "tokens") -> BudgetCounter:
    return BudgetCounter(id, f"{TAG}:b:{id}:{window}", f"{TAG}:a:{id}:{window}", limit, per_input, per_output,
                         window, resets_at=NOW + 3600, ttl=3600 + 86400, alert_at=alert_at, unit=unit)


def plan(*, rates: tuple[RateCounter, ...] = (), budgets: tuple[BudgetCounter, ...] = (), input: int = 0,
         output: int = 0, min_output: int | None = None, now: float = NOW) -> Plan:
    return Plan(AGENT, f"{TAG}:res:{uuid.uuid4().hex}", 600, rates, budgets, input, output, min_output, now)


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    clock = Clock()
    store: Store
    if request.param == "memory":
        store = MemoryStore(clock)
    else:
        store = RedisStore.from_url(request.getfixturevalue("redis_url"), timeout=5.0, clock=clock)
    yield Backend(request.param, store, clock)
    await store.close()


@pytest.fixture
async def redis_stores(redis_url: str) -> AsyncIterator[Callable[[], RedisStore]]:
    """Independent RedisStore instances (separate pools) on one Redis, closed at the end."""
    made: list[RedisStore] = []

    def make() -> RedisStore:
        made.append(RedisStore.from_url(redis_url, timeout=5.0, clock=Clock()))
        return made[-1]

    yield make
    for store in made:
        await store.close()


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


# -- rate limits ---------------------------------------------------------------------------------------------------
async def test_requests_rate_admits_exactly_limit_in_a_burst(backend: Backend) -> None:
    rpm = rate(limit=5, period=10.0)
    for left in (4, 3, 2, 1, 0):
        assert (await backend.admit(rates=(rpm,))).remaining == (left,)
    refusal = await backend.reserve(rates=(rpm,))
    assert refused(refusal) == ("rate_limited", "rpm", pytest.approx(2.0), None)  # one interval: 10 s / 5
    backend.clock.now += 2.0
    assert (await backend.admit(rates=(rpm,))).remaining == (0,)


async def test_tokens_rate_charges_input_and_output(backend: Backend) -> None:
    tpm = rate("tpm", limit=1024, period=64.0, per_call=0, per_input=1, per_output=1)
    assert (await backend.admit(rates=(tpm,), input=300, output=200)).remaining == (524,)
    refusal = await backend.reserve(rates=(tpm,), input=300, output=300)
    # The cell would end 600 units ahead with room for 524: 76 units of 1/16 s each too early.
    assert refused(refusal) == ("rate_limited", "tpm", pytest.approx(76 / 16), None)
    assert (await backend.peek((tpm,)))[0] == (524,)


async def test_loop_detector_refusal_says_loop_detected(backend: Backend) -> None:
    loop = rate("loop_detection", limit=2, period=60.0, kind="loop")
    await backend.admit(rates=(loop,))
    await backend.admit(rates=(loop,))
    refusal = await backend.reserve(rates=(loop,))
    assert refused(refusal) == ("rate_limited", "loop_detection", pytest.approx(30.0), "loop_detected")


# -- budgets -------------------------------------------------------------------------------------------------------
async def test_budget_admits_while_it_fits_then_refuses_until_reset(backend: Backend) -> None:
    daily = budget(limit=1000)
    assert (await backend.admit(budgets=(daily,), input=100, output=400)).used == (500,)
    assert (await backend.admit(budgets=(daily,), input=100, output=400)).used == (1000,)
    backend.clock.now += 600
    refusal = await backend.reserve(budgets=(daily,), input=1, output=0)
    assert refused(refusal) == ("budget_exceeded", "daily", pytest.approx(3000.0), None)  # resets_at - now
    assert (await backend.peek(budgets=(daily,)))[1] == (1000,)


async def test_budget_clamps_output_to_what_it_can_afford(backend: Backend) -> None:
    daily = budget(limit=1000)
    await backend.admit(budgets=(daily,), input=100, output=200)
    reservation = await backend.admit(budgets=(daily,), input=100, output=2000, min_output=1)
    assert (reservation.output, reservation.used) == (600, (1000,))


async def test_usd_budget_clamps_to_whole_tokens(backend: Backend) -> None:
    usd = budget("usd", limit=1_000_000, per_input=150, per_output=600, unit="usd_nanos")
    reservation = await backend.admit(budgets=(usd,), input=1000, output=4000, min_output=1)
    assert (reservation.output, reservation.used) == (1416, (150_000 + 1416 * 600,))


async def test_budget_refuses_when_clamping_would_go_below_min_output(backend: Backend) -> None:
    daily = budget(limit=1000)
    await backend.admit(budgets=(daily,), input=900, output=50)
    refusal = await backend.reserve(budgets=(daily,), input=0, output=500, min_output=100)
    assert isinstance(refusal, Refusal) and refusal.counter == "daily"
    assert (await backend.peek(budgets=(daily,)))[1] == (950,)


async def test_budget_refuses_when_the_input_alone_does_not_fit(backend: Backend) -> None:
    daily = budget(limit=1000)
    for output, min_output in ((0, None), (500, 0)):
        refusal = await backend.reserve(budgets=(daily,), input=1001, output=output, min_output=min_output)
        assert isinstance(refusal, Refusal) and refusal.type == "budget_exceeded"
    assert (await backend.peek(budgets=(daily,)))[1] == (0,)


async def test_overdrawn_budget_refuses_even_a_call_without_output(backend: Backend) -> None:
    daily = budget(limit=1000)
    reservation = await backend.admit(budgets=(daily,), input=0, output=1000)
    await backend.store.settle(reservation, 0, 1200)  # the upstream produced more than reserved
    refusal = await backend.reserve(budgets=(daily,), input=0, output=0)
    assert isinstance(refusal, Refusal) and refusal.type == "budget_exceeded"


# -- all or nothing ------------------------------------------------------------------------------------------------
async def test_refused_rate_counter_charges_no_budget_and_no_other_rate(backend: Backend) -> None:
    rpm, strict, daily = rate(limit=5), rate("strict", limit=1), budget(limit=1000)
    await backend.admit(rates=(strict,))
    refusal = await backend.reserve(rates=(rpm, strict), budgets=(daily,), input=10, output=10)
    assert isinstance(refusal, Refusal) and refusal.counter == "strict"
    assert await backend.peek((rpm, strict), (daily,)) == ((5, 0), (0,))


async def test_refused_budget_charges_no_rate_counter(backend: Backend) -> None:
    rpm, tpm, daily = rate(limit=5), rate("tpm", limit=1024, period=64.0, per_call=0, per_input=1), budget(limit=100)
    refusal = await backend.reserve(rates=(rpm, tpm), budgets=(daily,), input=200, output=0)
    assert isinstance(refusal, Refusal) and refusal.counter == "daily"
    assert await backend.peek((rpm, tpm), (daily,)) == ((5, 1024), (0,))


async def test_second_budget_refusing_leaves_the_first_untouched(backend: Backend) -> None:
    roomy, tight = budget("roomy", limit=10_000), budget("tight", limit=10)
    refusal = await backend.reserve(budgets=(roomy, tight), input=5, output=50)
    assert isinstance(refusal, Refusal) and refusal.counter == "tight"
    assert (await backend.peek(budgets=(roomy, tight)))[1] == (0, 0)


# -- settle --------------------------------------------------------------------------------------------------------
async def test_settle_applies_deltas_down_and_up(backend: Backend) -> None:
    daily = budget(limit=10_000)
    tpm = rate("tpm", limit=4096, period=64.0, per_call=0, per_input=1, per_output=1)
    first = await backend.admit(rates=(tpm,), budgets=(daily,), input=100, output=900)
    assert (first.used, first.remaining) == ((1000,), (3096,))
    settled = await backend.store.settle(first, 100, 300)
    assert (settled.used, settled.applied, settled.alerts) == ((400,), True, ())
    assert await backend.peek((tpm,), (daily,)) == ((3696,), (400,))
    second = await backend.admit(rates=(tpm,), budgets=(daily,), input=100, output=100)
    settled = await backend.store.settle(second, 100, 1000)
    assert settled.used == (1500,)
    assert await backend.peek((tpm,), (daily,)) == ((2596,), (1500,))


async def test_settle_twice_applies_once(backend: Backend) -> None:
    daily, rpm = budget(limit=10_000), rate(limit=5)
    reservation = await backend.admit(rates=(rpm,), budgets=(daily,), input=100, output=900)
    assert (await backend.store.settle(reservation, 100, 100)).used == (200,)
    before = await backend.peek((rpm,), (daily,))
    again = await backend.store.settle(reservation, 100, 100)
    assert (again.applied, again.used, again.alerts) == (False, (200,), ())
    assert await backend.peek((rpm,), (daily,)) == before


async def test_settle_of_a_reservation_never_made_changes_nothing(backend: Backend) -> None:
    daily, tpm = budget(limit=10_000), rate("tpm", limit=1024, period=64.0, per_call=0, per_input=1, per_output=1)
    await backend.admit(rates=(tpm,), budgets=(daily,), input=10, output=90)
    before = await backend.peek((tpm,), (daily,))
    ghost = Reservation(plan(rates=(tpm,), budgets=(daily,), input=10, output=90), 90, (100,), (924,))
    settled = await backend.store.settle(ghost, 500, 500)
    assert (settled.applied, settled.used) == (False, (100,))
    assert await backend.peek((tpm,), (daily,)) == before


# -- alerts --------------------------------------------------------------------------------------------------------
async def test_each_alert_threshold_fires_once_per_window(backend: Backend) -> None:
    daily = budget(limit=1000, alert_at=(0.5, 0.8, 1.0))

    async def spend(reserve: int, actual: int, on: BudgetCounter = daily) -> tuple[tuple[int, float], ...]:
        reservation = await backend.admit(budgets=(on,), output=reserve)
        return (await backend.store.settle(reservation, 0, actual)).alerts

    assert await spend(100, 600) == ((0, 0.5),)
    assert await spend(100, 100) == ()  # 700: nothing new
    assert await spend(100, 250) == ((0, 0.8),)  # 950
    assert await spend(50, 50) == ((0, 1.0),)  # 1000
    assert await spend(0, 0) == ()  # still at 1000: nothing fires twice
    tomorrow = budget(limit=1000, alert_at=(0.5, 0.8, 1.0), window="2023-11-15")
    assert await spend(900, 850, tomorrow) == ((0, 0.5), (0, 0.8))  # a new window fires again, both at once


async def test_alerts_name_the_budget_by_its_plan_index(backend: Backend) -> None:
    quiet, loud = budget("quiet", limit=100_000), budget("loud", limit=1000, alert_at=(0.5,))
    reservation = await backend.admit(budgets=(quiet, loud), output=100)
    assert (await backend.store.settle(reservation, 0, 500)).alerts == ((1, 0.5),)


# -- peek ----------------------------------------------------------------------------------------------------------
async def test_peek_reads_fresh_counters_and_changes_nothing(backend: Backend) -> None:
    rpm, daily = rate(limit=5), budget(limit=1000)
    assert await backend.peek((rpm,), (daily,)) == ((5,), (0,))
    await backend.admit(rates=(rpm,), budgets=(daily,), input=10, output=20)
    assert await backend.peek((rpm,), (daily,)) == ((4,), (30,))
    assert await backend.peek((rpm,), (daily,)) == ((4,), (30,))
    assert await backend.peek() == ((), ())


# -- expiry --------------------------------------------------------------------------------------------------------
async def test_memory_keys_expire_with_the_clock() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    rpm, daily = rate(limit=5, period=10.0), budget(limit=1000)
    reservation = await store.reserve(plan(rates=(rpm,), budgets=(daily,), output=10))
    assert isinstance(reservation, Reservation)
    clock.now += 3 + 1  # the rate cell expires 1 s after its tat (now + 2 s)
    assert await store.peek((rpm,), (daily,), clock.now) == ((5,), (10,))
    clock.now += 600  # past the marker's ttl
    assert (await store.settle(reservation, 0, 0)).applied is False
    clock.now += daily.ttl
    assert await store.peek((rpm,), (daily,), clock.now) == ((5,), (0,))


async def test_redis_keys_carry_the_same_expiry(redis_stores: Callable[[], RedisStore],
                                                 raw_redis: redis.asyncio.Redis) -> None:
    store = redis_stores()
    rpm, daily = rate(limit=5, period=10.0), budget(limit=1000, alert_at=(0.01,))
    p = plan(rates=(rpm,), budgets=(daily,), output=10, now=NOW)
    reservation = await store.reserve(p)
    assert isinstance(reservation, Reservation)
    assert 2900 < await raw_redis.pttl(rpm.key) <= 3000  # tat (now + 2 s) + 1 s
    assert (daily.ttl - 5) * 1000 < await raw_redis.pttl(daily.key) <= daily.ttl * 1000
    assert (p.marker_ttl - 5) * 1000 < await raw_redis.pttl(p.marker) <= p.marker_ttl * 1000
    await store.settle(reservation, 0, 20)
    assert (daily.ttl - 5) * 1000 < await raw_redis.pttl(daily.alert_key) <= daily.ttl * 1000
    assert (daily.ttl - 5) * 1000 < await raw_redis.pttl(daily.key) <= daily.ttl * 1000  # kept by the settle
    assert await raw_redis.exists(p.marker) == 0


async def test_a_budget_key_gone_before_settlement_comes_back_with_its_expiry(
        redis_stores: Callable[[], RedisStore], raw_redis: redis.asyncio.Redis) -> None:
    """Settling adds to the key; one that vanished meanwhile (evicted, flushed) is recreated, never immortal."""
    store = redis_stores()
    daily = budget(limit=1000)
    reservation = await store.reserve(plan(budgets=(daily,), input=10, output=50))
    assert isinstance(reservation, Reservation)
    await raw_redis.delete(daily.key)
    settled = await store.settle(reservation, 10, 70)  # 20 more than reserved
    assert settled.used == (20,) and await raw_redis.get(daily.key) == "20"
    assert (daily.ttl - 5) * 1000 < await raw_redis.pttl(daily.key) <= daily.ttl * 1000


# -- concurrency ---------------------------------------------------------------------------------------------------
async def test_concurrent_reserves_admit_exactly_what_the_budget_covers(backend: Backend) -> None:
    daily = budget(limit=100, per_input=0, per_output=1)
    results = await asyncio.gather(*(backend.reserve(budgets=(daily,), output=100) for _ in range(50)))
    assert sum(isinstance(r, Reservation) for r in results) == 1
    assert (await backend.peek(budgets=(daily,)))[1] == (100,)


async def test_budget_holds_across_store_instances(redis_stores: Callable[[], RedisStore]) -> None:
    stores = [redis_stores() for _ in range(3)]
    daily = budget(limit=100, per_input=0, per_output=1)
    results = await asyncio.gather(*(stores[i % 3].reserve(plan(budgets=(daily,), output=100)) for i in range(50)))
    assert sum(isinstance(r, Reservation) for r in results) == 1


async def test_rate_limit_holds_across_store_instances(redis_stores: Callable[[], RedisStore]) -> None:
    stores = [redis_stores() for _ in range(3)]
    rpm = rate(limit=10, period=60.0)
    results = await asyncio.gather(*(stores[i % 3].reserve(plan(rates=(rpm,))) for i in range(30)))
    assert sum(isinstance(r, Reservation) for r in results) == 10
    assert all(r.counter == "rpm" for r in results if isinstance(r, Refusal))


# -- Redis specifics -----------------------------------------------------------------------------------------------
async def test_each_operation_is_one_round_trip(redis_stores: Callable[[], RedisStore],
                                                raw_redis: redis.asyncio.Redis) -> None:
    store = redis_stores()
    rpm, daily = rate(limit=5), budget(limit=1000)
    warm_up = await store.reserve(plan(rates=(rpm,), budgets=(daily,)))  # connects and loads both scripts
    assert isinstance(warm_up, Reservation)
    await store.settle(warm_up, 0, 0)
    await raw_redis.config_resetstat()
    reservation = await store.reserve(plan(rates=(rpm,), budgets=(daily,), input=1, output=1))
    assert isinstance(reservation, Reservation)
    await store.settle(reservation, 1, 1)
    await store.peek((rpm,), (daily,), NOW)
    stats = await raw_redis.info("commandstats")
    # The scripts' own calls are counted by Redis too; everything else came over the wire.
    ours = ("cmdstat_config", "cmdstat_info", "cmdstat_get", "cmdstat_set", "cmdstat_del", "cmdstat_incrby",
            "cmdstat_pexpire")
    assert {name: s["calls"] for name, s in stats.items() if not name.startswith(ours)} == {
        "cmdstat_evalsha": 2, "cmdstat_mget": 1}


async def test_scripts_are_reloaded_after_a_script_flush(redis_stores: Callable[[], RedisStore],
                                                        raw_redis: redis.asyncio.Redis) -> None:
    store = redis_stores()
    await store.reserve(plan(rates=(rate(),)))
    await raw_redis.script_flush()
    reservation = await store.reserve(plan(rates=(rate(),)))
    assert isinstance(reservation, Reservation) and reservation.remaining == (3,)
    assert (await store.settle(reservation, 0, 0)).applied


async def test_a_redis_error_is_store_unavailable(redis_stores: Callable[[], RedisStore],
                                                  raw_redis: redis.asyncio.Redis) -> None:
    daily = budget()
    await raw_redis.hset(daily.key, "not", "a counter")
    with pytest.raises(StoreUnavailable, match="WRONGTYPE") as caught:
        await redis_stores().reserve(plan(budgets=(daily,), output=1))
    assert isinstance(caught.value.__cause__, redis.exceptions.ResponseError)


@pytest.mark.parametrize("url", ["unix:///tmp/redis.sock", "http://127.0.0.1", "127.0.0.1:6379"])
def test_from_url_refuses_schemes_it_does_not_serve(url: str) -> None:
    with pytest.raises(ValueError, match="scheme"):
        RedisStore.from_url(url)


async def test_rediss_url_connects_over_tls() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server = RedisProcess()
    paths = {name: server.dir / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    tls_port = free_port()
    server.extra_args = ("--tls-port", str(tls_port), "--tls-cert-file", str(paths["cert"]),
                         "--tls-key-file", str(paths["key"]), "--tls-ca-cert-file", str(paths["ca"]),
                         "--tls-auth-clients", "no")
    try:
        server.start()
        store = RedisStore.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={paths['ca']}", timeout=5.0)
        try:
            assert isinstance(await store.reserve(plan(rates=(rate(),))), Reservation)
        finally:
            await store.close()
    finally:
        server.close()


# -- the two stores side by side -----------------------------------------------------------------------------------
async def test_both_stores_agree_exactly_on_a_random_workload(redis_url: str) -> None:
    """Every reply of the Redis store equals the memory store's, floats included, over a seeded random run.

    Fake time advances less than a second in all and so does the run, so no key expires in either store.
    """
    rng = random.Random(20231114)
    clock = Clock()
    memory, redis_store = MemoryStore(clock), RedisStore.from_url(redis_url, timeout=5.0, clock=clock)
    # Tight enough that every counter refuses now and then, budgets clamp, and alerts fire.
    rates = (rate("req", limit=3, period=0.1), rate("tok", limit=3000, period=0.2, per_call=0, per_input=1,
                                                        per_output=1),
             rate("loop_detection", limit=4, period=0.05, kind="loop"), rate("odd", limit=3, period=0.13))
    budgets = (budget("tokens", limit=8_000, alert_at=(0.25, 0.5, 0.9, 1.0)),
               budget("usd", limit=1_500_000, per_input=150, per_output=600, alert_at=(0.5,), unit="usd_nanos"))
    pending: list[Reservation] = []
    try:
        for _ in range(150):
            clock.now += rng.uniform(0, 0.004)
            roll = rng.random()
            if roll < 0.55:
                p = plan(rates=tuple(r for r in rates if rng.random() < 0.35),
                         budgets=tuple(b for b in budgets if rng.random() < 0.6), input=rng.randint(0, 300),
                         output=rng.randint(0, 500), min_output=rng.choice([None, 0, 1, 50]), now=clock.now)
                expected = await memory.reserve(p)
                assert await redis_store.reserve(p) == expected
                if isinstance(expected, Reservation):
                    pending.append(expected)
            elif roll < 0.9 and pending:
                reservation = rng.choice(pending)
                if rng.random() < 0.8:  # else it stays, and settling it again must change nothing
                    pending.remove(reservation)
                used_in, used_out = rng.randint(0, 400), rng.randint(0, reservation.output * 3 // 2 + 1)
                expected_settlement = await memory.settle(reservation, used_in, used_out)
                assert await redis_store.settle(reservation, used_in, used_out) == expected_settlement
            else:
                expected_peek = await memory.peek(rates, budgets, clock.now)
                assert await redis_store.peek(rates, budgets, clock.now) == expected_peek
    finally:
        await redis_store.close()


# -- retried reserves ----------------------------------------------------------------------------------------------
async def test_reserve_of_the_same_plan_twice_charges_once(backend: Backend) -> None:
    """A reserve retried after its reply was lost finds its marker: same grant, nothing charged again."""
    daily, rpm = budget(limit=1000), rate(limit=5, period=10.0, per_call=1)
    once = plan(rates=(rpm,), budgets=(daily,), input=10, output=90)
    first = await backend.store.reserve(once)
    again = await backend.store.reserve(once)
    assert isinstance(first, Reservation) and isinstance(again, Reservation)
    assert (first.output, first.used, first.remaining) == (90, (100,), (4,))
    assert (again.output, again.used, again.remaining) == (90, (100,), (4,))
    assert await backend.store.peek((rpm,), (daily,), NOW) == ((4,), (100,))
    settled = await backend.store.settle(first, 10, 20)
    assert (settled.applied, settled.used) == (True, (30,))


@pytest.mark.parametrize("refusing", ["budget", "rate"])
async def test_a_refused_reserve_leaves_no_marker_so_its_retry_is_decided_afresh(backend: Backend,
                                                                                  refusing: str) -> None:
    """A refusal charges nothing and marks nothing: retried once there is room, the same plan is charged for real
    (a marker left behind would have it reported as granted, free)."""
    daily, rpm = budget(limit=100), rate(limit=1, period=10.0, per_call=1)
    first = await backend.admit(rates=(rpm,) if refusing == "rate" else (), budgets=(daily,), output=100)
    retried = plan(rates=(rpm,) if refusing == "rate" else (), budgets=(daily,), output=40)
    assert isinstance(await backend.store.reserve(retried), Refusal)
    await backend.store.settle(first, 0, 0)  # the budget's room is back
    backend.clock.now += 10.0  # and the rate's
    retried.now = backend.clock.now
    again = await backend.store.reserve(retried)
    assert isinstance(again, Reservation) and (again.output, again.used) == (40, (40,))
    assert (await backend.peek(budgets=(daily,)))[1] == (40,)
