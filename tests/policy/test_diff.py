"""`agent-gateway rules diff`: rule-by-rule changes between two rules directories or git revisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from gateway.policy.diff import RuleSetDiff, compare
from gateway.policy.diffreport import render, to_json
from gateway.policy.revision import SourceError
from gateway.policy.spec import RuleSetInvalid

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"OPENAI_API_KEY": "sk-old-secret-value", "OPENAI_KEY_2": "sk-new-secret-value"}

UPSTREAMS = """\
upstreams:
  openai:
    kind: openai
    url: https://api.openai.com/v1
    credential: {header: Authorization, value: "Bearer ${OPENAI_API_KEY}"}
    prices: {gpt-4o-mini: {input_per_mtok: 0.15, output_per_mtok: 0.60}}
  erp:
    kind: http
    url: http://erp.internal:9000
    routes:
      - {method: GET, path: "/vendors/*", verb: read, resource: vendors}
      - {method: POST, path: "/payments", verb: create, resource: payments}
  crm:
    kind: mcp
    url: http://crm.internal:7000
    tools:
      - {name: lookup_account, verb: read, resource: accounts}
"""

BOT = """\
agent: bot
owner: team@example.com
mode: assist
allow:
  - {upstream: openai, verbs: [chat]}
  - {upstream: erp, verbs: [read]}
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount <= 100"}
hold:
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount > 100", reason: big,
     timeout: 15m}
deny:
  - {id: no-deletes, upstream: erp, verbs: [delete]}
budgets:
  - {tokens: 1000, per: day}
rate_limits:
  - {upstream: openai, requests: 60, per: minute}
