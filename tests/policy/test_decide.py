"""decide + compile + conditions: precedence, cited rules, evidence, failing closed, audit mode, the index."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.incoming import Incoming
from gateway.models import Action, Decision
from gateway.policy.compile import DEFAULT_HOLD_TIMEOUT, Policy, compile_policy
from gateway.policy.conditions import ConditionError, compile_condition, referenced_paths
from gateway.policy.decide import AUDIT_RULE, DEFAULT_RULE, PLUMBING_RULE, decide, decide_each, may_call_tool
from gateway.policy.load import load_rules
from gateway.policy.spec import AgentSpec, Loc, RuleSet, RuleSetInvalid, RuleSpec, UpstreamSpec

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
    tools:
      - {name: lookup_account, verb: read, resource: accounts}
      - {name: send_email, verb: send, resource: email}
      - {name: delete_account, verb: delete, resource: accounts}
  other:
    kind: http
    url: http://other.internal
"""


def write_rules(root: Path, agents: dict[str, str]) -> Path:
    (root / "agents").mkdir(parents=True)
    (root / "upstreams.yaml").write_text(UPSTREAMS)
    for name, text in agents.items():
        (root / "agents" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return root


def build(tmp_path: Path, text: str, name: str = "bot") -> Policy:
    return compile_policy(load_rules(write_rules(tmp_path / "rules", {name: text}), {}))


def request(body: Any = None, *, method: str = "POST", path: str = "/payments", query: str = "",
            headers: dict[str, str] | None = None, raw: bytes | None = None) -> Incoming:
    data = raw if raw is not None else (b"" if body is None else orjson.dumps(body))
    return Incoming(method, path, query, CIMultiDictProxy(CIMultiDict(headers or {})), data)


def act(verb: str, resource: str | None = None, upstream: str = "erp", **fields: Any) -> Action:
    kind = {"erp": "http", "other": "http", "llm": "openai", "crm": "mcp"}[upstream]
    return Action(upstream=upstream, kind=kind, verb=verb, resource=resource, **fields)


def run(policy: Policy, action: Action, body: Any = None, agent: str = "bot", **kw: Any) -> Decision:
    return decide(policy, policy.agents[agent], action, request(body, **kw))


PAYMENTS = """\
agent: bot
mode: assist
allow:
  - {upstream: erp, verbs: [read]}
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount <= 10000"}
hold:
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount > 10000",
     reason: "Big payment", timeout: 10m}
deny:
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.vendor == 'blocked'",
     reason: "Blocked vendor"}
  - {upstream: erp, verbs: [delete]}
"""


# -- precedence and cited rules ----------------------------------------------------------------------------------


def test_decide_deny_wins_over_hold_and_allow(tmp_path: Path) -> None:
    policy = build(tmp_path, PAYMENTS)
    decision = run(policy, act("create", "payments"), {"amount": 20000, "vendor": "blocked"})
    assert decision == Decision("deny", "bot.yaml#deny[0]", policy.version, "assist", "Blocked vendor",
                                {"request.json.vendor": "blocked"})


def test_decide_hold_wins_over_allow(tmp_path: Path) -> None:
    text = PAYMENTS.replace('"request.json.amount <= 10000"', '"request.json.amount > 0"')
    policy = build(tmp_path, text)
    decision = run(policy, act("create", "payments"), {"amount": 20000, "vendor": "acme"})
    assert decision == Decision("hold", "bot.yaml#hold[0]", policy.version, "assist", "Big payment",
                                {"request.json.amount": 20000}, timeout=600.0)


def test_decide_allow_when_only_an_allow_rule_matches(tmp_path: Path) -> None:
    policy = build(tmp_path, PAYMENTS)
    decision = run(policy, act("create", "payments"), {"amount": 500, "vendor": "acme"})
    assert decision == Decision("allow", "bot.yaml#allow[1]", policy.version, "assist",
                                "allowed by rule bot.yaml#allow[1]", {"request.json.amount": 500})


def test_decide_unconditional_deny_cites_rule_with_default_reason(tmp_path: Path) -> None:
    policy = build(tmp_path, PAYMENTS)
    decision = run(policy, act("delete", "vendors"))
    assert (decision.outcome, decision.rule, decision.reason) == ("deny", "bot.yaml#deny[1]",
                                                                   "denied by rule bot.yaml#deny[1]")
    assert decision.evidence == {}


@pytest.mark.parametrize(
    "action",
    [act("update", "payments"), act("create", "invoices"), act("read", "x", upstream="other"),
     act("chat", "gpt-4o", upstream="llm")],
)
def test_decide_default_deny_when_no_rule_applies(tmp_path: Path, action: Action) -> None:
    policy = build(tmp_path, PAYMENTS)
    decision = run(policy, action, {"amount": 1})
    assert (decision.outcome, decision.rule, decision.evidence) == ("deny", DEFAULT_RULE, {})
    assert decision.policy_version == policy.version
    assert "no rule allows" in decision.reason and repr(action.verb) in decision.reason


def test_decide_explicit_rule_id_is_cited(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {id: erp-reads, upstream: erp, verbs: [read], reason: "Reads are fine"}
        """)
    decision = run(policy, act("read", "vendors"))
    assert (decision.outcome, decision.rule, decision.reason) == ("allow", "erp-reads", "Reads are fine")


def test_decide_first_matching_rule_of_an_effect_is_cited(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        deny:
          - {upstream: erp, verbs: [read], when: "request.query.x == '1'"}
          - {upstream: erp, verbs: [read]}
          - {upstream: erp, verbs: [read], resources: [vendors]}
        """)
    assert run(policy, act("read", "vendors"), query="x=1").rule == "bot.yaml#deny[0]"
    assert run(policy, act("read", "vendors"), query="x=2").rule == "bot.yaml#deny[1]"


def test_decide_hold_without_timeout_uses_policy_default(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        hold:
          - {upstream: erp, verbs: [create]}
        """)
    decision = run(policy, act("create", "payments"))
    assert (decision.outcome, decision.timeout) == ("hold", DEFAULT_HOLD_TIMEOUT)
    assert decision.reason == "held for approval by rule bot.yaml#hold[0]"


def test_decide_mode_is_the_agents(tmp_path: Path) -> None:
    policy = build(tmp_path, PAYMENTS.replace("mode: assist", "mode: automate"))
    assert run(policy, act("read", "vendors")).mode == "automate"


# -- evidence ----------------------------------------------------------------------------------------------------


def test_decide_evidence_is_only_what_the_deciding_condition_read(tmp_path: Path) -> None:
    policy = build(tmp_path, PAYMENTS)
    # The deny rule read `request.json.vendor` and did not match; only the allow rule's read is evidence.
    decision = run(policy, act("create", "payments"), {"amount": 10000, "vendor": "acme", "memo": "hi"})
    assert decision.evidence == {"request.json.amount": 10000}


def test_decide_evidence_holds_every_path_of_the_condition(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - upstream: erp
            verbs: [create]
            when: >-
              request.json.amount < 100 && action.resource == "payments" && agent.id == "bot"
              && request.headers["x-team"] == "ap" && request.query.dry == "1" && request.method == "POST"
        """)
    decision = run(policy, act("create", "payments"), {"amount": 5, "secret": "not read"},
                   headers={"X-Team": "ap", "Authorization": "Bearer agent"}, query="dry=1&other=2")
    assert decision.outcome == "allow"
    assert decision.evidence == {"request.json.amount": 5, "action.resource": "payments", "agent.id": "bot",
                                 "request.headers": {"x-team": "ap"}, "request.query.dry": "1",
                                 "request.method": "POST"}


def test_decide_evidence_of_a_missing_value_is_none(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        hold:
          - {upstream: erp, verbs: [create], when: "!has(request.json.approved_by)"}
        """)
    decision = run(policy, act("create", "payments"), {"amount": 5})
    assert (decision.outcome, decision.evidence) == ("hold", {"request.json.approved_by": None})


def test_decide_conditions_never_see_credentials(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        deny:
          - upstream: erp
            verbs: [read]
            when: '"authorization" in request.headers || "x-api-key" in request.headers || "cookie" in request.headers'
        allow:
          - {upstream: erp, verbs: [read]}
        """)
    decision = run(policy, act("read", "vendors"), method="GET",
                   headers={"Authorization": "Bearer t", "X-Api-Key": "k", "Cookie": "c=1"})
    assert decision.outcome == "allow"


# -- failing closed ----------------------------------------------------------------------------------------------


FAIL_CLOSED = """\
agent: bot
{effect}:
  - {{upstream: erp, verbs: [create], when: "{when}"}}
"""


@pytest.mark.parametrize(
    ("when", "body", "error"),
    [
        ("request.json.amount > 100", {}, "KeyError"),
        ("request.json.amount > 100", {"amount": "lots"}, "TypeError"),
        ("request.json.amount", {"amount": 500}, "TypeError"),
        ("request.json.name", {"name": "x"}, "TypeError"),
    ],
)
@pytest.mark.parametrize("effect", ["deny", "hold"])
def test_decide_condition_error_makes_deny_and_hold_rules_match(tmp_path: Path, effect: str, when: str,
                                                               body: Any, error: str) -> None:
    policy = build(tmp_path, FAIL_CLOSED.format(effect=effect, when=when))
    decision = run(policy, act("create", "payments"), body)
    assert (decision.outcome, decision.rule) == (effect, f"bot.yaml#{effect}[0]")
    assert f"condition error ({error}" in decision.reason


@pytest.mark.parametrize(
    ("when", "body"),
    [
        ("request.json.amount < 100", {}),
        ("request.json.amount < 100", {"amount": "1"}),
        ("request.json.amount", {"amount": 5}),
        ("request.json.flag", {"flag": 1}),
        ("request.json.amount < 100", None),
    ],
)
def test_decide_condition_error_makes_allow_rule_not_match(tmp_path: Path, when: str, body: Any) -> None:
    policy = build(tmp_path, FAIL_CLOSED.format(effect="allow", when=when))
    decision = run(policy, act("create", "payments"), body)
    assert (decision.outcome, decision.rule) == ("deny", DEFAULT_RULE)


def test_condition_non_bool_result_is_an_error() -> None:
    result, evidence = compile_condition("request.json.amount").evaluate(
        lambda path: {"amount": 3} if path == ("request", "json") else 3)
    assert isinstance(result, TypeError)
    assert "not a bool" in str(result)
    assert evidence == {"request.json.amount": 3}


@pytest.mark.parametrize("raw", [b"5", b'"x"', b"[1, 2]", b"true"])
def test_decide_field_of_non_object_body_fails_closed(tmp_path: Path, raw: bytes) -> None:
    # `request.json.amount` on a body that is a bare number is an error, not the number itself.
    policy = build(tmp_path, PAYMENTS)
    decision = decide(policy, policy.agents["bot"], act("create", "payments"), request(raw=raw))
    assert (decision.outcome, decision.rule) == ("deny", "bot.yaml#deny[0]")
    assert "condition error (KeyError" in decision.reason
    assert decision.evidence == {"request.json.vendor": None}


def test_decide_field_of_non_object_member_fails_closed(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: erp, verbs: [create], when: "request.json.payment.amount <= 10000"}
        """)
    assert run(policy, act("create", "payments"), {"payment": 5}).outcome == "deny"
    assert run(policy, act("create", "payments"), {"payment": {"amount": 5}}).outcome == "allow"


def test_decide_malformed_json_body_under_a_condition_is_bad_request(tmp_path: Path) -> None:
    from gateway.errors import GatewayError

    policy = build(tmp_path, PAYMENTS)
    with pytest.raises(GatewayError) as caught:
        decide(policy, policy.agents["bot"], act("create", "payments"), request(raw=b"{nope"))
    assert caught.value.type == "bad_request"


# -- audit mode --------------------------------------------------------------------------------------------------


AUDIT = """\
agent: bot
mode: audit
allow:
  - {upstream: erp, verbs: ["*"]}
hold:
  - {upstream: erp, verbs: [update], reason: "Updates need a look", timeout: 1m}
deny:
  - {upstream: erp, verbs: [delete]}
"""


@pytest.mark.parametrize("verb", ["create", "export", "send", "purge"])
def test_decide_audit_mode_holds_non_read_verbs(tmp_path: Path, verb: str) -> None:
    policy = build(tmp_path, AUDIT)
    decision = run(policy, act(verb, "payments"))
    assert (decision.outcome, decision.rule, decision.mode, decision.timeout) == (
        "hold", AUDIT_RULE, "audit", DEFAULT_HOLD_TIMEOUT)
    assert AUDIT_RULE == "mode:audit"
    assert "bot.yaml#allow[0]" in decision.reason


def test_decide_audit_mode_lets_reads_through(tmp_path: Path) -> None:
    policy = build(tmp_path, AUDIT)
    decision = run(policy, act("read", "vendors"))
    assert (decision.outcome, decision.rule, decision.mode) == ("allow", "bot.yaml#allow[0]", "audit")


def test_decide_audit_mode_still_lets_deny_win(tmp_path: Path) -> None:
    policy = build(tmp_path, AUDIT)
    decision = run(policy, act("delete", "vendors"))
    assert (decision.outcome, decision.rule) == ("deny", "bot.yaml#deny[0]")


def test_decide_audit_mode_keeps_hold_rules_own_rule(tmp_path: Path) -> None:
    policy = build(tmp_path, AUDIT)
    decision = run(policy, act("update", "vendors"))
    assert (decision.outcome, decision.rule, decision.timeout) == ("hold", "bot.yaml#hold[0]", 60.0)


def test_decide_audit_mode_does_not_grant_what_no_rule_allows(tmp_path: Path) -> None:
    policy = build(tmp_path, AUDIT)
    assert run(policy, act("read", "x", upstream="other")).outcome == "deny"


def test_decide_audit_mode_hold_carries_the_allow_rules_evidence(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        mode: audit
        allow:
          - {upstream: erp, verbs: [create], when: "request.json.amount < 10"}
        """)
    decision = run(policy, act("create", "payments"), {"amount": 3})
    assert (decision.outcome, decision.rule, decision.evidence) == ("hold", AUDIT_RULE, {"request.json.amount": 3})


