"""`agent-gateway demo`: fake upstreams on loopback, the gateway on the example rules, a scripted agent.

Needs no API key: the upstream urls in rules/upstreams.yaml are pointed at the fakes through their
`${..._URL}` variables, and the upstream credentials are demo values the fakes accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from ..server import RunningGateway, start_gateway
from ..settings import Settings
from ..tokens import issue_token
from ..trace.sinks import FanOut, LineWriter, MemorySink
from .fakes import FakeUpstreams, start_all

TRACE_FILE = "demo-trace.jsonl"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _trace_line(event: Mapping[str, Any]) -> str:
    keep = ("agent", "method", "path", "verb", "resource", "decision", "rule", "reason", "evidence", "approval",
            "status", "tokens", "cost_usd", "policy_version", "trace_id")
    return orjson.dumps({k: event[k] for k in keep if k in event}).decode()


async def _call(session: aiohttp.ClientSession, gw: RunningGateway, token: str, method: str, path: str,
                body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.request(method, gw.url + path, json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def _pending_approval(session: aiohttp.ClientSession, gw: RunningGateway, admin: str) -> dict[str, Any]:
    for _ in range(100):  # the held call registers its approval within a few ms
        async with session.get(f"{gw.admin_url}/approvals?status=pending",
                               headers={"Authorization": f"Bearer {admin}"}) as response:
            pending = (await response.json())["approvals"]
        if pending:
            approval: dict[str, Any] = pending[0]
            return approval
        await asyncio.sleep(0.05)
    raise RuntimeError("the held call never showed up in the approval queue")


async def script(gw: RunningGateway, trace: MemorySink, secret: bytes, admin: str) -> None:
    """The scripted agent: one allowed, one denied and one held call, then their trace lines."""
    token = issue_token("invoice-bot", secret, 3600)
    async with aiohttp.ClientSession() as session:
        _say("1) invoice-bot asks gpt-4o-mini for a summary (allowed by its chat rule)")
        status, body = await _call(session, gw, token, "POST", "/openai/chat/completions",
                                   {"model": "gpt-4o-mini",
                                    "messages": [{"role": "user", "content": "Summarise invoice INV-7"}]})
        _say(f"   -> {status}: {body['choices'][0]['message']['content']!r}")

        _say("2) invoice-bot tries to delete a vendor (its deny rule)")
        status, body = await _call(session, gw, token, "DELETE", "/erp/vendors/v-100")
        _say(f"   -> {status}: {body['error']['type']} by {body['error']['rule']}: {body['error']['message']}")

        _say("3) invoice-bot pays 25,000 (over 10,000: held for a manager)")
        held = asyncio.create_task(_call(session, gw, token, "POST", "/erp/payments",
                                         {"vendor": "v-100", "invoice": "INV-7", "amount": 25000}))
        approval = await _pending_approval(session, gw, admin)
        _say(f"   held as approval {approval['id'][:8]}... rule {approval['rule']}: {approval['reason']}")
        _say(f"   evidence the rule looked at: {orjson.dumps(approval['evidence']).decode()}")
        _say("   a manager approves it through the admin API:")
        _say(f"   POST {gw.admin_url}/approvals/{approval['id'][:8]}.../approve")
        async with session.post(f"{gw.admin_url}/approvals/{approval['id']}/approve",
                                headers={"Authorization": f"Bearer {admin}"},
                                json={"reason": "Invoice INV-7 checked against the PO", "category": "edge_case"}):
            pass
        status, body = await held
        _say(f"   -> {status}: {orjson.dumps(body).decode()}")

    await trace.wait_for(lambda e: e.get("approval", {}).get("outcome") == "approved")
    _say()
    _say(f"Trace lines (all of them are in {TRACE_FILE}):")
    for event in trace.events:
        _say("  " + _trace_line(event))


def demo_env(env: Mapping[str, str], fakes: FakeUpstreams) -> dict[str, str]:
    return {**env, "OPENAI_API_KEY": "demo-openai-key", "ANTHROPIC_API_KEY": "demo-anthropic-key",
            "ERP_TOKEN": "demo-erp-token", "CRM_MCP_TOKEN": "demo-crm-token",
            "OPENAI_BASE_URL": fakes.openai_url, "ANTHROPIC_BASE_URL": fakes.anthropic_url,
            "ERP_URL": fakes.http_tool_url, "CRM_MCP_URL": fakes.mcp_url}


async def _demo(rules: str, port: int, admin_port: int, serve_after: bool, env: Mapping[str, str]) -> int:
    fakes = await start_all()
    secret = secrets.token_urlsafe(32).encode()
    admin = secrets.token_urlsafe(24)
    memory = MemorySink()
    settings = Settings(rules=rules, port=port, admin_port=admin_port, jwt_secret=secret, admin_token=admin,
                        env=demo_env(env, fakes), trace=TRACE_FILE)
    try:
        gw = await start_gateway(settings, sink=FanOut(LineWriter(TRACE_FILE), memory))
    except BaseException:
        await fakes.close()
        raise
    try:
        _say(f"agent-gateway demo: agents' port {gw.url}, admin port {gw.admin_url}, "
             f"policy {gw.runtime.policy.version}")
        _say("fake OpenAI, Anthropic, MCP and ERP upstreams are on loopback; no API key is used\n")
        await script(gw, memory, secret, admin)
        if serve_after:
            token = issue_token("invoice-bot", secret, 3600)
            _say("\nThe gateway keeps running (Ctrl-C to stop).")
            _say(f"Console: {gw.admin_url}/console/  (token: {admin})")
            _say("Try it yourself:")
            _say(f"  export AGENT_TOKEN={token}")
            _say(f"  curl -s {gw.url}/openai/chat/completions -H \"Authorization: Bearer $AGENT_TOKEN\" "
                 "-H 'content-type: application/json' "
                 "-d '{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'")
            _say(f"  curl -s {gw.url}/erp/vendors -H \"Authorization: Bearer $AGENT_TOKEN\"")
            _say(f"  curl -s {gw.admin_url}/approvals -H 'Authorization: Bearer {admin}'")
            _say("  Python: OpenAI(base_url=\"" + gw.url + "/openai\", api_key=os.environ[\"AGENT_TOKEN\"])")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        await gw.close()
        await fakes.close()
    return 0


def run_demo(rules: str, port: int, admin_port: int, serve_after: bool, env: Mapping[str, str]) -> int:
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(_demo(rules, port, admin_port, serve_after, env))
    return 0
