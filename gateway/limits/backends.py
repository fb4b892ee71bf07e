"""Choose the store: in-memory without a Redis URL, Redis with one."""

from __future__ import annotations

from ..settings import Settings
from .memory_store import MemoryStore
from .store import Store


def open_store(settings: Settings) -> Store:
    """Raises ValueError for a URL the gateway cannot use (the message names the accepted schemes)."""
    if not settings.redis_url:
        return MemoryStore()
    from .redis_store import RedisStore  # imported only when used: the memory default needs no Redis client

    return RedisStore.from_url(settings.redis_url, timeout=settings.store_timeout)
