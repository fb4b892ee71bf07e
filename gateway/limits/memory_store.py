"""The in-memory store (one process, the embedded default). Atomic because nothing awaits mid-operation.

It is also the reference for the Redis scripts: both follow the same steps in the same order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .store import (
    BudgetCounter,
    Plan,
    RateCounter,
    Refusal,
    Reservation,
    Settlement,
)

SWEEP_SLICE = 64  # keys a call checks while a sweep is under way (about 3 µs)


class MemoryStore:
    ordered = True

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cells: dict[str, tuple[float, float]] = {}  # key -> (value, expires at): one lookup per read
        self._next_sweep = 0.0
        self._sweeping: list[str] = []  # keys the sweep under way has yet to check

    # -- storage with lazy expiry -------------------------------------------------------------------------------
    def _get(self, key: str, now: float) -> float | None:
        cell = self._cells.get(key)
        if cell is None:
            return None
        if cell[1] <= now:
            del self._cells[key]
            return None
        return cell[0]

    def _sweep(self, now: float) -> None:
        """Drop expired keys, so ended windows and one-off loop cells go. Every few seconds the keys are listed
        (a copy of references), and each call then checks the next slice of them: one pass over the whole table
        would stall every call in flight (9 ms for the 60,000 loop-detection cells of a few seconds of unique
        calls at a few thousand a second)."""
        keys = self._sweeping
        if not keys:
            if now < self._next_sweep:
                return
            self._next_sweep = now + 5.0
            keys = self._sweeping = list(self._cells)
        cells = self._cells
        for _ in range(min(SWEEP_SLICE, len(keys))):
            key = keys.pop()
            cell = cells.get(key)
            if cell is not None and cell[1] <= now:
                del cells[key]

    # -- the protocol --------------------------------------------------------------------------------------------
    async def reserve(self, plan: Plan) -> Reservation | Refusal:
        now = plan.now
        if self._sweeping or now >= self._next_sweep:
            self._sweep(now)
        cells = self._cells
        marker = cells.get(plan.marker)
        if marker is not None and marker[1] > now:  # this reservation already ran: report it again, charge nothing
            left = tuple(_remaining(r, max(self._get(r.key, now) or now, now), now) for r in plan.rates)
            return Reservation(plan, int(marker[0]), tuple(int(self._get(b.key, now) or 0) for b in plan.budgets),
                               left)
        output = plan.output
        spent = plan.input
        # The costs (store.rate_cost, budget_cost) and _remaining are written out inline: this runs on every call.
        # The arithmetic is theirs, operation for operation, so the results stay exactly the Redis scripts'.
        # 1. Budgets fix how many output tokens can be granted (clamping), or refuse.
        # (Cells are read inline, not through _get: an expired cell reads as absent and is overwritten below.)
        used_before: list[int] = []
        for budget in plan.budgets:
            cell = cells.get(budget.key)
            used = cell[0] if cell is not None and cell[1] > now else 0  # a budget's cell holds an int
            used_before.append(used)  # type: ignore[arg-type]
            room = budget.limit - used - budget.per_input * spent
            if room < 0:  # the input alone does not fit (or the budget is overdrawn): no output size can help
                return Refusal("budget_exceeded", budget.id, max(0.0, budget.resets_at - now))
            if budget.per_output > 0:
                affordable = math.floor(room / budget.per_output)
                if affordable < output:
                    if plan.min_output is not None and affordable >= plan.min_output:
                        output = affordable
                    else:
                        return Refusal("budget_exceeded", budget.id, max(0.0, budget.resets_at - now))
        # 2. Rate counters (loop detectors first in plan order): GCRA, all checked before any is charged.
        new_tats: list[float] = []
        for rate in plan.rates:
            cell = cells.get(rate.key)
            tat = cell[0] if cell is not None and cell[1] > now and cell[0] > now else now
            period = rate.period
            new_tat = tat + (rate.per_call + rate.per_input * spent + rate.per_output * output) * (period / rate.limit)
            if new_tat - now > period:
                retry = new_tat - now - period
                detail = "loop_detected" if rate.kind == "loop" else None
                return Refusal("rate_limited", rate.id, retry, detail)
            new_tats.append(new_tat)
        # 3. Admitted: charge everything.
        used_after = []
        for budget, used in zip(plan.budgets, used_before):  # noqa: B905 (equal by construction; a keyword costs 1.5k)
            total = used + budget.per_input * spent + budget.per_output * output
            cells[budget.key] = (total, now + budget.ttl)
            used_after.append(total)
        remaining = []
        floor = math.floor
        for rate, new_tat in zip(plan.rates, new_tats):  # noqa: B905 (as above)
            cells[rate.key] = (new_tat, new_tat + 1)
            period = rate.period
            units = floor((period - (new_tat - now)) / (period / rate.limit) + 1e-9)
            remaining.append(units if units > 0 else 0)
        if plan.settles:  # nothing here is ever retried, so only settlement needs the marker
            cells[plan.marker] = (output, now + plan.marker_ttl)
        return Reservation(plan, output, tuple(used_after), tuple(remaining))

    async def settle(self, reservation: Reservation, input_tokens: int, output_tokens: int) -> Settlement:
        plan = reservation.plan
        now = self._clock()
        cells = self._cells
        marker = cells.pop(plan.marker, None)
        if marker is None or marker[1] <= now:  # already settled, or never reserved
            return Settlement(tuple(int(self._get(b.key, now) or 0) for b in plan.budgets), (), applied=False)
        used_after: list[int] = []
        alerts: list[tuple[int, float]] = []
        # Integer arithmetic, so the difference of the costs is exact whichever way it is written.
        more_input, more_output = input_tokens - plan.input, output_tokens - reservation.output
        for i, budget in enumerate(plan.budgets):
            delta = budget.per_input * more_input + budget.per_output * more_output
            cell = cells.get(budget.key)
            total = (cell[0] if cell is not None and cell[1] > now else 0) + delta  # a budget's cell holds an int
            cells[budget.key] = (total, now + budget.ttl)
            used_after.append(total)  # type: ignore[arg-type]
            crossed = 0
            limit = budget.limit
            for threshold in budget.alert_at:
                if total >= threshold * limit:
                    crossed += 1
            if crossed:  # how many already fired is read only when one may fire now, as the script does
                fired = int(self._get(budget.alert_key, now) or 0)
                if crossed > fired:
                    reached = [t for t in budget.alert_at if total >= t * limit]
                    alerts.extend((i, t) for t in reached[fired:])
                    cells[budget.alert_key] = (crossed, now + budget.ttl)
        for rate in plan.rates:
            delta = rate.per_input * more_input + rate.per_output * more_output  # a call count never changes
            if delta:
                cell = cells.get(rate.key)
                if cell is not None and cell[1] > now:
                    new_tat = cell[0] + delta * rate.period / rate.limit
                    cells[rate.key] = (new_tat, max(new_tat, now) + 1)
        return Settlement(tuple(used_after), tuple(alerts))

    async def peek(self, rates: tuple[RateCounter, ...], budgets: tuple[BudgetCounter, ...],
                   now: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
        remaining = tuple(_remaining(r, max(self._get(r.key, now) or now, now), now) for r in rates)
        used = tuple(int(self._get(b.key, now) or 0) for b in budgets)
        return remaining, used

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


def _remaining(rate: RateCounter, tat: float, now: float) -> int:
    """Units that could still be spent at once: what the GCRA cell has room for."""
    interval = rate.period / rate.limit
    return max(0, math.floor((rate.period - (tat - now)) / interval + 1e-9))

