"""The soak: the benchmark's full-policy gateway under steady `wrk` load for N minutes, RSS after every minute.

    python loadtests/soak.py [--minutes 10] [--connections 16] [--json FILE]

Reuses bench.py's fake upstream, rules (`gateway-limits-memory`: CEL allow rule, deny rule, budgets, rate limits,
loop detection) and wrk script, with the gateway on CPU 0 and wrk on CPU 1. Load runs in one-minute wrk slices;
after each, the gateway's resident set (VmRSS) and the slice's errors (non-2xx plus socket errors) are recorded.
A leak shows as RSS that keeps rising slice after slice rather than levelling off after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import FULL_POLICY, HERE, LIMITS, SECRET, free_port, pinned, process, run_wrk, token_for, write_rules

CONFIG = "gateway-limits-memory"


@dataclass
class Slice:
    minute: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    rss_mb: float


@dataclass
class Soak:
    config: str
    connections: int
    slice_s: int
    idle_rss_mb: float
    slices: list[Slice] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.slices)

    @property
    def max_rss_mb(self) -> float:
        return max([self.idle_rss_mb, *(s.rss_mb for s in self.slices)])

    def summary(self) -> dict[str, object]:
        first, last = self.slices[0], self.slices[-1]
        return {"config": self.config, "connections": self.connections, "minutes": len(self.slices),
                "idle_rss_mb": self.idle_rss_mb, "start_rss_mb": first.rss_mb, "end_rss_mb": last.rss_mb,
                "max_rss_mb": self.max_rss_mb, "errors": self.errors,
                "requests": round(sum(s.requests_per_s * self.slice_s for s in self.slices)),
                "slices": [asdict(s) for s in self.slices]}


def rss_mb(pid: int) -> float:
    """Current resident set of a process (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def soak(minutes: int, connections: int, slice_s: int = 60) -> Soak:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        upstream_port, port = free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
        env = {**os.environ, "AGENT_GATEWAY_JWT_SECRET": SECRET, "OPENAI_BASE_URL": upstream_url}
        rules = work / CONFIG
        write_rules(rules, FULL_POLICY + LIMITS)
        argv = pinned(0, [sys.executable, "-m", "gateway", "serve", "--rules", str(rules), "--port", str(port),
                          "--admin-port", str(free_port()), "--trace", str(work / "soak.trace.jsonl")])
        token = token_for(env)
        upstream = pinned(0, [sys.executable, str(HERE / "upstream.py"), str(upstream_port)])
        with process(upstream, upstream_port), process(argv, port, env) as gateway:
            url = f"http://127.0.0.1:{port}/openai/chat/completions"
            result = Soak(CONFIG, connections, slice_s, rss_mb(gateway.pid))
            for minute in range(1, minutes + 1):
                rps, p50, p99, errors = run_wrk(url, slice_s, connections, token, stream=False)
                result.slices.append(Slice(minute, round(rps, 1), p50, p99, errors, rss_mb(gateway.pid)))
                print(f"  minute {minute}: {rps:.0f} req/s, {errors} errors, RSS {result.slices[-1].rss_mb} MB",
                      file=sys.stderr, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=10, help="minutes of load, in one-minute wrk slices")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("soak: needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    started = time.monotonic()
    result = soak(args.minutes, args.connections)
    summary = summary_text(result)
    print(summary)
    print(f"\n{args.connections} connections, {args.minutes} x 60 s wrk slices, gateway on CPU 0, wrk on CPU 1, "
          f"{time.monotonic() - started:.0f} s wall")
    if args.json:
        Path(args.json).write_text(json.dumps(result.summary(), indent=2))
    return 1 if result.errors else 0


def summary_text(result: Soak) -> str:
    rows = [f"{'minute':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'RSS MB':>9}"]
    rows += [f"{s.minute:>6}{s.requests_per_s:>9.0f}{s.p50_ms:>9.2f}{s.p99_ms:>9.2f}{s.errors:>8}{s.rss_mb:>9.1f}"
             for s in result.slices]
    first, last = result.slices[0], result.slices[-1]
    rows.append(f"\nRSS idle {result.idle_rss_mb:.1f} MB, after minute 1 {first.rss_mb:.1f} MB, "
                f"end {last.rss_mb:.1f} MB, max {result.max_rss_mb:.1f} MB; errors {result.errors}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
