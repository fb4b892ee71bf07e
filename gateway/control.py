"""The kill switch: which agents are paused. Read per request from a local view; every replica converges on the
store within a second (Redis: a published change at once, and a full re-read every second as the safety net)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis.asyncio import RedisCluster

from .errors import StoreUnavailable
from .redis_calls import bounded
from .redis_urls import redis_client
from .redisbus import RedisBus
from .tasks import stop

PAUSED_KEY = "agw:{control}:paused"
CHANNEL = "agw:control:paused"
REFRESH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Pause:
    by: str
    reason: str
    at: float

    def public(self) -> dict[str, Any]:
        return asdict(self)


Listener = Callable[[str, Pause | None], None]


class Control:
    """`paused` is a dict lookup; `pause`/`resume` write through to the backend and tell every replica."""

    def __init__(self) -> None:
        self._paused: dict[str, Pause] = {}
        self.listeners: list[Listener] = []  # (agent, pause or None) on every change seen by this replica

    def paused(self, agent: str) -> Pause | None:
        return self._paused.get(agent)

    def _apply(self, agent: str, pause: Pause | None) -> None:
        if self._paused.get(agent) == pause:
            return
        if pause is None:
            self._paused.pop(agent, None)
        else:
            self._paused[agent] = pause
        for listener in self.listeners:
            listener(agent, pause)

    async def start(self) -> None: ...

    async def pause(self, agent: str, by: str, reason: str) -> Pause:
        pause = Pause(by, reason, time.time())
        self._apply(agent, pause)
        return pause

    async def resume(self, agent: str) -> None:
        self._apply(agent, None)

    async def close(self) -> None: ...


class RedisControl(Control):
    def __init__(self, url: str, timeout: float = 1.0) -> None:
        super().__init__()
        self._client = redis_client(url, socket_timeout=timeout, connect_timeout=timeout, decode_responses=True)
        self._bus = RedisBus(url, timeout)
        self._timeout = timeout
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribed first, then read: a change made in between is heard, not left to the next re-read."""
        self._bus.subscribe(CHANNEL, lambda _agent: self._refresh_soon())
        with contextlib.suppress(StoreUnavailable):  # Redis down at start: the bus and the refresher keep trying
            await self._bus.ready(self._timeout)
        with contextlib.suppress(StoreUnavailable):
            await self._refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_every_second())

    async def _call(self, what: str, operation: Any) -> Any:
        return await bounded(what, operation, self._timeout)

    async def _refresh(self) -> None:
        entries: dict[str, str] = await self._call("read paused agents", self._client.hgetall(PAUSED_KEY))
        seen = {agent: Pause(**orjson.loads(raw)) for agent, raw in entries.items()}
        for agent in set(self._paused) - set(seen):
            self._apply(agent, None)
        for agent, pause in seen.items():
            self._apply(agent, pause)

    def _refresh_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._refresh())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # errors: the next refresh retries

    async def _refresh_every_second(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)  # the safety net's period, not synchronisation
            with contextlib.suppress(StoreUnavailable):
                await self._refresh()

    async def pause(self, agent: str, by: str, reason: str) -> Pause:
        pause = Pause(by, reason, time.time())
        record = orjson.dumps(pause.public()).decode()
        await self._write("pause agent", ("HSET", PAUSED_KEY, agent, record), agent)
        self._apply(agent, pause)
        return pause

    async def _write(self, what: str, change: tuple[str, ...], agent: str) -> None:
        """The change (one command) and its announcement in one transaction. On a cluster the announcement follows
        the change, which every replica's re-read then sees: PUBLISH has no slot to join a MULTI, and redis-py's
        cluster MULTI queues each command on a throwaway event loop in a thread, leaving connections bound to it."""
        if isinstance(self._client, RedisCluster):
            await self._call(what, self._client.execute_command(*change))
            await self._call(what, self._client.publish(CHANNEL, agent))
            return
        pipe = self._client.pipeline(transaction=True)
        pipe.execute_command(*change)
        pipe.publish(CHANNEL, agent)
        await self._call(what, pipe.execute())

    async def resume(self, agent: str) -> None:
        await self._write("resume agent", ("HDEL", PAUSED_KEY, agent), agent)
        self._apply(agent, None)

    async def close(self) -> None:
        await stop(self._refresher)
        await self._bus.close()
        await self._client.aclose()


def open_control(redis_url: str | None, timeout: float) -> Control:
    return RedisControl(redis_url, timeout) if redis_url else Control()
