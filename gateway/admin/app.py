"""The admin API: health and readiness, and the approval queue (list, approve, deny)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from ..approvals import CATEGORIES, ApprovalConflict
from ..limits.store import StoreUnavailable
from ..policy.load import parse_duration
from ..runtime import RUNTIME
from .agents import add_agent_routes
from .auth import admin_auth, admin_error, require_role
from .console import add_console
from .metrics_route import metrics
from .rules import add_rules_routes
from .tail import close_tail, traces_stream


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body: dict[str, Any] = {"ready": rt.ready, "policy_version": rt.policy.version}
    if rt.reloader.last_error is not None:  # still serving the last good version, and saying why not the new one
        body["rules_error"] = rt.reloader.last_error
    if (trace_error := getattr(rt.sink, "failing", None)) is not None:  # still deciding; the record is at risk
        body["trace_error"] = trace_error
    return _json(body, 200 if rt.ready else 503)


async def list_approvals(request: web.Request) -> web.Response:
    require_role(request, "admin", "approver")
    rt = request.app[RUNTIME]
    try:
        limit = min(max(int(request.query.get("limit", "200")), 1), 1000)
    except ValueError:
        return admin_error(400, "bad_request", "'limit' must be a whole number")
    try:
        approvals = await rt.approvals.list(request.query.get("status"), request.query.get("agent"), limit)
    except StoreUnavailable:
        return admin_error(503, "store_unavailable", "the approvals store is unreachable")
    return _json({"approvals": [a.public() for a in approvals]})


async def get_approval(request: web.Request) -> web.Response:
    require_role(request, "admin", "approver")
    approval_id = request.match_info["id"]
    try:
        approval = await request.app[RUNTIME].approvals.get(approval_id)
    except StoreUnavailable:
        return admin_error(503, "store_unavailable", "the approvals store is unreachable")
    if approval is None:
        return admin_error(404, "not_found", f"no approval {approval_id!r}")
    return _json(approval.public())


async def _decide(request: web.Request, approve: bool) -> web.Response:
    admin = require_role(request, "admin", "approver")
    rt = request.app[RUNTIME]
    body: Any = {}
    if request.can_read_body:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return admin_error(400, "bad_request", "body must be JSON: {\"reason\": ..., \"category\": ...}")
    if not isinstance(body, dict):
        return admin_error(400, "bad_request", "body must be a JSON object")
    reason = body.get("reason")
    category = body.get("category")
    remember = body.get("remember")
    if reason is not None and not isinstance(reason, str):
        return admin_error(400, "bad_request", "'reason' must be a string")
    if category is not None and category not in CATEGORIES:
        return admin_error(400, "bad_request", f"'category' must be one of {', '.join(CATEGORIES)}")
    remember_for = None
    if remember is not None:
        try:
            remember_for = parse_duration(remember)
        except ValueError:
            return admin_error(400, "bad_request", "'remember' must be a duration such as 30m or 8h")
        if not approve:
            return admin_error(400, "bad_request", "'remember' applies to approvals only")
    approval_id = request.match_info["id"]
    try:
        # The approver is who the credential says, never the body's `by` (which is ignored).
        approval = await rt.approvals.decide(approval_id, approve, admin.name, reason, category, remember_for)
    except KeyError:
        return admin_error(404, "not_found", f"no approval {approval_id!r}")
    except ApprovalConflict as exc:
        return admin_error(409, "conflict", str(exc))
    except StoreUnavailable:
        return admin_error(503, "store_unavailable", "the approvals store is unreachable; nothing was decided")
    return _json(approval.public())


async def approve(request: web.Request) -> web.Response:
    return await _decide(request, True)


async def deny(request: web.Request) -> web.Response:
    return await _decide(request, False)


async def agent_usage(request: web.Request) -> web.Response:
    """Current use of every budget and rate limit of one agent, read from the store (changes nothing)."""
    require_role(request, "admin", "approver")
    rt = request.app[RUNTIME]
    agent_id = request.match_info["id"]
    agent = rt.policy.agents.get(agent_id)
    if agent is None:
        return admin_error(404, "not_found", f"no agent {agent_id!r} in the rules")
    now = time.time()
    rates, budgets = agent.planner.usage_counters(now)
    try:
        remaining, used = await rt.store.peek(rates, budgets, now)
    except StoreUnavailable:
        return admin_error(503, "store_unavailable", "the limits store is unreachable")
    return _json({
        "agent": agent_id,
        "budgets": [b.state(u) for b, u in zip(budgets, used, strict=True)],
        "rate_limits": [{"id": r.id, "limit": r.limit, "per_seconds": r.period, "remaining": left,
                         "unit": "requests" if r.per_call else "tokens"}
                        for r, left in zip(rates, remaining, strict=True)],
    })


def admin_app() -> web.Application:
    app = web.Application(middlewares=[admin_auth])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/approvals", list_approvals)
    app.router.add_get("/approvals/{id}", get_approval)
    app.router.add_post("/approvals/{id}/approve", approve)
    app.router.add_post("/approvals/{id}/deny", deny)
    app.router.add_get("/agents/{id}/usage", agent_usage)
    add_agent_routes(app)
    add_rules_routes(app)
    app.router.add_get("/traces/stream", traces_stream)
    app.router.add_get("/metrics", metrics)
    app.on_shutdown.append(close_tail)  # open streams end, so shutdown does not wait on their watchers
    add_console(app)
    return app
