"""decide: the compiled policy's answer for one action. Precedence deny > hold > allow > default deny."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs

from ..incoming import Incoming
from ..models import Action, Decision
from .compile import AgentPolicy, Policy, Rule
from .conditions import MISSING, Path, walk

AUDIT_RULE = "mode:audit"
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


def _matches(rule: Rule, facts: Facts, errors_match: bool) -> tuple[bool, dict[str, Any], str | None]:
    """Whether a rule applies; a condition that errors matches deny/hold rules and not allow rules."""
    if not rule.covers(facts.action.resource):
        return False, {}, None
    if rule.condition is None:
        return True, {}, None
    result, evidence = rule.condition.evaluate(facts.resolve)
    if isinstance(result, Exception):
        return errors_match, evidence, f"condition error ({type(result).__name__}: {result})"
    return result, evidence, None


def decide(policy: Policy, agent: AgentPolicy, action: Action, request: Incoming) -> Decision:
    mode = agent.spec.mode
    if action.plumbing:
        if action.upstream in agent.granted_upstreams:
            return Decision("allow", PLUMBING_RULE, policy.version, mode,
                            f"MCP session method {action.verb} on an upstream the agent holds a grant on")
        return Decision("deny", DEFAULT_RULE, policy.version, mode,
                        f"agent {agent.spec.id!r} holds no grant on upstream {action.upstream!r}")
    bucket = agent.bucket(action.upstream, action.verb)
    facts = Facts(agent, action, request)
    staged = _Staged()
    for rule in bucket.deny:
        hit, evidence, note = _matches(rule, facts, errors_match=True)
        if hit and staged.passes(rule, "deny"):
            reason = rule.spec.reason or f"denied by rule {rule.spec.id}"
            return staged.into(Decision("deny", rule.spec.id, policy.version, mode,
                                        f"{reason}; {note}" if note else reason, evidence))
    for rule in bucket.hold:
        hit, evidence, note = _matches(rule, facts, errors_match=True)
        if hit and staged.passes(rule, "hold"):
            reason = rule.spec.reason or f"held for approval by rule {rule.spec.id}"
            return staged.into(Decision("hold", rule.spec.id, policy.version, mode,
                                        f"{reason}; {note}" if note else reason, evidence,
                                        timeout=rule.spec.timeout or policy.default_hold_timeout))
    for rule in bucket.allow:
        hit, evidence, _ = _matches(rule, facts, errors_match=False)
        if hit:
            if mode == "audit" and action.verb != "read":
                return staged.into(Decision("hold", AUDIT_RULE, policy.version, mode,
                                            f"agent is in audit mode: {action.verb} (allowed by {rule.spec.id}) "
                                            "needs a human", evidence, timeout=policy.default_hold_timeout))
            return staged.into(Decision("allow", rule.spec.id, policy.version, mode,
                                        rule.spec.reason or f"allowed by rule {rule.spec.id}", evidence))
    target = f"{action.upstream}/{action.resource}" if action.resource else action.upstream
    return staged.into(Decision("deny", DEFAULT_RULE, policy.version, mode,
                                f"no rule allows {action.verb!r} on {target!r} for agent {agent.spec.id!r}"))


class _Staged:
    """Deny and hold rules being rolled out: `shadow` ones are only recorded (would_deny / would_hold), `warn`
    ones let the call through with a warning; neither decides."""

    __slots__ = ("shadow", "warnings")

    def __init__(self) -> None:
        self.shadow: list[dict[str, str]] = []
        self.warnings: list[dict[str, str]] = []

    def passes(self, rule: Rule, effect: str) -> bool:
        """Whether a matching rule decides (enforce) rather than being recorded (shadow, warn)."""
        mode = rule.spec.enforce
        if mode == "enforce":
            return True
        if mode == "shadow":
            self.shadow.append({"rule": rule.spec.id, "would": effect})
        else:
            self.warnings.append({"rule": rule.spec.id, "warn": effect})
        return False

    def into(self, decision: Decision) -> Decision:
        if not self.shadow and not self.warnings:
            return decision
        return replace(decision, shadow=tuple(self.shadow), warnings=tuple(self.warnings))


def may_call_tool(agent: AgentPolicy, upstream: str, verb: str, resource: str) -> bool:
    """Whether a tool belongs in this agent's `tools/list`: some allow or hold rule could let it through,
    and no unconditional deny rule blocks it."""
    bucket = agent.bucket(upstream, verb)
    if any(r.condition is None and r.covers(resource) for r in bucket.deny):
        return False
    return any(r.covers(resource) for r in (*bucket.allow, *bucket.hold))


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
