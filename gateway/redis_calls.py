"""One Redis operation, bounded in time, with every Redis or socket failure translated to `StoreUnavailable`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from redis.exceptions import RedisError

from .errors import StoreUnavailable

T = TypeVar("T")


async def bounded(what: str, operation: Awaitable[T], limit: float) -> T:
    """Await `operation` for at most `limit` seconds; redis-py drops a connection that failed or was cancelled."""
    try:
        async with asyncio.timeout(limit):
            return await operation
    except TimeoutError as exc:
        raise StoreUnavailable(f"redis {what}: no answer within {limit:g}s") from exc
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis {what}: {type(exc).__name__}: {exc}") from exc
