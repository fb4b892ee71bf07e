"""relay: a stream reaches the agent byte for byte (less the usage event it did not ask for), however it arrives;
is cut off when the upstream breaks off or stalls; and an agent that stops reading holds the upstream back."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import Stack, start_stack

from gateway.demo.fakes import Recorder, start_app
from gateway.demo.fakes.recording import open_sse, recording_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def event(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def content(text: str) -> bytes:
    return event({"id": "c1", "object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


USAGE = event({"id": "c1", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
DONE = b"data: [DONE]\n\n"
STREAM = content("Hel") + content("lo") + USAGE + DONE


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@asynccontextmanager
async def gateway_to(tmp_path: Path, chat: Handler, read_timeout: float | None = None) -> AsyncIterator[Stack]:
    """A gateway in front of a local OpenAI-like upstream answering with `chat`; agent `bot` has a token budget,
    so the gateway asks the upstream for usage in streams."""
    recorder = Recorder()
    app = recording_app(recorder)
    app.router.add_post("/v1/chat/completions", chat)
    fake = await start_app(app, recorder)
    rules = tmp_path / "rules"
    (rules / "agents").mkdir(parents=True)
    timeout = f", read_timeout: {read_timeout}" if read_timeout is not None else ""
    (rules / "upstreams.yaml").write_text(f"upstreams:\n  local: {{kind: openai, url: '{fake.url}/v1'{timeout}}}\n")
    (rules / "agents" / "bot.yaml").write_text(
        "agent: bot\nallow:\n  - {upstream: local, verbs: [chat]}\n"
        "budgets:\n  - {id: daily, tokens: 1000000, per: day}\nloop_detection: false\n")
    stack = await start_stack(rules)
    try:
        yield stack
    finally:
        await stack.gateway.close()
        await stack.fakes.close()
        await fake.close()


def chat(http: aiohttp.ClientSession, stack: Stack, include_usage: bool = False) -> Any:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 50, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return http.post(f"{stack.url}/local/chat/completions", json=body,
                     headers={"Authorization": f"Bearer {stack.token('bot')}"})


async def call_event(stack: Stack) -> dict[str, Any]:
    return await stack.trace.wait_for(lambda e: e.get("agent") == "bot" and "kind" not in e)


@pytest.mark.parametrize("upstream_length", [False, True])
@pytest.mark.parametrize("agent_asks", [False, True])
async def test_stream_arriving_whole_is_passed_on_as_the_same_stream(
        tmp_path: Path, http: aiohttp.ClientSession, upstream_length: bool, agent_asks: bool) -> None:
    async def whole(request: web.Request) -> web.StreamResponse:
        response = web.Response(body=STREAM, content_type="text/event-stream")  # headers and body in one write
        if not upstream_length:
            response.enable_chunked_encoding()
        return response

    async with gateway_to(tmp_path, whole) as stack:
        async with chat(http, stack, include_usage=agent_asks) as resp:
            status, headers, body = resp.status, resp.headers, await resp.read()
        traced = await call_event(stack)
    assert status == 200
    assert body == (STREAM if agent_asks else content("Hel") + content("lo") + DONE)
    if upstream_length and agent_asks:  # nothing taken out: the upstream's own length
        assert headers["Content-Length"] == str(len(STREAM))
    else:
        assert headers["Transfer-Encoding"] == "chunked"
    assert traced["tokens"] == {"input": 7, "output": 3}


async def test_stream_events_pass_on_as_they_arrive_and_a_split_usage_event_is_hidden(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    got_first = asyncio.Event()
    half = len(USAGE) // 2

    async def pieces(request: web.Request) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(content("Hel"))
        await got_first.wait()  # the agent has the first event before the upstream sends the rest
        for piece in (content("lo") + USAGE[:half], USAGE[half:], DONE):
            await response.write(piece)
        await response.write_eof()
        return response

    async with gateway_to(tmp_path, pieces) as stack:
        try:
            async with chat(http, stack) as resp:
                async with asyncio.timeout(5):
                    first = await resp.content.readuntil(b"\n\n")
                got_first.set()
                rest = await resp.read()
        finally:
            got_first.set()
        traced = await call_event(stack)
    assert (first, rest) == (content("Hel"), content("lo") + DONE)
    assert traced["tokens"] == {"input": 7, "output": 3}


@pytest.mark.parametrize("failure", ["broken", "stalled"])
async def test_upstream_failing_mid_stream_cuts_the_agent_off(
        tmp_path: Path, http: aiohttp.ClientSession, failure: str) -> None:
    got_first = asyncio.Event()
    finish = asyncio.Event()

    async def failing(request: web.Request) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(content("Hel"))
        await got_first.wait()
        if failure == "broken":
            assert request.transport is not None
            request.transport.abort()
        await finish.wait()  # the stalled one sends nothing more; the gateway gives up on it
        return response

    async with gateway_to(tmp_path, failing, read_timeout=0.3) as stack:
        try:
            async with chat(http, stack) as resp:
                async with asyncio.timeout(5):
                    first = await resp.content.readuntil(b"\n\n")
                got_first.set()
                with pytest.raises(aiohttp.ClientPayloadError):  # not a clean end that passes for a whole answer
                    await resp.read()
            traced = await call_event(stack)
        finally:
            got_first.set()
            finish.set()
    assert first == content("Hel")
    assert traced["error"] == {"broken": "upstream_error", "stalled": "upstream_timeout"}[failure]


async def test_agent_that_stops_reading_holds_the_upstream_back(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    piece = content("x" * 65000)
    count = 1024  # 64 MiB: far more than the socket buffers and the gateway's own can hold between them
    sent = 0
    finished = asyncio.Event()

    async def flood(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = await open_sse(request)
        for _ in range(count):
            await response.write(piece)
            sent += len(piece)
        await response.write(DONE)
        await response.write_eof()
        finished.set()
        return response

    async with gateway_to(tmp_path, flood) as stack:
        async with chat(http, stack) as resp:
            assert resp.status == 200
            with pytest.raises(TimeoutError):  # the agent reads nothing: the upstream cannot finish, however long
                async with asyncio.timeout(1.0):
                    await finished.wait()
            assert sent < count * len(piece)
            digest = hashlib.sha256()
            async for data in resp.content.iter_any():
                digest.update(data)
        assert finished.is_set()
    assert digest.digest() == hashlib.sha256(piece * count + DONE).digest()
