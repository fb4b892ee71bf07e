"""Prometheus metrics: a trace sink that counts what the trace events say, in a registry of its own.

Label values come from the rules (agents, upstreams, rule ids) or from small fixed sets, never from paths; the
few that a request can influence (verb, model) are capped per label, so no caller can grow the series without bound.
"""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .trace.event import TraceEvent

# What `generate_latest` writes (the classic text format); every Prometheus-compatible scraper reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

NONE = "none"  # a label whose field the event does not carry
OTHER = "other"  # a label value past the per-label cap
LABEL_VALUES_CAP = 200  # distinct values kept per label name

# LLM calls can take minutes and held calls up to their timeout, so the buckets reach further than the defaults.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HOLD_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 14400.0)

# The limit stage's notes (gateway/limits/enforce.py), and the store operation each one means failed.
_STORE_NOTES = (("limits store unavailable at settlement", "settle"), ("limits store unavailable", "reserve"))

_Child = TypeVar("_Child", Counter, Gauge, Histogram)


class _Capped:
    """The first `cap` distinct values of one label pass as they are; later ones become `other`."""

    def __init__(self, cap: int = LABEL_VALUES_CAP) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: object) -> str:
        if value is None:
            return NONE
        text = str(value)
        if text in self.seen:
            return text
        if len(self.seen) >= self.cap:
            return OTHER
        self.seen.add(text)
        return text


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else NONE


class Metrics:
    """`emit` runs on the event loop once per call: label children are cached, and nothing does I/O."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("agent_gateway_requests", "Calls by agent, upstream, verb, decision and status class",
                                ["agent", "upstream", "verb", "decision", "status_class"], registry=r)
        self.request_seconds = Histogram("agent_gateway_request_seconds", "Time from request to answer",
                                         ["upstream"], buckets=REQUEST_BUCKETS, registry=r)
        self.upstream_seconds = Histogram("agent_gateway_upstream_seconds", "Time spent waiting on the upstream",
                                          ["upstream"], buckets=REQUEST_BUCKETS, registry=r)
        self.hold_wait_seconds = Histogram("agent_gateway_hold_wait_seconds", "Time held calls waited for a human",
                                           ["agent"], buckets=HOLD_BUCKETS, registry=r)
        self.approvals = Counter("agent_gateway_approvals", "Held calls by outcome", ["agent", "outcome"], registry=r)
        self.tokens = Counter("agent_gateway_tokens", "Tokens used, as the upstream reported them",
                              ["agent", "model", "direction"], registry=r)
        self.cost_usd = Counter("agent_gateway_cost_usd", "Cost of calls in US dollars, from the upstream's prices",
                                ["agent", "model"], registry=r)
        self.budget_used = Gauge("agent_gateway_budget_used", "Budget use in its window, as last seen",
                                 ["agent", "budget", "unit"], registry=r)
        self.budget_limit = Gauge("agent_gateway_budget_limit", "Budget limit per window",
                                  ["agent", "budget", "unit"], registry=r)
        self.store_errors = Counter("agent_gateway_store_errors", "Limits store operations that failed",
                                    ["operation"], registry=r)
        self.budget_alerts = Counter("agent_gateway_budget_alerts", "Budget alert thresholds crossed",
                                     ["agent", "budget"], registry=r)
        self.rate_limited = Counter("agent_gateway_rate_limited", "Calls refused by a rate limit or loop detector",
                                    ["agent", "detail"], registry=r)
        self.staged = Counter("agent_gateway_staged_rule", "Calls a staged (shadow or warn) rule matched, by what it "
                              "would have done", ["rule", "outcome"], registry=r)
        self.rules_reloads = Counter("agent_gateway_rules_reloads", "Rule reloads by result", ["result"], registry=r)
        self._values: dict[str, _Capped] = {}
        self._children: dict[tuple[Any, ...], Any] = {}

    def _label(self, name: str, value: object) -> str:
        capped = self._values.get(name)
        if capped is None:
            capped = self._values[name] = _Capped()
        return capped(value)

    def _child(self, metric: _Child, *values: str) -> _Child:
        key = (id(metric), *values)
        child: _Child | None = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def emit(self, event: TraceEvent) -> None:
        agent = self._label("agent", event.agent)
        if event.kind is None:
            self._call(event, agent)
            for entry in event.shadow or ():
                self._child(self.staged, self._label("rule", entry["rule"]), f"would_{entry['would']}").inc()
            for entry in event.warnings or ():
                self._child(self.staged, self._label("rule", entry["rule"]), f"warn_{entry['warn']}").inc()
        elif event.kind in ("rules_loaded", "rules_rejected"):
            self._child(self.rules_reloads, "loaded" if event.kind == "rules_loaded" else "rejected").inc()
        elif event.kind == "budget_alert" and event.budget:
            self._child(self.budget_alerts, agent, self._label("budget", event.budget.get("id"))).inc()
        if event.budget:
            budget, unit = self._label("budget", event.budget.get("id")), self._label("unit", event.budget.get("unit"))
            if isinstance(used := event.budget.get("used"), int | float):
                self._child(self.budget_used, agent, budget, unit).set(used)
            if isinstance(limit := event.budget.get("limit"), int | float):
                self._child(self.budget_limit, agent, budget, unit).set(limit)
        for note in event.limits or ():
            for prefix, operation in _STORE_NOTES:
                if note.startswith(prefix):
                    self._child(self.store_errors, operation).inc()
                    break

    def _call(self, event: TraceEvent, agent: str) -> None:
        upstream = self._label("upstream", event.upstream)
        # No decision means the call failed before one was made (unauthenticated, bad request, ...).
        decision = self._label("decision", event.decision or "error")
        self._child(self.requests, agent, upstream, self._label("verb", event.verb), decision,
                    status_class(event.status)).inc()
        if event.latency_ms is not None:
            self._child(self.request_seconds, upstream).observe(event.latency_ms / 1000)
        if event.upstream_ms is not None:
            self._child(self.upstream_seconds, upstream).observe(event.upstream_ms / 1000)
        if event.approval and event.decision == "hold":
            self._approval(event.approval, agent)
        if event.tokens or event.cost_usd:
            model = self._label("model", event.model)
            for direction in ("input", "output"):
                if count := (event.tokens or {}).get(direction):
                    self._child(self.tokens, agent, model, direction).inc(count)
            if event.cost_usd:
                self._child(self.cost_usd, agent, model).inc(event.cost_usd)
        if event.error in ("store_unavailable", "rate_limited"):
            # The error's finer reason, when the pipeline records it (GatewayError.detail, as the agent sees it).
            detail = (event.detail or {}).get("error_detail")
            if event.error == "store_unavailable":
                self._child(self.store_errors, "approval" if detail == "approvals_store" else "reserve").inc()
            else:
                self._child(self.rate_limited, agent, self._label("detail", detail or "rate_limit")).inc()

    def _approval(self, approval: dict[str, Any], agent: str) -> None:
        # Passed on an earlier decision (already counted when it was made), without waiting for a human.
        if approval.get("retry_of_abandoned"):
            self._child(self.approvals, agent, "reused").inc()
            return
        if approval.get("remembered_until") and not approval.get("waited_ms"):
            self._child(self.approvals, agent, "remembered").inc()
            return
        self._child(self.approvals, agent, self._label("outcome", approval.get("outcome"))).inc()
        waited = approval.get("waited_ms")
        if isinstance(waited, int | float):
            self._child(self.hold_wait_seconds, agent).observe(waited / 1000)

    def render(self) -> bytes:
        """Every metric in the text exposition format (serve it as `CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def close(self) -> None:
        pass


METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
