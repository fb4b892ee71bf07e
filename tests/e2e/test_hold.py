"""Held calls over real HTTP: the agent's request waits while a human approves, denies or lets it time out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import SECRET, Stack, start_stack

from gateway.tokens import issue_token

HOLD_RULE = "invoice-bot.yaml#hold[0]"
HOLD_REASON = "Payments over 10,000 need a manager"
Answer = tuple[int, Any]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def pay(http: aiohttp.ClientSession, stack: Stack, agent: str, amount: int) -> Answer:
    headers = {"Authorization": f"Bearer {stack.token(agent)}"}
    async with http.post(f"{stack.url}/erp/payments", json={"vendor": "v-100", "amount": amount},
                         headers=headers) as resp:
        return resp.status, await resp.json()


async def pending(http: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    """The one pending approval, once it exists. Each admin round trip lets the held call progress: no sleeps."""
    async with asyncio.timeout(10):
        while True:
            async with http.get(f"{stack.admin_url}/approvals?status=pending", headers=stack.admin_headers) as resp:
                assert resp.status == 200
                approvals: list[dict[str, Any]] = (await resp.json())["approvals"]
            if approvals:
                [approval] = approvals
                return approval


async def decide(http: aiohttp.ClientSession, stack: Stack, approval_id: str, verdict: str,
                 body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Answer:
    url = f"{stack.admin_url}/approvals/{approval_id}/{verdict}"
    async with http.post(url, json=body or {}, headers=headers or stack.admin_headers) as resp:
        return resp.status, await resp.json()


async def test_payment_over_limit_held_until_approved(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack, "invoice-bot", 25000))
    approval = await pending(http, stack)
    assert stack.fakes.http_tool.recorder.requests == []
    assert isinstance(approval["id"], str)
    assert isinstance(approval["created_at"], float)
    assert approval["expires_at"] == approval["created_at"] + 15 * 60
    assert {k: approval[k] for k in ("agent", "upstream", "verb", "resource", "tool", "rule", "reason", "status",
                                     "evidence")} == {
        "agent": "invoice-bot", "upstream": "erp", "verb": "create", "resource": "payments", "tool": None,
        "rule": HOLD_RULE, "reason": HOLD_REASON, "status": "pending", "evidence": {"request.json.amount": 25000}}
    status, decided = await decide(http, stack, approval["id"], "approve",
                                   {"reason": "Vendor verified by phone", "category": "edge_case"})
    assert status == 200
    assert (decided["id"], decided["status"], decided["decided_by"]) == (approval["id"], "approved", "admin")
    assert (decided["decision_reason"], decided["category"]) == ("Vendor verified by phone", "edge_case")
    assert await call == (201, {"vendor": "v-100", "amount": 25000, "id": "pay-1", "status": "created"})
    seen = stack.fakes.http_tool.recorder.last()
    assert (seen.method, seen.path, seen.json()) == ("POST", "/payments", {"vendor": "v-100", "amount": 25000})
    assert seen.headers["authorization"] == "Bearer erp-upstream-token"
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "erp", limit=10)
    assert (event["decision"], event["rule"], event["status"], event["reason"]) == ("hold", HOLD_RULE, 201, HOLD_REASON)
    assert event["evidence"] == {"request.json.amount": 25000}
    waited = event["approval"].pop("waited_ms")
    assert isinstance(waited, float)
    assert waited > 0
    assert event["approval"] == {"id": approval["id"], "by": "admin", "outcome": "approved",
                                 "reason": "Vendor verified by phone"}
    async with http.get(f"{stack.admin_url}/approvals?status=approved", headers=stack.admin_headers) as resp:
        assert [a["id"] for a in (await resp.json())["approvals"]] == [approval["id"]]


async def test_held_payment_refused_when_human_denies(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack, "invoice-bot", 25000))
    approval = await pending(http, stack)
    status, decided = await decide(http, stack, approval["id"], "deny",
                                   {"reason": "Duplicate invoice", "category": "data_quality"})
    assert (status, decided["status"], decided["category"]) == (200, "denied", "data_quality")
    status, body = await call
    assert status == 403
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "erp", limit=10)
    assert body == {"error": {"type": "approval_denied", "message": "a human denied this call: Duplicate invoice",
                              "rule": HOLD_RULE, "trace_id": event["trace_id"]}}
    assert stack.fakes.http_tool.recorder.requests == []
    assert (event["decision"], event["error"], event["status"]) == ("hold", "approval_denied", 403)
    assert (event["approval"]["outcome"], event["approval"]["by"]) == ("denied", "admin")


async def test_held_payment_refused_on_timeout(rules_copy: Callable[[], Path], http: aiohttp.ClientSession) -> None:
    rules = rules_copy()
    agent_file = rules / "agents" / "invoice-bot.yaml"
    text = agent_file.read_text()
    assert text.count("timeout: 15m") == 1
    agent_file.write_text(text.replace("timeout: 15m", "timeout: 1s"))
    stack = await start_stack(rules)
    try:
        status, body = await pay(http, stack, "invoice-bot", 25000)
        event = await stack.trace.wait_for(lambda e: e.get("upstream") == "erp", limit=10)
        async with http.get(f"{stack.admin_url}/approvals", headers=stack.admin_headers) as resp:
            [approval] = (await resp.json())["approvals"]
    finally:
        await stack.gateway.close()
        await stack.fakes.close()
    assert status == 403
    assert body == {"error": {"type": "approval_timeout", "message": "nobody approved this call within 1s",
                              "rule": HOLD_RULE, "trace_id": event["trace_id"]}}
    assert stack.fakes.http_tool.recorder.requests == []
    assert (approval["status"], approval["decided_by"]) == ("timeout", None)
    assert approval["expires_at"] == approval["created_at"] + 1
    assert (event["decision"], event["error"], event["approval"]["outcome"], event["approval"]["by"]) == (
        "hold", "approval_timeout", "timeout", None)
    assert event["approval"]["waited_ms"] >= 1000


async def test_decision_refused_when_already_decided(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack, "invoice-bot", 25000))
    approval = await pending(http, stack)
    assert (await decide(http, stack, approval["id"], "approve"))[0] == 200
    assert (await call)[0] == 201
    for verdict in ("approve", "deny"):
        status, body = await decide(http, stack, approval["id"], verdict)
        message = f"approval {approval['id']} is already approved (by admin)"
        assert (status, body) == (409, {"error": {"type": "conflict", "message": message}})
    status, body = await decide(http, stack, "no-such-id", "approve")
    assert (status, body) == (404, {"error": {"type": "not_found", "message": "no approval 'no-such-id'"}})
    assert len(stack.fakes.http_tool.recorder.requests) == 1


@pytest.mark.parametrize(("body", "message"), [
    ({"category": "whim"}, "'category' must be one of policy_gap, data_quality, edge_case, other"),
    ({"reason": 5}, "'reason' must be a string"),
], ids=["category", "reason"])
async def test_decision_refused_for_bad_body(stack: Stack, http: aiohttp.ClientSession, body: dict[str, Any],
                                             message: str) -> None:
    call = asyncio.create_task(pay(http, stack, "invoice-bot", 25000))
    approval = await pending(http, stack)
    assert await decide(http, stack, approval["id"], "approve", body) == (
        400, {"error": {"type": "bad_request", "message": message}})
    assert (await pending(http, stack))["id"] == approval["id"]
    assert (await decide(http, stack, approval["id"], "deny"))[0] == 200
    assert (await call)[0] == 403


async def test_approver_jwt_recorded_as_approver(stack: Stack, http: aiohttp.ClientSession) -> None:
    token = issue_token("alice@example.com", SECRET, audience="agent-gateway-admin", extra={"role": "approver"})
    approver = {"Authorization": f"Bearer {token}"}
    call = asyncio.create_task(pay(http, stack, "invoice-bot", 25000))
    approval = await pending(http, stack)
    async with http.get(f"{stack.admin_url}/approvals?status=pending", headers=approver) as resp:
        assert resp.status == 200
        assert [a["id"] for a in (await resp.json())["approvals"]] == [approval["id"]]
    # `by` in the body is ignored: the approver is whoever the credential names.
    status, decided = await decide(http, stack, approval["id"], "approve",
                                   {"by": "mallory", "reason": "ok", "category": "other"}, approver)
    assert (status, decided["decided_by"]) == (200, "alice@example.com")
    assert (await call)[0] == 201
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "erp", limit=10)
    assert (event["approval"]["by"], event["approval"]["outcome"]) == ("alice@example.com", "approved")


def _agent_jwt(stack: Stack) -> str:
    return str(stack.token("invoice-bot"))


def _agent_jwt_with_admin_role(stack: Stack) -> str:
    return issue_token("invoice-bot", SECRET, extra={"role": "admin"})


def _viewer_jwt(stack: Stack) -> str:
    return issue_token("eve", SECRET, audience="agent-gateway-admin", extra={"role": "viewer"})


@pytest.mark.parametrize(("make_token", "message"), [
    (_agent_jwt, "token audience must include 'agent-gateway-admin'"),
    (_agent_jwt_with_admin_role, "token audience must include 'agent-gateway-admin'"),
    (_viewer_jwt, "admin token 'role' claim must be 'admin' or 'approver'"),
], ids=["agent", "agent-with-admin-role", "viewer-role"])
async def test_admin_api_unauthenticated_for_non_admin_token(stack: Stack, http: aiohttp.ClientSession,
                                                             make_token: Any, message: str) -> None:
    headers = {"Authorization": f"Bearer {make_token(stack)}"}
    async with http.get(f"{stack.admin_url}/approvals", headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="agent-gateway-admin"'
        assert await resp.json() == {"error": {"type": "unauthenticated", "message": message}}


async def test_admin_api_unauthenticated_without_token(stack: Stack, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{stack.admin_url}/approvals/x/approve", json={}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "unauthenticated"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/approvals"), ("GET", "/approvals?status=pending"), ("POST", "/approvals/abc/approve"),
    ("GET", "/healthz"),
])
async def test_agents_port_serves_no_admin_route(stack: Stack, http: aiohttp.ClientSession, method: str,
                                                 path: str) -> None:
    name = path.split("/")[1].split("?")[0]
    agent = {"Authorization": f"Bearer {stack.token('invoice-bot')}"}
    async with http.request(method, f"{stack.url}{path}", headers=agent) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["type"] == "bad_request"
    assert body["error"]["message"] == f"unknown upstream {name!r}: the first path segment must name an upstream"
    # The admin credential means nothing on the agents' port.
    async with http.request(method, f"{stack.url}{path}", headers=stack.admin_headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "unauthenticated"


async def test_payment_within_limit_passes_without_hold(stack: Stack, http: aiohttp.ClientSession) -> None:
    assert await pay(http, stack, "invoice-bot", 500) == (
        201, {"vendor": "v-100", "amount": 500, "id": "pay-1", "status": "created"})
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "erp", limit=10)
    assert (event["decision"], event["rule"], event["status"]) == ("allow", "invoice-bot.yaml#allow[2]", 201)
    assert event["evidence"] == {"request.json.amount": 500}
    assert "approval" not in event
    async with http.get(f"{stack.admin_url}/approvals", headers=stack.admin_headers) as resp:
        assert await resp.json() == {"approvals": []}


async def test_audit_agent_write_held_and_read_passes(stack: Stack, http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": f"Bearer {stack.token('ops-bot')}"}
    async with http.get(f"{stack.url}/erp/vendors", headers=headers) as resp:
        assert resp.status == 200
        assert [v["id"] for v in (await resp.json())["vendors"]] == ["v-100", "v-200", "v-300"]
    read = await stack.trace.wait_for(lambda e: e.get("verb") == "read", limit=10)
    assert (read["agent"], read["decision"], read["rule"], read["mode"]) == (
        "ops-bot", "allow", "ops-bot.yaml#allow[1]", "audit")
    call = asyncio.create_task(pay(http, stack, "ops-bot", 500))
    approval = await pending(http, stack)
    assert (approval["agent"], approval["verb"], approval["resource"], approval["rule"]) == (
        "ops-bot", "create", "payments", "mode:audit")
    assert approval["reason"] == "agent is in audit mode: create (allowed by ops-bot.yaml#allow[2]) needs a human"
    assert [r.path for r in stack.fakes.http_tool.recorder.requests] == ["/vendors"]
    assert (await decide(http, stack, approval["id"], "deny", {"reason": "not yet"}))[0] == 200
    status, body = await call
    assert (status, body["error"]["type"], body["error"]["rule"]) == (403, "approval_denied", "mode:audit")
    write = await stack.trace.wait_for(lambda e: e.get("verb") == "create", limit=10)
    assert (write["decision"], write["rule"], write["approval"]["outcome"]) == ("hold", "mode:audit", "denied")
    assert [r.path for r in stack.fakes.http_tool.recorder.requests] == ["/vendors"]


async def test_held_call_abandoned_when_agent_hangs_up(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack, "invoice-bot", 25000))
    approval = await pending(http, stack)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "erp", limit=10)
    assert (event["decision"], event["error"], event["approval"]["outcome"]) == (
        "hold", "client_disconnected", "abandoned")
    async with http.get(f"{stack.admin_url}/approvals", headers=stack.admin_headers) as resp:
        assert [(a["id"], a["status"]) for a in (await resp.json())["approvals"]] == [(approval["id"], "abandoned")]
    assert stack.fakes.http_tool.recorder.requests == []


async def test_abandoned_approval_lets_identical_retry_through_once(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack, "invoice-bot", 25000))
    approval = await pending(http, stack)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await stack.trace.wait_for(lambda e: e.get("error") == "client_disconnected", limit=10)
    status, decided = await decide(http, stack, approval["id"], "approve", {"reason": "checked"})
    assert (status, decided["status"]) == (200, "approved")
    # A different body is not covered by that approval: it is held afresh.
    other = asyncio.create_task(pay(http, stack, "invoice-bot", 25001))
    fresh = await pending(http, stack)
    assert fresh["id"] != approval["id"]
    assert (await decide(http, stack, fresh["id"], "deny"))[0] == 200
    assert (await other)[0] == 403
    # The identical retry passes without a second hold, exactly once.
    assert await pay(http, stack, "invoice-bot", 25000) == (
        201, {"vendor": "v-100", "amount": 25000, "id": "pay-1", "status": "created"})
    retried = await stack.trace.wait_for(lambda e: e.get("status") == 201, limit=10)
    assert retried["approval"] == {"id": approval["id"], "by": "admin", "outcome": "approved", "waited_ms": 0.0,
                                   "retry_of_abandoned": True}
    again = asyncio.create_task(pay(http, stack, "invoice-bot", 25000))
    third = await pending(http, stack)
    assert third["id"] not in (approval["id"], fresh["id"])
    assert (await decide(http, stack, third["id"], "deny"))[0] == 200
    assert (await again)[0] == 403
    assert [r.json()["amount"] for r in stack.fakes.http_tool.recorder.requests] == [25000]
