"""The Redis store on a real three-node Redis Cluster, and the store URL forms (`gateway.redis_urls`)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trustme
from conftest import RedisClusterProcesses, RedisProcess, free_port, redis_command
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from gateway.approvals.redis_approvals import RedisApprovals
from gateway.control import REFRESH_SECONDS, RedisControl
from gateway.limits.plan import agent_tag
from gateway.limits.redis_store import RedisStore
from gateway.limits.store import BudgetCounter, Plan, RateCounter, Refusal, Reservation
from gateway.redis_urls import redis_client

NOW = 1_700_000_000.0


def rate(agent: str, limit: int = 5, period: float = 10.0) -> RateCounter:
    return RateCounter("rpm", f"{agent_tag(agent)}:rl:rpm", limit, period, 1, 0, 0)


def budget(agent: str, limit: int = 1000, alert_at: tuple[float, ...] = ()) -> BudgetCounter:
    tag = agent_tag(agent)
    return BudgetCounter("daily", f"{tag}:b:daily:2023-11-14", f"{tag}:a:daily:2023-11-14", limit, 1, 1,
                         "2023-11-14", resets_at=NOW + 3600, ttl=3600 + 86400, alert_at=alert_at, unit="tokens")


def plan(agent: str = "bot", *, rates: tuple[RateCounter, ...] = (), budgets: tuple[BudgetCounter, ...] = (),
         input: int = 0, output: int = 0) -> Plan:
    return Plan(agent, f"{agent_tag(agent)}:res:{uuid.uuid4().hex}", 600, rates, budgets, input, output, None, NOW)


@contextlib.asynccontextmanager
async def stores_on(url: str) -> AsyncIterator[Callable[[], RedisStore]]:
    """Stores on one cluster URL, made on demand (several act as several gateway replicas), all closed after."""
    made: list[RedisStore] = []

    def make() -> RedisStore:
        made.append(RedisStore.from_url(url, timeout=5.0, clock=lambda: NOW))
        return made[-1]

    try:
        yield make
    finally:
        for store in made:
            await store.close()


@pytest.fixture
async def cluster_stores(redis_cluster_url: str) -> AsyncIterator[Callable[[], RedisStore]]:
    async with stores_on(redis_cluster_url) as make:
        yield make


@pytest.fixture
async def raw_cluster(redis_cluster_url: str) -> AsyncIterator[RedisCluster]:
    client = redis_client(redis_cluster_url, socket_timeout=5.0, connect_timeout=5.0, decode_responses=True)
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


# -- the store contract's key behaviours, on the cluster ----------------------------------------------------------
async def test_reserve_and_settle_apply_once_on_a_cluster(cluster_stores: Callable[[], RedisStore]) -> None:
    store = cluster_stores()
    daily, rpm = budget("bot", limit=1000, alert_at=(0.5,)), rate("bot", limit=5)
    reservation = await store.reserve(plan(rates=(rpm,), budgets=(daily,), input=100, output=300))
    assert isinstance(reservation, Reservation)
    assert reservation.used == (400,) and reservation.remaining == (4,)
    settled = await store.settle(reservation, 100, 500)
    assert settled.applied and settled.used == (600,) and settled.alerts == ((0, 0.5),)
    again = await store.settle(reservation, 100, 500)
    assert not again.applied and again.used == (600,)
    assert await store.peek((rpm,), (daily,), NOW) == ((4,), (600,))


async def test_budget_refuses_on_a_cluster(cluster_stores: Callable[[], RedisStore]) -> None:
    store = cluster_stores()
    daily = budget("bot", limit=100)
    assert isinstance(await store.reserve(plan(budgets=(daily,), output=100)), Reservation)
    refusal = await store.reserve(plan(budgets=(daily,), output=1))
    assert isinstance(refusal, Refusal)
    assert (refusal.type, refusal.counter, refusal.retry_after) == ("budget_exceeded", "daily", 3600.0)


async def test_reserve_of_the_same_plan_twice_charges_once_on_a_cluster(
        cluster_stores: Callable[[], RedisStore]) -> None:
    store = cluster_stores()
    daily = budget("bot", limit=1000)
    same = plan(budgets=(daily,), output=10)
    first, second = await store.reserve(same), await store.reserve(same)
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    assert (await store.peek((), (daily,), NOW))[1] == (10,)


async def test_fifty_concurrent_reserves_admit_exactly_one_on_a_cluster(
        cluster_stores: Callable[[], RedisStore]) -> None:
    stores = [cluster_stores() for _ in range(3)]
    daily = budget("bot", limit=100)
    for store in stores:  # each client learns the cluster's slot map first, as a gateway's first calls do
        await store.peek((), (daily,), NOW)
    results = await asyncio.gather(*(stores[i % 3].reserve(plan(budgets=(daily,), output=100)) for i in range(50)))
    assert sum(isinstance(r, Reservation) for r in results) == 1
    assert all(isinstance(r, Refusal) and r.counter == "daily" for r in results if not isinstance(r, Reservation))
    assert (await stores[0].peek((), (daily,), NOW))[1] == (100,)


async def test_many_agents_at_once_spread_over_the_nodes(cluster_stores: Callable[[], RedisStore],
                                                        raw_cluster: RedisCluster) -> None:
    store = cluster_stores()
    agents = [f"agent-{i}" for i in range(30)]
    results = await asyncio.gather(*(store.reserve(plan(a, rates=(rate(a, limit=1),))) for a in agents * 2))
    admitted = [isinstance(r, Reservation) for r in results]
    assert [admitted[i] + admitted[i + 30] for i in range(30)] == [1] * 30  # each agent's limit, on its own node
    await raw_cluster.initialize()
    nodes = {raw_cluster.get_node_from_key(rate(a).key).name for a in agents}  # type: ignore[union-attr]
    assert len(nodes) == 3


async def test_the_first_calls_of_a_store_not_yet_started_go_to_their_keys_nodes(
        redis_cluster: RedisClusterProcesses, cluster_stores: Callable[[], RedisStore]) -> None:
    """A gateway whose cluster was down at start-up (so `start` learnt no slot map) meets it with a burst. redis-py
    picks a command's route before it first reads the slot map, so each call went to a random node: MOVED, and
    on every fifth MOVED the client closed every connection, the other calls' in-flight ones too, which failed
    them (the agents saw 503s)."""
    store = cluster_stores()
    agents = [f"agent-{i}" for i in range(30)]
    before = redis_cluster.redirects()
    results = await asyncio.gather(*(store.reserve(plan(a, rates=(rate(a, limit=1),))) for a in agents * 2),
                                   return_exceptions=True)
    assert redis_cluster.redirects() == before
    assert sum(isinstance(r, Reservation) for r in results) == 30


async def test_a_plans_keys_share_one_slot_and_agents_differ(raw_cluster: RedisCluster) -> None:
    def slots(agent: str) -> set[int]:
        p = plan(agent, rates=(rate(agent),), budgets=(budget(agent),))
        keys = [p.marker, *(r.key for r in p.rates), *(b.key for b in p.budgets), *(b.alert_key for b in p.budgets)]
        return {int(redis_command(raw_port, "CLUSTER", "KEYSLOT", k)[1:]) for k in keys}

    await raw_cluster.initialize()
    raw_port = int(raw_cluster.get_default_node().port)
    per_agent = [slots(a) for a in ("bot", "billing-bot", "crm-agent", "agent-7")]
    assert all(len(s) == 1 for s in per_agent)
    assert len(set().union(*per_agent)) == 4


async def test_scripts_are_reloaded_on_a_cluster_after_a_script_flush(cluster_stores: Callable[[], RedisStore],
                                                                     redis_cluster: RedisClusterProcesses) -> None:
    store = cluster_stores()
    await store.reserve(plan(rates=(rate("bot"),)))
    for port in redis_cluster.ports:
        assert redis_command(port, "SCRIPT", "FLUSH") == b"+OK"
    reservation = await store.reserve(plan(rates=(rate("bot"),)))
    assert isinstance(reservation, Reservation) and reservation.remaining == (3,)


# -- approvals and control start and work on a cluster ------------------------------------------------------------
async def test_control_pause_reaches_another_replica_on_a_cluster(redis_cluster_url: str) -> None:
    first, second = RedisControl(redis_cluster_url, 5.0), RedisControl(redis_cluster_url, 5.0)
    heard = asyncio.Event()
    second.listeners.append(lambda agent, pause: heard.set() if agent == "bot" and pause else None)
    try:
        await first.start()
        await second.start()  # subscribed once started
        await first.pause("bot", "ops", "test")
        async with asyncio.timeout(REFRESH_SECONDS / 2):  # told at once: before the first periodic re-read
            await heard.wait()
        assert second.paused("bot") is not None
        await first.resume("bot")
    finally:
        await first.close()
        await second.close()


async def test_control_pause_as_its_clients_first_call_is_seen_by_another_replica_on_a_cluster(
        redis_cluster_url: str) -> None:
    # The writer's cluster client learns the slot map on the pause itself (as after Redis was down at start, or
    # after a failover): a cluster MULTI did that on a throwaway event loop, and closing then failed.
    writer, reader = RedisControl(redis_cluster_url, 5.0), RedisControl(redis_cluster_url, 5.0)
    try:
        await writer.pause("bot", "ops", "before any read")
        await reader.start()
        paused = reader.paused("bot")
        assert paused is not None and (paused.by, paused.reason) == ("ops", "before any read")
        await writer.resume("bot")
    finally:
        await writer.close()
        await reader.close()


async def test_approvals_open_and_list_on_a_cluster(redis_cluster_url: str) -> None:
    approvals = RedisApprovals.from_url(redis_cluster_url, timeout=5.0)
    try:
        assert await approvals.list(None, None, 10) == []
        assert await approvals.remembered("bot", "openai", "chat", None) is None
    finally:
        await approvals.close()


# -- TLS: rediss:// for approvals and control (the store has its own test in test_store_contract.py) --------------
@pytest.fixture
def tls_redis() -> Iterator[str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server = RedisProcess()
    paths = {name: server.dir / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    tls_port = free_port()
    server.extra_args = ("--tls-port", str(tls_port), "--tls-cert-file", str(paths["cert"]),
                         "--tls-key-file", str(paths["key"]), "--tls-ca-cert-file", str(paths["ca"]),
                         "--tls-auth-clients", "no")
    server.start()
    yield f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={paths['ca']}"
    server.close()


async def test_rediss_url_serves_the_store_control_and_approvals(tls_redis: str) -> None:
    store = RedisStore.from_url(tls_redis, timeout=5.0, clock=lambda: NOW)
    control = RedisControl(tls_redis, 5.0)
    approvals = RedisApprovals.from_url(tls_redis, timeout=5.0)
    try:
        assert isinstance(await store.reserve(plan(rates=(rate("bot"),))), Reservation)
        await control.start()
        await control.pause("bot", "ops", "over TLS")
        assert control.paused("bot") is not None
        assert await approvals.list(None, None, 10) == []
    finally:
        await store.close()
        await control.close()
        await approvals.close()


async def test_rediss_url_refuses_an_untrusted_server(tls_redis: str) -> None:
    other_ca = Path(tls_redis.rpartition("=")[2]).with_name("other.pem")
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    store = RedisStore.from_url(tls_redis.rpartition("=")[0] + f"={other_ca}", timeout=5.0)
    try:
        with pytest.raises(Exception, match="certificate verify failed"):
            await store.reserve(plan(rates=(rate("bot"),)))
    finally:
        await store.close()


# -- a live sentinel ----------------------------------------------------------------------------------------------
@pytest.fixture
def sentinel_port(redis_server: RedisProcess, tmp_path: Path) -> Iterator[int]:
    """A redis-server in sentinel mode that names the session's redis-server as master `mymaster`."""
    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                      f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n")
    proc = subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:  # bounded: until the sentinel answers
            try:
                if redis_command(port, "PING") == b"+PONG":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis sentinel did not start"
            time.sleep(0.01)  # between connection attempts only
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_sentinel_url_reaches_the_master_the_sentinel_names(redis_url: str, redis_server: RedisProcess,
                                                                   sentinel_port: int) -> None:
    store = RedisStore.from_url(f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0", timeout=5.0,
                                clock=lambda: NOW)
    try:
        assert isinstance(await store.reserve(plan(rates=(rate("bot"),))), Reservation)
    finally:
        await store.close()
    assert redis_command(redis_server.port, "EXISTS", rate("bot").key) == b":1"


