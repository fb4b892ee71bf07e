"""Webhook delivery: JSON POSTs queued and retried with back-off by a background task, never on a request path."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aiohttp

from .tasks import stop


class WebhookPoster:
    """`post` never waits. A delivery that fails every attempt is reported to `on_give_up`."""

    def __init__(self, session: aiohttp.ClientSession, url: str | None, attempts: int = 5, backoff: float = 0.5,
                 on_give_up: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.session = session
        self.url = url
        self.attempts = attempts
        self.backoff = backoff
        self.on_give_up = on_give_up
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def post(self, payload: dict[str, Any]) -> None:
        if not self.url:
            return
        self._queue.put_nowait(payload)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._deliver())

    async def _deliver(self) -> None:
        while not self._queue.empty():
            payload = self._queue.get_nowait()
            if not await self._post(payload) and self.on_give_up is not None:
                self.on_give_up(payload)

    async def _post(self, payload: dict[str, Any]) -> bool:
        assert self.url is not None
        for attempt in range(self.attempts):
            try:
                async with self.session.post(self.url, json=payload,
                                             timeout=aiohttp.ClientTimeout(total=5)) as response:
                    if response.status < 300:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                pass
            if attempt + 1 < self.attempts:
                await asyncio.sleep(self.backoff * 2**attempt)  # back off between attempts, not to synchronise
        return False

    async def close(self, grace: float = 5.0) -> None:
        """Give queued deliveries `grace` seconds, then stop."""
        if self._worker is not None and not self._worker.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._worker), grace)
            await stop(self._worker)
