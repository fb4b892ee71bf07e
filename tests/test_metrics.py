"""Prometheus metrics from trace events: exact samples in the sink's own registry, and a parseable rendering."""

from __future__ import annotations

import re
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import CONTENT_TYPE, HOLD_BUCKETS, LABEL_VALUES_CAP, REQUEST_BUCKETS, Metrics
from gateway.trace.event import TraceEvent

HOLD_RULE = "invoice-bot.yaml#hold[0]"


def event(**fields: Any) -> TraceEvent:
    return TraceEvent(trace_id="0" * 32, span_id="0" * 16, ts=1700000000.0, **fields)


def call(**fields: Any) -> TraceEvent:
    base: dict[str, Any] = {"agent": "invoice-bot", "upstream": "erp", "method": "GET", "path": "/erp/vendors/1",
                            "verb": "read", "resource": "vendors", "decision": "allow", "status": 200,
                            "latency_ms": 12.0, "upstream_ms": 8.0}
    return event(**{**base, **fields})


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value(name, labels)
    return value


def test_requests_counted_by_agent_upstream_verb_decision_and_status_class(metrics: Metrics) -> None:
    metrics.emit(call())
    metrics.emit(call(path="/erp/vendors/2"))  # another path, the same series
    metrics.emit(call(verb="create", resource="payments", decision="deny", status=403, error="policy_denied"))
    metrics.emit(call(status=502, error="upstream_error"))
    labels = {"agent": "invoice-bot", "upstream": "erp", "verb": "read", "decision": "allow"}
    assert sample(metrics, "agent_gateway_requests_total", **labels, status_class="2xx") == 2
    assert sample(metrics, "agent_gateway_requests_total", **labels, status_class="5xx") == 1
    assert sample(metrics, "agent_gateway_requests_total", agent="invoice-bot", upstream="erp", verb="create",
                  decision="deny", status_class="4xx") == 1


def test_call_failing_before_a_decision_counts_as_error(metrics: Metrics) -> None:
    metrics.emit(event(method="GET", path="/nowhere/x", status=401, error="unauthenticated", latency_ms=1.0))
    assert sample(metrics, "agent_gateway_requests_total", agent="none", upstream="none", verb="none",
                  decision="error", status_class="4xx") == 1


def test_latencies_observed_in_seconds_by_upstream(metrics: Metrics) -> None:
    metrics.emit(call(latency_ms=20.0, upstream_ms=15.0))
    metrics.emit(call(latency_ms=3000.0, upstream_ms=2900.0))
    assert sample(metrics, "agent_gateway_request_seconds_count", upstream="erp") == 2
    assert sample(metrics, "agent_gateway_request_seconds_sum", upstream="erp") == pytest.approx(3.02)
    assert sample(metrics, "agent_gateway_request_seconds_bucket", upstream="erp", le="0.025") == 1
    assert sample(metrics, "agent_gateway_request_seconds_bucket", upstream="erp", le="5.0") == 2
    assert sample(metrics, "agent_gateway_upstream_seconds_sum", upstream="erp") == pytest.approx(2.915)
    assert sample(metrics, "agent_gateway_upstream_seconds_bucket", upstream="erp", le="0.025") == 1


