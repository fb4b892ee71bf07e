"""W3C trace context: continue the agent's trace when it sends a valid `traceparent`, else start one."""

from __future__ import annotations

import re

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32


def parse_traceparent(value: str | None) -> tuple[str | None, str]:
    """(trace id, flags) from a version-00 header; (None, "01") when absent or invalid."""
    if value:
        match = _TRACEPARENT.fullmatch(value.strip())
        if match and match.group(1) != _ZERO_TRACE and match.group(2) != "0" * 16:
            return match.group(1), match.group(3)
    return None, "01"
