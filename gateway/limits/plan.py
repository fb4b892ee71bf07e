"""Which counters one call must reserve, and how much. Compiled once per agent; per call it only picks.

A `Planner` holds an agent's rate counters ready-made per upstream, and its budget counters per calendar
window and model price, so planning a call allocates little beyond the `Plan` itself.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import Literal

from ..errors import GatewayError
from ..models import Action
from ..policy.spec import AgentSpec, BudgetSpec, PriceSpec, RateLimitSpec, UpstreamSpec
from .store import BudgetCounter, Plan, RateCounter
from .windows import PERIOD_SECONDS, calendar_window

KEY_PREFIX = "agw"
MARKER_TTL = 2 * 86400  # longer than any hold plus any stream
RETRY_MARKER_TTL = 10  # a reservation that never settles keeps its marker only to make a retried reserve safe
LLM_KINDS = frozenset({"openai", "anthropic"})
TOKEN_VERBS = frozenset({"chat", "embed"})
LOOP_ID = "loop_detection"


def nanos_per_token(price_per_mtok: float) -> int:
    """USD per million tokens -> nano-dollars per token, rounded up (a budget never under-counts)."""
    return math.ceil(price_per_mtok * 1000 - 1e-9)


def agent_tag(agent: str) -> str:
    """Every key of one agent shares this hash tag, so a plan's keys sit in one Redis Cluster slot."""
    return f"{KEY_PREFIX}:{{{agent}}}"


# Not frozen, though never changed once built: one is built per call, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs about six times as much.
@dataclass(slots=True)
class Planned:
    plan: Plan | None  # None: nothing to reserve for this call
    notes: tuple[str, ...] = ()  # for the trace: e.g. a USD budget skipped for an unpriced model


def _unestimable(limit_id: str, why: str) -> GatewayError:
    return GatewayError("policy_denied", f"{why}; the call's cost cannot be estimated for {limit_id} (set max_tokens, "
                                         "or default_output_tokens or allow_unestimated on that limit)",
                        rule=limit_id)


def _rate_counter(agent: str, spec: RateLimitSpec) -> RateCounter:
    key = f"{agent_tag(agent)}:rl:{spec.id}"
    if spec.requests is not None:
        return RateCounter(spec.id, key, spec.requests, PERIOD_SECONDS[spec.per], 1, 0, 0)
    return RateCounter(spec.id, key, spec.tokens or 1, PERIOD_SECONDS[spec.per], 0, 1, 1)


@dataclass(slots=True)
class _Shape:
    """What every call on one (upstream, token use, price) reserves: built once, reused while its budget
    windows last. Per call only the loop counter, the output size and the `Plan` are new."""

    rates: tuple[RateCounter, ...]  # the agent's rate counters for the upstream (the plan puts the loop's first)
    budgets: tuple[BudgetCounter, ...]
    notes: tuple[str, ...]
    # Limits that refuse, kept as ids (a fresh error per call: a raised exception collects a traceback): a USD
    # budget that cannot price this model, and a limit that needs max_tokens when no default applies.
    unpriced: str | None
    default_output: int | None  # output tokens to reserve when the request sets no max_tokens
    no_cap: str | None
    no_cap_note: str | None
    settles: bool
    clamp: bool
    valid_from: float
    valid_until: float  # the earliest end of a budget window in `budgets`


