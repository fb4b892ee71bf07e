"""The limit stage end to end: rate limits, loop detection, token and USD budgets and the admin usage endpoint,
against a real gateway (memory store) and the fake OpenAI upstream on loopback. Budget streams and alerts are in
test_budget_streams.py."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import Stack, start_stack
from multidict import CIMultiDictProxy

UPSTREAMS = """\
upstreams:
  openai:
    kind: openai
    url: "${OPENAI_BASE_URL}"
    credential: {header: Authorization, value: "Bearer ${OPENAI_API_KEY}"}
    prices:
      gpt-4o-mini: {input_per_mtok: 0.15, output_per_mtok: 0.60}
      gpt-4o: {input_per_mtok: 2.50, output_per_mtok: 10.00}
"""
ALLOW = "allow:\n  - {upstream: openai, verbs: [chat]}\n"
NO_LOOP = "loop_detection: false\n"
HELLO = "hello there"
# The gateway's prompt estimate for HELLO: the strings of `messages` ("user" + HELLO, 15 chars) // 4 + 1.
ESTIMATE = 4
# The fake's usage for HELLO: one token a word, of the prompt (2) and of its reply "echo: hello there" (3).
USED_IN, USED_OUT = 2, 3
USED = USED_IN + USED_OUT
# Prices from UPSTREAMS, USD per million tokens.
PRICES = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00)}


def write_rules(root: Path, agents: dict[str, str]) -> Path:
    """A rules directory with UPSTREAMS and one file per agent (`agent: <name>` followed by its body)."""
    (root / "agents").mkdir(parents=True)
    (root / "upstreams.yaml").write_text(UPSTREAMS)
    for name, body in agents.items():
        (root / "agents" / f"{name}.yaml").write_text(f"agent: {name}\n{body}")
    return root


@asynccontextmanager
async def running(rules: Path, **overrides: object) -> AsyncIterator[Stack]:
    stack = await start_stack(rules, **overrides)
    try:
        yield stack
    finally:
        await stack.gateway.close()
        await stack.fakes.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: dict[str, Any]
    event: dict[str, Any]  # the call's trace event, written after its settlement


async def chat(http: aiohttp.ClientSession, stack: Stack, agent: str, content: str = HELLO,
               model: str = "gpt-4o-mini", **fields: Any) -> Answer:
    """One chat completion; returns once its trace event (hence its settlement) is written."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], **fields}
    headers = {"Authorization": f"Bearer {stack.token(agent)}"}
    async with http.post(f"{stack.url}/openai/chat/completions", json=body, headers=headers) as resp:
        data = await resp.json()
    trace_id = resp.headers["x-agent-gateway-trace-id"]
    event = await stack.trace.wait_for(lambda e: e["trace_id"] == trace_id and "kind" not in e)
    return Answer(resp.status, resp.headers, data, event)


async def usage(http: aiohttp.ClientSession, stack: Stack, agent: str) -> dict[str, Any]:
    async with http.get(f"{stack.admin_url}/agents/{agent}/usage", headers=stack.admin_headers) as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


def error(answer: Answer, type_: str, message: str, rule: str, **extra: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "rule": rule, **extra,
                      "trace_id": answer.event["trace_id"]}}


def midnight() -> datetime:
    """The next UTC midnight: when a `per: day` budget resets."""
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def nanos(model: str, prompt: int, completion: int) -> int:
    """The cost in nano-dollars as the gateway counts it: whole nano-dollars per token, rounded up."""
    per_in, per_out = (math.ceil(price * 1000) for price in PRICES[model])
    return prompt * per_in + completion * per_out


# -- rate limits and loop detection ------------------------------------------------------------------------------
RATE_BOT = ALLOW + NO_LOOP + "rate_limits:\n  - {id: three-an-hour, upstream: openai, requests: 3, per: hour}\n"
# GCRA: 3 per hour is one every 1200 s with a burst of 3; the 4th, a moment after the 1st, waits 1200 s less that
# moment, which rounds up to 1200.
RETRY_AFTER = 1200


