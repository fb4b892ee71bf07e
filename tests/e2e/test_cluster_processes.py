"""A budget shared by three gateway processes on a real Redis Cluster holds exactly (no overshoot)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_limits_processes import RESERVATION, burst, gateways, write_rules

from gateway.demo.fakes import FakeUpstreams, start_all


@pytest.fixture
async def fakes() -> AsyncIterator[FakeUpstreams]:
    running = await start_all()
    yield running
    await running.close()


async def test_budget_covering_one_call_admits_one_across_three_processes_on_a_cluster(
        tmp_path: Path, redis_cluster_url: str, fakes: FakeUpstreams) -> None:
    rules = write_rules(tmp_path / "rules", f"budgets:\n  - {{tokens: {RESERVATION}, per: day}}\n")
    with gateways(rules, redis_cluster_url, fakes, 3) as ports:
        statuses = await burst(ports, 50)
    assert sorted(statuses) == [200] + [429] * 49
    assert len(fakes.openai.recorder.requests) == 1


async def test_rate_limit_admits_the_global_limit_across_three_processes_on_a_cluster(
        tmp_path: Path, redis_cluster_url: str, fakes: FakeUpstreams) -> None:
    rules = write_rules(tmp_path / "rules", "rate_limits:\n  - {requests: 10, per: hour}\n")
    with gateways(rules, redis_cluster_url, fakes, 3) as ports:
        statuses = await burst(ports, 30)
    assert sorted(statuses) == [200] * 10 + [429] * 20
    assert len(fakes.openai.recorder.requests) == 10
