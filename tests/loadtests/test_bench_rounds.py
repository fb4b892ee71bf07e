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


def test_each_gateway_slice_follows_a_slice_of_its_own_passthrough() -> None:
    configs = list(bench.CONFIGS)
    for round_ in range(3):
        slices = bench.schedule(configs, round_)
        gateways = [c for c, _ in slices if not c.startswith("passthrough")]
        assert gateways == bench.rotated([c for c in configs if not c.startswith("passthrough")], round_)
        for position, (config, baseline) in enumerate(slices):
            if config.startswith("passthrough"):
                assert baseline is None
            else:
                assert baseline == slices[position - 1][0] == bench.baseline_of(config)
    assert bench.baseline_of("gateway-stream") == "passthrough-stream"
    # Without its passthrough a gateway is still measured, compared with nothing; a lone passthrough too.
    assert bench.schedule(["gateway-allow"], 0) == [("gateway-allow", None)]
    assert bench.schedule(["passthrough", "passthrough-stream", "gateway-stream"], 0) == [
        ("passthrough-stream", None), ("gateway-stream", "passthrough-stream"), ("passthrough", None)]


def test_a_ratio_is_the_median_over_rounds_of_a_slice_against_the_passthrough_slice_before_it() -> None:
    def run(config: str, rps: float) -> bench.Result:
        return bench.Result(config, rps, 1.0, 2.0, 0, 50.0)

    # Round 2 runs at half speed throughout; in round 3 the gateway's slice alone was slowed: the median outvotes it.
    pairs = {"gateway-allow": [(run("gateway-allow", 2000), run("passthrough", 4000)),
                               (run("gateway-allow", 1000), run("passthrough", 2000)),
                               (run("gateway-allow", 600), run("passthrough", 4000))],
             "gateway-no-limits": [(run("gateway-no-limits", 4000), run("passthrough", 4000)),
                                   (run("gateway-no-limits", 1000), run("passthrough", 2000)),
                                   (run("gateway-no-limits", 2000), run("passthrough", 2000))]}
    assert bench.ratio(pairs, "gateway-allow") == 0.5
    assert bench.ratio(pairs, "gateway-no-limits") == 1.0
    assert bench.ratio(pairs, "gateway-allow", over="gateway-no-limits") == 0.5  # 0.5, 1.0, 0.15 per round
    assert bench.ratio(pairs, "gateway-limits-redis") is None
    assert bench.ratio(pairs, "gateway-allow", over="gateway-limits-redis") is None
