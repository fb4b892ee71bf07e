"""The official `anthropic` client as the agent: messages create and stream, and a denied model."""

from __future__ import annotations

import anthropic
import pytest
from conftest import Stack

from gateway.demo.fakes import Recorded

# Prices from rules/upstreams.yaml, USD per million tokens.
HAIKU = (1.00, 5.00)


def cost(prompt: int, completion: int) -> float:
    return round((prompt * HAIKU[0] + completion * HAIKU[1]) / 1e6, 8)


def assert_upstream_auth(seen: Recorded, agent_jwt: str) -> None:
    # anthropic 2.x sends its api_key as `Authorization: Bearer`; upstream gets only the configured x-api-key.
    assert seen.headers["x-api-key"] == "sk-ant-upstream"
    assert "authorization" not in seen.headers
    assert all(agent_jwt not in value for value in seen.headers.values())


def client(stack: Stack, jwt: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=stack.url + "/anthropic", api_key=jwt, max_retries=0)


async def test_message_create_allowed_for_permitted_model(stack: Stack) -> None:
    jwt = stack.token("support-bot")
    async with client(stack, jwt) as agent:
        message = await agent.messages.create(
            model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi claude"}]
        )
        version = agent.default_headers["anthropic-version"]
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hi claude"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 3)
    seen = stack.fakes.anthropic.recorder.last()
    assert (seen.method, seen.path) == ("POST", "/v1/messages")
    assert seen.headers["anthropic-version"] == version
    assert_upstream_auth(seen, jwt)
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "anthropic", limit=10)
    assert event["trace_id"] == seen.headers["traceparent"].split("-")[1]
    assert (event["agent"], event["path"], event["verb"], event["model"]) == (
        "support-bot", "/anthropic/v1/messages", "chat", "claude-haiku-4-5")
    assert (event["decision"], event["rule"], event["mode"], event["status"]) == (
        "allow", "support-bot.yaml#allow[0]", "automate", 200)
    assert event["policy_version"] == stack.gateway.runtime.policy.version
    assert event["tokens"] == {"input": 2, "output": 3}
    assert event["cost_usd"] == cost(2, 3)


async def test_message_stream_allowed_and_accounted(stack: Stack) -> None:
    jwt = stack.token("support-bot")
    async with (
        client(stack, jwt) as agent,
        agent.messages.stream(
            model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "stream this please"}]
        ) as stream,
    ):
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "echo: stream this please"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 4)
    seen = stack.fakes.anthropic.recorder.last()
    assert seen.json()["stream"] is True
    assert_upstream_auth(seen, jwt)
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "anthropic", limit=10)
    assert (event["decision"], event["rule"], event["stream"]) == ("allow", "support-bot.yaml#allow[0]", True)
    assert event["trace_id"] == seen.headers["traceparent"].split("-")[1]
    assert event["tokens"] == {"input": 3, "output": 4}
    assert event["cost_usd"] == cost(3, 4)


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_message_denied_for_model_not_allowed(stack: Stack, stream: bool) -> None:
    jwt = stack.token("support-bot")
    async with client(stack, jwt) as agent:
        with pytest.raises(anthropic.PermissionDeniedError) as caught:
            await agent.messages.create(
                model="claude-opus-4-1", max_tokens=16, messages=[{"role": "user", "content": "x"}], stream=stream
            )
    error = caught.value
    assert error.status_code == 403
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "anthropic", limit=10)
    assert error.body == {
        "type": "error",
        "error": {
            "type": "policy_denied",
            "message": "no rule allows 'chat' on 'anthropic/claude-opus-4-1' for agent 'support-bot'",
            "rule": "default",
            "trace_id": event["trace_id"],
        },
    }
    assert stack.fakes.anthropic.recorder.requests == []
    assert (event["decision"], event["rule"], event["error"], event["status"]) == (
        "deny", "default", "policy_denied", 403)


async def test_message_denied_for_agent_without_anthropic_grant(stack: Stack) -> None:
    async with client(stack, stack.token("invoice-bot")) as agent:
        with pytest.raises(anthropic.PermissionDeniedError) as caught:
            await agent.messages.create(
                model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "x"}]
            )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "policy_denied"
    assert caught.value.body["error"]["rule"] == "default"
    assert stack.fakes.anthropic.recorder.requests == []


async def test_message_unauthenticated_for_garbage_token(stack: Stack) -> None:
    async with client(stack, "garbage") as agent:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await agent.messages.create(
                model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "x"}]
            )
    assert caught.value.status_code == 401
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "error"
    assert (caught.value.body["error"]["type"], caught.value.body["error"]["message"]) == (
        "unauthenticated", "token is not a well-formed JWT")
    assert stack.fakes.anthropic.recorder.requests == []
