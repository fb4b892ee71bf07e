"""Loading rule directories: specs with locations, every error at once, and a content-hash version."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from gateway.policy.load import load_rules, parse_duration, summary
from gateway.policy.spec import Loc, RuleSetInvalid, UpstreamTlsSpec

UPSTREAMS = """\
upstreams:
  openai:
    kind: openai
    url: https://api.openai.com/v1/
    credential: {header: Authorization, value: "Bearer ${OPENAI_API_KEY}"}
    prices: {gpt-4o-mini: {input_per_mtok: 0.15, output_per_mtok: 0.60}}
  erp:
    kind: http
    url: ${ERP_URL:-http://erp.internal:9000}
    read_timeout: 30s
    routes:
      - {method: get,  path: "/vendors/*",  verb: read,   resource: vendors}
      - {method: POST, path: "/payments",   verb: create, resource: payments}
  crm-tools:
    kind: mcp
    url: http://crm-mcp.internal:7000
    tools:
      - {name: lookup_account, verb: read,   resource: accounts}
      - {name: send_email,     verb: send}
"""

INVOICE_BOT = """\
agent: invoice-bot
owner: ap-team@example.com
purpose: Pay verified vendor invoices
mode: assist
allow:
  - {upstream: openai, verbs: [chat], when: 'request.json.model in ["gpt-4o-mini"]'}
  - {upstream: erp, verbs: [read]}
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount <= 10000"}
hold:
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount > 10000",
     reason: "Payments over 10,000 need a manager", timeout: 15m}
deny:
  - {id: no-deletes, upstream: erp, verbs: [delete]}
budgets:
  - {tokens: 200000, per: day, alert_at: [0.5, 0.8, 1.0]}
  - {usd: 25, per: month}
rate_limits:
  - {upstream: openai, requests: 60, per: minute}
  - tokens: ${TOKENS_PER_MINUTE:-40000}  # plain, so typed after expansion
    per: minute
