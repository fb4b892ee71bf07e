"""Gateway processes sharing a real Redis Cluster: a budget holds exactly (no overshoot); a call held by one is
approved through another; a pause and a rules reload or rollback on one reach the other."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import RULES, fake_env
from processes import GatewayProcess
from test_approvals_processes import ADMIN, Pair, decide, one_approval, pay
from test_limits_processes import RESERVATION, burst, gateways, write_rules
from test_reload_processes import state, until_version

from gateway.approvals.redis_approvals import SAFETY_REREAD
from gateway.control import REFRESH_SECONDS
from gateway.demo.fakes import FakeUpstreams, start_all

SMALL_PAYMENT = {"vendor": "v-100", "amount": 500}  # allowed for invoice-bot without a hold


@pytest.fixture
async def fakes() -> AsyncIterator[FakeUpstreams]:
    running = await start_all()
    yield running
    await running.close()


async def test_budget_covering_one_call_admits_one_across_three_processes_on_a_cluster(
        tmp_path: Path, redis_cluster_url: str, fakes: FakeUpstreams) -> None:
    rules = write_rules(tmp_path / "rules", f"budgets:\n  - {{tokens: {RESERVATION}, per: day}}\n")
    with gateways(rules, redis_cluster_url, fakes, 3) as ports:
        statuses = await burst(ports, 50)
    assert sorted(statuses) == [200] + [429] * 49
    assert len(fakes.openai.recorder.requests) == 1


async def test_rate_limit_admits_the_global_limit_across_three_processes_on_a_cluster(
        tmp_path: Path, redis_cluster_url: str, fakes: FakeUpstreams) -> None:
    rules = write_rules(tmp_path / "rules", "rate_limits:\n  - {requests: 10, per: hour}\n")
    with gateways(rules, redis_cluster_url, fakes, 3) as ports:
        statuses = await burst(ports, 30)
    assert sorted(statuses) == [200] * 10 + [429] * 20
    assert len(fakes.openai.recorder.requests) == 10


# -- approvals, the kill switch and rule broadcasts between two processes on the cluster ---------------------------
@pytest.fixture
async def cluster_pair(tmp_path: Path, redis_cluster_url: str) -> AsyncIterator[Pair]:
    fakes = await start_all()
    env = fake_env(fakes)
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    extra = ("--redis-url", redis_cluster_url, "--rules-watch", "0")  # no watching: only a broadcast moves B
    a = GatewayProcess(rules, env, tmp_path / "a.log", *extra)
    b = GatewayProcess(rules, env, tmp_path / "b.log", *extra)
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession() as http:
            yield Pair(a, b, fakes, http)
    finally:
        codes = [gateway.stop() for gateway in (a, b)]
        await fakes.close()
    for gateway, code in zip((a, b), codes, strict=True):  # a clean shutdown: every Redis client closed
        log = gateway.log.read_text()
        assert (code, "Traceback" in log) == (0, False), log


async def test_call_held_by_a_is_approved_through_b_on_a_cluster(cluster_pair: Pair) -> None:
    pair = cluster_pair
    call = asyncio.create_task(pay(pair, pair.a))
    approval = await one_approval(pair, pair.b)
    assert (approval["agent"], approval["rule"]) == ("invoice-bot", "invoice-bot.yaml#hold[0]")
    assert (await decide(pair, pair.b, approval["id"], "approve"))[0] == 200
    async with asyncio.timeout(SAFETY_REREAD / 2):  # woken by the published decision, not the safety re-read
        status, body = await call
    assert (status, body["id"]) == (201, "pay-1")
    status, conflict = await decide(pair, pair.a, approval["id"], "approve")
    assert (status, conflict["error"]["type"]) == (409, "conflict")
    assert len(pair.fakes.http_tool.recorder.requests) == 1


async def test_pause_through_b_refuses_calls_on_a_on_a_cluster(cluster_pair: Pair) -> None:
    pair = cluster_pair
    async with pair.http.post(f"{pair.b.admin_url}/agents/invoice-bot/pause", json={"reason": "runaway costs"},
                              headers=ADMIN) as response:
        assert response.status == 200
    async with asyncio.timeout(REFRESH_SECONDS / 2):  # told by the published change, not the periodic re-read
        while (refused := await pay(pair, pair.a, SMALL_PAYMENT))[0] != 403:
            pass
    assert refused[1]["error"]["type"] == "agent_paused"
    async with pair.http.post(f"{pair.b.admin_url}/agents/invoice-bot/resume", json={}, headers=ADMIN) as response:
        assert response.status == 200
    async with asyncio.timeout(REFRESH_SECONDS / 2):
        while (await pay(pair, pair.a, SMALL_PAYMENT))[0] != 201:
            pass


async def test_reload_and_rollback_reach_every_replica_on_a_cluster(cluster_pair: Pair, tmp_path: Path) -> None:
    pair, http = cluster_pair, cluster_pair.http
    first = (await state(http, pair.a))["version"]
    assert (await state(http, pair.b))["version"] == first
    agent = tmp_path / "rules" / "agents" / "ops-bot.yaml"
    agent.write_text(agent.read_text().replace("mode: audit", "mode: assist"))
    async with http.post(f"{pair.a.admin_url}/rules/reload", headers=ADMIN) as response:
        assert response.status == 200
        second = (await response.json())["version"]
    assert second != first
    assert (await until_version(http, pair.b, second))["history"][0]["source"] == "replica"
    async with asyncio.timeout(10):  # both replicas report the version they serve
        while sorted(r["version"] for r in (await state(http, pair.a))["replicas"]) != [second, second]:
            pass
    async with http.post(f"{pair.b.admin_url}/rules/rollback", json={"version": first}, headers=ADMIN) as response:
        assert response.status == 200
    assert (await until_version(http, pair.a, first))["history"][0]["source"] == "replica"
