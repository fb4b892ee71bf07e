"""Choose the approvals store: in-process without a Redis URL, shared through Redis with one."""

from __future__ import annotations

from ..settings import Settings
from .memory import MemoryApprovals
from .record import ApprovalStore


def open_approvals(settings: Settings) -> ApprovalStore:
    if not settings.redis_url:
        return MemoryApprovals()
    from .redis_approvals import RedisApprovals

    return RedisApprovals.from_url(settings.redis_url, timeout=settings.store_timeout, lease=settings.approval_lease)
