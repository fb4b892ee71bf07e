"""Instructions per request: the benchmark's configurations counted under callgrind, a figure noise cannot move.

    python loadtests/instructions.py [--requests 2000] [--configs a,b,...] [--json FILE]

A virtual machine's speed drifts by tens of percent between runs (bench.py interleaves rounds to cancel what it
can); an instruction count does not. Each server (the bare aiohttp passthrough or the gateway, configured as in
bench.py) runs under valgrind's callgrind with counting off; after 200 warm-up requests counting goes on for
exactly `--requests` requests (16 at a time, the benchmark's small chat completion with a unique body), then
the count is dumped. Printed: user-space instructions per request, and each configuration as a ratio to the
passthrough (streaming to the streaming passthrough). Not counted: the kernel's work (socket system calls), the
fake upstream's and Redis's, which bench.py's requests/s include, and cache misses, which instructions do not
show.
Needs valgrind (Debian: apt-get install valgrind). Takes about 20 s per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

CONFIGS = ("passthrough", "gateway-allow", "gateway-no-limits", "gateway-limits-memory", "gateway-limits-redis",
           "passthrough-stream", "gateway-stream")
WARM_UP = 200


@dataclass
class Count:
    config: str
    requests: int
    instructions_per_request: int
    vs_passthrough: float | None = None


def callgrind_total(text: str) -> int:
    """The event total of a callgrind output file (`summary:` or, in newer versions, `totals:`)."""
    for line in text.splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError("no summary or totals line in the callgrind output")


def body(i: int, stream: bool) -> str:
    return ('{"model":"gpt-4o-mini","max_tokens":64,' + ('"stream":true,' if stream else '') +
            f'"messages":[{{"role":"user","content":"Summarise invoice INV-{i} for the AP team"}}]}}')


async def drive(url: str, token: str, count: int, first: int, stream: bool) -> None:
    """`count` requests, 16 at a time; every answer must be a whole 200."""
    gate = asyncio.Semaphore(16)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            async with gate, session.post(url, data=body(i, stream), headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}")
        await asyncio.gather(*(one(first + i) for i in range(count)))


def count(config: str, upstream_url: str, requests: int, work: Path, redis_url: str) -> Count:
    port = bench.free_port()
    env = {**os.environ, "AGENT_GATEWAY_JWT_SECRET": bench.SECRET, "OPENAI_BASE_URL": upstream_url}
    out = work / f"{config}.callgrind"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    if config.startswith("passthrough"):
        argv = [*valgrind, sys.executable, str(bench.HERE / "passthrough.py"), str(port), upstream_url]
        token = "unused"
    else:
        rules = work / config
        bench.write_rules(rules, bench.agent_rules(config))
        argv = [*valgrind, sys.executable, "-m", "gateway", "serve", "--rules", str(rules), "--port", str(port),
                "--admin-port", str(bench.free_port()), "--trace", str(work / f"{config}.trace.jsonl")]
        if config == "gateway-limits-redis":
            argv += ["--redis-url", redis_url]
        token = bench.token_for(env)
    url = f"http://127.0.0.1:{port}/openai/chat/completions"
    stream = config.endswith("stream")
    proc = subprocess.Popen(bench.pinned(0, argv), env=env, cwd=bench.ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        bench.wait_port(port, limit=300)  # starting under valgrind takes a while
        asyncio.run(drive(url, token, WARM_UP, 0, stream))
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(drive(url, token, requests, WARM_UP, stream))
        subprocess.run(["callgrind_control", "--dump=measured", str(proc.pid)], check=True, capture_output=True)
        dumps = sorted(work.glob(f"{config}.callgrind.*"), key=lambda p: p.stat().st_mtime)
        total = callgrind_total(dumps[-1].read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return Count(config, requests, round(total / requests))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests counted per configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("instructions: needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    configs = [c for c in args.configs.split(",") if c]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        upstream_port = bench.free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
        redis_port = bench.free_port()
        redis = (bench.process(bench.pinned(1, ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                                "--save", "", "--appendonly", "no"]), redis_port)
                 if "gateway-limits-redis" in configs else contextlib.nullcontext())
        # The upstream, Redis and the load run on CPU 1, outside valgrind: only the server under test is counted.
        with bench.process(bench.pinned(1, [sys.executable, str(bench.HERE / "upstream.py"), str(upstream_port)]),
                           upstream_port), redis:
            results = {config: count(config, upstream_url, args.requests, work, f"redis://127.0.0.1:{redis_port}/0")
                       for config in configs}
    for result in results.values():
        baseline = results.get("passthrough-stream" if result.config.endswith("stream") else "passthrough")
        if baseline is not None:
            result.vs_passthrough = round(result.instructions_per_request / baseline.instructions_per_request, 3)
    print(f"\n{'configuration':<24}{'instructions/request':>22}{'x passthrough':>15}")
    for result in results.values():
        ratio = f"{result.vs_passthrough:.2f}" if result.vs_passthrough is not None else ""
        print(f"{result.config:<24}{result.instructions_per_request:>22,}{ratio:>15}")
    print(f"\nuser-space instructions (callgrind), {args.requests} requests per configuration after {WARM_UP} "
          "warm-up, 16 at a time")
    if args.json:
        Path(args.json).write_text(json.dumps({"requests": args.requests,
                                               "results": [asdict(r) for r in results.values()]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