class Planner:
    """One agent's limits, compiled: `plan` turns an action into the counters it must reserve."""

    def __init__(self, agent: AgentSpec) -> None:
        self.agent = agent
        self.tag = agent_tag(agent.id)
        self._priced = any(spec.usd is not None for spec in agent.budgets)  # whether the model's price matters
        self._shapes: dict[tuple[str, bool, str | None], _Shape] = {}
        # Reservation ids: unique per process (random prefix) and per call (counter), without uuid4's cost.
        self._ids = itertools.count()
        self._marker_prefix = f"{self.tag}:res:{os.urandom(6).hex()}"
        loop = agent.loop_detection
        self._loop = None if loop is None else (f"{self.tag}:loop:", loop.max_repeats, PERIOD_SECONDS[loop.per])

    def plan(self, action: Action, upstream: UpstreamSpec, repeat: str, now: float) -> Planned:
        """The counters this call touches; `policy_denied` when a limit needs an estimate the call cannot give.

        `repeat` names the call to the loop detector (`pipeline.repeat_key`): calls with the same one count as
        repeats."""
        uses_tokens = upstream.kind in LLM_KINDS and action.verb in TOKEN_VERBS
        # Keyed by the model's name, whose price the planner's rule set fixes: a string's hash is cached, where a
        # price's would be computed per call.
        key = (action.upstream, uses_tokens, action.model if uses_tokens and self._priced else None)
        shape = self._shapes.get(key)
        if shape is None or not shape.valid_from <= now < shape.valid_until:
            price = upstream.prices.get(action.model or "") if uses_tokens and self._priced else None
            shape = self._shape(action, upstream, uses_tokens, price, now)
            if not shape.notes:  # notes name the model: those shapes are rare and built per call
                if len(self._shapes) > 256:  # windows, upstreams and prices come and go: keep the cache small
                    self._shapes.clear()
                self._shapes[key] = shape
        if shape.unpriced is not None:  # the message names the call's model, which the shape does not keep
            raise _unestimable(shape.unpriced, f"no price is listed for model {action.model!r}")
        notes = shape.notes
        output = 0
        if uses_tokens:
            if action.max_output is not None:
                output = action.max_output
            elif shape.default_output is not None:
                output = shape.default_output
            elif shape.no_cap is not None:
                raise _unestimable(shape.no_cap, "the request sets no max_tokens")
            elif shape.no_cap_note is not None:
                notes = (*notes, shape.no_cap_note)
        rates = shape.rates
        loop = self._loop
        if loop is not None:  # first: a looping agent is told so, not just "rate limited"
            rates = (RateCounter(LOOP_ID, loop[0] + repeat, loop[1], loop[2], 1, 0, 0, "loop"), *rates)
        elif not rates and not shape.budgets:
            return Planned(None, notes)
        settles = shape.settles
        plan = Plan(self.agent.id, f"{self._marker_prefix}{next(self._ids)}",
                    MARKER_TTL if settles else RETRY_MARKER_TTL, rates, shape.budgets,
                    action.input_tokens if uses_tokens else 0, output, 1 if shape.clamp and output > 0 else None,
                    now, settles, shape if not shape.notes else None)  # a shape with notes is built per call
        return Planned(plan, notes)

    def _shape(self, action: Action, upstream: UpstreamSpec, uses_tokens: bool, price: PriceSpec | None,
               now: float) -> _Shape:
        rates = tuple((spec, _rate_counter(self.agent.id, spec)) for spec in self.agent.rate_limits
                      if spec.upstream in (None, action.upstream) and (spec.requests is not None or uses_tokens))
        notes: list[str] = []
        budgets: list[tuple[BudgetSpec, BudgetCounter]] = []
        unpriced: str | None = None
        valid_until = math.inf
        for spec in self.agent.budgets if uses_tokens else ():
            if spec.usd is not None and price is None:
                if not spec.allow_unestimated:
                    unpriced = unpriced or spec.id
                else:
                    notes.append(f"{spec.id}: no price for {action.model!r}, not charged")
                continue
            counter = self._budget_counter(spec, price if spec.usd is not None else None, now)
            valid_until = min(valid_until, counter.resets_at)
            budgets.append((spec, counter))
        # Output tokens to reserve when the request sets no cap: the largest default cap of the limits
        # involved; without one, a strict limit refuses and a lenient one reserves the prompt only.
        default_output, no_cap, no_cap_note = None, None, None
        specs: list[RateLimitSpec | BudgetSpec] = [s for s, c in rates if c.per_output]
        specs += [s for s, _ in budgets]
        if specs:
            defaults = [s.default_output_tokens for s in specs if s.default_output_tokens]
            strict = [s for s in specs if not s.allow_unestimated]
            if defaults:
                default_output = max(defaults)
            elif strict:
                no_cap = strict[0].id
            else:
                no_cap_note = "no max_tokens: reserved the prompt only"
        counters = tuple(c for _, c in rates)
        return _Shape(rates=counters, budgets=tuple(c for _, c in budgets), notes=tuple(notes), unpriced=unpriced,
                      default_output=default_output if uses_tokens else None, no_cap=no_cap, no_cap_note=no_cap_note,
                      settles=bool(budgets) or any(c.per_input or c.per_output for c in counters),
                      clamp=any(spec.clamp_max_tokens for spec, _ in budgets), valid_from=now,
                      valid_until=valid_until)

    def _budget_counter(self, spec: BudgetSpec, price: PriceSpec | None, now: float) -> BudgetCounter:
        window, resets_at = calendar_window(spec.per, now)
        unit: Literal["tokens", "usd_nanos"]
        if spec.tokens is not None or price is None:
            per_input, per_output, limit, unit = 1, 1, spec.tokens or 0, "tokens"
        else:
            per_input, per_output = nanos_per_token(price.input_per_mtok), nanos_per_token(price.output_per_mtok)
            limit, unit = round((spec.usd or 0) * 1e9), "usd_nanos"
        return BudgetCounter(
            id=spec.id, key=f"{self.tag}:b:{spec.id}:{window}", alert_key=f"{self.tag}:a:{spec.id}:{window}",
            limit=limit, per_input=per_input, per_output=per_output, window=window, resets_at=resets_at,
            ttl=int(resets_at - now) + 86400, alert_at=spec.alert_at, unit=unit)

    def usage_counters(self, now: float) -> tuple[tuple[RateCounter, ...], tuple[BudgetCounter, ...]]:
        """Every rate limit and budget of the agent, to read its current usage (admin API)."""
        rates = tuple(_rate_counter(self.agent.id, spec) for spec in self.agent.rate_limits)
        budgets = []
        for spec in self.agent.budgets:
            window, resets_at = calendar_window(spec.per, now)
            unit: Literal["tokens", "usd_nanos"] = "tokens" if spec.tokens is not None else "usd_nanos"
            limit = spec.tokens if spec.tokens is not None else round((spec.usd or 0) * 1e9)
            budgets.append(BudgetCounter(spec.id, f"{self.tag}:b:{spec.id}:{window}",
                                         f"{self.tag}:a:{spec.id}:{window}", limit, 0, 0, window, resets_at, 0,
                                         spec.alert_at, unit))
        return rates, tuple(budgets)
