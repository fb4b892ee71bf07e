"""The benchmark: gateway configurations against a bare aiohttp passthrough, measured in the same run.

    python loadtests/bench.py [--duration 4] [--rounds 7] [--connections 16] [--configs a,b,...] [--json FILE]

Starts a fast fake upstream, Redis (for the Redis configuration only) and every selected configuration's server
once, all on CPU 0, warms each, and keeps them all running to the end while `wrk` drives load from CPU 1. Then
`--rounds` rounds: each measures every gateway configuration in a short slice (1 s of unmeasured load on fresh
connections, then `--duration` s measured), each right after a slice of its passthrough (the streaming one for
streaming), and starts one gateway configuration later than the round before, so none is always measured first,
last or at the same moment of a round. It prints one table: requests/s, p50, p99, peak RSS, and each
configuration's requests/s as a ratio to the passthrough and to the gateway with no limits. Each figure is the
median over the rounds (the passthrough's over all its slices), and each ratio the median over the rounds of the
configuration's slice against the passthrough slice just before it. A virtual machine's speed drifts by tens of
percent within seconds (on this machine two adjacent 1 s slices of the same server differ by 11% on average, and
slices far apart by more): with no server starting between slices, the two sides of a ratio are measured back to
back, and the medians outvote the rounds where drift still moved a ratio.
Needs `wrk` (Debian: apt-get install wrk) and, for the Redis configuration, `redis-server`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECRET = "bench-secret-0123456789abcdef0123456789"
CONFIGS = ("passthrough", "gateway-allow", "gateway-no-limits", "gateway-limits-memory", "gateway-limits-redis",
           "passthrough-stream", "gateway-stream")

UPSTREAMS = """upstreams:
  openai:
    kind: openai
    url: "${OPENAI_BASE_URL}"
    credential: {header: Authorization, value: "Bearer upstream-key"}
    prices: {gpt-4o-mini: {input_per_mtok: 0.15, output_per_mtok: 0.60}}
"""
ALLOW_ONLY = """agent: bench-bot
allow:
  - {upstream: openai, verbs: [chat]}
loop_detection: false
"""
FULL_POLICY = """agent: bench-bot
allow:
  - {upstream: openai, verbs: [chat], when: 'request.json.model in ["gpt-4o-mini"] && request.json.max_tokens <= 4096'}
deny:
  - {upstream: openai, verbs: [embed]}
"""
LIMITS = """budgets:
  - {tokens: 1000000000000, per: day}
  - {usd: 1000000, per: month}
rate_limits:
  - {upstream: openai, requests: 1000000000, per: minute}
  - {upstream: openai, tokens: 1000000000000, per: minute}
