"""Shared fixtures: fake upstreams and a real gateway on loopback ports, with tokens for the example agents."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.demo.fakes import FakeUpstreams, start_all
from gateway.server import RunningGateway, start_gateway
from gateway.settings import Settings
from gateway.tokens import issue_token
from gateway.trace.sinks import MemorySink

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
SECRET = b"test-secret-0123456789abcdef-0123456789"
ADMIN_TOKEN = "test-admin-token"
UPSTREAM_KEYS = {"OPENAI_API_KEY": "sk-upstream-openai", "ANTHROPIC_API_KEY": "sk-ant-upstream",
                 "ERP_TOKEN": "erp-upstream-token", "CRM_MCP_TOKEN": "crm-upstream-token"}


@dataclass
class Stack:
    """A running gateway with its fake upstreams and trace sink."""

    gateway: RunningGateway
    fakes: FakeUpstreams
    trace: MemorySink
    rules: Path

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def admin_url(self) -> str:
        return self.gateway.admin_url

    def token(self, agent: str, ttl: float = 3600) -> str:
        return issue_token(agent, SECRET, ttl)

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def fake_env(fakes: FakeUpstreams) -> dict[str, str]:
    return {**UPSTREAM_KEYS, "OPENAI_BASE_URL": fakes.openai_url, "ANTHROPIC_BASE_URL": fakes.anthropic_url,
            "ERP_URL": fakes.http_tool_url, "CRM_MCP_URL": fakes.mcp_url}


async def start_stack(rules: Path = RULES, *, mcp_sse: bool = False, **overrides: object) -> Stack:
    fakes = await start_all(mcp_sse=mcp_sse)
    sink = MemorySink()
    settings = Settings(rules=str(rules), port=0, admin_port=0, jwt_secret=SECRET, admin_token=ADMIN_TOKEN,
                        env=fake_env(fakes), drain_timeout=5, **overrides)  # type: ignore[arg-type]
    try:
        gateway = await start_gateway(settings, sink=sink)
    except BaseException:
        await fakes.close()
        raise
    return Stack(gateway, fakes, sink, rules)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = await start_stack()
    yield s
    await s.gateway.close()
    await s.fakes.close()


@pytest.fixture
def rules_copy(tmp_path: Path) -> Callable[[], Path]:
    """A writable copy of the example rules, for tests that change them."""

    def make() -> Path:
        target = tmp_path / "rules"
        shutil.copytree(RULES, target)
        return target

    return make
