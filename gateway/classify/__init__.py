"""classify: turn a routed request into the `Action`s the policy decides, one classifier per upstream kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..incoming import Incoming
from ..models import Action
from ..policy.spec import UpstreamSpec
from . import anthropic, http, mcp, openai


@dataclass(frozen=True, slots=True)
class Classified:
    """The actions in one request; `rpc` describes a JSON-RPC (MCP) body, else None."""

    actions: tuple[Action, ...]
    rpc: mcp.RpcInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def classify(upstream: UpstreamSpec, routes: http.RouteTable | None, request: Incoming) -> Classified:
    """Classify by upstream kind; `routes` is the compiled route table of an `http` upstream."""
    if upstream.kind == "openai":
        return Classified((openai.classify(upstream.name, request),))
    if upstream.kind == "anthropic":
        return Classified((anthropic.classify(upstream.name, request),))
    if upstream.kind == "mcp":
        actions, info = mcp.classify(upstream, request)
        return Classified(actions, rpc=info)
    assert routes is not None, "http upstreams always have a compiled route table"
    return Classified((http.classify(upstream.name, routes, request),))
