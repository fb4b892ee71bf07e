"""The README's first command: the demo runs the scripted agent end to end and exits cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]


def test_demo_shows_allowed_denied_and_held_calls_with_their_traces(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GATEWAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--exit", "--port", "0", "--admin-port", "0",
         "--rules", str(ROOT / "rules")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "   -> 200: 'echo: Summarise invoice INV-7'" in out
    assert "   -> 403: policy_denied by invoice-bot.yaml#deny[0]: The invoice bot never deletes ERP records" in out
    assert "held as approval" in out
    assert '-> 201: {"vendor":"v-100","invoice":"INV-7","amount":25000,"id":"pay-1","status":"created"}' in out
    traces = [orjson.loads(line) for line in (tmp_path / "demo-trace.jsonl").read_bytes().splitlines()]
    assert [(t["decision"], t["status"]) for t in traces] == [("allow", 200), ("deny", 403), ("hold", 201)]
    assert traces[2]["approval"]["outcome"] == "approved"
