"""The request pipeline, in order. Each stage is its own module; this one only sequences them.

    identify -> classify -> decide -> limit -> (hold) -> forward -> account
Why this order: identity first, so an unauthenticated caller learns nothing about upstreams or rules;
the body is read (bounded) before classify, because the decision must be made on exactly the bytes that
are forwarded; decide before any store or upstream I/O; limit reserves the expected cost before a human is
asked (no approval for a call the budget cannot pay) and before forwarding (the call that crosses a cap
never starts); hold keeps the connection open and re-enters forward only with a human's approval;
account reads usage from the response while it streams and settles the reservation. Every path out,
error or not, writes exactly one trace event and settles what it reserved.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

from .classify import Classified, classify
from .errors import GatewayError, bad_request
from .hold import hold
from .http_server import BodyMalformed, BodyTooLarge, Request, Response
from .incoming import Incoming
from .limits.enforce import charge, reserve
from .models import Action, Decision
from .paths import normalise, split_upstream
from .policy.compile import AgentPolicy, Policy
from .policy.decide import decide_each
from .relay import relay
from .responses import error_response
from .runtime import Runtime
from .tls import identify
from .trace.event import TraceEvent, new_span_id, new_trace_id
from .tracecontext import parse_traceparent

METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")


async def handle(request: Request, rt: Runtime) -> Response | None:
    """The agents' port: every request, whatever its path, comes through here. The answer is returned, or
    None when the relay has written it already."""
    policy = rt.policy  # pinned: a reload mid-request does not change this request's rules
    started = time.perf_counter()
    task = asyncio.current_task()  # once: in 3.11 each call costs a getpid system call
    trace_id, flags = parse_traceparent(request.headers.get("traceparent"))
    event = TraceEvent(trace_id=trace_id or new_trace_id(), span_id=new_span_id(), method=request.method)
    event.policy_version = policy.version
    kind: str | None = None
    classified: Classified | None = None
    batch_errors: dict[int, GatewayError] | None = None
    try:
        raw_path, _, query = request.raw_path.partition("?")
        event.path = raw_path  # a path that does not normalise is traced as it was sent
        try:
            path = normalise(raw_path)
        except GatewayError:
            # Identity first here too: an anonymous caller learns only that, and the trace names who tried.
            event.agent = (await identify(request, rt)).id
            raise
        event.path = path
        name, subpath = split_upstream(path)
        upstream = policy.upstreams.get(name)
        kind = upstream.spec.kind if upstream else None
        agent = await identify(request, rt)
        event.agent = agent.id
        pause = rt.control.paused(agent.id)
        if pause is not None:
            raise GatewayError("agent_paused", f"agent {agent.id!r} is paused (by {pause.by}: {pause.reason})")
        if task is not None:
            rt.inflight.setdefault(agent.id, {})[task] = event
        if upstream is None:
            raise bad_request(f"unknown upstream {name!r}: the first path segment must name an upstream")
        event.upstream = name
        for header in METHOD_OVERRIDE_HEADERS:
            if header in request.headers:
                raise bad_request(f"method-override header {header!r} is refused")
        body = await read_body(request)
        incoming = Incoming(request.method, subpath, query, request.headers, body)
        classified = classify(upstream.spec, upstream.routes, incoming)
        agent_policy = policy.agents.get(agent.id)
        if agent_policy is None:  # removed by a reload after its token was verified: fail closed
            raise GatewayError("unauthenticated", f"agent {agent.id!r} is not in the rules")
        decision, action, batch_errors = decide_all(policy, agent_policy, classified, incoming, event)
        event.capture = agent_policy.capturer.record_incoming(path, incoming)  # denied calls too, for replay
        if decision.outcome == "deny":
            raise GatewayError("policy_denied", decision.reason, rule=decision.rule)
        # Hashes of the request's body, each only where it is needed: a hold's fingerprint, a loop detector's key.
        call = fingerprint(agent.id, action.upstream, incoming) if decision.outcome == "hold" else ""
        repeat = repeat_key(agent.id, action.upstream, incoming) if agent_policy.spec.loop_detection else ""
        reservation = await reserve(rt.store, agent_policy.planner, action, upstream.spec, repeat, event,
                                    rt.settler)
        stage = "hold"
        try:
            if decision.outcome == "hold":
                await hold(rt, agent, action, decision, incoming, event, call, path)
            stage = "forward"
            await relay(request, rt, upstream, agent_policy, classified, action, incoming, query, event, flags,
                        reservation)
            return None
        except (GatewayError, asyncio.CancelledError) as failure:
            if reservation is not None and reservation.plan.settles and event.status is None:
                # Nothing came back from the upstream. Refused or abandoned before forwarding: release it all;
                # lost on the way (timeout, hang-up while waiting): the upstream may have done and billed the
                # work, so charge the reservation.
                lost = stage == "forward" and not (isinstance(failure, GatewayError)
                                                    and failure.type == "upstream_error")
                used = charge(reservation, None, event, "no answer from the upstream") if lost else (0, 0)
                rt.settler.settle_soon(reservation, *used, event)
            raise
    except GatewayError as error:
        event.error = error.type
        if error.detail is not None:
            event.detail = {**(event.detail or {}), "error_detail": error.detail}
        if event.reason is None:
            event.reason = error.message
        rpc = classified.rpc if classified else None
        response = error_response(kind, error, event.trace_id, rpc, batch_errors)
        event.status = response.status  # what the agent saw: JSON-RPC errors travel in an HTTP 200
        return response
    except asyncio.CancelledError:
        event.error = event.error if event.error == "agent_paused" else "client_disconnected"
        event.status = 499
        raise
    finally:
        if event.agent is not None and (calls := rt.inflight.get(event.agent)) is not None:
            calls.pop(task, None)  # type: ignore[arg-type]
            if not calls:
                del rt.inflight[event.agent]
        event.latency_ms = round((time.perf_counter() - started) * 1000, 3)
        settling = request.settling
        if settling is not None and not settling.done():  # the event carries the settlement it follows
            settling.add_done_callback(lambda _: rt.sink.emit(event))
        else:
            rt.sink.emit(event)


async def read_body(request: Request) -> bytes:
    """The whole body, refused past the server's limit (`--max-body`) whether or not it declared a length."""
    try:
        return await request.read()
    except BodyTooLarge as exc:
        raise GatewayError("payload_too_large", str(exc)) from None
    except BodyMalformed as exc:
        raise bad_request(f"request body is malformed: {exc}") from None


