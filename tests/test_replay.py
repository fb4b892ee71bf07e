"""replay: recorded calls re-decided under changed rules; every reported flip is checked against decisions made
independently (each original request evaluated under the new rules), including what replay must refuse to guess."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import ADMIN_TOKEN, start_stack
from recorded import (
    INVOICE_BOT,
    SUPPORT_BOT,
    TRAFFIC,
    UPSTREAMS,
    policy_of,
    record_traffic,
    write_rules,
    write_traces,
)

from gateway.approvals.record import Approval
from gateway.cli import main
from gateway.policy.cases import evaluate
from gateway.policy.compile import Policy
from gateway.replay import tally
from gateway.replay.tally import FLIPS, RULE_CHANGED

# The candidate rules: a lower payment threshold, a new deny rule, deletes held instead of denied (invoice-bot);
# the CRM read grant removed, send_email's verb changed to `notify` and the external-email hold dropped
# (support-bot and upstreams.yaml).
INVOICE_NEW = """\
agent: invoice-bot
mode: assist
allow:
  - {upstream: openai, verbs: [chat], when: 'request.json.model in ["gpt-4o-mini"]'}
  - {upstream: erp, verbs: [read]}
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount <= 5000"}
hold:
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount > 5000", timeout: 5m}
  - {upstream: erp, verbs: [delete], timeout: 5m}
deny:
  - {id: no-long-chats, upstream: openai, verbs: [chat],
     when: "has(request.json.max_tokens) && request.json.max_tokens > 2000"}
"""
SUPPORT_NEW = """\
agent: support-bot
mode: automate
allow:
  - {upstream: anthropic, verbs: [chat], resources: ["claude-haiku-*", "claude-sonnet-*"]}
  - {upstream: crm-tools, verbs: [notify], resources: [email]}
"""
UPSTREAMS_NEW = UPSTREAMS.replace("{name: send_email, verb: send, resource: email}",
                                  "{name: send_email, verb: notify, resource: email}")
# Reads a body field no rule read when the traffic was recorded: the capture does not have it.
VENDOR_RULE = "  - {upstream: erp, verbs: [create], resources: [payments], when: 'request.json.vendor == \"v-3\"'}\n"


def kind_of(old: tuple[str | None, str | None], new: tuple[str | None, str | None]) -> str:
    if old == new:
        return "unchanged"
    return RULE_CHANGED if old[0] == new[0] else f"{old[0]}->{new[0]}"


def expected(old: Policy, new: Policy, traffic: Iterable[tuple[str, Mapping[str, Any]]]
             ) -> tuple[dict[str, Counter[str]], dict[str, Counter[tuple[Any, ...]]]]:
    """Per agent: each request's change, from the original request decided directly under both rule sets."""
    kinds: dict[str, Counter[str]] = {}
    moves: dict[str, Counter[tuple[Any, ...]]] = {}
    for agent, request in traffic:
        before, after = evaluate(old, agent, request), evaluate(new, agent, request)
        kind = kind_of((before.decision, before.rule), (after.decision, after.rule))
        kinds.setdefault(agent, Counter())[kind] += 1
        if kind != "unchanged":
            moves.setdefault(agent, Counter())[(before.decision, before.rule, after.decision, after.rule)] += 1
    return kinds, moves


def reported(report: Mapping[str, Any]) -> tuple[dict[str, Counter[str]], dict[str, Counter[tuple[Any, ...]]]]:
    kinds: dict[str, Counter[str]] = {}
    moves: dict[str, Counter[tuple[Any, ...]]] = {}
    for entry in report["agents"]:
        counts = Counter({k: v["count"] for k, v in entry["flips"].items() if v["count"]})
        if entry["unchanged"]:
            counts["unchanged"] = entry["unchanged"]
        kinds[entry["agent"]] = counts
        if entry["transitions"]:
            moves[entry["agent"]] = Counter({(t["old"]["decision"], t["old"]["rule"], t["new"]["decision"],
                                              t["new"]["rule"]): t["count"] for t in entry["transitions"]})
    return kinds, moves


def agent_entry(report: Mapping[str, Any], agent: str) -> dict[str, Any]:
    [entry] = [a for a in report["agents"] if a["agent"] == agent]
    return dict(entry)


