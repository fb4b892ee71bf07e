"""The `Store` protocol: one atomic round trip to reserve, one to settle; two backends implement it.

Every counter has the same shape: a call costs `per_call + per_input * input + per_output * output` (tokens),
so a request rate (1, 0, 0), a token rate or budget (0, 1, 1) and a USD budget (0, in_price, out_price, in
nano-dollars per token) are all checked and settled by the same code. Rate counters are
GCRA cells (`limit` per `period` seconds, bursts up to `limit`); budgets are sums within a calendar window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..errors import StoreUnavailable

__all__ = ["StoreUnavailable"]  # re-exported: the store protocol's failure


# Not frozen, though never changed once built: the loop detector's is built per call (see Plan).
@dataclass(slots=True)
class RateCounter:
    """A GCRA cell: at most `limit` units per `period` seconds."""

    id: str
    key: str
    limit: int
    period: float
    per_call: int
    per_input: int
    per_output: int
    kind: Literal["rate", "loop"] = "rate"


@dataclass(frozen=True, slots=True)
class BudgetCounter:
    """A sum within a calendar window; `ttl` keeps the key a little past the window's end."""

    id: str
    key: str
    alert_key: str
    limit: int
    per_input: int
    per_output: int
    window: str
    resets_at: float
    ttl: int
    alert_at: tuple[float, ...]
    unit: Literal["tokens", "usd_nanos"]

    def state(self, used: int) -> dict[str, object]:
        """How the budget reads in traces and the admin API (USD budgets in dollars)."""
        if self.unit == "usd_nanos":
            return {"id": self.id, "unit": "usd", "used": used / 1e9, "limit": self.limit / 1e9,
                    "window": self.window, "resets_at": self.resets_at}
        return {"id": self.id, "unit": "tokens", "used": used, "limit": self.limit, "window": self.window,
                "resets_at": self.resets_at}


# Not frozen, though never changed once built: one is built per call, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs about six times as much.
@dataclass(slots=True)
class Plan:
    """Everything one call must reserve, decided before any store I/O."""

    agent: str
    # Reservation key. A reserve that finds it set has already run (a retried call whose reply was lost) and
    # charges nothing; settle applies only while it exists, so at most once.
    marker: str
    marker_ttl: int  # seconds: longer than any call can take when it settles, else just long enough for a retry
    rates: tuple[RateCounter, ...]
    budgets: tuple[BudgetCounter, ...]
    input: int  # estimated input tokens
    output: int  # output tokens to reserve (the request's max, or a default cap)
    min_output: int | None  # set when clamping is on: output may be lowered, but not below this
    now: float
    # Whether settlement can change anything (a budget or a token-priced rate); if not, there is none.
    settles: bool = True
    # The same object for every plan whose counters are the same, but for a loop detector (then `rates[0]`, a
    # new counter per call with the same numbers): a store may keep work on those counters under it. None: no
    # promise (a plan built elsewhere).
    shape: object = None


def rate_cost(counter: RateCounter, input_tokens: int, output_tokens: int) -> int:
    return counter.per_call + counter.per_input * input_tokens + counter.per_output * output_tokens


def budget_cost(counter: BudgetCounter, input_tokens: int, output_tokens: int) -> int:
    return counter.per_input * input_tokens + counter.per_output * output_tokens


# Not frozen, though never changed once built: one is built per call, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs about six times as much.
@dataclass(slots=True)
class Refusal:
    type: Literal["rate_limited", "budget_exceeded"]
    counter: str  # the id of the rate limit, budget or loop detector that refused
    retry_after: float  # seconds
    detail: str | None = None  # `loop_detected` for the loop detector


# Not frozen, though never changed once built: one is built per call, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs about six times as much.
@dataclass(slots=True)
class Reservation:
    plan: Plan
    output: int  # output tokens granted (lower than asked when clamped)
    used: tuple[int, ...]  # each budget's total after this reservation, in plan order
    remaining: tuple[int, ...]  # each rate counter's remaining units after this reservation


# Not frozen, though never changed once built: one is built per call, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs about six times as much.
@dataclass(slots=True)
class Settlement:
    used: tuple[int, ...]  # each budget's total after settling, in plan order
    alerts: tuple[tuple[int, float], ...] = field(default_factory=tuple)  # (budget index, threshold) crossed
    applied: bool = True  # False when the reservation was already settled (or never made)


class Store(Protocol):
    # Whether this process's calls apply in the order they were made: a reserve made after a settle was made
    # sees that settlement, without waiting for its reply (one connection, or no network at all).
    ordered: bool

    async def reserve(self, plan: Plan) -> Reservation | Refusal:
        """Check every counter and, only if all admit, charge them all; atomically, in one round trip."""
        ...

    async def settle(self, reservation: Reservation, input_tokens: int, output_tokens: int) -> Settlement:
        """Replace the reserved cost with the real one (idempotent: only the first call applies)."""
        ...

    async def peek(self, rates: tuple[RateCounter, ...], budgets: tuple[BudgetCounter, ...],
                   now: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(remaining units per rate counter, used per budget), changing nothing."""
        ...

    async def start(self) -> None:
        """Get ready before the first call (e.g. learn a Redis Cluster's slot map); errors are not fatal."""
        ...

    async def close(self) -> None: ...
