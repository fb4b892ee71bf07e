"""Shared fixtures: fake upstreams and a real gateway on loopback ports, with tokens for the example agents."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

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


def redis_command(port: int, *args: str, timeout: float = 2.0, tls: ssl.SSLContext | None = None) -> bytes:
    """One command over a raw socket (TLS with `tls`), first reply line returned: independent of the client under
    test."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            (tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


@dataclass(frozen=True)
class RedisTls:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, as files for redis-server and the
    store URL's TLS options."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path) -> RedisTls:
        ca = trustme.CA()
        server, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("agent-gateway")
        files = cls(*(directory / f"{name}.pem" for name in ("ca", "cert", "key", "client-cert", "client-key")))
        ca.cert_pem.write_to_path(str(files.ca))
        server.cert_chain_pems[0].write_to_path(str(files.cert))
        server.private_key_pem.write_to_path(str(files.key))
        client.cert_chain_pems[0].write_to_path(str(files.client_cert))
        client.private_key_pem.write_to_path(str(files.client_key))
        return files

    def server_args(self, port: int) -> tuple[str, ...]:
        """TLS only: no plaintext port; clients must show a certificate of the CA; the cluster bus is TLS too."""
        return ("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes",
                "--tls-cluster", "yes", "--tls-replication", "yes")

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca), "--cert", str(self.client_cert), "--key", str(self.client_key)]

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(self.client_cert, self.client_key)
        return context

    @property
    def query(self) -> str:
        return f"ssl_ca_certs={self.ca}&ssl_certfile={self.client_cert}&ssl_keyfile={self.client_key}"


