"""Approvals in this process (the embedded default): the holder and the deciders share one event loop."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from .record import RETRY_TTL, Approval, ApprovalConflict, Grant, grant_scope

_KEEP = 10_000  # approvals kept for `GET /approvals` history


class MemoryApprovals:
    lease = 0.0  # the holder and every decider are this process: an approval is never orphaned by a crash

    def __init__(self) -> None:
        self._items: OrderedDict[str, Approval] = OrderedDict()
        self._by_fingerprint: dict[str, str] = {}
        self._grants: dict[str, Grant] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}  # lighter than an Event per held call

    async def open(self, approval: Approval) -> None:
        self._items[approval.id] = approval
        self._by_fingerprint[approval.fingerprint] = approval.id
        self._waiters[approval.id] = asyncio.get_running_loop().create_future()
        self._trim()

    async def get(self, approval_id: str) -> Approval | None:
        return self._items.get(approval_id)

    async def list(self, status: str | None, agent: str | None, limit: int) -> list[Approval]:
        now = time.time()
        found = []
        for approval in reversed(self._items.values()):
            if (status is None or approval.effective_status(now) == status) and agent in (None, approval.agent):
                found.append(approval)
                if len(found) >= limit:
                    break
        return found

    async def decide(self, approval_id: str, approve: bool, by: str, reason: str | None, category: str | None,
                     remember_for: float | None) -> Approval:
        approval = self._items.get(approval_id)
        if approval is None:
            raise KeyError(approval_id)
        now = time.time()
        status = approval.effective_status(now)
        if status not in ("pending", "abandoned"):
            raise ApprovalConflict(f"approval {approval_id} is already {status}"
                                   + (f" (by {approval.decided_by})" if approval.decided_by else ""))
        approval.status = "approved" if approve else "denied"
        approval.decided_by, approval.decided_at = by, now
        approval.decision_reason, approval.category = reason, category
        if approve and status == "abandoned":
            approval.retry_until = now + RETRY_TTL
        if approve and remember_for:
            approval.remembered_until = now + remember_for
            scope = grant_scope(approval.agent, approval.upstream, approval.verb, approval.resource)
            self._grants[scope] = Grant(approval.id, by, approval.remembered_until)
        waiter = self._waiters.get(approval_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return approval

    async def wait(self, approval: Approval) -> Approval:
        waiter = self._waiters.get(approval.id)
        try:
            if waiter is not None and approval.status == "pending":
                # asyncio.timeout, not wait_for: no extra task per held call (10,000 held calls: ~10 MB less)
                async with asyncio.timeout(max(0.0, approval.expires_at - time.time())):
                    await waiter  # one waiter per approval (its holder): a cancellation may cancel the future
        except TimeoutError:
            if approval.status == "pending":
                approval.status = "timeout"
                approval.decided_at = time.time()
        finally:
            self._waiters.pop(approval.id, None)
        return approval

    async def abandon(self, approval_id: str) -> None:
        approval = self._items.get(approval_id)
        if approval is not None and approval.status == "pending":
            approval.status = "abandoned"

    async def reuse(self, fingerprint: str) -> Approval | None:
        approval = self._items.get(self._by_fingerprint.get(fingerprint, ""))
        if (approval is None or approval.status != "approved" or approval.used_by_retry
                or approval.retry_until is None or approval.retry_until < time.time()):
            return None
        approval.used_by_retry = True
        return approval

    async def remembered(self, agent: str, upstream: str, verb: str, resource: str | None) -> Grant | None:
        scope = grant_scope(agent, upstream, verb, resource)
        grant = self._grants.get(scope)
        if grant is not None and grant.until < time.time():
            del self._grants[scope]
            return None
        return grant

    async def close(self) -> None:
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    def _trim(self) -> None:
        while len(self._items) > _KEEP:
            oldest_id, oldest = next(iter(self._items.items()))
            if oldest.status == "pending":
                break
            del self._items[oldest_id]
            if self._by_fingerprint.get(oldest.fingerprint) == oldest_id:
                del self._by_fingerprint[oldest.fingerprint]
