"""Counting: every call of the traces, by agent and by (old decision and rule -> new decision and rule), with a
few example trace ids for each; then the report as plain data (the JSON format is exactly this)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from ..policy.compile import Policy
from .read import lines
from .redecide import NO_CAPTURE, NO_DECISION, OK, REASONS, Redecider, Verdict

FLIPS = ("allow->deny", "allow->hold", "hold->allow", "hold->deny", "deny->allow", "deny->hold")
RULE_CHANGED = "rule_changed"  # the same decision, by another rule

# (agent, old decision, old rule, verdict) -> [count, example trace ids, ...]
_Key = tuple[str, str | None, str | None, Verdict]


class Tally:
    def __init__(self, policy: Policy, examples: int = 3, agent: str | None = None) -> None:
        self.redecider = Redecider(policy)
        self.examples = examples
        self.agent = agent
        self.counts: dict[_Key, list[Any]] = {}
        self.lines = 0
        self.other_records = 0  # budget alerts and other non-call records
        self.malformed = 0
        self.malformed_at: list[str] = []
        self.files: list[str] = []

    def feed(self, path: str | Path) -> None:
        """Count every line of one trace file (the hot loop: one parse and a few dict look-ups per line)."""
        self.files.append(str(path))
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        verdict, counts, examples, only = self.redecider.verdict, self.counts, self.examples, self.agent
        no_decision = Verdict(NO_DECISION, None, None)
        no_capture = Verdict(NO_CAPTURE, None, None)
        number = 0
        for number, line in enumerate(lines(path), 1):
            if not line or line.isspace():
                continue
            try:
                record = loads(line)
            except decode_error:
                record = None
            if not isinstance(record, dict):
                self.malformed += 1
                if len(self.malformed_at) < examples:
                    self.malformed_at.append(f"{path}:{number}")
                continue
            if record.get("kind") is not None:
                self.other_records += 1
                continue
            agent = record.get("agent") or "(unknown)"
            if only is not None and agent != only:
                continue
            old = record.get("decision")
            capture = record.get("capture")
            if old is None:
                result = no_decision
            elif not isinstance(capture, dict):
                result = no_capture
            else:
                result = verdict(agent, capture)
            key = (agent, old, record.get("rule"), result)
            entry = counts.get(key)
            if entry is None:
                entry = counts[key] = [0, []]
            entry[0] += 1
            if entry[0] <= examples:
                entry[1].append(record.get("trace_id"))
        self.lines += number

    def report(self, rules: str) -> dict[str, Any]:
        agents: dict[str, dict[str, Any]] = {}
        for (agent, old, old_rule, result), (count, ids) in sorted(self.counts.items(), key=_order):
            entry = agents.setdefault(agent, _agent_entry(agent))
            entry["calls"] += count
            if result.status != OK:
                _add(entry["not_replayable"][result.status], count, ids, self.examples, result.note)
                continue
            entry["replayed"] += count
            if (old, old_rule) == (result.decision, result.rule):
                entry["unchanged"] += count
                continue
            entry["changed"] += count
            kind = RULE_CHANGED if old == result.decision else f"{old}->{result.decision}"
            _add(entry["flips"].setdefault(kind, {"count": 0, "examples": []}), count, ids, self.examples)
            entry["transitions"].append({"old": {"decision": old, "rule": old_rule},
                                         "new": {"decision": result.decision, "rule": result.rule},
                                         "count": count, "examples": ids[: self.examples]})
        listed = sorted(agents.values(), key=lambda a: str(a["agent"]))
        for entry in listed:
            entry["transitions"].sort(key=lambda t: (-t["count"], str(t["old"]), str(t["new"])))
        totals = {"lines": self.lines, "calls": 0, "replayed": 0, "unchanged": 0, "changed": 0,
                  "not_replayable": 0, "other_records": self.other_records, "malformed": self.malformed}
        for entry in listed:
            for key in ("calls", "replayed", "unchanged", "changed"):
                totals[key] += entry[key]
            totals["not_replayable"] += sum(r["count"] for r in entry["not_replayable"].values())
        return {"rules": rules, "policy_version": self.redecider.policy.version, "traces": self.files,
                "agent": self.agent, "totals": totals, "malformed_lines": self.malformed_at, "agents": listed}


def _agent_entry(agent: str) -> dict[str, Any]:
    return {"agent": agent, "calls": 0, "replayed": 0, "unchanged": 0, "changed": 0,
            "flips": {kind: {"count": 0, "examples": []} for kind in (*FLIPS, RULE_CHANGED)},
            "not_replayable": {reason: {"count": 0, "examples": []} for reason in REASONS},
            "transitions": []}


def _add(slot: dict[str, Any], count: int, ids: list[Any], limit: int, note: str | None = None) -> None:
    slot["count"] += count
    room = limit - len(slot["examples"])
    if room > 0:
        slot["examples"].extend(ids[:room])
    if note is not None:
        notes = slot.setdefault("notes", [])
        if len(notes) < max(limit, 1) and note not in notes:
            notes.append(note)


def _order(item: tuple[_Key, list[Any]]) -> tuple[str, ...]:
    """Deterministic: the same traces give the same report, whatever order the dict was filled in."""
    (agent, old, old_rule, result), _ = item
    return (agent, str(old), str(old_rule), *map(str, result))


def tally(policy: Policy, paths: Iterable[str | Path], rules: str, examples: int = 3,
          agent: str | None = None) -> dict[str, Any]:
    counter = Tally(policy, examples, agent)
    for path in paths:
        counter.feed(path)
    return counter.report(rules)
