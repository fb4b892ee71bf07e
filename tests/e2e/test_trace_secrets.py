"""No credential ever reaches the trace: every kind of call, written by the real file sink, then scanned."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
from conftest import ADMIN_TOKEN, RULES, SECRET, UPSTREAM_KEYS, fake_env

from gateway.demo.fakes import start_all
from gateway.server import start_gateway
from gateway.settings import Settings
from gateway.tokens import issue_token
from gateway.trace.sinks import FanOut, LineWriter, MemorySink

FIELDS = {"ts", "trace_id", "span_id", "agent", "upstream", "method", "path", "verb", "resource", "tool", "model",
          "decision", "rule", "policy_version", "mode", "reason", "evidence", "approval", "status", "error",
          "latency_ms", "upstream_ms", "tokens", "cost_usd", "budget", "rate_limit", "limits", "stream", "detail",
          "kind", "shadow", "warnings", "capture"}


async def test_trace_file_never_contains_a_credential(tmp_path: Path) -> None:
    fakes = await start_all()
    memory = MemorySink()
    trace_file = tmp_path / "trace.jsonl"
    settings = Settings(rules=str(RULES), port=0, admin_port=0, jwt_secret=SECRET, admin_token=ADMIN_TOKEN,
                        env=fake_env(fakes), trace=str(trace_file))
    gateway = await start_gateway(settings, sink=FanOut(LineWriter(str(trace_file)), memory))
    invoice = issue_token("invoice-bot", SECRET)
    support = issue_token("support-bot", SECRET)
    forged = invoice[:-4] + ("AAAA" if not invoice.endswith("AAAA") else "BBBB")
    secrets = [invoice, support, forged, ADMIN_TOKEN, SECRET.decode(), *UPSTREAM_KEYS.values(),
               "agent-cookie-secret", "query-secret-value"]
    try:
        async with aiohttp.ClientSession() as http:
            calls = [
                ("POST", "/openai/chat/completions", invoice,
                 {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
                ("POST", "/openai/chat/completions", invoice,
                 {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
                ("POST", "/openai/chat/completions", invoice, {"model": "gpt-4o", "messages": []}),
                ("DELETE", "/erp/vendors/v-1", invoice, None),
                ("GET", "/erp/vendors?token=query-secret-value", invoice, None),
                ("POST", "/anthropic/v1/messages", support,
                 {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}),
                ("POST", "/crm-tools/mcp", support, {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                                     "params": {"name": "lookup_account", "arguments": {}}}),
                ("GET", "/erp/vendors", forged, None),
                ("GET", "/nope/x", invoice, None),
            ]
            for method, path, token, body in calls:
                headers = {"Authorization": f"Bearer {token}", "x-api-key": token,
                           "Cookie": "session=agent-cookie-secret"}
                async with http.request(method, gateway.url + path, json=body, headers=headers) as resp:
                    await resp.read()
            # A held call, decided through the admin API with the admin token.
            opened = asyncio.Event()
            gateway.runtime.on_approval_opened.append(lambda _: opened.set())
            held = asyncio.create_task(http.post(gateway.url + "/erp/payments", json={"amount": 20000},
                                                 headers={"Authorization": f"Bearer {invoice}"}))
            async with asyncio.timeout(10):
                await opened.wait()
            [approval] = await gateway.runtime.approvals.list("pending", None, 10)
            async with http.post(f"{gateway.admin_url}/approvals/{approval.id}/approve", json={"reason": "ok"},
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                assert resp.status == 200
            async with await held as resp:
                assert resp.status == 201
        await memory.wait_for(lambda e: e.get("upstream") == "erp" and e.get("status") == 201)
    finally:
        await gateway.close()  # drains the writer thread into the file
        await fakes.close()
    lines = trace_file.read_bytes().splitlines()
    assert len(lines) == 10
    events = [orjson.loads(line) for line in lines]
    assert all(set(event) <= FIELDS for event in events)
    assert {e.get("decision") for e in events} >= {"allow", "deny", "hold"}
    text = trace_file.read_text()
    for secret in secrets:
        assert secret not in text
