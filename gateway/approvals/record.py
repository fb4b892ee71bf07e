"""The approval record and the `ApprovalStore` protocol its two backends implement."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol

Status = Literal["pending", "approved", "denied", "timeout", "abandoned"]
CATEGORIES = ("policy_gap", "data_quality", "edge_case", "other")
# An approval given after its holder went away lets the identical retry through once, within this many seconds.
RETRY_TTL = 900.0
# How long a holding process's claim on a pending approval lasts unless renewed (it renews every third of it).
LEASE_SECONDS = 15.0


class ApprovalConflict(Exception):
    """The approval was already decided (or timed out); a second decision is refused."""


@dataclass(slots=True)
class Approval:
    id: str
    agent: str
    upstream: str
    method: str
    path: str
    verb: str
    resource: str | None
    tool: str | None
    rule: str
    reason: str
    fingerprint: str  # agent, upstream, method, normalised path, query and body hash: what the approval covers
    created_at: float
    expires_at: float
    evidence: Mapping[str, Any] = field(default_factory=dict)
    status: Status = "pending"
    decided_by: str | None = None
    decided_at: float | None = None
    decision_reason: str | None = None
    category: str | None = None
    remembered_until: float | None = None  # "approve and remember": same agent and action pass until then
    holder_until: float = 0.0  # the holding process's lease; a pending approval past it is abandoned
    retry_until: float | None = None  # approved after abandonment: the identical retry may pass until then
    used_by_retry: bool = False

    def effective_status(self, now: float | None = None) -> Status:
        if self.status == "pending" and self.holder_until and self.holder_until < (now or time.time()):
            return "abandoned"
        return self.status

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.effective_status()
        for internal in ("holder_until", "retry_until", "used_by_retry"):
            del data[internal]
        return data

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> Approval:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, slots=True)
class Grant:
    """An "approve and remember" grant: this agent may do this action without a hold until `until`."""

    approval_id: str
    by: str
    until: float


class ApprovalStore(Protocol):
    lease: float  # seconds a holder's claim lasts unless renewed; 0: holders never lapse (one process)

    async def open(self, approval: Approval) -> None:
        """Store a new pending approval held by this process."""
        ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def list(self, status: str | None, agent: str | None, limit: int) -> list[Approval]:
        """Newest first; `status` filters on the effective status (so `abandoned` finds crashed holders)."""
        ...

    async def decide(self, approval_id: str, approve: bool, by: str, reason: str | None, category: str | None,
                     remember_for: float | None) -> Approval:
        """Decide a pending or abandoned approval; raise KeyError if unknown, ApprovalConflict if decided."""
        ...

    async def wait(self, approval: Approval) -> Approval:
        """Until decided or expired (then `timeout`); wakes as soon as any replica decides. The final record."""
        ...

    async def abandon(self, approval_id: str) -> None:
        """The holder lost its agent (or is shutting down): pending becomes abandoned."""
        ...

    async def reuse(self, fingerprint: str) -> Approval | None:
        """An approval given after its holder went away, for exactly this request: usable once, then spent."""
        ...

    async def remembered(self, agent: str, upstream: str, verb: str, resource: str | None) -> Grant | None: ...

    async def close(self) -> None: ...


def grant_scope(agent: str, upstream: str, verb: str, resource: str | None) -> str:
    return f"{agent}\x1f{upstream}\x1f{verb}\x1f{resource or ''}"
