"""The session of the store's RESP connection (`gateway.limits.resp`), as the store URL says: password, user,
database, TLS with a client certificate, and a sentinel's current master across a failover."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import trustme
from conftest import RedisProcess, free_port, redis_command
from resp_plans import NOW, PROMPTLY, assert_own, budget, plan, run  # noqa: F401 (run: a fixture)

from gateway.limits.redis_store import RedisStore
from gateway.limits.store import Refusal, Reservation, StoreUnavailable


# -- the session: password, user, database, TLS --------------------------------------------------------------------
@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    """A redis-server with a password and a user `agent` (started open: RedisProcess probes it with PING)."""
    server = RedisProcess()
    try:
        server.start()
        assert redis_command(server.port, "ACL", "SETUSER", "agent", "on", ">agent-pass", "~*", "+@all") == b"+OK"
        assert redis_command(server.port, "CONFIG", "SET", "requirepass", "s3cret") == b"+OK"
        yield server
    finally:
        server.close()


def admitted(result: Reservation | Refusal) -> Reservation:
    assert isinstance(result, Reservation), result
    return result


@pytest.mark.parametrize("credentials", [":s3cret", "agent:agent-pass"])
async def test_credentials_and_database_come_from_the_url(private_redis: RedisProcess, credentials: str) -> None:
    store = RedisStore.from_url(f"redis://{credentials}@127.0.0.1:{private_redis.port}/3", timeout=5.0,
                                clock=lambda: NOW)
    try:
        p = plan(1)
        assert_own(await store.reserve(p), 1)
        assert (await store.settle(admitted(await store.reserve(plan(2))), 2, 0)).applied
    finally:
        await store.close()
    with redis.Redis(port=private_redis.port, password="s3cret", db=3) as in_3, \
            redis.Redis(port=private_redis.port, password="s3cret", db=0) as in_0:
        assert in_3.exists(p.marker, budget(1).key) == 2
        assert in_0.dbsize() == 0


@pytest.mark.parametrize(("url", "message"), [
    ("redis://:wrong@127.0.0.1:{port}/0", "WRONGPASS"),
    # Without credentials, the session's opening (its SCRIPT LOADs) is refused.
    ("redis://127.0.0.1:{port}/0", "NOAUTH"),
    ("redis://:s3cret@127.0.0.1:{port}/99", "DB index is out of range"),
])
async def test_a_session_that_cannot_open_fails_every_caller_at_once_and_runs_nothing(
        private_redis: RedisProcess, url: str, message: str) -> None:
    store = RedisStore.from_url(url.format(port=private_redis.port), timeout=30.0, clock=lambda: NOW)
    try:
        async with asyncio.timeout(PROMPTLY):
            results = await asyncio.gather(*(store.reserve(plan(i)) for i in range(20)), return_exceptions=True)
        assert all(isinstance(result, StoreUnavailable) for result in results), results
        assert message in str(results[0])
    finally:
        await store.close()
    with redis.Redis(port=private_redis.port, password="s3cret") as raw:
        assert raw.dbsize() == 0  # nothing ran, in database 0 either


@pytest.fixture
def mutual_tls_redis() -> Iterator[tuple[int, dict[str, Path]]]:
    """A redis-server whose TLS port requires a client certificate from the test CA, and a password."""
    ca = trustme.CA()
    server = RedisProcess()
    paths = {name: server.dir / f"{name}.pem" for name in ("ca", "cert", "key", "client-cert", "client-key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("agent-gateway")
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client-cert"]))
    client.private_key_pem.write_to_path(str(paths["client-key"]))
    tls_port = free_port()
    server.extra_args = ("--tls-port", str(tls_port), "--tls-cert-file", str(paths["cert"]),
                         "--tls-key-file", str(paths["key"]), "--tls-ca-cert-file", str(paths["ca"]),
                         "--tls-auth-clients", "yes")
    try:
        server.start()
        assert redis_command(server.port, "CONFIG", "SET", "requirepass", "tls-pass") == b"+OK"  # after its PING
        yield tls_port, paths
    finally:
        server.close()


def test_rediss_with_a_client_certificate_and_a_password(
        run: Callable[..., None], mutual_tls_redis: tuple[int, dict[str, Path]]) -> None:
    tls_port, paths = mutual_tls_redis
    url = (f"rediss://:tls-pass@127.0.0.1:{tls_port}/2?ssl_ca_certs={paths['ca']}&ssl_cert_reqs=required"
           f"&ssl_check_hostname=true")

    async def scenario() -> None:
        with_cert = RedisStore.from_url(f"{url}&ssl_certfile={paths['client-cert']}&ssl_keyfile={paths['client-key']}",
                                        timeout=5.0, clock=lambda: NOW)
        without = RedisStore.from_url(url, timeout=5.0, clock=lambda: NOW)
        try:
            results = await asyncio.gather(*(with_cert.reserve(plan(i)) for i in range(50)))
            for i, result in enumerate(results):
                assert_own(result, i)
            with pytest.raises(StoreUnavailable):  # the server refuses a client without a certificate
                await without.reserve(plan(50))
        finally:
            await with_cert.close()
            await without.close()

    run(scenario())


# -- a sentinel's master, across a failover ------------------------------------------------------------------------
def until(condition: Callable[[], bool], what: str, within: float = 20.0) -> None:
    """Bounded polling of a condition another process makes true."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        time.sleep(0.05)  # between polls only


