"""What changed between two rule sets, upstream by upstream and agent by agent, rule by rule.

Rules, budgets and rate limits are matched by id, then by identical content (an index-based id that shifted
because a rule was inserted above it is "moved", not "changed"), then by similarity. Credential values are
compared but never carried into the result.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from gateway.policy.cases import PlaceholderEnv
from gateway.policy.load import load_rules
from gateway.policy.revision import RuleSource, open_source
from gateway.policy.spec import (
    AgentSpec,
    BudgetSpec,
    RateLimitSpec,
    RuleError,
    RuleSet,
    RuleSetInvalid,
    RuleSpec,
    UpstreamSpec,
)

__all__ = ["AgentDiff", "FieldChange", "ItemChange", "RuleSetDiff", "UpstreamDiff", "compare", "diff_rulesets"]

Change = Literal["added", "removed", "changed", "moved"]
FieldState = Literal["added", "removed", "changed"]
ItemKind = Literal["rule", "budget", "rate_limit"]

SECRET_FIELDS = frozenset({"credential.value"})
_UNSET: tuple[Any, ...] = (None, [], False)  # "not set" values; 0 == False, but no field set to 0 loads
_IMPLICIT_ID = re.compile(r"[^#]+#[a-z_]+\[\d+\]")  # `<file>#<effect>[<index>]`: moves when rules are inserted


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field: `old`/`new` are JSON values (None on the side it is missing from, and always when secret)."""

    field: str
    change: FieldState
    old: Any = None
    new: Any = None
    secret: bool = False