"""

ENV = {"OPENAI_API_KEY": "sk-test"}


@pytest.fixture
def rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty `rules` directory, loaded by its relative name so error paths read `rules/...`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules" / "agents").mkdir(parents=True)
    return tmp_path / "rules"


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).write_text(textwrap.dedent(text))


def errors_of(env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(RuleSetInvalid) as info:
        load_rules("rules", ENV if env is None else env)
    return [str(error) for error in info.value.errors]


def with_agent(rules: Path, agent: str, upstreams: str = UPSTREAMS) -> list[str]:
    write(rules, {"upstreams.yaml": upstreams, "agents/x.yaml": agent})
    return errors_of()


def test_load_full_example_builds_specs(rules: Path) -> None:
    write(rules, {"upstreams.yaml": UPSTREAMS, "agents/invoice-bot.yaml": INVOICE_BOT})
    ruleset = load_rules("rules", ENV)

    assert ruleset.directory == "rules"
    assert ruleset.files == ("rules/upstreams.yaml", "rules/agents/invoice-bot.yaml")
    assert ruleset.version.startswith("sha256:") and len(ruleset.version) == len("sha256:") + 16

    openai = ruleset.upstreams["openai"]
    assert openai.kind == "openai"
    assert openai.url == "https://api.openai.com/v1"
    assert openai.credential is not None
    assert (openai.credential.header, openai.credential.value) == ("Authorization", "Bearer sk-test")
    assert openai.prices["gpt-4o-mini"].output_per_mtok == 0.60
    assert (openai.connect_timeout, openai.read_timeout) == (5.0, 300.0)
    assert openai.loc == Loc("rules/upstreams.yaml", 3, 5)

    erp = ruleset.upstreams["erp"]
    assert erp.url == "http://erp.internal:9000"
    assert erp.read_timeout == 30.0
    assert [(r.method, r.path, r.verb, r.resource) for r in erp.routes] == [
        ("GET", "/vendors/*", "read", "vendors"),
        ("POST", "/payments", "create", "payments"),
    ]
    assert erp.routes[1].loc == Loc("rules/upstreams.yaml", 13, 9)
    tools = ruleset.upstreams["crm-tools"].tools
    assert [(t.name, t.verb, t.resource) for t in tools] == [
        ("lookup_account", "read", "accounts"),
        ("send_email", "send", None),
    ]

    bot = ruleset.agents["invoice-bot"]
    assert (bot.owner, bot.mode, bot.file) == ("ap-team@example.com", "assist", "rules/agents/invoice-bot.yaml")
    assert [(r.id, r.effect, r.upstream, r.verbs) for r in bot.rules] == [
        ("invoice-bot.yaml#allow[0]", "allow", "openai", ("chat",)),
        ("invoice-bot.yaml#allow[1]", "allow", "erp", ("read",)),
        ("invoice-bot.yaml#allow[2]", "allow", "erp", ("create",)),
        ("invoice-bot.yaml#hold[0]", "hold", "erp", ("create",)),
        ("no-deletes", "deny", "erp", ("delete",)),
    ]
    hold = bot.rules[3]
    assert hold.timeout == 900.0
    assert hold.resources == ("payments",)
    assert hold.when == "request.json.amount > 10000"
    assert hold.reason == "Payments over 10,000 need a manager"
    assert hold.loc == Loc("rules/agents/invoice-bot.yaml", 10, 5)
    assert hold.when_loc == Loc("rules/agents/invoice-bot.yaml", 10, 67)
    assert bot.rules[1].resources is None and bot.rules[1].when_loc is None

    assert [(b.id, b.tokens, b.usd, b.per, b.alert_at) for b in bot.budgets] == [
        ("invoice-bot.yaml#budgets[0]", 200000, None, "day", (0.5, 0.8, 1.0)),
        ("invoice-bot.yaml#budgets[1]", None, 25.0, "month", (0.5, 0.8, 1.0)),
    ]
    assert [(r.id, r.upstream, r.requests, r.tokens, r.per) for r in bot.rate_limits] == [
        ("invoice-bot.yaml#rate_limits[0]", "openai", 60, None, "minute"),
        ("invoice-bot.yaml#rate_limits[1]", None, None, 40000, "minute"),
    ]
    assert summary(ruleset) == f"rules OK: 1 agent, 3 upstreams, 5 rules, version {ruleset.version}"


def test_load_without_agents_dir_has_no_agents(tmp_path: Path) -> None:
    write(tmp_path, {"upstreams.yaml": UPSTREAMS})
    ruleset = load_rules(tmp_path, ENV)
    assert dict(ruleset.agents) == {}
    assert ruleset.files == (str(tmp_path / "upstreams.yaml"),)


def test_load_reads_yml_and_skips_hidden_files(rules: Path) -> None:
    write(
        rules,
        {
            "upstreams.yaml": UPSTREAMS,
            "agents/a.yml": "agent: a\nallow:\n",
            "agents/.#a.yaml": "not: [valid",
            "agents/notes.txt": "not yaml either: [",
        },
    )
    ruleset = load_rules("rules", ENV)
    assert list(ruleset.agents) == ["a"]
    assert ruleset.agents["a"].rules == ()
    assert ruleset.agents["a"].mode == "assist"


def test_default_used_when_variable_unset_or_empty(rules: Path) -> None:
    write(rules, {"upstreams.yaml": UPSTREAMS})
    assert load_rules("rules", ENV).upstreams["erp"].url == "http://erp.internal:9000"
    assert load_rules("rules", {**ENV, "ERP_URL": ""}).upstreams["erp"].url == "http://erp.internal:9000"
    assert load_rules("rules", {**ENV, "ERP_URL": "https://erp.test/"}).upstreams["erp"].url == "https://erp.test"


def test_error_unknown_key_suggests_close_name(rules: Path) -> None:
    agent = """\
        agent: x
        allow:
          - {upstream: erp, verbs: [read]}
          - upstream: erp
            verb: [read]
        colour: red
        """
    assert with_agent(rules, agent) == [
        "rules/agents/x.yaml:4:5: missing_key: allow[1].verbs: missing required key 'verbs'",
        "rules/agents/x.yaml:5:5: unknown_key: allow[1].verb: did you mean 'verbs'?",
        "rules/agents/x.yaml:6:1: unknown_key: colour: unknown key; expected one of: "
        "agent, owner, purpose, mode, allow, hold, deny, budgets, rate_limits, loop_detection, capture",
    ]


def test_error_bad_type(rules: Path) -> None:
    agent = """\
        agent: x
        owner: 42
        allow:
          - {upstream: erp, verbs: read}
        budgets:
          - {tokens: true, per: day}
        """
    assert with_agent(rules, agent) == [
        "rules/agents/x.yaml:2:8: bad_type: owner: expected a string, got an integer; quote it to make it a string",
        "rules/agents/x.yaml:4:28: bad_type: allow[0].verbs: expected a list of strings, got a string",
        "rules/agents/x.yaml:6:14: bad_type: budgets[0].tokens: expected an integer, got a boolean",
    ]


def test_error_unknown_upstream(rules: Path) -> None:
    agent = """\
        agent: x
        allow:
          - {upstream: opanai, verbs: [chat]}
        deny:
          - {upstream: billing, verbs: ["*"]}
        rate_limits:
          - {upstream: crm-tool, requests: 5, per: second}
        """
    assert with_agent(rules, agent) == [
        "rules/agents/x.yaml:3:16: unknown_upstream: allow[0].upstream: unknown upstream 'opanai'; "
        "did you mean 'openai'?",
        "rules/agents/x.yaml:5:16: unknown_upstream: deny[0].upstream: unknown upstream 'billing'; "
        "upstreams.yaml defines: crm-tools, erp, openai",
        "rules/agents/x.yaml:7:16: unknown_upstream: rate_limits[0].upstream: unknown upstream 'crm-tool'; "
        "did you mean 'crm-tools'?",
    ]


def test_error_unset_variable(rules: Path) -> None:
    write(rules, {"upstreams.yaml": UPSTREAMS, "agents/x.yaml": 'agent: x\nowner: "team ${OWNER}"\n'})
    assert errors_of({}) == [
        "rules/agents/x.yaml:2:8: unset_variable: owner: ${OWNER} is not set",
        "rules/upstreams.yaml:5:48: unset_variable: upstreams.openai.credential.value: ${OPENAI_API_KEY} is not set",
    ]


def test_error_bad_yaml_does_not_hide_other_files(rules: Path) -> None:
    write(
        rules,
        {
            "upstreams.yaml": UPSTREAMS,
            "agents/a.yaml": "agent: a\nowner: a: b\n",
            "agents/b.yaml": "agent: b\nmode: asist\n",
        },
    )
    assert errors_of() == [
        "rules/agents/a.yaml:2:9: yaml_error: (root): mapping values are not allowed here",
        "rules/agents/b.yaml:2:7: bad_value: mode: unknown mode 'asist'; did you mean 'assist'?",
    ]


def test_error_duplicate_id_and_agent(rules: Path) -> None:
    write(
        rules,
        {
            "upstreams.yaml": UPSTREAMS,
            "agents/a.yaml": "agent: a\nallow:\n  - {id: pay, upstream: erp, verbs: [create]}\n",
            "agents/b.yaml": "agent: a\ndeny:\n  - {id: pay, upstream: erp, verbs: [delete]}\n",
        },
    )
    assert errors_of() == [
        "rules/agents/b.yaml:1:8: duplicate_agent: agent: agent 'a' is already defined in rules/agents/a.yaml",
        "rules/agents/b.yaml:3:10: duplicate_id: deny[0].id: id 'pay' is already used at rules/agents/a.yaml:3:10",
    ]


def test_error_missing_upstreams_file(rules: Path) -> None:
    # Without upstreams.yaml no upstream name is known, so rules are not flagged as naming unknown ones.
    write(rules, {"agents/a.yaml": "agent: a\nallow:\n  - {upstream: erp, verbs: [read]}\n"})
    assert errors_of() == [
        "rules/upstreams.yaml:1:1: missing_file: (root): file not found; a rules directory needs one",
    ]


def test_error_timeout_on_allow_rule(rules: Path) -> None:
    agent = """\
        agent: x
        allow:
          - {upstream: erp, verbs: [read], timeout: 5m}
        hold:
          - {upstream: erp, verbs: [create], timeout: 15 minutes}
        """
    assert with_agent(rules, agent) == [
        "rules/agents/x.yaml:3:36: bad_value: allow[0].timeout: timeout is only valid on hold rules",
        "rules/agents/x.yaml:5:47: bad_value: hold[0].timeout: bad duration '15 minutes'; "
        "use e.g. 30s, 15m, 2h, 1d or 500ms",
    ]


def test_error_budget_needs_exactly_one_amount(rules: Path) -> None:
    agent = """\
        agent: x
        budgets:
          - {tokens: 100, usd: 5, per: day}
          - {per: day}
          - {usd: 5, per: year, alert_at: [0.5, 1.5]}
        rate_limits:
          - {requests: 0, per: minute}
        """
    assert with_agent(rules, agent) == [
        "rules/agents/x.yaml:3:19: bad_value: budgets[0].usd: a budget counts either tokens or usd, not both",
        "rules/agents/x.yaml:4:5: missing_key: budgets[1]: a budget needs 'tokens' or 'usd'",
        "rules/agents/x.yaml:5:19: bad_value: budgets[2].per: unknown budget window 'year'; "
        "expected one of: hour, day, week, month",
        "rules/agents/x.yaml:5:41: bad_value: budgets[2].alert_at[1]: must be a fraction in (0, 1], got 1.5",
        "rules/agents/x.yaml:7:16: bad_value: rate_limits[0].requests: must be greater than 0, got 0",
    ]


def test_error_bad_upstream_values(rules: Path) -> None:
    upstreams = """\
        upstreams:
          ERP:
            kind: http
            url: ftp://erp.internal
            routes:
              - {method: FETCH, path: payments, verb: create}
          openai:
            kind: opnai
            url: https://api.openai.com/v1?x=1
          anthropic:
            kind: anthropic
            url: https://api.anthropic.com
            tools: []
            connect_timeout: -1
            credential: {header: "x api key", value: k}
          crm:
            kind: mcp
            url: http://crm
            url: http://crm2
        """
    write(rules, {"upstreams.yaml": upstreams})
    assert errors_of() == [
        "rules/upstreams.yaml:2:3: bad_value: upstreams.ERP: upstream name 'ERP' must match [a-z0-9][a-z0-9._-]*",
        "rules/upstreams.yaml:4:10: bad_value: upstreams.ERP.url: must be an http:// or https:// URL with a host",
        "rules/upstreams.yaml:6:18: bad_value: upstreams.ERP.routes[0].method: unknown HTTP method 'FETCH'; "
        "expected one of: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, *",
        "rules/upstreams.yaml:6:31: bad_value: upstreams.ERP.routes[0].path: must start with '/'",
        "rules/upstreams.yaml:8:11: bad_value: upstreams.openai.kind: unknown kind 'opnai'; did you mean 'openai'?",
        "rules/upstreams.yaml:9:10: bad_value: upstreams.openai.url: "
        "must not have a query or fragment (request paths are appended to it)",
        "rules/upstreams.yaml:13:5: bad_value: upstreams.anthropic.tools: tools are only for kind mcp, not anthropic",
        "rules/upstreams.yaml:14:22: bad_value: upstreams.anthropic.connect_timeout: "
        "bad duration '-1'; must be a finite number of seconds, not negative",
        "rules/upstreams.yaml:15:26: bad_value: upstreams.anthropic.credential.header: "
        "'x api key' is not a valid HTTP header name",
        "rules/upstreams.yaml:19:5: duplicate_key: upstreams.crm.url: key already set at line 18",
    ]


def test_errors_from_several_files_are_all_reported_sorted(rules: Path) -> None:
    write(
        rules,
        {
            "upstreams.yaml": "upstreams:\n  erp: {kind: http, url: http://erp, routes: [{method: GET, path: /x}]}\n",
            "agents/b.yaml": "agent: b\nhold:\n  - {upstream: erp, verbs: []}\n",
            "agents/a.yaml": "agent: A\nallow: {upstream: erp}\n",
        },
    )
    assert errors_of() == [
        "rules/agents/a.yaml:1:8: bad_value: agent: agent id 'A' must match [a-z0-9][a-z0-9._-]*",
        "rules/agents/a.yaml:2:8: bad_type: allow: expected a list, got a mapping",
        "rules/agents/b.yaml:3:28: bad_value: hold[0].verbs: must not be empty",
        "rules/upstreams.yaml:2:47: missing_key: upstreams.erp.routes[0].verb: missing required key 'verb'",
    ]


def test_version_is_stable_and_tracks_every_file(rules: Path, tmp_path: Path) -> None:
    write(rules, {"upstreams.yaml": UPSTREAMS, "agents/invoice-bot.yaml": INVOICE_BOT})
    first = load_rules("rules", ENV).version
    assert load_rules("rules", ENV).version == first
    assert load_rules("rules", {**ENV, "OPENAI_API_KEY": "other"}).version == first  # raw bytes, not secrets

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "agents").mkdir()
    write(moved, {"upstreams.yaml": UPSTREAMS, "agents/invoice-bot.yaml": INVOICE_BOT})
    assert load_rules(moved, ENV).version == first  # relative paths are hashed, not where the directory lives

    write(rules, {"agents/invoice-bot.yaml": INVOICE_BOT.replace("timeout: 15m", "timeout: 16m")})
    second = load_rules("rules", ENV).version
    assert second != first

    write(rules, {"upstreams.yaml": UPSTREAMS + "  # a comment\n"})
    third = load_rules("rules", ENV).version
    assert third not in (first, second)

    write(rules, {"agents/other.yaml": "agent: other\n"})
    assert load_rules("rules", ENV).version not in (first, second, third)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15m", 900.0),
        ("30s", 30.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("45", 45.0),
        ("1.5", 1.5),
        (10, 10.0),
        (2.5, 2.5),
        (" 5s ", 5.0),
    ],
)
def test_parse_duration_accepts_units_and_numbers(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "15 m", "1w", "-5s", "-1", "1e3", "nan", "inf", "s15"])
def test_parse_duration_rejects_bad_input(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_duration_rejects_booleans_and_infinity() -> None:
    with pytest.raises(ValueError):
        parse_duration(True)
    with pytest.raises(ValueError):
        parse_duration(float("inf"))
    with pytest.raises(ValueError):
        parse_duration(-1)


def test_anchors_and_merge_keys_are_expanded(rules: Path) -> None:
    agent = """\
        agent: x
        allow:
          - &read {upstream: erp, verbs: [read], resources: [vendors]}
          - {<<: *read, verbs: [create]}
        """
    write(rules, {"upstreams.yaml": UPSTREAMS, "agents/x.yaml": agent})
    rules_ = load_rules("rules", ENV).agents["x"].rules
    assert [(r.id, r.upstream, r.verbs, r.resources) for r in rules_] == [
        ("x.yaml#allow[0]", "erp", ("read",), ("vendors",)),
        ("x.yaml#allow[1]", "erp", ("create",), ("vendors",)),
    ]


def test_plain_scalar_is_typed_after_expansion_quoted_stays_string(rules: Path) -> None:
    agent = """\
        agent: x
        budgets:
          - tokens: ${DAILY}
            per: day
          - tokens: "${DAILY}"
            per: day
        """
    write(rules, {"upstreams.yaml": UPSTREAMS, "agents/x.yaml": agent})
    assert errors_of({**ENV, "DAILY": "1000"}) == [
        "rules/agents/x.yaml:5:13: bad_type: budgets[1].tokens: expected an integer, got a string",
    ]


def test_error_whole_file_problems(rules: Path) -> None:
    write(
        rules,
        {
            "upstreams.yaml": UPSTREAMS,
            "agents/a.yaml": "",
            "agents/b.yaml": "- agent: b\n",
            "agents/c.yaml": "agent: c\nallow: &a [*a]\n",
            "agents/d.yaml": "agent: d\nowner: ${not a name}\ntags: !!int x\n",
        },
    )
    assert errors_of() == [
        "rules/agents/a.yaml:1:1: bad_type: (root): expected a mapping, got null",
        "rules/agents/b.yaml:1:1: bad_type: (root): expected a mapping, got a list",
        "rules/agents/c.yaml:2:8: yaml_error: (root): recursive alias",
        "rules/agents/d.yaml:2:8: bad_value: owner: bad variable reference '${not a name}'; "
        "use ${NAME} or ${NAME:-default}",
        "rules/agents/d.yaml:3:7: yaml_error: (root): not a valid int: 'x'",
    ]


def test_error_bad_variable_reference_and_routes_on_non_http(rules: Path) -> None:
    upstreams = """\
        upstreams:
          llm:
            kind: openai
            url: https://llm.test
            routes: [{method: GET, path: /x, verb: read}]
            credential: {header: X-Key, value: "${not a name}"}
          tools:
            kind: mcp
            url: http://tools.test
            tools:
              - {name: a, verb: read}
              - {name: a, verb: write}
        """
    write(rules, {"upstreams.yaml": upstreams})
    assert errors_of() == [
        "rules/upstreams.yaml:5:5: bad_value: upstreams.llm.routes: routes are only for kind http, not openai",
        "rules/upstreams.yaml:6:40: bad_value: upstreams.llm.credential.value: "
        "bad variable reference '${not a name}'; use ${NAME} or ${NAME:-default}",
        "rules/upstreams.yaml:12:16: bad_value: upstreams.tools.tools[1].name: tool 'a' is already listed at line 11",
    ]


def test_default_ignores_placeholder_get_of_env_mapping(rules: Path) -> None:
    class Placeholders(dict[str, str]):  # like `rules test`, which stands in for unset secrets
        def get(self, key: str, default: object = None) -> str:
            return super().get(key) or f"<unset:{key}>"

    write(rules, {"upstreams.yaml": UPSTREAMS})
    ruleset = load_rules("rules", Placeholders())
    assert ruleset.upstreams["erp"].url == "http://erp.internal:9000"
    credential = ruleset.upstreams["openai"].credential
    assert credential is not None and credential.value == "Bearer <unset:OPENAI_API_KEY>"


def test_error_unprintable_or_undecodable_bytes(rules: Path) -> None:
    write(rules, {"upstreams.yaml": UPSTREAMS})
    (rules / "agents" / "d.yaml").write_bytes(b"agent: d\nowner: a\x07b\n")
    (rules / "agents" / "e.yaml").write_bytes(b"agent: e\nowner: \xff\n")
    assert errors_of() == [
        "rules/agents/d.yaml:2:9: yaml_error: (root): unacceptable character #x0007",
        "rules/agents/e.yaml:2:8: yaml_error: (root): not valid UTF-8",
    ]


def test_unset_variable_reported_once_not_also_as_empty_value(tmp_path):
    (tmp_path / "upstreams.yaml").write_text('upstreams:\n  x:\n    kind: http\n    url: "${NOPE}"\n')
    with pytest.raises(RuleSetInvalid) as info:
        load_rules(tmp_path, {})
    assert [str(e) for e in info.value.errors] == [
        f"{tmp_path}/upstreams.yaml:4:10: unset_variable: upstreams.x.url: ${{NOPE}} is not set"]


# -- tls: an https upstream's own CA bundle and client certificate ---------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA bundle, a client certificate and key, a key that matches nothing, and a file that is not PEM."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    client = ca.issue_cert("client.test")
    files = {"ca": folder / "ca.pem", "cert": folder / "client.pem", "key": folder / "client.key",
             "other_key": folder / "other.key", "garbage": folder / "garbage.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    trustme.CA().issue_cert("other.test").private_key_pem.write_to_path(str(files["other_key"]))
    files["garbage"].write_text("not a certificate SECRET-CONTENT\n")
    return {name: str(path) for name, path in files.items()}


def tls_upstreams(tls: str, url: str = "https://erp.internal") -> str:
    return f"upstreams:\n  erp:\n    kind: http\n    url: {url}\n    tls: {tls}\n"


def test_tls_parses_into_upstream_tls_spec(rules: Path, pki: dict[str, str]) -> None:
    write(rules, {"upstreams.yaml": tls_upstreams(
        "{ca_file: '${ERP_CA}', cert_file: " + pki["cert"] + ", key_file: " + pki["key"] + "}")})
    ruleset = load_rules("rules", {"ERP_CA": pki["ca"]})
    assert ruleset.upstreams["erp"].tls == UpstreamTlsSpec(ca_file=pki["ca"], cert_file=pki["cert"],
                                                          key_file=pki["key"])


def test_tls_is_optional_and_each_file_too(rules: Path, pki: dict[str, str]) -> None:
    write(rules, {"upstreams.yaml": tls_upstreams("{ca_file: " + pki["ca"] + "}") +
                  "  llm: {kind: openai, url: 'https://llm'}\n"})
    ruleset = load_rules("rules", {})
    assert ruleset.upstreams["erp"].tls == UpstreamTlsSpec(ca_file=pki["ca"])
    assert ruleset.upstreams["llm"].tls is None


def test_error_tls_on_plain_http_url(rules: Path, pki: dict[str, str]) -> None:
    write(rules, {"upstreams.yaml": tls_upstreams("{ca_file: " + pki["ca"] + "}", url="http://erp.internal")})
    assert errors_of() == ["rules/upstreams.yaml:5:10: bad_value: upstreams.erp.tls: is only for an https:// url"]


def test_error_tls_key_file_without_cert_file(rules: Path, pki: dict[str, str]) -> None:
    write(rules, {"upstreams.yaml": tls_upstreams("{key_file: " + pki["key"] + "}")})
    assert errors_of() == ["rules/upstreams.yaml:5:21: bad_value: upstreams.erp.tls.key_file: "
                           "needs cert_file (the client certificate the key belongs to)"]


def test_error_tls_unknown_key_and_bad_type(rules: Path) -> None:
    write(rules, {"upstreams.yaml": tls_upstreams("{ca_fle: x, cert_file: 3}")})
    assert errors_of() == [
        "rules/upstreams.yaml:5:11: unknown_key: upstreams.erp.tls.ca_fle: did you mean 'ca_file'?",
        "rules/upstreams.yaml:5:33: bad_type: upstreams.erp.tls.cert_file: expected a string, got an integer; "
        "quote it to make it a string",
    ]


def test_error_tls_missing_files_named_by_field_not_path(rules: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "secret-name" / "nope.pem")
    write(rules, {"upstreams.yaml": tls_upstreams(
        f"{{ca_file: {missing}, cert_file: {tmp_path}, key_file: {missing}}}")})
    errors = errors_of()
    assert [e.split(": ", 2)[1:] for e in errors] == [
        ["bad_value", "upstreams.erp.tls.ca_file: file not found"],
        ["bad_value", "upstreams.erp.tls.cert_file: is not a file"],
        ["bad_value", "upstreams.erp.tls.key_file: file not found"],
    ]
    assert not any("secret-name" in e or str(tmp_path) in e for e in errors)


@pytest.mark.parametrize(("tls", "error"), [
    ("{ca_file: <garbage>}", "upstreams.erp.tls.ca_file: cannot be loaded: not a PEM CA certificate bundle"),
    ("{ca_file: <key>}", "upstreams.erp.tls.ca_file: cannot be loaded: not a PEM CA certificate bundle"),
    ("{cert_file: <garbage>}",
     "upstreams.erp.tls.cert_file: cannot be loaded: not a PEM certificate and its unencrypted private key"),
    ("{cert_file: <cert>}",  # no key_file, and no key in the certificate file
     "upstreams.erp.tls.cert_file: cannot be loaded: not a PEM certificate and its unencrypted private key"),
    ("{cert_file: <cert>, key_file: <garbage>}", "upstreams.erp.tls.key_file: cannot be loaded with cert_file: "
                                             "not a PEM certificate and its unencrypted private key"),
    ("{cert_file: <cert>, key_file: <other_key>}",
     "upstreams.erp.tls.key_file: cannot be loaded with cert_file: the private key does not match the certificate"),
])
def test_error_tls_files_that_do_not_load(rules: Path, pki: dict[str, str], tls: str, error: str) -> None:
    for name, path in pki.items():
        tls = tls.replace(f"<{name}>", path)
    write(rules, {"upstreams.yaml": tls_upstreams(tls)})
    errors = errors_of()
    assert [e.split(": ", 2)[2] for e in errors] == [error]
    assert "SECRET-CONTENT" not in errors[0] and "pki" not in errors[0]


def test_error_tls_encrypted_key_fails_without_prompting(rules: Path, pki: dict[str, str], tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(Path(pki["key"]).read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    write(rules, {"upstreams.yaml": tls_upstreams(f"{{cert_file: {pki['cert']}, key_file: {encrypted}}}")})
    assert [e.split(": ", 2)[2] for e in errors_of()] == [
        "upstreams.erp.tls.key_file: cannot be loaded with cert_file: "
        "not a PEM certificate and its unencrypted private key"]
