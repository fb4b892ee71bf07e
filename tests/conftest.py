"""Shared fixtures: fake upstreams and a real gateway on loopback ports, with tokens for the example agents."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
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


async def start_stack(rules: Path = RULES, *, mcp_sse: bool = False, chunk_delay: float = 0.0,
                      **overrides: object) -> Stack:
    fakes = await start_all(mcp_sse=mcp_sse, chunk_delay=chunk_delay)
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


# -- Redis: a real redis-server for the store tests (never skipped: a missing binary fails the run) --------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One command over a raw socket, first reply line returned: independent of the client under test."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


class RedisProcess:
    """A redis-server on a loopback port that a test can stop, restart on the same port, pause and resume.

    `persistent` keeps the data across a stop/start (append-only file, fsync always), for tests of recovery;
    `extra_args` go to redis-server as they are (e.g. a TLS port).
    """

    def __init__(self, port: int | None = None, *, persistent: bool = False, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.persistent = persistent
        self.extra_args = extra_args
        self.dir = Path(tempfile.mkdtemp(prefix="agw-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, ready_within: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; the Redis store tests need it (run scripts/setup.sh, or "
                        "apt-get install redis-server)", pytrace=False)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.persistent else "no", "--protected-mode", "yes",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        if self.persistent:
            args += ["--appendfsync", "always"]
        args += self.extra_args
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_within
        while True:  # bounded retries of the connection attempt until the server answers PING
            if self._proc.poll() is not None:
                self._proc = None
                pytest.fail(f"redis-server exited at start-up:\n{self._log_tail()}", pytrace=False)
            try:
                if redis_command(self.port, "PING") == b"+PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not answer PING within {ready_within}s:\n{self._log_tail()}",
                            pytrace=False)
            time.sleep(0.01)  # between connection attempts only

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._paused:
            self.resume()
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, but nothing ever answers."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _log_tail(self) -> str:
        log = self.dir / "redis.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else "(no log)"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """One redis-server for the whole run; tests get it through `redis_url`, which empties it first."""
    server = RedisProcess()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    assert redis_command(redis_server.port, "FLUSHALL") == b"+OK"
    return redis_server.url


# -- Redis Cluster: three real masters on loopback, no replicas ----------------------------------------------------
def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + 10000 <= 65535:
            try:
                with socket.socket() as bus:
                    bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterProcesses:
    """Three cluster-enabled redis-servers joined by `redis-cli --cluster create`, each owning a third of the slots."""

    def __init__(self) -> None:
        self.nodes = [RedisProcess(cluster_port()) for _ in range(3)]
        for node in self.nodes:
            node.extra_args = ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{node.port}.conf",
                               "--cluster-node-timeout", "2000")
        self.ports = [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, ready_within: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed; the Redis Cluster tests need it", pytrace=False)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + ready_within
        pending = list(self.ports)
        while pending:  # bounded: until every node reports the cluster as ok
            pending = [port for port in pending if b"cluster_state:ok" not in subprocess.run(
                [cli, "-p", str(port), "cluster", "info"], capture_output=True, timeout=5, check=False).stdout]
            if pending and time.monotonic() > deadline:
                pytest.fail(f"redis cluster not ok within {ready_within}s on ports {pending}", pytrace=False)
            if pending:
                time.sleep(0.05)  # between polls of CLUSTER INFO only

    def flush(self) -> None:
        for port in self.ports:
            assert redis_command(port, "FLUSHALL") == b"+OK"

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """One three-node Redis Cluster for the whole run; tests get it through `redis_cluster_url` (emptied first)."""
    cluster = RedisClusterProcesses()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterProcesses) -> str:
    redis_cluster.flush()
    return redis_cluster.url
