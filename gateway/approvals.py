"""hold: calls waiting for a human. In-process for now; the record shape is the durable one (issue 4)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["pending", "approved", "denied", "timeout", "abandoned"]
CATEGORIES = ("policy_gap", "data_quality", "edge_case", "other")
_KEEP_DECIDED = 10_000  # decided approvals kept for `GET /approvals` history
# An approval given after its agent hung up lets the identical retry through once, within this many seconds.
RETRY_TTL = 900.0


class ApprovalConflict(Exception):
    """The approval was already decided (or expired); a second decision is refused."""


@dataclass(slots=True)
class Approval:
    id: str
    agent: str
    upstream: str
    verb: str
    resource: str | None
    tool: str | None
    rule: str
    reason: str
    fingerprint: str
    created_at: float
    expires_at: float
    evidence: dict[str, Any] = field(default_factory=dict)
    status: Status = "pending"
    decided_by: str | None = None
    decided_at: float | None = None
    decision_reason: str | None = None
    category: str | None = None
    retry_until: float | None = None  # approved after abandonment: the identical retry may pass until then
    used_by_retry: bool = False

    def public(self) -> dict[str, Any]:
        return asdict(self)


class Approvals:
    """The registry of held calls; `wait` parks the holding request until `decide` or the deadline."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, Approval] = OrderedDict()
        self._waiters: dict[str, asyncio.Future[Status]] = {}
        self._by_fingerprint: dict[str, str] = {}  # latest approval id for each request fingerprint
        # Called with each new pending approval (notifications hang off this); must not block.
        self.on_open: list[Callable[[Approval], None]] = []

    def open(self, *, agent: str, upstream: str, verb: str, resource: str | None, tool: str | None, rule: str,
             reason: str, fingerprint: str, evidence: dict[str, Any], timeout: float) -> Approval:
        now = time.time()
        approval = Approval(id=uuid.uuid4().hex, agent=agent, upstream=upstream, verb=verb, resource=resource,
                            tool=tool, rule=rule, reason=reason, fingerprint=fingerprint, created_at=now,
                            expires_at=now + timeout, evidence=dict(evidence))
        self._items[approval.id] = approval
        self._by_fingerprint[fingerprint] = approval.id
        self._waiters[approval.id] = asyncio.get_running_loop().create_future()
        for listener in self.on_open:
            listener(approval)
        return approval

    async def wait(self, approval: Approval) -> Status:
        """Wait for a decision; on the deadline the approval becomes `timeout`, on cancellation `abandoned`."""
        future = self._waiters[approval.id]
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, approval.expires_at - time.time()))
        except TimeoutError:
            if approval.status == "pending":
                self._close(approval, "timeout", None, None, None)
            return approval.status
        except asyncio.CancelledError:
            if approval.status == "pending":
                self._close(approval, "abandoned", None, None, None)
            raise
        finally:
            self._waiters.pop(approval.id, None)
            self._trim()

    def decide(self, approval_id: str, approve: bool, by: str, reason: str | None,
               category: str | None) -> Approval:
        approval = self._items.get(approval_id)
        if approval is None:
            raise KeyError(approval_id)
        if approval.status not in ("pending", "abandoned"):
            raise ApprovalConflict(f"approval {approval_id} is already {approval.status}")
        if approval.status == "abandoned" and approve:
            approval.retry_until = time.time() + RETRY_TTL
        self._close(approval, "approved" if approve else "denied", by, reason, category)
        return approval

    def reuse(self, fingerprint: str) -> Approval | None:
        """An approval given after its agent hung up, for exactly this request: usable once, then spent."""
        approval = self._items.get(self._by_fingerprint.get(fingerprint, ""))
        if (approval is None or approval.status != "approved" or approval.used_by_retry
                or approval.retry_until is None or approval.retry_until < time.time()):
            return None
        approval.used_by_retry = True
        return approval

    def get(self, approval_id: str) -> Approval | None:
        return self._items.get(approval_id)

    def list(self, status: str | None = None, agent: str | None = None) -> list[Approval]:
        return [a for a in self._items.values()
                if (status is None or a.status == status) and (agent is None or a.agent == agent)]

    def _close(self, approval: Approval, status: Status, by: str | None, reason: str | None,
               category: str | None) -> None:
        approval.status = status
        approval.decided_by = by
        approval.decided_at = time.time()
        approval.decision_reason = reason
        approval.category = category
        future = self._waiters.get(approval.id)
        if future is not None and not future.done():
            future.set_result(status)

    def _trim(self) -> None:
        while len(self._items) > _KEEP_DECIDED:
            oldest_id, oldest = next(iter(self._items.items()))
            if oldest.status == "pending":
                break
            del self._items[oldest_id]
            if self._by_fingerprint.get(oldest.fingerprint) == oldest_id:
                del self._by_fingerprint[oldest.fingerprint]
