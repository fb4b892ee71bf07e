"""Every replica converges on one rule version: reloads and rollbacks are broadcast (Redis), and each replica
reports the version it serves, so `GET /rules` shows them all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any

import orjson

from .errors import StoreUnavailable
from .redis_calls import bounded
from .redis_urls import redis_client
from .redisbus import RedisBus
from .reload import Reloader, Served
from .tasks import stop

CHANNEL = "agw:control:rules"
REPLICAS_KEY = "agw:{control}:replicas"
HEARTBEAT = 10.0  # seconds between reports; a replica silent for three of them is gone


class RulesSync:
    """Without Redis there is one replica and nothing to broadcast."""

    def __init__(self, reloader: Reloader, spawn: Callable[[Coroutine[Any, Any, Any]], None]) -> None:
        self.reloader = reloader
        self.spawn = spawn
        self.id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"

    async def start(self) -> None: ...

    async def broadcast(self, action: str, by: str, version: str | None = None) -> None: ...

    def _me(self, served: Served) -> dict[str, Any]:
        return {"replica": self.id, **asdict(served), "at": time.time()}

    async def replicas(self) -> list[dict[str, Any]]:
        return [self._me(self.reloader.current)]

    async def close(self) -> None: ...


class RedisRulesSync(RulesSync):
    def __init__(self, reloader: Reloader, spawn: Callable[[Coroutine[Any, Any, Any]], None], url: str,
                 timeout: float) -> None:
        super().__init__(reloader, spawn)
        self._client = redis_client(url, socket_timeout=timeout, connect_timeout=timeout, decode_responses=True)
        self._bus = RedisBus(url, timeout)
        self._timeout = timeout
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._bus.subscribe(CHANNEL, self._heard)
        self.reloader.on_swap.append(lambda _served: self.spawn(self._report()))
        with contextlib.suppress(StoreUnavailable):  # Redis down at start: serve, and subscribe when it is back
            await self._bus.ready(self._timeout)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    def _heard(self, raw: str) -> None:
        message = orjson.loads(raw)
        if message.get("origin") == self.id:
            return
        by = f"{message.get('by', '?')} via {message.get('origin', '?')}"
        if message.get("action") == "reload":
            self.spawn(self.reloader.reload("replica", by))
        elif message.get("action") == "rollback":
            with contextlib.suppress(KeyError):  # a replica that never served that version keeps its own
                self.reloader.rollback(str(message.get("version")), by, "replica")

    async def broadcast(self, action: str, by: str, version: str | None = None) -> None:
        message = orjson.dumps({"action": action, "by": by, "version": version, "origin": self.id}).decode()
        await bounded("broadcast rules", self._client.publish(CHANNEL, message), self._timeout)

    async def _report(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await bounded("report rules version", self._client.hset(
                REPLICAS_KEY, self.id, orjson.dumps(self._me(self.reloader.current)).decode()), self._timeout)

    async def _beat(self) -> None:
        while True:
            await self._report()
            await asyncio.sleep(HEARTBEAT)  # the reporting period

    async def replicas(self) -> list[dict[str, Any]]:
        entries: dict[Any, Any] = await bounded("read replicas", self._client.hgetall(REPLICAS_KEY), self._timeout)
        fresh = time.time() - 3 * HEARTBEAT
        seen = [orjson.loads(raw) for raw in entries.values()]
        return sorted((r for r in seen if r["at"] >= fresh), key=lambda r: str(r["replica"]))

    async def close(self) -> None:
        await stop(self._heartbeat)
        with contextlib.suppress(StoreUnavailable):
            await bounded("leave replicas", self._client.hdel(REPLICAS_KEY, self.id), self._timeout)
        await self._bus.close()
        await self._client.aclose()
