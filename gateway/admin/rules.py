"""Admin routes for the rule set: the version served (here and on every replica), reload, rollback, and what
staged rules would have done."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..errors import StoreUnavailable
from ..runtime import RUNTIME
from .auth import admin_error, require_role


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def rules_state(request: web.Request) -> web.Response:
    require_role(request, "admin", "approver")
    rt = request.app[RUNTIME]
    try:
        replicas = await rt.sync.replicas()
    except StoreUnavailable:
        replicas = []
    return _json({**rt.reloader.describe(), "replicas": replicas})


async def reload_rules(request: web.Request) -> web.Response:
    admin = require_role(request, "admin")
    rt = request.app[RUNTIME]
    outcome = await rt.reloader.reload("admin", admin.name)
    if outcome.errors:
        return _json({"error": {"type": "rules_invalid", "message": f"the change has {len(outcome.errors)} errors; "
                                                                    f"still serving {outcome.version}",
                                "errors": list(outcome.errors)}}, 422)
    try:
        await rt.sync.broadcast("reload", admin.name)
    except StoreUnavailable:
        return _json({"version": outcome.version, "changed": outcome.changed,
                      "warning": "reloaded here; the other replicas could not be told (store unreachable)"})
    return _json({"version": outcome.version, "changed": outcome.changed})


async def rollback_rules(request: web.Request) -> web.Response:
    admin = require_role(request, "admin")
    rt = request.app[RUNTIME]
    try:
        body = orjson.loads(await request.read()) if request.can_read_body else {}
    except orjson.JSONDecodeError:
        return admin_error(400, "bad_request", 'body must be JSON: {"version": "sha256:..."}')
    version = body.get("version") if isinstance(body, dict) else None
    if not isinstance(version, str):
        return admin_error(400, "bad_request", "'version' must name a version from GET /rules 'rollback_to'")
    try:
        outcome = rt.reloader.rollback(version, admin.name)
    except KeyError:
        return admin_error(404, "not_found", f"version {version!r} is not kept here; roll back by git instead "
                                             "(check out the old rules and reload)")
    try:
        await rt.sync.broadcast("rollback", admin.name, version)
    except StoreUnavailable:
        return _json({"version": outcome.version, "changed": outcome.changed,
                      "warning": "rolled back here; the other replicas could not be told (store unreachable)"})
    return _json({"version": outcome.version, "changed": outcome.changed})


async def staged_rules(request: web.Request) -> web.Response:
    require_role(request, "admin", "approver")
    rt = request.app[RUNTIME]
    return _json({"version": rt.policy.version, "staged": rt.staged.report(rt.policy)})


def add_rules_routes(app: web.Application) -> None:
    app.router.add_get("/rules", rules_state)
    app.router.add_post("/rules/reload", reload_rules)
    app.router.add_post("/rules/rollback", rollback_rules)
    app.router.add_get("/rules/staged", staged_rules)
