"""compile: agents with the same rules share their compiled plan and steps, yet each decision cites its own agent's
rule ids, reasons and evidence; rules that differ in anything a decision reads are never merged."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.incoming import Incoming
from gateway.models import Action, Decision
from gateway.policy.compile import Policy, compile_policy
from gateway.policy.decide import DEFAULT_RULE, decide, decide_each, may_call_tool
from gateway.policy.load import load_rules

UPSTREAMS = """\
upstreams:
  erp:
    kind: http
    url: http://erp.internal
  llm:
    kind: openai
    url: https://llm.internal/v1
  crm:
    kind: mcp
    url: http://crm.internal
"""

TEMPLATE = """\
agent: {name}
mode: assist
allow:
  - {{upstream: erp, verbs: [read]}}
  - {{upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount <= 1000"}}
hold:
  - {{upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount > 1000"}}
deny:
  - {{upstream: erp, verbs: [delete], reason: "Never deletes"}}
  - {{upstream: erp, verbs: [create], resources: [payments], when: "request.json.vendor == 'x'", enforce: shadow}}
"""


def build(tmp_path: Path, agents: dict[str, str]) -> Policy:
    root = tmp_path / "rules"
    (root / "agents").mkdir(parents=True)
    (root / "upstreams.yaml").write_text(UPSTREAMS)
    for name, text in agents.items():
        (root / "agents" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return compile_policy(load_rules(root, {}))


def templated(tmp_path: Path, *names: str) -> Policy:
    return build(tmp_path, {name: TEMPLATE.format(name=name) for name in names})


def run(policy: Policy, agent: str, verb: str, resource: str | None = None, body: Any = None,
        upstream: str = "erp") -> Decision:
    kind = {"erp": "http", "llm": "openai", "crm": "mcp"}[upstream]
    raw = b"" if body is None else orjson.dumps(body)
    request = Incoming("POST", "/x", "", CIMultiDictProxy(CIMultiDict()), raw)
    return decide(policy, policy.agents[agent], Action(upstream, kind, verb, resource), request)


def test_same_rules_share_one_plan_and_its_steps(tmp_path: Path) -> None:
    policy = templated(tmp_path, "a", "b", "c")
    a, b, c = (policy.agents[n] for n in "abc")
    assert a.plan is b.plan is c.plan
    assert a.bucket("erp", "create").allow[0].step is b.bucket("erp", "create").allow[0].step
    assert a.bucket("erp", "create").allow[0].condition is c.bucket("erp", "create").allow[0].condition


def test_shared_plan_decisions_cite_each_agents_own_rule_and_reason(tmp_path: Path) -> None:
    policy = templated(tmp_path, "a", "b")
    for name in ("a", "b"):
        allowed = run(policy, name, "create", "payments", {"amount": 5})
        assert (allowed.outcome, allowed.rule, allowed.reason) == (
            "allow", f"{name}.yaml#allow[1]", f"allowed by rule {name}.yaml#allow[1]")
        assert allowed.evidence == {"request.json.amount": 5}
        held = run(policy, name, "create", "payments", {"amount": 5000})
        assert (held.outcome, held.rule, held.reason) == (
            "hold", f"{name}.yaml#hold[0]", f"held for approval by rule {name}.yaml#hold[0]")
        denied = run(policy, name, "delete", "vendors")
        assert (denied.outcome, denied.rule, denied.reason) == ("deny", f"{name}.yaml#deny[0]", "Never deletes")
        default = run(policy, name, "export", "vendors")
        assert (default.rule, default.reason) == (
            DEFAULT_RULE, f"no rule allows 'export' on 'erp/vendors' for agent '{name}'")


def test_shared_plan_staged_rules_record_each_agents_own_rule(tmp_path: Path) -> None:
    policy = templated(tmp_path, "a", "b")
    for name in ("a", "b"):
        decision = run(policy, name, "create", "payments", {"amount": 5, "vendor": "x"})
        assert (decision.outcome, decision.rule) == ("allow", f"{name}.yaml#allow[1]")
        assert decision.shadow == ({"rule": f"{name}.yaml#deny[1]", "would": "deny"},)


def test_shared_plan_batches_cite_the_batch_agents_rules(tmp_path: Path) -> None:
    policy = templated(tmp_path, "a", "b")
    request = Incoming("POST", "/x", "", CIMultiDictProxy(CIMultiDict()), b"")
    actions = (Action("erp", "http", "read", "vendors"), Action("erp", "http", "delete", "vendors"))
    (decision, action), each = decide_each(policy, policy.agents["b"], actions, request)
    assert (decision.outcome, decision.rule, action.verb) == ("deny", "b.yaml#deny[0]", "delete")
    assert [d.rule for d, _ in each] == ["b.yaml#allow[0]", "b.yaml#deny[0]"]


def test_shared_plan_buckets_hold_each_agents_own_rules(tmp_path: Path) -> None:
    policy = templated(tmp_path, "a", "b")
    for name in ("a", "b"):
        bucket = policy.agents[name].bucket("erp", "create")
        assert [r.spec.id for r in bucket.allow] == [f"{name}.yaml#allow[1]"]
        assert [r.spec.id for r in bucket.deny] == [f"{name}.yaml#deny[1]"]
        assert [r.spec.id for r in bucket.hold] == [f"{name}.yaml#hold[0]"]


def test_different_conditions_are_not_merged(tmp_path: Path) -> None:
    policy = build(tmp_path, {
        "a": "agent: a\nallow:\n  - {upstream: erp, verbs: [create], when: 'request.json.amount <= 100'}\n",
        "b": "agent: b\nallow:\n  - {upstream: erp, verbs: [create], when: 'request.json.amount <= 1000'}\n",
    })
    assert policy.agents["a"].plan is not policy.agents["b"].plan
    assert run(policy, "a", "create", body={"amount": 500}).outcome == "deny"
    assert run(policy, "b", "create", body={"amount": 500}).rule == "b.yaml#allow[0]"


def test_different_resources_are_not_merged(tmp_path: Path) -> None:
    policy = build(tmp_path, {
        "a": "agent: a\nallow:\n  - {upstream: erp, verbs: [read], resources: [vendors]}\n",
        "b": "agent: b\nallow:\n  - {upstream: erp, verbs: [read], resources: ['pay*']}\n",
    })
    assert (run(policy, "a", "read", "vendors").outcome, run(policy, "a", "read", "payments").outcome) == (
        "allow", "deny")
    assert (run(policy, "b", "read", "vendors").outcome, run(policy, "b", "read", "payments").outcome) == (
        "deny", "allow")
    assert may_call_tool(policy.agents["a"], "erp", "read", "vendors")
    assert not may_call_tool(policy.agents["b"], "erp", "read", "vendors")


def test_different_reasons_timeouts_and_staging_are_not_merged(tmp_path: Path) -> None:
    rule = "hold:\n  - {{upstream: erp, verbs: [create], reason: {reason}, timeout: {timeout}, enforce: {enforce}}}\n"
    policy = build(tmp_path, {
        "a": "agent: a\n" + rule.format(reason="Ask Ann", timeout="1m", enforce="enforce"),
        "b": "agent: b\n" + rule.format(reason="Ask Bob", timeout="1m", enforce="enforce"),
        "c": "agent: c\n" + rule.format(reason="Ask Ann", timeout="2m", enforce="enforce"),
        "d": "agent: d\n" + rule.format(reason="Ask Ann", timeout="1m", enforce="warn"),
    })
    a, b, c, d = (run(policy, name, "create") for name in "abcd")
    assert (a.outcome, a.reason, a.timeout) == ("hold", "Ask Ann", 60.0)
    assert (b.outcome, b.reason, b.timeout) == ("hold", "Ask Bob", 60.0)
    assert (c.outcome, c.reason, c.timeout) == ("hold", "Ask Ann", 120.0)
    assert (d.outcome, d.warnings) == ("deny", ({"rule": "d.yaml#hold[0]", "warn": "hold"},))
    assert len({id(policy.agents[name].plan) for name in "abcd"}) == 4


def test_different_modes_are_not_merged(tmp_path: Path) -> None:
    rules = "allow:\n  - {upstream: erp, verbs: [create]}\n"
    policy = build(tmp_path, {"a": "agent: a\nmode: audit\n" + rules, "b": "agent: b\nmode: assist\n" + rules})
    audited, assisted = run(policy, "a", "create"), run(policy, "b", "create")
    assert (audited.outcome, audited.mode) == ("hold", "audit")
    assert (assisted.outcome, assisted.rule, assisted.mode) == ("allow", "b.yaml#allow[0]", "assist")


def test_same_rules_in_another_order_cite_the_right_rule(tmp_path: Path) -> None:
    read = "  - {upstream: erp, verbs: [read], reason: Reading}\n"
    create = "  - {upstream: erp, verbs: [create], reason: Creating}\n"
    policy = build(tmp_path, {"a": "agent: a\nallow:\n" + read + create, "b": "agent: b\nallow:\n" + create + read})
    assert (run(policy, "a", "read").rule, run(policy, "a", "create").rule) == ("a.yaml#allow[0]", "a.yaml#allow[1]")
    assert (run(policy, "b", "read").rule, run(policy, "b", "create").rule) == ("b.yaml#allow[1]", "b.yaml#allow[0]")
    assert run(policy, "b", "read").reason == "Reading"


def test_partly_equal_agents_share_the_equal_buckets_only(tmp_path: Path) -> None:
    erp = "  - {upstream: erp, verbs: [read]}\n"
    policy = build(tmp_path, {
        "a": "agent: a\nallow:\n" + erp + "  - {upstream: llm, verbs: [chat]}\n",
        "b": "agent: b\nallow:\n" + erp + "  - {upstream: llm, verbs: [chat], when: 'request.json.model == \"m\"'}\n",
    })
    a, b = policy.agents["a"].plan, policy.agents["b"].plan
    assert a is not b
    assert a.steps("erp", "read") is b.steps("erp", "read")
    assert a.steps("llm", "chat") is not b.steps("llm", "chat")
    assert run(policy, "a", "chat", upstream="llm", body={"model": "n"}).outcome == "allow"
    assert run(policy, "b", "chat", upstream="llm", body={"model": "n"}).outcome == "deny"


def test_agents_are_found_by_their_ids_and_name_themselves(tmp_path: Path) -> None:
    policy = templated(tmp_path, "a", "b")
    assert sorted(policy.agents) == ["a", "b"]
    for name, agent in policy.agents.items():
        assert agent.id == agent.spec.id == name
        assert agent.rule_ids == tuple(r.id for r in agent.spec.rules) == tuple(agent.rules)
