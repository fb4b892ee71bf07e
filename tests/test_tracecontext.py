"""W3C trace context: a valid version-00 `traceparent` is continued; anything else starts a new trace."""

from __future__ import annotations

import pytest

from gateway.tracecontext import parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(("flags"), ["01", "00", "ff", "0a"])
def test_parse_traceparent_valid_gives_trace_id_and_flags(flags: str) -> None:
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-{flags}") == (TRACE, flags)


def test_parse_traceparent_ignores_surrounding_whitespace() -> None:
    assert parse_traceparent(f"  00-{TRACE}-{SPAN}-01\t") == (TRACE, "01")


@pytest.mark.parametrize("value", [None, ""])
def test_parse_traceparent_absent_starts_a_trace(value: str | None) -> None:
    assert parse_traceparent(value) == (None, "01")


@pytest.mark.parametrize(
    "value",
    [
        f"00-{'0' * 32}-{SPAN}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{'0' * 32}-{'0' * 16}-00",
    ],
)
def test_parse_traceparent_all_zero_ids_are_invalid(value: str) -> None:
    assert parse_traceparent(value) == (None, "01")


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE.upper()}-{SPAN}-01",
        f"00-{TRACE}-{SPAN.upper()}-01",
        f"00-{TRACE}-{SPAN}-0G",
        f"ff-{TRACE}-{SPAN}-01",
        f"0-{TRACE}-{SPAN}-01",
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00-{TRACE}0-{SPAN}-01",
        f"00-{TRACE}-{SPAN[:-1]}-01",
        f"00-{TRACE}-{SPAN}-1",
        f"00-{TRACE}-{SPAN}-011",
        f"00-{TRACE}-{SPAN}-01-extra",
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE}-{SPAN}",
        f"00-{TRACE[:8]}-{TRACE[8:]}-{SPAN}-01",
        "not a traceparent",
        f"00-{TRACE}-{SPAN}-01\n00-{TRACE}-{SPAN}-01",
    ],
)
def test_parse_traceparent_malformed_is_invalid(value: str) -> None:
    assert parse_traceparent(value) == (None, "01")