# -- MCP plumbing ------------------------------------------------------------------------------------------------


def plumbing(verb: str = "tools/list", upstream: str = "crm") -> Action:
    return Action(upstream=upstream, kind="mcp", verb=verb, plumbing=True)


@pytest.mark.parametrize("effect", ["allow", "hold"])
def test_decide_plumbing_allowed_with_a_grant_on_the_upstream(tmp_path: Path, effect: str) -> None:
    policy = build(tmp_path, f"""\
        agent: bot
        {effect}:
          - {{upstream: crm, verbs: [read], resources: [accounts], when: "false"}}
        """)
    for verb in ("initialize", "tools/list", "notifications/initialized", "ping", "respond", "http/get"):
        decision = run(policy, plumbing(verb))
        assert (decision.outcome, decision.rule) == ("allow", PLUMBING_RULE)


def test_decide_plumbing_denied_without_a_grant_on_the_upstream(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: erp, verbs: [read]}
        deny:
          - {upstream: crm, verbs: ["*"]}
        """)
    decision = run(policy, plumbing("initialize"))
    assert (decision.outcome, decision.rule) == ("deny", DEFAULT_RULE)
    assert "no grant on upstream 'crm'" in decision.reason


def test_decide_plumbing_is_not_granted_by_other_upstreams(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: erp, verbs: ["*"]}
        """)
    assert run(policy, plumbing("tools/list")).outcome == "deny"
    assert run(policy, plumbing("tools/list", upstream="erp")).outcome == "allow"


