"""The memory store's sweep: expired cells go a slice per call, never in one pass over the whole table."""

from __future__ import annotations

import math

from gateway.limits.memory_store import SWEEP_SLICE, MemoryStore
from gateway.limits.store import Plan, RateCounter, Reservation

T0 = 1_700_000_000.0


def one_off(i: int, now: float) -> Plan:
    """A call whose only counter is a loop-detection cell of its own (its cell lives about 4 s)."""
    loop = RateCounter("loop_detection", f"agw:{{bot}}:loop:{i:032x}", 20, 60.0, 1, 0, 0, "loop")
    return Plan("bot", f"agw:{{bot}}:res:{i}", 10, (loop,), (), 0, 0, None, now, settles=False)


async def test_expired_cells_go_a_slice_per_call_and_live_ones_stay() -> None:
    store = MemoryStore(clock=lambda: T0)
    count = 10 * SWEEP_SLICE
    for i in range(count):
        assert isinstance(await store.reserve(one_off(i, T0)), Reservation)
    assert len(store._cells) == count
    later = T0 + 10  # every cell above has expired; the next sweep is due
    assert isinstance(await store.reserve(one_off(count, later)), Reservation)
    # The sweep started, listing every key, and checked one slice; then the call added its own cell.
    assert len(store._cells) == count - SWEEP_SLICE + 1
    calls = math.ceil((count + 1) / SWEEP_SLICE)
    for i in range(calls):
        await store.reserve(one_off(count + 1 + i, later))
    # Every expired cell is gone; the cells of the calls made at `later` are alive and kept.
    assert sorted(store._cells) == sorted(one_off(i, later).rates[0].key for i in range(count, count + 1 + calls))
    assert store._sweeping == []


async def test_no_sweep_before_it_is_due() -> None:
    store = MemoryStore(clock=lambda: T0)
    for i in range(SWEEP_SLICE):
        await store.reserve(one_off(i, T0))
    assert store._sweeping == []  # the first call swept an empty table; the next sweep is 5 s away
    await store.reserve(one_off(SWEEP_SLICE, T0 + 4.9))
    assert len(store._cells) == SWEEP_SLICE + 1 and store._sweeping == []
