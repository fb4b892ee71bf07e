"""Body changes the limit stage needs upstream: ask for stream usage, apply a clamped max_tokens.

The decision was made on the agent's body; these changes are the gateway's own and never widen what the
request may do (usage reporting on, output capped lower).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..models import Action
from .store import Reservation


def rewrite(action: Action, path: str, reservation: Reservation | None) -> tuple[bytes | None, bool]:
    """(new body or None to keep the original, whether to hide the usage chunk from the agent)."""
    body = action.json
    if reservation is None or not reservation.plan.settles or not isinstance(body, dict):
        return None, False
    changes: dict[str, Any] = {}
    hide_usage = False
    if action.kind == "openai" and action.stream and path.rstrip("/").endswith("/chat/completions"):
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        if options.get("include_usage") is not True:
            changes["stream_options"] = {**options, "include_usage": True}
            hide_usage = True
    plan = reservation.plan
    if plan.min_output is not None and reservation.output < plan.output:
        changes[_cap_field(action, path, body)] = reservation.output
    if not changes:
        return None, False
    return orjson.dumps({**body, **changes}), hide_usage


def _cap_field(action: Action, path: str, body: dict[str, Any]) -> str:
    if action.kind == "anthropic":
        return "max_tokens"
    if path.rstrip("/").endswith("/responses"):
        return "max_output_tokens"
    return "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
