"""Fake upstreams on loopback (OpenAI, Anthropic, an MCP server, an ERP REST API) for the demo and e2e tests.

Each app records every request before answering, and answers in the real API's shapes, deterministically,
well enough for the official `openai`, `anthropic` and `mcp` clients to parse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web

from .anthropic import anthropic_app
from .erp import VENDORS, http_tool_app
from .mcp import MCP_PROTOCOL_VERSIONS, MCP_TOOLS, mcp_app
from .openai import MODELS, openai_app
from .recording import MAX_BODY, RECORDER, Handler, Json, Recorded, Recorder

__all__ = [
    "MAX_BODY",
    "MCP_PROTOCOL_VERSIONS",
    "MCP_TOOLS",
    "MODELS",
    "RECORDER",
    "VENDORS",
    "FakeUpstreams",
    "Handler",
    "Json",
    "Recorded",
    "Recorder",
    "RunningFake",
    "anthropic_app",
    "http_tool_app",
    "mcp_app",
    "openai_app",
    "start_all",
    "start_app",
]


@dataclass(frozen=True)
class RunningFake:
    """A started fake: `url` is the base URL, `recorder` what it has seen."""

    url: str
    recorder: Recorder
    runner: web.AppRunner

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_app(app: web.Application, recorder: Recorder, host: str = "127.0.0.1") -> RunningFake:
    """Serve `app` on a free port of `host`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, 0).start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    return RunningFake(f"http://{host}:{port}", recorder, runner)


@dataclass(frozen=True)
class FakeUpstreams:
    """All four fakes. Upstream URLs for rule files: `openai_url` (ends in /v1), `anthropic_url`, `mcp_url`
    (the MCP endpoint is `mcp_url + "/mcp"`) and `http_tool_url`."""

    openai: RunningFake
    anthropic: RunningFake
    mcp: RunningFake
    http_tool: RunningFake

    @property
    def openai_url(self) -> str:
        return f"{self.openai.url}/v1"

    @property
    def anthropic_url(self) -> str:
        return self.anthropic.url

    @property
    def mcp_url(self) -> str:
        return self.mcp.url

    @property
    def http_tool_url(self) -> str:
        return self.http_tool.url

    async def close(self) -> None:
        for fake in (self.openai, self.anthropic, self.mcp, self.http_tool):
            await fake.close()

    async def __aenter__(self) -> FakeUpstreams:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def start_all(host: str = "127.0.0.1", *, mcp_sse: bool = False, chunk_delay: float = 0.0) -> FakeUpstreams:
    """Start the four fakes on free ports; close them with `await fakes.close()` or `async with`."""
    factories: list[Callable[[Recorder], web.Application]] = [
        lambda rec: openai_app(rec, chunk_delay=chunk_delay),
        lambda rec: anthropic_app(rec, chunk_delay=chunk_delay),
        lambda rec: mcp_app(rec, sse=mcp_sse),
        http_tool_app,
    ]
    started: list[RunningFake] = []
    try:
        for factory in factories:
            recorder = Recorder()
            started.append(await start_app(factory(recorder), recorder, host))
    except BaseException:
        for fake in started:
            await fake.close()
        raise
    return FakeUpstreams(*started)
