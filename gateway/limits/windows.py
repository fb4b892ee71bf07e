"""Time windows: rolling periods for rate limits, UTC calendar windows for budgets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

PERIOD_SECONDS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


def calendar_window(per: str, now: float) -> tuple[str, float]:
    """(window id, reset time) of the UTC calendar `hour`, `day`, `week` (ISO, from Monday) or `month`."""
    t = datetime.fromtimestamp(now, UTC)
    if per == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%dT%H"), (start + timedelta(hours=1)).timestamp()
    if per == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), (start + timedelta(days=1)).timestamp()
    if per == "week":
        start = (t - timedelta(days=t.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}", (start + timedelta(days=7)).timestamp()
    if per == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start.strftime("%Y-%m"), nxt.timestamp()
    raise ValueError(f"unknown budget window {per!r}")
