"""The gateway's live parts, shared by both listeners; created and closed in the app's cleanup context."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .approvals import Approvals
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
    approvals: Approvals
    session: aiohttp.ClientSession
    sink: TraceSink
    store: Store
    settler: Settler
    alerts: Alerts
    ready: bool = True


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
