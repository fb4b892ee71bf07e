"""What the Redis store computes on the scripts' behalf; the scripts' behaviour is the contract suite's."""

from __future__ import annotations

import pytest

from gateway.limits.redis_store import _px


@pytest.mark.parametrize(("seconds", "px"), [
    (86_400, 86_400_000), (10, 10_000), (2.5, 2500), (1.0005, 1001), (0.0001, 1), (0, 1), (-3, 1),
])
def test_px_is_whole_milliseconds_rounded_up_and_at_least_one(seconds: float, px: int) -> None:
    assert _px(seconds) == px
