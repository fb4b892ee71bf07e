"""Classifier for plain HTTP tool upstreams: a route table, then the method's default verb."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..incoming import Incoming
from ..models import Action
from ..paths import segments
from ..policy.spec import RouteSpec

DEFAULT_VERBS = {
    "GET": "read",
    "HEAD": "read",
    "OPTIONS": "read",
    "POST": "create",
    "PUT": "update",
    "PATCH": "update",
    "DELETE": "delete",
}


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    verb: str
    resource: str | None


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: tuple[Route, ...]


def _pattern(path: str) -> re.Pattern[str]:
    """`/vendors/*` -> one segment; `/files/**` -> any rest. Matched case-insensitively: upstreams that
    ignore case must not let `/PAYMENTS` dodge a rule written for `/payments`."""
    parts = []
    for seg in path.strip("/").split("/"):
        if seg == "**":  # the rest, none included: `/admin/**` covers `/admin` itself
            parts.append("(?:/.*)?")
        elif seg == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + re.escape(seg))
    return re.compile("".join(parts) + "/?", re.IGNORECASE)


def compile_routes(routes: tuple[RouteSpec, ...]) -> RouteTable:
    return RouteTable(tuple(Route(r.method, _pattern(r.path), r.verb, r.resource) for r in routes))


def default_action(upstream: str, kind: str, request: Incoming, path: str | None = None) -> Action:
    """The method's default verb, and the first segment of `path` (default: the request's) as resource."""
    method = "GET" if request.method == "HEAD" else request.method
    parts = segments(request.path if path is None else path)
    resource = parts[0].lower() if parts else "/"
    return Action(upstream=upstream, kind=kind, verb=DEFAULT_VERBS.get(method, method.lower()),
                  resource=resource)


def classify(upstream: str, table: RouteTable, request: Incoming) -> Action:
    method = "GET" if request.method == "HEAD" else request.method
    for route in table.routes:
        if route.method in ("*", method) and route.pattern.fullmatch(request.path):
            parts = segments(request.path)
            resource = route.resource or (parts[0].lower() if parts else "/")
            return Action(upstream=upstream, kind="http", verb=route.verb, resource=resource)
    return default_action(upstream, "http", request)
