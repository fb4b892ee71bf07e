"""The limit stage: reserve before forwarding (fail closed if the store is down), settle with real usage after."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from ..account import Usage
from ..errors import GatewayError
from ..models import Action
from ..policy.spec import UpstreamSpec
from ..tasks import stop
from ..trace.event import TraceEvent, new_span_id, new_trace_id
from ..trace.sinks import TraceSink
from .memory_store import MemoryStore
from .plan import Planner
from .store import BudgetCounter, RateCounter, Refusal, Reservation, Settlement, Store, StoreUnavailable


def refusal_error(refusal: Refusal, reservation_plan_budgets: dict[str, float]) -> GatewayError:
    """The agent's 429, with an honest Retry-After (whole seconds, rounded up)."""
    retry = max(1, math.ceil(refusal.retry_after))
    headers = {"Retry-After": str(retry)}
    if refusal.detail == "loop_detected":
        return GatewayError("rate_limited", f"loop detected: the same call was repeated too often; retry in {retry}s",
                            rule=refusal.counter, headers=headers, detail="loop_detected")
    if refusal.type == "rate_limited":
        return GatewayError("rate_limited", f"rate limit {refusal.counter} reached; retry in {retry}s",
                            rule=refusal.counter, headers=headers)
    resets = reservation_plan_budgets.get(refusal.counter, time.time() + refusal.retry_after)
    at = datetime.fromtimestamp(resets, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return GatewayError("budget_exceeded", f"budget {refusal.counter} cannot cover this call's expected cost; "
                                           f"it resets at {at}", rule=refusal.counter, headers=headers)


def _record_budget(event: TraceEvent, budgets: tuple[BudgetCounter, ...], used: tuple[int, ...]) -> None:
    """The tightest budget, for the trace (at reservation, and again with the settled usage)."""
    tightest, fill = 0, -1.0
    for i, budget in enumerate(budgets):
        ratio = used[i] / (budget.limit if budget.limit > 1 else 1)
        if ratio > fill:
            tightest, fill = i, ratio
    event.budget = budgets[tightest].state(used[tightest])


def _record(event: TraceEvent, reservation: Reservation) -> None:
    """The tightest rate limit after a reservation, for the trace. The budget is the settlement's to record: a
    reservation that holds budgets always settles (or is queued to), and records what it knows then."""
    plan = reservation.plan
    best: RateCounter | None = None
    best_left, best_share = 0, 0.0
    for rate, left in zip(plan.rates, reservation.remaining):  # noqa: B905 (hot; one per rate)
        if rate.kind == "rate" and (best is None or left / rate.limit < best_share):
            best, best_left, best_share = rate, left, left / rate.limit
    if best is not None:
        event.rate_limit = {"id": best.id, "remaining": best_left, "limit": best.limit}


def _note(event: TraceEvent, note: str) -> None:
    event.limits = [*(event.limits or []), note]


async def reserve(store: Store, planner: Planner, action: Action, upstream: UpstreamSpec, repeat: str,
                  event: TraceEvent, settler: Settler | None = None) -> Reservation | None:
    """Reserve the call's expected cost on every counter it touches, or raise the refusal."""
    planned = planner.plan(action, upstream, repeat, time.time())
    for note in planned.notes:
        _note(event, note)
    if planned.plan is None:
        return None
    plan = planned.plan
    try:
        result = await store.reserve(plan)
    except (StoreUnavailable, asyncio.CancelledError) as exc:
        if settler is not None and plan.settles and plan.min_output is None:
            # A reserve that timed out, or whose caller hung up, may still run in the store: queue its release,
            # which applies only if the reservation marker exists (a no-op when the reserve never ran).
            settler.release_later(Reservation(plan, plan.output, (), ()))
        if isinstance(exc, asyncio.CancelledError):
            raise
        if upstream.on_store_error == "allow":
            _note(event, f"limits store unavailable ({exc}); admitted unmetered: upstream {upstream.name!r} "
                         "sets on_store_error: allow")
            return None
        raise GatewayError("store_unavailable", "the limits store is unreachable, so the gateway fails closed; "
                                                "retry shortly") from exc
    if isinstance(result, Refusal):
        raise refusal_error(result, {b.id: b.resets_at for b in plan.budgets})
    _record(event, result)
    if result.output < plan.output:
        _note(event, f"max_tokens clamped from {plan.output} to {result.output} by the budget")
    return result


class Settler:
    """Settles reservations; one that fails (store down) is retried in the background until it applies.

    Settling is idempotent (the reservation marker), so a retry can never charge twice.
    """

    def __init__(self, store: Store, sink: TraceSink,
                 on_settled: Callable[[Reservation, Settlement], None]) -> None:
        self.store = store
        self.sink = sink
        self.on_settled = on_settled
        # The in-process store never suspends, so its settlement can run inline, where no cancellation can land
        # mid-way; a store across the network settles from a task of its own (settle_soon).
        self.inline = isinstance(store, MemoryStore)
        self.ordered = store.ordered
        self._pending: list[tuple[Reservation, int, int]] = []
        self._worker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # settle_soon tasks, kept referenced until done

    async def settle(self, reservation: Reservation, input_tokens: int, output_tokens: int,
                     event: TraceEvent) -> None:
        try:
            settlement = await self.store.settle(reservation, input_tokens, output_tokens)
        except StoreUnavailable as exc:
            _note(event, f"limits store unavailable at settlement ({exc}): queued, retried until it applies")
            if reservation.plan.budgets:  # all the trace can show of them: the reservation's totals
                _record_budget(event, reservation.plan.budgets, reservation.used)
            self._pending.append((reservation, input_tokens, output_tokens))
            if self._worker is None or self._worker.done():
                self._worker = asyncio.get_running_loop().create_task(self._retry())
            return
        if reservation.plan.budgets:  # the rate limits' room was recorded at reservation
            # A settlement that did not apply (already settled, or its marker gone) leaves the reservation's totals.
            _record_budget(event, reservation.plan.budgets,
                           settlement.used if settlement.applied else reservation.used)
        if settlement.applied:
            self.on_settled(reservation, settlement)

    async def _retry(self, first_delay: float = 0.5, max_delay: float = 30.0) -> None:
        delay = first_delay
        while self._pending:
            await asyncio.sleep(delay)  # back-off between attempts against a store that is down
            still: list[tuple[Reservation, int, int]] = []
            for reservation, input_tokens, output_tokens in self._pending:
                try:
                    settlement = await self.store.settle(reservation, input_tokens, output_tokens)
                except StoreUnavailable:
                    still.append((reservation, input_tokens, output_tokens))
                    continue
                if settlement.applied:
                    self.on_settled(reservation, settlement)
            self._pending = still
            delay = min(delay * 2, max_delay)

    def release_later(self, reservation: Reservation) -> None:
        """Queue a zero-usage settlement for the background retries (see `reserve`)."""
        self._pending.append((reservation, 0, 0))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._retry())

    def settle_soon(self, reservation: Reservation, input_tokens: int, output_tokens: int,
                    event: TraceEvent) -> asyncio.Task[None]:
        """Settle from a task of its own, which a cancelled caller cannot interrupt."""
        task = asyncio.get_running_loop().create_task(self.settle(reservation, input_tokens, output_tokens, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_idle(self) -> None:
        """Until running settlements and background retries have nothing left (or stopped)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._worker is not None:
            await asyncio.shield(self._worker)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def close(self) -> None:
        """One last attempt; whatever still cannot be settled is written to the trace, never dropped."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await stop(self._worker)
        for reservation, input_tokens, output_tokens in self._pending:
            with contextlib.suppress(StoreUnavailable):
                await self.store.settle(reservation, input_tokens, output_tokens)
                continue
            self.sink.emit(TraceEvent(
                trace_id=new_trace_id(), span_id=new_span_id(), kind="settlement_pending",
                agent=reservation.plan.agent, reason="the limits store was unreachable until shutdown",
                detail={"marker": reservation.plan.marker, "input_tokens": input_tokens,
                        "output_tokens": output_tokens, "reserved_output": reservation.output}))
        self._pending = []


def charge(reservation: Reservation, usage: Usage | None, event: TraceEvent, why_missing: str) -> tuple[int, int]:
    """What to settle: the real usage, or, without it, the whole reservation (never zero)."""
    if usage is not None:
        return usage.input, usage.output
    _note(event, f"{why_missing}: charged the reservation")
    return reservation.plan.input, reservation.output
