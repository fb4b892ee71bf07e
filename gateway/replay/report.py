"""The replay report as text: a table for people (default), JSON for CI, markdown for pull requests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from .redecide import REASONS
from .tally import FLIPS, RULE_CHANGED

FORMATS = ("table", "json", "markdown")
_COLUMNS = (*FLIPS, RULE_CHANGED)


def render(report: dict[str, Any], fmt: str) -> str:
    renderers: dict[str, Callable[[dict[str, Any]], str]] = {"table": table, "json": as_json,
                                                               "markdown": markdown}
    return renderers[fmt](report)


def as_json(report: dict[str, Any]) -> str:
    return orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"


def _label(kind: str) -> str:
    return "rule changed" if kind == RULE_CHANGED else kind.replace("->", "→")


def _n(value: int) -> str:
    return f"{value:,}"


def _summary(report: dict[str, Any]) -> str:
    t = report["totals"]
    scope = f" for agent {report['agent']}" if report.get("agent") else ""
    return (f"Replay of {len(report['traces'])} trace file(s) against {report['rules']} "
            f"(policy {report['policy_version'][:19]}){scope}: {_n(t['lines'])} lines, {_n(t['calls'])} calls; "
            f"{_n(t['replayed'])} replayed, {_n(t['changed'])} would change, {_n(t['unchanged'])} unchanged, "
            f"{_n(t['not_replayable'])} not replayable; {_n(t['other_records'])} other records, "
            f"{_n(t['malformed'])} malformed lines")


def _agent_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["agent", "calls", "unchanged", *map(_label, _COLUMNS), "not replayable"]
    rows = []
    for a in report["agents"]:
        unreplayable = sum(r["count"] for r in a["not_replayable"].values())
        rows.append([a["agent"], _n(a["calls"]), _n(a["unchanged"]),
                     *(_n(a["flips"].get(k, {"count": 0})["count"]) for k in _COLUMNS), _n(unreplayable)])
    return head, rows


def _change_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for a in report["agents"]:
        for t in a["transitions"]:
            old, new = t["old"], t["new"]
            kind = RULE_CHANGED if old["decision"] == new["decision"] else f"{old['decision']}->{new['decision']}"
            rows.append([a["agent"], _label(kind), _n(t["count"]), str(old["rule"]), str(new["rule"]),
                         ", ".join(map(str, t["examples"]))])
    return rows


def _unreplayable_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for a in report["agents"]:
        for reason in REASONS:
            slot = a["not_replayable"][reason]
            if slot["count"]:
                rows.append([a["agent"], reason, _n(slot["count"]), "; ".join(slot.get("notes", [])),
                             ", ".join(map(str, slot["examples"]))])
    return rows


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (head, *rows)]


def table(report: dict[str, Any]) -> str:
    out = [_summary(report), ""]
    head, rows = _agent_rows(report)
    out += _grid(head, rows) if rows else ["(no calls)"]
    changes = _change_rows(report)
    if changes:
        out += ["", "What would change:"]
        out += _grid(["agent", "change", "calls", "old rule", "new rule", "examples"], changes)
    unreplayable = _unreplayable_rows(report)
    if unreplayable:
        out += ["", "Not replayable:"]
        out += _grid(["agent", "reason", "calls", "why", "examples"], unreplayable)
    if report["malformed_lines"]:
        out += ["", "Malformed lines: " + ", ".join(report["malformed_lines"])]
    return "\n".join(out) + "\n"


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    def cells(row: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    return [cells(head), "|" + "|".join("---" for _ in head) + "|", *map(cells, rows)]


def markdown(report: dict[str, Any]) -> str:
    out = ["### Replay", "", _summary(report), ""]
    head, rows = _agent_rows(report)
    out += _md(head, rows) if rows else ["No calls."]
    changes = _change_rows(report)
    if changes:
        out += ["", "#### What would change", ""]
        out += _md(["agent", "change", "calls", "old rule", "new rule", "examples"],
                   [[*r[:3], f"`{r[3]}`", f"`{r[4]}`", r[5]] for r in changes])
    unreplayable = _unreplayable_rows(report)
    if unreplayable:
        out += ["", "#### Not replayable", ""]
        out += _md(["agent", "reason", "calls", "why", "examples"], unreplayable)
    return "\n".join(out) + "\n"
