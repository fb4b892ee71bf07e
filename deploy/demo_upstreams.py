"""The demo's fake upstreams (OpenAI, Anthropic, an MCP server, an ERP REST API) on fixed ports, for compose.

    python deploy/demo_upstreams.py [--host 0.0.0.0]

They answer in the real APIs' shapes and accept any credential, so the gateway runs on rules/ with no real key.
Point the rules' ${..._URL} variables at them (see docker-compose.yml): OPENAI_BASE_URL=http://HOST:9101/v1,
ANTHROPIC_BASE_URL=http://HOST:9102, CRM_MCP_URL=http://HOST:9103, ERP_URL=http://HOST:9104.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable

from aiohttp import web

from gateway.demo.fakes import Recorder, anthropic_app, http_tool_app, mcp_app, openai_app

PORTS: dict[str, tuple[int, Callable[[Recorder], web.Application]]] = {
    "openai": (9101, openai_app),
    "anthropic": (9102, anthropic_app),
    "crm-tools (mcp)": (9103, mcp_app),
    "erp (http)": (9104, http_tool_app),
}


async def main(host: str) -> None:
    runners: list[web.AppRunner] = []
    try:
        for name, (port, factory) in PORTS.items():
            runner = web.AppRunner(factory(Recorder()), access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port).start()
            print(f"fake {name} on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    asyncio.run(main(parser.parse_args().host))