def scenario(tmp_path: Path, **new_changes: str | None) -> tuple[Policy, Policy, Path, Path]:
    """The old rules, traffic recorded under them, and the candidate rules."""
    old = policy_of(write_rules(tmp_path / "old"))
    new_dir = write_rules(tmp_path / "new", **new_changes)
    traces = write_traces(tmp_path / "trace.jsonl", record_traffic(old))
    return old, policy_of(new_dir), new_dir, traces


def test_replay_reports_the_flips_each_rule_change_causes(tmp_path: Path) -> None:
    old, new, new_dir, traces = scenario(tmp_path, invoice_bot=INVOICE_NEW, support_bot=SUPPORT_NEW,
                                         upstreams=UPSTREAMS_NEW)
    report = tally(new, [traces], str(new_dir), examples=5)
    assert reported(report) == expected(old, new, TRAFFIC)
    invoice, support = agent_entry(report, "invoice-bot"), agent_entry(report, "support-bot")
    # The changes do what they say (so the comparison above is not vacuous).
    assert invoice["flips"]["allow->hold"]["count"] == 2  # 7,000 and 9,000 now need a manager
    assert invoice["flips"]["allow->deny"]["count"] == 1  # the 4,000-token chat
    assert invoice["flips"]["deny->hold"]["count"] == 1  # deletes are held now
    assert support["flips"]["hold->allow"]["count"] == 1  # external email: hold dropped, `notify` allowed
    assert support["flips"]["allow->deny"]["count"] == 2  # lookups (alone and in a batch) lost their grant
    assert support["flips"][RULE_CHANGED]["count"] == 1  # internal email, allowed by the `notify` rule
    assert report["totals"]["not_replayable"] == 0
    assert report["totals"]["calls"] == report["totals"]["replayed"] == len(TRAFFIC)


def test_replay_gives_example_trace_ids_per_flip(tmp_path: Path) -> None:
    old, new, new_dir, traces = scenario(tmp_path, invoice_bot=INVOICE_NEW)
    report = tally(new, [traces], str(new_dir), examples=1)
    records = {r["trace_id"]: r for r in record_traffic(old)}
    flip = agent_entry(report, "invoice-bot")["flips"]["allow->hold"]
    assert flip["count"] == 2 and len(flip["examples"]) == 1
    assert records[flip["examples"][0]]["capture"]["json"]["amount"] in (7000, 9000)


def test_same_rules_change_nothing(tmp_path: Path) -> None:
    _, new, new_dir, traces = scenario(tmp_path)
    report = tally(new, [traces], str(new_dir))
    assert report["totals"]["unchanged"] == len(TRAFFIC)
    assert report["totals"]["changed"] == report["totals"]["not_replayable"] == 0


def test_a_rule_reading_an_uncaptured_field_is_insufficient_evidence(tmp_path: Path) -> None:
    vendor_rules = INVOICE_BOT + VENDOR_RULE
    old, new, new_dir, traces = scenario(tmp_path, invoice_bot=vendor_rules)
    report = tally(new, [traces], str(new_dir))
    invoice = agent_entry(report, "invoice-bot")
    payments = [(a, r) for a, r in TRAFFIC if r["path"] == "/erp/payments"]
    gap = invoice["not_replayable"]["insufficient_evidence"]
    assert gap["count"] == len(payments)
    assert gap["notes"] == ["invoice-bot.yaml#deny[1] reads request.json.vendor, which the capture did not keep"]
    others = [(a, r) for a, r in TRAFFIC if r["path"] != "/erp/payments"]
    assert reported(report)[0] == {k: v for k, v in expected(old, new, others)[0].items()}


def test_capturing_whole_bodies_makes_the_same_change_replayable(tmp_path: Path) -> None:
    everything = INVOICE_BOT + "capture: {json: all}\n"
    old = policy_of(write_rules(tmp_path / "old", invoice_bot=everything))
    new_dir = write_rules(tmp_path / "new", invoice_bot=INVOICE_BOT + VENDOR_RULE)
    new = policy_of(new_dir)
    traces = write_traces(tmp_path / "trace.jsonl", record_traffic(old))
    report = tally(new, [traces], str(new_dir))
    assert report["totals"]["not_replayable"] == 0
    assert reported(report) == expected(old, new, TRAFFIC)
    assert agent_entry(report, "invoice-bot")["flips"]["allow->deny"]["count"] == 1  # the v-3 payment


