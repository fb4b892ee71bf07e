"""Compile a loaded `RuleSet` into the live `Policy`: CEL compiled, rules indexed by (upstream, verb)."""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from ..capture import Capturer
from ..classify.http import RouteTable, compile_routes
from ..limits.plan import Planner
from ..upstream_client import Origin
from .conditions import Condition, ConditionError, compile_condition
from .spec import AgentSpec, RuleError, RuleSet, RuleSetInvalid, RuleSpec, UpstreamSpec

DEFAULT_HOLD_TIMEOUT = 900.0  # seconds, when a hold rule names none (15 minutes)


@dataclass(frozen=True, slots=True)
class Rule:
    spec: RuleSpec
    condition: Condition | None
    exact: frozenset[str] | None  # resources without globs; None with `glob` None means any resource
    glob: re.Pattern[str] | None

    def covers(self, resource: str | None) -> bool:
        if self.exact is None and self.glob is None:
            return True
        name = resource or ""
        return (self.exact is not None and name in self.exact) or (
            self.glob is not None and self.glob.fullmatch(name) is not None)


@dataclass(frozen=True, slots=True)
class Bucket:
    """The rules of one agent that can apply to one (upstream, verb), in precedence order."""

    deny: tuple[Rule, ...] = ()
    hold: tuple[Rule, ...] = ()
    allow: tuple[Rule, ...] = ()


EMPTY = Bucket()


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    spec: AgentSpec
    buckets: Mapping[tuple[str, str], Bucket]  # (upstream, verb) and (upstream, "*") for any other verb
    granted_upstreams: frozenset[str]  # upstreams with at least one allow or hold rule
    rules: Mapping[str, Rule]
    planner: Planner  # the agent's rate limits, budgets and loop detection, compiled
    capturer: Capturer  # what each call's trace keeps of the request, for replay

    def bucket(self, upstream: str, verb: str) -> Bucket:
        found = self.buckets.get((upstream, verb))
        if found is None:
            found = self.buckets.get((upstream, "*"), EMPTY)
        return found

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


def _resource_matcher(resources: tuple[str, ...] | None) -> tuple[frozenset[str] | None, re.Pattern[str] | None]:
    if resources is None:
        return None, None
    exact = frozenset(r for r in resources if not any(c in r for c in "*?["))
    globs = [fnmatch.translate(r) for r in resources if r not in exact]
    return exact, re.compile("|".join(globs)) if globs else None


def _compile_agent(spec: AgentSpec, errors: list[RuleError], conditions: dict[str, Condition]) -> AgentPolicy:
    compiled: dict[str, Rule] = {}
    index: dict[str, int] = defaultdict(int)  # position among the agent's rules of the same effect
    for rule in spec.rules:
        position = index[rule.effect]
        index[rule.effect] += 1
        condition = None
        if rule.when is not None:
            try:
                # One compiled program per distinct text across the rule set: generated or templated agents
                # repeat conditions, and shared programs are fewer objects for each decision to touch.
                condition = conditions.get(rule.when)
                if condition is None:
                    condition = conditions[rule.when] = compile_condition(rule.when)
            except ConditionError as exc:
                loc = rule.when_loc or rule.loc
                # The file's own path (`hold[0].when`), also for rules with an explicit `id:`.
                errors.append(RuleError(loc.file, loc.line, loc.col, "rule_error",
                                        f"{rule.effect}[{position}].when", str(exc)))
                continue
        exact, glob = _resource_matcher(rule.resources)
        compiled[rule.id] = Rule(rule, condition, exact, glob)

    verbs_by_upstream: dict[str, set[str]] = defaultdict(set)
    for compiled_rule in compiled.values():
        verbs_by_upstream[compiled_rule.spec.upstream].update(compiled_rule.spec.verbs)
    buckets: dict[tuple[str, str], Bucket] = {}
    for upstream, verbs in verbs_by_upstream.items():
        for verb in verbs | {"*"}:
            chosen = [r for r in compiled.values() if r.spec.upstream == upstream
                      and (verb in r.spec.verbs or "*" in r.spec.verbs)]
            buckets[(upstream, verb)] = Bucket(
                deny=tuple(r for r in chosen if r.spec.effect == "deny"),
                hold=tuple(r for r in chosen if r.spec.effect == "hold"),
                allow=tuple(r for r in chosen if r.spec.effect == "allow"),
            )
    granted = frozenset(r.spec.upstream for r in compiled.values() if r.spec.effect in ("allow", "hold"))
    capturer = Capturer.from_conditions(spec.capture, (r.condition for r in compiled.values() if r.condition))
    return AgentPolicy(spec, buckets, granted, compiled, Planner(spec), capturer)


def compile_policy(ruleset: RuleSet, default_hold_timeout: float = DEFAULT_HOLD_TIMEOUT) -> Policy:
    """Compile every condition and index; raise `RuleSetInvalid` with all CEL errors at once."""
    errors: list[RuleError] = []
    conditions: dict[str, Condition] = {}
    agents = {agent_id: _compile_agent(spec, errors, conditions) for agent_id, spec in ruleset.agents.items()}
    if errors:
        raise RuleSetInvalid(errors)
    upstreams = {
        name: Upstream(spec, compile_routes(spec.routes) if spec.kind == "http" else None, Origin.of(spec.url))
        for name, spec in ruleset.upstreams.items()
    }
    return Policy(ruleset.version, upstreams, agents, ruleset, default_hold_timeout)
