"""Whether a capture record holds what a replayed decision read: a condition that reads a field the record did
not keep (or redacted) would be decided on a guess, so replay reports the call instead of deciding it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs

from ..capture import CLASSIFIER_FIELDS, PROMPT_FIELDS, REDACTED
from ..models import Action, Decision
from ..policy.compile import AgentPolicy, Rule
from ..policy.conditions import MISSING, Condition, Path
from ..policy.reads import header_reads

LLM_KINDS = ("openai", "anthropic")


def consulted(agent: AgentPolicy, action: Action, decision: Decision) -> Iterator[Rule]:
    """The rules `decide` evaluated for this action, in its order, up to the one that decided."""
    if action.plumbing:
        return
    bucket = agent.bucket(action.upstream, action.verb)
    for rule in (*bucket.deny, *bucket.hold, *bucket.allow):
        if rule.covers(action.resource):
            yield rule
            if rule.spec.id == decision.rule:
                return


def missing_evidence(agent: AgentPolicy, decisions: tuple[tuple[Decision, Action], ...],
                     capture: Mapping[str, Any]) -> str | None:
    """Why the record cannot support these decisions (the first gap found), or None when it can."""
    record = _Record(capture)
    for decision, action in decisions:
        for rule in consulted(agent, action, decision):
            if rule.condition is not None and (gap := record.gap(rule.condition, action)) is not None:
                return f"{rule.spec.id} reads {gap}, which the capture did not keep"
    return None


class _Record:
    __slots__ = ("capture", "headers", "kept")

    def __init__(self, capture: Mapping[str, Any]) -> None:
        self.capture = capture
        kept = capture.get("kept")
        # Without `kept` (a record from another writer) a present value is the best evidence there is.
        self.kept: frozenset[str] | None = frozenset(kept) if isinstance(kept, list) else None
        headers = capture.get("headers")
        self.headers: Mapping[str, Any] = headers if isinstance(headers, Mapping) else {}

    def gap(self, condition: Condition, action: Action) -> str | None:
        body = action.json if action.json is not None else self.capture.get("json")
        for path in condition.paths:
            root, rest = path[0], path[1:]
            if root == "request":
                missing = self._request_gap(condition, rest, body)
            elif root == "action":
                missing = self._action_gap(rest, action, body)
            else:
                missing = None
            if missing is not None:
                return missing
        return None

    def _request_gap(self, condition: Condition, rest: Path, body: Any) -> str | None:
        field = rest[0] if rest else None
        if (field is None or field == "json") and not self._json_ok(rest[1:], body):
            return "request.json" + "".join(f".{k}" for k in rest[1:])
        if field is None or field == "headers":
            names = header_reads(condition) if field else None
            if names is None and (not self._has("headers") or REDACTED in self.headers.values()):
                return "request.headers"
            for name in names or ():
                if self.headers.get(name) == REDACTED or (
                        name not in self.headers and not self._has("headers", f"headers.{name}")):
                    return f"request.headers.{name}"
        if field is None or field == "query":
            query = {k: v[0] for k, v in parse_qs(str(self.capture.get("query") or "")).items()}
            params = list(query) if len(rest) < 2 else [rest[1]]
            if any(query.get(name) == REDACTED for name in params):
                return "request.query" + (f".{rest[1]}" if len(rest) > 1 else "")
        return None

    def _action_gap(self, rest: Path, action: Action, body: Any) -> str | None:
        whole = not rest
        if (whole or rest[0] == "estimated_tokens") and action.kind in LLM_KINDS:
            for field in PROMPT_FIELDS:
                if not self._json_ok(field, body):
                    return "action.estimated_tokens (the prompt)"
        if (whole or rest[0] == "attributes") and action.kind == "mcp":
            below = rest[2:] if len(rest) > 1 and rest[1] == "arguments" else ()
            if not self._json_ok(("params", "arguments", *below), body):
                return "action.attributes.arguments" + "".join(f".{k}" for k in below)
        return None

    def _has(self, *names: str) -> bool:
        return self.kept is None or any(name in self.kept for name in names)

    def _json_ok(self, path: Path, body: Any) -> bool:
        """Kept whole and not redacted: the value the live gateway read is the one replay reads."""
        value = body
        for key in path:
            if value == REDACTED:
                return False
            value = value.get(key, MISSING) if isinstance(value, Mapping) else MISSING
            if value is MISSING:
                break
        if value is not MISSING and _holds_redacted(value):
            return False
        kept = self.kept
        if kept is None:
            return value is not MISSING
        if "json" in kept:
            return True
        if "classifier" in kept and any(path[:len(f)] == f for f in CLASSIFIER_FIELDS):
            return True
        return any("json." + ".".join(path[:i]) in kept for i in range(1, len(path) + 1))


def _holds_redacted(value: Any) -> bool:
    if isinstance(value, str):
        return value == REDACTED
    if isinstance(value, Mapping):
        return any(_holds_redacted(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_redacted(v) for v in value)
    return False
