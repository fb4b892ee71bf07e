"""Fake upstreams on loopback (OpenAI, Anthropic, an MCP server, an ERP REST API) for the demo and e2e tests.

Each app records every request before answering, and answers in the real API's shapes, deterministically,
well enough for the official `openai`, `anthropic` and `mcp` clients to parse.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import re
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import orjson
from aiohttp import web

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY: Final = 64 * 1024 * 1024  # above the gateway's own limit, so the gateway is what refuses big bodies
MCP_PROTOCOL_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODELS: Final = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")


@dataclass(frozen=True)
class Recorded:
    """One request as the upstream saw it. Header names are lower-cased; repeated headers are joined by ", "."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Recorder:
    requests: list[Recorded] = field(default_factory=list)

    def last(self) -> Recorded:
        if not self.requests:
            raise LookupError("no request recorded")
        return self.requests[-1]


RECORDER: Final = web.AppKey("recorder", Recorder)


@web.middleware
async def _record(request: web.Request, handler: Handler) -> web.StreamResponse:
    body = await request.read()
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    path, _, query = request.raw_path.partition("?")
    request.app[RECORDER].requests.append(Recorded(request.method, path, query, headers, body))
    return await handler(request)


def _app(recorder: Recorder) -> web.Application:
    app = web.Application(middlewares=[_record], client_max_size=MAX_BODY)
    app[RECORDER] = recorder
    return app


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


async def _body(request: web.Request) -> Any:
    """The request's JSON body, or None when it is not valid JSON."""
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None


def _text_of(value: Any) -> str:
    """Flatten message content (a string, content parts or blocks) into its text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(filter(None, (_text_of(item) for item in value)))
    if isinstance(value, dict):
        return _text_of(value.get("text", value.get("content")))
    return ""


def _last_user_text(messages: Any) -> str:
    if isinstance(messages, str):
        return messages
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text_of(message.get("content"))
    return ""


def _tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: one token per whitespace-separated word."""
    return max(1, len(text.split()))


def _pieces(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text) or [text]


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


async def _open_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


# --- OpenAI -------------------------------------------------------------------------------------------------


def _openai_error(
    status: int, message: str, type_: str = "invalid_request_error", code: str | None = None
) -> web.Response:
    return _json({"error": {"message": message, "type": type_, "param": None, "code": code}}, status)


