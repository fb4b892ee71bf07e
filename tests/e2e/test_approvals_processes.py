"""Approvals and the kill switch across two gateway processes sharing one real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, RULES, SECRET, fake_env
from processes import GatewayProcess

from gateway.demo.fakes import FakeUpstreams, start_all
from gateway.tokens import issue_token

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PAYMENT = {"vendor": "v-100", "amount": 25000}  # held by invoice-bot.yaml#hold[0]


@dataclass
class Pair:
    a: GatewayProcess
    b: GatewayProcess
    fakes: FakeUpstreams
    http: aiohttp.ClientSession


@pytest.fixture
async def pair(tmp_path: Path, redis_url: str) -> AsyncIterator[Pair]:
    fakes = await start_all(chunk_delay=0.2)
    env = fake_env(fakes)
    extra = ("--redis-url", redis_url, "--approval-lease", "2")
    a = GatewayProcess(RULES, env, tmp_path / "a.log", *extra)
    b = GatewayProcess(RULES, env, tmp_path / "b.log", *extra)
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession() as http:
            yield Pair(a, b, fakes, http)
    finally:
        for gateway in (a, b):
            gateway.stop()
        await fakes.close()


def agent_headers(agent: str = "invoice-bot") -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(agent, SECRET)}"}


async def pay(pair: Pair, gateway: GatewayProcess, body: dict[str, Any] = PAYMENT) -> tuple[int, Any]:
    async with pair.http.post(f"{gateway.url}/erp/payments", json=body, headers=agent_headers()) as response:
        return response.status, await response.json()


async def approvals(pair: Pair, gateway: GatewayProcess, status: str) -> list[dict[str, Any]]:
    async with pair.http.get(f"{gateway.admin_url}/approvals?status={status}", headers=ADMIN) as response:
        assert response.status == 200
        found: list[dict[str, Any]] = (await response.json())["approvals"]
        return found


async def one_approval(pair: Pair, gateway: GatewayProcess, status: str = "pending") -> dict[str, Any]:
    """The single approval in that status, as soon as this replica's admin API sees it (no sleeps)."""
    async with asyncio.timeout(15):
        while not (found := await approvals(pair, gateway, status)):
            pass
    [approval] = found
    return approval


async def decide(pair: Pair, gateway: GatewayProcess, approval_id: str, verdict: str,
                 headers: dict[str, str] = ADMIN) -> tuple[int, Any]:
    async with pair.http.post(f"{gateway.admin_url}/approvals/{approval_id}/{verdict}",
                              json={"reason": "checked", "category": "edge_case"}, headers=headers) as response:
        return response.status, await response.json()


async def test_call_held_by_a_is_approved_through_b_and_completes(pair: Pair) -> None:
    call = asyncio.create_task(pay(pair, pair.a))
    approval = await one_approval(pair, pair.b)
    assert (approval["agent"], approval["rule"], approval["evidence"]) == (
        "invoice-bot", "invoice-bot.yaml#hold[0]", {"request.json.amount": 25000})
    assert (await decide(pair, pair.b, approval["id"], "approve"))[0] == 200
    # Woken by pub/sub: well inside the 5 s safety re-read.
    async with asyncio.timeout(3):
        status, body = await call
    assert (status, body["id"]) == (201, "pay-1")
    status, conflict = await decide(pair, pair.a, approval["id"], "approve")
    assert (status, conflict["error"]["type"]) == (409, "conflict")
    assert len(pair.fakes.http_tool.recorder.requests) == 1


async def test_call_held_by_a_is_denied_through_b(pair: Pair) -> None:
    call = asyncio.create_task(pay(pair, pair.a))
    approval = await one_approval(pair, pair.b)
    assert (await decide(pair, pair.b, approval["id"], "deny"))[0] == 200
    async with asyncio.timeout(3):
        status, body = await call
    assert (status, body["error"]["type"], body["error"]["rule"]) == (
        403, "approval_denied", "invoice-bot.yaml#hold[0]")
    assert pair.fakes.http_tool.recorder.requests == []


