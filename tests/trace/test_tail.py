"""The live-tail hub: fan-out to every subscriber, filters, bounded queues that drop and say so, close."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, cast

import orjson
import pytest

from gateway.trace.event import TraceEvent
from gateway.trace.tail import Subscription, TailHub

WAIT = 5.0  # seconds; a bound on waits that complete at once, never a sleep


def event(n: int, **fields: Any) -> TraceEvent:
    return TraceEvent(trace_id=f"{n:032x}", span_id=f"{n:016x}", ts=1700000000.0, **fields)


def park(subscription: Subscription) -> Coroutine[Any, Any, bytes]:
    """A read stepped by hand until it waits on the empty queue: deterministic, no scheduling involved."""
    read: Coroutine[Any, Any, bytes] = subscription.__anext__()
    waiter = read.send(None)
    assert isinstance(waiter, asyncio.Future)
    assert not waiter.done()
    return read


def finish(read: Coroutine[Any, Any, bytes]) -> bytes:
    """Resume a parked read whose waiter was woken; its result, or StopAsyncIteration."""
    try:
        read.send(None)
    except StopIteration as done:
        return cast(bytes, done.value)
    raise AssertionError("the read is still waiting")


async def read_all(subscription: Subscription) -> list[dict[str, Any]]:
    async with asyncio.timeout(WAIT):
        return [orjson.loads(line) async for line in subscription]


async def test_every_subscriber_gets_each_event_in_order() -> None:
    hub = TailHub()
    first, second = hub.subscribe(), hub.subscribe()
    for n in range(3):
        hub.emit(event(n, agent="invoice-bot", decision="allow"))
    hub.close()
    expected = [{"trace_id": f"{n:032x}", "span_id": f"{n:016x}", "ts": 1700000000.0, "agent": "invoice-bot",
                 "decision": "allow"} for n in range(3)]
    assert await read_all(first) == expected
    assert await read_all(second) == expected


async def test_waiting_subscriber_is_woken_by_emit() -> None:
    hub = TailHub()
    read = park(hub.subscribe())
    hub.emit(event(1, agent="a"))
    assert orjson.loads(finish(read))["agent"] == "a"
    hub.close()


async def test_filters_by_agent_decision_and_kind() -> None:
    hub = TailHub()
    by_agent = hub.subscribe(agent="invoice-bot")
    by_decision = hub.subscribe(decision="deny")
    both = hub.subscribe(agent="invoice-bot", decision="deny")
    calls = hub.subscribe(kind="call")
    alerts = hub.subscribe(kind="budget_alert")
    hub.emit(event(1, agent="invoice-bot", decision="allow"))
    hub.emit(event(2, agent="invoice-bot", decision="deny"))
    hub.emit(event(3, agent="research-bot", decision="deny"))
    hub.emit(event(4, agent="invoice-bot", kind="budget_alert"))
    hub.close()

    async def ids(subscription: Subscription) -> list[int]:
        return [int(e["trace_id"], 16) for e in await read_all(subscription)]

    assert await ids(by_agent) == [1, 2, 4]
    assert await ids(by_decision) == [2, 3]
    assert await ids(both) == [2]
    assert await ids(calls) == [1, 2, 3]
    assert await ids(alerts) == [4]


async def test_slow_subscriber_drops_events_and_is_told_how_many() -> None:
    hub = TailHub(maxsize=3)
    slow, fast = hub.subscribe(), hub.subscribe()
    fast_seen: list[int] = []
    for n in range(5):  # the slow one reads nothing: 3 fit, 2 are dropped
        hub.emit(event(n))
        fast_seen += [int(orjson.loads(await anext(fast))["trace_id"], 16)]
    assert slow.dropped == 2
    assert [int(orjson.loads(await anext(slow))["trace_id"], 16) for _ in range(2)] == [0, 1]
    hub.emit(event(5))  # room for the notice, then the event
    hub.emit(event(6))  # no room left: dropped, counted afresh
    hub.close()
    rest = await read_all(slow)
    assert rest == [{"trace_id": f"{2:032x}", "span_id": f"{2:016x}", "ts": 1700000000.0},
                    {"kind": "tail_dropped", "count": 2},
                    {"trace_id": f"{5:032x}", "span_id": f"{5:016x}", "ts": 1700000000.0},
                    {"kind": "tail_dropped", "count": 1}]  # the last loss is reported when the stream ends
    assert fast_seen == [0, 1, 2, 3, 4]


async def test_emit_never_waits_on_a_full_subscriber() -> None:
    hub = TailHub(maxsize=10)
    stuck = hub.subscribe()
    for n in range(10_000):  # synchronous: would deadlock or raise if emit waited for room
        hub.emit(event(n))
    assert stuck.dropped == 10_000 - 10
    hub.close()


async def test_close_ends_waiting_iterations_and_later_subscriptions() -> None:
    hub = TailHub()
    read = park(hub.subscribe())
    hub.close()
    with pytest.raises(StopAsyncIteration):
        finish(read)
    assert hub.subscribers == 0
    assert await read_all(hub.subscribe()) == []


async def test_subscription_close_unsubscribes() -> None:
    hub = TailHub()
    subscription = hub.subscribe()
    subscription.close()
    hub.emit(event(1))
    assert hub.subscribers == 0
    assert await read_all(subscription) == []


async def test_cancelled_read_loses_no_event() -> None:
    hub = TailHub()
    subscription = hub.subscribe()
    read = park(subscription)
    with pytest.raises(asyncio.CancelledError):  # as a keep-alive timeout cancels it
        read.throw(asyncio.CancelledError())
    hub.emit(event(7))
    hub.close()
    assert [e["trace_id"] for e in await read_all(subscription)] == [f"{7:032x}"]
