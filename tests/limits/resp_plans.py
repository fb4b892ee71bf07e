"""What both RESP store test modules share: a runner on each event loop, and plans whose replies name their caller."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from gateway.limits.store import BudgetCounter, Plan, RateCounter, Refusal, Reservation

T = TypeVar("T")
NOW = 1_700_000_000.0
TAG = "agw:{bot}"
PROMPTLY = 5.0  # a guard, far below the long store timeouts of the tests that must fail by another cause
RPM = RateCounter("rpm", f"{TAG}:rl:rpm", 1_000_000, 60.0, 1, 0, 0)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop,
                                                             "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Runs a scenario on a fresh loop of each kind; a transport left open fails the test (warnings are errors)."""

    def run(scenario: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(scenario)

    return run


def budget(i: int) -> BudgetCounter:
    return BudgetCounter(f"b{i}", f"{TAG}:b:{i}", f"{TAG}:a:{i}", 10**9, 1, 1, "2023-11-14", NOW + 3600, 90_000, (),
                         "tokens")


def plan(i: int) -> Plan:
    """Caller i's own plan: its reply says which caller it belongs to (output 1000 + i, used 1000 + 2i)."""
    return Plan("bot", f"{TAG}:res:{uuid.uuid4().hex}", 600, (RPM,), (budget(i),), i, 1000 + i, None, NOW)


def assert_own(result: Reservation | Refusal | BaseException, i: int) -> Reservation:
    assert isinstance(result, Reservation), (i, result)
    assert (result.plan.input, result.output, result.used) == (i, 1000 + i, (1000 + 2 * i,)), i
    return result
