"""Agent scenarios for the locustfile, without locust: settings from the environment, agent tokens, request
builders, the scenario table and how a response counts (allowed, denied, held, rate limited).

The table speaks the example rules (rules/): agents invoice-bot, support-bot and ops-bot on the upstreams
openai, anthropic, erp and crm-tools. For your own deployment, edit `scenarios()`: agent names, paths, and
which outcomes each scenario expects under your rules.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.tokens import issue_token

EXAMPLE_AGENTS = ("invoice-bot", "support-bot", "ops-bot")
Outcome = Literal["allowed", "denied", "held", "rate_limited", "error"]
DENIALS = frozenset({"policy_denied", "approval_denied", "approval_timeout", "agent_paused"})
LIMITS = frozenset({"rate_limited", "budget_exceeded"})
# JSON-RPC codes the gateway answers MCP calls with (gateway/responses.py): -32001 refused, -32002 over a limit.
RPC_DENIED, RPC_LIMITED = -32001, -32002
PASSES: frozenset[Outcome] = frozenset({"allowed", "rate_limited"})  # budgets and rate limits are expected
VENDORS = ("v-100", "v-200", "v-300")
TOPICS = ("invoice", "purchase order", "credit note", "remittance advice", "vendor statement")


class SettingsError(ValueError):
    """A load-test environment variable that cannot be used; the message names it."""


@dataclass(frozen=True)
class LoadSettings:
    tokens: Mapping[str, str]  # agent id -> bearer token
    held_weight: int = 0  # payments that are held for a human: off unless LOAD_HELD_WEIGHT is set
    held_timeout: float = 2.0  # seconds a held payment waits before the simulated agent hangs up
    burst: int = 40  # requests in one rate-limit burst (ops-bot may make 30 a minute)
    timeout: float = 30.0  # client timeout of every other call


@dataclass(frozen=True)
class Call:
    """One HTTP request as an agent sends it to the gateway."""

    method: str
    path: str
    json: Any = None
    stream: Literal["openai", "anthropic"] | None = None  # an SSE response, read to its last event
    mcp: bool = False  # a JSON-RPC call: refusals come back as HTTP 200 with a JSON-RPC error

    def body(self) -> bytes | None:
        return None if self.json is None else orjson.dumps(self.json)


@dataclass(frozen=True)
class Scenario:
    """A kind of call: its name groups locust's statistics; `expect` lists the outcomes that are not failures."""

    name: str
    agent: str
    weight: int
    build: Callable[[random.Random, int], Call]  # (rng, sequence number) -> a fresh request
    expect: frozenset[Outcome]
    timeout: float = 30.0
    repeat: int = 1  # calls in a row each time the scenario is picked (a burst)


# -- settings ---------------------------------------------------------------------------------------------------


def parse_tokens(text: str) -> dict[str, str]:
    """`AGENT_TOKENS`: `agent=jwt,agent=jwt` (spaces around items ignored)."""
    tokens: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        agent, sep, token = item.partition("=")
        if not sep or not agent.strip() or not token.strip():
            raise SettingsError(f"AGENT_TOKENS: {item[:40]!r} is not agent=token")
        if agent.strip() in tokens:
            raise SettingsError(f"AGENT_TOKENS: agent {agent.strip()!r} is given twice")
        tokens[agent.strip()] = token.strip()
    if not tokens:
        raise SettingsError("AGENT_TOKENS is empty")
    return tokens


def mint_tokens(secret: str, agents: Sequence[str], ttl: float = 12 * 3600) -> dict[str, str]:
    """Tokens signed with the gateway's HS256 secret (what `agent-gateway token` does)."""
    try:
        return {agent: issue_token(agent, secret.encode(), ttl) for agent in agents}
    except ValueError as exc:
        raise SettingsError(f"AGENT_GATEWAY_JWT_SECRET: {exc}") from exc


def _number(env: Mapping[str, str], name: str, default: float, kind: type[int] | type[float]) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not a {'whole ' if kind is int else ''}number") from None
    if value < 0 or (kind is float and value == 0):
        raise SettingsError(f"{name}: must be more than zero" if kind is float else f"{name}: must not be negative")
    return value


