"""The gateway's live parts, shared by both listeners; created and closed in the app's cleanup context."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .approvals import Approval, ApprovalStore
from .control import Control
from .identity import Authenticator
from .limits.alerts import Alerts
from .limits.enforce import Settler
from .limits.store import Store
from .metrics import Metrics
from .policy.compile import Policy
from .reload import Reloader
from .rules_sync import RulesSync
from .settings import Settings
from .staged import StagedCounts
from .trace.event import TraceEvent
from .trace.sinks import TraceSink
from .trace.tail import TailHub
from .upstream_client import UpstreamPool
from .webhooks import WebhookPoster


@dataclass
class Runtime:
    settings: Settings
    policy: Policy  # swapped whole on reload; each request pins the one it started with
    authenticator: Authenticator
    approvals: ApprovalStore
    session: aiohttp.ClientSession  # JWKS, webhooks: not the upstream calls
    upstreams: UpstreamPool  # the agents' calls to their upstreams
    sink: TraceSink
    store: Store
    settler: Settler
    alerts: Alerts
    control: Control
    tail: TailHub  # the live view of the trace: GET /traces/stream
    metrics: Metrics  # the trace counted for Prometheus: GET /metrics
    staged: StagedCounts  # what shadow and warn rules would have done
    reloader: Reloader
    sync: RulesSync
    ready: bool = True
    on_approval_opened: list[Callable[[Approval], None]] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # The calls in flight per agent, so the kill switch can cut them: task -> its trace event.
    inflight: dict[str, dict[asyncio.Task[Any], TraceEvent]] = field(default_factory=dict)
    webhooks: list[WebhookPoster] = field(default_factory=list)  # closed (drained) at shutdown

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine in the background, referenced until done (e.g. work a cancelled request leaves)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)


def cut_paused(rt: Runtime, agent: str, pause: object) -> None:
    """A control listener: when an agent is paused, end its calls in flight on this replica (streams too)."""
    if pause is None:
        return
    for task, event in list(rt.inflight.get(agent, {}).items()):
        event.error = "agent_paused"
        event.reason = f"cut: the agent was paused ({getattr(pause, 'reason', '')})"
        task.cancel()