def test_held_calls_count_outcomes_and_observe_the_wait(metrics: Metrics) -> None:
    metrics.emit(call(verb="create", decision="hold", rule=HOLD_RULE, status=201,
                      approval={"id": "a1", "by": "admin", "outcome": "approved", "waited_ms": 4000.0}))
    metrics.emit(call(verb="create", decision="hold", rule=HOLD_RULE, status=403, error="approval_denied",
                      approval={"id": "a2", "by": "admin", "outcome": "denied", "waited_ms": 90000.0}))
    metrics.emit(call(verb="create", decision="hold", rule=HOLD_RULE, status=201,
                      approval={"id": "a3", "by": "admin", "outcome": "approved", "waited_ms": 0.0,
                                "retry_of_abandoned": True}))
    metrics.emit(call(verb="create", decision="hold", rule=HOLD_RULE, status=201,  # "approve and remember"
                      approval={"id": "a1", "by": "admin", "outcome": "approved", "waited_ms": 0.0,
                                "remembered_until": 1700028800.0}))
    assert sample(metrics, "agent_gateway_approvals_total", agent="invoice-bot", outcome="approved") == 1
    assert sample(metrics, "agent_gateway_approvals_total", agent="invoice-bot", outcome="denied") == 1
    assert sample(metrics, "agent_gateway_approvals_total", agent="invoice-bot", outcome="reused") == 1
    assert sample(metrics, "agent_gateway_approvals_total", agent="invoice-bot", outcome="remembered") == 1
    assert sample(metrics, "agent_gateway_hold_wait_seconds_count", agent="invoice-bot") == 2
    assert sample(metrics, "agent_gateway_hold_wait_seconds_sum", agent="invoice-bot") == 94.0
    assert sample(metrics, "agent_gateway_hold_wait_seconds_bucket", agent="invoice-bot", le="5.0") == 1


def test_tokens_and_cost_by_agent_and_model(metrics: Metrics) -> None:
    llm = {"upstream": "openai", "verb": "chat", "resource": "gpt-4o-mini", "model": "gpt-4o-mini"}
    metrics.emit(call(**llm, tokens={"input": 120, "output": 30}, cost_usd=0.000036))
    metrics.emit(call(**llm, tokens={"input": 80, "output": 0}, cost_usd=0.000012))
    labels = {"agent": "invoice-bot", "model": "gpt-4o-mini"}
    assert sample(metrics, "agent_gateway_tokens_total", **labels, direction="input") == 200
    assert sample(metrics, "agent_gateway_tokens_total", **labels, direction="output") == 30
    assert sample(metrics, "agent_gateway_cost_usd_total", **labels) == pytest.approx(0.000048)


def test_budget_gauges_follow_the_latest_event(metrics: Metrics) -> None:
    budget = {"id": "invoice-bot.yaml#budgets[0]", "unit": "tokens", "limit": 200000, "window": "2024-01-01",
              "resets_at": 1704153600.0}
    metrics.emit(call(budget={**budget, "used": 1500}))
    metrics.emit(call(budget={**budget, "used": 1650}))
    labels = {"agent": "invoice-bot", "budget": "invoice-bot.yaml#budgets[0]", "unit": "tokens"}
    assert sample(metrics, "agent_gateway_budget_used", **labels) == 1650
    assert sample(metrics, "agent_gateway_budget_limit", **labels) == 200000


def test_budget_alert_records_count_and_update_the_gauge(metrics: Metrics) -> None:
    state = {"id": "usd-bot.yaml#budgets[0]", "unit": "usd", "used": 12.5, "limit": 25.0, "window": "2024-01"}
    metrics.emit(event(kind="budget_alert", agent="usd-bot", budget=state, detail={"threshold": 0.5}))
    assert sample(metrics, "agent_gateway_budget_alerts_total", agent="usd-bot",
                  budget="usd-bot.yaml#budgets[0]") == 1
    assert sample(metrics, "agent_gateway_budget_used", agent="usd-bot", budget="usd-bot.yaml#budgets[0]",
                  unit="usd") == 12.5
    assert sample(metrics, "agent_gateway_requests_total", agent="usd-bot", upstream="none", verb="none",
                  decision="error", status_class="none") is None  # an alert is not a call


def test_store_errors_by_operation(metrics: Metrics) -> None:
    metrics.emit(call(status=503, error="store_unavailable"))
    metrics.emit(call(decision="hold", status=503, error="store_unavailable",
                      detail={"error_detail": "approvals_store"}))
    metrics.emit(call(limits=["limits store unavailable (timed out); admitted unmetered: upstream 'erp' sets "
                              "on_store_error: allow"]))
    metrics.emit(call(limits=["limits store unavailable at settlement (timed out): queued, retried until it "
                              "applies"]))
    metrics.emit(call(limits=["max_tokens clamped from 500 to 200 by the budget"]))
    assert sample(metrics, "agent_gateway_store_errors_total", operation="reserve") == 2
    assert sample(metrics, "agent_gateway_store_errors_total", operation="settle") == 1
    assert sample(metrics, "agent_gateway_store_errors_total", operation="approval") == 1


