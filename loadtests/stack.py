"""The example rules on fake upstreams, for locust: like the demo, but with a JWT secret you can mint tokens for
every agent with, and no scripted agent.

    AGENT_GATEWAY_JWT_SECRET=$(openssl rand -hex 32) python loadtests/stack.py [--port 8080] [--rules rules]

Prints an `export AGENT_TOKENS=...` line for the agents in the rules. Loopback only; Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
from pathlib import Path

import uvloop

from gateway.demo.fakes import start_all
from gateway.demo.run import demo_env
from gateway.server import start_gateway
from gateway.settings import Settings
from gateway.tokens import issue_token
from gateway.trace.sinks import LineWriter

ROOT = Path(__file__).resolve().parent.parent


async def serve(rules: str, port: int, admin_port: int, secret: bytes, trace: str) -> None:
    fakes = await start_all()
    admin = secrets.token_urlsafe(24)
    settings = Settings(rules=rules, port=port, admin_port=admin_port, jwt_secret=secret, admin_token=admin,
                        env=demo_env(os.environ, fakes), trace=trace)
    try:
        gateway = await start_gateway(settings, sink=LineWriter(trace))
    except BaseException:
        await fakes.close()
        raise
    try:
        tokens = ",".join(f"{agent}={issue_token(agent, secret, 12 * 3600)}" for agent in gateway.runtime.policy.agents)
        print(f"gateway {gateway.url} (admin {gateway.admin_url}, admin token {admin}), trace in {trace}")
        print(f"export AGENT_TOKENS={tokens}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await gateway.close()
        await fakes.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", default=str(ROOT / "rules"))
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--admin-port", type=int, default=8081)
    parser.add_argument("--trace", default="loadtest-trace.jsonl")
    args = parser.parse_args()
    secret = os.environ.get("AGENT_GATEWAY_JWT_SECRET", "").encode()
    if not secret:
        print("stack: set AGENT_GATEWAY_JWT_SECRET (32+ bytes), e.g. $(openssl rand -hex 32)", file=sys.stderr)
        return 2
    uvloop.run(serve(args.rules, args.port, args.admin_port, secret, args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
