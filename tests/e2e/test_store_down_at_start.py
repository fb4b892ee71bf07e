"""A gateway whose Redis (one server, or a cluster) is down when it starts: it starts at once, fails closed, and
once Redis is up it serves and hears the other replicas again. (redis-py's "cluster cannot be connected" error is
not a `RedisError`: it used to crash the start-up.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from conftest import RedisClusterProcesses, RedisProcess, start_stack
from redis.asyncio import Redis, RedisCluster

from gateway.redis_urls import redis_client
from gateway.rules_sync import CHANNEL


@dataclass
class DownStore:
    """A Redis whose ports are chosen but where nothing listens yet."""

    url: str
    start: Callable[[], None]
    publish: Callable[[str], Awaitable[int]]  # the number of subscribers that got the message
    close: Callable[[], None]


def one_server() -> DownStore:
    redis = RedisProcess()

    async def publish(message: str) -> int:
        client = Redis.from_url(redis.url)
        try:
            return int(await client.publish(CHANNEL, message))
        finally:
            await client.aclose()

    return DownStore(redis.url, redis.start, publish, redis.close)


def cluster() -> DownStore:
    nodes = RedisClusterProcesses()

    async def publish(message: str) -> int:
        client = redis_client(nodes.url, socket_timeout=2.0, connect_timeout=2.0)
        assert isinstance(client, RedisCluster)
        try:
            await client.initialize()
            # On a cluster PUBLISH counts the subscribers of the node it reached: the node the gateway's
            # subscription picks, the one of the channel's slot.
            node = client.get_node_from_key(CHANNEL)
            return int(await client.execute_command("PUBLISH", CHANNEL, message, target_nodes=node))
        finally:
            await client.aclose()

    return DownStore(nodes.url, nodes.start, publish, nodes.close)


@pytest.mark.parametrize("down", [one_server, cluster], ids=["redis", "cluster"])
async def test_gateway_starts_while_redis_is_down_and_recovers_when_it_is_up(
        rules_copy: Callable[[], Path], down: Callable[[], DownStore]) -> None:
    rules = rules_copy()
    store = down()
    try:
        async with asyncio.timeout(3):  # a few store timeouts, not a hang on the subscriptions
            stack = await start_stack(rules, redis_url=store.url, store_timeout=0.3)
        try:
            async with aiohttp.ClientSession() as http:
                async def pay() -> tuple[int, str]:
                    async with http.post(f"{stack.url}/erp/payments", json={"vendor": "v-100", "amount": 500},
                                         headers={"Authorization": f"Bearer {stack.token('invoice-bot')}"}) as response:
                        body = await response.json()
                        return response.status, body.get("error", {}).get("type", "")

                assert await pay() == (503, "store_unavailable")
                await asyncio.to_thread(store.start)
                async with asyncio.timeout(10):
                    while await pay() != (201, ""):  # the store reconnects on a later call
                        pass
            # The rules broadcast has no periodic re-read: a reload told by another replica is heard only if the
            # subscription came back.
            agent = rules / "agents" / "ops-bot.yaml"
            agent.write_text(agent.read_text().replace("mode: audit", "mode: assist"))
            message = orjson.dumps({"action": "reload", "by": "ops", "origin": "another-replica"}).decode()
            async with asyncio.timeout(10):
                while not await store.publish(message):
                    pass
            loaded = await stack.trace.wait_for(lambda e: e.get("kind") == "rules_loaded", limit=5)
            assert (loaded["detail"]["source"], loaded["detail"]["by"]) == ("replica", "ops via another-replica")
        finally:
            await stack.gateway.close()
            await stack.fakes.close()
    finally:
        store.close()
