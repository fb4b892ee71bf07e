"""A Redis Cluster master dies (SIGKILL) and its replica takes over: while the slot has no master the gateway's
Redis clients fail closed (`StoreUnavailable`, never an admit), and after the promotion the same client objects
work again, on the state that was replicated before the kill.

The replica is told not to fail over until the outage has been checked (`cluster-replica-no-failover`), so the
outage is a window the test controls, not a race with the election.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from conftest import RedisClusterProcesses, RedisProcess
from test_cluster import NOW, budget, plan
from test_cluster_tls import held

from gateway.approvals.redis_approvals import PREFIX, SAFETY_REREAD, RedisApprovals
from gateway.control import PAUSED_KEY, RedisControl
from gateway.errors import StoreUnavailable
from gateway.limits.plan import agent_tag
from gateway.limits.redis_store import RedisStore
from gateway.limits.store import Refusal, Reservation
from gateway.redisbus import RedisBus

FAILOVER_WITHIN = 20.0  # node timeout 1 s, then the election: a few seconds on a busy machine
# Six nodes to start and sync, a failover to wait out: more than the suite's 60 s default on a loaded machine.
pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def failover_cluster() -> Iterator[RedisClusterProcesses]:
    """Its own six nodes (three masters, each with a replica), so the session's cluster is never disturbed."""
    cluster = RedisClusterProcesses(replicas=1, node_timeout_ms=1000)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def kill_master(cluster: RedisClusterProcesses, key: str) -> tuple[RedisProcess, RedisProcess]:
    """SIGKILL the master of `key`'s slot once its replica holds every write; the replica waits to be let go.
    (Blocking: tests run it in a thread, so the clients' background tasks go on meanwhile, as in production.)"""
    master = cluster.master_of(key)
    replica = cluster.replica_of(master)
    assert cluster.cli("config", "set", "cluster-replica-no-failover", "yes", port=replica.port).strip() == "OK"
    assert cluster.replicated(key) == 1
    master.kill()
    cluster.wait_until(lambda: set(cluster.cluster_states()) == {"fail"}, "the cluster declares the master failed",
                       FAILOVER_WITHIN)
    return master, replica


def promote(cluster: RedisClusterProcesses, replica: RedisProcess, key: str) -> None:
    assert cluster.cli("config", "set", "cluster-replica-no-failover", "no", port=replica.port).strip() == "OK"
    def promoted() -> bool:
        if set(cluster.cluster_states()) != {"ok"}:
            return False
        try:
            return cluster.master_of(key) is replica
        except AssertionError:  # mid-election: no live master listed for the slot yet
            return False

    cluster.wait_until(promoted, "the replica promoted and the cluster ok", FAILOVER_WITHIN)


def agent_on(cluster: RedisClusterProcesses, key: str) -> str:
    """An agent whose budget lives on the same master as `key`."""
    master = cluster.master_of(key)
    for i in range(100):
        agent = f"agent-{i}"
        if cluster.master_of(agent_tag(agent)) is master:
            return agent
    raise AssertionError(f"no agent on the master of {key}")