class RedisProcess:
    """A redis-server on a loopback port that a test can stop, restart on the same port, pause and resume.

    `persistent` keeps the data across a stop/start (append-only file, fsync always), for tests of recovery;
    `extra_args` go to redis-server as they are (e.g. a TLS port); with `tls`, `port` is a TLS port and there is
    no plaintext one.
    """

    def __init__(self, port: int | None = None, *, persistent: bool = False, extra_args: tuple[str, ...] = (),
                 tls: RedisTls | None = None) -> None:
        self.port = port or free_port()
        self.persistent = persistent
        self.extra_args = extra_args
        self.tls = tls
        self._probe = tls.context() if tls else None
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
        if self.tls is not None:
            args += self.tls.server_args(self.port)
        args += self.extra_args
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_within
        while True:  # bounded retries of the connection attempt until the server answers PING
            if self._proc.poll() is not None:
                self._proc = None
                pytest.fail(f"redis-server exited at start-up:\n{self._log_tail()}", pytrace=False)
            try:
                if redis_command(self.port, "PING", tls=self._probe) == b"+PONG":
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

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash."""
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait(10)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None

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
def cluster_port(taken: Collection[int] = ()) -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too, and neither of which is in `taken`
    (the ports, and bus ports, of the cluster's other nodes: the OS may hand out a just-released port again)."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + 10000 <= 65535 and not {port, port + 10000} & set(taken):
            try:
                with socket.socket() as bus:
                    bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterProcesses:
    """Cluster-enabled redis-servers joined by `redis-cli --cluster create`: by default three masters, no replicas,
    each owning a third of the slots. With `replicas`, each master has that many replicas (synced before `start`
    returns); with `tls`, the nodes speak only TLS (clients and the cluster bus) and require a client certificate.
    """

    def __init__(self, masters: int = 3, *, replicas: int = 0, node_timeout_ms: int = 2000,
                 tls: RedisTls | None = None) -> None:
        self.replicas = replicas
        self.tls = tls
        self.nodes: list[RedisProcess] = []
        taken: set[int] = set()
        for _ in range(masters * (1 + replicas)):
            port = cluster_port(taken)
            taken |= {port, port + 10000}
            self.nodes.append(RedisProcess(port, tls=tls))
        for node in self.nodes:
            node.extra_args = ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{node.port}.conf",
                               "--cluster-node-timeout", str(node_timeout_ms),
                               *(("--repl-diskless-sync-delay", "0") if replicas else ()))  # default: 5 s
        self.ports = [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"rediss+cluster://{hosts}?{self.tls.query}" if self.tls else f"redis+cluster://{hosts}"

    def cli(self, *args: str, port: int | None = None, check: bool = False, stdin: str | None = None) -> str:
        """redis-cli (over TLS with the client certificate if the cluster is TLS), its output as text; `stdin`:
        commands, one a line, on one connection."""
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed; the Redis Cluster tests need it", pytrace=False)
        argv = [cli, *(self.tls.cli_args() if self.tls else ()), *(("-p", str(port)) if port else ()), *args]
        return subprocess.run(argv, capture_output=True, timeout=30, check=check,
                              input=stdin.encode() if stdin is not None else None).stdout.decode(errors="replace")

    def replicated(self, key: str) -> int:
        """How many replicas of `key`'s master hold every write made so far: a write of this connection to the
        slot, then WAIT (which waits for this connection's own last write, so it needs one)."""
        master = self.master_of(key)
        fence = f"{key}:fence" if "{" in key else f"{{{key}}}:fence"  # in the key's slot either way
        reply = self.cli(stdin=f"SET {fence} 1\nWAIT 1 2000\n", port=master.port).split()
        assert reply[0] == "OK", reply
        return int(reply[1])

    def cluster_states(self) -> list[str]:
        """cluster_state (ok or fail) as each live node reports it."""
        return [next((line.partition(":")[2].strip() for line in self.cli("cluster", "info", port=node.port)
                      .splitlines() if line.startswith("cluster_state:")), "unknown")
                for node in self.nodes if node.running]

    def start(self, ready_within: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        self.cli("--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes", check=True)
        self.wait_until(lambda: all("cluster_state:ok" in self.cli("cluster", "info", port=port)
                                    for port in self.ports), "cluster_state:ok on every node", ready_within)
        if self.replicas:  # a full sync per replica: slower than the rest on a loaded machine
            self.wait_until(lambda: all(self._synced(self.cli("info", "replication", port=port))
                                        for port in self.ports), "every replica in sync with its master",
                            2 * ready_within, lambda: self._replication_states())

    def _synced(self, replication: str) -> bool:
        if "role:master" in replication:
            return f"connected_slaves:{self.replicas}" in replication
        return "master_link_status:up" in replication and "master_sync_in_progress:0" in replication

    def _replication_states(self) -> str:
        """Each node's replication lines that say why it is not in sync yet (for a failure message)."""
        keys = ("role:", "connected_slaves:", "master_link_status:", "master_sync_in_progress:")
        return "\n".join(f"{port}: " + " ".join(line.strip() for line in self.cli("info", "replication", port=port)
                                                .splitlines() if line.startswith(keys))
                         for port in self.ports)

    def wait_until(self, condition: Callable[[], bool], what: str, within: float,
                   explain: Callable[[], str] | None = None) -> None:
        """Bounded polling of the nodes' own state (CLUSTER INFO, roles): the processes, not the code under test."""
        deadline = time.monotonic() + within
        while not condition():
            if time.monotonic() > deadline:
                detail = f"\n{explain()}" if explain is not None else ""
                pytest.fail(f"redis cluster: not within {within}s: {what}{detail}", pytrace=False)
            time.sleep(0.05)  # between polls of the nodes only

    def topology(self, port: int | None = None) -> list[ClusterNodeState]:
        """CLUSTER NODES as one live node sees it."""
        port = port or next(node.port for node in self.nodes if node.running)
        states = []
        for line in self.cli("cluster", "nodes", port=port).splitlines():
            fields = line.split()
            if len(fields) < 8:
                continue
            flags = set(fields[2].split(","))
            states.append(ClusterNodeState(fields[0], int(fields[1].split("@")[0].rpartition(":")[2]), flags,
                                           None if fields[3] == "-" else fields[3], tuple(fields[8:])))
        return states

    def master_of(self, key: str) -> RedisProcess:
        """The node that serves `key`'s slot now."""
        slot = int(self.cli("cluster", "keyslot", key, port=next(n.port for n in self.nodes if n.running)))
        for state in self.topology():
            if "master" in state.flags and "fail" not in state.flags and state.serves(slot):
                for node in self.nodes:
                    if node.port == state.port:
                        return node
        raise AssertionError(f"no live master serves slot {slot}")

    def replica_of(self, master: RedisProcess, within: float = 20.0) -> RedisProcess:
        """`master`'s replica, once the master's own CLUSTER NODES lists it (on a busy machine it may lag).

        No bare next() here or in `master_of`: these run in threads (asyncio.to_thread), and a StopIteration
        cannot cross into a future, so the test would hang instead of failing."""
        found: list[RedisProcess] = []

        def listed() -> bool:
            states = self.topology(master.port)
            ids = [state.id for state in states if state.port == master.port]
            ports = {state.port for state in states if ids and state.master_id == ids[0]}
            found[:] = [node for node in self.nodes if node.port in ports]
            return bool(found)

        self.wait_until(listed, f"a replica of the master on port {master.port}", within)
        return found[0]

    def redirects(self) -> int:
        """MOVED replies sent so far, summed over the live nodes (INFO errorstats): a client that routes every
        command by its key's slot causes none."""
        return sum(int(line.partition("count=")[2].split(",")[0]) for node in self.nodes if node.running
                   for line in self.cli("info", "errorstats", port=node.port).splitlines()
                   if line.startswith("errorstat_MOVED:"))

    def flush(self) -> None:
        for port in self.ports:
            assert redis_command(port, "FLUSHALL", tls=self.tls.context() if self.tls else None) == b"+OK"

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@dataclass(frozen=True)
class ClusterNodeState:
    """One line of CLUSTER NODES."""

    id: str
    port: int
    flags: set[str]
    master_id: str | None
    slots: tuple[str, ...]

    def serves(self, slot: int) -> bool:
        for item in self.slots:
            first, _, last = item.partition("-")
            if first.isdigit() and int(first) <= slot <= int(last or first):
                return True
        return False


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