def openai_app(recorder: Recorder, *, chunk_delay: float = 0.0) -> web.Application:
    """OpenAI at `/v1/...`; `chunk_delay` seconds pass between streamed chunks (for demos of streaming)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        req = await _body(request)
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            return _openai_error(400, "body must be a JSON object with a 'model'")
        messages = req.get("messages") or []
        reply = f"echo: {_last_user_text(messages)}"
        usage = {
            "prompt_tokens": _tokens(_text_of(messages)),
            "completion_tokens": _tokens(reply),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        base: Json = {"id": _new_id("chatcmpl-"), "created": int(time.time()), "model": req["model"]}
        if not req.get("stream"):
            message = {"role": "assistant", "content": reply, "refusal": None}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            return _json({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        options = req.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        base = {**base, "object": "chat.completion.chunk"} | ({"usage": None} if include_usage else {})

        def chunk(delta: Json, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return _sse({**base, "choices": [choice]})

        resp = await _open_sse(request)
        await resp.write(chunk({"role": "assistant", "content": ""}))
        for piece in _pieces(reply):
            await asyncio.sleep(chunk_delay)
            await resp.write(chunk({"content": piece}))
        await resp.write(chunk({}, "stop"))
        if include_usage:
            await resp.write(_sse({**base, "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def responses(request: web.Request) -> web.StreamResponse:
        req = await _body(request)
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            return _openai_error(400, "body must be a JSON object with a 'model'")
        reply = f"echo: {_last_user_text(req.get('input'))}"
        item_id = _new_id("msg_")
        text = {"type": "output_text", "text": reply, "annotations": []}
        message = {"type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [text]}
        input_tokens, output_tokens = _tokens(_text_of(req.get("input"))), _tokens(reply)
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
        done: Json = {
            "id": _new_id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "model": req["model"],
            "status": "completed",
            "output": [message],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "error": None,
            "incomplete_details": None,
            "usage": usage,
        }
        if not req.get("stream"):
            return _json(done)
        seq = itertools.count()
        resp = await _open_sse(request)
        created = {**done, "status": "in_progress", "output": [], "usage": None}
        await resp.write(
            _sse({"type": "response.created", "sequence_number": next(seq), "response": created}, "response.created")
        )
        for piece in _pieces(reply):
            delta = {
                "type": "response.output_text.delta",
                "sequence_number": next(seq),
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
                "logprobs": [],
            }
            await resp.write(_sse(delta, "response.output_text.delta"))
        completed = {"type": "response.completed", "sequence_number": next(seq), "response": done}
        await resp.write(_sse(completed, "response.completed"))
        await resp.write_eof()
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        req = await _body(request)
        if not isinstance(req, dict) or not isinstance(req.get("model"), str) or "input" not in req:
            return _openai_error(400, "body must be a JSON object with 'model' and 'input'")
        inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
        data = []
        for index, item in enumerate(inputs):
            vector = [byte / 255 for byte in hashlib.sha256(str(item).encode()).digest()[:8]]
            packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            embedding = packed if req.get("encoding_format") == "base64" else vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(_tokens(str(item)) for item in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _json({"object": "list", "data": data, "model": req["model"], "usage": usage})

    async def models(request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": 1700000000, "owned_by": "openai"} for name in MODELS]
        return _json({"object": "list", "data": data})

    async def not_found(request: web.Request) -> web.Response:
        return _openai_error(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")

    app = _app(recorder)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


# --- Anthropic ----------------------------------------------------------------------------------------------


def _anthropic_error(status: int, type_: str, message: str) -> web.Response:
    return _json({"type": "error", "error": {"type": type_, "message": message}}, status)


def anthropic_app(recorder: Recorder, *, chunk_delay: float = 0.0) -> web.Application:
    """Anthropic Messages API at `/v1/messages` (and `/v1/messages/count_tokens`)."""

    async def messages(request: web.Request) -> web.StreamResponse:
        req = await _body(request)
        if not isinstance(req, dict) or not isinstance(req.get("model"), str) or "messages" not in req:
            return _anthropic_error(400, "invalid_request_error", "body must have 'model' and 'messages'")
        reply = f"echo: {_last_user_text(req['messages'])}"
        input_tokens = _tokens(_text_of([req.get("system"), req["messages"]]))
        message: Json = {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": req["model"],
            "content": [{"type": "text", "text": reply}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": _tokens(reply)},
        }
        if not req.get("stream"):
            return _json(message)
        resp = await _open_sse(request)
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }
        events: list[tuple[str, Json]] = [
            ("message_start", {"message": start}),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ("ping", {}),
            *(
                ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
                for piece in _pieces(reply)
            ),
            ("content_block_stop", {"index": 0}),
            (
                "message_delta",
                {
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": _tokens(reply)},
                },
            ),
            ("message_stop", {}),
        ]
        for name, data in events:
            if name == "content_block_delta":
                await asyncio.sleep(chunk_delay)
            await resp.write(_sse({"type": name, **data}, name))
        await resp.write_eof()
        return resp

    async def count_tokens(request: web.Request) -> web.Response:
        req = await _body(request)
        if not isinstance(req, dict):
            return _anthropic_error(400, "invalid_request_error", "body must be a JSON object")
        return _json({"input_tokens": _tokens(_text_of([req.get("system"), req.get("messages")]))})

    async def not_found(request: web.Request) -> web.Response:
        return _anthropic_error(404, "not_found_error", f"Not found: {request.method} {request.path}")

    app = _app(recorder)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


# --- MCP (streamable HTTP, JSON-RPC 2.0) --------------------------------------------------------------------


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
        payload = await _body(request)
        batch = isinstance(payload, list)
        messages = payload if isinstance(payload, list) else [payload]
        if payload is None:
            return _json(_rpc_error(None, -32700, "Parse error"), 400)
        if not messages:
            return _json(_rpc_error(None, -32600, "Invalid Request: empty batch"), 400)
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
                await resp.write(_sse(answer, "message"))
            await resp.write_eof()
            return resp
        return _json(answers if batch else answers[0], headers=headers)

    async def get(request: web.Request) -> web.Response:
        return web.Response(status=405, headers={"Allow": "POST, DELETE"})

    async def delete(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def not_found(request: web.Request) -> web.Response:
        return _json({"error": {"type": "not_found", "message": f"no route {request.method} {request.path}"}}, 404)

    app = _app(recorder)
    app.router.add_post("/mcp", post)
    app.router.add_get("/mcp", get, allow_head=False)
    app.router.add_delete("/mcp", delete)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


# --- HTTP tool: an ERP REST API -----------------------------------------------------------------------------

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
        return _json({"error": {"type": "not_found", "message": f"no route {request.method} {request.path}"}}, 404)

    async def vendors(request: web.Request) -> web.Response:
        return _json({"vendors": [_vendor(*row) for row in VENDORS]})

    async def vendor(request: web.Request) -> web.Response:
        found = [row for row in VENDORS if row[0] == request.match_info["id"]]
        return _json(_vendor(*found[0])) if found else missing(request)

    async def pay(request: web.Request) -> web.Response:
        body = await _body(request)
        if not isinstance(body, dict):
            return _json({"error": {"type": "bad_request", "message": "body must be a JSON object"}}, 400)
        payment = {**body, "id": f"pay-{next(payment_ids)}", "status": "created"}
        return _json(payment, 201)

    async def delete_vendor(request: web.Request) -> web.Response:
        return _json({"deleted": request.match_info["id"]})

    async def export(request: web.Request) -> web.Response:
        return _json({"vendors": [_vendor(*row) for row in VENDORS], "exported_at": int(time.time())})

    async def not_found(request: web.Request) -> web.Response:
        return missing(request)

    app = _app(recorder)
    app.router.add_get("/vendors", vendors)
    app.router.add_get("/vendors/{id}", vendor)
    app.router.add_post("/payments", pay)
    app.router.add_delete("/vendors/{id}", delete_vendor)
    app.router.add_get("/admin/export", export)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


# --- Running them -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningFake:
    """A started fake: `url` is the base URL, `recorder` what it has seen."""

    url: str
    recorder: Recorder
    runner: web.AppRunner

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_app(app: web.Application, recorder: Recorder, host: str = "127.0.0.1") -> RunningFake:
    """Serve `app` on a free port of `host`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, 0).start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    return RunningFake(f"http://{host}:{port}", recorder, runner)


