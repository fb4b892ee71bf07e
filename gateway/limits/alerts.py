"""Budget alerts: a trace event, and a JSON POST to an optional webhook, retried off the request path."""

from __future__ import annotations

from typing import Any

import aiohttp

from ..trace.event import TraceEvent, new_span_id, new_trace_id
from ..trace.sinks import TraceSink
from ..webhooks import WebhookPoster
from .store import BudgetCounter


class Alerts:
    """`fire` never waits: it records the alert and queues the webhook delivery."""

    def __init__(self, sink: TraceSink, session: aiohttp.ClientSession, webhook_url: str | None = None,
                 attempts: int = 5, backoff: float = 0.5) -> None:
        self.sink = sink
        self.poster = WebhookPoster(session, webhook_url, attempts, backoff, on_give_up=self._undelivered)

    def fire(self, agent: str, budget: BudgetCounter, threshold: float, used: int) -> None:
        state = budget.state(used)
        self.sink.emit(TraceEvent(trace_id=new_trace_id(), span_id=new_span_id(), kind="budget_alert", agent=agent,
                                  budget=state, reason=f"budget {budget.id} reached {threshold:.0%} of its limit "
                                                       f"for {budget.window}", detail={"threshold": threshold}))
        self.poster.post({"type": "budget_alert", "agent": agent, "budget": state, "threshold": threshold})

    def _undelivered(self, payload: dict[str, Any]) -> None:
        self.sink.emit(TraceEvent(
            trace_id=new_trace_id(), span_id=new_span_id(), kind="alert_undelivered", agent=payload["agent"],
            budget=payload["budget"], reason=f"webhook did not accept the alert after {self.poster.attempts} attempts"))

    async def close(self, grace: float = 5.0) -> None:
        await self.poster.close(grace)
