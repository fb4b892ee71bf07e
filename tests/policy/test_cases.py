"""Policy cases as data: every case under rules/tests runs through the live classifier and decision code."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gateway.policy.cases import PlaceholderEnv, evaluate, load_cases, mismatches, run_case_files
from gateway.policy.compile import compile_policy
from gateway.policy.load import load_rules

RULES = Path(__file__).resolve().parents[2] / "rules"
CASES = list(load_cases(RULES / "tests"))
POLICY = compile_policy(load_rules(RULES, PlaceholderEnv()))


@pytest.mark.parametrize("case", CASES, ids=[c.source.rsplit("/", 1)[-1] for c in CASES])
def test_policy_case_decides_as_expected(case):
    outcome = evaluate(POLICY, case.agent, case.request)
    assert mismatches(case, outcome) == [], outcome.reason


def test_every_example_rule_is_covered_by_a_case():
    # A rule is covered when a case's decision cites it, or (audit-mode holds) its reason names it.
    outcomes = [evaluate(POLICY, c.agent, c.request) for c in CASES]
    rules = {rule for agent in POLICY.agents.values() for rule in agent.rules}
    uncovered = {r for r in rules if not any(o.rule == r or r in o.reason or r in o.shadow for o in outcomes)}
    assert uncovered == set()


def test_rules_test_reports_a_wrong_expectation(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "cases:\n"
        "  - name: wrong on purpose\n"
        "    agent: invoice-bot\n"
        "    request: {method: DELETE, path: /erp/vendors/v-1}\n"
        "    expect: {decision: allow}\n")
    out = io.StringIO()
    assert run_case_files(str(RULES), [str(tmp_path / "bad.yaml")], {}, out) == 1
    assert "FAIL" in out.getvalue()
    assert "decision: expected 'allow', got 'deny'" in out.getvalue()
    assert out.getvalue().endswith("0 passed, 1 failed\n")


def test_rules_test_passes_the_shipped_cases():
    out = io.StringIO()
    assert run_case_files(str(RULES), [], {}, out) == 0
    assert out.getvalue().endswith(f"{len(CASES)} passed, 0 failed\n")
