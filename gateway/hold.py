"""hold: park a risky call until a human decides (any replica), its hold times out, or its agent hangs up."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from .approvals import Approval
from .errors import GatewayError
from .incoming import Incoming
from .limits.store import StoreUnavailable
from .models import Action, Agent, Decision
from .trace.event import TraceEvent

if TYPE_CHECKING:
    from .runtime import Runtime


async def hold(rt: Runtime, agent: Agent, action: Action, decision: Decision, incoming: Incoming,
               event: TraceEvent, fingerprint: str, path: str) -> None:
    """Return when the call may go on; raise the agent's error otherwise."""
    store = rt.approvals
    try:
        earlier = await store.reuse(fingerprint)
        if earlier is not None:  # approved after its holder went away: this identical retry passes, once
            event.approval = {"id": earlier.id, "by": earlier.decided_by, "outcome": "approved", "waited_ms": 0.0,
                              "retry_of_abandoned": True}
            return
        grant = await store.remembered(agent.id, action.upstream, action.verb, action.resource)
        if grant is not None:  # "approve and remember" for this agent and action
            event.approval = {"id": grant.approval_id, "by": grant.by, "outcome": "approved", "waited_ms": 0.0,
                              "remembered_until": grant.until}
            return
        now = time.time()
        approval = Approval(
            id=uuid.uuid4().hex, agent=agent.id, upstream=action.upstream, method=incoming.method, path=path,
            verb=action.verb, resource=action.resource, tool=action.tool, rule=decision.rule, reason=decision.reason,
            fingerprint=fingerprint, created_at=now, expires_at=now + (decision.timeout or rt.settings.hold_timeout),
            evidence=decision.evidence, holder_until=now + store.lease if store.lease else 0.0)
        await store.open(approval)
    except StoreUnavailable as exc:
        raise GatewayError("store_unavailable", "the approvals store is unreachable, so the held call cannot wait "
                                                "for a human; retry shortly") from exc
    for listener in rt.on_approval_opened:
        listener(approval)
    event.approval = {"id": approval.id, "outcome": "pending"}
    waited = time.perf_counter()
    final = approval
    try:
        final = await store.wait(approval)
    except asyncio.CancelledError:
        # The agent hung up: nobody will receive an approved answer, so the approval is abandoned (a later
        # approval lets the identical retry through once). Done from a task of its own: we are being cancelled.
        rt.spawn(store.abandon(approval.id))
        final.status = "abandoned"
        raise
    finally:
        event.approval = {"id": approval.id, "by": final.decided_by, "outcome": final.status,
                          "waited_ms": round((time.perf_counter() - waited) * 1000, 3)}
        if final.decision_reason:
            event.approval["reason"] = final.decision_reason
        if final.remembered_until:
            event.approval["remembered_until"] = final.remembered_until
    if final.status == "approved":
        return
    if final.status == "denied":
        why = f": {final.decision_reason}" if final.decision_reason else ""
        raise GatewayError("approval_denied", f"a human denied this call{why}", rule=decision.rule)
    raise GatewayError("approval_timeout", f"nobody approved this call within {decision.timeout:g}s",
                       rule=decision.rule)