# -- verbs and resources -----------------------------------------------------------------------------------------


def test_decide_star_verb_matches_any_verb(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: erp, verbs: ["*"]}
        """)
    for verb in ("read", "create", "delete", "propfind", "export"):
        assert run(policy, act(verb, "x")).rule == "bot.yaml#allow[0]"
    assert run(policy, act("read", "x", upstream="other")).outcome == "deny"


def test_decide_star_verb_deny_covers_verbs_named_elsewhere(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: erp, verbs: [read, create]}
        deny:
          - {upstream: erp, verbs: ["*"], resources: [secrets]}
        """)
    assert run(policy, act("read", "secrets")).rule == "bot.yaml#deny[0]"
    assert run(policy, act("create", "secrets")).rule == "bot.yaml#deny[0]"
    assert run(policy, act("read", "vendors")).rule == "bot.yaml#allow[0]"
    assert run(policy, act("export", "vendors")).rule == DEFAULT_RULE


def test_decide_bucket_for_unnamed_verb_holds_only_star_rules(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: erp, verbs: [read]}
          - {upstream: erp, verbs: ["*"], resources: [public]}
        """)
    bucket = policy.agents["bot"].bucket("erp", "export")
    assert [r.spec.id for r in bucket.allow] == ["bot.yaml#allow[1]"]
    assert [r.spec.id for r in policy.agents["bot"].bucket("erp", "read").allow] == [
        "bot.yaml#allow[0]", "bot.yaml#allow[1]"]
    empty = policy.agents["bot"].bucket("other", "read")
    assert (empty.allow, empty.hold, empty.deny) == ((), (), ())


@pytest.mark.parametrize(
    ("resource", "outcome"),
    [
        ("claude-haiku-4-5", "allow"),
        ("claude-haiku-", "allow"),
        ("claude-sonnet-4", "allow"),
        ("gpt-4o-mini", "allow"),
        ("claude-haiku", "deny"),
        ("Claude-Haiku-4-5", "deny"),
        ("claude-opus-4", "deny"),
        ("gpt-4o-mini-2024", "deny"),
        ("xgpt-4o-mini", "deny"),
        ("o1", "allow"),
        ("o3", "allow"),
        ("o2", "deny"),
        (None, "deny"),
    ],
)
def test_decide_resource_globs_and_exact_names(tmp_path: Path, resource: str | None, outcome: str) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: llm, verbs: [chat], resources: ["claude-haiku-*", "claude-sonnet-?", gpt-4o-mini, "o[13]"]}
        """)
    assert run(policy, act("chat", resource, upstream="llm")).outcome == outcome


