"""What every fake upstream shares: the Recorder that keeps each request as the upstream saw it, the middleware
that fills it, and the small JSON, SSE and text helpers the apps answer with."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY: Final = 64 * 1024 * 1024  # above the gateway's own limit, so the gateway is what refuses big bodies


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


def recording_app(recorder: Recorder) -> web.Application:
    app = web.Application(middlewares=[_record], client_max_size=MAX_BODY)
    app[RECORDER] = recorder
    return app


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or None when it is not valid JSON."""
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None


def text_of(value: Any) -> str:
    """Flatten message content (a string, content parts or blocks) into its text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(filter(None, (text_of(item) for item in value)))
    if isinstance(value, dict):
        return text_of(value.get("text", value.get("content")))
    return ""


def last_user_text(messages: Any) -> str:
    if isinstance(messages, str):
        return messages
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return text_of(message.get("content"))
    return ""


def word_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: one token per whitespace-separated word."""
    return max(1, len(text.split()))


def split_pieces(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text) or [text]


def sse_event(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


async def open_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"
