"""The fake upstreams are faithful enough for the official openai, anthropic and mcp clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import anthropic
import httpx2
import openai
import orjson
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent
from yarl import URL

from gateway.demo.fakes import FakeUpstreams, Recorder, RunningFake, mcp_app, start_all, start_app


@pytest.fixture
async def fakes() -> AsyncIterator[FakeUpstreams]:
    async with await start_all() as started:
        yield started


@pytest.fixture(params=[False, True], ids=["json", "sse"])
async def mcp_fake(request: pytest.FixtureRequest) -> AsyncIterator[RunningFake]:
    recorder = Recorder()
    fake = await start_app(mcp_app(recorder, sse=request.param), recorder)
    try:
        yield fake
    finally:
        await fake.close()


# --- OpenAI --------------------------------------------------------------------------------------------------


async def test_openai_chat_completion_parses_in_sdk(fakes: FakeUpstreams) -> None:
    async with openai.AsyncOpenAI(base_url=fakes.openai_url, api_key="sk-upstream") as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
        )
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.model == "gpt-4o-mini"
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    seen = fakes.openai.recorder.last()
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == "Bearer sk-upstream"
    assert seen.json()["model"] == "gpt-4o-mini"


async def test_openai_stream_with_usage_yields_content_and_usage(fakes: FakeUpstreams) -> None:
    async with openai.AsyncOpenAI(base_url=fakes.openai_url, api_key="sk") as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream me please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me please"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_openai_stream_without_usage_option_has_no_usage_chunk(fakes: FakeUpstreams) -> None:
    async with openai.AsyncOpenAI(base_url=fakes.openai_url, api_key="sk") as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_embeddings_models_and_responses_parse_in_sdk(fakes: FakeUpstreams) -> None:
    async with openai.AsyncOpenAI(base_url=fakes.openai_url, api_key="sk") as client:
        embeddings = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b c"])
        models = [model.id async for model in client.models.list()]
        response = await client.responses.create(model="gpt-4o-mini", input="what is up")
        events = [event async for event in await client.responses.create(model="gpt-4o", input="hi", stream=True)]
    assert [item.index for item in embeddings.data] == [0, 1]
    assert len(embeddings.data[0].embedding) == 8
    assert embeddings.usage.prompt_tokens == 3
    assert "gpt-4o-mini" in models
    assert response.output_text == "echo: what is up"
    assert response.usage is not None
    assert response.usage.input_tokens == 3
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None


async def test_openai_unknown_path_is_sdk_not_found_error(fakes: FakeUpstreams) -> None:
    async with openai.AsyncOpenAI(base_url=fakes.openai_url, api_key="sk", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError):
            await client.files.list()


# --- Anthropic -----------------------------------------------------------------------------------------------


async def test_anthropic_message_parses_in_sdk(fakes: FakeUpstreams) -> None:
    async with anthropic.AsyncAnthropic(base_url=fakes.anthropic_url, api_key="sk-ant-upstream") as client:
        message = await client.messages.create(
            model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi claude"}]
        )
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hi claude"
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 3
    seen = fakes.anthropic.recorder.last()
    assert (seen.method, seen.path) == ("POST", "/v1/messages")
    # anthropic 2.x sends the api_key as a Bearer token, not as x-api-key.
    assert seen.headers["authorization"] == "Bearer sk-ant-upstream"
    assert "anthropic-version" in seen.headers


async def test_anthropic_raw_stream_has_real_event_sequence(fakes: FakeUpstreams) -> None:
    async with anthropic.AsyncAnthropic(base_url=fakes.anthropic_url, api_key="sk") as client:
        stream = await client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
        )
        events = [event async for event in stream]
    types = [event.type for event in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert types.count("content_block_delta") >= 3


async def test_anthropic_stream_helper_accumulates_text_and_usage(fakes: FakeUpstreams) -> None:
    async with (
        anthropic.AsyncAnthropic(base_url=fakes.anthropic_url, api_key="sk") as client,
        client.messages.stream(
            model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "stream this"}]
        ) as stream,
    ):
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "echo: stream this"
    assert final.usage.output_tokens == 3
    assert final.usage.input_tokens == 2


# --- MCP -----------------------------------------------------------------------------------------------------


async def test_mcp_client_initializes_lists_and_calls_tools(mcp_fake: RunningFake) -> None:
    headers = {"Authorization": "Bearer agent-token"}
    async with (
        httpx2.AsyncClient(headers=headers) as http,
        Client(streamable_http_client(f"{mcp_fake.url}/mcp", http_client=http), mode="legacy") as client,
    ):
        tools = await client.list_tools()
        result = await client.call_tool("lookup_account", {"account_id": "a-1"})
        server_info = client.server_info
    assert [tool.name for tool in tools.tools] == ["lookup_account", "send_email", "delete_account", "export_all"]
    assert server_info is not None
    assert server_info.name == "fake-crm-mcp"
    assert not result.is_error
    assert isinstance(result.content[0], TextContent)
    assert result.content[0].text == 'called lookup_account with {"account_id":"a-1"}'
    methods = [orjson.loads(r.body).get("method") for r in mcp_fake.recorder.requests if r.method == "POST"]
    assert methods == ["initialize", "notifications/initialized", "tools/list", "tools/call"]
    assert all(r.headers["authorization"] == "Bearer agent-token" for r in mcp_fake.recorder.requests)
    assert "mcp-session-id" in mcp_fake.recorder.last().headers


async def test_mcp_client_auto_mode_falls_back_from_discover(mcp_fake: RunningFake) -> None:
    async with Client(f"{mcp_fake.url}/mcp") as client:
        result = await client.call_tool("send_email", {"to": "a@example.com", "subject": "s"})
    assert not result.is_error
    methods = [orjson.loads(r.body).get("method") for r in mcp_fake.recorder.requests if r.method == "POST"]
    assert methods[:2] == ["server/discover", "initialize"]


async def test_mcp_batch_answers_requests_and_skips_notifications(fakes: FakeUpstreams) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "nope"}},
        {"jsonrpc": "2.0", "id": 3, "method": "resources/list"},
    ]
    async with aiohttp.ClientSession() as http, http.post(f"{fakes.mcp_url}/mcp", json=batch) as resp:
        answers = await resp.json()
    assert [answer["id"] for answer in answers] == [1, 2, 3]
    assert answers[0]["result"] == {}
    assert answers[1]["error"]["code"] == -32602
    assert answers[2]["result"] == {"resources": []}


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
async def test_mcp_batch_answer_format_follows_sse_mode(sse: bool) -> None:
    recorder = Recorder()
    fake = await start_app(mcp_app(recorder, sse=sse), recorder)
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "prompts/list"}]
    accept = {"Accept": "application/json, text/event-stream"}
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{fake.url}/mcp", json=batch, headers=accept) as resp,
        ):
            content_type, body = resp.content_type, await resp.read()
    finally:
        await fake.close()
    if sse:
        assert content_type == "text/event-stream"
        events = [event.split(b"\n") for event in body.split(b"\n\n") if event]
        assert [lines[0] for lines in events] == [b"event: message"] * 2
        answers = [orjson.loads(lines[1].removeprefix(b"data: ")) for lines in events]
    else:
        assert content_type == "application/json"
        answers = orjson.loads(body)
    assert answers == [
        {"jsonrpc": "2.0", "id": 1, "result": {}},
        {"jsonrpc": "2.0", "id": 2, "result": {"prompts": []}},
    ]


async def test_mcp_notification_only_is_202_and_get_is_405(fakes: FakeUpstreams) -> None:
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fakes.mcp_url}/mcp", json=note) as resp:
            assert resp.status == 202
            assert await resp.read() == b""
        async with http.get(f"{fakes.mcp_url}/mcp") as resp:
            assert resp.status == 405
        async with http.delete(f"{fakes.mcp_url}/mcp") as resp:
            assert resp.status == 200
        async with http.post(f"{fakes.mcp_url}/mcp", data=b"{not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == -32700


# --- ERP -----------------------------------------------------------------------------------------------------


async def test_erp_routes_answer_and_record_raw_requests(fakes: FakeUpstreams) -> None:
    base = fakes.http_tool_url
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/vendors?status=verified", headers={"X-Upstream-Key": "erp-key"}) as resp:
            assert len((await resp.json())["vendors"]) == 3
        async with http.get(f"{base}/vendors/v-200") as resp:
            assert (await resp.json())["name"] == "Globex Parts"
        async with http.post(f"{base}/payments", json={"vendor": "v-100", "amount": 50}) as resp:
            assert resp.status == 201
            assert await resp.json() == {"vendor": "v-100", "amount": 50, "id": "pay-1", "status": "created"}
        async with http.delete(f"{base}/vendors/v-300") as resp:
            assert (await resp.json())["deleted"] == "v-300"
        async with http.get(f"{base}/admin/export") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/vendors/v-999") as resp:
            assert resp.status == 404
        async with http.put(f"{base}/nothing/here") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "not_found"
    requests = fakes.http_tool.recorder.requests
    assert [(r.method, r.path) for r in requests][:3] == [
        ("GET", "/vendors"),
        ("GET", "/vendors/v-200"),
        ("POST", "/payments"),
    ]
    assert requests[0].query == "status=verified"
    assert requests[0].headers["x-upstream-key"] == "erp-key"
    assert requests[2].json() == {"vendor": "v-100", "amount": 50}


async def test_recorder_keeps_path_undecoded(fakes: FakeUpstreams) -> None:
    async with aiohttp.ClientSession() as http:
        url = URL(f"{fakes.http_tool_url}/vendors/v%2F1", encoded=True)
        async with http.get(url) as resp:
            assert resp.status == 404
    assert fakes.http_tool.recorder.last().path == "/vendors/v%2F1"


def test_recorder_last_without_requests_raises() -> None:
    with pytest.raises(LookupError):
        Recorder().last()