def settings_from_env(env: Mapping[str, str]) -> LoadSettings:
    """Every setting of the load test, read from the environment in this one place."""
    if env.get("AGENT_TOKENS", "").strip():
        tokens = parse_tokens(env["AGENT_TOKENS"])
    elif env.get("AGENT_GATEWAY_JWT_SECRET", ""):
        agents = [a.strip() for a in env.get("LOAD_AGENTS", ",".join(EXAMPLE_AGENTS)).split(",") if a.strip()]
        tokens = mint_tokens(env["AGENT_GATEWAY_JWT_SECRET"], agents)
    else:
        raise SettingsError("set AGENT_TOKENS (agent=jwt,agent=jwt) or AGENT_GATEWAY_JWT_SECRET (tokens are minted)")
    return LoadSettings(tokens=tokens, held_weight=_number(env, "LOAD_HELD_WEIGHT", 0, int),
                        held_timeout=_number(env, "LOAD_HELD_TIMEOUT", 2.0, float),
                        burst=_number(env, "LOAD_BURST", 40, int), timeout=_number(env, "LOAD_TIMEOUT", 30.0, float))


# -- request builders --------------------------------------------------------------------------------------------


def _prompt(rng: random.Random, n: int) -> str:
    # Unique per call, so the gateway's loop detection (identical calls repeated) never fires.
    return f"Summarise {rng.choice(TOPICS)} INV-{n} for the AP team in {rng.randint(2, 5)} bullet points."


