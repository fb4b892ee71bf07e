"""Which counters one call must reserve, and how much: a pure function of the rules and the action."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Literal

from ..errors import GatewayError
from ..models import Action
from ..policy.spec import AgentSpec, BudgetSpec, RateLimitSpec, UpstreamSpec
from .store import BudgetCounter, Plan, RateCounter
from .windows import PERIOD_SECONDS, calendar_window

KEY_PREFIX = "agw"
MARKER_TTL = 2 * 86400  # longer than any hold plus any stream
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


def rate_counters(agent: AgentSpec, action: Action, uses_tokens: bool) -> list[tuple[RateLimitSpec, RateCounter]]:
    tag = agent_tag(agent.id)
    chosen = []
    for spec in agent.rate_limits:
        if spec.upstream not in (None, action.upstream):
            continue
        period = PERIOD_SECONDS[spec.per]
        key = f"{tag}:rl:{spec.id}"
        if spec.requests is not None:
            chosen.append((spec, RateCounter(spec.id, key, spec.requests, period, 1, 0, 0)))
        elif uses_tokens and spec.tokens is not None:
            chosen.append((spec, RateCounter(spec.id, key, spec.tokens, period, 0, 1, 1)))
    return chosen


def budget_counters(agent: AgentSpec, action: Action, upstream: UpstreamSpec, now: float,
                    notes: list[str]) -> list[tuple[BudgetSpec, BudgetCounter]]:
    tag = agent_tag(agent.id)
    chosen = []
    for spec in agent.budgets:
        window, resets_at = calendar_window(spec.per, now)
        unit: Literal["tokens", "usd_nanos"]
        if spec.tokens is not None:
            per_input, per_output, limit, unit = 1, 1, spec.tokens, "tokens"
        else:
            price = upstream.prices.get(action.model or "")
            if price is None:
                if not spec.allow_unestimated:
                    raise _unestimable(spec.id, f"upstream {upstream.name!r} lists no price for model "
                                                f"{action.model!r}")
                notes.append(f"{spec.id}: no price for {action.model!r}, not charged")
                continue
            per_input, per_output = nanos_per_token(price.input_per_mtok), nanos_per_token(price.output_per_mtok)
            limit, unit = round((spec.usd or 0) * 1e9), "usd_nanos"
        chosen.append((spec, BudgetCounter(
            id=spec.id, key=f"{tag}:b:{spec.id}:{window}", alert_key=f"{tag}:a:{spec.id}:{window}", limit=limit,
            per_input=per_input, per_output=per_output, window=window, resets_at=resets_at,
            ttl=int(resets_at - now) + 86400, alert_at=spec.alert_at, unit=unit)))
    return chosen


def build_plan(agent: AgentSpec, action: Action, upstream: UpstreamSpec, call_fingerprint: str,
               now: float) -> Planned:
    """The counters this call touches; `policy_denied` when a limit needs an estimate the call cannot give."""
    uses_tokens = upstream.kind in LLM_KINDS and action.verb in TOKEN_VERBS
    notes: list[str] = []
    rates = rate_counters(agent, action, uses_tokens)
    budgets = budget_counters(agent, action, upstream, now, notes) if uses_tokens else []
    counters: list[RateCounter] = []
    if agent.loop_detection is not None:  # first: a looping agent is told so, not just "rate limited"
        loop = agent.loop_detection
        counters.append(RateCounter(LOOP_ID, f"{agent_tag(agent.id)}:loop:{call_fingerprint[:32]}",
                                    loop.max_repeats, PERIOD_SECONDS[loop.per], 1, 0, 0, kind="loop"))
    counters.extend(counter for _, counter in rates)
    output = 0
    if uses_tokens:
        output_specs: list[RateLimitSpec | BudgetSpec] = [s for s, c in rates if c.per_output]
        output_specs += [s for s, _ in budgets]
        if action.max_output is not None:
            output = action.max_output
        elif output_specs:
            defaults = [s.default_output_tokens for s in output_specs if s.default_output_tokens]
            if defaults:
                output = max(defaults)
            else:
                strict = [s for s in output_specs if not s.allow_unestimated]
                if strict:
                    raise _unestimable(strict[0].id, "the request sets no max_tokens")
                notes.append("no max_tokens: reserved the prompt only")
    clamp = any(spec.clamp_max_tokens for spec, _ in budgets)
    if not counters and not budgets:
        return Planned(None, tuple(notes))
    settles = bool(budgets) or any(c.per_input or c.per_output for c in counters)
    marker = f"{agent_tag(agent.id)}:res:{uuid.uuid4().hex}" if settles else ""
    plan = Plan(agent=agent.id, marker=marker, marker_ttl=MARKER_TTL,
                rates=tuple(counters), budgets=tuple(c for _, c in budgets),
                input=action.input_tokens if uses_tokens else 0, output=output,
                min_output=1 if clamp and output > 0 else None, now=now)
    return Planned(plan, tuple(notes))


def usage_counters(agent: AgentSpec, now: float) -> tuple[tuple[RateCounter, ...], tuple[BudgetCounter, ...]]:
    """Every rate limit and budget of an agent as counters, to read its current usage (admin API)."""
    tag = agent_tag(agent.id)
    rates = tuple(RateCounter(s.id, f"{tag}:rl:{s.id}", s.requests or s.tokens or 1, PERIOD_SECONDS[s.per],
                              1 if s.requests else 0, 0 if s.requests else 1, 0 if s.requests else 1)
                  for s in agent.rate_limits)
    budgets = []
    for spec in agent.budgets:
        window, resets_at = calendar_window(spec.per, now)
        unit: Literal["tokens", "usd_nanos"] = "tokens" if spec.tokens is not None else "usd_nanos"
        limit = spec.tokens if spec.tokens is not None else round((spec.usd or 0) * 1e9)
        budgets.append(BudgetCounter(spec.id, f"{tag}:b:{spec.id}:{window}", f"{tag}:a:{spec.id}:{window}", limit,
                                     0, 0, window, resets_at, 0, spec.alert_at, unit))
    return rates, tuple(budgets)