def test_decide_rule_without_resources_covers_any_resource(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: erp, verbs: [read]}
        """)
    assert run(policy, act("read", None)).outcome == "allow"
    assert run(policy, act("read", "anything/at all")).outcome == "allow"


def test_decide_each_strictest_decision_stands_for_the_batch(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: crm, verbs: [read]}
        hold:
          - {upstream: crm, verbs: [send]}
        """)
    actions = (act("read", "accounts", upstream="crm"), act("send", "email", upstream="crm"),
               act("read", "accounts", upstream="crm"))
    (decision, action), each = decide_each(policy, policy.agents["bot"], actions, request({}))
    assert (decision.outcome, action) == ("hold", actions[1])
    assert [d.outcome for d, _ in each] == ["allow", "hold", "allow"]
    actions = (*actions, act("delete", "accounts", upstream="crm"))
    (decision, action), _ = decide_each(policy, policy.agents["bot"], actions, request({}))
    assert (decision.outcome, action) == ("deny", actions[3])


def test_decide_mcp_condition_reads_tool_arguments(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: crm, verbs: [send]}
        hold:
          - {upstream: crm, verbs: [send], when: '!action.attributes.arguments.to.endsWith("@example.com")'}
        """)
    inside = act("send", "email", upstream="crm", tool="send_email",
                 attributes={"arguments": {"to": "a@example.com"}})
    outside = act("send", "email", upstream="crm", tool="send_email",
                  attributes={"arguments": {"to": "a@evil.com"}})
    missing = act("send", "email", upstream="crm", tool="send_email", attributes={"arguments": {}})
    assert run(policy, inside).outcome == "allow"
    held = run(policy, outside)
    assert (held.outcome, held.evidence) == ("hold", {"action.attributes.arguments.to": "a@evil.com"})
    assert run(policy, missing).outcome == "hold"


# -- may_call_tool -----------------------------------------------------------------------------------------------


def test_may_call_tool_follows_allow_hold_and_unconditional_deny(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        allow:
          - {upstream: crm, verbs: [read], resources: [accounts], when: "false"}
          - {upstream: crm, verbs: [call]}
        hold:
          - {upstream: crm, verbs: [send], resources: [email]}
        deny:
          - {upstream: crm, verbs: [call], resources: [export_everything]}
          - {upstream: crm, verbs: [send], when: "request.json.x == 1"}
        """)
    agent = policy.agents["bot"]
    assert may_call_tool(agent, "crm", "read", "accounts") is True
    assert may_call_tool(agent, "crm", "send", "email") is True
    assert may_call_tool(agent, "crm", "call", "some_tool") is True
    assert may_call_tool(agent, "crm", "call", "export_everything") is False
    assert may_call_tool(agent, "crm", "delete", "accounts") is False
    assert may_call_tool(agent, "crm", "read", "contacts") is False
    assert may_call_tool(agent, "erp", "read", "accounts") is False