def chat(rng: random.Random, n: int, model: str = "gpt-4o-mini", stream: bool = False) -> Call:
    body: dict[str, Any] = {"model": model, "max_tokens": 128,
                            "messages": [{"role": "system", "content": "You are an accounts-payable assistant."},
                                         {"role": "user", "content": _prompt(rng, n)}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return Call("POST", "/openai/chat/completions", body, stream="openai" if stream else None)


def anthropic_message(rng: random.Random, n: int, model: str = "claude-haiku-4-5", stream: bool = False) -> Call:
    body: dict[str, Any] = {"model": model, "max_tokens": 256,
                            "messages": [{"role": "user", "content": f"Draft a reply to ticket T-{n}: "
                                                                      + _prompt(rng, n)}]}
    if stream:
        body["stream"] = True
    return Call("POST", "/anthropic/v1/messages", body, stream="anthropic" if stream else None)


def embedding(rng: random.Random, n: int, model: str = "text-embedding-3-small") -> Call:
    return Call("POST", "/openai/embeddings", {"model": model, "input": [_prompt(rng, n), f"vendor note {n}"]})


def vendor_read(rng: random.Random, n: int) -> Call:
    return Call("GET", "/erp/vendors" if n % 3 == 0 else f"/erp/vendors/{rng.choice(VENDORS)}")


def payment(rng: random.Random, n: int, amount: int | None = None) -> Call:
    """A payment; without `amount`, a small one (up to 10,000: the example rules allow it)."""
    return Call("POST", "/erp/payments", {"vendor": rng.choice(VENDORS), "invoice": f"INV-{n}",
                                          "amount": amount if amount is not None else rng.randint(10, 10_000)})


def vendor_delete(rng: random.Random, n: int) -> Call:
    return Call("DELETE", f"/erp/vendors/{rng.choice(VENDORS)}")


def mcp_request(n: int, method: str, params: Mapping[str, Any] | None = None) -> Call:
    return Call("POST", "/crm-tools/mcp", {"jsonrpc": "2.0", "id": n, "method": method, "params": dict(params or {})},
                mcp=True)


def mcp_tool(n: int, tool: str, arguments: Mapping[str, Any]) -> Call:
    return mcp_request(n, "tools/call", {"name": tool, "arguments": dict(arguments)})


def mcp_initialize(n: int = 0) -> Call:
    return mcp_request(n, "initialize", {"protocolVersion": "2025-03-26", "capabilities": {},
                                         "clientInfo": {"name": "agent-gateway-locust", "version": "1"}})


def account_lookup(rng: random.Random, n: int) -> Call:
    return mcp_tool(n, "lookup_account", {"account_id": f"a-{rng.randint(1, 5000)}"})


def account_delete(rng: random.Random, n: int) -> Call:
    return mcp_tool(n, "delete_account", {"account_id": f"a-{rng.randint(1, 5000)}"})


# -- the table ---------------------------------------------------------------------------------------------------


def scenarios(settings: LoadSettings) -> list[Scenario]:
    """What the simulated agents do, with weights, against the example rules (see the module docstring)."""
    t = settings.timeout
    return [
        Scenario("chat", "invoice-bot", 20, chat, PASSES, t),
        Scenario("chat stream", "invoice-bot", 10, lambda r, n: chat(r, n, stream=True), PASSES, t),
        Scenario("chat anthropic stream", "support-bot", 8, lambda r, n: anthropic_message(r, n, stream=True),
                 PASSES, t),
        Scenario("chat anthropic", "support-bot", 6, anthropic_message, PASSES, t),
        # The example rules grant embeddings only to ops-bot, whose audit mode holds them: invoice-bot's are
        # refused (no embed grant). Under rules that allow them, expect PASSES.
        Scenario("embeddings", "invoice-bot", 6, embedding, frozenset({"denied"}), t),
        Scenario("erp read", "invoice-bot", 15, vendor_read, PASSES, t),
        Scenario("erp payment small", "invoice-bot", 8, payment, PASSES, t),
        Scenario("erp payment held", "invoice-bot", settings.held_weight,
                 lambda r, n: payment(r, n, amount=25_000), frozenset({"held", "denied"}), settings.held_timeout),
        Scenario("mcp lookup_account", "support-bot", 12, account_lookup, PASSES, t),
        Scenario("denied: model not allowed", "invoice-bot", 3, lambda r, n: chat(r, n, model="gpt-4o"),
                 frozenset({"denied"}), t),
        Scenario("denied: vendor delete", "invoice-bot", 3, vendor_delete, frozenset({"denied"}), t),
        Scenario("denied: mcp delete_account", "support-bot", 2, account_delete, frozenset({"denied"}), t),
        # ops-bot may make 30 requests a minute in all: a burst past that is answered 429.
        Scenario("rate-limit burst", "ops-bot", 1 if settings.burst else 0, vendor_read, PASSES, t,
                 repeat=settings.burst),
    ]


def plan(table: Sequence[Scenario], tokens: Mapping[str, str]) -> tuple[list[Scenario], list[str]]:
    """The scenarios that can run (weight above zero, a token for their agent), and the agents left out."""
    runnable = [s for s in table if s.weight > 0 and s.agent in tokens]
    missing = sorted({s.agent for s in table if s.weight > 0 and s.agent not in tokens})
    if not runnable:
        raise SettingsError(f"no scenario has a token for its agent (tokens for: {', '.join(sorted(tokens))})")
    return runnable, missing


def pick(rng: random.Random, runnable: Sequence[Scenario]) -> Scenario:
    return rng.choices(runnable, weights=[s.weight for s in runnable])[0]


# -- outcomes ----------------------------------------------------------------------------------------------------


def _error_type(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error.get("type") if isinstance(error, dict) and isinstance(error.get("type"), str) else None


def _rpc_outcome(body: bytes) -> Outcome:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "error"
    answers = data if isinstance(data, list) else [data]
    codes = [a["error"].get("code") for a in answers if isinstance(a, dict) and isinstance(a.get("error"), dict)]
    if RPC_LIMITED in codes:
        return "rate_limited"
    if RPC_DENIED in codes:
        return "denied"
    return "error" if codes or not all(isinstance(a, dict) and "result" in a for a in answers) else "allowed"


def outcome(status: int, body: bytes, mcp: bool = False) -> Outcome:
    """How a finished response counts. `body` is the whole body (for a stream, every event)."""
    if status == 429:
        return "rate_limited" if _error_type(body) in LIMITS or not body else "error"
    if status == 403:
        return "denied" if _error_type(body) in DENIALS else "error"
    if mcp and status == 200:
        return _rpc_outcome(body)
    return "allowed" if 200 <= status < 300 else "error"


def stream_complete(kind: Literal["openai", "anthropic"], body: bytes) -> bool:
    """Whether an SSE body ran to its end: OpenAI's `data: [DONE]`, Anthropic's `message_stop` event."""
    marker = b"data: [DONE]" if kind == "openai" else b"event: message_stop"
    return marker in body[-256:]
