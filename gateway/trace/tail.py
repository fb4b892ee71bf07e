"""Live tail: a trace sink that keeps no history and hands each event to whoever is watching right now.

`emit` never blocks or awaits: each subscriber has a bounded queue, and one that falls behind loses events
and is told how many (a `tail_dropped` record) instead of slowing the gateway down.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import orjson
from aiohttp import web

from .event import TraceEvent

DEFAULT_QUEUE = 1000
CALL = "call"  # the `kind` filter for ordinary calls, whose events carry no `kind`


class Subscription:
    """Events matching the filters, as JSON bytes, in emit order; iteration ends when the hub or this closes."""

    def __init__(self, hub: TailHub, agent: str | None, decision: str | None, kind: str | None,
                 maxsize: int) -> None:
        self.hub = hub
        self.agent = agent
        self.decision = decision
        self.kind = kind
        self.maxsize = maxsize
        self.dropped = 0  # events lost since the last `tail_dropped` record was queued
        self._items: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def matches(self, record: dict[str, Any]) -> bool:
        if self.agent is not None and record.get("agent") != self.agent:
            return False
        if self.decision is not None and record.get("decision") != self.decision:
            return False
        return self.kind is None or record.get("kind", CALL) == self.kind

    def offer(self, line: bytes) -> None:
        """Queue one event, or count it as dropped when the subscriber is behind (never waits)."""
        if self.closed:
            return
        if self.dropped and len(self._items) < self.maxsize:
            # The notice takes the place of what was lost, so it sits between the events on either side.
            self._report_dropped()
        if len(self._items) >= self.maxsize:
            self.dropped += 1
            return
        self._items.append(line)
        self._wake()

    def _report_dropped(self) -> None:
        self._items.append(orjson.dumps({"kind": "tail_dropped", "count": self.dropped}))
        self.dropped = 0

    def close(self) -> None:
        """Stop receiving; iteration ends once what is already queued (and a last drop count) has been read."""
        if not self.closed:
            self.closed = True
            if self.dropped:
                self._report_dropped()
            self.hub.unsubscribe(self)
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes:
        # Safe to cancel (e.g. under a keep-alive timeout): nothing is taken off the queue until it is returned.
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class TailHub:
    """The trace sink behind `GET /traces/stream`: fans events out to subscribers, keeps nothing."""

    def __init__(self, maxsize: int = DEFAULT_QUEUE) -> None:
        self.maxsize = maxsize
        self._subscribers: list[Subscription] = []
        self.closed = False

    def subscribe(self, agent: str | None = None, decision: str | None = None,
                  kind: str | None = None) -> Subscription:
        """`kind`: None for every record, `call` for calls only, or a record kind such as `budget_alert`."""
        subscription = Subscription(self, agent, decision, kind, self.maxsize)
        if self.closed:
            subscription.closed = True
        else:
            self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def emit(self, event: TraceEvent) -> None:
        if not self._subscribers:
            return
        record = event.to_dict()
        line: bytes | None = None  # serialised once, and only if someone wants it
        for subscription in self._subscribers:
            if subscription.matches(record):
                if line is None:
                    line = orjson.dumps(record, default=str)
                subscription.offer(line)

    def close(self) -> None:
        self.closed = True
        for subscription in list(self._subscribers):
            subscription.close()


TAIL: web.AppKey[TailHub] = web.AppKey("tail", TailHub)