# -- compile errors ----------------------------------------------------------------------------------------------


def compile_errors(tmp_path: Path, text: str) -> list[tuple[int, int, str, str, str]]:
    with pytest.raises(RuleSetInvalid) as caught:
        build(tmp_path, text)
    return [(e.line, e.col, e.code, e.path, e.message) for e in caught.value.errors]


def test_compile_syntax_error_cites_the_when_value(tmp_path: Path) -> None:
    errors = compile_errors(tmp_path, """\
        agent: bot
        allow:
          - upstream: erp
            verbs: [read]
            when: "request.json.amount >"
        """)
    assert len(errors) == 1
    line, col, code, path, message = errors[0]
    assert (line, col, code, path) == (5, 11, "rule_error", "allow[0].when")
    assert "request.json.amount >" in message
    assert "\n" not in message


def test_compile_error_of_rule_with_explicit_id_cites_its_index(tmp_path: Path) -> None:
    errors = compile_errors(tmp_path, """\
        agent: bot
        hold:
          - {upstream: erp, verbs: [read]}
          - id: my-hold
            upstream: erp
            verbs: [create]
            when: "request.json.x >"
        """)
    assert [(e[0], e[1], e[3]) for e in errors] == [(7, 11, "hold[1].when")]


def test_compile_collects_every_error_sorted(tmp_path: Path) -> None:
    errors = compile_errors(tmp_path, """\
        agent: bot
        allow:
          - {upstream: erp, verbs: [read], when: "((("}
        deny:
          - {upstream: erp, verbs: [read], when: "request.json.a ==="}
          - {upstream: erp, verbs: [read], when: "action.verb == 'x'"}
          - {upstream: erp, verbs: [read], when: "nope == 1"}
        """)
    assert [(e[0], e[1], e[2], e[3]) for e in errors] == [
        (3, 42, "rule_error", "allow[0].when"),
        (5, 42, "rule_error", "deny[0].when"),
        (7, 42, "rule_error", "deny[2].when"),
    ]


