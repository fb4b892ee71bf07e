"""Prometheus metrics: a trace sink that counts what the trace events say, in a registry of its own.

Label values come from the rules (agents, upstreams, rule ids) or from small fixed sets, never from paths; the
few that a request can influence (verb, model) are capped per label, so no caller can grow the series without bound.

`emit` runs on the event loop once per call, so the counting is plain Python arithmetic on dicts and lists: no
prometheus_client metric objects, whose every `inc`/`observe`/`set` takes a mutex and walks several Python objects
(about 9 of those per call cost ~8.5 µs an event; the arithmetic here costs ~2 µs). The values become
prometheus_client metric families only when scraped, through a collector in the sink's own registry, and render
exactly as prometheus_client's own Counter, Gauge and Histogram would (names, `_total`/`_created` series, labels,
buckets).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

import prometheus_client.metrics
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import INF, floatToGoString

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

_STATUS_CLASSES: dict[int | None, str] = {status: f"{status // 100}xx" for status in range(100, 600)}

_NUMBER = (int, float)  # for isinstance: a tuple is built once, where `int | float` makes a union each call

Key = tuple[str, ...]  # one series: its label values, in the order of the metric's label names


class _Capped:
    """The first `cap` distinct values of one label pass as they are; later ones become `other`."""

    def __init__(self, cap: int = LABEL_VALUES_CAP) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: object) -> str:
        try:
            if value in self.seen:  # the usual case: a str seen before (only strs are in `seen`, so it is one)
                return value
        except TypeError:  # unhashable: not seen as it is, perhaps as text
            pass
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


def _use_created() -> bool:
    """Whether prometheus_client writes `_created` series (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_...)."""
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class _Counter:
    """A labelled counter's values, by label values, and when each series first counted (its `_created`).

    Each value is a one-item list, a cell: one dict lookup (one hash of the key tuple) finds it, and `+=` on the
    cell stores no key again.
    """

    __slots__ = ("created", "documentation", "labelnames", "name", "values")

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.values: dict[Key, list[float]] = {}
        self.created: dict[Key, float] = {}

    def inc(self, key: Key, amount: float = 1.0) -> None:
        # Like prometheus_client's Counter.inc, which refuses a negative amount (by raising, here by ignoring it:
        # a bad trace field must not fail the other sinks).
        if amount < 0:
            return
        cell = self.values.get(key)
        if cell is None:
            cell = self.values[key] = [0.0]
            self.created[key] = time.time()
        cell[0] += amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = self.created if _use_created() else {}
        for key, (value,) in list(self.values.items()):
            family.add_metric(key, value, created.get(key))
        return family


class _Gauge:
    """A labelled gauge's last values, by label values."""

    __slots__ = ("documentation", "labelnames", "name", "values")

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.values: dict[Key, float] = {}

    def family(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, value in list(self.values.items()):
            family.add_metric(key, value)
        return family


class _Histogram:
    """A labelled histogram: per series a list of the count in each bucket (not cumulative), then the sum."""

    __slots__ = ("bounds", "created", "documentation", "labelnames", "les", "name", "series")

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.bounds = (*buckets, INF)
        self.les = tuple(floatToGoString(bound) for bound in self.bounds)  # type: ignore[no-untyped-call]
        self.series: dict[Key, list[float]] = {}
        self.created: dict[Key, float] = {}

    def observe(self, key: Key, value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0] * len(self.bounds) + [0.0]
            self.created[key] = time.time()
        # The first bucket whose upper bound is >= value, as prometheus_client's Histogram.observe picks it (a NaN,
        # which no latency is, would land in the first bucket here and in none there).
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = self.created if _use_created() else {}
        for key, series in list(self.series.items()):
            series = series[:]  # one atomic copy: buckets and sum from the same moment
            buckets, total = [], 0.0
            for le, count in zip(self.les, series, strict=False):
                total += count
                buckets.append((le, total))
            family.add_metric(key, buckets, series[-1])
            if (at := created.get(key)) is not None:
                family.samples.append(Sample(self.name + "_created", dict(zip(self.labelnames, key, strict=True)),
                                             at))
        return family


class _Collector:
    """Turns the sink's plain values into metric families when the registry is collected (at scrape time)."""

    def __init__(self, metrics: tuple[_Counter | _Gauge | _Histogram, ...]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()

    def describe(self) -> Iterator[Metric]:
        """The families' names only, so the registry can tell duplicates and restrict by name."""
        for metric in self.metrics:
            if isinstance(metric, _Counter):
                yield CounterMetricFamily(metric.name, metric.documentation, labels=metric.labelnames)
            elif isinstance(metric, _Gauge):
                yield GaugeMetricFamily(metric.name, metric.documentation, labels=metric.labelnames)
            else:
                yield HistogramMetricFamily(metric.name, metric.documentation, labels=metric.labelnames)


class Metrics:
    """`emit` runs on the event loop once per call: dict and list arithmetic only, and nothing does I/O.

    No locks: every `emit` runs on the one event loop thread, and so does the scrape (GET /metrics renders
    synchronously on the loop, so it never sees an event half counted). Collection still copies each dict and
    histogram series with one C-level copy, so a render from another thread would not fail on a dict changing size.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = _Counter("agent_gateway_requests", "Calls by agent, upstream, verb, decision and status class",
                                 ("agent", "upstream", "verb", "decision", "status_class"))
        self.request_seconds = _Histogram("agent_gateway_request_seconds", "Time from request to answer",
                                          ("upstream",), REQUEST_BUCKETS)
        self.upstream_seconds = _Histogram("agent_gateway_upstream_seconds", "Time spent waiting on the upstream",
                                           ("upstream",), REQUEST_BUCKETS)
        self.hold_wait_seconds = _Histogram("agent_gateway_hold_wait_seconds", "Time held calls waited for a human",
                                            ("agent",), HOLD_BUCKETS)
        self.approvals = _Counter("agent_gateway_approvals", "Held calls by outcome", ("agent", "outcome"))
        self.tokens = _Counter("agent_gateway_tokens", "Tokens used, as the upstream reported them",
                               ("agent", "model", "direction"))
        self.cost_usd = _Counter("agent_gateway_cost_usd", "Cost of calls in US dollars, from the upstream's prices",
                                 ("agent", "model"))
        self.budget_used = _Gauge("agent_gateway_budget_used", "Budget use in its window, as last seen",
                                  ("agent", "budget", "unit"))
        self.budget_limit = _Gauge("agent_gateway_budget_limit", "Budget limit per window",
                                   ("agent", "budget", "unit"))
        self.store_errors = _Counter("agent_gateway_store_errors", "Limits store operations that failed",
                                     ("operation",))
        self.budget_alerts = _Counter("agent_gateway_budget_alerts", "Budget alert thresholds crossed",
                                      ("agent", "budget"))
        self.rate_limited = _Counter("agent_gateway_rate_limited", "Calls refused by a rate limit or loop detector",
                                     ("agent", "detail"))
        self.staged = _Counter("agent_gateway_staged_rule", "Calls a staged (shadow or warn) rule matched, by what it "
                               "would have done", ("rule", "outcome"))
        self.rules_reloads = _Counter("agent_gateway_rules_reloads", "Rule reloads by result", ("result",))
        # The scrape's order is this order, the order the metrics were registered in before (one object each).
        self.registry.register(_Collector((
            self.requests, self.request_seconds, self.upstream_seconds, self.hold_wait_seconds, self.approvals,
            self.tokens, self.cost_usd, self.budget_used, self.budget_limit, self.store_errors, self.budget_alerts,
            self.rate_limited, self.staged, self.rules_reloads)))
        self._values: dict[str, _Capped] = {}
        # The labels most events carry, as bound methods: the hot path calls them without a dict lookup, and a
        # bound method is called in about half the time an instance's `__call__` is.
        self._agent, self._upstream = self._capped("agent").__call__, self._capped("upstream").__call__
        self._verb, self._decision = self._capped("verb").__call__, self._capped("decision").__call__
        self._model, self._budget = self._capped("model").__call__, self._capped("budget").__call__
        self._unit = self._capped("unit").__call__

    def _capped(self, name: str) -> _Capped:
        capped = self._values.get(name)
        if capped is None:
            capped = self._values[name] = _Capped()
        return capped

    def _label(self, name: str, value: object) -> str:
        return self._capped(name)(value)

    def emit(self, event: TraceEvent) -> None:
        agent = self._agent(event.agent)
        if event.kind is None:
            self._call(event, agent)
            for entry in event.shadow or ():
                self.staged.inc((self._label("rule", entry["rule"]), f"would_{entry['would']}"))
            for entry in event.warnings or ():
                self.staged.inc((self._label("rule", entry["rule"]), f"warn_{entry['warn']}"))
        elif event.kind in ("rules_loaded", "rules_rejected"):
            self.rules_reloads.inc(("loaded" if event.kind == "rules_loaded" else "rejected",))
        elif event.kind == "budget_alert" and event.budget:
            self.budget_alerts.inc((agent, self._budget(event.budget.get("id"))))
        if budget_state := event.budget:
            key = (agent, self._budget(budget_state.get("id")), self._unit(budget_state.get("unit")))
            if isinstance(used := budget_state.get("used"), _NUMBER):
                self.budget_used.values[key] = float(used)
            if isinstance(limit := budget_state.get("limit"), _NUMBER):
                self.budget_limit.values[key] = float(limit)
        for note in event.limits or ():
            for prefix, operation in _STORE_NOTES:
                if note.startswith(prefix):
                    self.store_errors.inc((operation,))
                    break

    def _call(self, event: TraceEvent, agent: str) -> None:
        upstream = self._upstream(event.upstream)
        # No decision means the call failed before one was made (unauthenticated, bad request, ...).
        decision = self._decision(event.decision or "error")
        self.requests.inc((agent, upstream, self._verb(event.verb), decision,
                           _STATUS_CLASSES.get(event.status, NONE)))  # what status_class() says, looked up
        if event.latency_ms is not None:
            self.request_seconds.observe((upstream,), event.latency_ms / 1000)
        if event.upstream_ms is not None:
            self.upstream_seconds.observe((upstream,), event.upstream_ms / 1000)
        if event.approval and event.decision == "hold":
            self._approval(event.approval, agent)
        if event.tokens or event.cost_usd:
            model = self._model(event.model)
            if tokens := event.tokens:
                for direction in ("input", "output"):
                    if count := tokens.get(direction):
                        self.tokens.inc((agent, model, direction), count)
            if event.cost_usd:
                self.cost_usd.inc((agent, model), event.cost_usd)
        if event.error in ("store_unavailable", "rate_limited"):
            # The error's finer reason, when the pipeline records it (GatewayError.detail, as the agent sees it).
            detail = (event.detail or {}).get("error_detail")
            if event.error == "store_unavailable":
                self.store_errors.inc(("approval" if detail == "approvals_store" else "reserve",))
            else:
                self.rate_limited.inc((agent, self._label("detail", detail or "rate_limit")))

    def _approval(self, approval: dict[str, Any], agent: str) -> None:
        # Passed on an earlier decision (already counted when it was made), without waiting for a human.
        if approval.get("retry_of_abandoned"):
            self.approvals.inc((agent, "reused"))
            return
        if approval.get("remembered_until") and not approval.get("waited_ms"):
            self.approvals.inc((agent, "remembered"))
            return
        self.approvals.inc((agent, self._label("outcome", approval.get("outcome"))))
        waited = approval.get("waited_ms")
        if isinstance(waited, _NUMBER):
            self.hold_wait_seconds.observe((agent,), waited / 1000)

    def render(self) -> bytes:
        """Every metric in the text exposition format (serve it as `CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def close(self) -> None:
        pass


METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
