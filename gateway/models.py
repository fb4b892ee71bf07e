"""Frozen values that cross pipeline stages: who is calling, what they want, and what was decided."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["allow", "deny", "hold"]
Mode = Literal["audit", "assist", "automate"]


@dataclass(frozen=True, slots=True)
class Agent:
    """An authenticated agent identity (the JWT `sub`, which names an agent in the rules)."""

    id: str
    claims: Mapping[str, Any] = field(default_factory=dict)
    expires_at: float = 0.0


# Not frozen, though never changed once built: one is built per call, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs about six times as much.
@dataclass(slots=True)
class Action:
    """What one request (or one JSON-RPC element) asks to do, as the rules see it."""

    upstream: str
    kind: str
    verb: str
    resource: str | None = None
    tool: str | None = None
    model: str | None = None
    stream: bool = False
    # MCP session plumbing (initialize, ping, tools/list...): allowed for any agent holding a grant upstream.
    plumbing: bool = False
    input_tokens: int = 0  # the prompt, estimated (~4 characters a token)
    max_output: int | None = None  # the request's output cap (max_tokens), if it sets one
    # Extra values rules may read as `action.attributes.*` (e.g. MCP tool arguments).
    attributes: Mapping[str, Any] = field(default_factory=dict)
    # The JSON value rules see as `request.json` for this action (the whole body, or one batch element).
    json: Any = None

    @property
    def estimated_tokens(self) -> int:
        return self.input_tokens + (self.max_output or 0)

    def as_cel(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream,
            "kind": self.kind,
            "verb": self.verb,
            "resource": self.resource or "",
            "tool": self.tool or "",
            "model": self.model or "",
            "stream": self.stream,
            "estimated_tokens": self.estimated_tokens,
            "attributes": dict(self.attributes),
        }


# Not frozen, though never changed once built: one is built per call, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs about six times as much.
@dataclass(slots=True)
class Decision:
    """The policy's answer for one action, naming the rule and version behind it."""

    outcome: Outcome
    rule: str
    policy_version: str
    mode: Mode
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    # Hold-only: how long the call may wait for a human, in seconds.
    timeout: float | None = None
    # Staged rules that matched but did not decide: ({"rule", "would": "deny"|"hold"}, ...) for shadow rules,
    # ({"rule", "warn": "deny"|"hold"}, ...) for warn rules.
    shadow: tuple[Mapping[str, str], ...] = ()
    warnings: tuple[Mapping[str, str], ...] = ()
