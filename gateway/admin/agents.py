"""Admin routes for agents: their cards (rules, budgets, pause state) and the kill switch."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from ..limits.store import StoreUnavailable
from ..policy.compile import AgentPolicy
from ..runtime import RUNTIME, Runtime
from ..trace.event import TraceEvent, new_span_id, new_trace_id
from .auth import admin_error, require_role


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def card(rt: Runtime, agent: AgentPolicy) -> dict[str, Any]:
    """Everything the console shows about one agent."""
    spec = agent.spec
    now = time.time()
    rates, budgets = agent.planner.usage_counters(now)
    try:
        remaining, used = await rt.store.peek(rates, budgets, now)
        pending = len(await rt.approvals.list("pending", spec.id, 1000))
    except StoreUnavailable:
        remaining, used, pending = tuple(r.limit for r in rates), tuple(0 for _ in budgets), 0
    pause = rt.control.paused(spec.id)
    return {
        "id": spec.id, "owner": spec.owner, "purpose": spec.purpose, "mode": spec.mode,
        "paused": pause.public() if pause else None,
        "grants": [{"effect": r.effect, "upstream": r.upstream, "verbs": list(r.verbs),
                    "resources": list(r.resources) if r.resources is not None else None, "rule": r.id,
                    "enforce": r.enforce} for r in spec.rules],
        "staged": [row for row in rt.staged.report(rt.policy) if row["agent"] == spec.id],
        "budgets": [b.state(u) for b, u in zip(budgets, used, strict=True)],
        "rate_limits": [{"id": r.id, "limit": r.limit, "per_seconds": r.period, "remaining": left,
                         "unit": "requests" if r.per_call else "tokens"} for r, left in zip(rates, remaining,
                                                                                          strict=True)],
        "pending_approvals": pending,
    }


def _agent(request: web.Request) -> AgentPolicy | web.Response:
    agent_id = request.match_info["id"]
    agent = request.app[RUNTIME].policy.agents.get(agent_id)
    return agent if agent is not None else admin_error(404, "not_found", f"no agent {agent_id!r} in the rules")


async def list_agents(request: web.Request) -> web.Response:
    require_role(request, "admin", "approver")
    rt = request.app[RUNTIME]
    return _json({"agents": [await card(rt, agent) for agent in rt.policy.agents.values()]})


async def get_agent(request: web.Request) -> web.Response:
    require_role(request, "admin", "approver")
    agent = _agent(request)
    if isinstance(agent, web.Response):
        return agent
    return _json(await card(request.app[RUNTIME], agent))


async def _reason(request: web.Request, required: bool) -> str | web.Response:
    body: Any = {}
    if request.can_read_body:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return admin_error(400, "bad_request", 'body must be JSON: {"reason": ...}')
    reason = body.get("reason") if isinstance(body, dict) else None
    if reason is not None and not isinstance(reason, str):
        return admin_error(400, "bad_request", "'reason' must be a string")
    if required and not (reason or "").strip():
        return admin_error(400, "bad_request", "pausing an agent needs a 'reason'")
    return reason or ""


def _trace(rt: Runtime, kind: str, agent: str, by: str, reason: str) -> None:
    rt.sink.emit(TraceEvent(trace_id=new_trace_id(), span_id=new_span_id(), kind=kind, agent=agent, reason=reason,
                            detail={"by": by}))


async def _switch(request: web.Request, pause: bool) -> web.Response:
    """The kill switch: pause (a reason is required) or resume; admins only, traced with who and why."""
    admin = require_role(request, "admin")
    agent = _agent(request)
    if isinstance(agent, web.Response):
        return agent
    reason = await _reason(request, required=pause)
    if isinstance(reason, web.Response):
        return reason
    rt = request.app[RUNTIME]
    try:
        if pause:
            await rt.control.pause(agent.spec.id, admin.name, reason)
        else:
            await rt.control.resume(agent.spec.id)
    except StoreUnavailable:
        still = "NOT paused" if pause else "still paused"
        return admin_error(503, "store_unavailable", f"the control store is unreachable; the agent is {still}")
    _trace(rt, "agent_paused" if pause else "agent_resumed", agent.spec.id, admin.name, reason)
    return _json(await card(rt, agent))


async def pause_agent(request: web.Request) -> web.Response:
    return await _switch(request, pause=True)


async def resume_agent(request: web.Request) -> web.Response:
    return await _switch(request, pause=False)


def add_agent_routes(app: web.Application) -> None:
    app.router.add_get("/agents", list_agents)
    app.router.add_get("/agents/{id}", get_agent)
    app.router.add_post("/agents/{id}/pause", pause_agent)
    app.router.add_post("/agents/{id}/resume", resume_agent)
