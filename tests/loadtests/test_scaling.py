"""The scaling and soak measurements run, at toy sizes (no timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

# loadtests/ holds scripts, not a package: import them the way `python loadtests/x.py` does.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
from scaling import (
    decision_scaling,
    decisions_table,
    held_calls,
    held_table,
    prepared_calls,
    run_decisions,
    write_agents,
)
from soak import Slice, Soak, summary_text

from gateway.policy.cases import PlaceholderEnv
from gateway.policy.compile import compile_policy
from gateway.policy.load import load_rules


def test_generated_agents_allow_hold_and_deny_like_the_examples(tmp_path: Path) -> None:
    write_agents(tmp_path, 3)
    policy = compile_policy(load_rules(tmp_path, PlaceholderEnv()))
    assert sorted(policy.agents) == ["agent-00000", "agent-00001", "agent-00002"]
    tally = run_decisions(policy, prepared_calls(policy, 3, 400))
    assert set(tally) == {"allow", "hold", "deny"} and sum(tally.values()) == 400


def test_decision_scaling_reports_each_size_against_the_smallest() -> None:
    results = decision_scaling([10, 50], calls=200, repeats=2)
    assert [(r.agents, r.active) for r in results] == [(10, 10), (50, 50), (50, 10)]
    assert results[0].ratio == 1.0 and all(r.ratio is not None and r.us_per_decision > 0 for r in results)
    assert results[1].rules == 50 * 7
    assert "x smallest" in decisions_table(results)


async def test_held_calls_are_all_held_then_denied() -> None:
    result = await held_calls(12, wave=5)
    assert result.held == 12 and result.statuses == {403: 12}
    assert result.rss_held_mb > 0 and result.rss_idle_mb > 0
    assert "held calls" in held_table(result)


def test_soak_summary_gives_start_end_max_and_errors() -> None:
    soak = Soak("gateway-limits-memory", 16, 60, idle_rss_mb=70.0,
                slices=[Slice(1, 2000.0, 5.0, 9.0, 0, 80.0), Slice(2, 2100.0, 5.0, 9.0, 3, 82.5),
                        Slice(3, 2050.0, 5.0, 9.0, 0, 81.0)])
    summary = soak.summary()
    assert (summary["start_rss_mb"], summary["end_rss_mb"], summary["max_rss_mb"], summary["errors"]) == (
        80.0, 81.0, 82.5, 3)
    assert summary["requests"] == ((2000 + 2100 + 2050) * 60)
    assert "max 82.5 MB; errors 3" in summary_text(soak)