def test_estimated_tokens_need_the_prompt(tmp_path: Path) -> None:
    budgeted = SUPPORT_BOT.replace('resources: ["claude-haiku-*", "claude-sonnet-*"]}',
                                   'resources: ["claude-haiku-*"], when: "action.estimated_tokens < 5000"}')
    _, new, new_dir, traces = scenario(tmp_path, support_bot=budgeted)
    report = tally(new, [traces], str(new_dir))
    gap = agent_entry(report, "support-bot")["not_replayable"]["insufficient_evidence"]
    assert gap["count"] == 1  # the haiku chat: its prompt was not captured
    assert "action.estimated_tokens" in gap["notes"][0]


def test_records_replay_cannot_use_are_counted_with_a_reason(tmp_path: Path) -> None:
    old = policy_of(write_rules(tmp_path / "old"))
    no_anthropic = UPSTREAMS.split("  erp:")[0].split("  anthropic:")[0] + "  erp:" + UPSTREAMS.split("  erp:")[1]
    support = SUPPORT_BOT.replace('  - {upstream: anthropic, verbs: [chat], resources: ["claude-haiku-*", '
                                  '"claude-sonnet-*"]}\n', "")
    new_dir = write_rules(tmp_path / "new", upstreams=no_anthropic, support_bot=support)
    records = record_traffic(old)
    extra: list[dict[str, Any]] = [{"trace_id": "alert", "kind": "budget_alert", "agent": "invoice-bot"},
             {"trace_id": "bare", "agent": "invoice-bot", "decision": "allow", "rule": "x"},
             {"trace_id": "refused", "agent": "invoice-bot", "error": "bad_request", "status": 400}]
    traces = write_traces(tmp_path / "trace.jsonl", [*records, *extra])
    with traces.open("ab") as out:
        out.write(b"\n{not json\n[1, 2]\n")
    report = tally(policy_of(new_dir), [traces], str(new_dir))
    support_entry, invoice = agent_entry(report, "support-bot"), agent_entry(report, "invoice-bot")
    assert support_entry["not_replayable"]["upstream_gone"]["count"] == 2  # the two Claude chats
    assert invoice["not_replayable"]["no_capture"]["examples"] == ["bare"]
    assert invoice["not_replayable"]["no_decision"]["examples"] == ["refused"]
    totals = report["totals"]
    assert (totals["other_records"], totals["malformed"], totals["lines"]) == (1, 2, len(records) + 3 + 3)
    assert report["malformed_lines"] == [f"{traces}:{len(records) + 5}", f"{traces}:{len(records) + 6}"]

    gone = write_rules(tmp_path / "gone", support_bot=None)
    report = tally(policy_of(gone), [traces], str(gone))
    agents = sum(1 for agent, _ in TRAFFIC if agent == "support-bot")
    assert agent_entry(report, "support-bot")["not_replayable"]["agent_gone"]["count"] == agents


def test_agent_filter_and_several_trace_files(tmp_path: Path) -> None:
    old, new, new_dir, traces = scenario(tmp_path, invoice_bot=INVOICE_NEW)
    second = write_traces(tmp_path / "more.jsonl", record_traffic(old))
    report = tally(new, [traces, second], str(new_dir), agent="invoice-bot")
    assert [a["agent"] for a in report["agents"]] == ["invoice-bot"]
    invoice_calls = sum(1 for agent, _ in TRAFFIC if agent == "invoice-bot")
    assert report["totals"]["calls"] == 2 * invoice_calls
    assert agent_entry(report, "invoice-bot")["flips"]["allow->hold"]["count"] == 4