def refuse_unparsed(rt: Runtime) -> Callable[[str], Response]:
    """The answer to a request the server could not parse (malformed HTTP, an oversized head): a `bad_request`
    in the OpenAI-style shape (its upstream is unknown), written to the trace like every other refusal."""
    def refuse(message: str) -> Response:
        event = TraceEvent(trace_id=new_trace_id(), span_id=new_span_id(), method=None)
        event.policy_version = rt.policy.version
        error = bad_request(message)
        event.error, event.reason = error.type, message
        response = error_response(None, error, event.trace_id)
        event.status = response.status
        event.latency_ms = 0.0
        rt.sink.emit(event)
        return response
    return refuse


def decide_all(policy: Policy, agent: AgentPolicy, classified: Classified, incoming: Incoming,
               event: TraceEvent) -> tuple[Decision, Action, dict[int, GatewayError] | None]:
    """decide, and record it: the deciding action's fields, and each batch element's decision."""
    (decision, action), decisions = decide_each(policy, agent, classified.actions, incoming)
    event.verb, event.resource, event.tool, event.model = action.verb, action.resource, action.tool, action.model
    event.stream = action.stream or None
    event.decision, event.rule, event.mode = decision.outcome, decision.rule, decision.mode
    event.reason = decision.reason
    event.evidence = decision.evidence or None  # shared, never mutated: no copy per call
    if decision.shadow:
        event.shadow = [dict(s) for s in decision.shadow]
    if decision.warnings:
        event.warnings = [dict(w) for w in decision.warnings]
    refused: dict[int, GatewayError] | None = None
    if len(decisions) > 1:
        event.detail = {"elements": [
            {"verb": a.verb, "resource": a.resource, "tool": a.tool, "decision": d.outcome, "rule": d.rule}
            for d, a in decisions]}
        # A refused batch answers each denied element with its own rule, the others with the batch's.
        refused = {i: GatewayError("policy_denied", d.reason, rule=d.rule)
                   for i, (d, _) in enumerate(decisions) if d.outcome == "deny"}
    return decision, action, refused


def fingerprint(agent: str, upstream: str, incoming: Incoming) -> str:
    """What an approval covers: this agent, upstream, method, normalised path, query and exact body."""
    # One hash over the parts, then the body's own hash: one update, not eleven.
    return hashlib.sha256(_call_parts(agent, upstream, incoming) + hashlib.sha256(incoming.body).digest()).hexdigest()


def repeat_key(agent: str, upstream: str, incoming: Incoming) -> str:
    """What makes two calls the same call to the loop detector: the parts a fingerprint covers, as 32 hex digits.

    One BLAKE2b over the parts and the body costs 9k instructions where the fingerprint's two SHA-256 cost 21k,
    and it is paid on every call of an agent with loop detection; 128 bits keep apart any calls that differ."""
    return hashlib.blake2b(_call_parts(agent, upstream, incoming) + incoming.body, digest_size=16).hexdigest()


def _call_parts(agent: str, upstream: str, incoming: Incoming) -> bytes:
    """Who calls what, each part ended by a NUL, so no character can move across a boundary unseen."""
    return f"{agent}\0{upstream}\0{incoming.method}\0{incoming.path}\0{incoming.query}\0".encode()