loop_detection: {max_repeats: 20, per: minute}
"""


@dataclass
class Result:
    config: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    peak_rss_mb: float
    vs_passthrough: float | None = None
    vs_no_limits: float | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else argv


def wait_port(port: int, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)  # polling a port that is not open yet
    raise RuntimeError(f"nothing listens on port {port} after {limit}s")


@contextlib.contextmanager
def process(argv: list[str], port: int, env: dict[str, str] | None = None,
            log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A server, stopped on exit; its stderr goes to `log` (a pipe nobody reads would stall a chatty server)."""
    with (log.open("wb") if log is not None else contextlib.nullcontext(subprocess.DEVNULL)) as stderr:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_wrk(url: str, duration: int, connections: int, token: str, stream: bool) -> tuple[float, float, float, int]:
    env = {**os.environ, "TOKEN": token, "STREAM": "1" if stream else "0"}
    argv = pinned(1, ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s",
                      str(HERE / "chat.lua"), url])
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def latency(pct: str) -> float:
        value, unit = re.search(rf"{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in match.groups())
    return rps, latency("50"), latency("99"), errors


def write_rules(directory: Path, agent: str) -> None:
    (directory / "agents").mkdir(parents=True, exist_ok=True)
    (directory / "upstreams.yaml").write_text(UPSTREAMS)
    (directory / "agents" / "bench-bot.yaml").write_text(agent)


def agent_rules(config: str) -> str:
    """The agent file of a gateway configuration (the streaming one uses the full policy with limits)."""
    return {"gateway-allow": ALLOW_ONLY, "gateway-no-limits": FULL_POLICY + "loop_detection: false\n"}.get(
        config, FULL_POLICY + LIMITS)


def token_for(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-m", "gateway", "token", "--agent", "bench-bot"], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class Server:
    """A configuration's server, started once and kept running for the whole run."""
    config: str
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path  # its stderr

    @property
    def stream(self) -> bool:
        return self.config.endswith("stream")


def start(config: str, upstream_url: str, work: Path, redis_url: str | None, connections: int,
          stack: contextlib.ExitStack) -> Server:
    """Start a configuration's server on CPU 0 (stopped when `stack` closes) and warm it."""
    port = free_port()
    env = {**os.environ, "AGENT_GATEWAY_JWT_SECRET": SECRET, "OPENAI_BASE_URL": upstream_url}
    if config.startswith("passthrough"):
        argv = pinned(0, [sys.executable, str(HERE / "passthrough.py"), str(port), upstream_url])
        token = ""
    else:
        rules = work / config
        write_rules(rules, agent_rules(config))
        argv = pinned(0, [sys.executable, "-m", "gateway", "serve", "--rules", str(rules), "--port", str(port),
                          "--admin-port", str(free_port()), "--trace", str(work / f"{config}.trace.jsonl")])
        if config == "gateway-limits-redis":
            assert redis_url is not None
            argv += ["--redis-url", redis_url]
        token = token_for(env)
    log = work / f"{config}.stderr"
    proc = stack.enter_context(process(argv, port, env, log))
    server = Server(config, f"http://127.0.0.1:{port}/openai/chat/completions", token, proc, log)
    run_wrk(server.url, 2, connections, token, server.stream)  # warm-up after start, not measured
    return server


def measure(server: Server, duration: int, connections: int) -> Result:
    """One slice: 1 s of load, not measured, then `duration` s measured.

    The short warm-up lets wrk's fresh connections settle and the server leave its idle state. Peak RSS is VmHWM
    read at the end of the slice: the server's peak since it started, not within this slice.
    """
    try:
        run_wrk(server.url, 1, connections, server.token, server.stream)
        rps, p50, p99, errors = run_wrk(server.url, duration, connections, server.token, server.stream)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{server.config}: wrk failed ({exc.stdout.strip()[-300:]}); the server's exit status: "
                           f"{server.process.poll()}; its stderr ends: {server.log.read_text()[-2000:]}") from exc
    return Result(server.config, round(rps, 1), p50, p99, errors, round(peak_rss_mb(server.process.pid), 1))


def rotated(configs: list[str], round_: int) -> list[str]:
    """The order of round `round_` (from 0): it starts at configuration round_ % n, so over n rounds each
    configuration is measured once at each position of a round."""
    first = round_ % len(configs) if configs else 0
    return configs[first:] + configs[:first]


def baseline_of(config: str) -> str:
    """The passthrough a configuration is compared with: the streaming one for streaming."""
    return "passthrough-stream" if config.endswith("stream") else "passthrough"


def schedule(configs: list[str], round_: int) -> list[tuple[str, str | None]]:
    """Round `round_`'s slices in order, each as (configuration, the slice it is compared with): every gateway
    configuration right after a slice of its passthrough (when that is selected), the gateways rotated."""
    gateways = [c for c in configs if not c.startswith("passthrough")]
    slices: list[tuple[str, str | None]] = []
    for config in rotated(gateways, round_):
        baseline = baseline_of(config)
        if baseline in configs:
            slices.append((baseline, None))
        slices.append((config, baseline if baseline in configs else None))
    # A passthrough that no selected gateway is compared with is still measured once a round.
    slices += [(c, None) for c in configs if c.startswith("passthrough") and all(c != s for s, _ in slices)]
    return slices


def median_of(config: str, runs: list[Result]) -> Result:
    """Each figure's median over the slices (peak RSS: the highest), errors summed."""
    return Result(config, round(statistics.median(r.requests_per_s for r in runs), 1),
                  statistics.median(r.p50_ms for r in runs), statistics.median(r.p99_ms for r in runs),
                  sum(r.errors for r in runs), max(r.peak_rss_mb for r in runs))


def ratio(pairs: dict[str, list[tuple[Result, Result]]], config: str, over: str | None = None) -> float | None:
    """The median over the rounds of `config`'s requests/s against the passthrough slice measured just before
    it; with `over`, that ratio divided by `over`'s own ratio of the same round (each against its own slice)."""
    if config not in pairs or (over is not None and over not in pairs):
        return None

    def of(c: str, round_: int) -> float:
        result, baseline = pairs[c][round_]
        return result.requests_per_s / baseline.requests_per_s

    return round(statistics.median(of(config, r) / (of(over, r) if over else 1.0)
                                   for r in range(len(pairs[config]))), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=4,
                        help="seconds of measured load per configuration and round (after 1 s unmeasured)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="rounds over all configurations, each starting one later; medians are kept")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench: needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    configs = [c for c in args.configs.split(",") if c]
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        upstream_port = free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
        stack.enter_context(process(pinned(0, [sys.executable, str(HERE / "upstream.py"), str(upstream_port)]),
                                    upstream_port))
        redis_url = None
        if "gateway-limits-redis" in configs:
            redis_port = free_port()
            stack.enter_context(process(pinned(0, ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                                   "--save", "", "--appendonly", "no"]), redis_port))
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        # Every server starts before the first measurement, so no start-up falls between two slices of a round.
        servers = {config: start(config, upstream_url, work, redis_url, args.connections, stack)
                   for config in configs}
        rounds: dict[str, list[Result]] = {config: [] for config in configs}
        pairs: dict[str, list[tuple[Result, Result]]] = {}  # per gateway: (its slice, the passthrough's before)
        for round_ in range(args.rounds):
            for config, baseline in schedule(configs, round_):
                result = measure(servers[config], args.duration, args.connections)
                rounds[config].append(result)
                if baseline is not None:
                    pairs.setdefault(config, []).append((result, rounds[baseline][-1]))
                print(f"  round {round_ + 1}, {config}: {result.requests_per_s:.0f} req/s", file=sys.stderr)
        results = [median_of(config, rounds[config]) for config in configs]
    for r in results:
        if r.config.startswith("passthrough"):
            r.vs_passthrough = 1.0
        else:
            r.vs_passthrough = ratio(pairs, r.config)
            r.vs_no_limits = ratio(pairs, r.config, over="gateway-no-limits")
    print(f"\n{'configuration':<24}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'RSS MB':>8}"
          f"{'x pass':>8}{'x no-lim':>9}")
    for r in results:
        print(f"{r.config:<24}{r.requests_per_s:>9.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.errors:>8}"
              f"{r.peak_rss_mb:>8.1f}{r.vs_passthrough or 0:>8.2f}{r.vs_no_limits or 0:>9.2f}")
    print(f"\n{args.connections} connections, servers started once and kept running on CPU 0, wrk on CPU 1;\n"
          f"medians of {args.rounds} rounds; each measures every gateway configuration for {args.duration}s after "
          "1s unmeasured,\nright after its passthrough, order rotated by one a round; ratios against that slice")
    if args.json:
        Path(args.json).write_text(json.dumps({"connections": args.connections, "duration_s": args.duration,
                                               "rounds": args.rounds,
                                               "per_round": {c: [asdict(r) for r in rs] for c, rs in rounds.items()},
                                               "schedule": "each gateway slice right after its passthrough's",
                                               "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