@dataclass(frozen=True, slots=True)
class ItemChange:
    """A rule, budget or rate limit of one agent; `old_id` is set when its id changed."""

    kind: ItemKind
    change: Change
    id: str
    old_id: str | None
    content: Mapping[str, Any]  # the item as it is now (as it was, when removed)
    fields: tuple[FieldChange, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamDiff:
    name: str
    change: Change
    fields: tuple[FieldChange, ...]


@dataclass(frozen=True, slots=True)
class AgentDiff:
    agent: str
    change: Change
    file: str  # relative to the rules directory; the old file when removed
    fields: tuple[FieldChange, ...]
    items: tuple[ItemChange, ...]


@dataclass(frozen=True, slots=True)
class Side:
    source: str
    version: str


@dataclass(frozen=True, slots=True)
class RuleSetDiff:
    old: Side
    new: Side
    upstreams: tuple[UpstreamDiff, ...]
    agents: tuple[AgentDiff, ...]

    @property
    def identical(self) -> bool:
        return not self.upstreams and not self.agents


def compare(old: str, new: str, env: Mapping[str, str]) -> RuleSetDiff:
    """Load both sources (directories or `REV:PATH`) and diff them; raises SourceError or RuleSetInvalid."""
    with open_source(old) as before, open_source(new) as after:
        errors: list[RuleError] = []
        loaded: list[RuleSet] = []
        for source in (before, after):  # both sides' errors in one report
            try:
                loaded.append(load_source(source, env))
            except RuleSetInvalid as invalid:
                errors.extend(invalid.errors)
        if errors:
            raise RuleSetInvalid(errors)
        return diff_rulesets(loaded[0], loaded[1], before.label, after.label)


def load_source(source: RuleSource, env: Mapping[str, str]) -> RuleSet:
    """The real loader; an unset ${VAR} reads as a placeholder (a diff never forwards), and errors in a
    revision's files name them as `REV:PATH/file`."""
    try:
        return load_rules(source.directory, PlaceholderEnv(env))
    except RuleSetInvalid as invalid:
        if str(source.directory) == source.label:
            raise
        prefix = str(source.directory)
        raise RuleSetInvalid([_relabel(e, prefix, source.label) for e in invalid.errors]) from None


def _relabel(error: RuleError, prefix: str, label: str) -> RuleError:
    if not error.file.startswith(prefix):
        return error
    rest = error.file[len(prefix):].lstrip("/")
    sep = "" if label.endswith((":", "/")) else "/"
    return RuleError(f"{label}{sep}{rest}", error.line, error.col, error.code, error.path, error.message)


def diff_rulesets(old: RuleSet, new: RuleSet, old_label: str, new_label: str) -> RuleSetDiff:
    upstreams = [UpstreamDiff(*entry) for entry in _upstreams(old.upstreams, new.upstreams)]
    agents = []
    for agent_id in _union(old.agents, new.agents):
        before, after = old.agents.get(agent_id), new.agents.get(agent_id)
        fields = _fields(_agent_fields(before, old) if before else None, _agent_fields(after, new) if after else None)
        if before is None or after is None:  # the file is the heading of an added or removed agent
            fields = tuple(f for f in fields if f.field != "file")
        items = _items(before, after)
        if before is None or after is None or fields or items:
            change: Change = "added" if before is None else "removed" if after is None else "changed"
            spec, ruleset = (after, new) if after is not None else (before, old)
            assert spec is not None
            agents.append(AgentDiff(agent_id, change, _relative(spec.file, ruleset), fields, items))
    agents.sort(key=lambda a: (a.file, a.agent))
    return RuleSetDiff(Side(old_label, old.version), Side(new_label, new.version), tuple(upstreams), tuple(agents))


# -- canonical field values (JSON) ------------------------------------------------------------------------------


def _upstream_fields(spec: UpstreamSpec) -> dict[str, Any]:
    fields: dict[str, Any] = {"kind": spec.kind, "url": redact_url(spec.url)}
    if spec.credential is not None:
        fields["credential.header"] = spec.credential.header
        fields["credential.value"] = spec.credential.value  # compared only; never leaves this module
    if spec.tls is not None:
        fields.update({f"tls.{key}": getattr(spec.tls, key) for key in ("ca_file", "cert_file", "key_file")})
    fields.update({"connect_timeout": spec.connect_timeout, "read_timeout": spec.read_timeout,
                   "on_store_error": spec.on_store_error})
    for model, price in sorted(spec.prices.items()):
        fields[f"prices.{model}"] = {"input_per_mtok": price.input_per_mtok, "output_per_mtok": price.output_per_mtok}
    for tool in spec.tools:
        fields[f"tools.{tool.name}"] = {"verb": tool.verb, "resource": tool.resource}
    if spec.routes:
        fields["routes"] = [f"{r.method} {r.path} -> {r.verb} {r.resource or '(first segment)'}" for r in spec.routes]
    return fields


def _agent_fields(spec: AgentSpec, ruleset: RuleSet) -> dict[str, Any]:
    loop = spec.loop_detection
    capture = spec.capture
    return {
        "file": _relative(spec.file, ruleset),
        "owner": spec.owner,
        "purpose": spec.purpose,
        "mode": spec.mode,
        "loop_detection": "off" if loop is None else {"max_repeats": loop.max_repeats, "per": loop.per},
        "capture.json": capture.json if isinstance(capture.json, str) else list(capture.json),
        "capture.sensitive": list(capture.sensitive),
    }


def rule_fields(rule: RuleSpec) -> dict[str, Any]:
    return {"effect": rule.effect, "upstream": rule.upstream, "verbs": list(rule.verbs),
            "resources": None if rule.resources is None else list(rule.resources), "when": rule.when,
            "reason": rule.reason, "timeout": rule.timeout, "enforce": rule.enforce}


def budget_fields(budget: BudgetSpec) -> dict[str, Any]:
    return {"tokens": budget.tokens, "usd": budget.usd, "per": budget.per, "alert_at": list(budget.alert_at),
            "default_output_tokens": budget.default_output_tokens, "allow_unestimated": budget.allow_unestimated,
            "clamp_max_tokens": budget.clamp_max_tokens}


def rate_limit_fields(limit: RateLimitSpec) -> dict[str, Any]:
    return {"upstream": limit.upstream, "requests": limit.requests, "tokens": limit.tokens, "per": limit.per,
            "default_output_tokens": limit.default_output_tokens, "allow_unestimated": limit.allow_unestimated}


def redact_url(url: str) -> str:
    """The URL without any user or password in it (those are credentials)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _relative(file: str, ruleset: RuleSet) -> str:
    try:
        return Path(file).relative_to(ruleset.directory).as_posix()
    except ValueError:
        return Path(file).as_posix()


# -- comparing ---------------------------------------------------------------------------------------------------


def _union(old: Iterable[str], new: Iterable[str]) -> list[str]:
    seen = dict.fromkeys(old)
    seen.update(dict.fromkeys(new))
    return sorted(seen)


def _upstreams(old: Mapping[str, UpstreamSpec],
               new: Mapping[str, UpstreamSpec]) -> Iterable[tuple[str, Change, tuple[FieldChange, ...]]]:
    for name in _union(old, new):
        before = _upstream_fields(old[name]) if name in old else None
        after = _upstream_fields(new[name]) if name in new else None
        fields = _fields(before, after)
        if before is None or after is None or fields:
            yield name, "added" if before is None else "removed" if after is None else "changed", fields


def _fields(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> tuple[FieldChange, ...]:
    """Field by field; of an added or removed thing, only the fields that are set."""
    changes: list[FieldChange] = []
    before, after = old or {}, new or {}
    for key in dict.fromkeys([*before, *after]):
        secret = key in SECRET_FIELDS
        if key in before and key in after:
            if before[key] == after[key]:
                continue
            if key == "routes":
                changes.extend(_route_changes(before[key], after[key]))
                continue
            changes.append(FieldChange(key, "changed", None if secret else before[key],
                                       None if secret else after[key], secret))
        elif key in before and before[key] not in _UNSET:
            changes.append(FieldChange(key, "removed", old=None if secret else before[key], secret=secret))
        elif key in after and after[key] not in _UNSET:
            changes.append(FieldChange(key, "added", new=None if secret else after[key], secret=secret))
    return tuple(changes)


def _route_changes(old: list[str], new: list[str]) -> list[FieldChange]:
    """Routes match first to last, so besides routes added and removed, a new order is a change too."""
    gone, came = Counter(old) - Counter(new), Counter(new) - Counter(old)
    changes = [FieldChange("routes", "removed", old=r) for r in _take(old, gone)]
    changes += [FieldChange("routes", "added", new=r) for r in _take(new, came)]
    if not changes:
        changes.append(FieldChange("routes (order)", "changed", old, new))
    return changes


def _take(values: list[str], counts: Counter[str]) -> list[str]:
    """`values` in order, each kept as often as `counts` says."""
    left = Counter(counts)
    kept = []
    for value in values:
        if left[value] > 0:
            left[value] -= 1
            kept.append(value)
    return kept


@dataclass(frozen=True, slots=True)
class _Item:
    id: str
    index: int
    anchor: tuple[Any, ...]  # what a changed item keeps: its effect and upstream, its unit
    content: dict[str, Any]

    @property
    def explicit(self) -> bool:
        return _IMPLICIT_ID.fullmatch(self.id) is None


def _agent_items(spec: AgentSpec | None) -> dict[ItemKind, list[_Item]]:
    if spec is None:
        return {"rule": [], "budget": [], "rate_limit": []}
    return {
        "rule": [_Item(r.id, i, (r.effect, r.upstream), rule_fields(r)) for i, r in enumerate(spec.rules)],
        "budget": [_Item(b.id, i, (b.tokens is None,), budget_fields(b)) for i, b in enumerate(spec.budgets)],
        "rate_limit": [_Item(r.id, i, (r.upstream, r.requests is None), rate_limit_fields(r))
                       for i, r in enumerate(spec.rate_limits)],
    }


def _items(old: AgentSpec | None, new: AgentSpec | None) -> tuple[ItemChange, ...]:
    before, after = _agent_items(old), _agent_items(new)
    changes: list[ItemChange] = []
    for kind in ("rule", "budget", "rate_limit"):
        for o, n in _match(before[kind], after[kind]):
            if n is None:
                assert o is not None
                changes.append(ItemChange(kind, "removed", o.id, None, o.content))
            elif o is None:
                changes.append(ItemChange(kind, "added", n.id, None, n.content))
            elif o.content != n.content:
                changes.append(ItemChange(kind, "changed", n.id, o.id if o.id != n.id else None, n.content,
                                          _fields(o.content, n.content)))
            elif o.id != n.id:
                changes.append(ItemChange(kind, "moved", n.id, o.id, n.content))
    return tuple(changes)


def _similarity(old: _Item, new: _Item) -> float:
    """The share of the fields set on either side that are equal; 0 across anchors."""
    if old.anchor != new.anchor:
        return 0.0
    keys = [k for k in old.content if old.content[k] not in _UNSET or new.content[k] not in _UNSET]
    return sum(old.content[k] == new.content[k] for k in keys) / len(keys) if keys else 1.0


def _match(old: list[_Item], new: list[_Item]) -> list[tuple[_Item | None, _Item | None]]:
    """Pairs in the order of `new` (removed items where they stood): same id and content, then same content
    (moved), then same id if similar or explicit, then most similar, then same id; the rest is added/removed."""
    pairs: list[tuple[_Item, _Item]] = []
    left_old, left_new = {i.id: i for i in old}, {i.id: i for i in new}

    def take(o: _Item, n: _Item) -> None:
        pairs.append((left_old.pop(o.id), left_new.pop(n.id)))

    for o in old:
        if (n := left_new.get(o.id)) is not None and n.content == o.content:
            take(o, n)
    for o in list(left_old.values()):
        n = next((n for n in left_new.values() if n.content == o.content), None)
        if n is not None:
            take(o, n)
    for o in list(left_old.values()):
        if (n := left_new.get(o.id)) is not None and (o.explicit or _similarity(o, n) > 0.5):
            take(o, n)
    scored = sorted(((_similarity(o, n), o.id == n.id, -abs(o.index - n.index), o.index, n.index, o, n)
                     for o in left_old.values() for n in left_new.values()), key=lambda s: s[:5], reverse=True)
    for score, *_, o, n in scored:
        if score > 0.5 and o.id in left_old and n.id in left_new:
            take(o, n)
    for o in list(left_old.values()):
        if (n := left_new.get(o.id)) is not None:
            take(o, n)
    result: list[tuple[_Item | None, _Item | None]] = [(o, n) for o, n in pairs]
    result += [(o, None) for o in left_old.values()]
    result += [(None, n) for n in left_new.values()]
    return sorted(result, key=lambda p: (p[1].index if p[1] else p[0].index if p[0] else 0, p[1] is not None))
