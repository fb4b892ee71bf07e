"""The Redis store (many processes or replicas): each reserve and settle is one Lua script, so one atomic round trip.

The scripts follow memory_store.py step for step and in the same floating-point order, so both backends agree
exactly. Every key of a plan shares the agent's `{agent}` hash tag (plan.py), which keeps the scripts cluster-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..redis_calls import bounded
from ..redis_urls import redis_client
from .memory_store import _remaining  # the very same arithmetic, so peek agrees with the memory store exactly
from .resp import Command, RespClient, endpoint
from .store import (
    BudgetCounter,
    Plan,
    RateCounter,
    Refusal,
    Reservation,
    Settlement,
    StoreUnavailable,
    budget_cost,
    rate_cost,
)

T = TypeVar("T")
_Queued = tuple[str, list[str], list[str | int | float], "asyncio.Future[Any]"]  # script, keys, args, reply

# Numbers cross into Lua as decimal strings and come back as strings too: Redis truncates a Lua number in a reply
# to an integer, and `%.17g` round-trips a double exactly (budgets are whole nano-dollars, exact below 2^53).
_LUA_HELPERS = """
local function fmt(x) return string.format('%.17g', x) end
local function ms(seconds) return math.max(1, math.ceil(seconds * 1000)) end
"""

# KEYS: budget keys (nb), rate keys (nr), marker.
# ARGV: now, input, output, min_output ('' when clamping is off), marker_ttl, nb, nr,
#       then per budget: limit, per_input, per_output, resets_at, ttl; then per rate: limit, period, per_call,
#       per_input, per_output.
# Reply: {'budget', index, retry_after} | {'rate', index, retry_after} | {'ok', output, used..., remaining...}.
# The marker's value is the granted output, so a retried reserve can report it again.
RESERVE = _LUA_HELPERS + """
local now, input, output = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local min_output, marker_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local nb, nr = tonumber(ARGV[6]), tonumber(ARGV[7])
local b0, r0 = 7, 7 + 5 * nb
local marker = KEYS[nb + nr + 1]
-- 0. Already reserved? Then this is a retry whose first reply was lost: report it again, charge nothing.
local granted = redis.call('GET', marker)
if granted then
  local reply = {'ok', tonumber(granted)}
  for i = 1, nb do reply[#reply + 1] = fmt(tonumber(redis.call('GET', KEYS[i]) or '0')) end
  for j = 1, nr do
    local a = r0 + 5 * (j - 1)
    local limit, period = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    local tat = math.max(tonumber(redis.call('GET', KEYS[nb + j]) or now), now)
    reply[#reply + 1] = math.max(0, math.floor((period - (tat - now)) / (period / limit) + 1e-9))
  end
  return reply
end
-- 1. Budgets fix how many output tokens can be granted (clamping), or refuse.
local used = {}
for i = 1, nb do
  local a = b0 + 5 * (i - 1)
  local limit, per_input, per_output = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local refusal = {'budget', i, fmt(math.max(0, tonumber(ARGV[a + 4]) - now))}
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  local room = limit - used[i] - per_input * input
  if room < 0 then return refusal end
  if per_output > 0 then
    local affordable = math.floor(room / per_output)
    if affordable < output then
      if min_output ~= nil and affordable >= min_output then output = affordable else return refusal end
    end
  end
end
-- 2. Rate counters: GCRA, all checked before any is charged.
local new_tats = {}
for j = 1, nr do
  local a = r0 + 5 * (j - 1)
  local limit, period = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local cost = tonumber(ARGV[a + 3]) + tonumber(ARGV[a + 4]) * input + tonumber(ARGV[a + 5]) * output
  local interval = period / limit
  local stored = redis.call('GET', KEYS[nb + j])
  local tat = now
  if stored then tat = math.max(tonumber(stored), now) end
  local new_tat = tat + cost * interval
  if new_tat - now > period then return {'rate', j, fmt(new_tat - now - period)} end
  new_tats[j] = new_tat
end
-- 3. Admitted: charge everything, then set the marker that lets settle apply once.
local reply = {'ok', output}
for i = 1, nb do
  local a = b0 + 5 * (i - 1)
  local total = used[i] + tonumber(ARGV[a + 2]) * input + tonumber(ARGV[a + 3]) * output
  redis.call('SET', KEYS[i], fmt(total), 'PX', ms(tonumber(ARGV[a + 5])))
  reply[#reply + 1] = fmt(total)
end
for j = 1, nr do
  local a = r0 + 5 * (j - 1)
  local limit, period = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local interval = period / limit
  local new_tat = new_tats[j]
  redis.call('SET', KEYS[nb + j], fmt(new_tat), 'PX', ms(new_tat + 1 - now))
  reply[#reply + 1] = math.max(0, math.floor((period - (new_tat - now)) / interval + 1e-9))
end
redis.call('SET', marker, output, 'PX', ms(marker_ttl))
return reply
"""

# KEYS: marker, budget keys (nb), alert keys (nb), rate keys (nr).
# ARGV: now, nb, nr, then per budget: delta, limit, ttl, n, n thresholds; then per rate: delta, period, limit.
# Reply: {applied (0|1), used..., then (budget index, threshold index) pairs of the alerts that fired}.
SETTLE = _LUA_HELPERS + """
local now, nb, nr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reply = {0}
if redis.call('DEL', KEYS[1]) == 0 then  -- already settled, or never reserved
  for i = 1, nb do reply[#reply + 1] = fmt(tonumber(redis.call('GET', KEYS[1 + i]) or '0')) end
  return reply
end
reply[1] = 1
local alerts = {}
local a = 3
for i = 1, nb do
  local delta, limit = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local ttl, n = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local total = tonumber(redis.call('GET', KEYS[1 + i]) or '0') + delta
  redis.call('SET', KEYS[1 + i], fmt(total), 'PX', ms(ttl))
  reply[#reply + 1] = fmt(total)
  local fired = tonumber(redis.call('GET', KEYS[1 + nb + i]) or '0')  -- how many thresholds already fired
  local crossed = {}
  for t = 1, n do
    if total >= tonumber(ARGV[a + 4 + t]) * limit then crossed[#crossed + 1] = t end
  end
  if #crossed > fired then
    for k = fired + 1, #crossed do
      alerts[#alerts + 1] = i - 1
      alerts[#alerts + 1] = crossed[k] - 1
    end
    redis.call('SET', KEYS[1 + nb + i], #crossed, 'PX', ms(ttl))
  end
  a = a + 4 + n
end
for j = 1, nr do
  local delta, period, limit = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local key = KEYS[1 + 2 * nb + j]
  if delta ~= 0 then
    local tat = redis.call('GET', key)
    if tat then
      local new_tat = tonumber(tat) + delta * period / limit
      redis.call('SET', key, fmt(new_tat), 'PX', ms(math.max(new_tat, now) + 1 - now))
    end
  end
  a = a + 3
end
for _, v in ipairs(alerts) do reply[#reply + 1] = v end
return reply
"""


class RedisStore:
    """The `Store` protocol on Redis, translating every Redis error into `StoreUnavailable`.

    One server (or a sentinel's master) is reached through `resp.RespClient`: one pipelined connection, the calls
    of one event-loop iteration in one write. A cluster goes through redis-py, whose client knows the slot map:
    there the calls of one iteration go out together too, each to its node. Either way each caller awaits its own
    reply, and the semantics do not change, because every script is atomic on its own.
    """

    def __init__(self, client: Redis | RedisCluster, timeout: float = 1.0,
                 clock: Callable[[], float] = time.time, resp: RespClient | None = None) -> None:
        self._client = client  # without `resp`, every call; with it, only its configuration (and the sentinels)
        self._resp = resp
        self._timeout = timeout
        self._clock = clock
        self._scripts = {"reserve": RESERVE, "settle": SETTLE}
        self._shas = {name: hashlib.sha1(body.encode()).hexdigest() for name, body in self._scripts.items()}
        self._loading: dict[str, asyncio.Future[Any]] = {}  # SCRIPT LOADs in flight, shared by their waiters
        self._batch: list[_Queued] = []
        self._flushes: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, timeout: float = 1.0, clock: Callable[[], float] = time.time) -> RedisStore:
        """Any URL that `redis_urls` accepts: one server, TLS, a sentinel-managed master or a cluster.

        A connection that fails before a command was written is replaced and the command sent once more (see
        `resp.RespClient.call`); a command that may have run is never resent by the client. Resending would be
        safe anyway (a reserve that already ran finds its marker and charges nothing, and a settle applies only
        while the marker exists), which is what lets the gateway's settler retry a settle until it applies.
        """
        client = redis_client(url, socket_timeout=timeout, connect_timeout=timeout, decode_responses=True,
                              driver_info=None)  # no CLIENT SETINFO: one fewer round trip per new connection
        if isinstance(client, RedisCluster):
            return cls(client, timeout, clock)
        return cls(client, timeout, clock, RespClient(endpoint(client), timeout))

    async def _call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        return await bounded(what, operation(), self._timeout)

    async def _script(self, name: str, keys: list[str], args: list[str | int | float]) -> Any:
        if self._resp is None:
            return await self._batched(name, keys, args)
        command = ("EVALSHA", self._shas[name], len(keys), *keys, *args)
        try:
            try:
                return await self._resp.call(command)
            except ResponseError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
            return await self._reloaded(name, command)
        except (RedisError, OSError) as exc:  # OSError: TimeoutError and ConnectionError too
            raise self._unavailable(name, exc) from exc

    async def _reloaded(self, name: str, command: Command) -> Any:
        """A Redis that restarted (or was flushed) forgot the scripts: load this one once for every caller that
        found it missing, then send again."""
        assert self._resp is not None
        loading = self._loading.get(name)
        if loading is None:
            loading = self._loading[name] = self._resp.send(("SCRIPT", "LOAD", self._scripts[name]))
            loading.add_done_callback(lambda _: self._loading.pop(name, None))
        await asyncio.shield(loading)
        return await self._resp.call(command)

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        if isinstance(exc, TimeoutError):
            return StoreUnavailable(f"redis {what}: no answer within {self._timeout:g}s")
        return StoreUnavailable(f"redis {what}: {type(exc).__name__}: {exc}")

    # -- a cluster: redis-py ---------------------------------------------------------------------------------------
    async def _batched(self, name: str, keys: list[str], args: list[str | int | float]) -> Any:
        """Queue one script call for this loop iteration's pipeline and wait for its own reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._batch.append((name, keys, args, future))
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._start_flush)
        return await self._call(name, lambda: asyncio.shield(future))

    def _start_flush(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[_Queued]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._send(batch)
                missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                if missing:  # a Redis that restarted (or was flushed) forgot the scripts: load them, send again
                    for name in {batch[i][0] for i in missing}:
                        await self._client.script_load(self._scripts[name])
                    for i, reply in zip(missing, await self._send([batch[i] for i in missing]), strict=True):
                        replies[i] = reply
        except (TimeoutError, RedisError, OSError) as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _send(self, batch: list[_Queued]) -> list[Any]:
        """Each script to the node of its plan's slot, all of them at once; replies, or the errors as values."""
        return list(await asyncio.gather(
            *(self._client.execute_command("EVALSHA", self._shas[name], len(keys), *keys, *args)
              for name, keys, args, _ in batch), return_exceptions=True))

    # -- the protocol --------------------------------------------------------------------------------------------
    async def reserve(self, plan: Plan) -> Reservation | Refusal:
        keys = [b.key for b in plan.budgets] + [r.key for r in plan.rates] + [plan.marker]
        args: list[str | int | float] = [plan.now, plan.input, plan.output,
                                         "" if plan.min_output is None else plan.min_output, plan.marker_ttl,
                                         len(plan.budgets), len(plan.rates)]
        for b in plan.budgets:
            args += [b.limit, b.per_input, b.per_output, b.resets_at, b.ttl]
        for r in plan.rates:
            args += [r.limit, r.period, r.per_call, r.per_input, r.per_output]
        reply: list[Any] = await self._script("reserve", keys, args)
        if reply[0] == "budget":
            return Refusal("budget_exceeded", plan.budgets[int(reply[1]) - 1].id, float(reply[2]))
        if reply[0] == "rate":
            rate = plan.rates[int(reply[1]) - 1]
            return Refusal("rate_limited", rate.id, float(reply[2]), "loop_detected" if rate.kind == "loop" else None)
        nb = len(plan.budgets)
        used = tuple(_integer(v) for v in reply[2:2 + nb])
        remaining = tuple(int(v) for v in reply[2 + nb:])
        return Reservation(plan, int(reply[1]), used, remaining)

    async def settle(self, reservation: Reservation, input_tokens: int, output_tokens: int) -> Settlement:
        plan = reservation.plan
        keys = [plan.marker, *(b.key for b in plan.budgets), *(b.alert_key for b in plan.budgets),
                *(r.key for r in plan.rates)]
        args: list[str | int | float] = [self._clock(), len(plan.budgets), len(plan.rates)]
        for b in plan.budgets:
            delta = budget_cost(b, input_tokens, output_tokens) - budget_cost(b, plan.input, reservation.output)
            args += [delta, b.limit, b.ttl, len(b.alert_at), *b.alert_at]
        for r in plan.rates:
            delta = rate_cost(r, input_tokens, output_tokens) - rate_cost(r, plan.input, reservation.output)
            args += [delta, r.period, r.limit]
        reply: list[Any] = await self._script("settle", keys, args)
        nb = len(plan.budgets)
        used = tuple(_integer(v) for v in reply[1:1 + nb])
        pairs = reply[1 + nb:]
        alerts = tuple((int(i), plan.budgets[int(i)].alert_at[int(t)]) for i, t in zip(pairs[::2], pairs[1::2],
                                                                                        strict=True))
        return Settlement(used, alerts, applied=bool(int(reply[0])))

    async def peek(self, rates: tuple[RateCounter, ...], budgets: tuple[BudgetCounter, ...],
                   now: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
        keys = [r.key for r in rates] + [b.key for b in budgets]
        if not keys:
            return (), ()
        values: list[Any]
        if self._resp is not None:
            try:
                values = await self._resp.call(("MGET", *keys))
            except (RedisError, OSError) as exc:
                raise self._unavailable("peek", exc) from exc
        else:
            cluster = self._client
            assert isinstance(cluster, RedisCluster)  # without `resp`, always a cluster (from_url)
            values = await self._call("peek", lambda: cluster.mget_nonatomic(keys))
        tats, totals = values[:len(rates)], values[len(rates):]
        remaining = tuple(_remaining(r, max(float(t) if t else now, now), now)
                          for r, t in zip(rates, tats, strict=True))
        return remaining, tuple(_integer(v) if v else 0 for v in totals)

    async def start(self) -> None:
        """A cluster client learns the slot map once here, not in a race among the first calls' coroutines."""
        if isinstance(self._client, RedisCluster):
            with contextlib.suppress(RedisError, OSError, TimeoutError):  # down now: the first call retries
                async with asyncio.timeout(self._timeout):
                    await self._client.initialize()

    async def close(self) -> None:
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self._resp is not None:
            await self._resp.close()
        await self._client.aclose()  # the client owns its pool (or its nodes), so this disconnects it too


def _integer(value: str | int) -> int:
    """A budget total as the scripts write it (`%.17g` of a whole number)."""
    return int(float(value)) if isinstance(value, str) else value
