"""A gateway whose Redis is down when it starts: it starts at once, fails closed, and once Redis is up it serves
and hears the other replicas again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
from conftest import RedisProcess, start_stack
from redis.asyncio import Redis

from gateway.rules_sync import CHANNEL


async def test_gateway_starts_while_redis_is_down_and_recovers_when_it_is_up(
        rules_copy: Callable[[], Path]) -> None:
    rules = rules_copy()
    redis = RedisProcess()  # its port is chosen; nothing listens there yet
    async with asyncio.timeout(3):  # a few store timeouts, not a hang on the subscriptions
        stack = await start_stack(rules, redis_url=redis.url, store_timeout=0.3)
    client = Redis.from_url(redis.url, decode_responses=True)
    try:
        async with aiohttp.ClientSession() as http:
            async def pay() -> tuple[int, str]:
                async with http.post(f"{stack.url}/erp/payments", json={"vendor": "v-100", "amount": 500},
                                     headers={"Authorization": f"Bearer {stack.token('invoice-bot')}"}) as response:
                    body = await response.json()
                    return response.status, body.get("error", {}).get("type", "")

            assert await pay() == (503, "store_unavailable")
            redis.start()
            async with asyncio.timeout(10):
                while await pay() != (201, ""):  # the store reconnects on a later call
                    pass
            # The rules broadcast has no periodic re-read: a reload told by another replica is heard only if the
            # subscription came back. PUBLISH answers how many subscribers got it.
            agent = rules / "agents" / "ops-bot.yaml"
            agent.write_text(agent.read_text().replace("mode: audit", "mode: assist"))
            message = orjson.dumps({"action": "reload", "by": "ops", "origin": "another-replica"}).decode()
            async with asyncio.timeout(10):
                while not await client.publish(CHANNEL, message):
                    pass
            loaded = await stack.trace.wait_for(lambda e: e.get("kind") == "rules_loaded", limit=5)
            assert (loaded["detail"]["source"], loaded["detail"]["by"]) == ("replica", "ops via another-replica")
    finally:
        await client.aclose()
        await stack.gateway.close()
        await stack.fakes.close()
        redis.close()
