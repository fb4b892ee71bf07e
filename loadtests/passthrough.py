"""The baseline: a bare aiohttp + uvloop reverse proxy (no auth, no policy); the limit of this stack."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SMALL_ANSWER = 64 * 1024
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


async def proxy(request: web.Request) -> web.StreamResponse:
    upstream = request.app["upstream"] + request.path_qs.split("/", 2)[2]
    async with request.app[SESSION].request(request.method, upstream, data=await request.read(),
                                            headers={"Content-Type": request.content_type}) as reply:
        length = reply.content_length
        if length is not None and length <= SMALL_ANSWER:
            # A small complete answer in one write (headers and body), as the gateway sends it: aiohttp used
            # well, so the baseline is not slowed by chunked framing the gateway does not pay either.
            return web.Response(status=reply.status, body=await reply.read(),
                                headers={"Content-Type": reply.content_type})
        response = web.StreamResponse(status=reply.status, headers={"Content-Type": reply.content_type})
        await response.prepare(request)
        async for chunk in reply.content.iter_any():
            await response.write(chunk)
        return response


async def session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    yield
    await app[SESSION].close()


def main() -> None:
    app = web.Application()
    app["upstream"] = sys.argv[2].rstrip("/") + "/"
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
