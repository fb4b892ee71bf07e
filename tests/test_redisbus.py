"""The Redis bus on a real redis-server: a message a handler cannot take never silences the subscription."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.redisbus import RedisBus


async def test_a_handler_failing_on_a_message_drops_only_that_message(redis_url: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    bus = RedisBus(redis_url)
    parsed: asyncio.Queue[object] = asyncio.Queue()
    others: asyncio.Queue[str] = asyncio.Queue()
    bus.subscribe("agw:test:a", lambda raw: parsed.put_nowait(orjson.loads(raw)))  # raises on bad JSON
    bus.subscribe("agw:test:a", others.put_nowait)
    bus.subscribe("agw:test:b", others.put_nowait)
    try:
        await bus.ready()
        await bus.publish("agw:test:a", "{not json")
        await bus.publish("agw:test:b", "after")
        await bus.publish("agw:test:a", '{"ok": 1}')
        async with asyncio.timeout(5):
            # The failing handler's neighbour still got the bad message, and both channels go on.
            assert [await others.get() for _ in range(3)] == ["{not json", "after", '{"ok": 1}']
            assert await parsed.get() == {"ok": 1}
        assert bus.dropped == 1
        assert parsed.empty()
        assert "agw:test:a" in caplog.text and "dropped" in caplog.text
    finally:
        await bus.close()
