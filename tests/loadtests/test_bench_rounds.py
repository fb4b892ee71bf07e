"""The benchmark's round order and its within-round ratios (no server is started)."""

from __future__ import annotations

import sys
from pathlib import Path

# loadtests/ holds scripts, not a package: import them the way `python loadtests/x.py` does.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
import bench


def test_each_configuration_takes_each_position_of_a_round_once_over_n_rounds() -> None:
    configs = ["a", "b", "c", "d"]
    orders = [bench.rotated(configs, r) for r in range(len(configs))]
    assert orders[0] == configs
    assert orders[1] == ["b", "c", "d", "a"]
    assert all(sorted(order) == configs for order in orders)
    for position in range(len(configs)):
        assert sorted(order[position] for order in orders) == configs
    assert bench.rotated(configs, len(configs) + 1) == orders[1]


def test_a_ratio_is_the_median_of_the_ratios_within_a_round() -> None:
    def run(config: str, rps: float) -> bench.Result:
        return bench.Result(config, rps, 1.0, 2.0, 0, 50.0)

    # Round 2 runs at half speed throughout, round 3's passthrough slice alone: the median outvotes round 3.
    rounds = {"passthrough": [run("passthrough", 4000), run("passthrough", 2000), run("passthrough", 2000)],
              "gateway-allow": [run("gateway-allow", 2000), run("gateway-allow", 1000), run("gateway-allow", 1800)]}
    assert bench.ratio(rounds, "gateway-allow", "passthrough") == 0.5
    assert bench.ratio(rounds, "gateway-allow", "gateway-no-limits") is None
