"""The official `openai` client as the agent: allowed, denied, unauthenticated and held calls, and streaming."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from conftest import ADMIN_TOKEN, RULES, SECRET, Stack, fake_env

from gateway.demo.fakes import Recorded, start_all
from gateway.server import RunningGateway, start_gateway
from gateway.settings import Settings
from gateway.tokens import issue_token
from gateway.trace.sinks import MemorySink

UPSTREAM_KEY = "Bearer sk-upstream-openai"
# Prices from rules/upstreams.yaml, USD per million tokens.
GPT_4O_MINI = (0.15, 0.60)
EMBEDDING_3_SMALL = (0.02, 0.0)


def cost(prices: tuple[float, float], prompt: int, completion: int) -> float:
    return round((prompt * prices[0] + completion * prices[1]) / 1e6, 8)


def assert_upstream_auth(seen: Recorded, agent_jwt: str) -> None:
    assert seen.headers["authorization"] == UPSTREAM_KEY
    assert "x-api-key" not in seen.headers
    assert all(agent_jwt not in value for value in seen.headers.values())


def upstream_trace_id(seen: Recorded) -> str:
    version, trace_id, span_id, flags = seen.headers["traceparent"].split("-")
    assert (version, len(trace_id), len(span_id), flags) == ("00", 32, 16, "01")
    return trace_id


async def test_chat_completion_allowed_for_permitted_model(stack: Stack) -> None:
    jwt = stack.token("invoice-bot")
    async with openai.AsyncOpenAI(base_url=stack.url + "/openai", api_key=jwt, max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
        )
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 3)
    seen = stack.fakes.openai.recorder.last()
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.json()["model"] == "gpt-4o-mini"
    assert_upstream_auth(seen, jwt)
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "openai", limit=10)
    assert event["trace_id"] == upstream_trace_id(seen)
    assert event["span_id"] == seen.headers["traceparent"].split("-")[2]
    assert (event["agent"], event["method"], event["path"]) == ("invoice-bot", "POST", "/openai/chat/completions")
    assert (event["verb"], event["resource"], event["model"]) == ("chat", "gpt-4o-mini", "gpt-4o-mini")
    assert (event["decision"], event["rule"], event["mode"]) == ("allow", "invoice-bot.yaml#allow[0]", "assist")
    assert event["policy_version"] == stack.gateway.runtime.policy.version
    assert event["policy_version"].startswith("sha256:")
    assert event["evidence"] == {"request.json.model": "gpt-4o-mini"}
    assert event["status"] == 200
    assert event["tokens"] == {"input": 2, "output": 3}
    assert event["cost_usd"] == cost(GPT_4O_MINI, 2, 3)
    assert "error" not in event


async def test_chat_completion_allowed_with_sync_client(stack: Stack) -> None:
    jwt = stack.token("invoice-bot")

    def call() -> str | None:
        with openai.OpenAI(base_url=stack.url + "/openai", api_key=jwt, max_retries=0) as client:
            completion = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "from a thread"}]
            )
        return completion.choices[0].message.content

    assert await asyncio.to_thread(call) == "echo: from a thread"
    seen = stack.fakes.openai.recorder.last()
    assert_upstream_auth(seen, jwt)
    assert seen.headers["user-agent"] == f"OpenAI/Python {openai.__version__}"
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "openai", limit=10)
    assert (event["decision"], event["rule"], event["status"]) == ("allow", "invoice-bot.yaml#allow[0]", 200)
    assert event["trace_id"] == upstream_trace_id(seen)
    assert event["tokens"] == {"input": 3, "output": 4}
    assert event["cost_usd"] == cost(GPT_4O_MINI, 3, 4)


async def test_chat_stream_with_usage_is_allowed_and_accounted(stack: Stack) -> None:
    jwt = stack.token("invoice-bot")
    async with openai.AsyncOpenAI(base_url=stack.url + "/openai", api_key=jwt, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream me please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: stream me please"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 4)
    seen = stack.fakes.openai.recorder.last()
    assert seen.json()["stream_options"] == {"include_usage": True}
    assert_upstream_auth(seen, jwt)
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "openai", limit=10)
    assert event["trace_id"] == upstream_trace_id(seen)
    assert (event["decision"], event["rule"], event["stream"]) == ("allow", "invoice-bot.yaml#allow[0]", True)
    assert event["evidence"] == {"request.json.model": "gpt-4o-mini"}
    assert event["tokens"] == {"input": 3, "output": 4}
    assert event["cost_usd"] == cost(GPT_4O_MINI, 3, 4)


async def test_chat_stream_with_sync_client_yields_every_chunk(stack: Stack) -> None:
    jwt = stack.token("invoice-bot")

    def call() -> list[Any]:
        with openai.OpenAI(base_url=stack.url + "/openai", api_key=jwt, max_retries=0) as client:
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "sync stream"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            with stream:
                return list(stream)

    chunks = await asyncio.to_thread(call)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: sync stream"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "openai", limit=10)
    assert (event["decision"], event["stream"], event["tokens"]) == ("allow", True, {"input": 2, "output": 3})
    assert event["cost_usd"] == cost(GPT_4O_MINI, 2, 3)


async def test_chat_continues_agent_traceparent(stack: Stack) -> None:
    agent_trace, agent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    jwt = stack.token("invoice-bot")
    async with openai.AsyncOpenAI(base_url=stack.url + "/openai", api_key=jwt, max_retries=0) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "traced"}],
            extra_headers={"traceparent": f"00-{agent_trace}-{agent_span}-01"},
        )
    seen = stack.fakes.openai.recorder.last()
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "openai", limit=10)
    assert upstream_trace_id(seen) == agent_trace
    assert event["trace_id"] == agent_trace
    assert seen.headers["traceparent"] == f"00-{agent_trace}-{event['span_id']}-01"
    assert event["span_id"] != agent_span


async def test_chat_denied_for_model_not_allowed(stack: Stack) -> None:
    jwt = stack.token("invoice-bot")
    async with openai.AsyncOpenAI(base_url=stack.url + "/openai", api_key=jwt, max_retries=0) as client:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    error = caught.value
    assert error.status_code == 403
    assert isinstance(error.body, dict)
    assert error.body["type"] == "policy_denied"
    assert error.body["rule"] == "default"
    assert error.body["message"] == "no rule allows 'chat' on 'openai/gpt-4o' for agent 'invoice-bot'"
    assert error.type == "policy_denied"
    assert stack.fakes.openai.recorder.requests == []
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "openai", limit=10)
    assert error.body["trace_id"] == event["trace_id"]
    assert error.response.headers["x-agent-gateway-trace-id"] == event["trace_id"]
    assert (event["decision"], event["rule"], event["error"], event["status"]) == (
        "deny", "default", "policy_denied", 403)
    assert (event["verb"], event["resource"], event["model"]) == ("chat", "gpt-4o", "gpt-4o")
    assert "evidence" not in event  # the default rule reads no attribute


async def test_chat_stream_denied_before_any_chunk_for_model_not_allowed(stack: Stack) -> None:
    jwt = stack.token("invoice-bot")
    async with openai.AsyncOpenAI(base_url=stack.url + "/openai", api_key=jwt, max_retries=0) as client:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert isinstance(caught.value.body, dict)
    assert (caught.value.body["type"], caught.value.body["rule"]) == ("policy_denied", "default")
    assert stack.fakes.openai.recorder.requests == []


def _expired(stack: Stack) -> str:
    return issue_token("invoice-bot", SECRET, ttl=60, now=time.time() - 3600)


def _wrong_secret(stack: Stack) -> str:
    return issue_token("invoice-bot", b"another-secret-0123456789abcdef-0123456789")


def _garbage(stack: Stack) -> str:
    return "not-a-jwt"


def _unknown_agent(stack: Stack) -> str:
    return str(stack.token("nobody-bot"))


@pytest.mark.parametrize(
    ("make_token", "message"),
    [
        (_expired, "token expired"),
        (_garbage, "token is not a well-formed JWT"),
        (_wrong_secret, "token signature is invalid"),
        (_unknown_agent, "agent 'nobody-bot' is not in the rules"),
    ],
    ids=["expired", "garbage", "wrong-secret", "unknown-agent"],
)
async def test_chat_unauthenticated_for_bad_token(stack: Stack, make_token: Any, message: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=stack.url + "/openai", api_key=make_token(stack), max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    error = caught.value
    assert error.status_code == 401
    assert isinstance(error.body, dict)
    assert (error.body["type"], error.body["message"]) == ("unauthenticated", message)
    assert "rule" not in error.body
    assert error.response.headers["www-authenticate"] == 'Bearer realm="agent-gateway"'
    assert stack.fakes.openai.recorder.requests == []
    event = await stack.trace.wait_for(lambda e: e.get("error") == "unauthenticated", limit=10)
    assert (event["status"], event["path"]) == (401, "/openai/chat/completions")
    assert "decision" not in event


async def _pending(http: aiohttp.ClientSession, stack: Stack) -> list[dict[str, Any]]:
    """The pending approvals once there is one: each round trip to the admin API lets the held call progress."""
    while True:
        async with http.get(f"{stack.admin_url}/approvals?status=pending", headers=stack.admin_headers) as resp:
            assert resp.status == 200
            approvals: list[dict[str, Any]] = (await resp.json())["approvals"]
        if approvals:
            return approvals


async def test_embeddings_held_until_approved_for_audit_agent(stack: Stack) -> None:
    jwt = stack.token("ops-bot")
    async with (
        openai.AsyncOpenAI(base_url=stack.url + "/openai", api_key=jwt, max_retries=0) as client,
        aiohttp.ClientSession() as http,
    ):
        call = asyncio.create_task(client.embeddings.create(model="text-embedding-3-small", input=["a b", "c"]))
        async with asyncio.timeout(10):
            [approval] = await _pending(http, stack)
        assert (approval["agent"], approval["upstream"], approval["verb"], approval["resource"]) == (
            "ops-bot", "openai", "embed", "text-embedding-3-small")
        assert approval["rule"] == "mode:audit"
        assert stack.fakes.openai.recorder.requests == []
        decision = {"reason": "reviewed", "category": "edge_case"}
        url = f"{stack.admin_url}/approvals/{approval['id']}/approve"
        async with http.post(url, json=decision, headers=stack.admin_headers) as resp:
            assert resp.status == 200
        embeddings = await call
    assert [item.index for item in embeddings.data] == [0, 1]
    assert embeddings.usage.prompt_tokens == 3
    assert_upstream_auth(stack.fakes.openai.recorder.last(), jwt)
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "openai", limit=10)
    assert (event["decision"], event["rule"], event["mode"], event["status"]) == ("hold", "mode:audit", "audit", 200)
    assert (event["approval"]["id"], event["approval"]["outcome"], event["approval"]["by"]) == (
        approval["id"], "approved", "admin")
    assert event["tokens"] == {"input": 3, "output": 0}
    assert event["cost_usd"] == cost(EMBEDDING_3_SMALL, 3, 0)


# --- Streaming without buffering ---------------------------------------------------------------------------


@dataclass
class Gate:
    """An OpenAI stand-in that sends its first chunk, then waits for the test before sending the rest."""

    release: asyncio.Event
    finished: asyncio.Event


def gated_openai_app(gate: Gate) -> web.Application:
    base = {"id": "chatcmpl-gated", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk({"role": "assistant", "content": "first"}))
        await gate.release.wait()
        await resp.write(chunk({"content": " second"}, "stop"))
        usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        await resp.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        gate.finished.set()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@dataclass
class GatedStack:
    gateway: RunningGateway
    gate: Gate
    trace: MemorySink


@pytest.fixture
async def gated() -> AsyncIterator[GatedStack]:
    gate = Gate(asyncio.Event(), asyncio.Event())
    runner = web.AppRunner(gated_openai_app(gate), access_log=None)
    await runner.setup()
    fakes = await start_all()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        env = {**fake_env(fakes), "OPENAI_BASE_URL": f"http://127.0.0.1:{runner.addresses[0][1]}/v1"}
        sink = MemorySink()
        settings = Settings(rules=str(RULES), port=0, admin_port=0, jwt_secret=SECRET, admin_token=ADMIN_TOKEN,
                            env=env, drain_timeout=5)
        gateway = await start_gateway(settings, sink=sink)
        try:
            yield GatedStack(gateway, gate, sink)
        finally:
            gate.release.set()
            await gateway.close()
    finally:
        await fakes.close()
        await runner.cleanup()


async def test_chat_stream_chunk_reaches_agent_before_upstream_finishes(gated: GatedStack) -> None:
    jwt = issue_token("invoice-bot", SECRET)
    async with openai.AsyncOpenAI(base_url=gated.gateway.url + "/openai", api_key=jwt, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True},
        )
        chunks = aiter(stream)
        # The upstream sends the rest only after this chunk arrived: a buffering gateway never gets here.
        async with asyncio.timeout(10):
            first = await anext(chunks)
        assert first.choices[0].delta.content == "first"
        assert not gated.gate.finished.is_set()
        gated.gate.release.set()
        rest = [chunk async for chunk in chunks]
    assert gated.gate.finished.is_set()
    assert [c.choices[0].delta.content for c in rest if c.choices] == [" second"]
    assert rest[-1].usage is not None
    assert rest[-1].usage.completion_tokens == 2
    event = await gated.trace.wait_for(lambda e: e.get("upstream") == "openai", limit=10)
    assert (event["decision"], event["stream"], event["tokens"]) == ("allow", True, {"input": 1, "output": 2})
    assert event["cost_usd"] == cost(GPT_4O_MINI, 1, 2)


async def test_responses_stream_allowed_and_accounted(stack: Stack) -> None:
    jwt = stack.token("invoice-bot")
    async with openai.AsyncOpenAI(base_url=stack.url + "/openai", api_key=jwt, max_retries=0) as client:
        events = [event async for event in await client.responses.create(
            model="gpt-4o-mini", input="what is up", stream=True)]
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "echo: what is up"
    seen = stack.fakes.openai.recorder.last()
    assert (seen.method, seen.path) == ("POST", "/v1/responses")
    assert_upstream_auth(seen, jwt)
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "openai", limit=10)
    assert (event["decision"], event["rule"], event["verb"], event["stream"]) == (
        "allow", "invoice-bot.yaml#allow[0]", "chat", True)
    assert event["tokens"] == {"input": 3, "output": 4}
    assert event["cost_usd"] == cost(GPT_4O_MINI, 3, 4)


async def test_agent_hanging_up_mid_stream_is_traced_as_client_disconnected(gated: GatedStack) -> None:
    jwt = issue_token("invoice-bot", SECRET)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(gated.gateway.url + "/openai/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {jwt}"})
        async with asyncio.timeout(10):
            first = await resp.content.readuntil(b"\n\n")
        assert b'"content":"first"' in first
        resp.close()  # the agent hangs up with the stream half read
    gated.gate.release.set()
    event = await gated.trace.wait_for(lambda e: e.get("upstream") == "openai", limit=10)
    assert (event["decision"], event["error"], event["status"]) == ("allow", "client_disconnected", 499)
