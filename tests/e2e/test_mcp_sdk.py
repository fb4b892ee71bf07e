"""The official `mcp` client (and raw JSON-RPC) as the agent: tool filtering, allowed, denied and held calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx2
import orjson
import pytest
from conftest import Stack, start_stack
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent

UPSTREAM_AUTH = "Bearer crm-upstream-token"
ACCEPT = "application/json, text/event-stream"


@pytest.fixture(params=[False, True], ids=["json", "sse"])
async def mcp_stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """The stack with the fake MCP server answering in JSON, then in SSE."""
    s = await start_stack(mcp_sse=request.param)
    yield s
    await s.gateway.close()
    await s.fakes.close()


@asynccontextmanager
async def mcp_client(stack: Stack, jwt: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {jwt}"}) as http,
        Client(streamable_http_client(f"{stack.url}/crm-tools/mcp", http_client=http), mode="legacy") as client,
    ):
        yield client


def upstream_methods(stack: Stack) -> list[Any]:
    return [orjson.loads(r.body).get("method") for r in stack.fakes.mcp.recorder.requests if r.method == "POST"]


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def call(msg_id: int, tool: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


async def post_rpc(stack: Stack, payload: Any, jwt: str | None) -> tuple[int, aiohttp.ClientResponse, Any]:
    """POST a raw JSON-RPC body; the answer parsed (SSE answers as the list of their messages)."""
    headers = {"Accept": ACCEPT} | ({"Authorization": f"Bearer {jwt}"} if jwt else {})
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.url}/crm-tools/mcp", json=payload, headers=headers) as resp,
    ):
        body = await resp.read()
    if resp.content_type == "text/event-stream":
        data = [line.removeprefix(b"data: ") for line in body.split(b"\n") if line.startswith(b"data: ")]
        return resp.status, resp, [orjson.loads(item) for item in data]
    return resp.status, resp, orjson.loads(body)


async def test_tools_list_filtered_to_tools_agent_may_call(mcp_stack: Stack) -> None:
    async with mcp_client(mcp_stack, mcp_stack.token("support-bot")) as client:
        tools = await client.list_tools()
    # lookup_account: allow rule; send_email: hold rule; delete_account: deny rule; export_all: unlisted, no grant.
    assert [tool.name for tool in tools.tools] == ["lookup_account", "send_email"]
    assert upstream_methods(mcp_stack) == ["initialize", "notifications/initialized", "tools/list"]
    event = await mcp_stack.trace.wait_for(lambda e: e.get("verb") == "tools/list", limit=10)
    assert (event["decision"], event["rule"], event["status"]) == ("allow", "mcp:session", 200)


async def test_tool_call_allowed_with_upstream_credential(mcp_stack: Stack) -> None:
    jwt = mcp_stack.token("support-bot")
    async with mcp_client(mcp_stack, jwt) as client:
        result = await client.call_tool("lookup_account", {"account_id": "a-1"})
    assert result.is_error is False
    assert isinstance(result.content[0], TextContent)
    assert result.content[0].text == 'called lookup_account with {"account_id":"a-1"}'
    calls = [r.json() for r in mcp_stack.fakes.mcp.recorder.requests
             if r.method == "POST" and r.json().get("method") == "tools/call"]
    assert [c["params"] for c in calls] == [{"name": "lookup_account", "arguments": {"account_id": "a-1"}}]
    for seen in mcp_stack.fakes.mcp.recorder.requests:
        assert seen.headers["authorization"] == UPSTREAM_AUTH
        assert all(jwt not in value for value in seen.headers.values())
    event = await mcp_stack.trace.wait_for(lambda e: e.get("tool") == "lookup_account", limit=10)
    assert (event["agent"], event["upstream"], event["verb"], event["resource"]) == (
        "support-bot", "crm-tools", "read", "accounts")
    assert (event["decision"], event["rule"], event["status"]) == ("allow", "support-bot.yaml#allow[1]", 200)


async def test_tool_call_denied_by_deny_rule(mcp_stack: Stack) -> None:
    async with mcp_client(mcp_stack, mcp_stack.token("support-bot")) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("delete_account", {"account_id": "a-1"})
    error = caught.value.error
    assert (error.code, error.message) == (-32001, "Support never deletes accounts")
    assert isinstance(error.data, dict)
    assert (error.data["type"], error.data["rule"]) == ("policy_denied", "support-bot.yaml#deny[0]")
    assert "tools/call" not in upstream_methods(mcp_stack)
    event = await mcp_stack.trace.wait_for(lambda e: e.get("tool") == "delete_account", limit=10)
    assert error.data["trace_id"] == event["trace_id"]
    assert (event["decision"], event["rule"], event["error"]) == ("deny", "support-bot.yaml#deny[0]", "policy_denied")
    assert (event["verb"], event["resource"]) == ("delete", "accounts")


@pytest.mark.parametrize("tool", ["export_all", "lookup_account ", "Lookup_Account"],
                         ids=["unlisted", "trailing-space", "case"])
async def test_tool_call_denied_for_tool_without_grant(mcp_stack: Stack, tool: str) -> None:
    async with mcp_client(mcp_stack, mcp_stack.token("support-bot")) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool(tool, {"account_id": "a-1"})
    error = caught.value.error
    assert error.code == -32001
    assert error.message == f"no rule allows 'call' on 'crm-tools/{tool}' for agent 'support-bot'"
    assert isinstance(error.data, dict)
    assert (error.data["type"], error.data["rule"]) == ("policy_denied", "default")
    assert "tools/call" not in upstream_methods(mcp_stack)
    event = await mcp_stack.trace.wait_for(lambda e: e.get("tool") == tool, limit=10)
    assert (event["verb"], event["resource"], event["decision"]) == ("call", tool, "deny")


async def test_tool_call_denied_for_internal_email_without_allow_rule(mcp_stack: Stack) -> None:
    async with mcp_client(mcp_stack, mcp_stack.token("support-bot")) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("send_email", {"to": "team@example.com", "subject": "hi"})
    assert isinstance(caught.value.error.data, dict)
    assert (caught.value.error.data["type"], caught.value.error.data["rule"]) == ("policy_denied", "default")
    assert "tools/call" not in upstream_methods(mcp_stack)


async def wait_pending(stack: Stack, http: aiohttp.ClientSession) -> dict[str, Any]:
    """The one pending approval, once it exists: every admin round trip lets the held call progress."""
    async with asyncio.timeout(10):
        while True:
            async with http.get(f"{stack.admin_url}/approvals?status=pending", headers=stack.admin_headers) as resp:
                approvals: list[dict[str, Any]] = (await resp.json())["approvals"]
            if approvals:
                [approval] = approvals
                return approval


async def test_tool_call_held_until_approved_for_external_email(mcp_stack: Stack) -> None:
    arguments = {"to": "customer@gmail.test", "subject": "Your ticket"}
    async with mcp_client(mcp_stack, mcp_stack.token("support-bot")) as client, aiohttp.ClientSession() as http:
        pending = asyncio.create_task(client.call_tool("send_email", arguments))
        approval = await wait_pending(mcp_stack, http)
        assert (approval["agent"], approval["upstream"], approval["verb"], approval["resource"], approval["tool"]) == (
            "support-bot", "crm-tools", "send", "email", "send_email")
        assert (approval["rule"], approval["reason"]) == (
            "support-bot-external-email", "Email to a customer address needs a human")
        assert approval["evidence"] == {"action.attributes.arguments.to": "customer@gmail.test"}
        assert "tools/call" not in upstream_methods(mcp_stack)
        url = f"{mcp_stack.admin_url}/approvals/{approval['id']}/approve"
        async with http.post(url, json={"reason": "ok", "category": "edge_case"},
                             headers=mcp_stack.admin_headers) as resp:
            assert resp.status == 200
        result = await pending
    assert result.is_error is False
    assert isinstance(result.content[0], TextContent)
    assert result.content[0].text == 'called send_email with {"subject":"Your ticket","to":"customer@gmail.test"}'
    event = await mcp_stack.trace.wait_for(lambda e: e.get("tool") == "send_email", limit=10)
    assert (event["decision"], event["rule"], event["status"]) == ("hold", "support-bot-external-email", 200)
    assert (event["approval"]["outcome"], event["approval"]["by"]) == ("approved", "admin")


async def test_tool_call_refused_when_human_denies_hold(mcp_stack: Stack) -> None:
    async with mcp_client(mcp_stack, mcp_stack.token("support-bot")) as client, aiohttp.ClientSession() as http:
        pending = asyncio.create_task(client.call_tool("send_email", {"to": "x@gmail.test", "subject": "s"}))
        approval = await wait_pending(mcp_stack, http)
        url = f"{mcp_stack.admin_url}/approvals/{approval['id']}/deny"
        async with http.post(url, json={"reason": "wrong customer"}, headers=mcp_stack.admin_headers) as resp:
            assert resp.status == 200
        with pytest.raises(MCPError) as caught:
            await pending
    error = caught.value.error
    assert (error.code, error.message) == (-32001, "a human denied this call: wrong customer")
    assert isinstance(error.data, dict)
    assert (error.data["type"], error.data["rule"]) == ("approval_denied", "support-bot-external-email")
    assert "tools/call" not in upstream_methods(mcp_stack)


async def test_session_denied_for_agent_without_grant(mcp_stack: Stack) -> None:
    with pytest.raises(BaseExceptionGroup) as caught:
        async with mcp_client(mcp_stack, mcp_stack.token("invoice-bot")):
            pass
    [error] = leaves(caught.value)
    assert isinstance(error, MCPError)
    assert error.error.code == -32001
    assert error.error.message == "agent 'invoice-bot' holds no grant on upstream 'crm-tools'"
    assert isinstance(error.error.data, dict)
    assert (error.error.data["type"], error.error.data["rule"]) == ("policy_denied", "default")
    assert mcp_stack.fakes.mcp.recorder.requests == []


async def test_initialize_denied_for_agent_without_grant(stack: Stack) -> None:
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                             "clientInfo": {"name": "raw", "version": "0"}}}
    status, resp, answer = await post_rpc(stack, initialize, stack.token("invoice-bot"))
    assert (status, resp.content_type) == (200, "application/json")
    event = await stack.trace.wait_for(lambda e: e.get("verb") == "initialize", limit=10)
    assert answer == {"jsonrpc": "2.0", "id": 1, "error": {
        "code": -32001, "message": "agent 'invoice-bot' holds no grant on upstream 'crm-tools'",
        "data": {"type": "policy_denied", "message": "agent 'invoice-bot' holds no grant on upstream 'crm-tools'",
                 "rule": "default", "trace_id": event["trace_id"]}}}
    assert stack.fakes.mcp.recorder.requests == []


async def test_request_unauthenticated_without_token(stack: Stack) -> None:
    status, resp, answer = await post_rpc(stack, {"jsonrpc": "2.0", "id": 1, "method": "ping"}, None)
    assert status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="agent-gateway"'
    assert answer["error"]["type"] == "unauthenticated"
    assert answer["error"]["message"] == "no credential: send 'Authorization: Bearer <agent JWT>' or 'x-api-key'"
    assert stack.fakes.mcp.recorder.requests == []


async def test_batch_refused_whole_when_one_element_denied(stack: Stack) -> None:
    batch = [call(1, "lookup_account", account_id="a-1"),
             {"jsonrpc": "2.0", "method": "notifications/initialized"},
             call(2, "delete_account", account_id="a-1")]
    status, resp, answers = await post_rpc(stack, batch, stack.token("support-bot"))
    assert (status, resp.content_type) == (200, "application/json")
    assert stack.fakes.mcp.recorder.requests == []
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "crm-tools", limit=10)
    data = {"type": "policy_denied", "message": "Support never deletes accounts",
            "rule": "support-bot.yaml#deny[0]", "trace_id": event["trace_id"]}
    error = {"code": -32001, "message": "Support never deletes accounts", "data": data}
    assert answers == [{"jsonrpc": "2.0", "id": 1, "error": error}, {"jsonrpc": "2.0", "id": 2, "error": error}]
    assert (event["decision"], event["rule"], event["error"]) == ("deny", "support-bot.yaml#deny[0]", "policy_denied")
    assert event["detail"] == {"elements": [
        {"verb": "read", "resource": "accounts", "tool": "lookup_account", "decision": "allow",
         "rule": "support-bot.yaml#allow[1]"},
        {"verb": "notifications/initialized", "resource": None, "tool": None, "decision": "allow",
         "rule": "mcp:session"},
        {"verb": "delete", "resource": "accounts", "tool": "delete_account", "decision": "deny",
         "rule": "support-bot.yaml#deny[0]"},
    ]}


async def test_batch_forwarded_when_every_element_allowed(mcp_stack: Stack) -> None:
    batch = [call(1, "lookup_account", account_id="a-1"), call(2, "lookup_account", account_id="a-2")]
    jwt = mcp_stack.token("support-bot")
    status, _, answers = await post_rpc(mcp_stack, batch, jwt)
    assert status == 200
    assert answers == [
        {"jsonrpc": "2.0", "id": 1, "result": {
            "content": [{"type": "text", "text": 'called lookup_account with {"account_id":"a-1"}'}],
            "isError": False}},
        {"jsonrpc": "2.0", "id": 2, "result": {
            "content": [{"type": "text", "text": 'called lookup_account with {"account_id":"a-2"}'}],
            "isError": False}},
    ]
    seen = mcp_stack.fakes.mcp.recorder.last()
    assert seen.json() == batch
    assert seen.headers["authorization"] == UPSTREAM_AUTH
    assert all(jwt not in value for value in seen.headers.values())
    event = await mcp_stack.trace.wait_for(lambda e: e.get("upstream") == "crm-tools", limit=10)
    assert (event["decision"], event["rule"], event["status"]) == ("allow", "support-bot.yaml#allow[1]", 200)
