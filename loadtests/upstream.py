"""A fast fake LLM upstream for benchmarks: a fixed small chat completion (or SSE stream) with usage."""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import web

COMPLETION = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}})
CHUNKS = [b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,'
          b'"delta":{"content":"tok"},"finish_reason":null}]}\n\n'] * 8
USAGE = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],'
         b'"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}\n\n')


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    if not body.get("stream"):
        return web.Response(body=COMPLETION, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in CHUNKS:
        await response.write(chunk)
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(USAGE)
    await response.write(b"data: [DONE]\n\n")
    return response


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
