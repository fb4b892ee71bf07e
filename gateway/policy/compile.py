"""Compile a loaded `RuleSet` into the live `Policy`: CEL compiled, rules indexed by (upstream, verb).

Generated or templated agents repeat their rules, so what a decision walks (a `Plan` of `Step`s) is shared by
every agent with the same rules in the same order; only the rule ids a decision cites are the agent's own. With
many agents active, a decision then touches three objects of its agent (`AgentPolicy`, its `rule_ids` and one id)
instead of a few dozen, so its cost hardly grows with the number of agents through cache and TLB misses.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple, cast

from ..capture import Capturer
from ..classify.http import RouteTable, compile_routes
from ..limits.plan import Planner
from ..models import Mode
from ..upstream_client import Origin
from .conditions import Condition, ConditionError, compile_condition
from .spec import AgentSpec, Enforcement, RuleError, RuleSet, RuleSetInvalid, RuleSpec, UpstreamSpec

DEFAULT_HOLD_TIMEOUT = 900.0  # seconds, when a hold rule names none (15 minutes)


@dataclass(frozen=True, slots=True, eq=False)
class Step:
    """One rule as a decision walks it. Shared by the agents that have the same rule at the same position, it
    names the rule only by that position: the agent's `rule_ids[position]`. Compared by identity: within a
    policy, equal steps are one object."""

    position: int  # among the agent's rules, in file order
    enforce: Enforcement
    condition: Condition | None
    exact: frozenset[str] | None  # resources without globs; None with `glob` None means any resource
    glob: re.Pattern[str] | None
    timeout: float | None  # hold rules; None: the policy's default
    reason: str | None  # None: the default, which names the rule (built per decision: one string less per rule)

    def covers(self, resource: str | None) -> bool:
        if self.exact is None and self.glob is None:
            return True
        name = resource or ""
        return (self.exact is not None and name in self.exact) or (
            self.glob is not None and self.glob.fullmatch(name) is not None)


class Steps(NamedTuple):
    """The steps that can apply to one (upstream, verb), by effect, each in file order."""

    deny: tuple[Step, ...] = ()
    hold: tuple[Step, ...] = ()
    allow: tuple[Step, ...] = ()


NO_STEPS = Steps()


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """Everything a decision reads but the rule ids: shared by agents whose rules differ only in their ids."""

    mode: Mode
    granted: frozenset[str]  # upstreams with at least one allow or hold rule
    index: Mapping[str, Mapping[str, Steps]]  # upstream -> verb, and "*" for any other verb -> steps

    def steps(self, upstream: str, verb: str) -> Steps:
        verbs = self.index.get(upstream)
        if verbs is None:
            return NO_STEPS
        found = verbs.get(verb)
        return verbs["*"] if found is None else found


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule of one agent: its spec, and the (possibly shared) step that decides it."""

    spec: RuleSpec
    step: Step

    @property
    def condition(self) -> Condition | None:
        return self.step.condition

    def covers(self, resource: str | None) -> bool:
        return self.step.covers(resource)


