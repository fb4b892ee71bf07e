"""`rediss+cluster://` on a live Redis Cluster whose nodes speak only TLS (clients and the cluster bus) and require a
client certificate: the limits store, approvals and the kill switch through the gateway's own code, and a client
that cannot verify the nodes or has no certificate failing closed at once."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trustme
from conftest import RedisClusterProcesses, RedisTls
from test_cluster import NOW, budget, plan, rate, stores_on

from gateway.approvals.backends import open_approvals
from gateway.approvals.record import Approval
from gateway.approvals.redis_approvals import SAFETY_REREAD, RedisApprovals
from gateway.control import REFRESH_SECONDS, RedisControl
from gateway.errors import StoreUnavailable
from gateway.limits.redis_store import RedisStore
from gateway.limits.store import Refusal, Reservation
from gateway.settings import Settings

PROMPTLY = 5.0  # far below the negative tests' store timeout: they must fail by the TLS error, not by waiting


def held() -> Approval:
    now = time.time()
    return Approval(id=uuid.uuid4().hex, agent="invoice-bot", upstream="erp", method="POST", path="/payments",
                    verb="create", resource="payments", tool=None, rule="invoice-bot.yaml#hold[0]",
                    reason="Payments over 10,000 need a manager", fingerprint="fp-payment-25000", created_at=now,
                    expires_at=now + 30, evidence={"request.json.amount": 25000})


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    cluster = RedisClusterProcesses(tls=RedisTls.make(tmp_path_factory.mktemp("cluster-tls")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
        # redis-py's cluster client does not finish closing a TLS connection the server refused (the fail-closed
        # cases below, under load): its transport outlives the test's event loop and is reclaimed by a later,
        # random garbage collection, whose ResourceWarning would fail whichever test happened to be running.
        # Reclaimed here, once every test of this module (and its loop) is done, so it cannot.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@pytest.fixture
def tls_cluster_url(tls_cluster: RedisClusterProcesses) -> str:
    tls_cluster.flush()
    return tls_cluster.url


@pytest.fixture
async def tls_stores(tls_cluster_url: str) -> AsyncIterator[Callable[[], RedisStore]]:
    async with stores_on(tls_cluster_url) as make:
        yield make


def test_tls_cluster_url_names_every_node_and_the_client_certificate(tls_cluster: RedisClusterProcesses) -> None:
    assert tls_cluster.tls is not None
    assert tls_cluster.url.startswith("rediss+cluster://127.0.0.1:")
    assert f"ssl_certfile={tls_cluster.tls.client_cert}" in tls_cluster.url
    assert "cluster_state:ok" in tls_cluster.cli("cluster", "info", port=tls_cluster.ports[0])


async def test_reserve_and_settle_on_a_tls_cluster(tls_stores: Callable[[], RedisStore],
                                                   tls_cluster: RedisClusterProcesses) -> None:
    store = tls_stores()
    daily, rpm = budget("bot", limit=1000, alert_at=(0.5,)), rate("bot", limit=5)
    reservation = await store.reserve(plan(rates=(rpm,), budgets=(daily,), input=100, output=300))
    assert isinstance(reservation, Reservation)
    assert reservation.used == (400,) and reservation.remaining == (4,)
    settled = await store.settle(reservation, 100, 500)
    assert settled.applied and settled.used == (600,) and settled.alerts == ((0, 0.5),)
    assert not (await store.settle(reservation, 100, 500)).applied
    assert await store.peek((rpm,), (daily,), NOW) == ((4,), (600,))
    owner = tls_cluster.master_of(daily.key)  # the write is on the node that owns the slot, read over TLS
    assert tls_cluster.cli("get", daily.key, port=owner.port).strip() == "600"


async def test_concurrent_reserves_admit_exactly_what_fits_on_a_tls_cluster(
        tls_stores: Callable[[], RedisStore]) -> None:
    stores = [tls_stores() for _ in range(3)]
    daily = budget("bot", limit=1000)
    results = await asyncio.gather(*(stores[i % 3].reserve(plan(budgets=(daily,), output=100)) for i in range(50)))
    assert sum(isinstance(r, Reservation) for r in results) == 10
    assert all(isinstance(r, Refusal) and r.counter == "daily" for r in results if not isinstance(r, Reservation))
    assert (await stores[1].peek((), (daily,), NOW))[1] == (1000,)


async def test_approval_decided_through_another_instance_wakes_the_holder_on_a_tls_cluster(
        tls_cluster_url: str) -> None:
    settings = Settings(redis_url=tls_cluster_url, store_timeout=5.0)
    holder, approver = open_approvals(settings), open_approvals(settings)
    assert isinstance(holder, RedisApprovals) and isinstance(approver, RedisApprovals)
    try:
        await holder._bus.ready()
        approval = held()
        await holder.open(approval)
        waiting = asyncio.create_task(holder.wait(approval))
        [listed] = await approver.list("pending", None, 10)
        assert listed.id == approval.id
        await approver.decide(approval.id, True, "alice", "over TLS", None, None)
        async with asyncio.timeout(SAFETY_REREAD / 2):  # woken by the published decision, not the safety re-read
            final = await waiting
        assert (final.status, final.decided_by, final.decision_reason) == ("approved", "alice", "over TLS")
    finally:
        await holder.close()
        await approver.close()


async def test_control_pause_reaches_another_instance_on_a_tls_cluster(tls_cluster_url: str) -> None:
    first, second = RedisControl(tls_cluster_url, 5.0), RedisControl(tls_cluster_url, 5.0)
    heard = asyncio.Event()
    second.listeners.append(lambda agent, pause: heard.set() if agent == "bot" and pause else None)
    try:
        await first.start()
        await second.start()
        await first.pause("bot", "ops", "over TLS")
        async with asyncio.timeout(REFRESH_SECONDS / 2):  # told at once: before the first periodic re-read
            await heard.wait()
        paused = second.paused("bot")
        assert paused is not None and (paused.by, paused.reason) == ("ops", "over TLS")
        await first.resume("bot")
    finally:
        await first.close()
        await second.close()


def untrusting(url: str, tmp_path: Path, case: str) -> str:
    if case == "another CA":
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        query = url.partition("?")[2].split("&")
        return url.partition("?")[0] + "?" + "&".join([f"ssl_ca_certs={other}", *query[1:]])
    return url.partition("&ssl_certfile=")[0]  # the CA, but no client certificate


@pytest.mark.parametrize("case", ["another CA", "no client certificate"])
async def test_a_client_that_fails_tls_fails_closed_at_once_on_a_tls_cluster(
        tls_cluster_url: str, tmp_path: Path, case: str) -> None:
    url = untrusting(tls_cluster_url, tmp_path, case)
    store = RedisStore.from_url(url, timeout=30.0, clock=lambda: NOW)
    approvals = RedisApprovals.from_url(url, timeout=30.0)
    control = RedisControl(url, 30.0)
    try:
        async with asyncio.timeout(PROMPTLY):
            await store.start()  # swallows the failure: the first call retries
            results = await asyncio.gather(*(store.reserve(plan(budgets=(budget("bot"),), output=1))
                                             for _ in range(5)), return_exceptions=True)
            assert all(isinstance(r, StoreUnavailable) for r in results), results
            with pytest.raises(StoreUnavailable):
                await store.peek((), (budget("bot"),), NOW)
            with pytest.raises(StoreUnavailable):
                await approvals.open(held())
            with pytest.raises(StoreUnavailable):
                await control.pause("bot", "ops", "untrusted")
    finally:
        await store.close()
        await approvals.close()
        await control.close()
