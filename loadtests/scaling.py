"""Scaling measurements: decision time against the number of agents, and memory with many held calls.

    python loadtests/scaling.py [--agents 10,1000,10000] [--calls 20000] [--repeats 25]
                                [--held 10000] [--only decisions|held] [--cpu N] [--json FILE]

Decisions: rule sets of N generated agents (each with allow, hold and deny rules, CEL conditions among them,
on the example upstreams) are loaded and compiled, then `decide_each` is timed over the same number of
pre-classified calls spread over all the agents (the sizes interleaved round after round, each keeping its best
pass, the collector off, as timeit does).
Parsing and classification happen once, beforehand: what is timed is the lookup of the agent and its decision.

Held calls: the gateway runs as `python -m gateway serve` (a process of its own, so its memory is its own) on the
example rules, with the fake upstreams in this process. `--held` payments over 10,000 from invoice-bot are sent
at once over one client session and each is held; once the admin API shows every one pending, the gateway's
VmRSS is read. Then every approval is denied through the admin API and each call must end in a 403.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.classify import classify
from gateway.demo.fakes import start_all
from gateway.demo.run import demo_env
from gateway.incoming import Incoming
from gateway.models import Action
from gateway.paths import normalise, split_upstream
from gateway.policy.cases import PlaceholderEnv
from gateway.policy.compile import Policy, compile_policy
from gateway.policy.decide import decide_each
from gateway.policy.load import load_rules
from gateway.tokens import issue_token

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
SECRET = "scaling-secret-0123456789abcdef0123456789"
ADMIN_TOKEN = "scaling-admin-token"

# -- decision time against the number of agents ----------------------------------------------------------------

AGENT = """agent: {id}
owner: team-{n}@example.com
purpose: Generated agent {n} for the scaling measurement
mode: assist
allow:
  - upstream: openai
    verbs: [chat]
    when: 'request.json.model in ["gpt-4o-mini"] && request.json.max_tokens <= {cap}'
  - {{upstream: erp, verbs: [read]}}
  - {{upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount <= {limit}"}}
  - {{upstream: crm-tools, verbs: [read], resources: [accounts]}}
hold:
  - {{upstream: erp, verbs: [create], resources: [payments], when: "request.json.amount > {limit}",
     reason: "Payments over {limit} need a manager", timeout: 15m}}
deny:
  - {{upstream: erp, verbs: [delete], reason: "Never deletes ERP records"}}
  - {{upstream: crm-tools, verbs: [delete], reason: "Never deletes accounts"}}
budgets:
  - {{tokens: 200000, per: day, alert_at: [0.5, 0.8, 1.0], default_output_tokens: 1024}}
rate_limits:
  - {{upstream: openai, requests: 60, per: minute}}
loop_detection: {{max_repeats: 20, per: minute}}
"""

# (method, path, json) as an agent sends them: allowed (with and without a condition), held, denied by a rule,
# and denied by default (a condition that does not hold, a tool without a grant).
REQUESTS: tuple[tuple[str, str, Any], ...] = (
    ("POST", "/openai/chat/completions",
     {"model": "gpt-4o-mini", "max_tokens": 256, "messages": [{"role": "user", "content": "Summarise INV-7"}]}),
    ("POST", "/openai/chat/completions", {"model": "gpt-4o", "max_tokens": 256, "messages": []}),
    ("GET", "/erp/vendors/v-100", None),
    ("POST", "/erp/payments", {"vendor": "v-100", "amount": 950}),
    ("POST", "/erp/payments", {"vendor": "v-200", "amount": 25000}),
    ("DELETE", "/erp/vendors/v-300", None),
    ("POST", "/crm-tools/mcp", {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                "params": {"name": "lookup_account", "arguments": {"account_id": "a-1"}}}),
    ("POST", "/crm-tools/mcp", {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                "params": {"name": "delete_account", "arguments": {"account_id": "a-1"}}}),
)

Prepared = tuple[str, tuple[Action, ...], Incoming]  # agent id, classified actions, the request


@dataclass
class DecisionResult:
    agents: int
    active: int  # agents the calls are spread over (the first `active` of them)
    rules: int
    load_s: float
    compile_s: float
    calls: int
    us_per_decision: float
    outcomes: dict[str, int]
    ratio: float | None = None  # to the smallest rule set


def agent_id(n: int) -> str:
    return f"agent-{n:05d}"


def write_agents(directory: Path, count: int) -> None:
    """A rules directory: the example upstreams and `count` generated agents, their thresholds varied."""
    (directory / "agents").mkdir(parents=True, exist_ok=True)
    shutil.copy(RULES / "upstreams.yaml", directory / "upstreams.yaml")
    for n in range(count):
        text = AGENT.format(id=agent_id(n), n=n, cap=1024 + 512 * (n % 8), limit=5000 + 1000 * (n % 10))
        (directory / "agents" / f"{agent_id(n)}.yaml").write_text(text)


def prepare(policy: Policy, agent: str, method: str, path: str, body: Any) -> Prepared:
    """Route and classify one request the way `gateway.policy.cases.evaluate` does, JSON parsed up front."""
    name, subpath = split_upstream(normalise(path))
    upstream = policy.upstreams[name]
    raw = orjson.dumps(body) if body is not None else b""
    incoming = Incoming(method, subpath, "", CIMultiDictProxy(CIMultiDict()), raw)
    incoming.json()
    return agent, classify(upstream.spec, upstream.routes, incoming).actions, incoming


def prepared_calls(policy: Policy, agents: int, calls: int, seed: int = 7) -> list[Prepared]:
    rng = random.Random(seed)
    return [prepare(policy, agent_id(rng.randrange(agents)), *rng.choice(REQUESTS)) for _ in range(calls)]


def run_decisions(policy: Policy, calls: Sequence[Prepared]) -> Counter[str]:
    agents = policy.agents
    tally: Counter[str] = Counter()
    for agent, actions, incoming in calls:
        (decision, _), _ = decide_each(policy, agents[agent], actions, incoming)
        tally[decision.outcome] += 1
    return tally


def time_pass(policy: Policy, calls: Sequence[Prepared]) -> float:
    """Seconds for one pass over `calls`, the collector off during the pass (as timeit does)."""
    agents = policy.agents
    enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter()
        for agent, actions, incoming in calls:
            decide_each(policy, agents[agent], actions, incoming)
        return time.perf_counter() - started
    finally:
        if enabled:
            gc.enable()


@dataclass
class _Measured:
    result: DecisionResult
    policy: Policy
    calls: list[Prepared]
    best: float = float("inf")


def decision_scaling(counts: Sequence[int], calls: int, repeats: int) -> list[DecisionResult]:
    """Each size with calls over all its agents; the largest also with calls over only as many agents as the
    smallest has (the same working set in a bigger rule set: what the number of agents alone costs).

    Every rule set is loaded and compiled first; then each (size, spread) is timed once per round, round after
    round, and keeps its best pass. A virtual machine has slow spells lasting seconds: timed in blocks, one size
    could fall in a spell and another not; interleaved, every size meets the fast moments alike."""
    measured: list[_Measured] = []
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            write_agents(Path(tmp), count)
            started = time.perf_counter()
            ruleset = load_rules(tmp, PlaceholderEnv())
            loaded = time.perf_counter()
            policy = compile_policy(ruleset)
            compiled = time.perf_counter()
        rules = sum(len(a.rules) for a in policy.agents.values())
        for spread in (count, *((counts[0],) if count == counts[-1] and counts[0] < count else ())):
            prepared = prepared_calls(policy, spread, calls)
            outcomes = run_decisions(policy, prepared)  # warm-up, and a check that every kind of decision occurs
            measured.append(_Measured(DecisionResult(count, spread, rules, round(loaded - started, 2),
                                                     round(compiled - loaded, 2), calls, 0.0,
                                                     dict(sorted(outcomes.items()))), policy, prepared))
        print(f"  {count} agents loaded and compiled", file=sys.stderr, flush=True)
    for _ in range(repeats):
        for m in measured:
            m.best = min(m.best, time_pass(m.policy, m.calls))
    results = []
    for m in measured:
        m.result.us_per_decision = round(m.best / calls * 1e6, 3)
        results.append(m.result)
    base = results[0].us_per_decision
    for result in results:
        result.ratio = round(result.us_per_decision / base, 3)
    return results


# -- memory with many held calls -------------------------------------------------------------------------------


@dataclass
class HeldResult:
    held: int
    rss_idle_mb: float
    rss_held_mb: float
    rss_after_deny_mb: float
    delta_mb: float
    kib_per_held_call: float
    open_s: float
    deny_s: float
    statuses: dict[int, int]


def raise_fd_limit(want: int) -> int:
    """Lift RLIMIT_NOFILE to at least `want` (child processes inherit it); the hard limit too when root."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    if hard != resource.RLIM_INFINITY and hard < want and os.geteuid() == 0:
        hard = want
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < want:
        raise RuntimeError(f"open-file limit is {target} (hard limit), {want} are needed: raise it (ulimit -n)")
    return target


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    """`python -m gateway serve` on the example rules in a process of its own, talked to over loopback."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.rules = work / "rules"
        shutil.copytree(RULES, self.rules)
        self.port, self.admin_port = free_port(), free_port()
        self.work, self.env = work, env
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, session: aiohttp.ClientSession) -> None:
        with (self.work / "gateway.stderr").open("wb") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--rules", str(self.rules), "--port", str(self.port),
                "--admin-port", str(self.admin_port), "--trace", str(self.work / "trace.jsonl"), "--rules-watch",
                "0", env=self.env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                break
            try:
                async with session.get(f"{self.admin_url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)  # polling a process that is still starting
        raise RuntimeError("the gateway did not start: " + (self.work / "gateway.stderr").read_text()[-2000:])

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Approvals:
    """The admin API's approval queue, as an approver sees it."""

    def __init__(self, session: aiohttp.ClientSession, admin_url: str) -> None:
        self.session, self.url = session, admin_url
        self.headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def pending(self) -> list[str]:
        """Ids of the newest pending approvals (the API returns at most 1,000)."""
        async with self.session.get(f"{self.url}/approvals?status=pending&limit=1000", headers=self.headers) as r:
            r.raise_for_status()
            return [a["id"] for a in (await r.json())["approvals"]]

    async def wait_new(self, seen: set[str], count: int, tasks: Sequence[asyncio.Task[int]], limit: float) -> None:
        """Until `count` pending approvals not in `seen` are listed (then added to it). `count` is at most
        1,000, so a wave of that many is checked exactly: the newest 1,000 pending are all new."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            new = [i for i in await self.pending() if i not in seen]
            if len(new) >= count:
                seen.update(new)
                return
            if done := [t for t in tasks if t.done()]:
                failure = done[0].exception()
                raise RuntimeError(f"a held call ended early: {failure!r}" if failure is not None
                                   else f"a held call ended early with HTTP {done[0].result()}")
            await asyncio.sleep(0.1)  # polling the admin API until the wave's approvals are listed
        raise RuntimeError(f"{count} new pending approvals were not listed within {limit}s")

    async def deny_all(self, ids: Sequence[str], concurrency: int = 64) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def deny(approval: str) -> None:
            async with gate, self.session.post(f"{self.url}/approvals/{approval}/deny", headers=self.headers,
                                               json={"reason": "scaling measurement"}) as r:
                r.raise_for_status()

        await asyncio.gather(*(deny(i) for i in ids))


async def held_payment(session: aiohttp.ClientSession, url: str, token: str, n: int) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"{url}/erp/payments", json={"amount": 25000, "vendor": f"v-{n}"}, headers=headers) as r:
        await r.read()
        return r.status


async def held_calls(count: int, wave: int = 1000) -> HeldResult:
    if not 0 < wave <= 1000:
        raise ValueError("a wave is checked through one admin listing, so it holds 1 to 1,000 calls")
    raise_fd_limit(count + 2048)  # this process holds `count` client sockets, the gateway as many server ones
    fakes = await start_all()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**demo_env(os.environ, fakes), "AGENT_GATEWAY_JWT_SECRET": SECRET,
               "AGENT_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
        gateway = Gateway(Path(tmp), env)
        token = issue_token("invoice-bot", SECRET.encode(), 3600)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=120)  # a held call waits for its human
        client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        admin = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        try:
            await gateway.start(admin)
            approvals = Approvals(admin, gateway.admin_url)
            seen: set[str] = set()
            # Warm-up: one call held and denied, so lazily built state exists before the baseline is read.
            warm = asyncio.create_task(held_payment(client, gateway.url, token, -1))
            await approvals.wait_new(seen, 1, [warm], 30)
            await approvals.deny_all(sorted(seen))
            if await warm != 403:
                raise RuntimeError("the warm-up call was not refused after its denial")
            idle = rss_mb(gateway.pid)
            seen.clear()
            started = time.perf_counter()
            tasks: list[asyncio.Task[int]] = []
            for first in range(0, count, wave):
                batch = [asyncio.create_task(held_payment(client, gateway.url, token, n))
                         for n in range(first, min(first + wave, count))]
                tasks += batch
                await approvals.wait_new(seen, len(batch), tasks, 120)
            opened = time.perf_counter() - started
            held = rss_mb(gateway.pid)
            print(f"  {len(seen)} calls held: gateway RSS {held} MB (idle {idle} MB)", file=sys.stderr, flush=True)
            started = time.perf_counter()
            await approvals.deny_all(sorted(seen))
            statuses = Counter(await asyncio.gather(*tasks))
            denied = time.perf_counter() - started
            after = rss_mb(gateway.pid)
        finally:
            await client.close()
            await admin.close()
            await gateway.stop()
            await fakes.close()
    if statuses != Counter({403: count}):
        raise RuntimeError(f"every held call should end in 403 after its denial, got {dict(statuses)}")
    return HeldResult(count, idle, held, after, round(held - idle, 1), round((held - idle) * 1024 / count, 2),
                      round(opened, 1), round(denied, 1), dict(statuses))


# -- the command -----------------------------------------------------------------------------------------------


def decisions_table(results: Sequence[DecisionResult]) -> str:
    rows = [f"{'agents':>7}{'active':>8}{'rules':>8}{'load s':>8}{'compile s':>11}{'us/decision':>13}"
            f"{'x smallest':>12}"]
    rows += [f"{r.agents:>7}{r.active:>8}{r.rules:>8}{r.load_s:>8.2f}{r.compile_s:>11.2f}{r.us_per_decision:>13.2f}"
             f"{r.ratio or 0:>12.2f}" for r in results]
    return "\n".join(rows)


def held_table(result: HeldResult) -> str:
    return (f"{'held calls':>10}{'idle MB':>9}{'held MB':>9}{'delta MB':>10}{'KiB/call':>10}{'after deny MB':>15}\n"
            f"{result.held:>10}{result.rss_idle_mb:>9.1f}{result.rss_held_mb:>9.1f}{result.delta_mb:>10.1f}"
            f"{result.kib_per_held_call:>10.2f}{result.rss_after_deny_mb:>15.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="10,1000,10000", help="comma-separated rule-set sizes, smallest first")
    parser.add_argument("--calls", type=int, default=20_000, help="pre-classified calls per timed pass")
    parser.add_argument("--repeats", type=int, default=25,
                        help="rounds; each times every size once, and each size keeps its best pass")
    parser.add_argument("--held", type=int, default=10_000, help="calls held at once")
    parser.add_argument("--only", choices=("decisions", "held"))
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU (the gateway it starts too)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    report: dict[str, Any] = {"python": sys.version.split()[0], "aiohttp": aiohttp.__version__,
                              "uvloop": version("uvloop")}
    if args.only in (None, "decisions"):
        counts = sorted(int(n) for n in args.agents.split(",") if n)
        results = decision_scaling(counts, args.calls, args.repeats)
        print(decisions_table(results))
        print(f"\n{args.calls} calls per pass over all agents, best of {args.repeats} interleaved passes\n")
        report["decisions"] = {"calls": args.calls, "repeats": args.repeats, "results": [asdict(r) for r in results]}
    if args.only in (None, "held"):
        held = uvloop.run(held_calls(args.held))
        print(held_table(held))
        report["held"] = asdict(held)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