def test_rate_limited_calls_by_detail(metrics: Metrics) -> None:
    metrics.emit(call(status=429, error="rate_limited"))
    metrics.emit(call(status=429, error="rate_limited", detail={"error_detail": "loop_detected"}))
    metrics.emit(call(status=429, error="budget_exceeded"))
    assert sample(metrics, "agent_gateway_rate_limited_total", agent="invoice-bot", detail="rate_limit") == 1
    assert sample(metrics, "agent_gateway_rate_limited_total", agent="invoice-bot", detail="loop_detected") == 1


def test_request_chosen_label_values_are_capped(metrics: Metrics) -> None:
    for n in range(LABEL_VALUES_CAP + 5):  # e.g. an MCP client inventing JSON-RPC methods
        metrics.emit(call(upstream="crm-tools", verb=f"made/up-{n}"))
    assert sample(metrics, "agent_gateway_requests_total", agent="invoice-bot", upstream="crm-tools",
                  verb="made/up-0", decision="allow", status_class="2xx") == 1
    assert sample(metrics, "agent_gateway_requests_total", agent="invoice-bot", upstream="crm-tools",
                  verb="other", decision="allow", status_class="2xx") == 5


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # would raise "Duplicated timeseries" in a shared registry
    first.emit(call())
    assert sample(second, "agent_gateway_requests_total", agent="invoice-bot", upstream="erp", verb="read",
                  decision="allow", status_class="2xx") is None
    assert REGISTRY.get_sample_value("agent_gateway_requests_total", {"agent": "invoice-bot", "upstream": "erp",
                                     "verb": "read", "decision": "allow", "status_class": "2xx"}) is None


def test_render_is_parseable_text_exposition(metrics: Metrics) -> None:
    metrics.emit(call())
    metrics.emit(call())
    metrics.emit(call(verb='odd "verb" \\ with\na newline'))  # a JSON-RPC method name can be anything
    metrics.emit(call(budget={"id": "b", "unit": "usd", "used": 1.5, "limit": 25.0}))
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["agent_gateway_requests"].type == "counter"
    assert families["agent_gateway_request_seconds"].type == "histogram"
    assert families["agent_gateway_budget_used"].type == "gauge"
    totals = {s.labels["verb"]: s.value for s in families["agent_gateway_requests"].samples
              if s.name == "agent_gateway_requests_total"}
    assert totals == {"read": 3.0, 'odd "verb" \\ with\na newline': 1.0}
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_close_is_harmless(metrics: Metrics) -> None:
    metrics.close()
    metrics.emit(call())
    assert sample(metrics, "agent_gateway_requests_total", agent="invoice-bot", upstream="erp", verb="read",
                  decision="allow", status_class="2xx") == 1


def without_created_values(text: str) -> str:
    """The exposition with each `_created` sample's value (a timestamp, when the series first counted) blanked."""
    return re.sub(r"^(\w+_created(?:\{.*\})?) \S+$", r"\1 T", text, flags=re.MULTILINE)