def test_compile_error_prints_as_file_line_col_code_path_message(tmp_path: Path) -> None:
    with pytest.raises(RuleSetInvalid) as caught:
        build(tmp_path, """\
            agent: bot
            allow:
              - {upstream: erp, verbs: [read], when: "nope == 1"}
            """)
    file = str(tmp_path / "rules" / "agents" / "bot.yaml")
    assert str(caught.value) == (f"{file}:3:42: rule_error: allow[0].when: unknown variable 'nope': "
                                 "conditions see only agent, action and request")


@pytest.mark.parametrize("source", ["nope == 1", "req.json.a == 1", "requests.json.a == 1", "env.HOME == 'x'",
                                    "action.verb == verb"])
def test_compile_condition_rejects_unknown_variables(source: str) -> None:
    with pytest.raises(ConditionError, match="unknown variable"):
        compile_condition(source)


@pytest.mark.parametrize("source", ["request.json.items.exists(i, i.price > 10)",
                                    "request.json.items.all(item, item.ok)",
                                    "request.json.tags.filter(t, t == 'x').size() == 0",
                                    "action.attributes.arguments.to.map(x, x).size() < 3"])
def test_compile_condition_accepts_comprehension_variables(source: str) -> None:
    assert compile_condition(source).source == source


@pytest.mark.parametrize("source", ["", "1 +", "request.json.a ===", "'unterminated"])
def test_compile_condition_rejects_bad_syntax(source: str) -> None:
    with pytest.raises(ConditionError):
        compile_condition(source)


def test_comprehension_condition_evaluates(tmp_path: Path) -> None:
    policy = build(tmp_path, """\
        agent: bot
        deny:
          - {upstream: erp, verbs: [create], when: "request.json.lines.exists(l, l.amount > 100)"}
        allow:
          - {upstream: erp, verbs: [create]}
        """)
    assert run(policy, act("create", "payments"), {"lines": [{"amount": 5}, {"amount": 101}]}).outcome == "deny"
    decision = run(policy, act("create", "payments"), {"lines": [{"amount": 5}]})
    assert decision.outcome == "allow"