# -- URL parsing ----------------------------------------------------------------------------------------------------
async def test_sentinel_url_names_the_sentinels_the_service_and_the_db() -> None:
    client = redis_client("redis+sentinel://user:p%40ss@10.0.0.1:26379,10.0.0.2:26380/my-master/2",
                          socket_timeout=1.5, connect_timeout=0.5, decode_responses=True)
    try:
        assert isinstance(client, Redis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "my-master"
        sentinels = pool.sentinel_manager.sentinels
        assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
                for s in sentinels] == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
        assert sentinels[0].connection_pool.connection_kwargs["socket_timeout"] == 1.5
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (2, "user", "p@ss")
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (1.5, 0.5)
    finally:
        await client.aclose()


async def test_cluster_url_names_the_startup_nodes() -> None:
    client = redis_client("rediss+cluster://10.0.0.1:7000,10.0.0.2:7001?ssl_ca_certs=/tmp/ca.pem",
                          socket_timeout=1.0, connect_timeout=1.0)
    try:
        assert isinstance(client, RedisCluster)
        assert [(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()] == [
            ("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    finally:
        await client.aclose()


@pytest.mark.parametrize(("url", "match"), [
    ("unix:///tmp/redis.sock", "scheme 'unix'"),
    ("http://127.0.0.1", "scheme 'http'"),
    ("127.0.0.1:6379", "scheme"),
    ("redis+sentinel://127.0.0.1:26379", "service-name"),
    ("redis+sentinel://127.0.0.1:26379/mymaster/x", "service-name"),
    ("redis+sentinel://127.0.0.1/mymaster", "host:port"),
    ("redis+cluster://127.0.0.1:7000/3", "database 0"),
    ("redis+cluster://127.0.0.1:7000?ssl_ca_certs=/x", "rediss"),
    ("rediss+cluster://127.0.0.1:7000?foo=1", "unknown option 'foo'"),
    ("redis+cluster://user:secret@127.0.0.1:7000/3", r"user:\*\*\*@"),
])
def test_bad_store_urls_are_a_clear_value_error(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as caught:
        redis_client(url, socket_timeout=1.0, connect_timeout=1.0)
    assert "secret" not in str(caught.value)