async def test_approval_after_the_holder_died_lets_the_identical_retry_through_once(pair: Pair) -> None:
    call = asyncio.create_task(pay(pair, pair.a))
    held = await one_approval(pair, pair.b)
    pair.a.kill()  # the holding process crashes
    with pytest.raises(aiohttp.ClientError):
        await call
    abandoned = await one_approval(pair, pair.b, "abandoned")  # its lease ran out
    assert abandoned["id"] == held["id"]
    assert (await decide(pair, pair.b, held["id"], "approve"))[0] == 200
    # Another body is not covered: held afresh, and denied here.
    other = asyncio.create_task(pay(pair, pair.b, {**PAYMENT, "amount": 25001}))
    fresh = await one_approval(pair, pair.b)
    assert fresh["id"] != held["id"]
    assert (await decide(pair, pair.b, fresh["id"], "deny"))[0] == 200
    assert (await other)[0] == 403
    # The identical retry passes without a second hold, on any replica, exactly once.
    assert (await pay(pair, pair.b))[0] == 201
    again = asyncio.create_task(pay(pair, pair.b))
    third = await one_approval(pair, pair.b)
    assert third["id"] not in (held["id"], fresh["id"])
    assert (await decide(pair, pair.b, third["id"], "deny"))[0] == 200
    assert (await again)[0] == 403
    assert [r.json()["amount"] for r in pair.fakes.http_tool.recorder.requests] == [25000]


async def test_pause_through_b_cuts_a_live_stream_on_a_within_a_second(pair: Pair) -> None:
    words = " ".join(f"word{i}" for i in range(100))  # the fake streams a word every 0.2 s: ~20 s in all
    body = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 500,
            "messages": [{"role": "user", "content": words}]}
    async with pair.http.post(f"{pair.a.url}/openai/chat/completions", json=body,
                              headers=agent_headers()) as stream:
        assert stream.status == 200
        await stream.content.readuntil(b"\n\n")  # the stream is live
        async with pair.http.post(f"{pair.b.admin_url}/agents/invoice-bot/pause", json={"reason": "runaway costs"},
                                  headers=ADMIN) as response:
            assert response.status == 200
            assert (await response.json())["paused"]["reason"] == "runaway costs"
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(1.0):
                while await stream.content.read(65536):  # drain until the gateway cuts the connection
                    pass
    status, refused = await pay(pair, pair.a)
    assert (status, refused["error"]["type"]) == (403, "agent_paused")
    async with pair.http.post(f"{pair.a.admin_url}/agents/invoice-bot/resume", json={}, headers=ADMIN) as response:
        assert response.status == 200
    async with asyncio.timeout(2):
        while (await pay_small(pair, pair.b))[0] != 201:
            pass


async def pay_small(pair: Pair, gateway: GatewayProcess) -> tuple[int, Any]:
    return await pay(pair, gateway, {"vendor": "v-100", "amount": 10})


async def test_admin_roles_are_enforced_on_every_replica(pair: Pair) -> None:
    token = issue_token("alice", SECRET, audience="agent-gateway-admin", extra={"role": "approver"})
    approver = {"Authorization": f"Bearer {token}"}
    for headers in ({}, agent_headers()):
        async with pair.http.get(f"{pair.b.admin_url}/approvals", headers=headers) as response:
            assert response.status == 401
    async with pair.http.post(f"{pair.b.admin_url}/agents/invoice-bot/pause", json={"reason": "x"},
                              headers=approver) as response:
        assert (response.status, (await response.json())["error"]["type"]) == (403, "forbidden")
    call = asyncio.create_task(pay(pair, pair.a))
    approval = await one_approval(pair, pair.b)
    status, decided = await decide(pair, pair.b, approval["id"], "approve", approver)
    assert (status, decided["decided_by"]) == (200, "alice")
    assert (await call)[0] == 201
