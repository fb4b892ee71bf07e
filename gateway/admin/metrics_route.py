"""`GET /metrics`: this process's Prometheus metrics, for a scraper holding an admin or approver credential."""

from __future__ import annotations

from aiohttp import web

from ..metrics import CONTENT_TYPE, METRICS
from .auth import require_role


async def metrics(request: web.Request) -> web.Response:
    require_role(request, "admin", "approver")
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})
