"""Approvals on a real three-node Redis Cluster: held by one replica, decided through another, the holder woken
by the decision; the reuse, remember and timeout rules as on one Redis. Each replica is its own `RedisApprovals`
with its own cluster clients, as in separate gateway processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import RedisCluster

from gateway.approvals.record import Approval, ApprovalConflict
from gateway.approvals.redis_approvals import SAFETY_REREAD, RedisApprovals

Replicas = Callable[[], RedisApprovals]


def held(fingerprint: str = "fp-payment-25000", *, timeout: float = 30.0, holder_until: float = 0.0) -> Approval:
    now = time.time()
    return Approval(id=uuid.uuid4().hex, agent="invoice-bot", upstream="erp", method="POST", path="/payments",
                    verb="create", resource="payments", tool=None, rule="invoice-bot.yaml#hold[0]",
                    reason="Payments over 10,000 need a manager", fingerprint=fingerprint, created_at=now,
                    expires_at=now + timeout, evidence={"request.json.amount": 25000}, holder_until=holder_until)


@pytest.fixture
async def replicas(redis_cluster_url: str) -> AsyncIterator[Replicas]:
    made: list[RedisApprovals] = []

    def make() -> RedisApprovals:
        made.append(RedisApprovals.from_url(redis_cluster_url, timeout=5.0))
        return made[-1]

    yield make
    for approvals in made:
        await approvals.close()  # on a connection left bound to another event loop, this raised


def foreign_connections(approvals: RedisApprovals) -> list[str]:
    """Connections of the replica's cluster client opened on an event loop other than this test's."""
    client = approvals._client
    assert isinstance(client, RedisCluster)
    loop = asyncio.get_running_loop()
    return [node.name for node in client.nodes_manager.nodes_cache.values() for conn in node._connections
            if conn._writer is not None and conn._writer.transport._loop is not loop]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("approve", "outcome"), [(True, "approved"), (False, "denied")])
async def test_approval_held_by_one_replica_is_decided_through_another_on_a_cluster(
        replicas: Replicas, approve: bool, outcome: str) -> None:
    holder, approver = replicas(), replicas()
    await holder._bus.ready()
    approval = held()
    await holder.open(approval)  # the holder's first command: its cluster client learns the slot map here
    assert foreign_connections(holder) == []
    waiting = asyncio.create_task(holder.wait(approval))
    [listed] = await approver.list("pending", None, 10)
    assert (listed.id, listed.agent, listed.evidence) == (approval.id, "invoice-bot", {"request.json.amount": 25000})
    decided = await approver.decide(approval.id, approve, "alice", "checked", "edge_case", None)
    assert (decided.status, decided.decided_by, decided.category) == (outcome, "alice", "edge_case")
    async with asyncio.timeout(SAFETY_REREAD / 2):  # woken by the published decision, not the safety re-read
        final = await waiting
    assert (final.status, final.decided_by, final.decision_reason) == (outcome, "alice", "checked")
    with pytest.raises(ApprovalConflict, match=f"already {outcome} \\(by alice\\)"):
        await holder.decide(approval.id, True, "bob", None, None, None)
    assert await approver.list("pending", None, 10) == []
    assert [a.id for a in await approver.list(outcome, "invoice-bot", 10)] == [approval.id]


async def test_approval_after_the_holder_died_lets_the_identical_retry_through_once_on_a_cluster(
        replicas: Replicas) -> None:
    holder, approver, retrier = replicas(), replicas(), replicas()
    approval = held(holder_until=time.time() - 1)  # its holder's lease has lapsed: the holder died
    await holder.open(approval)
    await holder.close()
    [abandoned] = await approver.list("abandoned", None, 10)
    assert abandoned.id == approval.id
    assert await retrier.reuse(approval.fingerprint) is None  # not approved yet
    await approver.decide(approval.id, True, "alice", None, None, None)
    assert await retrier.reuse("fp-payment-25001") is None  # another request is not covered
    reused = await retrier.reuse(approval.fingerprint)
    assert reused is not None and (reused.id, reused.status, reused.used_by_retry) == (approval.id, "approved", True)
    assert await retrier.reuse(approval.fingerprint) is None  # exactly once
    assert await approver.reuse(approval.fingerprint) is None  # on any replica


async def test_approval_abandoned_when_the_agent_hung_up_can_still_be_approved_on_a_cluster(
        replicas: Replicas) -> None:
    holder, approver = replicas(), replicas()
    approval = held()
    await holder.open(approval)
    await holder.abandon(approval.id)
    assert [a.id for a in await approver.list("abandoned", None, 10)] == [approval.id]
    await approver.decide(approval.id, True, "alice", None, None, None)
    reused = await holder.reuse(approval.fingerprint)
    assert reused is not None and reused.id == approval.id
    assert await approver.reuse(approval.fingerprint) is None


async def test_approval_of_a_live_hold_is_not_reusable_by_a_retry_on_a_cluster(replicas: Replicas) -> None:
    holder, approver = replicas(), replicas()
    approval = held()
    await holder.open(approval)
    await approver.decide(approval.id, True, "alice", None, None, None)
    assert await approver.reuse(approval.fingerprint) is None  # the waiting holder consumed it, not a retry


async def test_approve_and_remember_reaches_every_replica_on_a_cluster(replicas: Replicas) -> None:
    holder, approver, other = replicas(), replicas(), replicas()
    approval = held()
    await holder.open(approval)
    before = time.time()
    await approver.decide(approval.id, True, "alice", None, None, remember_for=600)
    grant = await other.remembered("invoice-bot", "erp", "create", "payments")
    assert grant is not None and (grant.approval_id, grant.by) == (approval.id, "alice")
    assert before + 600 <= grant.until <= time.time() + 600
    assert await other.remembered("invoice-bot", "erp", "delete", "payments") is None
    assert await other.remembered("ops-bot", "erp", "create", "payments") is None


async def test_hold_times_out_unanswered_and_a_late_decision_is_refused_on_a_cluster(replicas: Replicas) -> None:
    holder, approver = replicas(), replicas()
    approval = held(timeout=0.3)
    await holder.open(approval)
    async with asyncio.timeout(3):
        final = await holder.wait(approval)
    assert final.status == "timeout"
    stored = await approver.get(approval.id)
    assert stored is not None and stored.status == "timeout"
    with pytest.raises(ApprovalConflict, match="already timeout"):
        await approver.decide(approval.id, True, "alice", None, None, None)