async def test_fourth_request_rate_limited_with_three_per_hour(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(write_rules(tmp_path, {"rate-bot": RATE_BOT})) as stack:
        passed = [await chat(http, stack, "rate-bot", f"call {i}") for i in range(3)]
        refused = await chat(http, stack, "rate-bot", "call 3")
        seen = [r.json()["messages"][0]["content"] for r in stack.fakes.openai.recorder.requests]
    assert [a.status for a in passed] == [200, 200, 200]
    assert [a.event["rate_limit"] for a in passed] == [
        {"id": "three-an-hour", "remaining": left, "limit": 3} for left in (2, 1, 0)]
    retry = int(refused.headers["Retry-After"])
    assert abs(retry - RETRY_AFTER) <= 1
    assert refused.status == 429
    assert refused.body == error(refused, "rate_limited", f"rate limit three-an-hour reached; retry in {retry}s",
                                 "three-an-hour")
    assert (refused.event["decision"], refused.event["error"], refused.event["status"]) == ("allow", "rate_limited",
                                                                                              429)
    assert seen == ["call 0", "call 1", "call 2"]


async def test_openai_sdk_raises_rate_limit_error_when_limit_reached(tmp_path: Path) -> None:
    async with running(write_rules(tmp_path, {"rate-bot": RATE_BOT})) as stack, openai.AsyncOpenAI(
            base_url=stack.url + "/openai", api_key=stack.token("rate-bot"), max_retries=0) as client:
        messages: Any = [{"role": "user", "content": HELLO}]
        for _ in range(3):
            completion = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            assert completion.choices[0].message.content == "echo: hello there"
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        upstream_calls = len(stack.fakes.openai.recorder.requests)
    assert caught.value.status_code == 429
    retry = int(caught.value.response.headers["retry-after"])
    assert abs(retry - RETRY_AFTER) <= 1
    assert isinstance(caught.value.body, dict)
    assert (caught.value.body["type"], caught.value.body["rule"]) == ("rate_limited", "three-an-hour")
    assert upstream_calls == 3


async def test_identical_call_refused_as_loop_after_max_repeats(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    rules = write_rules(tmp_path, {"loop-bot": ALLOW + "loop_detection: {max_repeats: 3, per: hour}\n"})
    async with running(rules) as stack:
        repeats = [await chat(http, stack, "loop-bot") for _ in range(3)]
        looped = await chat(http, stack, "loop-bot")
        different = await chat(http, stack, "loop-bot", "something else")
        upstream_calls = len(stack.fakes.openai.recorder.requests)
    assert [a.status for a in repeats] == [200, 200, 200]
    retry = int(looped.headers["Retry-After"])
    assert abs(retry - RETRY_AFTER) <= 1
    assert looped.status == 429
    assert looped.body == error(looped, "rate_limited",
                                f"loop detected: the same call was repeated too often; retry in {retry}s",
                                "loop_detection", detail="loop_detected")
    assert (different.status, different.body["choices"][0]["message"]["content"]) == (200, "echo: something else")
    assert upstream_calls == 4


# -- budgets ---------------------------------------------------------------------------------------------------------
async def test_token_budget_refuses_call_it_cannot_cover(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # Each call reserves ESTIMATE + 50 = 54 and settles to the fake's USED = 5: 60 tokens hold two calls
    # (5 + 54 <= 60) and not a third (10 + 54 > 60). Had settlement kept the reservation, the second would fail.
    rules = write_rules(tmp_path, {"tokens-bot": ALLOW + NO_LOOP + "budgets:\n  - {tokens: 60, per: day}\n"})
    budget = "tokens-bot.yaml#budgets[0]"
    async with running(rules) as stack:
        passed = [await chat(http, stack, "tokens-bot", max_tokens=50) for _ in range(2)]
        refused = await chat(http, stack, "tokens-bot", max_tokens=50)
        refused_at = time.time()
        after = await usage(http, stack, "tokens-bot")
        upstream_calls = len(stack.fakes.openai.recorder.requests)
    reset = midnight()
    assert [(a.status, a.event["budget"]["used"]) for a in passed] == [(200, USED), (200, 2 * USED)]
    assert refused.status == 429
    assert refused.body == error(refused, "budget_exceeded", f"budget {budget} cannot cover this call's expected "
                                 f"cost; it resets at {reset:%Y-%m-%d}T00:00:00Z", budget)
    assert abs(int(refused.headers["Retry-After"]) - (reset.timestamp() - refused_at)) <= 2
    assert upstream_calls == 2
    assert after == {"agent": "tokens-bot", "rate_limits": [], "budgets": [
        {"id": budget, "unit": "tokens", "used": 2 * USED, "limit": 60, "window": f"{datetime.now(UTC):%Y-%m-%d}",
         "resets_at": reset.timestamp()}]}


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_next_call_on_a_connection_sees_the_last_settlement_without_waiting_for_its_trace(
        tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    # Each call reserves ESTIMATE + 100 = 104 and settles to USED = 5. The budget admits the k-th call (k from 0)
    # only if every earlier one has settled: 5k + 104 <= 5 * 19 + 104 + 5, whereas one unsettled call before it
    # makes 5(k-1) + 208, over the limit. The calls go back to back on one keep-alive connection, each sent as
    # soon as the last answer is in, never waiting for a trace event (which follows the settlement).
    limit = 5 * 19 + 104 + 5
    rules = write_rules(tmp_path, {"ryw-bot": ALLOW + NO_LOOP + f"budgets:\n  - {{tokens: {limit}, per: day}}\n"})
    overrides = {"redis_url": request.getfixturevalue("redis_url")} if store == "redis" else {}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": HELLO}], "max_tokens": 100}
    async with running(rules, **overrides) as stack, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1)) as one_connection:
        headers = {"Authorization": f"Bearer {stack.token('ryw-bot')}"}
        statuses = []
        for _ in range(20):
            async with one_connection.post(f"{stack.url}/openai/chat/completions", json=body,
                                           headers=headers) as resp:
                await resp.read()
                statuses.append(resp.status)
        final = await usage(one_connection, stack, "ryw-bot")
    assert statuses == [200] * 20
    assert final["budgets"][0]["used"] == 20 * USED


async def test_usd_budget_charged_usage_times_prices(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    rules = write_rules(tmp_path, {"usd-bot": ALLOW + "budgets:\n  - {id: monthly-usd, usd: 1, per: month}\n"})
    async with running(rules) as stack:
        mini = await chat(http, stack, "usd-bot", model="gpt-4o-mini", max_tokens=100)
        big = await chat(http, stack, "usd-bot", model="gpt-4o", max_tokens=100)
        after = await usage(http, stack, "usd-bot")
    dollars = {model: (USED_IN * p_in + USED_OUT * p_out) / 1e6 for model, (p_in, p_out) in PRICES.items()}
    assert (mini.status, big.status) == (200, 200)
    assert (mini.event["cost_usd"], big.event["cost_usd"]) == (round(dollars["gpt-4o-mini"], 8),
                                                               round(dollars["gpt-4o"], 8))
    [budget] = after["budgets"]
    assert isinstance(budget["used"], float)
    assert math.isclose(budget["used"], dollars["gpt-4o-mini"] + dollars["gpt-4o"], rel_tol=1e-9)
    this_month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    next_month = (this_month + timedelta(days=32)).replace(day=1)
    assert {k: v for k, v in budget.items() if k != "used"} == {
        "id": "monthly-usd", "unit": "usd", "limit": 1.0, "window": f"{this_month:%Y-%m}",
        "resets_at": next_month.timestamp()}


UNESTIMATED = {
    "strict-bot": ALLOW + "budgets:\n  - {id: strict, tokens: 1000, per: day}\n",
    "lenient-bot": ALLOW + "budgets:\n  - {id: lenient, tokens: 1000, per: day, allow_unestimated: true}\n",
    # Without max_tokens these reserve ESTIMATE + 100 = 104: exactly the first budget, one token over the second.
    "default-bot": ALLOW + "budgets:\n  - {id: default-fits, tokens: 104, per: day, default_output_tokens: 100}\n",
    "short-bot": ALLOW + "budgets:\n  - {id: default-short, tokens: 103, per: day, default_output_tokens: 100}\n",
}


async def test_chat_without_max_tokens_denied_when_budget_cannot_estimate(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(write_rules(tmp_path, UNESTIMATED)) as stack:
        denied = await chat(http, stack, "strict-bot")
        upstream_calls = len(stack.fakes.openai.recorder.requests)
    assert denied.status == 403
    assert denied.body == error(denied, "policy_denied", "the request sets no max_tokens; the call's cost cannot be "
                                "estimated for strict (set max_tokens, or default_output_tokens or allow_unestimated "
                                "on that limit)", "strict")
    assert upstream_calls == 0


async def test_chat_without_max_tokens_admitted_when_budget_allows_unestimated(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(write_rules(tmp_path, UNESTIMATED)) as stack:
        admitted = await chat(http, stack, "lenient-bot")
        after = await usage(http, stack, "lenient-bot")
    assert admitted.status == 200
    assert admitted.event["limits"] == ["no max_tokens: reserved the prompt only"]
    assert after["budgets"][0]["used"] == USED


async def test_chat_without_max_tokens_reserves_default_output_tokens(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(write_rules(tmp_path, UNESTIMATED)) as stack:
        fits = await chat(http, stack, "default-bot")
        short = await chat(http, stack, "short-bot")
        used = (await usage(http, stack, "default-bot"))["budgets"][0]["used"]
        upstream_calls = len(stack.fakes.openai.recorder.requests)
    assert (fits.status, used) == (200, USED)
    assert short.status == 429
    assert (short.body["error"]["type"], short.body["error"]["rule"]) == ("budget_exceeded", "default-short")
    assert upstream_calls == 1


async def test_max_tokens_clamped_to_what_budget_can_pay(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # 100,000 nano-dollars; gpt-4o-mini costs 150 an input and 600 an output token.
    clamped = "budgets:\n  - {id: clamped, usd: 0.0001, per: day, clamp_max_tokens: true}\n"
    # 599 nano-dollars left after the prompt: not one output token.
    broke = "budgets:\n  - {id: broke, usd: 0.000001199, per: day, clamp_max_tokens: true}\n"
    rules = write_rules(tmp_path, {"clamp-bot": ALLOW + NO_LOOP + clamped, "broke-bot": ALLOW + broke})
    async with running(rules) as stack:
        first = await chat(http, stack, "clamp-bot", max_tokens=1000)
        first_sent = stack.fakes.openai.recorder.last().json()
        second = await chat(http, stack, "clamp-bot", max_tokens=1000)
        second_sent = stack.fakes.openai.recorder.last().json()
        refused = await chat(http, stack, "broke-bot", max_tokens=1000)
        upstream_calls = len(stack.fakes.openai.recorder.requests)
    room = 100_000 - nanos("gpt-4o-mini", ESTIMATE, 0)
    assert (first.status, first_sent["max_tokens"]) == (200, room // 600)
    assert first.event["limits"] == [f"max_tokens clamped from 1000 to {room // 600} by the budget"]
    room -= nanos("gpt-4o-mini", USED_IN, USED_OUT)  # the first call's real cost, once settled
    assert (second.status, second_sent["max_tokens"]) == (200, room // 600)
    assert refused.status == 429
    assert (refused.body["error"]["type"], refused.body["error"]["rule"]) == ("budget_exceeded", "broke")
    assert upstream_calls == 2


async def test_budget_reserved_before_hold_and_released_when_denied(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    held = ("allow:\n  - {upstream: openai, verbs: [chat], resources: [gpt-4o-mini]}\n"
            "hold:\n  - {id: big-model, upstream: openai, verbs: [chat], resources: [gpt-4o],"
            " reason: gpt-4o needs a human, timeout: 5m}\n"
            "budgets:\n  - {id: held-budget, tokens: 1000, per: day}\n")
    async with running(write_rules(tmp_path, {"held-bot": held})) as stack:
        call = asyncio.create_task(chat(http, stack, "held-bot", model="gpt-4o", max_tokens=50))
        async with asyncio.timeout(10):
            approvals: list[dict[str, Any]] = []
            while not approvals:  # each admin round trip lets the held call progress: no sleeps
                async with http.get(f"{stack.admin_url}/approvals?status=pending",
                                    headers=stack.admin_headers) as resp:
                    approvals = (await resp.json())["approvals"]
        during = (await usage(http, stack, "held-bot"))["budgets"][0]["used"]
        async with http.post(f"{stack.admin_url}/approvals/{approvals[0]['id']}/deny", json={"reason": "no"},
                             headers=stack.admin_headers) as resp:
            assert resp.status == 200
        denied = await call
        after = (await usage(http, stack, "held-bot"))["budgets"][0]["used"]
        upstream_calls = len(stack.fakes.openai.recorder.requests)
    assert during == ESTIMATE + 50
    assert (denied.status, denied.body["error"]["type"]) == (403, "approval_denied")
    assert after == 0
    assert upstream_calls == 0


async def test_concurrent_calls_admit_only_what_budget_covers(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # ESTIMATE + 10 = 14 tokens: one call's reservation, and after it settles (5) still too little for another.
    budget = "budgets:\n  - {id: one-call, tokens: 14, per: day}\n"
    rules = write_rules(tmp_path, {"busy-bot": ALLOW + NO_LOOP + budget})
    async with running(rules) as stack:
        answers = await asyncio.gather(*(chat(http, stack, "busy-bot", max_tokens=10) for _ in range(50)))
        upstream_calls = len(stack.fakes.openai.recorder.requests)
    assert sorted(a.status for a in answers) == [200] + [429] * 49
    refusals = {(a.body["error"]["type"], a.body["error"]["rule"]) for a in answers if a.status == 429}
    assert refusals == {("budget_exceeded", "one-call")}
    assert upstream_calls == 1


async def test_admitted_call_trace_carries_budget_and_rate_limit(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    limits = ("budgets:\n  - {id: daily-tokens, tokens: 1000, per: day}\n"
              "rate_limits:\n  - {id: per-minute, upstream: openai, requests: 10, per: minute}\n")
    async with running(write_rules(tmp_path, {"traced-bot": ALLOW + limits})) as stack:
        answer = await chat(http, stack, "traced-bot", max_tokens=50)
        after = await usage(http, stack, "traced-bot")
    budget = {"id": "daily-tokens", "unit": "tokens", "used": USED, "limit": 1000,
              "window": f"{datetime.now(UTC):%Y-%m-%d}", "resets_at": midnight().timestamp()}
    assert answer.status == 200
    assert answer.event["budget"] == budget
    assert answer.event["rate_limit"] == {"id": "per-minute", "remaining": 9, "limit": 10}
    assert answer.event["tokens"] == {"input": USED_IN, "output": USED_OUT}
    assert "limits" not in answer.event
    assert after == {"agent": "traced-bot", "budgets": [budget], "rate_limits": [
        {"id": "per-minute", "limit": 10, "per_seconds": 60.0, "remaining": 9, "unit": "requests"}]}


# -- the admin usage endpoint ----------------------------------------------------------------------------------------
async def test_usage_endpoint_not_found_for_unknown_agent(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with (running(write_rules(tmp_path, {"rate-bot": RATE_BOT})) as stack,
                http.get(f"{stack.admin_url}/agents/nobody/usage", headers=stack.admin_headers) as resp):
        status, body = resp.status, await resp.json()
    assert (status, body) == (404, {"error": {"type": "not_found", "message": "no agent 'nobody' in the rules"}})


@pytest.mark.parametrize("credential", [None, "agent"])
async def test_usage_endpoint_unauthenticated_without_admin_credential(
        tmp_path: Path, http: aiohttp.ClientSession, credential: str | None) -> None:
    async with running(write_rules(tmp_path, {"rate-bot": RATE_BOT})) as stack:
        headers = {"Authorization": f"Bearer {stack.token('rate-bot')}"} if credential else {}
        async with http.get(f"{stack.admin_url}/agents/rate-bot/usage", headers=headers) as resp:
            status, body = resp.status, await resp.json()
            challenge = resp.headers.get("WWW-Authenticate")
    assert (status, body["error"]["type"]) == (401, "unauthenticated")
    assert challenge == 'Bearer realm="agent-gateway-admin"'