@dataclass(frozen=True)
class FakeUpstreams:
    """All four fakes. Upstream URLs for rule files: `openai_url` (ends in /v1), `anthropic_url`, `mcp_url`
    (the MCP endpoint is `mcp_url + "/mcp"`) and `http_tool_url`."""

    openai: RunningFake
    anthropic: RunningFake
    mcp: RunningFake
    http_tool: RunningFake

    @property
    def openai_url(self) -> str:
        return f"{self.openai.url}/v1"

    @property
    def anthropic_url(self) -> str:
        return self.anthropic.url

    @property
    def mcp_url(self) -> str:
        return self.mcp.url

    @property
    def http_tool_url(self) -> str:
        return self.http_tool.url

    async def close(self) -> None:
        for fake in (self.openai, self.anthropic, self.mcp, self.http_tool):
            await fake.close()

    async def __aenter__(self) -> FakeUpstreams:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def start_all(host: str = "127.0.0.1", *, mcp_sse: bool = False, chunk_delay: float = 0.0) -> FakeUpstreams:
    """Start the four fakes on free ports; close them with `await fakes.close()` or `async with`."""
    factories: list[Callable[[Recorder], web.Application]] = [
        lambda rec: openai_app(rec, chunk_delay=chunk_delay),
        lambda rec: anthropic_app(rec, chunk_delay=chunk_delay),
        lambda rec: mcp_app(rec, sse=mcp_sse),
        http_tool_app,
    ]
    started: list[RunningFake] = []
    try:
        for factory in factories:
            recorder = Recorder()
            started.append(await start_app(factory(recorder), recorder, host))
    except BaseException:
        for fake in started:
            await fake.close()
        raise
    return FakeUpstreams(*started)