# -- the command line ----------------------------------------------------------------------------------------
def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["replay", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_is_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new, new_dir, traces = scenario(tmp_path, invoice_bot=INVOICE_NEW)
    code, out, _ = run_cli(["--rules", str(new_dir), "--traces", str(traces), "--format", "json"], capsys)
    assert code == 0
    report = orjson.loads(out)
    assert report == orjson.loads(orjson.dumps(tally(new, [traces], str(new_dir))))
    assert set(agent_entry(report, "invoice-bot")["flips"]) == {*FLIPS, RULE_CHANGED}
    assert reported(report) == expected(old, new, TRAFFIC)


def test_cli_markdown_has_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, new_dir, traces = scenario(tmp_path, invoice_bot=INVOICE_NEW)
    code, out, _ = run_cli(["--rules", str(new_dir), "--traces", str(traces), "--format", "markdown"], capsys)
    assert code == 0
    assert "| agent | calls | unchanged | allow→deny |" in out
    assert "|---|---|" in out
    assert "| invoice-bot | allow→hold | 2 | `invoice-bot.yaml#allow[2]` | `invoice-bot.yaml#hold[0]` |" in out


def test_cli_table_is_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, new_dir, traces = scenario(tmp_path, invoice_bot=INVOICE_NEW)
    code, out, _ = run_cli(["--rules", str(new_dir), "--traces", str(traces), "--examples", "1"], capsys)
    assert code == 0
    assert out.startswith("Replay of 1 trace file(s)")
    [line] = [ln for ln in out.splitlines() if "allow→hold" in ln and "invoice-bot.yaml#hold[0]" in ln]
    assert line.split()[:3] == ["invoice-bot", "allow→hold", "2"]
    assert line.split()[-1].startswith("t0")  # one example trace id


def test_cli_rule_errors_exit_2_with_line_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = write_rules(tmp_path / "broken", invoice_bot=INVOICE_BOT.replace("verbs: [read]", "verb: [read]"))
    traces = write_traces(tmp_path / "trace.jsonl", [])
    code, out, err = run_cli(["--rules", str(broken), "--traces", str(traces)], capsys)
    assert code == 2 and out == ""
    assert f"{broken}/agents/invoice-bot.yaml:5:" in err and "unknown_key" in err


def test_cli_missing_trace_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = write_rules(tmp_path / "rules")
    code, _, err = run_cli(["--rules", str(rules), "--traces", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2
    assert "nope.jsonl" in err


# -- end to end: traces written by a real gateway --------------------------------------------------------------
def traced(trace_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get("trace_id") == trace_id


async def test_replay_of_live_gateway_traces(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "old")
    stack = await start_stack(rules)
    pending: list[asyncio.Task[None]] = []
    try:
        async with aiohttp.ClientSession() as http:

            async def approve(approval_id: str) -> None:
                async with http.post(f"{stack.admin_url}/approvals/{approval_id}/approve", json={"reason": "ok"},
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                    assert resp.status == 200

            def opened(approval: Approval) -> None:
                pending.append(asyncio.ensure_future(approve(approval.id)))

            stack.gateway.runtime.on_approval_opened.append(opened)
            for i, (agent, request) in enumerate(TRAFFIC):
                trace_id = f"{i + 1:032x}"
                headers = {"Authorization": f"Bearer {stack.token(agent)}",
                           "traceparent": f"00-{trace_id}-00000000000000aa-01"}
                async with http.request(request["method"], stack.url + request["path"], json=request.get("json"),
                                        headers=headers) as resp:
                    await resp.read()
                await stack.trace.wait_for(traced(trace_id))
            await asyncio.gather(*pending)
    finally:
        await stack.gateway.close()
        await stack.fakes.close()
    events = stack.trace.events
    old = policy_of(rules)
    assert [(e["decision"], e["rule"]) for e in events] == [
        (o.decision, o.rule) for o in (evaluate(old, agent, request) for agent, request in TRAFFIC)]
    traces = write_traces(tmp_path / "live.jsonl", events)
    new_dir = write_rules(tmp_path / "new", invoice_bot=INVOICE_NEW, support_bot=SUPPORT_NEW, upstreams=UPSTREAMS_NEW)
    new = policy_of(new_dir)
    report = tally(new, [traces], str(new_dir))
    assert report["totals"]["not_replayable"] == 0, report["agents"]
    assert reported(report) == expected(old, new, TRAFFIC)
    assert "hunter2" not in traces.read_text()
