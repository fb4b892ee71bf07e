"""The fake OpenAI upstream: chat completions, responses, embeddings and models at `/v1/...`, streamed or not."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import struct
import time
from typing import Final

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

MODELS: Final = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")


def _openai_error(
    status: int, message: str, type_: str = "invalid_request_error", code: str | None = None
) -> web.Response:
    return json_response({"error": {"message": message, "type": type_, "param": None, "code": code}}, status)


def openai_app(recorder: Recorder, *, chunk_delay: float = 0.0) -> web.Application:
    """OpenAI at `/v1/...`; `chunk_delay` seconds pass between streamed chunks (for demos of streaming)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        req = await read_json(request)
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            return _openai_error(400, "body must be a JSON object with a 'model'")
        messages = req.get("messages") or []
        reply = f"echo: {last_user_text(messages)}"
        usage = {
            "prompt_tokens": word_tokens(text_of(messages)),
            "completion_tokens": word_tokens(reply),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        base: Json = {"id": new_id("chatcmpl-"), "created": int(time.time()), "model": req["model"]}
        if not req.get("stream"):
            message = {"role": "assistant", "content": reply, "refusal": None}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            return json_response({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        options = req.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        base = {**base, "object": "chat.completion.chunk"} | ({"usage": None} if include_usage else {})

        def chunk(delta: Json, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return sse_event({**base, "choices": [choice]})

        resp = await open_sse(request)
        await resp.write(chunk({"role": "assistant", "content": ""}))
        for piece in split_pieces(reply):
            await asyncio.sleep(chunk_delay)
            await resp.write(chunk({"content": piece}))
        await resp.write(chunk({}, "stop"))
        if include_usage:
            await resp.write(sse_event({**base, "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def responses(request: web.Request) -> web.StreamResponse:
        req = await read_json(request)
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            return _openai_error(400, "body must be a JSON object with a 'model'")
        reply = f"echo: {last_user_text(req.get('input'))}"
        item_id = new_id("msg_")
        text = {"type": "output_text", "text": reply, "annotations": []}
        message = {"type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [text]}
        input_tokens, output_tokens = word_tokens(text_of(req.get("input"))), word_tokens(reply)
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
        done: Json = {
            "id": new_id("resp_"),
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
            return json_response(done)
        seq = itertools.count()
        resp = await open_sse(request)
        created = {**done, "status": "in_progress", "output": [], "usage": None}
        await resp.write(
            sse_event(
                {"type": "response.created", "sequence_number": next(seq), "response": created}, "response.created"
            )
        )
        for piece in split_pieces(reply):
            delta = {
                "type": "response.output_text.delta",
                "sequence_number": next(seq),
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
                "logprobs": [],
            }
            await resp.write(sse_event(delta, "response.output_text.delta"))
        completed = {"type": "response.completed", "sequence_number": next(seq), "response": done}
        await resp.write(sse_event(completed, "response.completed"))
        await resp.write_eof()
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        req = await read_json(request)
        if not isinstance(req, dict) or not isinstance(req.get("model"), str) or "input" not in req:
            return _openai_error(400, "body must be a JSON object with 'model' and 'input'")
        inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
        data = []
        for index, item in enumerate(inputs):
            vector = [byte / 255 for byte in hashlib.sha256(str(item).encode()).digest()[:8]]
            packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            embedding = packed if req.get("encoding_format") == "base64" else vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(word_tokens(str(item)) for item in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return json_response({"object": "list", "data": data, "model": req["model"], "usage": usage})

    async def models(request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": 1700000000, "owned_by": "openai"} for name in MODELS]
        return json_response({"object": "list", "data": data})

    async def not_found(request: web.Request) -> web.Response:
        return _openai_error(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")

    app = recording_app(recorder)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
