"""Budget alerts: a trace event, and a JSON POST to an optional webhook, retried off the request path."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from ..trace.event import TraceEvent, new_span_id, new_trace_id
from ..trace.sinks import TraceSink
from .store import BudgetCounter


class Alerts:
    """`fire` never waits: it records the alert and queues the webhook delivery for a background task."""

    def __init__(self, sink: TraceSink, session: aiohttp.ClientSession, webhook_url: str | None = None,
                 attempts: int = 5, backoff: float = 0.5) -> None:
        self.sink = sink
        self.session = session
        self.webhook_url = webhook_url
        self.attempts = attempts
        self.backoff = backoff
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def fire(self, agent: str, budget: BudgetCounter, threshold: float, used: int) -> None:
        state = budget.state(used)
        payload = {"type": "budget_alert", "agent": agent, "budget": state, "threshold": threshold}
        event = TraceEvent(trace_id=new_trace_id(), span_id=new_span_id(), kind="budget_alert", agent=agent,
                           budget=state, reason=f"budget {budget.id} reached {threshold:.0%} of its limit "
                                                f"for {budget.window}", detail={"threshold": threshold})
        self.sink.emit(event)
        if self.webhook_url:
            self._queue.put_nowait(payload)
            if self._worker is None or self._worker.done():
                self._worker = asyncio.get_running_loop().create_task(self._deliver())

    async def _deliver(self) -> None:
        while not self._queue.empty():
            payload = self._queue.get_nowait()
            if not await self._post(payload):
                self.sink.emit(TraceEvent(
                    trace_id=new_trace_id(), span_id=new_span_id(), kind="alert_undelivered",
                    agent=payload["agent"], budget=payload["budget"],
                    reason=f"webhook did not accept the alert after {self.attempts} attempts"))

    async def _post(self, payload: dict[str, Any]) -> bool:
        assert self.webhook_url is not None
        for attempt in range(self.attempts):
            try:
                async with self.session.post(self.webhook_url, json=payload,
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
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
