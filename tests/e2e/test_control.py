"""The kill switch, approve-and-remember and approval notifications, in one process (memory stores)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import ADMIN_TOKEN, Stack, start_stack

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def slow_stack() -> AsyncIterator[Stack]:
    """The fake LLM streams one word every 0.2 s."""
    stack = await start_stack(chunk_delay=0.2)
    yield stack
    await stack.gateway.close()
    await stack.fakes.close()


async def pay(http: aiohttp.ClientSession, stack: Stack, amount: int) -> tuple[int, Any]:
    async with http.post(f"{stack.url}/erp/payments", json={"vendor": "v-9", "amount": amount},
                         headers={"Authorization": f"Bearer {stack.token('invoice-bot')}"}) as response:
        return response.status, await response.json()


async def pending(http: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    """The pending approval, once it is listed (each admin round trip lets the held call progress)."""
    async with asyncio.timeout(10):
        while True:
            async with http.get(f"{stack.admin_url}/approvals?status=pending", headers=ADMIN) as response:
                found = (await response.json())["approvals"]
            if found:
                return dict(found[0])


async def admin_post(http: aiohttp.ClientSession, stack: Stack, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(f"{stack.admin_url}{path}", json=body, headers=ADMIN) as response:
        return response.status, await response.json()


async def test_pause_cuts_the_live_stream_refuses_new_calls_and_is_traced(
        slow_stack: Stack, http: aiohttp.ClientSession) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    body = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 500, "messages": [{"role": "user", "content": words}]}
    headers = {"Authorization": f"Bearer {slow_stack.token('invoice-bot')}"}
    async with http.post(f"{slow_stack.url}/openai/chat/completions", json=body, headers=headers) as stream:
        await stream.content.readuntil(b"\n\n")
        status, card = await admin_post(http, slow_stack, "/agents/invoice-bot/pause", {"reason": "looping"})
        assert (status, card["paused"]["by"], card["paused"]["reason"]) == (200, "admin", "looping")
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(1.0):
                while await stream.content.read(65536):
                    pass
    cut = await slow_stack.trace.wait_for(lambda e: e.get("upstream") == "openai")
    assert (cut["error"], cut["status"]) == ("agent_paused", 499)
    assert any("charged the reservation" in note for note in cut["limits"])  # a cut stream is still charged
    paused = await slow_stack.trace.wait_for(lambda e: e.get("kind") == "agent_paused")
    assert (paused["agent"], paused["reason"], paused["detail"]) == ("invoice-bot", "looping", {"by": "admin"})
    status, refused = await pay(http, slow_stack, 10)
    assert (status, refused["error"]["type"]) == (403, "agent_paused")
    assert "looping" in refused["error"]["message"]
    status, card = await admin_post(http, slow_stack, "/agents/invoice-bot/resume", {"reason": "fixed"})
    assert (status, card["paused"]) == (200, None)
    assert (await pay(http, slow_stack, 10))[0] == 201


async def test_pause_needs_a_reason_and_an_admin(stack: Stack, http: aiohttp.ClientSession) -> None:
    assert (await admin_post(http, stack, "/agents/invoice-bot/pause", {}))[0] == 400
    assert (await admin_post(http, stack, "/agents/nobody/pause", {"reason": "x"}))[0] == 404


async def test_approve_and_remember_lets_the_same_action_through_until_it_expires(
        stack: Stack, http: aiohttp.ClientSession) -> None:
    first = asyncio.create_task(pay(http, stack, 20000))
    approval = await pending(http, stack)
    status, decided = await admin_post(http, stack, f"/approvals/{approval['id']}/approve",
                                       {"reason": "vendor v-9 is trusted", "category": "policy_gap", "remember": "1h"})
    assert status == 200
    assert decided["remembered_until"] == pytest.approx(decided["decided_at"] + 3600)
    assert (await first)[0] == 201
    # Another amount, same agent and action (create payments): no hold while the grant lasts.
    assert (await pay(http, stack, 30000))[0] == 201
    event = await stack.trace.wait_for(lambda e: e.get("approval", {}).get("remembered_until") and
                                       e.get("status") == 201 and e["approval"].get("waited_ms") == 0.0)
    assert (event["decision"], event["approval"]["id"], event["approval"]["by"]) == ("hold", approval["id"], "admin")
    async with http.get(f"{stack.admin_url}/approvals?status=pending", headers=ADMIN) as response:
        assert (await response.json())["approvals"] == []


async def test_remember_is_refused_on_a_deny(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack, 20000))
    approval = await pending(http, stack)
    status, error = await admin_post(http, stack, f"/approvals/{approval['id']}/deny", {"remember": "1h"})
    assert (status, error["error"]["type"]) == (400, "bad_request")
    assert (await admin_post(http, stack, f"/approvals/{approval['id']}/deny", {"reason": "no"}))[0] == 200
    assert (await call)[0] == 403


async def test_new_pending_approval_is_posted_to_the_webhook_with_a_console_link(http: aiohttp.ClientSession) -> None:
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        received.put_nowait(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    stack = await start_stack(approval_webhook=f"http://127.0.0.1:{runner.addresses[0][1]}/hook",
                              console_url="https://gw.example/console")
    try:
        call = asyncio.create_task(pay(http, stack, 20000))
        async with asyncio.timeout(10):
            posted = await received.get()
        approval = await pending(http, stack)
        assert posted["type"] == "approval_pending"
        assert posted["approval"]["id"] == approval["id"]
        assert posted["approval"]["evidence"] == {"request.json.amount": 20000}
        assert posted["console_url"] == f"https://gw.example/console/#approval={approval['id']}"
        assert (await admin_post(http, stack, f"/approvals/{approval['id']}/deny", {"reason": "no"}))[0] == 200
        assert (await call)[0] == 403
    finally:
        await stack.gateway.close()
        await stack.fakes.close()
        await runner.cleanup()
