"""Budgets over streams (usage asked for, hidden, missing, cut off by the agent) and budget alerts to a webhook,
against a real gateway (memory store), the fake OpenAI upstream and small local upstreams on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from conftest import Stack, start_stack

from gateway.demo.fakes import Handler, Recorder, start_app
from gateway.demo.fakes.recording import open_sse, recording_app, sse_event

UPSTREAMS = """\
upstreams:
  openai:
    kind: openai
    url: "${OPENAI_BASE_URL}"
    credential: {header: Authorization, value: "Bearer ${OPENAI_API_KEY}"}
    prices:
      gpt-4o-mini: {input_per_mtok: 0.15, output_per_mtok: 0.60}
"""
HELLO = "hello there"
MESSAGES: Any = [{"role": "user", "content": HELLO}]
# The gateway's prompt estimate for MESSAGES: their strings ("user" + HELLO, 15 chars) // 4 + 1.
ESTIMATE = 4
# The fake's usage for HELLO: one token a word, of the prompt (2) and of its reply "echo: hello there" (3).
USED_IN, USED_OUT = 2, 3
BUDGET = "budgets:\n  - {id: daily, tokens: 1000, per: day}\nloop_detection: false\n"


def write_rules(root: Path, agents: dict[str, str], upstreams: dict[str, str] | None = None) -> Path:
    """UPSTREAMS plus local openai-kind `upstreams` (name -> URL); each agent may chat on `upstream` or openai."""
    (root / "agents").mkdir(parents=True)
    local = "".join(f"  {name}:\n    kind: openai\n    url: {url}\n" for name, url in (upstreams or {}).items())
    (root / "upstreams.yaml").write_text(UPSTREAMS + local)
    for name, body in agents.items():
        (root / "agents" / f"{name}.yaml").write_text(f"agent: {name}\n{body}")
    return root


def allow(upstream: str = "openai") -> str:
    return f"allow:\n  - {{upstream: {upstream}, verbs: [chat]}}\n"


@asynccontextmanager
async def running(rules: Path, **overrides: object) -> AsyncIterator[Stack]:
    stack = await start_stack(rules, **overrides)
    try:
        yield stack
    finally:
        await stack.gateway.close()
        await stack.fakes.close()


@asynccontextmanager
async def local_upstream(chat: Handler) -> AsyncIterator[tuple[str, Recorder]]:
    """An OpenAI-like upstream answering chat completions with `chat`: (its /v1 URL, what it received)."""
    recorder = Recorder()
    app = recording_app(recorder)
    app.router.add_post("/v1/chat/completions", chat)
    fake = await start_app(app, recorder)
    try:
        yield f"{fake.url}/v1", recorder
    finally:
        await fake.close()


def chunk(content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    return sse_event({"id": "chatcmpl-local", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini",
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def used(http: aiohttp.ClientSession, stack: Stack, agent: str) -> Any:
    """The agent's first budget's `used`, from the admin usage endpoint."""
    async with http.get(f"{stack.admin_url}/agents/{agent}/usage", headers=stack.admin_headers) as resp:
        assert resp.status == 200
        return (await resp.json())["budgets"][0]["used"]


async def call_event(stack: Stack, agent: str) -> dict[str, Any]:
    """The agent's one call's trace event, written once the call is over and settled."""
    event: dict[str, Any] = await stack.trace.wait_for(lambda e: e.get("agent") == agent and "kind" not in e)
    return event


def midnight() -> float:
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day + timedelta(days=1)).timestamp()


# -- usage in streams ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agent_asks", [False, True])
async def test_stream_usage_requested_upstream_and_shown_only_when_agent_asked(
        tmp_path: Path, http: aiohttp.ClientSession, agent_asks: bool) -> None:
    extra: Any = {"stream_options": {"include_usage": True}} if agent_asks else {}
    async with running(write_rules(tmp_path, {"stream-bot": allow() + BUDGET})) as stack, openai.AsyncOpenAI(
            base_url=stack.url + "/openai", api_key=stack.token("stream-bot"), max_retries=0) as client:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50,
                                                      stream=True, **extra)
        async with stream:
            chunks = [c async for c in stream]
        event = await call_event(stack, "stream-bot")
        charged = await used(http, stack, "stream-bot")
        sent = stack.fakes.openai.recorder.last().json()
    assert sent["stream_options"] == {"include_usage": True}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello there"
    with_usage = [c for c in chunks if c.usage is not None]
    if agent_asks:
        assert [(c.choices, c.usage.prompt_tokens, c.usage.completion_tokens) for c in with_usage if c.usage] == [
            ([], USED_IN, USED_OUT)]
        assert chunks[-1] is with_usage[0]
    else:
        assert with_usage == []
        assert all(c.choices for c in chunks)
    assert event["tokens"] == {"input": USED_IN, "output": USED_OUT}
    assert charged == USED_IN + USED_OUT


async def test_stream_without_usage_charged_reservation(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async def bare(request: web.Request) -> web.StreamResponse:
        resp = await open_sse(request)  # never any usage, whatever the request asks for
        for part in (chunk("echo: "), chunk("hi"), chunk(None, "stop"), b"data: [DONE]\n\n"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async with local_upstream(bare) as (url, recorder), running(
            write_rules(tmp_path, {"bare-bot": allow("bare") + BUDGET}, {"bare": url})) as stack:
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50, "stream": True}
        headers = {"Authorization": f"Bearer {stack.token('bare-bot')}"}
        async with http.post(f"{stack.url}/bare/chat/completions", json=body, headers=headers) as resp:
            status, text = resp.status, await resp.read()
        event = await call_event(stack, "bare-bot")
        charged = await used(http, stack, "bare-bot")
        sent = recorder.last().json()
    assert status == 200
    assert text == chunk("echo: ") + chunk("hi") + chunk(None, "stop") + b"data: [DONE]\n\n"
    assert sent["stream_options"] == {"include_usage": True}
    assert charged == ESTIMATE + 50
    assert event["limits"] == ["the response carried no usage: charged the reservation"]
    assert "tokens" not in event


async def test_stream_cut_by_agent_charged_reservation(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    release = asyncio.Event()

    async def gated(request: web.Request) -> web.StreamResponse:
        resp = await open_sse(request)
        await resp.write(chunk("first"))
        await release.wait()
        with contextlib.suppress(ConnectionResetError):  # the gateway has hung up by now
            await resp.write(chunk(None, "stop") + b"data: [DONE]\n\n")
            await resp.write_eof()
        return resp

    async with local_upstream(gated) as (url, _), running(
            write_rules(tmp_path, {"gone-bot": allow("gated") + BUDGET}, {"gated": url})) as stack:
        try:
            body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50, "stream": True}
            headers = {"Authorization": f"Bearer {stack.token('gone-bot')}"}
            async with http.post(f"{stack.url}/gated/chat/completions", json=body, headers=headers) as resp:
                first = await resp.content.readuntil(b"\n\n")
                resp.close()
            event = await call_event(stack, "gone-bot")
            charged = await used(http, stack, "gone-bot")
        finally:
            release.set()
    assert first == chunk("first")
    assert (event["error"], event["status"]) == ("client_disconnected", 499)
    assert event["limits"] == ["the agent hung up mid-response: charged the reservation"]
    assert charged == ESTIMATE + 50


async def test_stream_with_crlf_events_passed_on_as_they_arrive_without_usage(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # SSE allows CRLF line ends (sse-starlette, behind many OpenAI-compatible servers, uses them).
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\r\n\r\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":9}}\r\n\r\n'
    rest = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\n\r\n'
    read_first = asyncio.Event()

    async def crlf(request: web.Request) -> web.StreamResponse:
        resp = await open_sse(request)
        await resp.write(first)
        await read_first.wait()  # the agent must get each event as it comes, not at the end of the stream
        await resp.write(rest + usage + b"data: [DONE]\r\n\r\n")
        await resp.write_eof()
        return resp

    async with local_upstream(crlf) as (url, _), running(
            write_rules(tmp_path, {"crlf-bot": allow("crlf") + BUDGET}, {"crlf": url})) as stack:
        try:
            body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50, "stream": True}
            headers = {"Authorization": f"Bearer {stack.token('crlf-bot')}"}
            async with http.post(f"{stack.url}/crlf/chat/completions", json=body, headers=headers) as resp:
                async with asyncio.timeout(5):
                    got_first = await resp.content.readuntil(b"\r\n\r\n")
                read_first.set()
                got_rest = await resp.read()
            charged = await used(http, stack, "crlf-bot")
        finally:
            read_first.set()
    assert (got_first, got_rest) == (first, rest + b"data: [DONE]\r\n\r\n")
    assert charged == 7 + 9


# -- budget alerts ---------------------------------------------------------------------------------------------------
class AlertReceiver:
    """A webhook on loopback: answers 500 to the first `failures` posts, then accepts and keeps each alert."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts = 0
        self.alerts: list[Any] = []
        self._arrived: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)  # n -> n alerts are in

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.failures:
            return web.Response(status=500)
        self.alerts.append(await request.json())
        self._arrived[len(self.alerts)].set()
        return web.Response(status=204)

    async def arrived(self, count: int) -> None:
        async with asyncio.timeout(10):
            await self._arrived[count].wait()


