"""What the Redis store computes on the scripts' behalf; the scripts' behaviour is the contract suite's."""

from __future__ import annotations

from dataclasses import replace

import hiredis
import pytest

from gateway.limits.redis_store import RedisStore, _px, _Wire, reserve_arguments, settle_arguments
from gateway.limits.store import BudgetCounter, Plan, RateCounter, Reservation, StoreUnavailable


@pytest.mark.parametrize(("seconds", "px"), [
    (86_400, 86_400_000), (10, 10_000), (2.5, 2500), (1.0005, 1001), (0.0001, 1), (0, 1), (-3, 1),
])
def test_px_is_whole_milliseconds_rounded_up_and_at_least_one(seconds: float, px: int) -> None:
    assert _px(seconds) == px


def _plans() -> list[Plan]:
    tag = "agw:{bot}"
    day = BudgetCounter("tokens-day", f"{tag}:b:tokens-day:2026-11-21", f"{tag}:a:tokens-day:2026-11-21", 10**12, 1,
                        1, "2026-11-21", 1795305600.0, 90061, (), "tokens")
    usd = BudgetCounter("usd-month", f"{tag}:b:usd:2026-11", f"{tag}:a:usd:2026-11", 10**15, 150, 600, "2026-11",
                        1796083200.0, 864000, (0.5, 0.8, 0.95), "usd_nanos")
    rpm = RateCounter("rpm", f"{tag}:rl:rpm", 1000, 60.0, 1, 0, 0)
    tpm = RateCounter("tpm", f"{tag}:rl:tpm", 10**9, 60.0, 0, 1, 1)
    loop = RateCounter("loop_detection", f"{tag}:loop:{'ab' * 16}", 20, 60.0, 1, 0, 0, "loop")
    now = 1795304925.1726232
    return [
        Plan("bot", f"{tag}:res:0a1", 172800, (loop, rpm, tpm), (day, usd), 20, 64, None, now),
        Plan("bot", f"{tag}:res:0a2", 172800, (rpm, tpm), (usd,), 0, 0, 1, now + 0.5),
        Plan("bot", f"{tag}:res:0a3", 10, (loop, rpm), (), 0, 0, None, now, settles=False),
        Plan("bot", f"{tag}:res:0a4", 172800, (), (day,), 12345, 4096, 1, 1795300000.0),
    ]


@pytest.mark.parametrize("shaped", [False, True])
@pytest.mark.parametrize("index", range(4))
def test_packed_script_calls_are_byte_for_byte_hiredis_packing_of_the_arguments(index: int, shaped: bool) -> None:
    wire = _Wire("r" * 40, "s" * 40)
    plan = _plans()[index]
    if shaped:
        plan = replace(plan, shape=object())
    for call in range(2):  # with a shape, the second time from its kept layout
        if call and plan.rates and plan.rates[0].kind == "loop":  # the next call's loop detector: another key
            plan = replace(plan, rates=(replace(plan.rates[0], key=f"agw:{{bot}}:loop:{'cd' * 16}"),
                                        *plan.rates[1:]), marker=plan.marker + "b", now=plan.now + 0.25)
        keys, args = reserve_arguments(plan)
        assert wire.reserve(plan) == hiredis.pack_command(("EVALSHA", "r" * 40, len(keys), *keys, *args))
        for used in ((20, 1), (plan.input, plan.output), (0, 0), (10**6, 10**6)):
            reservation = Reservation(plan, plan.output, (), ())
            keys, args = settle_arguments(reservation, *used, 1795304999.25)
            assert wire.settle(reservation, *used, 1795304999.25) == hiredis.pack_command(
                ("EVALSHA", "s" * 40, len(keys), *keys, *args))


def test_a_kept_layout_follows_the_shape_object_not_its_id() -> None:
    wire = _Wire("r" * 40, "s" * 40)
    plan = replace(_plans()[1], shape=object())
    stale = replace(plan, rates=(replace(plan.rates[0], key="agw:{bot}:rl:stale"), *plan.rates[1:]), shape=object())
    # As if a shape gone since had had this one's id: its layout must not be taken for this one's.
    wire._layouts[id(plan.shape)] = (stale.shape, wire._new_layout(stale))
    packed = wire.reserve(plan)
    assert b"rl:stale" not in packed and b"agw:{bot}:rl:rpm" in packed


class _BrokenCluster:
    """A cluster client whose call fails the way redis-py lets an SSL write to a closed transport fail."""

    async def execute_command(self, *args: object) -> object:
        raise AttributeError("'NoneType' object has no attribute '_write_appdata'")


async def test_a_client_failure_that_is_not_a_redis_error_is_still_the_store_unavailable() -> None:
    store = RedisStore(_BrokenCluster(), timeout=1.0)  # type: ignore[arg-type]
    plan = _plans()[1]
    with pytest.raises(StoreUnavailable, match="AttributeError"):
        await store.reserve(plan)
    with pytest.raises(StoreUnavailable, match="AttributeError"):
        await store.settle(Reservation(plan, plan.output, (), ()), 1, 1)
