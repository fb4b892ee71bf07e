"""Recorded traffic for the capture and replay tests: a small self-contained rule set, and trace records made the
way the gateway makes them (decided offline with `cases.evaluate_all`, captured with the agent's `Capturer`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from gateway.capture import Capturer
from gateway.incoming import CREDENTIAL_HEADERS
from gateway.paths import normalise
from gateway.policy.cases import PlaceholderEnv, evaluate_all
from gateway.policy.compile import Policy, compile_policy
from gateway.policy.load import load_rules

UPSTREAMS = """\
upstreams:
  openai:
    kind: openai
    url: "${OPENAI_BASE_URL:-http://127.0.0.1:9/v1}"
    credential: {header: Authorization, value: "Bearer ${OPENAI_API_KEY:-none}"}
  anthropic:
    kind: anthropic
    url: "${ANTHROPIC_BASE_URL:-http://127.0.0.1:9}"
    credential: {header: x-api-key, value: "${ANTHROPIC_API_KEY:-none}"}
  erp:
    kind: http
    url: "${ERP_URL:-http://127.0.0.1:9}"
    routes:
      - {method: GET, path: "/vendors/*", verb: read, resource: vendors}
      - {method: DELETE, path: "/vendors/*", verb: delete, resource: vendors}
      - {method: POST, path: "/payments", verb: create, resource: payments}
  crm-tools:
    kind: mcp
    url: "${CRM_MCP_URL:-http://127.0.0.1:9}"
    tools:
      - {name: lookup_account, verb: read, resource: accounts}
      - {name: send_email, verb: send, resource: email}
