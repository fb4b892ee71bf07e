"""Locust: simulated agents calling a running gateway (chat, streams, embeddings, ERP and MCP tools, denials,
a rate-limit burst, optionally held payments). See loadtests/README.md.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080

Tokens come from AGENT_TOKENS (`agent=jwt,agent=jwt`) or are minted with AGENT_GATEWAY_JWT_SECRET. The scenario
table, and everything else that is not locust, is in scenarios.py. A denial, a 429 or a held call that the agent
gives up on counts as a success where the scenario expects it; anything else is a failure.
"""

from __future__ import annotations

import itertools
import os
import random
from typing import Any

from locust import HttpUser, between, events, task
from requests import RequestException, Timeout
from scenarios import (
    Call,
    LoadSettings,
    Outcome,
    Scenario,
    mcp_initialize,
    outcome,
    pick,
    plan,
    scenarios,
    settings_from_env,
    stream_complete,
)


@events.init.add_listener  # type: ignore[untyped-decorator]  # locust leaves add_listener untyped
def check_settings(environment: Any, **_: Any) -> None:
    """Fail at start-up, not in every user, when the environment cannot be used."""
    settings = settings_from_env(os.environ)
    missing = plan(scenarios(settings), settings.tokens)[1]
    if missing:
        print(f"locustfile: no token for {', '.join(missing)}: their scenarios are left out")


class Agent(HttpUser):
    """One simulated agent process: picks a scenario by weight, then thinks for a while (an LLM turn)."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.settings: LoadSettings = settings_from_env(os.environ)
        self.runnable, _ = plan(scenarios(self.settings), self.settings.tokens)
        self.rng = random.Random()
        self.sequence = itertools.count(1)
        self.mcp_sessions: dict[str, str] = {}
        for agent in sorted({s.agent for s in self.runnable if s.build(self.rng, 0).mcp}):
            self.open_mcp_session(agent)

    def open_mcp_session(self, agent: str) -> None:
        """MCP clients initialize first; a server that issues an Mcp-Session-Id expects it on later calls."""
        call = mcp_initialize()
        with self.client.request(call.method, call.path, data=call.body(), headers=self.headers(agent, call),
                                 name="mcp initialize", timeout=self.settings.timeout,
                                 catch_response=True) as response:
            result = outcome(response.status_code, response.content or b"", mcp=True)
            if result == "allowed":
                if session := response.headers.get("Mcp-Session-Id"):
                    self.mcp_sessions[agent] = session
                response.success()
            else:
                response.failure(f"initialize: {result} (HTTP {response.status_code})")

    def headers(self, agent: str, call: Call) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.settings.tokens[agent]}"}
        if call.json is not None:
            headers["Content-Type"] = "application/json"
        if call.mcp:
            headers["Accept"] = "application/json, text/event-stream"
            if agent in self.mcp_sessions:
                headers["Mcp-Session-Id"] = self.mcp_sessions[agent]
        if call.stream == "anthropic":
            headers["anthropic-version"] = "2023-06-01"
        return headers

    @task
    def act(self) -> None:
        scenario = pick(self.rng, self.runnable)
        for _ in range(scenario.repeat):
            self.send(scenario, scenario.build(self.rng, next(self.sequence)))

    def send(self, scenario: Scenario, call: Call) -> None:
        with self.client.request(call.method, call.path, data=call.body(), headers=self.headers(scenario.agent, call),
                                 name=scenario.name, stream=call.stream is not None, timeout=scenario.timeout,
                                 catch_response=True) as response:
            if response.error is not None:  # no response: locust reports status 0
                result: Outcome = "held" if isinstance(response.error, Timeout) else "error"
                detail = type(response.error).__name__
            else:
                try:
                    # A stream is read to its last event: the call is not over until the agent has every token.
                    body = b"".join(response.iter_content(8192)) if call.stream else response.content
                except RequestException as exc:
                    response.failure(f"stream broke: {type(exc).__name__}")
                    return
                result = outcome(response.status_code, body or b"", call.mcp)
                detail = f"HTTP {response.status_code}"
                if result == "allowed" and call.stream and not stream_complete(call.stream, body):
                    result, detail = "error", "stream ended early"
            if result in scenario.expect:
                response.success()
            else:
                response.failure(f"{result} ({detail}); expected {' or '.join(sorted(scenario.expect))}")
