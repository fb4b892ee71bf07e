"""The gateway over a Redis that stops, pauses and returns: fail closed promptly, recover alone, charge once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import ADMIN_TOKEN, SECRET, RedisProcess

from gateway.classify.llm import prompt_tokens, text_size
from gateway.server import RunningGateway, start_gateway
from gateway.settings import Settings
from gateway.tokens import issue_token
from gateway.trace.sinks import MemorySink

MESSAGES = [{"role": "user", "content": "hello"}]
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
RULES = {
    "upstreams.yaml": """upstreams:
  strict:
    kind: openai
    url: "${UPSTREAM}"
  lenient:
    kind: openai
    url: "${UPSTREAM}"
    on_store_error: allow
""",
    "agents/bot.yaml": """agent: bot
allow:
  - {upstream: strict, verbs: [chat]}
  - {upstream: lenient, verbs: [chat]}
budgets:
  - {id: daily, tokens: 1000000, per: day}
loop_detection: false
""",
}


@dataclass
class Outage:
    gateway: RunningGateway
    redis: RedisProcess
    trace: MemorySink
    release: asyncio.Event  # the upstream answers only once this is set
    arrived: asyncio.Event  # set when a request reached the upstream
    requests: list[Any]


@pytest.fixture
async def outage(tmp_path: Path) -> AsyncIterator[Outage]:
    release, arrived, requests = asyncio.Event(), asyncio.Event(), []
    release.set()

    async def chat(request: web.Request) -> web.Response:
        requests.append(await request.json())
        arrived.set()
        await release.wait()
        return web.json_response({"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}], "usage": USAGE})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    for name, text in RULES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    redis = RedisProcess(persistent=True)
    redis.start()
    sink = MemorySink()
    settings = Settings(rules=str(tmp_path), port=0, admin_port=0, jwt_secret=SECRET, admin_token=ADMIN_TOKEN,
                        redis_url=redis.url, store_timeout=0.5, drain_timeout=5,
                        env={"UPSTREAM": f"http://127.0.0.1:{runner.addresses[0][1]}/v1"})
    gateway = await start_gateway(settings, sink=sink)
    try:
        yield Outage(gateway, redis, sink, release, arrived, requests)
    finally:
        release.set()
        if redis._paused:
            redis.resume()
        await gateway.close()
        redis.close()
        await runner.cleanup()


async def chat(outage: Outage, upstream: str = "strict") -> tuple[int, dict[str, Any]]:
    body = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {issue_token('bot', SECRET)}"}
    url = f"{outage.gateway.url}/{upstream}/chat/completions"
    async with (aiohttp.ClientSession() as http, asyncio.timeout(5),  # "promptly": never a hang
                http.post(url, json=body, headers=headers) as response):
        return response.status, orjson.loads(await response.read())


async def used_tokens(outage: Outage) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            f"{outage.gateway.admin_url}/agents/bot/usage",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as response:
        assert response.status == 200
        [budget] = (await response.json())["budgets"]
        used: int = budget["used"]
        return used


def settled_calls(outage: Outage, count: int) -> Any:
    """A predicate: `count` admitted calls have been traced (the trace event follows the settlement)."""
    return lambda _: len([e for e in outage.trace.events if e.get("status") == 200]) >= count


async def test_stopped_redis_fails_closed_and_recovers_by_itself(outage: Outage) -> None:
    assert (await chat(outage))[0] == 200
    await outage.trace.wait_for(settled_calls(outage, 1))  # settled before Redis goes away
    outage.redis.stop()
    status, body = await chat(outage)
    assert (status, body["error"]["type"]) == (503, "store_unavailable")
    assert len(outage.requests) == 1  # refused before forwarding
    await outage.trace.wait_for(lambda e: e.get("error") == "store_unavailable")
    outage.redis.start()  # same port, same data
    assert (await chat(outage))[0] == 200
    assert len(outage.requests) == 2
    # The agent gets its answer before the settlement round trip; the trace event follows the settlement.
    await outage.trace.wait_for(settled_calls(outage, 2))
    assert all(not e.get("limits") for e in outage.trace.events if e.get("status") == 200)
    assert await used_tokens(outage) == 2 * (USAGE["prompt_tokens"] + USAGE["completion_tokens"])


async def test_paused_redis_answers_store_unavailable_within_the_timeout(outage: Outage) -> None:
    outage.redis.pause()  # connections are accepted, nothing is ever answered
    status, body = await chat(outage)
    assert (status, body["error"]["type"]) == (503, "store_unavailable")
    outage.redis.resume()
    assert (await chat(outage))[0] == 200


async def test_on_store_error_allow_admits_unmetered_and_says_so(outage: Outage) -> None:
    outage.redis.stop()
    assert (await chat(outage, "lenient"))[0] == 200
    event = await outage.trace.wait_for(lambda e: e.get("upstream") == "lenient")
    assert event["status"] == 200
    assert any("on_store_error: allow" in note for note in event["limits"])
    assert (await chat(outage, "strict"))[0] == 503


async def test_settlement_missed_during_outage_applies_once_when_redis_returns(outage: Outage) -> None:
    outage.release.clear()
    call = asyncio.create_task(chat(outage))
    await outage.arrived.wait()  # reserved in Redis, now waiting on the upstream
    reserved = await used_tokens(outage)
    assert reserved == prompt_tokens(text_size(MESSAGES)) + 20  # the prompt estimate + max_tokens
    outage.redis.stop()
    outage.release.set()
    assert (await call)[0] == 200  # the agent is not held up by the store
    event = await outage.trace.wait_for(lambda e: e.get("upstream") == "strict" and e.get("status") == 200)
    assert any("queued" in note for note in event["limits"])
    assert outage.gateway.runtime.settler.pending == 1
    outage.redis.start()
    async with asyncio.timeout(15):  # the background retries back off from 0.5 s
        await outage.gateway.runtime.settler.wait_idle()
    assert outage.gateway.runtime.settler.pending == 0
    assert await used_tokens(outage) == USAGE["prompt_tokens"] + USAGE["completion_tokens"]
    # A second settlement of the same reservation can never apply: the marker is gone.
    assert await used_tokens(outage) == 10


async def test_agent_hanging_up_after_its_answer_is_still_settled(outage: Outage) -> None:
    """Closing the connection the moment the answer is complete must not cancel the settlement."""
    body = orjson.dumps({"model": "gpt-4o-mini", "max_tokens": 20, "messages": MESSAGES})
    reader, writer = await asyncio.open_connection("127.0.0.1", outage.gateway.agents_port)
    writer.write(b"POST /strict/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {issue_token('bot', SECRET)}\r\n".encode()
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
    writer.close()  # hang up at once
    await writer.wait_closed()
    event = await outage.trace.wait_for(lambda e: e.get("upstream") == "strict")
    assert (event["status"], event.get("error")) == (200, None)
    assert event["budget"]["used"] == USAGE["prompt_tokens"] + USAGE["completion_tokens"]
    assert await used_tokens(outage) == 10
