"""Replay at scale: a realistic trace file of N calls, then `agent-gateway replay` over it, timed.

    python loadtests/replay_bench.py [--lines 1000000] [--traces /tmp/replay-bench.jsonl] [--regen]

The traces are what the gateway writes for the example agents in rules/ (chat, payments, vendor reads and
deletes, MCP tool calls, session plumbing, budget alerts, refused calls without a capture), each call decided
by the example rules and captured with the agent's compiled `Capturer`. The candidate rule set lowers the
payment threshold, adds a deny rule and turns a staged rule on; the replay runs as the CLI would, in a fresh
process, and the wall time is printed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from gateway.capture import Capturer
from gateway.policy.cases import PlaceholderEnv, evaluate_all
from gateway.policy.compile import Policy, compile_policy
from gateway.policy.load import load_rules

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
WORDS = ("please", "pay", "the", "attached", "invoice", "for", "march", "and", "confirm", "the", "vendor", "bank",
         "details", "before", "noon")


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))


def _rpc(rng: random.Random, method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rng.randint(1, 10_000), "method": method, "params": params}


def _request(rng: random.Random) -> tuple[str, str, str, Any]:
    """(agent, method, path with query, body) drawn from a plausible mix of the example agents' traffic."""
    roll = rng.random()
    vendor = f"v-{rng.randint(1, 5000)}"
    if roll < 0.40:  # invoice-bot: mostly chat and vendor reads, some payments
        kind = rng.random()
        if kind < 0.45:
            model = rng.choices(["gpt-4o-mini", "gpt-4o"], [0.9, 0.1])[0]
            body = {"model": model, "max_tokens": rng.choice([256, 512, 1024]), "temperature": 0.2,
                    "messages": [{"role": "system", "content": "You pay invoices."},
                                 {"role": "user", "content": _prompt(rng)}]}
            return "invoice-bot", "POST", "/openai/chat/completions", body
        if kind < 0.75:
            return "invoice-bot", "GET", f"/erp/vendors/{vendor}", None
        if kind < 0.97:
            body = {"vendor": vendor, "amount": rng.choice([rng.randint(50, 9_999), rng.randint(10_000, 60_000)]),
                    "currency": "EUR", "invoice": f"inv-{rng.randint(1, 10**6)}", "memo": _prompt(rng)[:80]}
            return "invoice-bot", "POST", "/erp/payments", body
        return "invoice-bot", "DELETE", f"/erp/vendors/{vendor}", None
    if roll < 0.80:  # support-bot: Claude chat and CRM tools over MCP
        kind = rng.random()
        if kind < 0.45:
            model = rng.choices(["claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-1"], [0.6, 0.35, 0.05])[0]
            body = {"model": model, "max_tokens": 1024, "stream": rng.random() < 0.5,
                    "system": "You answer support tickets.", "messages": [{"role": "user", "content": _prompt(rng)}]}
            return "support-bot", "POST", "/anthropic/v1/messages", body
        if kind < 0.75:
            arguments: dict[str, Any] = {"account_id": f"a-{rng.randint(1, 20_000)}"}
            if rng.random() < 0.1:
                arguments["limit"] = rng.choice([50, 500])
            return "support-bot", "POST", "/crm-tools/mcp", _rpc(rng, "tools/call", name="lookup_account",
                                                                 arguments=arguments)
        if kind < 0.90:
            to = rng.choice([f"agent{rng.randint(1, 50)}@example.com", f"cust{rng.randint(1, 3000)}@customer.io"])
            return "support-bot", "POST", "/crm-tools/mcp", _rpc(
                rng, "tools/call", name="send_email", arguments={"to": to, "subject": "Re: ticket",
                                                                  "body": _prompt(rng), "api_key": "sk-leaked"})
        if kind < 0.97:
            return "support-bot", "POST", "/crm-tools/mcp", _rpc(rng, rng.choice(["initialize", "tools/list"]))
        return "support-bot", "POST", "/crm-tools/mcp", _rpc(rng, "tools/call", name="delete_account",
                                                             arguments={"account_id": "a-1"})
    kind = rng.random()  # ops-bot, in audit mode: reads pass, the rest is held
    if kind < 0.35:
        body = {"model": "text-embedding-3-small", "input": _prompt(rng)}
        return "ops-bot", "POST", "/openai/embeddings", body
    if kind < 0.70:
        return "ops-bot", "GET", f"/erp/vendors?page={rng.randint(1, 40)}&token=qs-secret", None
    if kind < 0.85:
        return "ops-bot", "POST", "/crm-tools/mcp", _rpc(rng, "tools/call", name="lookup_account",
                                                         arguments={"account_id": "a-9"})
    if kind < 0.95:
        return "ops-bot", "POST", "/erp/payments", {"vendor": vendor, "amount": rng.randint(10, 500)}
    return "ops-bot", "GET", "/erp/admin/export", None


