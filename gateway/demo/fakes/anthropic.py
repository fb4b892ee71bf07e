"""The fake Anthropic upstream: the Messages API (streamed or not) and token counting."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .recording import (
    Json,
    Recorder,
    json_response,
    last_user_text,
    new_id,
    open_sse,
    read_json,
    recording_app,
    split_pieces,
    sse_event,
    text_of,
    word_tokens,
)


def _anthropic_error(status: int, type_: str, message: str) -> web.Response:
    return json_response({"type": "error", "error": {"type": type_, "message": message}}, status)


def anthropic_app(recorder: Recorder, *, chunk_delay: float = 0.0) -> web.Application:
    """Anthropic Messages API at `/v1/messages` (and `/v1/messages/count_tokens`)."""

    async def messages(request: web.Request) -> web.StreamResponse:
        req = await read_json(request)
        if not isinstance(req, dict) or not isinstance(req.get("model"), str) or "messages" not in req:
            return _anthropic_error(400, "invalid_request_error", "body must have 'model' and 'messages'")
        reply = f"echo: {last_user_text(req['messages'])}"
        input_tokens = word_tokens(text_of([req.get("system"), req["messages"]]))
        message: Json = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": req["model"],
            "content": [{"type": "text", "text": reply}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": word_tokens(reply)},
        }
        if not req.get("stream"):
            return json_response(message)
        resp = await open_sse(request)
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
                for piece in split_pieces(reply)
            ),
            ("content_block_stop", {"index": 0}),
            (
                "message_delta",
                {
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": word_tokens(reply)},
                },
            ),
            ("message_stop", {}),
        ]
        for name, data in events:
            if name == "content_block_delta":
                await asyncio.sleep(chunk_delay)
            await resp.write(sse_event({"type": name, **data}, name))
        await resp.write_eof()
        return resp

    async def count_tokens(request: web.Request) -> web.Response:
        req = await read_json(request)
        if not isinstance(req, dict):
            return _anthropic_error(400, "invalid_request_error", "body must be a JSON object")
        return json_response({"input_tokens": word_tokens(text_of([req.get("system"), req.get("messages")]))})

    async def not_found(request: web.Request) -> web.Response:
        return _anthropic_error(404, "not_found_error", f"Not found: {request.method} {request.path}")

    app = recording_app(recorder)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
