"""Real gateway processes (`python -m gateway serve`) on free loopback ports, for multi-process tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
from conftest import ADMIN_TOKEN, SECRET, free_port


class GatewayProcess:
    def __init__(self, rules: Path, env: dict[str, str], log: Path, *extra: str) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.log = log
        self.argv = [sys.executable, "-m", "gateway", "serve", "--rules", str(rules), "--port", str(self.port),
                     "--admin-port", str(self.admin_port), "--trace", str(log.with_suffix(".trace.jsonl")), *extra]
        self.env = {**os.environ, **env, "AGENT_GATEWAY_JWT_SECRET": SECRET.decode(),
                    "AGENT_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as err:
            return subprocess.Popen(self.argv, env=self.env, stderr=err, stdout=subprocess.DEVNULL)

    async def start(self) -> GatewayProcess:
        self.proc = await asyncio.to_thread(self._spawn)
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:  # bounded by the timeout: retry the connection until the admin port answers
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited at start-up:\n{self.log.read_text()}")
                try:
                    async with http.get(f"{self.admin_url}/healthz") as response:
                        if response.status == 200:
                            return self
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)  # the process is still starting

    def kill(self) -> None:
        """SIGKILL: the process dies without a chance to clean up (a crash)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)
