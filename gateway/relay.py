"""forward + account: send the decided request upstream, stream the answer back, then settle its usage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from multidict import CIMultiDict

from . import forward
from .account import Usage, UsageChunkFilter, UsageMeter, cost_usd
from .classify import Classified
from .classify.mcp import tool_action
from .errors import GatewayError
from .http_server import Request, Response
from .incoming import Incoming
from .limits.enforce import charge
from .limits.rewrite import rewrite
from .limits.store import Reservation
from .models import Action
from .policy.compile import AgentPolicy, Upstream
from .policy.decide import may_call_tool
from .policy.spec import UpstreamSpec
from .runtime import Runtime
from .toolfilter import filter_tools
from .trace.event import TraceEvent
from .upstream_client import UpstreamResponse

SMALL_ANSWER = 64 * 1024  # bytes: an answer up to this size with a Content-Length is sent in one write


async def relay(request: Request, rt: Runtime, upstream: Upstream, agent: AgentPolicy, classified: Classified,
                action: Action, incoming: Incoming, query: str, event: TraceEvent, trace_flags: str,
                reservation: Reservation | None) -> None:
    """Forward, write the answer to the agent, then settle; the answer is on its way before the settlement."""
    spec = upstream.spec
    body, hide_usage = rewrite(action, incoming.path, reservation)
    traceparent = f"00-{event.trace_id}-{event.span_id}-{trace_flags}"
    headers = forward.upstream_headers(request.headers, spec, traceparent)
    target = forward.request_target(upstream.origin, incoming.path, query)
    sent = time.perf_counter()
    upstream_response = await forward.send(rt.upstreams, upstream, incoming.method, target, headers,
                                           incoming.body if body is None else body)
    event.upstream_ms = round((time.perf_counter() - sent) * 1000, 3)
    async with upstream_response:
        event.status = upstream_response.status
        content_type = upstream_response.headers.get("Content-Type", "")
        out_headers = forward.response_headers(upstream_response.headers)
        out_headers["x-agent-gateway-trace-id"] = event.trace_id
        if event.warnings:  # a `warn` rule matched: the call goes through, and the agent is told which rule
            out_headers["x-agent-gateway-warning"] = ", ".join(f"{w['rule']} would {w['warn']}"
                                                               for w in event.warnings)
        rpc = classified.rpc
        if rpc is not None and rpc.tools_list_ids and upstream_response.status == 200:
            request.send(await _filtered_tools(upstream_response, spec.name, agent, rpc.tools_list_ids,
                                               out_headers, content_type, upstream))
            return
        meter = UsageMeter(content_type)
        hider = UsageChunkFilter() if hide_usage and meter.sse else None
        missing = "the response carried no usage"
        length = upstream_response.content_length
        try:
            if length is not None and length <= SMALL_ANSWER and not meter.sse:
                # A small, complete answer (a JSON completion, a tool result): its bytes are in hand as soon as
                # the headers are, so it goes to the agent as one write of headers and body.
                body = await forward.read_small(upstream_response, spec)
                meter.feed(body)
                request.send(Response(upstream_response.status, body, out_headers, upstream_response.reason))
            else:
                # Framed by the upstream's length, unless the usage event is taken out of it.
                framed_length = length if not hide_usage else None
                body = upstream_response.read_now()
                if body is not None:
                    request.send(_whole_stream(upstream_response, out_headers, framed_length, body, meter, hider))
                else:
                    request.start(upstream_response.status, upstream_response.reason, out_headers, framed_length)
                    await _stream(request, upstream_response, spec, meter, hider)
            # The agent has its answer before the settlement round trip.
        except GatewayError as error:
            # Headers are gone already: the agent cannot get an error body, so cut the connection
            # rather than end the stream cleanly and let a truncated answer pass for a whole one.
            event.error = error.type
            event.reason = error.message
            missing = "the upstream broke off mid-response"
            if request.transport is not None:
                request.transport.abort()
        except ConnectionResetError:  # the agent hung up (aiohttp's ClientConnectionResetError included)
            event.error = "client_disconnected"
            event.status = 499
            missing = "the agent hung up mid-response"
        except asyncio.CancelledError:
            # Cancelled because the agent hung up: still charge, from a task of its own.
            usage = _account(event, spec, meter)
            if reservation is not None and reservation.plan.settles:
                used = charge(reservation, usage, event, "the agent hung up mid-response")
                rt.settler.settle_soon(reservation, *used, event)
            raise
        usage = _account(event, spec, meter)
        if reservation is not None and reservation.plan.settles:
            used = charge(reservation, usage, event, missing)
            if rt.settler.inline:
                await rt.settler.settle(reservation, *used, event)
                return
            settling = rt.settler.settle_soon(reservation, *used, event)
            request.settling = settling  # the trace event is written once this is done
            if not rt.settler.ordered:
                # The agent's next call must see this settlement. On an ordered store it will (the settle leaves
                # before any later reserve), so the call ends now; on a cluster, whose pooled connections can let
                # a later reserve overtake it, the call ends once it applied. If the agent hangs up meanwhile,
                # the settlement goes on without it and the call stays the success it was.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(settling)


def _whole_stream(upstream_response: UpstreamResponse, headers: CIMultiDict[str], length: int | None, body: bytes,
                  meter: UsageMeter, hider: UsageChunkFilter | None) -> Response:
    """A stream that arrived whole with its headers (a short answer, a fast upstream), sent on as one write of
    headers, body and end, framed as the stream would have been."""
    meter.feed(body)
    if hider is not None:
        body = hider.feed(body) + hider.flush()
    if length is not None:
        headers["Content-Length"] = str(length)  # the upstream's (a HEAD answer's body is empty)
    # Chunked when the stream would be (HTTP/1.0 has no chunks: the server gives it a length).
    return Response(upstream_response.status, body, headers, upstream_response.reason, chunked=length is None)


async def _stream(request: Request, upstream_response: UpstreamResponse, spec: UpstreamSpec,
                  meter: UsageMeter, hider: UsageChunkFilter | None) -> None:
    """Copy the body as it arrives (SSE events are not held back), reading usage and hiding the usage event.

    What arrived together is written together, and the last of it with the end of the answer. Each write
    waits for the agent when its connection's buffer is full, so a slow agent slows the upstream's reading.
    """
    last = b""
    with forward.reading_body(spec):
        while chunk := await upstream_response.next_chunk():
            meter.feed(chunk)
            out = chunk if hider is None else hider.feed(chunk)
            if upstream_response.exhausted:
                upstream_response.release()
                last = out
                break
            if out:
                await request.write(out)
    if hider is not None:
        last += hider.flush()
    request.finish(last)


def _account(event: TraceEvent, spec: UpstreamSpec, meter: UsageMeter) -> Usage | None:
    usage = meter.finish()
    if usage is not None:
        event.tokens = {"input": usage.input, "output": usage.output}
        event.cost_usd = cost_usd(spec.prices, event.model, usage)
    return usage


async def _filtered_tools(upstream_response: UpstreamResponse, name: str, agent: AgentPolicy,
                          ids: tuple[Any, ...], headers: CIMultiDict[str], content_type: str,
                          upstream: Upstream) -> Response:
    """`tools/list` answers are small: read whole, keep only the tools this agent may call."""
    body = await upstream_response.read()

    def keep(tool: str) -> bool:
        verb, resource = tool_action(upstream.spec, tool)
        return may_call_tool(agent, name, verb, resource)

    try:
        filtered = filter_tools(body, content_type, ids, keep)
    except ValueError as exc:
        raise GatewayError("upstream_error", f"upstream {name!r} sent a tools/list answer that is not JSON") from exc
    return Response(200, filtered, headers)
