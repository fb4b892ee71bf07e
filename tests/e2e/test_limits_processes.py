"""Limits shared by separate gateway processes through one real Redis: the global limit holds, not N times it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from conftest import SECRET, UPSTREAM_KEYS, free_port

from gateway.classify.llm import prompt_tokens, text_size
from gateway.demo.fakes import FakeUpstreams, start_all
from gateway.tokens import issue_token

MESSAGES = [{"role": "user", "content": "Summarise invoice INV-7 for the AP team"}]
MAX_TOKENS = 10
RESERVATION = prompt_tokens(text_size(MESSAGES)) + MAX_TOKENS  # what one call reserves

UPSTREAMS = """upstreams:
  openai:
    kind: openai
    url: "${OPENAI_BASE_URL}"
    credential: {header: Authorization, value: "Bearer ${OPENAI_API_KEY}"}
"""


def write_rules(root: Path, limits: str) -> Path:
    (root / "agents").mkdir(parents=True)
    (root / "upstreams.yaml").write_text(UPSTREAMS)
    (root / "agents" / "bot.yaml").write_text(
        "agent: bot\nallow:\n  - {upstream: openai, verbs: [chat]}\nloop_detection: false\n" + limits)
    return root


@pytest.fixture
async def fakes() -> AsyncIterator[FakeUpstreams]:
    running = await start_all()
    yield running
    await running.close()


@contextmanager
def gateways(rules: Path, redis_url: str, fakes: FakeUpstreams, count: int, workers: int = 1,
             ) -> Iterator[list[int]]:
    """`count` gateway processes (each `--workers workers`) on their own ports, sharing one Redis."""
    env = {**os.environ, **UPSTREAM_KEYS, "OPENAI_BASE_URL": fakes.openai_url,
           "AGENT_GATEWAY_JWT_SECRET": SECRET.decode()}
    ports = [free_port() for _ in range(count)]
    logs = [rules.parent / f"gateway-{port}.log" for port in ports]
    procs = []
    for port, log in zip(ports, logs, strict=True):
        with log.open("wb") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--rules", str(rules), "--port", str(port),
                 "--admin-port", str(free_port()), "--trace", os.devnull, "--redis-url", redis_url,
                 "--workers", str(workers)], env=env, stderr=err))
    try:
        yield ports
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, log in zip(procs, logs, strict=True):
            assert proc.wait(timeout=30) == 0, log.read_text()


async def wait_ready(http: aiohttp.ClientSession, port: int) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/openai/models"):
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)  # the process is still starting: retry the connection


async def burst(ports: list[int], calls: int) -> list[int]:
    """`calls` concurrent chat calls spread over the gateways; their statuses."""
    headers = {"Authorization": f"Bearer {issue_token('bot', SECRET)}"}
    body = {"model": "gpt-4o-mini", "max_tokens": MAX_TOKENS, "messages": MESSAGES}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for port in ports:
            await wait_ready(http, port)

        async def call(i: int) -> int:
            url = f"http://127.0.0.1:{ports[i % len(ports)]}/openai/chat/completions"
            async with http.post(url, json=body, headers=headers) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(call(i) for i in range(calls))))


async def test_budget_covering_one_call_admits_one_across_three_processes(
        tmp_path: Path, redis_url: str, fakes: FakeUpstreams) -> None:
    rules = write_rules(tmp_path / "rules", f"budgets:\n  - {{tokens: {RESERVATION}, per: day}}\n")
    with gateways(rules, redis_url, fakes, 3) as ports:
        statuses = await burst(ports, 50)
    assert sorted(statuses) == [200] + [429] * 49
    assert len(fakes.openai.recorder.requests) == 1


async def test_rate_limit_admits_the_global_limit_across_three_processes(
        tmp_path: Path, redis_url: str, fakes: FakeUpstreams) -> None:
    rules = write_rules(tmp_path / "rules", "rate_limits:\n  - {requests: 10, per: hour}\n")
    with gateways(rules, redis_url, fakes, 3) as ports:
        statuses = await burst(ports, 30)
    assert sorted(statuses) == [200] * 10 + [429] * 20
    assert len(fakes.openai.recorder.requests) == 10


async def test_workers_share_one_rate_limit(tmp_path: Path, redis_url: str, fakes: FakeUpstreams) -> None:
    rules = write_rules(tmp_path / "rules", "rate_limits:\n  - {requests: 10, per: hour}\n")
    with gateways(rules, redis_url, fakes, 1, workers=3) as ports:
        statuses = await burst(ports, 30)
    assert sorted(statuses) == [200] * 10 + [429] * 20


def test_workers_refuse_to_start_without_redis(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules", "")
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--rules", str(rules), "--workers", "2"],
                            env={**os.environ, "AGENT_GATEWAY_JWT_SECRET": SECRET.decode(), "OPENAI_BASE_URL": "x"},
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "--workers 2 needs --redis-url" in result.stderr