def test_render_matches_prometheus_client_own_metrics_for_the_same_observations(metrics: Metrics) -> None:
    """The plain counting renders exactly as prometheus_client's Counter, Gauge and Histogram would."""
    llm = {"upstream": "openai", "verb": "chat", "model": "gpt-4o-mini"}
    budget = {"id": "b", "unit": "tokens", "used": 1500, "limit": 200000, "window": "2024-01-01"}
    hold = {"verb": "create", "decision": "hold", "rule": HOLD_RULE}
    events = [
        call(),
        call(latency_ms=5.0, upstream_ms=0.0),  # exactly on a bucket bound, and zero
        call(latency_ms=300000.0, upstream_ms=400000.0, status=504),  # on the last bound, and past it
        call(**llm, latency_ms=412.5, upstream_ms=398.1, tokens={"input": 120, "output": 30}, cost_usd=0.000036,
             budget={**budget, "used": 1500}),
        call(**llm, latency_ms=0.1, upstream_ms=None, tokens={"input": 80, "output": 0}, cost_usd=0.1,
             budget={**budget, "used": 1650.5}),
        call(**hold, status=201, approval={"outcome": "approved", "waited_ms": 4000.0}),
        call(**hold, status=403, approval={"outcome": "timeout", "waited_ms": 20000000.0}),
        call(**hold, status=201, approval={"outcome": "approved", "waited_ms": 0.0, "retry_of_abandoned": True}),
        call(status=503, error="store_unavailable", limits=["limits store unavailable at settlement (x)"]),
        call(status=429, error="rate_limited", detail={"error_detail": "loop_detected"},
             shadow=[{"rule": "r.yaml#deny[0]", "would": "deny"}], warnings=[{"rule": "r.yaml#warn[0]",
                                                                               "warn": "log"}]),
        event(method="GET", path="/x", status=401, error="unauthenticated", latency_ms=1.0),
        event(kind="budget_alert", agent="usd-bot", budget={"id": "u", "unit": "usd", "used": 12.5, "limit": 25}),
        event(kind="rules_loaded"), event(kind="rules_rejected"), event(kind="rules_loaded"),
    ]
    for e in events:
        metrics.emit(e)

    ref = CollectorRegistry()
    requests = Counter("agent_gateway_requests", "Calls by agent, upstream, verb, decision and status class",
                       ["agent", "upstream", "verb", "decision", "status_class"], registry=ref)
    request_seconds = Histogram("agent_gateway_request_seconds", "Time from request to answer", ["upstream"],
                                buckets=REQUEST_BUCKETS, registry=ref)
    upstream_seconds = Histogram("agent_gateway_upstream_seconds", "Time spent waiting on the upstream", ["upstream"],
                                 buckets=REQUEST_BUCKETS, registry=ref)
    hold_wait = Histogram("agent_gateway_hold_wait_seconds", "Time held calls waited for a human", ["agent"],
                          buckets=HOLD_BUCKETS, registry=ref)
    approvals = Counter("agent_gateway_approvals", "Held calls by outcome", ["agent", "outcome"], registry=ref)
    tokens = Counter("agent_gateway_tokens", "Tokens used, as the upstream reported them",
                     ["agent", "model", "direction"], registry=ref)
    cost = Counter("agent_gateway_cost_usd", "Cost of calls in US dollars, from the upstream's prices",
                   ["agent", "model"], registry=ref)
    used = Gauge("agent_gateway_budget_used", "Budget use in its window, as last seen", ["agent", "budget", "unit"],
                 registry=ref)
    limit = Gauge("agent_gateway_budget_limit", "Budget limit per window", ["agent", "budget", "unit"], registry=ref)
    store = Counter("agent_gateway_store_errors", "Limits store operations that failed", ["operation"], registry=ref)
    alerts = Counter("agent_gateway_budget_alerts", "Budget alert thresholds crossed", ["agent", "budget"],
                     registry=ref)
    limited = Counter("agent_gateway_rate_limited", "Calls refused by a rate limit or loop detector",
                      ["agent", "detail"], registry=ref)
    staged = Counter("agent_gateway_staged_rule", "Calls a staged (shadow or warn) rule matched, by what it would "
                     "have done", ["rule", "outcome"], registry=ref)
    reloads = Counter("agent_gateway_rules_reloads", "Rule reloads by result", ["result"], registry=ref)
    bot = "invoice-bot"
    for status_cls, latency, upstream_latency in (("2xx", 0.012, 0.008), ("2xx", 0.005, 0.0),
                                                  ("5xx", 300.0, 400.0)):
        requests.labels(bot, "erp", "read", "allow", status_cls).inc()
        request_seconds.labels("erp").observe(latency)
        upstream_seconds.labels("erp").observe(upstream_latency)
    requests.labels(bot, "openai", "chat", "allow", "2xx").inc()
    request_seconds.labels("openai").observe(0.4125)
    upstream_seconds.labels("openai").observe(398.1 / 1000)
    tokens.labels(bot, "gpt-4o-mini", "input").inc(120)
    tokens.labels(bot, "gpt-4o-mini", "output").inc(30)
    cost.labels(bot, "gpt-4o-mini").inc(0.000036)
    used.labels(bot, "b", "tokens").set(1500)
    limit.labels(bot, "b", "tokens").set(200000)
    requests.labels(bot, "openai", "chat", "allow", "2xx").inc()
    request_seconds.labels("openai").observe(0.0001)
    tokens.labels(bot, "gpt-4o-mini", "input").inc(80)
    cost.labels(bot, "gpt-4o-mini").inc(0.1)
    used.labels(bot, "b", "tokens").set(1650.5)
    for status_cls, outcome, waited in (("2xx", "approved", 4.0), ("4xx", "timeout", 20000.0)):
        requests.labels(bot, "erp", "create", "hold", status_cls).inc()
        request_seconds.labels("erp").observe(0.012)
        upstream_seconds.labels("erp").observe(0.008)
        approvals.labels(bot, outcome).inc()
        hold_wait.labels(bot).observe(waited)
    requests.labels(bot, "erp", "create", "hold", "2xx").inc()
    request_seconds.labels("erp").observe(0.012)
    upstream_seconds.labels("erp").observe(0.008)
    approvals.labels(bot, "reused").inc()
    requests.labels(bot, "erp", "read", "allow", "5xx").inc()
    request_seconds.labels("erp").observe(0.012)
    upstream_seconds.labels("erp").observe(0.008)
    store.labels("reserve").inc()
    store.labels("settle").inc()
    requests.labels(bot, "erp", "read", "allow", "4xx").inc()
    request_seconds.labels("erp").observe(0.012)
    upstream_seconds.labels("erp").observe(0.008)
    limited.labels(bot, "loop_detected").inc()
    staged.labels("r.yaml#deny[0]", "would_deny").inc()
    staged.labels("r.yaml#warn[0]", "warn_log").inc()
    requests.labels("none", "none", "none", "error", "4xx").inc()
    request_seconds.labels("none").observe(0.001)
    alerts.labels("usd-bot", "u").inc()
    used.labels("usd-bot", "u", "usd").set(12.5)
    limit.labels("usd-bot", "u", "usd").set(25)
    reloads.labels("loaded").inc()
    reloads.labels("rejected").inc()
    reloads.labels("loaded").inc()

    rendered, expected = metrics.render().decode(), generate_latest(ref).decode()
    assert "_created{" in rendered
    assert without_created_values(rendered) == without_created_values(expected)
    parsed = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(rendered) for s in f.samples
              if not s.name.endswith("_created")]
    assert parsed == [(s.name, s.labels, s.value) for f in text_string_to_metric_families(expected)
                      for s in f.samples if not s.name.endswith("_created")]


def test_render_of_no_events_matches_prometheus_client(metrics: Metrics) -> None:
    """Every family is described even before it counts anything, as prometheus_client's labelled metrics are."""
    ref = CollectorRegistry()
    Counter("agent_gateway_requests", "Calls by agent, upstream, verb, decision and status class",
            ["agent", "upstream", "verb", "decision", "status_class"], registry=ref)
    Histogram("agent_gateway_request_seconds", "Time from request to answer", ["upstream"], buckets=REQUEST_BUCKETS,
              registry=ref)
    assert generate_latest(ref).decode() in metrics.render().decode()
    assert metrics.render().decode().count("# TYPE ") == 14