@pytest.fixture
def sentinel_pair(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess, int]]:
    """A master, its replica, and one sentinel that monitors them as `mymaster` (quorum 1)."""
    master = RedisProcess(extra_args=("--repl-diskless-sync-delay", "0"))  # the replica syncs at once, not in 5 s
    replica = RedisProcess()
    replica.extra_args = ("--replicaof", "127.0.0.1", str(master.port))
    sentinel: subprocess.Popen[bytes] | None = None
    try:
        master.start()
        replica.start()
        with redis.Redis(port=replica.port, decode_responses=True) as r:
            until(lambda: r.info("replication")["master_link_status"] == "up", "the replica synced")
        binary = shutil.which("redis-server")
        assert binary is not None
        port = free_port()
        config = tmp_path / "sentinel.conf"
        config.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                          f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
                          "sentinel down-after-milliseconds mymaster 2000\n"
                          "sentinel failover-timeout mymaster 10000\n")
        sentinel = subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as s:
            until(lambda: _answers(s) and len(s.sentinel_slaves("mymaster")) == 1, "the sentinel knows the replica")
        yield master, replica, port
    finally:
        if sentinel is not None:
            sentinel.terminate()
            sentinel.wait(10)
        replica.close()
        master.close()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


async def test_a_sentinel_store_follows_the_master_across_a_failover(
        sentinel_pair: tuple[RedisProcess, RedisProcess, int]) -> None:
    master, replica, sentinel_port = sentinel_pair
    store = RedisStore.from_url(f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0", timeout=5.0,
                                clock=lambda: NOW)
    try:
        before = plan(1)
        assert_own(await store.reserve(before), 1)
        assert redis_command(master.port, "EXISTS", before.marker) == b":1"
        master.stop()  # the master is lost; the sentinel is told to fail over at once, not after it notices
        with redis.Redis(port=sentinel_port, decode_responses=True, socket_timeout=2) as s:
            until(lambda: _failover(s), "the sentinel started a failover")
            # The failover is complete (and redis-py's Sentinel, which reads SENTINEL MASTERS, names the new master).
            until(lambda: s.sentinel_master("mymaster")["port"] == replica.port, "the new master")
        # At most the call that finds the old connection dead fails, and the next one reaches the new master.
        after, failures = plan(2), 0
        for _ in range(2):
            try:
                assert_own(await store.reserve(after), 2)
                break
            except StoreUnavailable:
                failures += 1
        assert failures <= 1
        assert redis_command(replica.port, "EXISTS", after.marker) == b":1"
    finally:
        await store.close()


def _failover(sentinel: redis.Redis) -> bool:
    try:
        return bool(sentinel.sentinel_failover("mymaster"))
    except redis.ResponseError:  # NOGOODSLAVE: the sentinel has not judged the replica fit yet
        return False

