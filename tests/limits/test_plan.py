"""The planner: which counters a call reserves, reused per (upstream, token use, price) while its windows last."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.errors import GatewayError
from gateway.limits.plan import LOOP_ID, Planner
from gateway.models import Action
from gateway.policy.spec import (
    AgentSpec,
    BudgetSpec,
    Loc,
    LoopSpec,
    PriceSpec,
    RateLimitSpec,
    UpstreamSpec,
)

LOC = Loc("test.yaml", 1, 1)
PRICES = {"gpt-4o-mini": PriceSpec(0.15, 0.60), "gpt-4o": PriceSpec(2.5, 10.0)}
OPENAI = UpstreamSpec("openai", "openai", "http://x/v1", None, PRICES, (), (), 5.0, 60.0, LOC)
ERP = UpstreamSpec("erp", "http", "http://x/erp", None, {}, (), (), 5.0, 60.0, LOC)
DAY_END = datetime(2026, 11, 21, 23, 59, 59, tzinfo=UTC).timestamp()


def agent(budgets: tuple[BudgetSpec, ...] = (), rates: tuple[RateLimitSpec, ...] = (),
          loop: LoopSpec | None = None) -> AgentSpec:
    return AgentSpec("bot", None, None, "automate", (), budgets, rates, "bot.yaml", loop)


def tokens_per_day(**extra: object) -> BudgetSpec:
    return BudgetSpec("tokens-day", "day", 1_000_000, None, (), LOC, **extra)  # type: ignore[arg-type]


def usd_per_month(**extra: object) -> BudgetSpec:
    return BudgetSpec("usd-month", "month", None, 100.0, (), LOC, **extra)  # type: ignore[arg-type]


def chat(model: str | None = "gpt-4o-mini", max_output: int | None = 64) -> Action:
    return Action("openai", "openai", "chat", model=model, input_tokens=12, max_output=max_output)


def test_a_call_reserves_its_budgets_rates_and_output() -> None:
    rpm = RateLimitSpec("rpm", "minute", "openai", 100, None, LOC)
    erp_rpm = RateLimitSpec("erp-rpm", "minute", "erp", 10, None, LOC)
    planner = Planner(agent((tokens_per_day(), usd_per_month()), (rpm, erp_rpm)))
    plan = planner.plan(chat(), OPENAI, "f" * 64, DAY_END - 10).plan
    assert plan is not None
    assert [r.id for r in plan.rates] == ["rpm"]  # erp's rate limit is not this upstream's
    assert [(b.id, b.unit, b.per_input, b.per_output) for b in plan.budgets] == [
        ("tokens-day", "tokens", 1, 1), ("usd-month", "usd_nanos", 150, 600)]
    assert (plan.input, plan.output, plan.settles, plan.min_output) == (12, 64, True, None)
    erp = planner.plan(Action("erp", "http", "read", resource="vendors"), ERP, "", DAY_END - 10).plan
    assert erp is not None and [r.id for r in erp.rates] == ["erp-rpm"] and erp.budgets == ()
    assert not erp.settles  # a request count never changes at settlement


def test_counters_are_reused_within_a_window_and_rebuilt_when_it_ends() -> None:
    planner = Planner(agent((tokens_per_day(),)))
    first = planner.plan(chat(), OPENAI, "", DAY_END - 10).plan
    again = planner.plan(chat(), OPENAI, "", DAY_END - 5).plan
    assert first is not None and again is not None
    assert again.budgets[0] is first.budgets[0]  # no per-call rebuilding
    assert first.budgets[0].key.endswith(":2026-11-21")
    tomorrow = planner.plan(chat(), OPENAI, "", DAY_END + 5).plan
    assert tomorrow is not None and tomorrow.budgets[0].key.endswith(":2026-11-22")
    # A clock stepped back before the cached window's start does not reuse tomorrow's counter for today.
    back = planner.plan(chat(), OPENAI, "", DAY_END - 1).plan
    assert back is not None and back.budgets[0].key.endswith(":2026-11-21")


def test_each_priced_model_gets_its_own_usd_counter() -> None:
    planner = Planner(agent((usd_per_month(),)))
    mini = planner.plan(chat("gpt-4o-mini"), OPENAI, "", DAY_END).plan
    big = planner.plan(chat("gpt-4o"), OPENAI, "", DAY_END).plan
    assert mini is not None and big is not None
    assert (mini.budgets[0].per_output, big.budgets[0].per_output) == (600, 10_000)
    assert mini.budgets[0].key == big.budgets[0].key  # one budget, whatever the model


def test_an_unpriced_model_is_refused_each_time_with_a_fresh_error() -> None:
    planner = Planner(agent((usd_per_month(),)))
    errors = []
    for _ in range(2):
        with pytest.raises(GatewayError) as caught:
            planner.plan(chat("mystery-model"), OPENAI, "", DAY_END)
        errors.append(caught.value)
    assert errors[0] is not errors[1]  # never the same instance re-raised (it would collect tracebacks)
    assert errors[0].type == "policy_denied" and errors[0].rule == "usd-month"
    assert "'mystery-model'" in errors[0].message
    with pytest.raises(GatewayError, match="'another-model'"):  # each refusal names its own call's model
        planner.plan(chat("another-model"), OPENAI, "", DAY_END)


def test_an_unpriced_model_under_a_lenient_budget_is_noted_by_name() -> None:
    planner = Planner(agent((usd_per_month(allow_unestimated=True), tokens_per_day())))
    one = planner.plan(chat("model-a"), OPENAI, "", DAY_END)
    two = planner.plan(chat("model-b"), OPENAI, "", DAY_END)
    assert one.notes == ("usd-month: no price for 'model-a', not charged",)
    assert two.notes == ("usd-month: no price for 'model-b', not charged",)
    assert two.plan is not None and [b.id for b in two.plan.budgets] == ["tokens-day"]


def test_output_without_max_tokens_default_strict_and_lenient() -> None:
    with_default = Planner(agent((tokens_per_day(default_output_tokens=500),)))
    plan = with_default.plan(chat(max_output=None), OPENAI, "", DAY_END).plan
    assert plan is not None and plan.output == 500
    strict = Planner(agent((tokens_per_day(),)))
    with pytest.raises(GatewayError, match="sets no max_tokens") as caught:
        strict.plan(chat(max_output=None), OPENAI, "", DAY_END)
    assert caught.value.rule == "tokens-day"
    assert strict.plan(chat(max_output=20), OPENAI, "", DAY_END).plan is not None  # the same shape, capped call
    lenient = Planner(agent((tokens_per_day(allow_unestimated=True),)))
    planned = lenient.plan(chat(max_output=None), OPENAI, "", DAY_END)
    assert planned.notes == ("no max_tokens: reserved the prompt only",)
    assert planned.plan is not None and planned.plan.output == 0
    assert lenient.plan(chat(max_output=7), OPENAI, "", DAY_END).notes == ()  # the note is not cached into later calls


def test_clamping_sets_a_minimum_output() -> None:
    planner = Planner(agent((tokens_per_day(clamp_max_tokens=True),)))
    plan = planner.plan(chat(), OPENAI, "", DAY_END).plan
    assert plan is not None and plan.min_output == 1


def test_the_loop_detector_comes_first_and_is_keyed_by_the_call() -> None:
    rpm = RateLimitSpec("rpm", "minute", None, 100, None, LOC)
    planner = Planner(agent(rates=(rpm,), loop=LoopSpec(3, "minute")))
    a = planner.plan(chat(), OPENAI, "a" * 32, DAY_END).plan
    b = planner.plan(chat(), OPENAI, "b" * 32, DAY_END).plan
    assert a is not None and b is not None
    assert [r.id for r in a.rates] == [LOOP_ID, "rpm"]
    assert (a.rates[0].kind, a.rates[0].limit, a.rates[0].period) == ("loop", 3, 60.0)
    assert a.rates[0].key != b.rates[0].key and a.rates[0].key.endswith(":" + "a" * 32)
    assert a.rates[1] is b.rates[1]
    assert a.marker != b.marker  # one reservation marker per call


def test_plans_share_a_shape_exactly_while_their_counters_but_the_loop_detector_are_the_same() -> None:
    rpm = RateLimitSpec("rpm", "minute", None, 100, None, LOC)
    planner = Planner(agent((tokens_per_day(),), (rpm,), LoopSpec(3, "minute")))
    a = planner.plan(chat(), OPENAI, "a" * 64, DAY_END - 10).plan
    b = planner.plan(chat(max_output=9), OPENAI, "b" * 64, DAY_END - 5).plan
    tomorrow = planner.plan(chat(), OPENAI, "a" * 64, DAY_END + 5).plan
    erp = planner.plan(Action("erp", "http", "read", resource="vendors"), ERP, "a" * 64, DAY_END - 5).plan
    assert a is not None and b is not None and tomorrow is not None and erp is not None
    assert a.shape is not None and b.shape is a.shape
    assert (b.budgets, b.rates[1:]) == (a.budgets, a.rates[1:]) and b.rates[0] != a.rates[0]
    assert tomorrow.shape is not a.shape and tomorrow.budgets != a.budgets  # a new window: new counters
    assert erp.shape is not a.shape
    # A shape whose notes name the call's model is built per call, so it promises nothing.
    lenient = Planner(agent((usd_per_month(allow_unestimated=True), tokens_per_day())))
    noted = lenient.plan(chat("model-a"), OPENAI, "", DAY_END).plan
    assert noted is not None and noted.budgets and noted.shape is None


def test_nothing_to_reserve_without_limits() -> None:
    planned = Planner(agent()).plan(chat(), OPENAI, "", DAY_END)
    assert planned.plan is None and planned.notes == ()
