"""The Redis store (many processes or replicas): each reserve and settle is one Lua script, so one atomic round trip.

The scripts follow memory_store.py step for step and in the same floating-point order, so both backends agree
exactly. Every key of a plan shares the agent's `{agent}` hash tag (plan.py), which keeps the scripts cluster-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..redis_calls import bounded
from ..redis_urls import redis_client
from .memory_store import _remaining  # the very same arithmetic, so peek agrees with the memory store exactly
from .resp import Command, RespClient, Unsent, endpoint
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
_Queued = tuple[str, list[str], list[bytes | str | int], "asyncio.Future[Any]"]  # script, keys, args, reply

# Numbers cross into Lua packed: the numbers a script only reads arrive as one string of little-endian doubles
# (`struct.pack('<…d')`), which Lua's struct library unpacks in one call. A double carries every value exactly:
# the per-call times, a rate's interval (the gateway's one division), and whole numbers below 2^53 (token counts,
# nano-dollars). Measured on redis-server (instructions per call, callgrind): each separate argument costs about
# 0.8k to become a Lua string and 1.2k more to parse, where unpacking 25 doubles costs about 7k in all. What a
# script passes on to a Redis command as it is (the marker's value and TTL) stays text, since Redis formats a Lua
# number in a command with `%.17g`. A GCRA cell's time is stored as `%.17g`, which round-trips a double exactly,
# and a refusal's retry time comes back as that text too (Redis truncates a Lua number in a reply to an integer).
# A budget total is a whole number: stored as `%d`, which skips float formatting, and replied as a number, which
# arrives as an integer.
# The scripts are written for what redis-server spends on them, as measured:
# - the gateway sends what it can compute exactly itself: a rate's fixed cost and interval, a budget's input
#   charge, an alert's level, a settlement's shift of a GCRA cell; and a refusal's retry time is the gateway's to
#   compute;
# - `a > b and a or b` is exactly `math.max(b, a)` (also for NaN and -0) without a C call;
# - TTLs known in advance come as PX milliseconds (`_px`), so Lua never computes them, and formats them (`%d`)
#   only on the rare path that sets a new budget key or alert counter;
# - the reservation marker is set first, only if absent (SET NX), which is also the retry check: one call;
# - an alert counter is read only when a threshold is crossed;
# - string.format only where text is needed (what is stored, and what the reply carries as text), once each;
# - no table or closure that is not needed. Reads stay one GET per key, where it is needed: one MGET of every
#   key up front saved only ~2%, and it would read keys that a refusal or an unchanged counter never needs.

# KEYS: budget keys (nb), rate keys (nr, as many as the rest of KEYS), marker.
# ARGV: the numbers (below), output as text (the marker's value), the marker's TTL as PX text.
# Numbers: now, output, min_output (-1 when clamping is off), nb, then what varies per call: each budget's charge
#          for the input (per_input * input), each rate's base cost (per_call + per_input * input); then what does
#          not: per budget its limit, per_output, px; per rate its period, interval (period / limit), per_output.
# Reply: {'budget', index} | {'rate', index, retry_after} | {'ok', output, used..., remaining...}.
# The marker's value is the granted output, so a retried reserve can report it again.
RESERVE = """
local call, fmt, floor, ceil = redis.call, string.format, math.floor, math.ceil
local v = {struct.unpack('<' .. string.rep('d', #ARGV[1] / 8), ARGV[1])}
local now, output, nb = v[1], v[2], v[4]
local nr = #KEYS - nb - 1
local b0, r0 = 1 + nb + nr, 1 + 4 * nb + nr  -- budget i's fixed numbers follow v[b0 + 3 * i], rate j's v[r0 + 3 * j]
local marker = KEYS[nb + nr + 1]
-- 0. Already reserved? Then this is a retry whose first reply was lost: report it again, charge nothing.
if not call('SET', marker, ARGV[2], 'NX', 'PX', ARGV[3]) then
  local reply = {'ok', call('GET', marker) * 1}
  for i = 1, nb do reply[2 + i] = (call('GET', KEYS[i]) or 0) * 1 end
  for j = 1, nr do
    local a = r0 + 3 * j
    local period, interval = v[a + 1], v[a + 2]
    local tat = (call('GET', KEYS[nb + j]) or now) * 1
    if now > tat then tat = now end
    local left = floor((period - (tat - now)) / interval + 1e-9)
    reply[2 + nb + j] = left > 0 and left or 0
  end
  return reply
end
-- 1. Budgets fix how many output tokens can be granted (clamping), or refuse (and take the marker back).
local clamped = false
local found = {}  -- per budget: its key's text, or false
for i = 1, nb do
  local a = b0 + 3 * i
  local text = call('GET', KEYS[i])
  local per_output = v[a + 2]
  local room = v[a + 1] - (text or 0) - v[4 + i]
  if room < 0 then
    call('DEL', marker)
    return {'budget', i}
  end
  if per_output > 0 then
    local affordable = floor(room / per_output)
    if affordable < output then
      if v[3] >= 0 and affordable >= v[3] then
        output, clamped = affordable, true
      else
        call('DEL', marker)
        return {'budget', i}
      end
    end
  end
  found[i] = text
end
-- 2. Rate counters: GCRA, all checked before any is charged.
local new_tats, lefts = {}, {}
for j = 1, nr do
  local a = r0 + 3 * j
  local period, interval = v[a + 1], v[a + 2]
  local cost = v[4 + nb + j] + v[a + 3] * output
  local tat = (call('GET', KEYS[nb + j]) or now) * 1
  if now > tat then tat = now end
  local new_tat = tat + cost * interval
  if new_tat - now > period then
    call('DEL', marker)
    return {'rate', j, fmt('%.17g', new_tat - now - period)}
  end
  local left = floor((period - (new_tat - now)) / interval + 1e-9)
  new_tats[j], lefts[j] = new_tat, left > 0 and left or 0
end
-- 3. Admitted: charge everything (the marker already says what was granted, unless a budget clamped it).
-- A budget key keeps the TTL its window's first charge gave it (INCRBY), so a charge skips SET's expiry work.
local reply = {'ok', output}
for i = 1, nb do
  local a = b0 + 3 * i
  local charge = fmt('%d', v[4 + i] + v[a + 2] * output)
  if found[i] then
    reply[2 + i] = call('INCRBY', KEYS[i], charge)
  else
    call('SET', KEYS[i], charge, 'PX', fmt('%d', v[a + 3]))
    reply[2 + i] = charge * 1
  end
end
for j = 1, nr do
  local new_tat = new_tats[j]
  local px = ceil((new_tat + 1 - now) * 1000)
  call('SET', KEYS[nb + j], fmt('%.17g', new_tat), 'PX', fmt('%d', px > 1 and px or 1))
  reply[2 + nb + j] = lefts[j]
end
if clamped then call('SET', marker, output, 'PX', ARGV[3]) end
return reply
"""

# KEYS: marker, budget keys (nb), alert keys (nb), rate keys (nr, as many as the rest of KEYS: only those whose
#       cost changed, as the others have nothing to settle).
# ARGV: the numbers (below), then each budget's delta as text (what INCRBY adds).
# Numbers: now, nb, then what varies per call: each budget's delta, each rate's shift of its cell
#          (delta * period / limit); then per budget what does not: px, n, n alert levels (threshold * limit).
# Reply: {applied (0|1), used..., then (budget index, threshold index) pairs of the alerts that fired}.
SETTLE = """
local call, fmt, ceil = redis.call, string.format, math.ceil
local v = {struct.unpack('<' .. string.rep('d', #ARGV[1] / 8), ARGV[1])}
local nb = v[2]
local nr = #KEYS - 2 * nb - 1
if call('DEL', KEYS[1]) == 0 then  -- already settled, or never reserved
  local reply = {0}
  for i = 1, nb do reply[1 + i] = (call('GET', KEYS[1 + i]) or 0) * 1 end
  return reply
end
local reply = {1}
local alerts
local a = 2 + nb + nr  -- budget i's fixed numbers follow v[a], a moving past each
for i = 1, nb do
  local n = v[a + 2]
  local total = call('INCRBY', KEYS[1 + i], ARGV[1 + i])
  -- Equal to the delta: the key was absent (expired, or never charged) and has no TTL yet, or it was 0.
  if total == v[2 + i] then call('PEXPIRE', KEYS[1 + i], fmt('%d', v[a + 1])) end
  reply[1 + i] = total
  local crossed = 0
  for t = 1, n do
    if total >= v[a + 2 + t] then crossed = crossed + 1 end
  end
  if crossed > 0 then  -- how many already fired is read only when one may fire now
    local fired = (call('GET', KEYS[1 + nb + i]) or 0) * 1
    if crossed > fired then  -- thresholds crossed beyond the first `fired` fire now
      local count = 0
      for t = 1, n do
        if total >= v[a + 2 + t] then
          count = count + 1
          if count > fired then
            alerts = alerts or {}
            alerts[#alerts + 1] = i - 1
            alerts[#alerts + 1] = t - 1
          end
        end
      end
      call('SET', KEYS[1 + nb + i], crossed, 'PX', fmt('%d', v[a + 1]))
    end
  end
  a = a + 2 + n
end
for j = 1, nr do
  local tat = call('GET', KEYS[1 + 2 * nb + j])
  if tat then
    local now = v[1]
    local new_tat = tat + v[2 + nb + j]
    local px = ceil(((now > new_tat and now or new_tat) + 1 - now) * 1000)
    call('SET', KEYS[1 + 2 * nb + j], fmt('%.17g', new_tat), 'PX', fmt('%d', px > 1 and px or 1))
  end
end
if alerts then
  for k = 1, #alerts do reply[1 + nb + k] = alerts[k] end
end
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
        # One RESP connection carries every call in order; a cluster's pooled connections do not.
        self.ordered = resp is not None
        self._timeout = timeout
        self._clock = clock
        self._scripts = {"reserve": RESERVE, "settle": SETTLE}
        self._shas = {name: hashlib.sha1(body.encode()).hexdigest() for name, body in self._scripts.items()}
        self._wire = _Wire(self._shas["reserve"], self._shas["settle"])
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
        # Every session loads the scripts before its first call: an EVALSHA that met NOSCRIPT would be sent again
        # after the calls queued behind it, and a settle must never fall behind the agent's next reserve.
        session = dataclasses.replace(endpoint(client), scripts=(RESERVE, SETTLE))
        return cls(client, timeout, clock, RespClient(session, timeout))

    async def _call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        return await bounded(what, operation(), self._timeout)

    async def _script(self, name: str, command: bytes) -> Any:
        """One script call on the RESP connection, `command` packed by `_Wire`."""
        assert self._resp is not None
        try:
            try:
                return await self._resp.send(command)  # the reply itself, no coroutine between
            except Unsent:  # the connection failed before the write, so nothing ran: once more on a fresh one
                return await self._resp.send(command)
            except ResponseError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
            return await self._reloaded(name, command)
        except (RedisError, OSError) as exc:  # OSError: TimeoutError and ConnectionError too
            raise self._unavailable(name, exc) from exc

    async def _reloaded(self, name: str, command: Command | bytes) -> Any:
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
    async def _batched(self, name: str, keys: list[str], args: list[bytes | str | int]) -> Any:
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
        replies = await asyncio.gather(
            *(self._client.execute_command("EVALSHA", self._shas[name], len(keys), *keys, *args)
              for name, keys, args, _ in batch), return_exceptions=True)
        return [_as_store_failure(reply) for reply in replies]

    # -- the protocol --------------------------------------------------------------------------------------------
    async def reserve(self, plan: Plan) -> Reservation | Refusal:
        reply: list[Any]
        if self._resp is not None:
            reply = await self._script("reserve", self._wire.reserve(plan))
        else:
            reply = await self._batched("reserve", *reserve_arguments(plan))
        if reply[0] == "budget":  # retry when the window resets: the memory store's arithmetic, exactly
            budget = plan.budgets[int(reply[1]) - 1]
            return Refusal("budget_exceeded", budget.id, max(0.0, budget.resets_at - plan.now))
        if reply[0] == "rate":
            rate = plan.rates[int(reply[1]) - 1]
            return Refusal("rate_limited", rate.id, float(reply[2]), "loop_detected" if rate.kind == "loop" else None)
        nb = len(plan.budgets)  # every number in the reply an integer
        return Reservation(plan, reply[1], tuple(reply[2:2 + nb]), tuple(reply[2 + nb:]))

    async def settle(self, reservation: Reservation, input_tokens: int, output_tokens: int) -> Settlement:
        plan = reservation.plan
        reply: list[Any]
        if self._resp is not None:
            reply = await self._script("settle", self._wire.settle(reservation, input_tokens, output_tokens,
                                                                    self._clock()))
        else:
            reply = await self._batched("settle", *settle_arguments(reservation, input_tokens, output_tokens,
                                                                    self._clock()))
        nb = len(plan.budgets)  # every number in the reply an integer
        pairs = reply[1 + nb:]
        alerts = tuple((i, plan.budgets[i].alert_at[t]) for i, t in zip(pairs[::2], pairs[1::2]))  # noqa: B905 (hot)
        return Settlement(tuple(reply[1:1 + nb]), alerts, applied=reply[0] == 1)

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


def _as_store_failure(reply: Any) -> Any:
    """A reply, or the client's failure as one the store reports as unavailable (fail closed, in the agent's
    error shape). redis-py lets some socket failures through as other exceptions: CPython 3.11's asyncio raises
    AttributeError when a write meets an SSL transport that was closed under it."""
    if isinstance(reply, Exception) and not isinstance(reply, RedisError | OSError):
        failure = ConnectionError(f"the redis client failed: {type(reply).__name__}: {reply}")
        failure.__cause__ = reply
        return failure
    return reply


def reserve_arguments(plan: Plan) -> tuple[list[str], list[bytes | str | int]]:
    """The reserve script's KEYS and ARGV for `plan` (the layout the script reads; `_Wire` packs the same).

    What the gateway computes here is exact and what the script would compute: integer costs, and a rate's
    interval as the same one division."""
    keys = [b.key for b in plan.budgets] + [r.key for r in plan.rates] + [plan.marker]
    numbers: list[float] = [plan.now, plan.output, -1 if plan.min_output is None else plan.min_output,
                            len(plan.budgets)]
    numbers += [b.per_input * plan.input for b in plan.budgets]
    numbers += [r.per_call + r.per_input * plan.input for r in plan.rates]
    return keys, [_doubles(numbers + _reserve_fixed(plan)), plan.output, _px(plan.marker_ttl)]


def settle_arguments(reservation: Reservation, input_tokens: int, output_tokens: int,
                     now: float) -> tuple[list[str], list[bytes | str | int]]:
    """The settle script's KEYS and ARGV (`_Wire` packs the same)."""
    plan = reservation.plan
    keys = [plan.marker, *(b.key for b in plan.budgets), *(b.alert_key for b in plan.budgets)]
    deltas = [budget_cost(b, input_tokens, output_tokens) - budget_cost(b, plan.input, reservation.output)
              for b in plan.budgets]
    numbers: list[float] = [now, len(plan.budgets), *deltas]
    for r in plan.rates:
        delta = rate_cost(r, input_tokens, output_tokens) - rate_cost(r, plan.input, reservation.output)
        if delta:  # a counter whose cost did not change has nothing to settle: not sending it saves its work
            keys.append(r.key)
            numbers.append(delta * r.period / r.limit)
    return keys, [_doubles(numbers + _settle_fixed(plan)), *deltas]


def _reserve_fixed(plan: Plan) -> list[float]:
    """The reserve's numbers that only the counters fix: per budget its limit, per_output, px; per rate its
    period, interval, per_output."""
    fixed: list[float] = []
    for b in plan.budgets:
        fixed += [b.limit, b.per_output, _px(b.ttl)]
    for r in plan.rates:
        fixed += [r.period, r.period / r.limit, r.per_output]
    return fixed


def _settle_fixed(plan: Plan) -> list[float]:
    """The settle's numbers that only the budgets fix: per budget its px, its alert count, its alert levels."""
    fixed: list[float] = []
    for b in plan.budgets:
        fixed += [_px(b.ttl), len(b.alert_at), *(t * b.limit for t in b.alert_at)]
    return fixed


def _doubles(numbers: list[float]) -> bytes:
    """The scripts' numbers: little-endian doubles, which Lua's `struct.unpack('<d…')` reads back exactly."""
    return struct.pack(f"<{len(numbers)}d", *numbers)


_HEADS = tuple(b"$%d\r\n" % n for n in range(512))  # bulk string heads: a lookup, not a format, per value


def _bulk_bytes(data: bytes) -> bytes:
    n = len(data)
    return _HEADS[n] + data + b"\r\n" if n < 512 else b"$%d\r\n%b\r\n" % (n, data)


def _bulk(value: str | int) -> bytes:
    """One RESP bulk string, encoded as hiredis.pack_command encodes the value."""
    return _bulk_bytes(value.encode() if isinstance(value, str) else str(value).encode())


_SMALL = tuple(_bulk(n) for n in range(256))  # counts, flags and small token numbers, encoded once


def _bulk_int(value: int) -> bytes:
    return _SMALL[value] if 0 <= value < 256 else _bulk_bytes(b"%d" % value)


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    """What the script calls of every plan with the same counters share, encoded once: all but the per-call
    numbers, the marker and a loop detector's key."""

    loop: bool  # rates[0] is a loop detector: its key is the call's own
    nb: int
    budget_inputs: tuple[int, ...]  # per budget: per_input
    rate_costs: tuple[tuple[int, int], ...]  # per rate: per_call, per_input
    reserve_head: bytes  # the command's RESP array length, EVALSHA, the script, the key count, the budget keys
    rate_keys: bytes  # the rates' keys but a loop detector's
    reserve_numbers: Callable[..., bytes]  # packs the numbers that vary
    reserve_fixed: bytes  # the numbers that do not
    settle_budgets: bytes  # the budget keys, then the alert keys
    budget_prices: tuple[tuple[int, int], ...]  # per budget: per_input, per_output
    token_rates: tuple[tuple[int, int, float, int, bytes], ...]  # per rate with a token price: per_input,
    # per_output, period, limit, key
    settle_fixed: bytes


class _Wire:
    """The script calls packed for the RESP connection, byte for byte what hiredis.pack_command makes of
    `reserve_arguments`/`settle_arguments`, but without re-encoding what repeats call after call.

    A plan's counters are the same as its shape's (`Plan.shape`) for as long as their windows last, so what
    they share is encoded once into a `_Layout`, kept by the shape's identity (bounded), and a call only encodes
    what varies: the time, the token counts, the marker and the loop detector's key. A plan without a shape gets
    a layout of its own.
    """

    _LIMIT = 4096  # layouts kept; planners make new shapes as windows roll over and rule sets reload

    def __init__(self, reserve_sha: str, settle_sha: str) -> None:
        self._reserve_head = b"$7\r\nEVALSHA\r\n" + _bulk(reserve_sha)
        self._settle_head = b"$7\r\nEVALSHA\r\n" + _bulk(settle_sha)
        self._layouts: dict[int, tuple[object, _Layout]] = {}

    def _layout(self, plan: Plan) -> _Layout:
        shape = plan.shape
        if shape is None:
            return self._new_layout(plan)
        entry = self._layouts.get(id(shape))
        if entry is None or entry[0] is not shape:  # by identity: a shape gone since may have had this id
            if len(self._layouts) >= self._LIMIT:
                self._layouts.clear()
            entry = self._layouts[id(shape)] = (shape, self._new_layout(plan))
        return entry[1]

    def _new_layout(self, plan: Plan) -> _Layout:
        budgets, rates = plan.budgets, plan.rates
        loop = bool(rates) and rates[0].kind == "loop"
        nb, nkeys = len(budgets), len(budgets) + len(rates) + 1
        return _Layout(
            loop, nb, tuple(b.per_input for b in budgets), tuple((r.per_call, r.per_input) for r in rates),
            b"*%d\r\n" % (3 + nkeys + 3) + self._reserve_head + _bulk_int(nkeys)
            + b"".join(_bulk(b.key) for b in budgets),
            b"".join(_bulk(r.key) for r in rates[1 if loop else 0:]),
            struct.Struct(f"<{4 + nb + len(rates)}d").pack, _doubles(_reserve_fixed(plan)),
            b"".join([_bulk(b.key) for b in budgets] + [_bulk(b.alert_key) for b in budgets]),
            tuple((b.per_input, b.per_output) for b in budgets),
            tuple((r.per_input, r.per_output, r.period, r.limit, _bulk(r.key)) for r in rates
                  if r.per_input or r.per_output),
            _doubles(_settle_fixed(plan)))

    def reserve(self, plan: Plan) -> bytes:
        layout = self._layout(plan)
        spent = plan.input
        numbers = layout.reserve_numbers(
            plan.now, plan.output, -1 if plan.min_output is None else plan.min_output, layout.nb,
            *[per_input * spent for per_input in layout.budget_inputs],
            *[per_call + per_input * spent for per_call, per_input in layout.rate_costs]) + layout.reserve_fixed
        return b"".join((layout.reserve_head, _bulk(plan.rates[0].key) if layout.loop else b"", layout.rate_keys,
                         _bulk(plan.marker), _bulk_bytes(numbers), _bulk_int(plan.output),
                         _bulk_int(_px(plan.marker_ttl))))

    def settle(self, reservation: Reservation, input_tokens: int, output_tokens: int, now: float) -> bytes:
        plan = reservation.plan
        layout = self._layout(plan)
        # Integer arithmetic, as settle_arguments: the difference of the costs, written as one expression.
        more_input, more_output = input_tokens - plan.input, output_tokens - reservation.output
        deltas = [per_input * more_input + per_output * more_output for per_input, per_output in layout.budget_prices]
        rate_keys, shifts = [], []
        for per_input, per_output, period, limit, key in layout.token_rates:
            delta = per_input * more_input + per_output * more_output  # a call count never changes
            if delta:  # as settle_arguments: a counter whose cost did not change is not sent
                rate_keys.append(key)
                shifts.append(delta * period / limit)
        numbers = struct.pack(f"<{2 + len(deltas) + len(shifts)}d", now, layout.nb, *deltas, *shifts)
        nkeys = 1 + 2 * layout.nb + len(rate_keys)
        return b"".join((
            b"*%d\r\n" % (3 + nkeys + 1 + layout.nb), self._settle_head, _bulk_int(nkeys), _bulk(plan.marker),
            layout.settle_budgets, *rate_keys, _bulk_bytes(numbers + layout.settle_fixed),
            *[_bulk_bytes(b"%d" % delta) for delta in deltas]))


def _px(seconds: float) -> int:
    """A TTL as SET's PX: milliseconds, rounded up, at least 1 (as the scripts do for the TTLs they compute)."""
    return math.ceil(seconds * 1000) if seconds > 0 else 1


def _integer(value: str | int) -> int:
    """A budget total as stored: `%d`, or `%.17g` of a whole number as earlier versions wrote it."""
    return int(float(value)) if isinstance(value, str) else value