# -- referenced paths --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "paths"),
    [
        ("request.json.amount <= 10000", [("request", "json", "amount")]),
        ("request . json . amount > 1", [("request", "json", "amount")]),
        ('request.json.name.startsWith("x")', [("request", "json", "name")]),
        ('!action.attributes.arguments.to.endsWith("@example.com")',
         [("action", "attributes", "arguments", "to")]),
        ("request.json.items.exists(i, i.price > 10)", [("request", "json", "items")]),
        ("request.json.items.all(item, item.ok)", [("request", "json", "items")]),
        ("has(request.json.amount) && request.json.amount > 5", [("request", "json", "amount")]),
        ("request.json.a.b == 1 && request.json.a == {}", [("request", "json", "a")]),
        ("size(request.json) > 0 && request.json.x.y == 1", [("request", "json")]),
        ('request.headers["x-team"] == "ap"', [("request", "headers")]),
        ("request == {} || request.json.x == 1", [("request",)]),
        ("agent.id == 'a' && action.verb == 'read' && request.method == 'GET'",
         [("action", "verb"), ("agent", "id"), ("request", "method")]),
        ("request.json.agent == action.verb", [("action", "verb"), ("request", "json", "agent")]),
        ("true", []),
    ],
)
def test_referenced_paths(source: str, paths: list[tuple[str, ...]]) -> None:
    assert list(referenced_paths(source)) == paths


# -- the index ---------------------------------------------------------------------------------------------------


LOC = Loc("generated", 1, 1)


def generated_ruleset(count: int) -> RuleSet:
    upstream = UpstreamSpec(name="erp", kind="http", url="http://erp.internal", credential=None, prices={},
                            routes=(), tools=(), connect_timeout=5.0, read_timeout=5.0, loc=LOC)
    agents: dict[str, AgentSpec] = {}
    for n in range(count):
        agent_id = f"agent-{n:05d}"
        rules = (
            RuleSpec(f"{agent_id}#allow[0]", "allow", "erp", ("read",), None, None, None, None, LOC),
            RuleSpec(f"{agent_id}#allow[1]", "allow", "erp", ("create",), (f"account-{n}",),
                     f"request.json.amount < {n + 1}", None, None, LOC),
            RuleSpec(f"{agent_id}#hold[0]", "hold", "erp", ("create", "update"), None,
                     f"request.json.amount >= {n + 1}", None, 60.0, LOC),
            RuleSpec(f"{agent_id}#deny[0]", "deny", "erp", ("*",), ("secrets",), None, None, None, LOC),
        )
        agents[agent_id] = AgentSpec(agent_id, None, None, "assist", rules, (), (), "generated")
    return RuleSet(upstreams={"erp": upstream}, agents=agents, version="sha256:generated", directory="generated")


def test_index_with_ten_thousand_agents_returns_only_that_agents_rules() -> None:
    policy = compile_policy(generated_ruleset(10_000))
    assert len(policy.agents) == 10_000
    for n in (0, 1, 4999, 9998, 9999):
        agent = policy.agents[f"agent-{n:05d}"]
        prefix = f"agent-{n:05d}#"
        read = agent.bucket("erp", "read")
        assert [r.spec.id for r in read.allow] == [prefix + "allow[0]"]
        assert [r.spec.id for r in read.deny] == [prefix + "deny[0]"]
        assert read.hold == ()
        create = agent.bucket("erp", "create")
        assert [r.spec.id for r in create.allow] == [prefix + "allow[1]"]
        assert [r.spec.id for r in create.hold] == [prefix + "hold[0]"]
        assert [r.spec.id for r in create.deny] == [prefix + "deny[0]"]
        other = agent.bucket("erp", "export")
        assert ([r.spec.id for r in other.deny], other.allow, other.hold) == ([prefix + "deny[0]"], (), ())
        assert agent.bucket("crm", "read") == agent.bucket("nowhere", "create")
        assert agent.bucket("crm", "read").allow == ()


def test_index_with_ten_thousand_agents_decides_per_agent() -> None:
    policy = compile_policy(generated_ruleset(10_000))
    body = {"amount": 7000}
    for n, outcome, rule in ((6999, "hold", "agent-06999#hold[0]"), (7000, "allow", "agent-07000#allow[1]"),
                             (9999, "allow", "agent-09999#allow[1]")):
        agent = policy.agents[f"agent-{n:05d}"]
        decision = decide(policy, agent, act("create", f"account-{n}"), request(body))
        assert (decision.outcome, decision.rule) == (outcome, rule)
    # Another agent's resource name does not open this agent's allow rule.
    decision = decide(policy, policy.agents["agent-09999"], act("create", "account-7000"), request(body))
    assert (decision.outcome, decision.rule) == ("deny", DEFAULT_RULE)