"""

INVOICE_BOT = """\
agent: invoice-bot
mode: assist
allow:
  - {upstream: openai, verbs: [chat], when: 'request.json.model in ["gpt-4o-mini"]'}
  - {upstream: erp, verbs: [read]}
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount <= 10000"}
hold:
  - {upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount > 10000", timeout: 5m}
deny:
  - {upstream: erp, verbs: [delete]}
"""

SUPPORT_BOT = """\
agent: support-bot
mode: automate
allow:
  - {upstream: anthropic, verbs: [chat], resources: ["claude-haiku-*", "claude-sonnet-*"]}
  - {upstream: crm-tools, verbs: [read], resources: [accounts]}
  - {upstream: crm-tools, verbs: [send], resources: [email],
     when: 'action.attributes.arguments.to.endsWith("@example.com")'}
hold:
  - {id: external-email, upstream: crm-tools, verbs: [send], resources: [email],
     when: '!action.attributes.arguments.to.endsWith("@example.com")', timeout: 5m}
"""

FILES = {"upstreams.yaml": UPSTREAMS, "agents/invoice-bot.yaml": INVOICE_BOT,
         "agents/support-bot.yaml": SUPPORT_BOT}


def write_rules(directory: Path, **changes: str | None) -> Path:
    """Write the rule set above; `changes` maps a file (`invoice_bot`, `upstreams`...) to new text, or None to
    drop it."""
    wanted = dict(FILES)
    for name, text in changes.items():
        key = "upstreams.yaml" if name == "upstreams" else f"agents/{name.replace('_', '-')}.yaml"
        if text is None:
            wanted.pop(key, None)
        else:
            wanted[key] = text
    for rel, text in wanted.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return directory


def policy_of(directory: Path) -> Policy:
    return compile_policy(load_rules(directory, PlaceholderEnv()))


def rpc(method: str, id_: int = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


def tool(name: str, id_: int = 1, **arguments: Any) -> dict[str, Any]:
    return rpc("tools/call", id_, name=name, arguments=arguments)


# (agent, request as `rules test` cases write it): a mix of every decision the rules above make.
TRAFFIC: list[tuple[str, dict[str, Any]]] = [
    ("invoice-bot", {"method": "POST", "path": "/openai/chat/completions",
                     "json": {"model": "gpt-4o-mini", "max_tokens": 100,
                              "messages": [{"role": "user", "content": "summarise invoice 7"}]}}),
    ("invoice-bot", {"method": "POST", "path": "/openai/chat/completions",
                     "json": {"model": "gpt-4o-mini", "max_tokens": 4000, "messages": []}}),
    ("invoice-bot", {"method": "POST", "path": "/openai/chat/completions",
                     "json": {"model": "gpt-4o", "messages": []}}),
    ("invoice-bot", {"method": "GET", "path": "/erp/vendors/v-1"}),
    ("invoice-bot", {"method": "GET", "path": "/erp/vendors/v-2?page=1&token=qs-secret"}),
    ("invoice-bot", {"method": "POST", "path": "/erp/payments", "json": {"vendor": "v-1", "amount": 2500}}),
    ("invoice-bot", {"method": "POST", "path": "/erp/payments", "json": {"vendor": "v-2", "amount": 7000}}),
    ("invoice-bot", {"method": "POST", "path": "/erp/payments", "json": {"vendor": "v-3", "amount": 9000}}),
    ("invoice-bot", {"method": "POST", "path": "/erp/payments", "json": {"vendor": "v-4", "amount": 25000}}),
    ("invoice-bot", {"method": "POST", "path": "/erp/payments", "json": {"vendor": "v-5"}}),
    ("invoice-bot", {"method": "DELETE", "path": "/erp/vendors/v-1"}),
    ("support-bot", {"method": "POST", "path": "/anthropic/v1/messages",
                     "json": {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": []}}),
    ("support-bot", {"method": "POST", "path": "/anthropic/v1/messages",
                     "json": {"model": "claude-opus-4-1", "max_tokens": 50, "messages": []}}),
    ("support-bot", {"method": "POST", "path": "/crm-tools/mcp", "json": tool("lookup_account", account_id="a-1")}),
    ("support-bot", {"method": "POST", "path": "/crm-tools/mcp",
                     "json": tool("send_email", to="ops@example.com", body="hi", password="hunter2")}),
    ("support-bot", {"method": "POST", "path": "/crm-tools/mcp",
                     "json": tool("send_email", to="jane@customer.io", body="your refund")}),
    ("support-bot", {"method": "POST", "path": "/crm-tools/mcp", "json": rpc("initialize")}),
    ("support-bot", {"method": "POST", "path": "/crm-tools/mcp",
                     "json": [tool("lookup_account", 1, account_id="a-2"), tool("send_email", 2, to="x@example.com")]}),
]


def trace_record(policy: Policy, agent: str, request: Mapping[str, Any], trace_id: str) -> dict[str, Any]:
    """The trace event the gateway writes for this call: its decision, rule and capture."""
    evaluation = evaluate_all(policy, agent, request)
    outcome = evaluation.outcome
    assert outcome.decision != "error", outcome.reason
    raw, _, query = str(request["path"]).partition("?")
    headers = {k.lower(): str(v) for k, v in (request.get("headers") or {}).items()
               if k.lower() not in CREDENTIAL_HEADERS}
    capture = Capturer.for_agent(policy.agents[agent]).record(str(request["method"]), normalise(raw), query,
                                                              headers, request.get("json"))
    return {"ts": 1.0, "trace_id": trace_id, "span_id": "s", "agent": agent, "method": request["method"],
            "path": normalise(raw), "decision": outcome.decision, "rule": outcome.rule,
            "policy_version": policy.version, "reason": outcome.reason, "capture": capture}


def write_traces(path: Path, records: Iterable[Mapping[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records))
    return path


def record_traffic(policy: Policy, traffic: Iterable[tuple[str, Mapping[str, Any]]] = TRAFFIC,
                   ) -> list[dict[str, Any]]:
    return [trace_record(policy, agent, request, f"t{i:03d}") for i, (agent, request) in enumerate(traffic)]
