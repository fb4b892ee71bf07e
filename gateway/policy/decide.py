"""decide: the compiled policy's answer for one action. Precedence deny > hold > allow > default deny."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs

from ..incoming import Incoming
from ..models import Action, Decision, Outcome
from .compile import AgentPolicy, Policy, Step
from .conditions import MISSING, Path, walk

AUDIT_RULE = "mode:audit"
DENY: Outcome = "deny"
HOLD: Outcome = "hold"
_DEFAULT_REASONS = {DENY: "denied by rule", HOLD: "held for approval by rule"}
DEFAULT_RULE = "default"
PLUMBING_RULE = "mcp:session"


class Facts:
    """Resolves the `agent.*`, `action.*` and `request.*` values a condition reads, each built lazily."""

    __slots__ = ("_action", "_agent", "action", "agent", "request")

    def __init__(self, agent: AgentPolicy, action: Action, request: Incoming) -> None:
        self.agent = agent
        self.action = action
        self.request = request
        self._agent: dict[str, Any] | None = None
        self._action: dict[str, Any] | None = None

    def resolve(self, path: Path) -> Any:
        root, rest = path[0], path[1:]
        if root == "action":
            if self._action is None:
                self._action = self.action.as_cel()
            return walk(self._action, rest) if rest else self._action
        if root == "agent":
            if self._agent is None:
                self._agent = self.agent.as_cel()
            return walk(self._agent, rest) if rest else self._agent
        if not rest:
            return {key: self._request_field(key) for key in ("method", "path", "query", "headers", "json")}
        value = self._request_field(rest[0])
        return value if len(rest) == 1 else walk(value, rest[1:])

    def _request_field(self, key: str) -> Any:
        if key == "json":
            return self.action.json if self.action.json is not None else self.request.json()
        if key == "method":
            return self.request.method
        if key == "path":
            return self.request.path
        if key == "headers":
            return dict(self.request.rule_headers())
        if key == "query":
            return {k: v[0] for k, v in parse_qs(self.request.query).items()}
        return MISSING


_MISS: tuple[bool, Mapping[str, Any], str | None] = (False, MappingProxyType({}), None)


def _matches(step: Step, facts: Facts, errors_match: bool) -> tuple[bool, Mapping[str, Any], str | None]:
    """Whether a rule applies; a condition that errors matches deny/hold rules and not allow rules."""
    if not step.covers(facts.action.resource):
        return _MISS
    condition = step.condition
    if condition is None:
        return True, {}, None
    result, evidence = condition.evaluate(facts.resolve)
    if isinstance(result, Exception):
        return errors_match, evidence, f"condition error ({type(result).__name__}: {result})"
    return result, evidence, None


def decide(policy: Policy, agent: AgentPolicy, action: Action, request: Incoming) -> Decision:
    # Of the agent, only its plan (shared with agents that have the same rules) and its rule ids are read: the
    # fewer objects of its own a decision touches, the less its cost grows with the number of active agents.
    plan = agent.plan
    mode = plan.mode
    if action.plumbing:
        if action.upstream in plan.granted:
            return Decision("allow", PLUMBING_RULE, policy.version, mode,
                            f"MCP session method {action.verb} on an upstream the agent holds a grant on")
        return Decision("deny", DEFAULT_RULE, policy.version, mode,
                        f"agent {agent.id!r} holds no grant on upstream {action.upstream!r}")
    deny, hold, allow = plan.steps(action.upstream, action.verb)
    ids = agent.rule_ids
    facts = Facts(agent, action, request)
    staged: _Staged | None = None  # made when the first staged rule matches
    for effect, steps in ((DENY, deny), (HOLD, hold)):  # a matching deny or hold rule decides (errors match too)
        for step in steps:
            hit, evidence, note = _matches(step, facts, errors_match=True)
            if not hit:
                continue
            rule_id = ids[step.position]
            if step.enforce != "enforce":
                staged = staged or _Staged()
                staged.record(step.enforce, rule_id, effect)
                continue
            reason = step.reason or f"{_DEFAULT_REASONS[effect]} {rule_id}"
            return _with(staged, Decision(effect, rule_id, policy.version, mode,
                                          f"{reason}; {note}" if note else reason, evidence,
                                          timeout=step.timeout or policy.default_hold_timeout if effect == HOLD
                                          else None))
    for step in allow:
        hit, evidence, _ = _matches(step, facts, errors_match=False)
        if hit:
            rule_id = ids[step.position]
            if mode == "audit" and action.verb != "read":
                return _with(staged, Decision("hold", AUDIT_RULE, policy.version, mode,
                                              f"agent is in audit mode: {action.verb} (allowed by {rule_id}) "
                                              "needs a human", evidence, timeout=policy.default_hold_timeout))
            return _with(staged, Decision("allow", rule_id, policy.version, mode,
                                          step.reason or f"allowed by rule {rule_id}", evidence))
    target = f"{action.upstream}/{action.resource}" if action.resource else action.upstream
    return _with(staged, Decision("deny", DEFAULT_RULE, policy.version, mode,
                                  f"no rule allows {action.verb!r} on {target!r} for agent {agent.id!r}"))


class _Staged:
    """Deny and hold rules being rolled out: `shadow` ones are only recorded (would_deny / would_hold), `warn`
    ones let the call through with a warning; neither decides."""

    __slots__ = ("shadow", "warnings")

    def __init__(self) -> None:
        self.shadow: list[dict[str, str]] = []
        self.warnings: list[dict[str, str]] = []

    def record(self, enforce: str, rule: str, effect: str) -> None:
        if enforce == "shadow":
            self.shadow.append({"rule": rule, "would": effect})
        else:
            self.warnings.append({"rule": rule, "warn": effect})


def _with(staged: _Staged | None, decision: Decision) -> Decision:
    """The decision, with what staged rules that matched before it did."""
    if staged is None:
        return decision
    return replace(decision, shadow=tuple(staged.shadow), warnings=tuple(staged.warnings))


def may_call_tool(agent: AgentPolicy, upstream: str, verb: str, resource: str) -> bool:
    """Whether a tool belongs in this agent's `tools/list`: some allow or hold rule could let it through,
    and no unconditional deny rule blocks it."""
    deny, hold, allow = agent.plan.steps(upstream, verb)
    if any(s.condition is None and s.covers(resource) for s in deny):
        return False
    return any(s.covers(resource) for s in (*allow, *hold))


_RANK = {"deny": 2, "hold": 1, "allow": 0}


def decide_each(policy: Policy, agent: AgentPolicy, actions: tuple[Action, ...],
                request: Incoming) -> tuple[tuple[Decision, Action], list[tuple[Decision, Action]]]:
    """Decide every action of a request (JSON-RPC batches: each element); the strictest one stands for all,
    so a batch is forwarded only if every element is allowed."""
    decisions = [(decide(policy, agent, action, request), action) for action in actions]
    decision, action = max(decisions, key=lambda pair: _RANK[pair[0].outcome])
    if len(decisions) > 1:  # what staged rules did to any element is recorded on the batch's decision
        shadow = tuple(s for d, _ in decisions for s in d.shadow)
        warnings = tuple(w for d, _ in decisions for w in d.warnings)
        if shadow or warnings:
            decision = replace(decision, shadow=shadow, warnings=warnings)
    return (decision, action), decisions
