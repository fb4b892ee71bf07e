"""The locustfile's pure half: settings, tokens, request builders, outcomes, and the scenario table checked
against a real gateway on the example rules."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import aiohttp
import jwt
import orjson
import pytest
from conftest import SECRET, Stack

# loadtests/ holds scripts, not a package: import them the way `python loadtests/x.py` and locust do.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
from scenarios import (
    EXAMPLE_AGENTS,
    PASSES,
    Call,
    LoadSettings,
    SettingsError,
    chat,
    mcp_initialize,
    outcome,
    parse_tokens,
    payment,
    pick,
    plan,
    scenarios,
    settings_from_env,
    stream_complete,
    vendor_read,
)


def test_parse_tokens_reads_agent_token_pairs() -> None:
    assert parse_tokens(" invoice-bot=a.b.c , support-bot=d.e.f,") == {"invoice-bot": "a.b.c", "support-bot": "d.e.f"}


@pytest.mark.parametrize(("text", "message"), [("invoice-bot", "not agent=token"), ("=x", "not agent=token"),
                                               ("a=x,a=y", "given twice"), (" , ", "empty")])
def test_parse_tokens_names_the_variable_when_malformed(text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=f"AGENT_TOKENS.*{message}|{message}"):
        parse_tokens(text)


def test_settings_mint_tokens_for_the_example_agents_from_the_secret() -> None:
    settings = settings_from_env({"AGENT_GATEWAY_JWT_SECRET": SECRET.decode()})
    assert sorted(settings.tokens) == sorted(EXAMPLE_AGENTS)
    claims = jwt.decode(settings.tokens["ops-bot"], SECRET, algorithms=["HS256"], audience="agent-gateway")
    assert claims["sub"] == "ops-bot"
    assert settings.held_weight == 0  # held payments are opt-in


def test_settings_prefer_given_tokens_and_read_the_knobs() -> None:
    settings = settings_from_env({"AGENT_TOKENS": "ops-bot=t", "AGENT_GATEWAY_JWT_SECRET": "ignored",
                                  "LOAD_HELD_WEIGHT": "2", "LOAD_HELD_TIMEOUT": "0.5", "LOAD_BURST": "0"})
    assert settings == LoadSettings(tokens={"ops-bot": "t"}, held_weight=2, held_timeout=0.5, burst=0)


@pytest.mark.parametrize(("env", "name"), [({}, "AGENT_TOKENS"),
                                           ({"AGENT_GATEWAY_JWT_SECRET": "short"}, "AGENT_GATEWAY_JWT_SECRET"),
                                           ({"AGENT_TOKENS": "a=b", "LOAD_BURST": "many"}, "LOAD_BURST"),
                                           ({"AGENT_TOKENS": "a=b", "LOAD_HELD_TIMEOUT": "0"}, "LOAD_HELD_TIMEOUT")])
def test_settings_errors_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        settings_from_env(env)


def test_builders_make_a_different_body_each_call_so_loop_detection_stays_quiet() -> None:
    rng = random.Random(1)
    assert len({chat(rng, n).body() for n in range(50)}) == 50
    stream = chat(rng, 1, stream=True)
    assert stream.stream == "openai" and orjson.loads(stream.body() or b"")["stream_options"] == {"include_usage": True}
    assert all(10 <= orjson.loads(payment(rng, n).body() or b"")["amount"] <= 10_000 for n in range(100))
    assert vendor_read(rng, 3) == Call("GET", "/erp/vendors")


def test_plan_leaves_out_agents_without_tokens_and_zero_weights() -> None:
    table = scenarios(LoadSettings(tokens={}))
    runnable, missing = plan(table, {"invoice-bot": "t"})
    assert {s.agent for s in runnable} == {"invoice-bot"}
    assert "erp payment held" not in {s.name for s in runnable}
    assert missing == ["ops-bot", "support-bot"]
    assert pick(random.Random(3), runnable) in runnable
    with pytest.raises(SettingsError, match="no scenario"):
        plan(table, {"someone-else": "t"})


@pytest.mark.parametrize(("status", "body", "mcp", "expected"), [
    (200, b'{"choices": []}', False, "allowed"),
    (429, b'{"error": {"type": "rate_limited"}}', False, "rate_limited"),
    (429, b'{"type": "error", "error": {"type": "budget_exceeded"}}', False, "rate_limited"),
    (403, b'{"error": {"type": "policy_denied"}}', False, "denied"),
    (403, b"Forbidden", False, "error"),
    (502, b'{"error": {"type": "upstream_error"}}', False, "error"),
    (200, b'{"jsonrpc": "2.0", "id": 1, "result": {}}', True, "allowed"),
    (200, b'{"jsonrpc": "2.0", "id": 1, "error": {"code": -32001}}', True, "denied"),
    (200, b'[{"jsonrpc": "2.0", "id": 1, "result": {}}, {"id": 2, "error": {"code": -32002}}]', True,
     "rate_limited"),
    (200, b'{"jsonrpc": "2.0", "id": 1, "error": {"code": -32601}}', True, "error"),
])
def test_outcome_counts_denials_and_limits_as_their_own(status: int, body: bytes, mcp: bool, expected: str) -> None:
    assert outcome(status, body, mcp) == expected


def test_stream_complete_needs_the_last_event() -> None:
    assert stream_complete("openai", b'data: {"x": 1}\n\ndata: [DONE]\n\n')
    assert not stream_complete("openai", b'data: {"x": 1}\n\n')
    assert stream_complete("anthropic", b"event: message_stop\ndata: {}\n\n")


async def _send(session: aiohttp.ClientSession, stack: Stack, agent: str, call: Call, limit: float) -> str:
    headers = {"Authorization": f"Bearer {stack.token(agent)}", "Content-Type": "application/json"}
    try:
        async with session.request(call.method, stack.url + call.path, data=call.body(), headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=limit)) as response:
            body = await response.read()
    except TimeoutError:
        return "held"
    result = outcome(response.status, body, call.mcp)
    if result == "allowed" and call.stream:
        assert stream_complete(call.stream, body)
    return result


async def test_every_scenario_gets_an_expected_outcome_from_the_example_rules(stack: Stack) -> None:
    settings = LoadSettings(tokens={}, held_weight=1, held_timeout=0.3, burst=31)
    rng = random.Random(5)
    async with aiohttp.ClientSession() as session:
        assert await _send(session, stack, "support-bot", mcp_initialize(), 5) == "allowed"
        for n, scenario in enumerate(scenarios(settings)):
            results = [await _send(session, stack, scenario.agent, scenario.build(rng, n), scenario.timeout)
                       for _ in range(scenario.repeat)]
            assert set(results) <= scenario.expect, (scenario.name, results)
            if scenario.name == "rate-limit burst":  # ops-bot may make 30 calls a minute
                assert results[-1] == "rate_limited" and results[0] == "allowed"
            elif scenario.expect == PASSES:
                assert results == ["allowed"], scenario.name
