"""`GET /traces/stream`: server-sent events from the tail hub, on a local app and on a running gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import Stack

from gateway.admin import tail as tail_route
from gateway.admin.auth import ADMIN, Admin
from gateway.admin.tail import close_tail, traces_stream
from gateway.trace.event import TraceEvent
from gateway.trace.tail import TAIL, TailHub

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]
WAIT = 10.0  # seconds; a bound on reads that the test makes happen, never a sleep


@web.middleware
async def as_approver(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    request[ADMIN] = Admin("tester", "approver")  # what admin_auth sets on the real admin app
    return await handler(request)


def local_app(hub: TailHub) -> web.Application:
    app = web.Application(middlewares=[as_approver])
    app[TAIL] = hub
    app.router.add_get("/traces/stream", traces_stream)
    app.on_shutdown.append(close_tail)
    return app


def event(n: int, **fields: Any) -> TraceEvent:
    return TraceEvent(trace_id=f"{n:032x}", span_id=f"{n:016x}", ts=1700000000.0, **fields)


async def next_block(response: aiohttp.ClientResponse) -> bytes:
    """One SSE block (up to its blank line), without the blank line."""
    lines: list[bytes] = []
    async with asyncio.timeout(WAIT):
        while (line := await response.content.readline()) not in (b"\n", b""):
            lines.append(line.rstrip(b"\n"))
    return b"\n".join(lines)


async def test_stream_sends_each_event_as_sse_data(aiohttp_client: MakeClient) -> None:
    hub = TailHub()
    client = await aiohttp_client(local_app(hub))
    async with client.get("/traces/stream") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        assert hub.subscribers == 1  # subscribed before the headers were sent: nothing emitted since is lost
        hub.emit(event(1, agent="invoice-bot", decision="allow", status=200))
        hub.emit(event(2, agent="invoice-bot", decision="deny", status=403))
        first, second = await next_block(response), await next_block(response)
    assert first.startswith(b"data: ")
    assert orjson.loads(first.removeprefix(b"data: ")) == {
        "trace_id": f"{1:032x}", "span_id": f"{1:016x}", "ts": 1700000000.0, "agent": "invoice-bot",
        "decision": "allow", "status": 200}
    assert orjson.loads(second.removeprefix(b"data: "))["decision"] == "deny"


async def test_stream_filters_by_query(aiohttp_client: MakeClient) -> None:
    hub = TailHub()
    client = await aiohttp_client(local_app(hub))
    async with client.get("/traces/stream", params={"agent": "invoice-bot", "decision": "deny"}) as response:
        hub.emit(event(1, agent="invoice-bot", decision="allow"))
        hub.emit(event(2, agent="ops-bot", decision="deny"))
        hub.emit(event(3, agent="invoice-bot", decision="deny"))
        block = await next_block(response)
    assert orjson.loads(block.removeprefix(b"data: "))["trace_id"] == f"{3:032x}"


async def test_stream_sends_keep_alive_comments_when_idle(aiohttp_client: MakeClient,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tail_route, "KEEPALIVE", 0.01)
    client = await aiohttp_client(local_app(TailHub()))
    async with client.get("/traces/stream") as response:
        assert await next_block(response) == b": keep-alive"


async def test_stream_ends_when_the_hub_closes(aiohttp_client: MakeClient) -> None:
    hub = TailHub()
    client = await aiohttp_client(local_app(hub))
    async with client.get("/traces/stream") as response:
        hub.emit(event(1))
        hub.close()  # what `close_tail` does when the admin listener shuts down
        async with asyncio.timeout(WAIT):
            rest = await response.read()
    assert orjson.loads(rest.removeprefix(b"data: ").strip())["trace_id"] == f"{1:032x}"
    assert hub.subscribers == 0


async def test_on_shutdown_closes_the_hub() -> None:
    hub = TailHub()
    app = local_app(hub)
    subscription = hub.subscribe()
    app.freeze()
    await app.shutdown()
    assert hub.closed
    assert subscription.closed


# -- on a running gateway: needs the hub in the runtime's sink and on the admin app (see gateway/trace/tail.py) --
async def test_gateway_admin_port_streams_live_trace_events(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.admin_url}/traces/stream") as unauthenticated:
            assert unauthenticated.status == 401
        async with http.get(f"{stack.admin_url}/traces/stream", params={"agent": "invoice-bot"},
                            headers=stack.admin_headers) as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"] == "text/event-stream"
            agent = {"Authorization": f"Bearer {stack.token('invoice-bot')}"}
            async with http.get(f"{stack.url}/erp/vendors/v-1", headers={
                    "Authorization": f"Bearer {stack.token('ops-bot')}"}) as other:
                await other.read()  # another agent's call: filtered out
            async with http.delete(f"{stack.url}/erp/vendors/v-1", headers=agent) as denied:
                assert denied.status == 403
            block = await next_block(stream)
    record = orjson.loads(block.removeprefix(b"data: "))
    assert {k: record[k] for k in ("agent", "upstream", "verb", "resource", "decision", "status", "rule")} == {
        "agent": "invoice-bot", "upstream": "erp", "verb": "delete", "resource": "vendors", "decision": "deny",
        "status": 403, "rule": "invoice-bot.yaml#deny[0]"}