async def test_store_and_approvals_fail_closed_in_a_failover_and_recover_with_the_replicated_state(
        failover_cluster: RedisClusterProcesses) -> None:
    cluster = failover_cluster
    approvals_key = f"{PREFIX}:ap:x"
    agent = agent_on(cluster, approvals_key)  # one kill takes down both the agent's budget and the approvals
    daily = budget(agent, limit=1000)
    store = RedisStore.from_url(cluster.url, timeout=2.0, clock=lambda: NOW)
    holder = RedisApprovals.from_url(cluster.url, timeout=2.0)
    approver = RedisApprovals.from_url(cluster.url, timeout=2.0)
    try:
        await store.start()
        reservation = await store.reserve(plan(agent, budgets=(daily,), output=600))
        assert isinstance(reservation, Reservation)
        assert (await store.settle(reservation, 0, 700)).used == (700,)
        await holder._bus.ready()
        approval = held()
        await holder.open(approval)
        waiting = asyncio.create_task(holder.wait(approval))

        _, replica = await asyncio.to_thread(kill_master, cluster, daily.key)
        for _ in range(2):  # nothing is admitted while the slot has no master, and nothing hangs
            with pytest.raises(StoreUnavailable):
                await store.reserve(plan(agent, budgets=(daily,), output=1))
        with pytest.raises(StoreUnavailable):
            await store.peek((), (daily,), NOW)
        with pytest.raises(StoreUnavailable):
            await approver.decide(approval.id, True, "alice", None, None, None)
        assert not waiting.done()

        await asyncio.to_thread(promote, cluster, replica, daily.key)
        # The same objects, not restarted: the budget as replicated (700 of 1000), so exactly 300 more fit.
        assert isinstance(refused := await store.reserve(plan(agent, budgets=(daily,), output=301)), Refusal)
        assert refused.counter == "daily"
        assert isinstance(await store.reserve(plan(agent, budgets=(daily,), output=300)), Reservation)
        assert await store.peek((), (daily,), NOW) == ((), (1000,))
        # The approval opened before the kill is still pending on the new master; deciding it wakes the holder.
        [pending] = await approver.list("pending", None, 10)
        assert pending.id == approval.id
        await approver.decide(approval.id, True, "alice", "after failover", None, None)
        async with asyncio.timeout(SAFETY_REREAD + 2):
            final = await waiting
        assert (final.status, final.decided_by) == ("approved", "alice")
    finally:
        await store.close()
        await holder.close()
        await approver.close()


async def test_kill_switch_and_bus_recover_after_a_failover(failover_cluster: RedisClusterProcesses) -> None:
    cluster = failover_cluster
    channel = f"agw:{{control}}:test-{uuid.uuid4().hex}"  # the hash tag: the channel's node is the control key's
    first, second = RedisControl(cluster.url, 2.0), RedisControl(cluster.url, 2.0)
    bus, publisher = RedisBus(cluster.url, 2.0), RedisBus(cluster.url, 2.0)
    heard: asyncio.Queue[str] = asyncio.Queue()
    reconnected, seen = asyncio.Event(), asyncio.Event()
    bus.on_reconnect.append(reconnected.set)
    second.listeners.append(lambda agent, pause: seen.set() if agent == "bot" and pause else None)
    try:
        bus.subscribe(channel, heard.put_nowait)
        await first.start()
        await second.start()
        await bus.ready()
        await first.pause("bot", "ops", "before the kill")
        async with asyncio.timeout(5):
            await seen.wait()

        # One master takes the control key and the test bus's subscription down with it.
        _, replica = await asyncio.to_thread(kill_master, cluster, PAUSED_KEY)
        with pytest.raises(StoreUnavailable):
            await first.resume("bot")
        assert first.paused("bot") is not None  # a resume that did not reach the store is not applied locally
        assert second.paused("bot") is not None  # the local view stays as it was: never unpaused by an outage

        await asyncio.to_thread(promote, cluster, replica, PAUSED_KEY)
        late = RedisControl(cluster.url, 2.0)  # a replica starting now reads the pause that was replicated
        try:
            await late.start()
            paused = late.paused("bot")
            assert paused is not None and paused.reason == "before the kill"
        finally:
            await late.close()
        await first.resume("bot")  # the same object as before the kill
        resumed = asyncio.Event()
        second.listeners.append(lambda agent, pause: resumed.set() if agent == "bot" and pause is None else None)
        async with asyncio.timeout(5):
            await resumed.wait()
        assert second.paused("bot") is None
        async with asyncio.timeout(FAILOVER_WITHIN):  # the bus resubscribed by itself
            await reconnected.wait()
        await publisher.publish(channel, "after failover")
        async with asyncio.timeout(5):
            assert await heard.get() == "after failover"
    finally:
        await first.close()
        await second.close()
        await bus.close()
        await publisher.close()