@dataclass(frozen=True, slots=True)
class Bucket:
    """The rules of one agent that can apply to one (upstream, verb), in precedence order."""

    deny: tuple[Rule, ...] = ()
    hold: tuple[Rule, ...] = ()
    allow: tuple[Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    # The fields a decision reads come first, next to the object's header.
    plan: Plan  # shared with the agents that have the same rules
    rule_ids: tuple[str, ...]  # by rule position, as the plan's steps cite them
    id: str
    spec: AgentSpec
    rules: Mapping[str, Rule]
    planner: Planner  # the agent's rate limits, budgets and loop detection, compiled
    capturer: Capturer  # what each call's trace keeps of the request, for replay

    def bucket(self, upstream: str, verb: str) -> Bucket:
        """The agent's rules that can apply to one (upstream, verb), in precedence order (built from the plan:
        replay and tests read them, decisions do not)."""
        deny, hold, allow = self.plan.steps(upstream, verb)
        ids, rules = self.rule_ids, self.rules
        return Bucket(tuple(rules[ids[s.position]] for s in deny), tuple(rules[ids[s.position]] for s in hold),
                      tuple(rules[ids[s.position]] for s in allow))

    def as_cel(self) -> dict[str, object]:
        s = self.spec
        return {"id": s.id, "owner": s.owner or "", "purpose": s.purpose or "", "mode": s.mode}


@dataclass(frozen=True, slots=True)
class Upstream:
    spec: UpstreamSpec
    routes: RouteTable | None
    origin: Origin  # where its url sends requests, worked out once


@dataclass(frozen=True, slots=True)
class Policy:
    """The compiled, immutable policy one request is decided with, start to finish."""

    version: str
    upstreams: Mapping[str, Upstream]
    agents: Mapping[str, AgentPolicy]
    ruleset: RuleSet
    default_hold_timeout: float = DEFAULT_HOLD_TIMEOUT


class _Shared:
    """The compiled pieces of one rule set by content, so that equal ones are one object: a condition per text,
    a step per (position, rule but its id), steps and plans per content, a reason per text."""

    def __init__(self) -> None:
        self.conditions: dict[str, Condition] = {}
        self.matchers: dict[tuple[str, ...] | None, tuple[frozenset[str] | None, re.Pattern[str] | None]] = {}
        self.steps: dict[tuple[object, ...], Step] = {}
        self.buckets: dict[Steps, Steps] = {}
        self.plans: dict[tuple[object, ...], Plan] = {}
        self.texts: dict[str, str] = {}

    def condition(self, source: str) -> Condition:
        found = self.conditions.get(source)
        if found is None:
            found = self.conditions[source] = compile_condition(source)
        return found

    def step(self, position: int, rule: RuleSpec, condition: Condition | None) -> Step:
        key = (position, rule.enforce, rule.when, rule.resources, rule.timeout, rule.reason)
        found = self.steps.get(key)
        if found is None:
            matcher = self.matchers.get(rule.resources)
            if matcher is None:
                matcher = self.matchers[rule.resources] = _resource_matcher(rule.resources)
            found = self.steps[key] = Step(position, cast(Enforcement, sys.intern(rule.enforce)), condition, *matcher,
                                            rule.timeout, self.text(rule.reason) if rule.reason else None)
        return found

    def bucket(self, steps: Steps) -> Steps:
        return self.buckets.setdefault(steps, steps)

    def plan(self, mode: Mode, granted: frozenset[str], index: dict[tuple[str, str], Steps]) -> Plan:
        items = tuple(sorted(index.items(), key=lambda item: item[0]))
        key = (mode, granted, items)
        found = self.plans.get(key)
        if found is None:
            nested: dict[str, dict[str, Steps]] = {}
            for (upstream, verb), steps in items:
                nested.setdefault(sys.intern(upstream), {})[sys.intern(verb)] = steps
            found = self.plans[key] = Plan(cast(Mode, sys.intern(mode)), granted, nested)
        return found

    def text(self, text: str) -> str:
        return self.texts.setdefault(text, text)


def _resource_matcher(resources: tuple[str, ...] | None) -> tuple[frozenset[str] | None, re.Pattern[str] | None]:
    if resources is None:
        return None, None
    exact = frozenset(r for r in resources if not any(c in r for c in "*?["))
    globs = [fnmatch.translate(r) for r in resources if r not in exact]
    return exact, re.compile("|".join(globs)) if globs else None


def _compile_agent(spec: AgentSpec, errors: list[RuleError], shared: _Shared) -> AgentPolicy:
    rules: dict[str, Rule] = {}
    ids: list[str] = []  # by position among the compiled rules (ids are unique: load rejects duplicates)
    count = {"allow": 0, "hold": 0, "deny": 0}  # position among the agent's rules of the same effect
    for rule in spec.rules:
        position = count[rule.effect]
        count[rule.effect] += 1
        condition = None
        if rule.when is not None:
            try:
                condition = shared.condition(rule.when)
            except ConditionError as exc:
                loc = rule.when_loc or rule.loc
                # The file's own path (`hold[0].when`), also for rules with an explicit `id:`.
                errors.append(RuleError(loc.file, loc.line, loc.col, "rule_error",
                                        f"{rule.effect}[{position}].when", str(exc)))
                continue
        rules[rule.id] = Rule(rule, shared.step(len(ids), rule, condition))
        ids.append(rule.id)

    verbs_by_upstream: dict[str, set[str]] = {}
    for compiled in rules.values():
        verbs_by_upstream.setdefault(compiled.spec.upstream, set()).update(compiled.spec.verbs)
    index: dict[tuple[str, str], Steps] = {}
    for upstream, verbs in verbs_by_upstream.items():
        for verb in verbs | {"*"}:
            chosen = [r for r in rules.values() if r.spec.upstream == upstream
                      and (verb in r.spec.verbs or "*" in r.spec.verbs)]
            index[(upstream, verb)] = shared.bucket(Steps(
                deny=tuple(r.step for r in chosen if r.spec.effect == "deny"),
                hold=tuple(r.step for r in chosen if r.spec.effect == "hold"),
                allow=tuple(r.step for r in chosen if r.spec.effect == "allow"),
            ))
    granted = frozenset(r.spec.upstream for r in rules.values() if r.spec.effect in ("allow", "hold"))
    plan = shared.plan(spec.mode, granted, index)
    capturer = Capturer.from_conditions(spec.capture, (r.condition for r in rules.values() if r.condition))
    return AgentPolicy(plan, tuple(ids), spec.id, spec, rules, Planner(spec), capturer)


def _packed(agents: dict[str, AgentPolicy]) -> dict[str, AgentPolicy]:
    """The same agents, with the objects a decision reads of each (the agent, its rule ids, the id strings)
    allocated again, one agent after the other. Loading left the originals scattered among the rule set's other
    objects, a memory page or more apart; packed, a call to a random agent among thousands misses the TLB far
    less often."""
    packed: dict[str, AgentPolicy] = {}
    for agent in agents.values():
        agent_id = _copy(agent.id)
        packed[agent_id] = replace(agent, id=agent_id, rule_ids=tuple(_copy(i) for i in agent.rule_ids))
    return packed


def _copy(text: str) -> str:
    """A new string equal to `text` (`str()`, a whole slice or a join of one give back `text` itself)."""
    return text[:1] + text[1:]


def compile_policy(ruleset: RuleSet, default_hold_timeout: float = DEFAULT_HOLD_TIMEOUT) -> Policy:
    """Compile every condition and index; raise `RuleSetInvalid` with all CEL errors at once."""
    errors: list[RuleError] = []
    shared = _Shared()
    agents = {agent_id: _compile_agent(spec, errors, shared) for agent_id, spec in ruleset.agents.items()}
    if errors:
        raise RuleSetInvalid(errors)
    agents = _packed(agents)
    upstreams = {
        name: Upstream(spec, compile_routes(spec.routes) if spec.kind == "http" else None, Origin.of(spec.url))
        for name, spec in ruleset.upstreams.items()
    }
    return Policy(ruleset.version, upstreams, agents, ruleset, default_hold_timeout)
