"""The gateway's live parts, shared by both listeners; created and closed in the app's cleanup context."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .approvals import Approval, ApprovalStore
from .identity import Authenticator
from .limits.alerts import Alerts
from .limits.enforce import Settler
from .limits.store import Store
from .policy.compile import Policy
from .settings import Settings
from .trace.sinks import TraceSink


@dataclass
class Runtime:
    settings: Settings
    policy: Policy  # swapped whole on reload; each request pins the one it started with
    authenticator: Authenticator
    approvals: ApprovalStore
    session: aiohttp.ClientSession
    sink: TraceSink
    store: Store
    settler: Settler
    alerts: Alerts
    ready: bool = True
    on_approval_opened: list[Callable[[Approval], None]] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine in the background, referenced until done (e.g. work a cancelled request leaves)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