@asynccontextmanager
async def receiving(receiver: AlertReceiver) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/alerts", receiver.handle)
    fake = await start_app(app, Recorder())
    try:
        yield f"{fake.url}/alerts"
    finally:
        await fake.close()


async def chat(http: aiohttp.ClientSession, stack: Stack, agent: str) -> None:
    """One call reserving ESTIMATE + 1 = 5 tokens and settling to the fake's 2 + 3 = 5; returns once settled."""
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 1}
    async with http.post(f"{stack.url}/openai/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {stack.token(agent)}"}) as resp:
        assert resp.status == 200
    trace_id = resp.headers["x-agent-gateway-trace-id"]
    await stack.trace.wait_for(lambda e: e["trace_id"] == trace_id)


def alerts_traced(stack: Stack) -> list[Any]:
    return [(e["detail"]["threshold"], e["budget"]["used"]) for e in stack.trace.events
            if e.get("kind") == "budget_alert"]


async def test_budget_alert_posted_once_per_threshold_crossed(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    budget = "budgets:\n  - {id: alerting, tokens: 20, per: day, alert_at: [0.5, 1.0]}\nloop_detection: false\n"
    receiver = AlertReceiver()
    async with receiving(receiver) as webhook, running(write_rules(tmp_path, {"alert-bot": allow() + budget}),
                                                       alert_webhook=webhook) as stack:
        await chat(http, stack, "alert-bot")  # 5 of 20
        assert alerts_traced(stack) == []
        await chat(http, stack, "alert-bot")  # 10: crosses 50%
        await receiver.arrived(1)
        await chat(http, stack, "alert-bot")  # 15: nothing new
        assert alerts_traced(stack) == [(0.5, 10)]
        await chat(http, stack, "alert-bot")  # 20: crosses 100%
        await receiver.arrived(2)
        half = next(e for e in stack.trace.events if e.get("kind") == "budget_alert")
    today = f"{datetime.now(UTC):%Y-%m-%d}"
    state = {"id": "alerting", "unit": "tokens", "limit": 20, "window": today, "resets_at": midnight()}
    # Deliveries go out in order from one queue: a stray alert after the third call would sit between these two.
    assert receiver.alerts == [
        {"type": "budget_alert", "agent": "alert-bot", "budget": {**state, "used": 10}, "threshold": 0.5},
        {"type": "budget_alert", "agent": "alert-bot", "budget": {**state, "used": 20}, "threshold": 1.0}]
    assert alerts_traced(stack) == [(0.5, 10), (1.0, 20)]
    assert (half["agent"], half["reason"]) == ("alert-bot", f"budget alerting reached 50% of its limit for {today}")


async def test_budget_alert_delivered_once_after_webhook_failures(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    budget = "budgets:\n  - {id: once, tokens: 10, per: day, alert_at: [0.5]}\n"
    receiver = AlertReceiver(failures=2)
    async with receiving(receiver) as webhook:
        async with running(write_rules(tmp_path, {"alert-bot": allow() + budget}), alert_webhook=webhook) as stack:
            await chat(http, stack, "alert-bot")  # 5 of 10: crosses 50%
            await receiver.arrived(1)  # after two 500s and back-offs of 0.5 s and 1 s
        # The gateway is closed (its delivery worker finished): nothing more can arrive.
        assert (receiver.attempts, len(receiver.alerts)) == (3, 1)
    assert (receiver.alerts[0]["threshold"], receiver.alerts[0]["budget"]["used"]) == (0.5, 5)
    assert [e for e in stack.trace.events if e.get("kind") == "alert_undelivered"] == []
