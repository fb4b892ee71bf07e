"""A store URL turned into a redis.asyncio client: one place that knows every scheme the gateway accepts.

- `redis://` and `rediss://` (TLS): one server, as redis-py parses it (`redis://[user:pass@]host:port/db?...`).
- `redis+sentinel://[user:pass@]host:port[,host:port...]/service-name[/db]`: the master that the sentinels name;
  the credentials are the master's.
- `redis+cluster://[user:pass@]host:port[,host:port...]` and `rediss+cluster://` (TLS): a Redis Cluster, from
  these startup nodes. The gateway's keys carry hash tags, so each script touches one slot.

Query parameters of the sentinel and cluster forms: the TLS options (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`,
`ssl_cert_reqs`, `ssl_check_hostname`). Anything else is a clear `ValueError`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio import Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

Client = Redis | RedisCluster

SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster", "rediss+cluster")
_TLS_OPTIONS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
_EXAMPLES = ("redis://host:6379/0, rediss://host:6380/0, redis+sentinel://host:26379,host:26380/mymaster, "
             "redis+cluster://host:7000,host:7001")


def is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


def redis_client(url: str, *, socket_timeout: float | None, connect_timeout: float, **options: Any) -> Client:
    """A client for `url`; `options` go to every connection (e.g. `decode_responses`, `health_check_interval`).

    Nothing connects here: the first command does.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"store URL scheme {scheme!r} is not supported: use one of {', '.join(SCHEMES)} "
                         f"({_EXAMPLES})")
    timeouts: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
    if scheme in ("redis", "rediss"):
        return Redis.from_url(url, **timeouts, **options)
    nodes = _nodes(parts.netloc.rpartition("@")[2], url)
    auth: dict[str, Any] = {"username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None}
    tls = _tls_options(parts.query, url)
    if scheme == "redis+sentinel":
        if tls:
            raise ValueError(f"store URL {_redacted(url)!r}: TLS options are not supported with redis+sentinel://")
        path = [segment for segment in parts.path.split("/") if segment]
        if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(f"store URL {_redacted(url)!r}: expected redis+sentinel://host:port[,host:port...]/"
                             "service-name[/db]")
        service, db = unquote(path[0]), int(path[1]) if len(path) == 2 else 0
        sentinel = Sentinel(nodes, sentinel_kwargs=dict(timeouts), **timeouts)  # type: ignore[no-untyped-call]
        master: Redis = sentinel.master_for(service, redis_class=_SentinelMaster, db=db, **auth, **options)
        return master
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"store URL {_redacted(url)!r}: a Redis Cluster has only database 0")
    if scheme == "rediss+cluster":
        tls["ssl"] = True
    elif tls:
        raise ValueError(f"store URL {_redacted(url)!r}: TLS options need rediss+cluster://")
    # Left to the cluster client's own defaults: redis-py 8's cluster connections fail concurrent first commands
    # with a per-connection health check or retry policy (or CLIENT SETINFO) on. The cluster client retries a
    # connection error itself (after refreshing its slot map), and a dead connection still fails the call.
    for option in ("health_check_interval", "retry"):
        options.pop(option, None)
    options.setdefault("driver_info", None)
    return ClusterClient(startup_nodes=[ClusterNode(host, port) for host, port in nodes], **timeouts, **auth, **tls,
                    **options)


class ClusterUnavailable(RedisConnectionError):
    """The cluster could not be reached or does not cover a slot now (redis-py's `RedisClusterException`)."""


class ClusterClient(RedisCluster):
    """redis-py's cluster client, whose "cannot be connected" and "slot not covered" errors are `RedisError`s,
    and whose slot map can be re-read on demand.

    Its first commands learn the slot map before they are routed (see `execute_command`).

    redis-py raises `RedisClusterException` for them, which is not a `RedisError`: every caller's
    `except RedisError` (the store, approvals, the kill switch, the bus) missed it, so a cluster unreachable at
    start crashed the gateway's start-up and ended the bus's reconnect loop for good. (A pipeline initialises
    through `initialize` too.)
    """

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._initialize:
                # redis-py picks a command's route before it first reads the slot map, so without one a keyed
                # command went to a random node: MOVED, and every fifth MOVED closed all the client's
                # connections, failing the calls in flight on them.
                await self.initialize()
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc

    async def reload_slots(self) -> None:
        """Read the slot map again now. redis-py does after its own commands fail, but not after a pub/sub
        connection's: a subscription whose node died (a failover) went on picking that node from a stale map."""
        self._initialize = True
        await self.initialize()


class _SentinelMaster(Redis):
    """The master of a sentinel-managed service; closing it closes the connections to the sentinels too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            for client in pool.sentinel_manager.sentinels:
                await client.aclose()


def _nodes(hosts: str, url: str) -> list[tuple[str, int]]:
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError(f"store URL {_redacted(url)!r}: expected host:port[,host:port...], got {item!r}")
        nodes.append((host, int(port)))
    return nodes


def _tls_options(query: str, url: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _TLS_OPTIONS:
            raise ValueError(f"store URL {_redacted(url)!r}: unknown option {name!r} "
                             f"(known: {', '.join(sorted(_TLS_OPTIONS))})")
        options[name] = value.lower() in ("1", "true", "yes") if name == "ssl_check_hostname" else value
    return options


def _redacted(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
