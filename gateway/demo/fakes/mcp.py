"""The fake MCP server: JSON-RPC 2.0 over streamable HTTP at `/mcp`, with a few CRM tools to list and call."""

from __future__ import annotations

import uuid
from typing import Any, Final

import orjson
from aiohttp import web

from .recording import Json, Recorder, json_response, read_json, recording_app, sse_event

MCP_PROTOCOL_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")


def _schema(properties: dict[str, str], required: list[str]) -> Json:
    props = {name: {"type": "string", "description": text} for name, text in properties.items()}
    return {"type": "object", "properties": props, "required": required}


MCP_TOOLS: Final[tuple[tuple[str, str, Json, Json], ...]] = (
    (
        "lookup_account",
        "Look up a CRM account by id.",
        _schema({"account_id": "Account id"}, ["account_id"]),
        {"readOnlyHint": True},
    ),
    (
        "send_email",
        "Send an email to a customer.",
        _schema({"to": "Recipient", "subject": "Subject", "body": "Body"}, ["to", "subject"]),
        {},
    ),
    (
        "delete_account",
        "Delete a CRM account.",
        _schema({"account_id": "Account id"}, ["account_id"]),
        {"destructiveHint": True},
    ),
    ("export_all", "Export every account.", _schema({"format": "csv or json"}, []), {}),
)


class _RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _rpc_error(id_: Any, code: int, message: str) -> Json:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def _mcp_result(method: str, params: Json) -> Json:
    if method == "initialize":
        asked = params.get("protocolVersion")
        version = asked if asked in MCP_PROTOCOL_VERSIONS else MCP_PROTOCOL_VERSIONS[-1]
        return {
            "protocolVersion": version,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "fake-crm-mcp", "version": "1.0.0"},
        }
    if method == "ping":
        return {}
    if method == "tools/list":
        tools = [
            {"name": name, "description": text, "inputSchema": schema, "annotations": annotations}
            for name, text, schema, annotations in MCP_TOOLS
        ]
        return {"tools": tools}
    if method == "tools/call":
        name, args = params.get("name"), params.get("arguments") or {}
        if name not in {tool[0] for tool in MCP_TOOLS}:
            raise _RpcError(-32602, f"Unknown tool: {name}")
        text = f"called {name} with {orjson.dumps(args, option=orjson.OPT_SORT_KEYS).decode()}"
        return {"content": [{"type": "text", "text": text}], "isError": False}
    if method == "resources/list":
        return {"resources": []}
    if method == "prompts/list":
        return {"prompts": []}
    raise _RpcError(-32601, f"Method not found: {method}")


def _mcp_answer(message: Any) -> Json | None:
    """The response to one JSON-RPC message; None for notifications and client responses."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return _rpc_error(None, -32600, "Invalid Request")
    if "method" not in message:
        return None  # a response to a server request: nothing to say
    if "id" not in message:
        return None  # a notification
    params = message.get("params") or {}
    if not isinstance(message["method"], str) or not isinstance(params, dict):
        return _rpc_error(message["id"], -32600, "Invalid Request")
    try:
        return {"jsonrpc": "2.0", "id": message["id"], "result": _mcp_result(message["method"], params)}
    except _RpcError as exc:
        return _rpc_error(message["id"], exc.code, exc.message)


def mcp_app(recorder: Recorder, *, sse: bool = False) -> web.Application:
    """An MCP server at `/mcp`; with `sse`, POSTs that accept `text/event-stream` are answered as SSE."""

    async def post(request: web.Request) -> web.StreamResponse:
        payload = await read_json(request)
        batch = isinstance(payload, list)
        messages = payload if isinstance(payload, list) else [payload]
        if payload is None:
            return json_response(_rpc_error(None, -32700, "Parse error"), 400)
        if not messages:
            return json_response(_rpc_error(None, -32600, "Invalid Request: empty batch"), 400)
        answers = [answer for answer in map(_mcp_answer, messages) if answer is not None]
        if not answers:
            return web.Response(status=202)
        headers = {}
        if any(isinstance(m, dict) and m.get("method") == "initialize" for m in messages):
            headers["Mcp-Session-Id"] = uuid.uuid4().hex
        if sse and "text/event-stream" in request.headers.get("Accept", ""):
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
            )
            await resp.prepare(request)
            for answer in answers:
                await resp.write(sse_event(answer, "message"))
            await resp.write_eof()
            return resp
        return json_response(answers if batch else answers[0], headers=headers)

    async def get(request: web.Request) -> web.Response:
        return web.Response(status=405, headers={"Allow": "POST, DELETE"})

    async def delete(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def not_found(request: web.Request) -> web.Response:
        return json_response(
            {"error": {"type": "not_found", "message": f"no route {request.method} {request.path}"}}, 404
        )

    app = recording_app(recorder)
    app.router.add_post("/mcp", post)
    app.router.add_get("/mcp", get, allow_head=False)
    app.router.add_delete("/mcp", delete)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
