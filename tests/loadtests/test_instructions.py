"""The instruction-count benchmark's parts that run without valgrind."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
import bench
import instructions


def test_callgrind_total_reads_the_summary_of_either_format() -> None:
    assert instructions.callgrind_total("version: 1\nevents: Ir\nsummary: 123456\n") == 123456
    assert instructions.callgrind_total("events: Ir\nfl=x\n1 2\ntotals: 789\n") == 789
    with pytest.raises(ValueError, match="no summary"):
        instructions.callgrind_total("events: Ir\n")


@pytest.mark.parametrize("stream", [False, True])
def test_each_request_body_is_the_benchmarks_chat_with_a_unique_prompt(stream: bool) -> None:
    first, second = orjson.loads(instructions.body(1, stream)), orjson.loads(instructions.body(2, stream))
    assert first["model"] == "gpt-4o-mini" and first["max_tokens"] == 64
    assert first.get("stream", False) is stream
    assert first["messages"] != second["messages"]  # loop detection must not fire


def test_configurations_use_bench_rules() -> None:
    assert bench.agent_rules("gateway-allow") == bench.ALLOW_ONLY
    assert "loop_detection: false" in bench.agent_rules("gateway-no-limits")
    assert bench.agent_rules("gateway-limits-memory") == bench.agent_rules("gateway-stream") == (
        bench.FULL_POLICY + bench.LIMITS)
    assert set(instructions.CONFIGS) <= set(bench.CONFIGS)
