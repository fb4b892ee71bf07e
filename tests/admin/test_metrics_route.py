"""`GET /metrics`: the Prometheus text from the gateway's own registry, on a local app and on a running gateway."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import Stack
from prometheus_client.parser import text_string_to_metric_families

from gateway.admin.auth import ADMIN, Admin
from gateway.admin.metrics_route import metrics
from gateway.metrics import CONTENT_TYPE, METRICS, Metrics
from gateway.trace.event import TraceEvent

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]


@web.middleware
async def as_approver(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    request[ADMIN] = Admin("prometheus", "approver")  # what admin_auth sets on the real admin app
    return await handler(request)


def totals(text: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "agent_gateway_requests_total"}


async def test_metrics_route_serves_the_registry_as_text(aiohttp_client: MakeClient) -> None:
    sink = Metrics()
    app = web.Application(middlewares=[as_approver])
    app[METRICS] = sink
    app.router.add_get("/metrics", metrics)
    client = await aiohttp_client(app)
    sink.emit(TraceEvent(trace_id="0" * 32, span_id="0" * 16, agent="invoice-bot", upstream="erp", verb="read",
                         decision="allow", status=200, latency_ms=5.0))
    async with client.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        text = await response.text()
    assert totals(text) == {(("agent", "invoice-bot"), ("decision", "allow"), ("status_class", "2xx"),
                             ("upstream", "erp"), ("verb", "read")): 1.0}


# -- on a running gateway: needs the Metrics sink in the runtime's sink and on the admin app -----------------------
async def test_gateway_admin_port_serves_metrics_of_calls(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.admin_url}/metrics") as unauthenticated:
            assert unauthenticated.status == 401
        agent = {"Authorization": f"Bearer {stack.token('invoice-bot')}"}
        async with http.delete(f"{stack.url}/erp/vendors/v-1", headers=agent) as denied:
            assert denied.status == 403
        # The trace sinks are fanned out together: once the event is in the memory sink, the metrics have it too.
        await stack.trace.wait_for(lambda e: e.get("decision") == "deny")
        async with http.get(f"{stack.admin_url}/metrics", headers=stack.admin_headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE
            text = await response.text()
    assert totals(text) == {(("agent", "invoice-bot"), ("decision", "deny"), ("status_class", "4xx"),
                             ("upstream", "erp"), ("verb", "delete")): 1.0}
