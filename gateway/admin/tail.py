"""`GET /traces/stream`: this replica's trace events as server-sent events, as they are written."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..trace.tail import TAIL
from .auth import require_role

KEEPALIVE = 15.0  # seconds without an event before a comment line keeps proxies from closing the stream


async def traces_stream(request: web.Request) -> web.StreamResponse:
    require_role(request, "admin", "approver")
    hub = request.app[TAIL]
    subscription = hub.subscribe(agent=request.query.get("agent") or None,
                                 decision=request.query.get("decision") or None,
                                 kind=request.query.get("kind") or None)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})  # nginx and kin must not buffer a live stream
    try:
        await response.prepare(request)
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE):
                    line = await anext(subscription)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            except StopAsyncIteration:
                break
            await response.write(b"data: " + line + b"\n\n")
    except ConnectionResetError:  # the watcher went away: nothing to tell anyone
        return response
    finally:
        subscription.close()
    await response.write_eof()
    return response


async def close_tail(app: web.Application) -> None:
    """on_shutdown: end open streams, so a draining admin listener does not wait on its watchers."""
    app[TAIL].close()
