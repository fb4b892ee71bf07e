"""Approvals in Redis, shared by every replica: any admin API decides, the holding replica wakes at once.

Records are hashes (exact numbers; Redis's cjson would round timestamps), all under the `{approvals}` hash tag so
each transition, opening included, is one atomic script (never a MULTI: redis-py's cluster client queues each of
its commands on a throwaway event loop in a thread). Decisions are published; holders also re-read every few
seconds, in case a message was lost while the subscription was down. Holders renew a lease on what they hold, so
an approval whose holder died reads as `abandoned`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from ..errors import StoreUnavailable
from ..redis_calls import bounded
from ..redis_urls import redis_client
from ..redisbus import RedisBus
from ..tasks import stop
from .record import LEASE_SECONDS, RETRY_TTL, Approval, ApprovalConflict, Grant, grant_scope

PREFIX = "agw:{approvals}"
CHANNEL = "agw:approvals:decided"
RETENTION_MS = 30 * 86400 * 1000  # decided approvals stay listable for 30 days
KEEP = 10_000  # the history index keeps the newest this many
SAFETY_REREAD = 5.0  # seconds between re-reads while waiting, in case a published decision was missed

_FLOATS = {"created_at", "expires_at", "decided_at", "remembered_until", "holder_until", "retry_until"}

# KEYS: record, history index, open index, fingerprint key. ARGV: id, created_at, retention ms, keep, fingerprint
# ttl ms, then the record's field/value pairs.
OPEN = """
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[4]) - 1)
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[5])
return 1
"""

# KEYS: record, open index, grant key. ARGV: now, approve (1|0), by, reason, category, remember_for, retry_ttl, id.
DECIDE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
local now = tonumber(ARGV[1])
local holder = tonumber(redis.call('HGET', KEYS[1], 'holder_until') or '0')
if status == 'pending' and holder > 0 and holder < now then status = 'abandoned' end
if status ~= 'pending' and status ~= 'abandoned' then
  return {'conflict', status, redis.call('HGET', KEYS[1], 'decided_by') or ''}
end
local approve = ARGV[2] == '1'
redis.call('HSET', KEYS[1], 'status', approve and 'approved' or 'denied', 'decided_by', ARGV[3], 'decided_at', ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'decision_reason', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'category', ARGV[5]) end
if approve and status == 'abandoned' then
  redis.call('HSET', KEYS[1], 'retry_until', string.format('%.17g', now + tonumber(ARGV[7])))
end
local remember = tonumber(ARGV[6])
if approve and remember > 0 then
  local agent = redis.call('HGET', KEYS[1], 'agent')
  local until_ = string.format('%.17g', now + remember)
  redis.call('HSET', KEYS[1], 'remembered_until', until_)
  redis.call('SET', KEYS[3], cjson.encode({approval_id = ARGV[8], by = ARGV[3]}) .. '|' .. until_,
             'PX', math.ceil(remember * 1000))
end
redis.call('ZREM', KEYS[2], ARGV[8])
redis.call('PUBLISH', 'agw:approvals:decided', ARGV[8])
return {'ok'}
"""

