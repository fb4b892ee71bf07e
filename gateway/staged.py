"""Counts of what staged rules (enforce: shadow | warn) would have done, so a team can promote them with evidence."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .policy.compile import Policy
from .trace.event import TraceEvent


class StagedCounts:
    """A trace sink: per rule, how many calls it would have denied or held (shadow) or warned about (warn)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()  # (rule id, "would_deny" | "warn_hold" | ...)

    def emit(self, event: TraceEvent) -> None:
        for entry in event.shadow or ():
            self.counts[(entry["rule"], f"would_{entry['would']}")] += 1
        for entry in event.warnings or ():
            self.counts[(entry["rule"], f"warn_{entry['warn']}")] += 1

    def close(self) -> None:
        pass

    def report(self, policy: Policy) -> list[dict[str, Any]]:
        """Every staged rule of the policy with its counts on this replica since it started."""
        rows = []
        for agent in policy.agents.values():
            for rule in agent.spec.rules:
                if rule.enforce != "enforce":
                    counted = {what: n for (rule_id, what), n in self.counts.items() if rule_id == rule.id}
                    rows.append({"rule": rule.id, "agent": agent.spec.id, "effect": rule.effect,
                                 "enforce": rule.enforce, "counts": counted})
        return rows