def generate(path: Path, count: int, seed: int = 7) -> None:
    """Write `count` trace lines (calls, plus a few budget alerts and refused calls) to `path`."""
    policy = compile_policy(load_rules(RULES, PlaceholderEnv(os.environ)))
    capturers = {name: Capturer.for_agent(agent) for name, agent in policy.agents.items()}
    rng = random.Random(seed)
    decided: dict[bytes, dict[str, Any]] = {}
    ts = 1_767_000_000.0
    with open(path, "wb") as out:
        batch: list[bytes] = []
        for _ in range(count):
            ts += rng.random() * 0.01
            trace_id, span_id = rng.randbytes(16).hex(), rng.randbytes(8).hex()
            roll = rng.random()
            if roll < 0.005:
                event: dict[str, Any] = {"ts": ts, "trace_id": trace_id, "span_id": span_id, "kind": "budget_alert",
                                         "agent": "invoice-bot", "budget": {"id": "invoice-bot.yaml#budgets[0]",
                                                                            "used": 100_000, "limit": 200_000}}
            elif roll < 0.01:
                event = {"ts": ts, "trace_id": trace_id, "span_id": span_id, "method": "GET", "path": "/erp/vendors",
                         "error": "unauthenticated", "status": 401, "reason": "token expired", "latency_ms": 0.4}
            else:
                event = {"ts": ts, "trace_id": trace_id, "span_id": span_id,
                         **_decided(policy, capturers, decided, *_request(rng))}
                event["latency_ms"] = round(rng.uniform(1, 900), 3)
                if event["decision"] == "allow":
                    event.update(status=200, upstream_ms=round(event["latency_ms"] * 0.9, 3))
                    if event.get("model"):
                        used = {"input": rng.randint(50, 900), "output": rng.randint(10, 700)}
                        event.update(tokens=used, cost_usd=round(used["output"] * 6e-7, 8),
                                     budget={"id": "b", "unit": "tokens", "used": rng.randint(1, 200_000),
                                             "limit": 200_000, "window": "day"})
                elif event["decision"] == "deny":
                    event.update(status=403, error="policy_denied")
                else:
                    event.update(status=200, approval={"id": rng.randbytes(8).hex(), "by": "alice",
                                                       "outcome": "approved", "waited_ms": rng.randint(1000, 90_000)})
            batch.append(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))
            if len(batch) >= 10_000:
                out.write(b"".join(batch))
                batch.clear()
        out.write(b"".join(batch))


def _decided(policy: Policy, capturers: dict[str, Capturer], seen: dict[bytes, dict[str, Any]], agent: str,
             method: str, target: str, body: Any) -> dict[str, Any]:
    """The decision fields and capture of one call, as the gateway would trace them (cached per request)."""
    key = orjson.dumps([agent, method, target, body])
    found = seen.get(key)
    if found is not None:
        return dict(found)
    request: dict[str, Any] = {"method": method, "path": target}
    if body is not None:
        request["json"] = body
    evaluation = evaluate_all(policy, agent, request)
    decision, action = max(evaluation.decisions, key=lambda d: {"deny": 2, "hold": 1, "allow": 0}[d[0].outcome])
    path, _, query = target.partition("?")
    fields = {"agent": agent, "upstream": action.upstream, "method": method, "path": path, "verb": action.verb,
              "resource": action.resource, "tool": action.tool, "model": action.model, "decision": decision.outcome,
              "rule": decision.rule, "policy_version": policy.version, "mode": decision.mode,
              "reason": decision.reason, "evidence": dict(decision.evidence) or None,
              "capture": capturers[agent].record(method, path, query, {"user-agent": "agent/1.0"}, body)}
    fields = {k: v for k, v in fields.items() if v is not None}
    if len(seen) < 500_000:
        seen[key] = fields
    return dict(fields)


def candidate_rules(target: Path) -> Path:
    """The example rules with three changes a security team might propose."""
    shutil.copytree(RULES, target)
    invoice = target / "agents" / "invoice-bot.yaml"
    text = invoice.read_text().replace("request.json.amount <= 10000", "request.json.amount <= 5000")
    text = text.replace("request.json.amount > 10000", "request.json.amount > 5000")
    invoice.write_text(text)
    # A new deny rule, appended so the existing rules keep their positional ids.
    lines = invoice.read_text().splitlines(keepends=True)
    at = max(i for i, line in enumerate(lines) if line.startswith("  - {upstream: erp, verbs: [delete]")) + 1
    lines.insert(at, "  - {upstream: openai, verbs: [chat], resources: [gpt-4o], reason: No gpt-4o for payments}\n")
    invoice.write_text("".join(lines))
    support = target / "agents" / "support-bot.yaml"
    support.write_text(support.read_text().replace("    enforce: shadow\n", ""))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--traces", type=Path, default=Path(tempfile.gettempdir()) / "replay-bench.jsonl")
    parser.add_argument("--regen", action="store_true", help="write the trace file even if it exists")
    args = parser.parse_args()
    if args.regen or not args.traces.exists():
        started = time.perf_counter()
        generate(args.traces, args.lines)
        print(f"wrote {args.lines:,} lines ({args.traces.stat().st_size / 2**20:.0f} MiB) to {args.traces} "
              f"in {time.perf_counter() - started:.1f}s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rules = candidate_rules(Path(tmp) / "rules")
        command = [sys.executable, "-m", "gateway", "replay", "--rules", str(rules), "--traces", str(args.traces)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
    print(f"replay wall time: {elapsed:.2f}s (exit {done.returncode})")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
