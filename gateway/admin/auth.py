"""Admin-side authentication: the static admin token, or an admin/approver JWT. Agent tokens never pass."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from ..errors import GatewayError
from ..runtime import RUNTIME

# Probes must work without a credential; nothing else on the admin side does.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True, slots=True)
class Admin:
    """Who is calling the admin API: `sub` of their JWT (or `admin` for the static token) and their role."""

    name: str
    role: str


ADMIN: web.RequestKey[Admin] = web.RequestKey("admin", Admin)


def admin_error(status: int, type_: str, message: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=orjson.dumps({"error": {"type": type_, "message": message}}))


async def identify_admin(request: web.Request) -> Admin:
    rt = request.app[RUNTIME]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise GatewayError("unauthenticated", "the admin API needs 'Authorization: Bearer <admin token or JWT>'")
    token = token.strip()
    admin_token = rt.settings.admin_token
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        return Admin("admin", "admin")
    claims = await rt.authenticator.verify_admin(token)
    return Admin(str(claims.get("sub", "unknown")), str(claims["role"]))


@web.middleware
async def admin_auth(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.path in ("/", "/console") or request.path.startswith("/console/"):
        return await handler(request)
    try:
        request[ADMIN] = await identify_admin(request)
    except GatewayError as error:
        response = admin_error(401, error.type, error.message)
        response.headers["WWW-Authenticate"] = 'Bearer realm="agent-gateway-admin"'
        return response
    return await handler(request)


def require_role(request: web.Request, *roles: str) -> Admin:
    admin = request[ADMIN]
    if admin.role not in roles:
        raise web.HTTPForbidden(
            content_type="application/json",
            text=orjson.dumps({"error": {"type": "forbidden", "message": f"needs role {' or '.join(roles)}"}}).decode())
    return admin
