"""`agent-gateway rules diff` reports: text for people (grouped by file, `+`/`-`/`~`), JSON for tools, Markdown for
pull-request comments. A credential value is never printed, only that it changed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

from gateway.policy.diff import AgentDiff, FieldChange, ItemChange, RuleSetDiff, UpstreamDiff

__all__ = ["FORMATS", "render", "to_json"]

FORMATS = ("text", "json", "markdown")
UPSTREAMS_FILE = "upstreams.yaml"

_MARK = {"added": "+", "removed": "-", "changed": "~", "moved": "~"}
_COLOUR = {"+": "\x1b[32m", "-": "\x1b[31m", "~": "\x1b[33m", "#": "\x1b[1m"}
_RESET = "\x1b[0m"
_DURATIONS = frozenset({"timeout", "connect_timeout", "read_timeout"})
_NONE_WORDS = {"resources": "any", "resource": "default", "timeout": "default", "upstream": "every upstream",
               "ca_file": "system CAs"}
_ITEM_WORDS = {"rule": "rule", "budget": "budget", "rate_limit": "rate limit"}


def render(diff: RuleSetDiff, fmt: str, *, colour: bool = False) -> str:
    if fmt == "json":
        return json.dumps(to_json(diff), indent=2, ensure_ascii=False) + "\n"
    if fmt == "markdown":
        lines = list(_markdown(diff))
        return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])) + "\n"
    lines = list(_text(diff))
    return "\n".join(_paint(line) if colour else line for line in lines) + "\n"


# -- JSON ------------------------------------------------------------------------------------------------------


def to_json(diff: RuleSetDiff) -> dict[str, Any]:
    """A stable structure: lists in a fixed order, every key always present."""
    return {
        "old": {"source": diff.old.source, "version": diff.old.version},
        "new": {"source": diff.new.source, "version": diff.new.version},
        "identical": diff.identical,
        "summary": _counts(diff),
        "upstreams": [{"name": u.name, "change": u.change, "fields": [_field_json(f) for f in u.fields]}
                      for u in diff.upstreams],
        "agents": [_agent_json(a) for a in diff.agents],
    }


def _agent_json(agent: AgentDiff) -> dict[str, Any]:
    def items(kind: str) -> list[dict[str, Any]]:
        return [{"id": i.id, "old_id": i.old_id, "change": i.change, "item": dict(i.content),
                 "fields": [_field_json(f) for f in i.fields]} for i in agent.items if i.kind == kind]

    return {"agent": agent.agent, "change": agent.change, "file": agent.file,
            "fields": [_field_json(f) for f in agent.fields],
            "rules": items("rule"), "budgets": items("budget"), "rate_limits": items("rate_limit")}


def _field_json(change: FieldChange) -> dict[str, Any]:
    entry: dict[str, Any] = {"field": change.field, "change": change.change}
    if change.secret:
        entry["secret"] = True  # the values are never reported
    else:
        if change.change != "added":
            entry["old"] = change.old
        if change.change != "removed":
            entry["new"] = change.new
    return entry


def _counts(diff: RuleSetDiff) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter[str]] = {k: Counter() for k in ("upstreams", "agents", "rules", "budgets",
                                                             "rate_limits")}
    counts["upstreams"].update(u.change for u in diff.upstreams)
    counts["agents"].update(a.change for a in diff.agents)
    for agent in diff.agents:
        for item in agent.items:
            counts[f"{item.kind}s"][item.change] += 1
    return {kind: {change: c[change] for change in ("added", "removed", "changed", "moved")}
            for kind, c in counts.items()}


def summary_line(diff: RuleSetDiff) -> str:
    parts = []
    for kind, counts in _counts(diff).items():
        said = ", ".join(f"{n} {change}" for change, n in counts.items() if n)
        if said:
            parts.append(f"{kind.replace('_', ' ')}: {said}")
    return "; ".join(parts)


# -- values, as people read them -------------------------------------------------------------------------------


def show(field: str, value: Any) -> str:
    name = field.rsplit(".", 1)[-1]
    if value is None:
        return _NONE_WORDS.get(name, "none")
    if name in _DURATIONS and isinstance(value, int | float):
        return duration(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return "[" + ", ".join(show(name, v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(k, v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and (not value or value[0] in "\"'" or any(c.isspace() or c in "[]{}," for c in value)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def duration(seconds: float) -> str:
    """`900.0` -> `15m`, `90` -> `1m30s`, `0.5` -> `500ms`."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    out, rest = "", seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            out += f"{int(rest // size)}{unit}"
            rest -= (rest // size) * size
    if rest or not out:
        out += f"{rest:g}s"
    return out


def describe(item: ItemChange) -> str:
    """One line saying what a rule, budget or rate limit does."""
    c = item.content
    if item.kind == "rule":
        text = f"{c['effect']} {c['upstream']} {show('verbs', c['verbs'])}"
        if c["resources"] is not None:
            text += f" on {show('resources', c['resources'])}"
        if c["when"] is not None:
            text += f" when {show('when', c['when'])}"
        if c["timeout"] is not None:
            text += f", timeout {duration(c['timeout'])}"
        if c["enforce"] != "enforce":
            text += f", enforce {c['enforce']}"
        if c["reason"] is not None:
            text += f", reason {show('reason', c['reason'])}"
        return text
    if item.kind == "budget":
        amount = f"{c['tokens']} tokens" if c["tokens"] is not None else f"${show('usd', c['usd'])}"
        return f"{amount} per {c['per']}"
    amount = f"{c['requests']} requests" if c["requests"] is not None else f"{c['tokens']} tokens"
    return f"{amount} per {c['per']} on {show('upstream', c['upstream'])}"


def _field_text(change: FieldChange) -> str:
    mark = _MARK[change.change]
    if change.secret:
        said = {"added": "set", "removed": "removed", "changed": "changed"}[change.change]
        return f"{mark} {change.field}: {said} (value not shown)"
    if change.change == "added":
        return f"{mark} {change.field}: {show(change.field, change.new)}"
    if change.change == "removed":
        return f"{mark} {change.field}: {show(change.field, change.old)}"
    return f"{mark} {change.field}: {show(change.field, change.old)} → {show(change.field, change.new)}"


def _item_title(item: ItemChange) -> str:
    ident = f"{item.old_id} → {item.id}" if item.old_id else item.id
    moved = " (moved)" if item.change == "moved" else ""
    return f"{_ITEM_WORDS[item.kind]} {ident}{moved}"


# -- text ------------------------------------------------------------------------------------------------------


def _text(diff: RuleSetDiff) -> Iterator[str]:
    yield f"--- {diff.old.source} ({diff.old.version})"
    yield f"+++ {diff.new.source} ({diff.new.version})"
    if diff.identical:
        yield _same(diff)
        return
    if diff.upstreams:
        yield ""
        yield f"# {UPSTREAMS_FILE}"
        for upstream in diff.upstreams:
            yield from _upstream_text(upstream)
    for agent in diff.agents:
        yield ""
        yield f"# {agent.file} (agent {agent.agent}{'' if agent.change == 'changed' else ', ' + agent.change})"
        for field in agent.fields:
            yield "  " + _field_text(field)
        for item in agent.items:
            title = f"  {_MARK[item.change]} {_item_title(item)}"
            yield title + ("" if item.fields else f": {describe(item)}")
            yield from ("      " + _field_text(f) for f in item.fields)
    yield ""
    yield summary_line(diff)


def _upstream_text(upstream: UpstreamDiff) -> Iterator[str]:
    yield f"  {_MARK[upstream.change]} upstream {upstream.name}"
    if upstream.change != "removed":
        yield from ("      " + _field_text(f) for f in upstream.fields)


def _same(diff: RuleSetDiff) -> str:
    if diff.old.version == diff.new.version:
        return "no changes"
    return "no rule changes (the files differ only in comments, formatting or order of keys)"


def _paint(line: str) -> str:
    stripped = line.lstrip()
    key = "#" if line.startswith(("# ", "--- ", "+++ ")) else stripped[:1] if stripped[1:2] == " " else ""
    colour = _COLOUR.get(key)
    return f"{colour}{line}{_RESET}" if colour else line


# -- Markdown --------------------------------------------------------------------------------------------------


def _code(text: str) -> str:
    """An inline code span that survives backticks and table pipes in the text."""
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def _markdown(diff: RuleSetDiff) -> Iterator[str]:
    yield f"### Rules diff: {_code(diff.old.source)} → {_code(diff.new.source)}"
    yield ""
    if diff.identical:
        yield _same(diff).capitalize() + "."
        return
    yield f"**{summary_line(diff)}**"
    if diff.upstreams:
        yield ""
        yield f"#### {_code(UPSTREAMS_FILE)}"
        yield ""
        for upstream in diff.upstreams:
            yield f"- **{upstream.change}** upstream {_code(upstream.name)}"
            if upstream.change != "removed":
                yield from _field_table(upstream.fields)
    for agent in diff.agents:
        yield ""
        state = "" if agent.change == "changed" else f" — **{agent.change}**"
        yield f"#### {_code(agent.file)} (agent {_code(agent.agent)}){state}"
        yield ""
        if agent.fields:
            yield "- settings"
            yield from _field_table(agent.fields)
        for item in agent.items:
            ident = f"{_code(item.old_id)} → {_code(item.id)}" if item.old_id else _code(item.id)
            yield f"- **{item.change}** {_ITEM_WORDS[item.kind]} {ident}: {_code(describe(item))}"
            yield from _field_table(item.fields)


def _field_table(fields: tuple[FieldChange, ...]) -> Iterator[str]:
    if not fields:
        return
    yield ""
    yield "  | | field | old | new |"
    yield "  |---|---|---|---|"
    for f in fields:
        old = "" if f.change == "added" else "*not shown*" if f.secret else _code(show(f.field, f.old))
        new = "" if f.change == "removed" else "*not shown*" if f.secret else _code(show(f.field, f.new))
        yield f"  | {_MARK[f.change]} | {_code(f.field)} | {old} | {new} |"
    yield ""