"""


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def base(root: Path, **changes: str) -> Path:
    files = {"upstreams.yaml": UPSTREAMS, "agents/bot.yaml": BOT}
    files.update({rel.replace("__", "/").replace("_yaml", ".yaml"): text for rel, text in changes.items()})
    return write(root, files)


def diff_of(tmp_path: Path, upstreams: str = UPSTREAMS, bot: str = BOT, **extra: str) -> RuleSetDiff:
    old = base(tmp_path / "old")
    new = write(tmp_path / "new", {"upstreams.yaml": upstreams, "agents/bot.yaml": bot, **extra})
    return compare(str(old), str(new), SECRETS)


def rules(diff: RuleSetDiff) -> list[tuple[str, str | None, str]]:
    return [(i.change, i.old_id, i.id) for a in diff.agents for i in a.items if i.kind == "rule"]


def cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "gateway", "rules", "diff", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=60, check=False)


# -- matching rules ----------------------------------------------------------------------------------------------


def test_diff_is_identical_when_only_comments_change(tmp_path: Path) -> None:
    diff = diff_of(tmp_path, bot="# reviewed\n" + BOT)
    assert diff.identical
    assert diff.old.version != diff.new.version
    assert "no rule changes" in render(diff, "text")


def test_diff_reports_moved_not_changed_when_a_rule_is_inserted_above(tmp_path: Path) -> None:
    bot = BOT.replace("allow:\n", "allow:\n  - {upstream: erp, verbs: [export]}\n")
    assert rules(diff_of(tmp_path, bot=bot)) == [
        ("added", None, "bot.yaml#allow[0]"),
        ("moved", "bot.yaml#allow[0]", "bot.yaml#allow[1]"),
        ("moved", "bot.yaml#allow[1]", "bot.yaml#allow[2]"),
        ("moved", "bot.yaml#allow[2]", "bot.yaml#allow[3]"),
    ]


def test_diff_reports_moved_and_changed_when_a_shifted_rule_also_changes(tmp_path: Path) -> None:
    bot = BOT.replace("allow:\n", "allow:\n  - {upstream: erp, verbs: [export]}\n").replace("<= 100", "<= 500")
    diff = diff_of(tmp_path, bot=bot)
    assert rules(diff)[-1] == ("changed", "bot.yaml#allow[2]", "bot.yaml#allow[3]")
    [changed] = [i for i in diff.agents[0].items if i.change == "changed"]
    assert [(f.field, f.old, f.new) for f in changed.fields] == [
        ("when", "request.json.amount <= 100", "request.json.amount <= 500")]


def test_diff_reports_removed_and_moved_when_a_rule_above_is_deleted(tmp_path: Path) -> None:
    bot = BOT.replace("  - {upstream: openai, verbs: [chat]}\n", "")
    assert rules(diff_of(tmp_path, bot=bot)) == [
        ("removed", None, "bot.yaml#allow[0]"),
        ("moved", "bot.yaml#allow[1]", "bot.yaml#allow[0]"),
        ("moved", "bot.yaml#allow[2]", "bot.yaml#allow[1]"),
    ]


def test_diff_reports_a_renamed_rule_as_moved(tmp_path: Path) -> None:
    assert rules(diff_of(tmp_path, bot=BOT.replace("id: no-deletes", "id: erp-no-deletes"))) == [
        ("moved", "no-deletes", "erp-no-deletes")]


def test_diff_lists_every_changed_rule_field_old_to_new(tmp_path: Path) -> None:
    bot = BOT.replace('> 100", reason: big,\n     timeout: 15m}', '> 500", reason: "very big",\n     timeout: 30m,'
                      ' enforce: shadow}').replace("{id: no-deletes, upstream: erp, verbs: [delete]}",
                                                   "{id: no-deletes, upstream: crm, verbs: [delete, send], "
                                                   "resources: [accounts]}")
    diff = diff_of(tmp_path, bot=bot)
    fields = {i.id: [(f.field, f.old, f.new) for f in i.fields] for i in diff.agents[0].items}
    assert fields == {
        "bot.yaml#hold[0]": [("when", "request.json.amount > 100", "request.json.amount > 500"),
                             ("reason", "big", "very big"), ("timeout", 900.0, 1800.0),
                             ("enforce", "enforce", "shadow")],
        "no-deletes": [("upstream", "erp", "crm"), ("verbs", ["delete"], ["delete", "send"]),
                       ("resources", None, ["accounts"])],
    }
    text = render(diff, "text")
    assert "      ~ timeout: 15m → 30m\n" in text
    assert "      ~ resources: any → [accounts]\n" in text


def test_diff_reports_agent_settings_budgets_and_rate_limits(tmp_path: Path) -> None:
    bot = (BOT.replace("mode: assist", "mode: automate").replace("owner: team@example.com", "purpose: Pay bills")
           .replace("{tokens: 1000, per: day}", "{tokens: 2000, per: day, alert_at: [0.9], clamp_max_tokens: true}")
           .replace("requests: 60", "requests: 30")
           + "loop_detection: false\ncapture: {json: all, sensitive: [card]}\n")
    agent = diff_of(tmp_path, bot=bot).agents[0]
    assert [(f.field, f.change, f.old, f.new) for f in agent.fields] == [
        ("owner", "changed", "team@example.com", None),
        ("purpose", "changed", None, "Pay bills"),
        ("mode", "changed", "assist", "automate"),
        ("loop_detection", "changed", {"max_repeats": 20, "per": "minute"}, "off"),
        ("capture.json", "changed", "referenced", "all"),
        ("capture.sensitive", "changed", [], ["card"]),
    ]
    fields = {i.id: [(f.field, f.old, f.new) for f in i.fields] for i in agent.items}
    assert fields == {
        "bot.yaml#budgets[0]": [("tokens", 1000, 2000), ("alert_at", [0.5, 0.8, 1.0], [0.9]),
                                ("clamp_max_tokens", False, True)],
        "bot.yaml#rate_limits[0]": [("requests", 60, 30)],
    }


def test_diff_reports_agents_added_removed_and_renamed_files(tmp_path: Path) -> None:
    old = base(tmp_path / "old", agents__gone_yaml="agent: gone\nallow:\n  - {upstream: erp, verbs: [read]}\n")
    new = write(tmp_path / "new", {"upstreams.yaml": UPSTREAMS, "agents/payments-bot.yaml": BOT,
                                   "agents/fresh.yaml": "agent: fresh\nmode: audit\n"})
    diff = compare(str(old), str(new), SECRETS)
    assert [(a.agent, a.change, a.file) for a in diff.agents] == [
        ("fresh", "added", "agents/fresh.yaml"), ("gone", "removed", "agents/gone.yaml"),
        ("bot", "changed", "agents/payments-bot.yaml")]
    bot = diff.agents[2]
    assert [(f.field, f.old, f.new) for f in bot.fields] == [("file", "agents/bot.yaml", "agents/payments-bot.yaml")]
    assert {i.change for i in bot.items} == {"moved"}  # index ids name the file, explicit ids stay put
    assert {i.id for i in bot.items} >= {"payments-bot.yaml#allow[0]", "payments-bot.yaml#budgets[0]"}
    assert [(i.change, i.id) for i in diff.agents[1].items] == [("removed", "gone.yaml#allow[0]")]


# -- upstreams ---------------------------------------------------------------------------------------------------


def test_diff_reports_upstream_fields_without_credential_values(tmp_path: Path) -> None:
    upstreams = (UPSTREAMS.replace("${OPENAI_API_KEY}", "${OPENAI_KEY_2}")
                 .replace("https://api.openai.com/v1", "https://svc:hunter2@api.openai.com/v2")
                 .replace("output_per_mtok: 0.60", "output_per_mtok: 0.70")
                 .replace('      - {method: POST, path: "/payments", verb: create, resource: payments}\n',
                          '      - {method: DELETE, path: "/vendors/*", verb: delete, resource: vendors}\n'
                          "    on_store_error: allow\n    connect_timeout: 2s\n")
                 .replace("verb: read, resource: accounts", "verb: lookup, resource: accounts"))
    diff = diff_of(tmp_path, upstreams=upstreams)
    changes = {u.name: [(f.field, f.change, f.old, f.new, f.secret) for f in u.fields] for u in diff.upstreams}
    assert changes == {
        "crm": [("tools.lookup_account", "changed", {"verb": "read", "resource": "accounts"},
                 {"verb": "lookup", "resource": "accounts"}, False)],
        "erp": [("connect_timeout", "changed", 5.0, 2.0, False), ("on_store_error", "changed", "deny", "allow", False),
                ("routes", "removed", "POST /payments -> create payments", None, False),
                ("routes", "added", None, "DELETE /vendors/* -> delete vendors", False)],
        "openai": [("url", "changed", "https://api.openai.com/v1", "https://***@api.openai.com/v2", False),
                   ("credential.value", "changed", None, None, True),
                   ("prices.gpt-4o-mini", "changed", {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
                    {"input_per_mtok": 0.15, "output_per_mtok": 0.7}, False)],
    }
    outputs = [render(diff, fmt) for fmt in ("text", "json", "markdown")]
    for output in outputs:
        assert all(secret not in output for secret in (*SECRETS.values(), "hunter2"))
    assert "~ credential.value: changed (value not shown)" in outputs[0]


def test_diff_reports_an_upstream_tls_change(tmp_path: Path) -> None:
    ca = trustme.CA()
    client = ca.issue_cert("gateway.test")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    tls = f"    tls: {{ca_file: '{tmp_path}/ca.pem', cert_file: '{tmp_path}/client.pem'}}\n"
    upstreams = UPSTREAMS.replace("    prices: {gpt", tls + "    prices: {gpt")
    diff = diff_of(tmp_path, upstreams=upstreams)
    [openai] = diff.upstreams
    assert [(f.field, f.change, f.new) for f in openai.fields] == [
        ("tls.ca_file", "added", f"{tmp_path}/ca.pem"), ("tls.cert_file", "added", f"{tmp_path}/client.pem")]
    assert f"+ tls.ca_file: {tmp_path}/ca.pem" in render(diff, "text")


def test_diff_reports_upstreams_added_and_removed(tmp_path: Path) -> None:
    upstreams = UPSTREAMS.split("  crm:\n")[0] + "  billing:\n    kind: http\n    url: http://billing:9000\n"
    diff = diff_of(tmp_path, upstreams=upstreams)
    assert [(u.name, u.change) for u in diff.upstreams] == [("billing", "added"), ("crm", "removed")]
    text = render(diff, "text")
    assert "  + upstream billing\n      + kind: http\n      + url: http://billing:9000\n" in text
    assert "  - upstream crm\n" in text


def test_diff_reports_reordered_routes(tmp_path: Path) -> None:
    lines = UPSTREAMS.splitlines(keepends=True)
    get, post = lines[10], lines[11]
    upstreams = "".join([*lines[:10], post, get, *lines[12:]])
    [erp] = diff_of(tmp_path, upstreams=upstreams).upstreams
    assert [(f.field, f.change) for f in erp.fields] == [("routes (order)", "changed")]


# -- loading -----------------------------------------------------------------------------------------------------


def test_diff_loads_rules_whose_variables_are_unset(tmp_path: Path) -> None:
    old, new = base(tmp_path / "old"), base(tmp_path / "new")
    assert compare(str(old), str(new), {}).identical


def test_diff_raises_every_load_error_of_both_sides(tmp_path: Path) -> None:
    old = base(tmp_path / "old", agents__bot_yaml=BOT.replace("mode: assist", "mode: asist"))
    new = base(tmp_path / "new", agents__bot_yaml=BOT.replace("verbs: [chat]", "verb: [chat]"))
    with pytest.raises(RuleSetInvalid) as caught:
        compare(str(old), str(new), {})
    assert [(e.file, e.line, e.code) for e in caught.value.errors] == [
        (f"{new}/agents/bot.yaml", 5, "missing_key"), (f"{new}/agents/bot.yaml", 5, "unknown_key"),
        (f"{old}/agents/bot.yaml", 3, "bad_value")]


def test_diff_refuses_a_source_that_is_neither_directory_nor_revision(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist; give a rules directory or a git revision"):
        compare(str(tmp_path / "nope"), str(base(tmp_path / "new")), {})


# -- formats -----------------------------------------------------------------------------------------------------


def test_diff_json_has_a_stable_structure(tmp_path: Path) -> None:
    bot = BOT.replace("allow:\n", "allow:\n  - {upstream: erp, verbs: [export]}\n").replace("mode: assist",
                                                                                             "mode: audit")
    document = to_json(diff_of(tmp_path, bot=bot))
    assert list(document) == ["old", "new", "identical", "summary", "upstreams", "agents"]
    assert document["summary"]["rules"] == {"added": 1, "removed": 0, "changed": 0, "moved": 3}
    [agent] = document["agents"]
    assert list(agent) == ["agent", "change", "file", "fields", "rules", "budgets", "rate_limits"]
    assert agent["fields"] == [{"field": "mode", "change": "changed", "old": "assist", "new": "audit"}]
    assert agent["rules"][0] == {
        "id": "bot.yaml#allow[0]", "old_id": None, "change": "added",
        "item": {"effect": "allow", "upstream": "erp", "verbs": ["export"], "resources": None, "when": None,
                 "reason": None, "timeout": None, "enforce": "enforce"},
        "fields": []}
    assert agent["rules"][1]["change"] == "moved" and agent["rules"][1]["old_id"] == "bot.yaml#allow[0]"


def test_diff_markdown_has_a_heading_summary_and_field_tables(tmp_path: Path) -> None:
    markdown = render(diff_of(tmp_path, bot=BOT.replace("timeout: 15m", "timeout: 1h")), "markdown")
    assert markdown.startswith("### Rules diff: `")
    assert "**agents: 1 changed; rules: 1 changed**" in markdown
    assert "#### `agents/bot.yaml` (agent `bot`)" in markdown
    assert "  | ~ | `timeout` | `15m` | `1h` |" in markdown
    assert "\n\n\n" not in markdown


# -- the command line --------------------------------------------------------------------------------------------


def test_cli_diff_exits_0_when_identical_and_1_with_changes(tmp_path: Path) -> None:
    old, same = base(tmp_path / "old"), base(tmp_path / "same")
    changed = base(tmp_path / "new", agents__bot_yaml=BOT.replace("mode: assist", "mode: automate"))
    result = cli(str(old), str(same))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.endswith("no changes\n")
    result = cli(str(old), str(changed))
    assert (result.returncode, result.stderr) == (1, "")
    assert "# agents/bot.yaml (agent bot)\n  ~ mode: assist → automate\n" in result.stdout
    assert "\x1b[" not in result.stdout  # not a terminal: no colour
    assert "\x1b[33m  ~ mode: assist → automate\x1b[0m" in cli(str(old), str(changed), "--color", "always").stdout
    assert json.loads(cli(str(old), str(changed), "--format", "json").stdout)["identical"] is False


def test_cli_diff_exits_2_with_line_numbered_errors(tmp_path: Path) -> None:
    old = base(tmp_path / "old")
    new = base(tmp_path / "new", agents__bot_yaml=BOT.replace("mode: assist", "mode: asist"))
    result = cli(str(old), str(new))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{new}/agents/bot.yaml:3:7: bad_value: mode: unknown mode 'asist'; did you mean 'assist'?",
        "agent-gateway rules diff: 1 error(s); nothing compared"]


# -- git revisions -----------------------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with two commits of `rules/`: the second inserts an allow rule and changes the mode."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Test")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "commit.gpgsign", "false")
    base(repo / "rules")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first rules")
    bot = BOT.replace("allow:\n", "allow:\n  - {upstream: erp, verbs: [export]}\n").replace("mode: assist",
                                                                                             "mode: automate")
    base(repo / "rules", agents__bot_yaml=bot)
    git(repo, "commit", "-q", "-am", "export and automate")
    return repo


def test_cli_diff_compares_git_revisions(repo: Path) -> None:
    result = cli("HEAD~1:rules", "HEAD:rules", "--format", "json", cwd=repo)
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert (document["old"]["source"], document["new"]["source"]) == ("HEAD~1:rules", "HEAD:rules")
    [agent] = document["agents"]
    assert agent["fields"] == [{"field": "mode", "change": "changed", "old": "assist", "new": "automate"}]
    assert [(r["change"], r["id"]) for r in agent["rules"]] == [
        ("added", "bot.yaml#allow[0]"), ("moved", "bot.yaml#allow[1]"), ("moved", "bot.yaml#allow[2]"),
        ("moved", "bot.yaml#allow[3]")]


def test_diff_compares_a_revision_with_the_working_tree_from_another_directory(repo: Path) -> None:
    base(repo / "rules", agents__bot_yaml=BOT.replace("mode: assist", "mode: audit"))
    diff = compare(f"main~1:{repo / 'rules'}", str(repo / "rules"), {})
    assert [(f.field, f.old, f.new) for f in diff.agents[0].fields] == [("mode", "assist", "audit")]
    assert diff.old.source == f"main~1:{repo / 'rules'}"
    assert compare(f"main~1:{repo / 'rules'}", f"main~1:{repo}/rules/", {}).identical


def test_diff_names_revision_files_in_load_errors(repo: Path) -> None:
    base(repo / "rules", agents__bot_yaml="agent: bot\ncolour: red\n")
    git(repo, "commit", "-q", "-am", "broken")
    result = cli("HEAD~1:rules", "HEAD:rules", cwd=repo)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        "HEAD:rules/agents/bot.yaml:2:1: unknown_key: colour: unknown key; expected one of: agent, owner, purpose, "
        "mode, allow, hold, deny, budgets, rate_limits, loop_detection, capture")


@pytest.mark.parametrize(("spec", "message"), [
    ("HEAD~5:rules", "HEAD~5:rules: unknown revision 'HEAD~5' in the git repository at "),
    ("HEAD:policies", "HEAD:policies: revision 'HEAD' has no directory 'policies' in "),
    ("HEAD:rules/upstreams.yaml", "revision 'HEAD' has no directory 'rules/upstreams.yaml'"),
    (":rules", ":rules: no revision before ':'"),
])
def test_cli_diff_exits_2_on_a_bad_revision(repo: Path, spec: str, message: str) -> None:
    result = cli(spec, "HEAD:rules", cwd=repo)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("agent-gateway rules diff: ")
    assert message in result.stderr


def test_cli_diff_exits_2_outside_a_git_repository(tmp_path: Path) -> None:
    base(tmp_path / "rules")
    result = cli("HEAD:rules", "rules", cwd=tmp_path, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert result.returncode == 2
    assert f"HEAD:rules: {tmp_path / 'rules'} is not inside a git repository" in result.stderr


def test_cli_diff_exits_2_when_git_is_missing(repo: Path) -> None:
    result = cli("HEAD~1:rules", "HEAD:rules", cwd=repo, env={"PATH": str(repo)})
    assert result.returncode == 2
    assert result.stderr == ("agent-gateway rules diff: git is not installed or not on PATH; it is needed to read "
                             "REV:PATH sources\n")