# KEYS: record, open index. ARGV: new status, id. Only a pending approval moves (timeout, abandoned).
SETTLE_PENDING = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[1] ~= 'abandoned' then redis.call('ZREM', KEYS[2], ARGV[2]) end
return 1
"""

# KEYS: fingerprint key. ARGV: now, prefix. The approval for this fingerprint, if approved after abandonment,
# unused and in time: marked used and its id returned.
REUSE = """
local id = redis.call('GET', KEYS[1])
if not id then return false end
local key = ARGV[2] .. ':ap:' .. id
local f = redis.call('HMGET', key, 'status', 'retry_until', 'used_by_retry')
if f[1] ~= 'approved' or not f[2] or f[3] == '1' or tonumber(f[2]) < tonumber(ARGV[1]) then return false end
redis.call('HSET', key, 'used_by_retry', '1')
return id
"""


def _fields(approval: Approval) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for name, value in approval.to_json_dict().items():
        if value is None:
            continue
        if name == "evidence":
            out[name] = orjson.dumps(value, default=str).decode()
        elif isinstance(value, bool):
            out[name] = "1" if value else "0"
        elif isinstance(value, float):
            out[name] = repr(value)
        else:
            out[name] = str(value)
    return out


def _approval(fields: dict[str, str]) -> Approval:
    data: dict[str, Any] = {"resource": None, "tool": None, **fields}  # None fields are not stored in the hash
    for name in _FLOATS & data.keys():
        data[name] = float(data[name])
    data["evidence"] = orjson.loads(data.get("evidence", "{}"))
    data["used_by_retry"] = data.get("used_by_retry") == "1"
    return Approval.from_json_dict(data)


class RedisApprovals:
    def __init__(self, client: Redis | RedisCluster, bus: RedisBus, timeout: float = 1.0,
                 lease: float = LEASE_SECONDS) -> None:
        self.lease = lease
        self._client = client
        self._bus = bus
        self._timeout = timeout
        scripts = (OPEN, DECIDE, SETTLE_PENDING, REUSE)
        self._shas = {script: hashlib.sha1(script.encode()).hexdigest() for script in scripts}
        self._wakers: dict[str, asyncio.Event] = {}  # approvals this process holds -> woken on a decision
        self._lease_task: asyncio.Task[None] | None = None
        bus.subscribe(CHANNEL, self._decided)
        bus.on_reconnect.append(self._wake_all)  # decisions may have been missed: everyone re-reads

    @classmethod
    def from_url(cls, url: str, timeout: float = 1.0, lease: float = LEASE_SECONDS) -> RedisApprovals:
        client = redis_client(url, socket_timeout=timeout, connect_timeout=timeout, decode_responses=True)
        return cls(client, RedisBus(url, timeout), timeout, lease)

    def _key(self, approval_id: str) -> str:
        return f"{PREFIX}:ap:{approval_id}"

    async def _call(self, what: str, operation: Any) -> Any:
        return await bounded(what, operation, self._timeout)

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, and on NOSCRIPT the script itself: EVAL goes to the node that owns the keys (on a cluster,
        redis-py's own retry may load the script on another node and fail again)."""
        try:
            return await self._client.evalsha(self._shas[script], len(keys), *keys, *args)
        except NoScriptError:
            return await self._client.eval(script, len(keys), *keys, *args)

    def _decided(self, approval_id: str) -> None:
        waker = self._wakers.get(approval_id)
        if waker is not None:
            waker.set()

    def _wake_all(self) -> None:
        for waker in self._wakers.values():
            waker.set()

    # -- the protocol --------------------------------------------------------------------------------------------
    async def open(self, approval: Approval) -> None:
        self._wakers[approval.id] = asyncio.Event()
        keys = [self._key(approval.id), f"{PREFIX}:index", f"{PREFIX}:open", f"{PREFIX}:fp:{approval.fingerprint}"]
        fingerprint_ttl = int((approval.expires_at - approval.created_at + RETRY_TTL) * 1000) + 1
        fields = [item for pair in _fields(approval).items() for item in pair]
        try:
            await self._call("open approval", self._run(OPEN, keys=keys, args=[
                approval.id, repr(approval.created_at), RETENTION_MS, KEEP, fingerprint_ttl, *fields]))
        except StoreUnavailable:
            self._wakers.pop(approval.id, None)
            raise
        if self._lease_task is None or self._lease_task.done():
            self._lease_task = asyncio.get_running_loop().create_task(self._renew_leases())

    async def get(self, approval_id: str) -> Approval | None:
        fields = await self._call("get approval", self._client.hgetall(self._key(approval_id)))
        return _approval(fields) if fields else None

    async def list(self, status: str | None, agent: str | None, limit: int) -> list[Approval]:
        # Undecided ones (pending, or abandoned by a holder that died) have their own small index.
        index = f"{PREFIX}:open" if status in ("pending", "abandoned") else f"{PREFIX}:index"
        ids = await self._call("list approvals", self._client.zrevrange(index, 0, KEEP - 1))
        now = time.time()
        found: list[Approval] = []
        for start in range(0, len(ids), 200):
            pipe = self._client.pipeline(transaction=False)
            for approval_id in ids[start:start + 200]:
                pipe.hgetall(self._key(approval_id))
            for fields in await self._call("list approvals", pipe.execute()):
                if not fields:
                    continue
                approval = _approval(fields)
                if (status is None or approval.effective_status(now) == status) and agent in (None, approval.agent):
                    found.append(approval)
                    if len(found) >= limit:
                        return found
        return found

    async def decide(self, approval_id: str, approve: bool, by: str, reason: str | None, category: str | None,
                     remember_for: float | None) -> Approval:
        record = await self.get(approval_id)
        if record is None:
            raise KeyError(approval_id)
        grant_key = f"{PREFIX}:grant:{grant_scope(record.agent, record.upstream, record.verb, record.resource)}"
        args = [time.time(), "1" if approve else "0", by, reason or "", category or "", remember_for or 0, RETRY_TTL,
                approval_id]
        reply = await self._call("decide approval", self._run(DECIDE,
            keys=[self._key(approval_id), f"{PREFIX}:open", grant_key], args=args))
        if reply[0] == "missing":
            raise KeyError(approval_id)
        if reply[0] == "conflict":
            raise ApprovalConflict(f"approval {approval_id} is already {reply[1]}"
                                   + (f" (by {reply[2]})" if reply[2] else ""))
        decided = await self.get(approval_id)
        assert decided is not None
        return decided

    async def wait(self, approval: Approval) -> Approval:
        waker = self._wakers.setdefault(approval.id, asyncio.Event())
        try:
            while True:
                remaining = approval.expires_at - time.time()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, SAFETY_REREAD)):  # no extra task per held call
                        await waker.wait()
                waker.clear()
                with contextlib.suppress(StoreUnavailable):  # a store blip: keep waiting, re-read later
                    current = await self.get(approval.id)
                    if current is not None and current.status != "pending":
                        return current
            with contextlib.suppress(StoreUnavailable):
                await self._call("time out approval", self._run(SETTLE_PENDING,
                    keys=[self._key(approval.id), f"{PREFIX}:open"], args=["timeout", approval.id]))
                current = await self.get(approval.id)
                if current is not None and current.status != "pending":
                    return current
            approval.status = "timeout"  # fail closed even if the store cannot be told
            return approval
        finally:
            self._wakers.pop(approval.id, None)

    async def abandon(self, approval_id: str) -> None:
        await self._call("abandon approval", self._run(SETTLE_PENDING,
            keys=[self._key(approval_id), f"{PREFIX}:open"], args=["abandoned", approval_id]))

    async def reuse(self, fingerprint: str) -> Approval | None:
        approval_id = await self._call("reuse approval", self._run(REUSE,
            keys=[f"{PREFIX}:fp:{fingerprint}"], args=[time.time(), PREFIX]))
        return await self.get(approval_id) if approval_id else None

    async def remembered(self, agent: str, upstream: str, verb: str, resource: str | None) -> Grant | None:
        raw = await self._call("read grant", self._client.get(
            f"{PREFIX}:grant:{grant_scope(agent, upstream, verb, resource)}"))
        if not raw:
            return None
        body, _, until = raw.rpartition("|")
        data = orjson.loads(body)
        return Grant(approval_id=data["approval_id"], by=data["by"], until=float(until))

    async def _renew_leases(self) -> None:
        """Every third of the lease, extend it on everything this process holds (one pipeline)."""
        while self._wakers:
            await asyncio.sleep(self.lease / 3)  # the renewal period, not synchronisation
            held = list(self._wakers)
            if not held:
                break
            pipe = self._client.pipeline(transaction=False)
            until = repr(time.time() + self.lease)
            for approval_id in held:
                pipe.hset(self._key(approval_id), "holder_until", until)
            with contextlib.suppress(StoreUnavailable):
                await self._call("renew leases", pipe.execute())

    async def close(self) -> None:
        self._wake_all()
        await stop(self._lease_task)
        await self._bus.close()
        await self._client.aclose()
