"""The fake HTTP tool: an ERP REST API with vendors, payments and an admin export."""

from __future__ import annotations

import itertools
import time
from typing import Final

from aiohttp import web

from .recording import Json, Recorder, json_response, read_json, recording_app

VENDORS: Final = (
    ("v-100", "Acme Supplies", "verified"),
    ("v-200", "Globex Parts", "verified"),
    ("v-300", "Initech Services", "pending"),
)


def _vendor(vendor_id: str, name: str, status: str) -> Json:
    return {"id": vendor_id, "name": name, "status": status}


def http_tool_app(recorder: Recorder) -> web.Application:
    """An ERP: vendors, payments and an admin export."""
    payment_ids = itertools.count(1)

    def missing(request: web.Request) -> web.Response:
        return json_response(
            {"error": {"type": "not_found", "message": f"no route {request.method} {request.path}"}}, 404
        )

    async def vendors(request: web.Request) -> web.Response:
        return json_response({"vendors": [_vendor(*row) for row in VENDORS]})

    async def vendor(request: web.Request) -> web.Response:
        found = [row for row in VENDORS if row[0] == request.match_info["id"]]
        return json_response(_vendor(*found[0])) if found else missing(request)

    async def pay(request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            return json_response({"error": {"type": "bad_request", "message": "body must be a JSON object"}}, 400)
        payment = {**body, "id": f"pay-{next(payment_ids)}", "status": "created"}
        return json_response(payment, 201)

    async def delete_vendor(request: web.Request) -> web.Response:
        return json_response({"deleted": request.match_info["id"]})

    async def export(request: web.Request) -> web.Response:
        return json_response({"vendors": [_vendor(*row) for row in VENDORS], "exported_at": int(time.time())})

    async def not_found(request: web.Request) -> web.Response:
        return missing(request)

    app = recording_app(recorder)
    app.router.add_get("/vendors", vendors)
    app.router.add_get("/vendors/{id}", vendor)
    app.router.add_post("/payments", pay)
    app.router.add_delete("/vendors/{id}", delete_vendor)
    app.router.add_get("/admin/export", export)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
