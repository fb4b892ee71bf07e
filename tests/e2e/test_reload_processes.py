"""Two gateway processes on one Redis converge on one rule version: reload and rollback reach every replica."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
from conftest import ADMIN_TOKEN, RULES, fake_env
from processes import GatewayProcess

from gateway.demo.fakes import start_all

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def state(http: aiohttp.ClientSession, gateway: GatewayProcess) -> dict[str, Any]:
    async with http.get(f"{gateway.admin_url}/rules", headers=ADMIN) as response:
        assert response.status == 200
        found: dict[str, Any] = await response.json()
        return found


async def until_version(http: aiohttp.ClientSession, gateway: GatewayProcess, version: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while (found := await state(http, gateway))["version"] != version:
            pass
    return found


async def test_reload_and_rollback_reach_every_replica(tmp_path: Path, redis_url: str) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    fakes = await start_all()
    extra = ("--redis-url", redis_url, "--rules-watch", "0")  # no watching: only the broadcast can move B
    a = GatewayProcess(rules, fake_env(fakes), tmp_path / "a.log", *extra)
    b = GatewayProcess(rules, fake_env(fakes), tmp_path / "b.log", *extra)
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession() as http:
            first = (await state(http, a))["version"]
            assert (await state(http, b))["version"] == first
            agent = rules / "agents" / "ops-bot.yaml"
            agent.write_text(agent.read_text().replace("mode: audit", "mode: assist"))
            async with http.post(f"{a.admin_url}/rules/reload", headers=ADMIN) as response:
                assert response.status == 200
                second = (await response.json())["version"]
            assert second != first
            b_state = await until_version(http, b, second)
            assert b_state["history"][0]["source"] == "replica"
            # Both replicas report the same version.
            async with asyncio.timeout(10):
                while {r["version"] for r in (await state(http, a))["replicas"]} != {second} or len(
                        (await state(http, a))["replicas"]) != 2:
                    pass
            async with http.post(f"{b.admin_url}/rules/rollback", json={"version": first}, headers=ADMIN) as response:
                assert response.status == 200
            assert (await until_version(http, a, first))["history"][0]["source"] == "replica"
    finally:
        for gateway in (a, b):
            gateway.stop()
        await fakes.close()


async def test_sighup_reloads_the_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    fakes = await start_all()
    gateway = GatewayProcess(rules, fake_env(fakes), tmp_path / "g.log", "--rules-watch", "0")
    try:
        await gateway.start()
        async with aiohttp.ClientSession() as http:
            first = (await state(http, gateway))["version"]
            agent = rules / "agents" / "ops-bot.yaml"
            agent.write_text(agent.read_text().replace("mode: audit", "mode: assist"))
            assert gateway.proc is not None
            gateway.proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(10):
                while (found := await state(http, gateway))["version"] == first:
                    pass
            assert found["history"][0]["source"] == "sighup"
    finally:
        gateway.stop()
        await fakes.close()
