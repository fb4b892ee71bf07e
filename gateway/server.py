"""Serve: build the runtime, open the agents' and the admin listeners, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .admin.app import admin_app
from .approvals import Approval
from .approvals.backends import open_approvals
from .control import open_control
from .http_server import AgentServer, Request, Response
from .identity import Authenticator
from .keys import JwtSettings, KeySource
from .limits.alerts import Alerts
from .limits.backends import open_store
from .limits.enforce import Settler
from .limits.store import Reservation, Settlement
from .metrics import METRICS, Metrics
from .pipeline import handle, refuse_unparsed
from .policy.compile import Policy, compile_policy
from .policy.load import load_rules
from .reload import Reloader
from .rules_sync import RedisRulesSync, RulesSync
from .runtime import RUNTIME, Runtime, cut_paused
from .settings import Settings
from .staged import StagedCounts
from .tls import server_context
from .trace.sinks import FanOut, LineWriter, TraceSink
from .trace.tail import TAIL, TailHub
from .upstream_client import UpstreamPool
from .webhooks import WebhookPoster


def load_policy(settings: Settings) -> Policy:
    """Load and compile the rules directory; raises RuleSetInvalid with every error."""
    return compile_policy(load_rules(settings.rules, settings.env), settings.hold_timeout)


async def build_runtime(settings: Settings, sink: TraceSink | None = None) -> Runtime:
    policy = load_policy(settings)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, enable_cleanup_closed=True),
        # Never share cookies between agents or carry them across calls.
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)
    try:
        jwt_settings = JwtSettings(secret=settings.jwt_secret, jwks_file=settings.jwks_file,
                                   jwks_url=settings.jwks_url, audience=settings.jwt_audience,
                                   issuer=settings.jwt_issuer)
        keys = await KeySource.create(jwt_settings, session)
    except BaseException:
        await session.close()
        raise
    runtime_ref: list[Runtime] = []
    authenticator = Authenticator(keys, jwt_settings, lambda agent: agent in runtime_ref[0].policy.agents)
    tail, metrics, staged = TailHub(), Metrics(), StagedCounts()
    # Every event reaches the record (file or stdout), the live tail, the metrics and the staged-rule counts.
    sink = FanOut(sink or LineWriter(settings.trace), tail, metrics, staged)
    try:
        store = open_store(settings)
    except ValueError:
        await session.close()
        raise
    alerts = Alerts(sink, session, settings.alert_webhook)

    def on_settled(reservation: Reservation, settlement: Settlement) -> None:
        for index, threshold in settlement.alerts:
            alerts.fire(reservation.plan.agent, reservation.plan.budgets[index], threshold, settlement.used[index])

    control = open_control(settings.redis_url, settings.store_timeout)
    swap_into: list[Runtime] = []
    reloader = Reloader(settings.rules, lambda: load_policy(settings), sink,
                        lambda new: setattr(swap_into[0], "policy", new))
    reloader.started(policy)
    runtime = Runtime(settings=settings, policy=policy, authenticator=authenticator, approvals=open_approvals(settings),
                      session=session, upstreams=UpstreamPool(), sink=sink, store=store,
                      settler=Settler(store, sink, on_settled),
                      alerts=alerts, control=control, tail=tail, metrics=metrics, staged=staged,
                      reloader=reloader, sync=RulesSync(reloader, lambda c: None))
    swap_into.append(runtime)
    runtime.sync = (RedisRulesSync(reloader, runtime.spawn, settings.redis_url, settings.store_timeout)
                    if settings.redis_url else RulesSync(reloader, runtime.spawn))
    runtime_ref.append(runtime)
    control.listeners.append(lambda agent, pause: cut_paused(runtime, agent, pause))
    await store.start()
    await control.start()
    await runtime.sync.start()
    reloader.watch(settings.rules_watch)
    runtime.on_approval_opened.append(approval_notifier(runtime))
    return runtime


def approval_notifier(runtime: Runtime) -> Callable[[Approval], None]:
    """Post each new pending approval to the approvals webhook, with a link to it in the console."""
    settings = runtime.settings
    poster = WebhookPoster(runtime.session, settings.approval_webhook)
    runtime.webhooks.append(poster)
    console = (settings.console_url or f"http://{settings.admin_host}:{settings.admin_port}/console/").rstrip("/")

    def notify(approval: Approval) -> None:
        poster.post({"type": "approval_pending", "approval": approval.public(),
                     "console_url": f"{console}/#approval={approval.id}"})

    return notify


def agents_server(runtime: Runtime) -> AgentServer:
    """The agents' port: every request straight into the pipeline (see http_server for why not aiohttp's)."""
    async def agents_handler(request: Request) -> Response | None:
        return await handle(request, runtime)

    return AgentServer(agents_handler, refuse_unparsed(runtime), runtime.settings.max_body)


def make_admin_app(runtime: Runtime) -> web.Application:
    app = admin_app()
    app[RUNTIME] = runtime
    app[TAIL] = runtime.tail
    app[METRICS] = runtime.metrics
    return app


@dataclass
class RunningGateway:
    runtime: Runtime
    agents: AgentServer
    admin: web.AppRunner
    agents_port: int
    admin_port: int

    @property
    def url(self) -> str:
        scheme = "https" if self.runtime.settings.tls_cert else "http"
        return f"{scheme}://{self.runtime.settings.host}:{self.agents_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.runtime.settings.admin_host}:{self.admin_port}"

    async def close(self) -> None:
        """Drain: refuse new calls, let in-flight ones finish (held calls can still be decided on the
        admin side meanwhile), then flush the trace and close the upstream pool."""
        self.runtime.ready = False
        await self.agents.close(self.runtime.settings.drain_timeout)
        await self.admin.cleanup()
        await self.runtime.reloader.close()
        await self.runtime.sync.close()
        await self.runtime.approvals.close()
        await self.runtime.control.close()
        for poster in self.runtime.webhooks:
            await poster.close()
        await self.runtime.settler.close()
        await self.runtime.alerts.close()
        await self.runtime.store.close()
        await self.runtime.session.close()
        await self.runtime.upstreams.close()
        self.runtime.sink.close()


def _port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("listener has no address")


async def start_gateway(settings: Settings, sink: TraceSink | None = None, reuse_port: bool = False) -> RunningGateway:
    ssl_context = server_context(settings)  # before anything opens: a bad TLS set-up fails fast
    runtime = await build_runtime(settings, sink)
    agents = agents_server(runtime)
    admin = web.AppRunner(make_admin_app(runtime), access_log=None, shutdown_timeout=5)
    await admin.setup()
    agents_port = await agents.start(settings.host, settings.port, ssl_context, reuse_port)
    await web.TCPSite(admin, settings.admin_host, settings.admin_port, reuse_port=reuse_port or None).start()
    return RunningGateway(runtime, agents, admin, agents_port, _port(admin))


async def _serve(settings: Settings, reuse_port: bool = False) -> None:
    gateway = await start_gateway(settings, reuse_port=reuse_port)
    # Everything loaded so far (modules, the compiled policy) lives as long as the process: move it out of
    # the collector's reach, so full collections stay short (p99 35 ms -> 9 ms in the load test).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rt = gateway.runtime
    loop.add_signal_handler(signal.SIGHUP, lambda: rt.spawn(rt.reloader.reload("sighup", "SIGHUP")))
    print(f"agent-gateway: agents on {gateway.url}, admin on {gateway.admin_url}, "
          f"policy {gateway.runtime.policy.version}", file=sys.stderr, flush=True)
    await stop.wait()
    print("agent-gateway: draining in-flight requests", file=sys.stderr, flush=True)
    await gateway.close()


def serve(settings: Settings, reuse_port: bool = False) -> None:
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(settings, reuse_port))


WORKERS_NEED_REDIS = ("--workers {n} needs --redis-url (AGENT_GATEWAY_REDIS_URL): with the in-memory store each "
                      "process would keep its own budgets and rate limits, so agents would get {n} times their limits")


def serve_workers(settings: Settings) -> int:
    """Run `settings.workers` processes on the same ports (SO_REUSEPORT); the kernel spreads connections.

    They share limits through Redis. SIGTERM/SIGINT are passed on, and each worker drains on its own.
    """
    if not settings.redis_url:
        raise ValueError(WORKERS_NEED_REDIS.format(n=settings.workers))
    load_policy(settings)  # rule errors are reported once, here, not by every worker
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=serve, args=(settings, True), name=f"agent-gateway-{i}", daemon=False)
               for i in range(settings.workers)]
    for worker in workers:
        worker.start()

    def pass_on(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    for worker in workers:
        worker.join()
    return max((worker.exitcode or 0) for worker in workers)
