"""The trace event: a fixed schema (DESIGN.md "Trace events"), one JSON object per line."""

from __future__ import annotations

import operator
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


# Trace and span ids need to be unique and unpredictable enough not to collide, not secret: a PRNG seeded from
# os.urandom (reseeded after a fork) gives them without a getrandom system call per id, twice per request.
def _reseed() -> None:
    global _bits
    _bits = random.Random(os.urandom(32)).getrandbits


_bits = random.Random(os.urandom(32)).getrandbits
os.register_at_fork(after_in_child=_reseed)


def new_trace_id() -> str:
    """32 hex digits, never all zeros (W3C trace context forbids that id)."""
    return f"{_bits(128) or 1:032x}"


def new_span_id() -> str:
    """16 hex digits, never all zeros."""
    return f"{_bits(64) or 1:016x}"


@dataclass(slots=True)
class TraceEvent:
    """Filled in stage by stage while a request runs, then emitted once. Never holds a credential."""

    trace_id: str
    span_id: str
    ts: float = field(default_factory=time.time)
    kind: str | None = None  # None for a call; `budget_alert`, `settlement_pending`, ... for other records
    agent: str | None = None
    upstream: str | None = None
    method: str | None = None
    path: str | None = None
    verb: str | None = None
    resource: str | None = None
    tool: str | None = None
    model: str | None = None
    decision: str | None = None
    rule: str | None = None
    policy_version: str | None = None
    mode: str | None = None
    reason: str | None = None
    evidence: Mapping[str, Any] | None = None
    approval: dict[str, Any] | None = None
    status: int | None = None
    error: str | None = None
    latency_ms: float | None = None
    upstream_ms: float | None = None
    tokens: dict[str, int] | None = None
    cost_usd: float | None = None
    budget: dict[str, Any] | None = None  # the tightest budget after this call: id, unit, used, limit, window
    rate_limit: dict[str, Any] | None = None  # the tightest rate limit: id, remaining, limit
    limits: list[str] | None = None  # notes from the limit stage (store unavailable, usage missing, ...)
    stream: bool | None = None
    # Staged rules that matched: shadow rules as {"rule", "would": "deny"|"hold"}, warn rules as {"rule", "warn"}.
    shadow: list[dict[str, Any]] | None = None
    warnings: list[dict[str, Any]] | None = None
    # The redacted request record `replay` re-decides from (rules' `capture:`): method, path, query, headers, json.
    capture: dict[str, Any] | None = None
    # Extra records: batch elements' decisions, usage notes, ...
    detail: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The set fields, by reference (no deep copy): the event is final once emitted."""
        # One C-level attrgetter call reads every field: about half the cost of a getattr per field.
        return {name: value for name, value in zip(_FIELDS, _VALUES(self)) if value is not None}  # noqa: B905 (hot)


_FIELDS = tuple(f.name for f in fields(TraceEvent))
_VALUES = operator.attrgetter(*_FIELDS)
