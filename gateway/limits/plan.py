"""Which counters one call must reserve, and how much. Compiled once per agent; per call it only picks.

A `Planner` holds an agent's rate counters ready-made per upstream, and its budget counters per calendar
window and model price, so planning a call allocates little beyond the `Plan` itself.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
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


@dataclass(frozen=True, slots=True)
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


class Planner:
    """One agent's limits, compiled: `plan` turns an action into the counters it must reserve."""

    def __init__(self, agent: AgentSpec) -> None:
        self.agent = agent
        self.tag = agent_tag(agent.id)
        self._rates: dict[tuple[str, bool], tuple[tuple[RateLimitSpec, RateCounter], ...]] = {}
        self._budgets: dict[tuple[str, str, PriceSpec | None], BudgetCounter] = {}  # (budget, window, price)
        self._windows: dict[str, tuple[float, str, float]] = {}  # per -> (start, window id, resets at)
        # Reservation ids: unique per process (random prefix) and per call (counter), without uuid4's cost.
        self._ids = itertools.count()
        self._id_prefix = os.urandom(6).hex()

    def _rate_counters(self, upstream: str, uses_tokens: bool) -> tuple[tuple[RateLimitSpec, RateCounter], ...]:
        found = self._rates.get((upstream, uses_tokens))
        if found is None:
            found = tuple((spec, _rate_counter(self.agent.id, spec)) for spec in self.agent.rate_limits
                          if spec.upstream in (None, upstream) and (spec.requests is not None or uses_tokens))
            self._rates[(upstream, uses_tokens)] = found
        return found

    def _window(self, per: str, now: float) -> tuple[str, float]:
        cached = self._windows.get(per)
        if cached is None or not cached[0] <= now < cached[2]:
            window, resets_at = calendar_window(per, now)
            start = now  # valid from now (the window began earlier; this is only a cache bound)
            self._windows[per] = cached = (start, window, resets_at)
        return cached[1], cached[2]

    def _budget_counter(self, spec: BudgetSpec, price: PriceSpec | None, now: float) -> BudgetCounter:
        window, resets_at = self._window(spec.per, now)
        key = (spec.id, window, price)
        counter = self._budgets.get(key)
        if counter is None:
            if len(self._budgets) > 256:  # windows and models come and go: keep the cache small
                self._budgets.clear()
            unit: Literal["tokens", "usd_nanos"]
            if spec.tokens is not None or price is None:
                per_input, per_output, limit, unit = 1, 1, spec.tokens or 0, "tokens"
            else:
                per_input, per_output = nanos_per_token(price.input_per_mtok), nanos_per_token(price.output_per_mtok)
                limit, unit = round((spec.usd or 0) * 1e9), "usd_nanos"
            counter = BudgetCounter(
                id=spec.id, key=f"{self.tag}:b:{spec.id}:{window}", alert_key=f"{self.tag}:a:{spec.id}:{window}",
                limit=limit, per_input=per_input, per_output=per_output, window=window, resets_at=resets_at,
                ttl=int(resets_at - now) + 86400, alert_at=spec.alert_at, unit=unit)
            self._budgets[key] = counter
        return counter

    def _budget_counters(self, action: Action, prices: Mapping[str, PriceSpec], now: float,
                         notes: list[str]) -> list[tuple[BudgetSpec, BudgetCounter]]:
        chosen = []
        for spec in self.agent.budgets:
            price = None
            if spec.usd is not None:
                price = prices.get(action.model or "")
                if price is None:
                    if not spec.allow_unestimated:
                        raise _unestimable(spec.id, f"no price is listed for model {action.model!r}")
                    notes.append(f"{spec.id}: no price for {action.model!r}, not charged")
                    continue
            chosen.append((spec, self._budget_counter(spec, price, now)))
        return chosen

    def plan(self, action: Action, upstream: UpstreamSpec, call_fingerprint: str, now: float) -> Planned:
        """The counters this call touches; `policy_denied` when a limit needs an estimate the call cannot give."""
        uses_tokens = upstream.kind in LLM_KINDS and action.verb in TOKEN_VERBS
        notes: list[str] = []
        rates = self._rate_counters(action.upstream, uses_tokens)
        budgets = self._budget_counters(action, upstream.prices, now, notes) if uses_tokens else []
        counters: list[RateCounter] = []
        loop = self.agent.loop_detection
        if loop is not None:  # first: a looping agent is told so, not just "rate limited"
            counters.append(RateCounter(LOOP_ID, f"{self.tag}:loop:{call_fingerprint[:32]}", loop.max_repeats,
                                        PERIOD_SECONDS[loop.per], 1, 0, 0, kind="loop"))
        counters.extend(counter for _, counter in rates)
        output = self._output(action, rates, budgets, notes) if uses_tokens else 0
        if not counters and not budgets:
            return Planned(None, tuple(notes))
        settles = bool(budgets) or any(c.per_input or c.per_output for c in counters)
        clamp = any(spec.clamp_max_tokens for spec, _ in budgets)
        plan = Plan(agent=self.agent.id, marker=f"{self.tag}:res:{self._id_prefix}{next(self._ids)}",
                    marker_ttl=MARKER_TTL if settles else RETRY_MARKER_TTL, rates=tuple(counters),
                    budgets=tuple(c for _, c in budgets), input=action.input_tokens if uses_tokens else 0,
                    output=output, min_output=1 if clamp and output > 0 else None, now=now, settles=settles)
        return Planned(plan, tuple(notes))

    @staticmethod
    def _output(action: Action, rates: tuple[tuple[RateLimitSpec, RateCounter], ...],
                budgets: list[tuple[BudgetSpec, BudgetCounter]], notes: list[str]) -> int:
        """Output tokens to reserve: the request's cap, else the largest default cap of the limits involved."""
        if action.max_output is not None:
            return action.max_output
        specs: list[RateLimitSpec | BudgetSpec] = [s for s, c in rates if c.per_output]
        specs += [s for s, _ in budgets]
        if not specs:
            return 0
        defaults = [s.default_output_tokens for s in specs if s.default_output_tokens]
        if defaults:
            return max(defaults)
        strict = [s for s in specs if not s.allow_unestimated]
        if strict:
            raise _unestimable(strict[0].id, "the request sets no max_tokens")
        notes.append("no max_tokens: reserved the prompt only")
        return 0

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
