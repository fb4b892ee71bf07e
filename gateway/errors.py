"""The one error tree: every failure an agent can see is a `GatewayError` with a stable type."""

from __future__ import annotations

from dataclasses import dataclass, field

# Stable error type -> HTTP status (DESIGN.md "Errors the agent sees"). One mapping, used everywhere.
STATUS: dict[str, int] = {
    "unauthenticated": 401,
    "policy_denied": 403,
    "approval_denied": 403,
    "approval_timeout": 403,
    "agent_paused": 403,
    "rate_limited": 429,
    "budget_exceeded": 429,
    "bad_request": 400,
    "payload_too_large": 413,
    "upstream_error": 502,
    "upstream_timeout": 504,
    "store_unavailable": 503,
}


@dataclass(eq=False)
class GatewayError(Exception):
    """A failure with a stable `type`, a message the agent can act on, and the rule behind it if any."""

    type: str
    message: str
    rule: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    detail: str | None = None  # a finer reason within the type, e.g. `loop_detected` for `rate_limited`

    def __post_init__(self) -> None:
        if self.type not in STATUS:
            raise ValueError(f"unknown gateway error type {self.type!r}")
        super().__init__(f"{self.type}: {self.message}")

    @property
    def status(self) -> int:
        return STATUS[self.type]


def unauthenticated(message: str) -> GatewayError:
    return GatewayError("unauthenticated", message)


def bad_request(message: str) -> GatewayError:
    return GatewayError("bad_request", message)


class StoreUnavailable(Exception):
    """A shared store (Redis) did not answer in time or refused the connection: callers fail closed."""
