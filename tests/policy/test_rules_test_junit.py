"""`agent-gateway rules test --junit FILE`: a JUnit XML report beside the text report, and readable failures."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from gateway.policy.cases import run_case_files

ROOT = Path(__file__).resolve().parents[2]

UPSTREAMS = """\
upstreams:
  erp:
    kind: http
    url: http://erp.internal:9000
    credential: {header: Authorization, value: "Bearer ${ERP_TOKEN}"}
    routes:
      - {method: GET, path: "/vendors/*", verb: read, resource: vendors}
      - {method: DELETE, path: "/vendors/*", verb: delete, resource: vendors}
"""

BOT = """\
agent: bot
allow:
  - {upstream: erp, verbs: [read]}
deny:
  - {upstream: erp, verbs: [delete], reason: "The bot never deletes vendors"}
"""

PASSING = """\
cases:
  - name: read a vendor
    agent: bot
    request: {method: GET, path: /erp/vendors/v-1}
    expect: {decision: allow, rule: "bot.yaml#allow[0]"}
  - name: delete is denied
    agent: bot
    request: {method: DELETE, path: /erp/vendors/v-1}
    expect: {decision: deny, rule: "bot.yaml#deny[0]", error: policy_denied}
"""

FAILING = """\
cases:
  - name: read a vendor
    agent: bot
    request: {method: GET, path: /erp/vendors/v-1}
    expect: {decision: allow}
  - name: wrong on purpose
    agent: bot
    request: {method: DELETE, path: /erp/vendors/v-1, json: {force: true}}
    expect: {decision: allow, rule: "bot.yaml#allow[0]"}
"""


def rules_dir(root: Path, cases: dict[str, str]) -> Path:
    (root / "agents").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "upstreams.yaml").write_text(UPSTREAMS)
    (root / "agents" / "bot.yaml").write_text(BOT)
    for name, text in cases.items():
        (root / "tests" / name).write_text(text)
    return root


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ERP_TOKEN"} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gateway", "rules", "test", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def counts(element: ET.Element) -> tuple[int, int, int]:
    return int(element.get("tests", -1)), int(element.get("failures", -1)), int(element.get("errors", -1))


def test_junit_report_of_passing_cases(tmp_path: Path) -> None:
    rules = rules_dir(tmp_path / "rules", {"bot.yaml": PASSING})
    report = tmp_path / "reports" / "rules.xml"
    result = cli(str(rules), "--junit", str(report))
    assert result.returncode == 0, result.stdout
    assert result.stdout.endswith("2 passed, 0 failed\n")
    root = ET.parse(report).getroot()
    assert root.tag == "testsuites" and counts(root) == (2, 0, 0)
    [suite] = root.findall("testsuite")
    assert (suite.get("name"), counts(suite)) == (str(rules / "tests" / "bot.yaml"), (2, 0, 0))
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        (str(rules / "tests" / "bot.yaml"), "read a vendor"), (str(rules / "tests" / "bot.yaml"), "delete is denied")]
    assert all(float(c.get("time", "x")) >= 0 and len(c) == 0 for c in cases)


def test_junit_report_of_failing_cases(tmp_path: Path) -> None:
    rules = rules_dir(tmp_path / "rules", {"a.yaml": PASSING, "b.yaml": FAILING})
    report = tmp_path / "rules.xml"
    result = cli(str(rules), "--junit", str(report))
    assert result.returncode == 1
    assert result.stdout.endswith("3 passed, 1 failed\n")
    root = ET.parse(report).getroot()
    assert counts(root) == (4, 1, 0)
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert counts(suites[str(rules / "tests" / "a.yaml")]) == (2, 0, 0)
    assert counts(suites[str(rules / "tests" / "b.yaml")]) == (2, 1, 0)
    [failed] = [c for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed.get("name") == "wrong on purpose"
    failure = failed.find("failure")
    assert failure is not None
    assert failure.get("message") == ("decision: expected 'allow', got 'deny'; "
                                      "rule: expected 'bot.yaml#allow[0]', got 'bot.yaml#deny[0]'")
    assert "reason:   The bot never deletes vendors" in (failure.text or "")


def test_rules_test_explains_a_failure(tmp_path: Path) -> None:
    rules = rules_dir(tmp_path / "rules", {"b.yaml": FAILING})
    out = io.StringIO()
    assert run_case_files(str(rules), [], {}, out) == 1
    case_file = rules / "tests" / "b.yaml"
    assert out.getvalue().splitlines() == [
        f"ok   {case_file}#cases[0]: read a vendor",
        f"FAIL {case_file}#cases[1]: wrong on purpose",
        "     decision: expected 'allow', got 'deny'",
        "     rule: expected 'bot.yaml#allow[0]', got 'bot.yaml#deny[0]'",
        '     request:  bot DELETE /erp/vendors/v-1 {"force":true}',
        "     expected: decision allow, rule bot.yaml#allow[0]",
        "     got:      decision deny, rule bot.yaml#deny[0], error policy_denied",
        "     reason:   The bot never deletes vendors",
        "1 passed, 1 failed",
    ]


def test_broken_case_file_is_an_error_and_the_others_still_run(tmp_path: Path) -> None:
    broken = "cases:\n  - name: no agent\n    request: {}\n"
    rules = rules_dir(tmp_path / "rules", {"a.yaml": PASSING, "b.yaml": broken})
    report = tmp_path / "rules.xml"
    result = cli(str(rules), "--junit", str(report))
    assert result.returncode == 1
    assert f"ERR  {rules / 'tests' / 'b.yaml'}#cases[0]: a case needs 'agent', 'expect'\n" in result.stdout
    assert result.stdout.endswith("2 passed, 1 failed\n")
    root = ET.parse(report).getroot()
    assert counts(root) == (3, 0, 1)
    error = root.find("testsuite/testcase/error")
    assert error is not None and "a case needs 'agent', 'expect'" in error.get("message", "")


def test_junit_report_when_the_rules_do_not_load(tmp_path: Path) -> None:
    rules = rules_dir(tmp_path / "rules", {"a.yaml": PASSING})
    (rules / "agents" / "bot.yaml").write_text("agent: bot\nmode: asist\n")
    report = tmp_path / "rules.xml"
    result = cli(str(rules), "--junit", str(report))
    assert result.returncode == 1
    assert result.stdout == (f"{rules}/agents/bot.yaml:2:7: bad_value: mode: unknown mode 'asist'; "
                             "did you mean 'assist'?\n")
    root = ET.parse(report).getroot()
    assert counts(root) == (1, 0, 1)
    [case] = root.iter("testcase")
    assert (case.get("classname"), case.get("name")) == (str(rules), "load rules")
    error = case.find("error")
    assert error is not None and error.get("message") == f"1 error(s) in {rules}"
    assert "unknown mode 'asist'" in (error.text or "")


def test_junit_report_survives_control_characters(tmp_path: Path) -> None:
    cases = FAILING.replace("name: wrong on purpose", 'name: "wrong \\x01 & <purpose>"')
    rules = rules_dir(tmp_path / "rules", {"a.yaml": cases})
    report = tmp_path / "rules.xml"
    assert cli(str(rules), "--junit", str(report)).returncode == 1
    names = [c.get("name") for c in ET.parse(report).getroot().iter("testcase")]
    assert names == ["read a vendor", "wrong \ufffd & <purpose>"]


def test_rules_test_without_junit_writes_no_report(tmp_path: Path) -> None:
    rules = rules_dir(tmp_path / "rules", {"a.yaml": PASSING})
    result = cli(str(rules))
    assert result.returncode == 0
    assert list(tmp_path.rglob("*.xml")) == []
