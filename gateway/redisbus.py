"""One Redis pub/sub connection per process, shared by the parts that must hear other replicas at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from .errors import StoreUnavailable
from .redis_urls import ClusterClient, redis_client
from .tasks import stop

log = logging.getLogger(__name__)


class RedisBus:
    """Delivers messages of subscribed channels to callbacks; reconnects and resubscribes by itself.

    Messages published while the connection is down are lost: subscribers must also re-read what they wait
    for now and then (their safety net), and `on_reconnect` callbacks run after every reconnect.
    """

    def __init__(self, url: str, connect_timeout: float = 1.0) -> None:
        # No read timeout: a subscription waits for messages indefinitely; health checks PING it instead.
        # On a cluster, PUBLISH reaches every node, so one subscription on any node hears all of it.
        self._client = redis_client(url, socket_timeout=None, connect_timeout=connect_timeout,
                                    health_check_interval=10, decode_responses=True)
        self._handlers: dict[str, list[Callable[[str], None]]] = {}
        self.on_reconnect: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.dropped = 0  # messages a handler failed on

    def subscribe(self, channel: str, handler: Callable[[str], None]) -> None:
        self._handlers.setdefault(channel, []).append(handler)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def ready(self, limit: float = 5.0) -> None:
        """Until the subscription is live (so a message published after this is heard); `StoreUnavailable` if it
        is not within `limit` seconds (it keeps trying in the background)."""
        try:
            async with asyncio.timeout(limit):
                await self._ready.wait()
        except TimeoutError as exc:
            raise StoreUnavailable(f"redis subscription: not live within {limit:g}s") from exc

    async def publish(self, channel: str, message: str) -> None:
        await self._client.publish(channel, message)

    async def _run(self) -> None:
        delay = 0.1
        first = True
        while True:
            pubsub = None
            try:
                if isinstance(self._client, ClusterClient):
                    # The slot map, from which the pub/sub picks its node: read afresh on every reconnect, or after
                    # a failover the subscription would go on picking the dead master.
                    await self._client.reload_slots()
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(*self._handlers)
                self._ready.set()
                if not first:
                    for callback in self.on_reconnect:
                        callback()
                first, delay = False, 0.1
                async for message in pubsub.listen():
                    self._deliver(message["channel"], message["data"])
            except (RedisError, OSError):
                self._ready.clear()
                await asyncio.sleep(delay)  # back off while Redis is away
                delay = min(delay * 2, 2.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py

    def _deliver(self, channel: str, data: str) -> None:
        """Each handler on its own: a message one cannot take (bad JSON from a foreign publisher) is dropped
        and reported, and the subscription goes on for everyone; it must never end the bus."""
        for handler in self._handlers.get(channel, ()):
            try:
                handler(data)
            except Exception:  # whatever a handler raises: the others, and later messages, still get through
                self.dropped += 1
                log.exception("redis bus: a handler of channel %r failed on a message; the message is dropped",
                              channel)

    async def close(self) -> None:
        await stop(self._task)
        await self._client.aclose()
