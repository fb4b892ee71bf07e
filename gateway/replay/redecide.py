"""Re-deciding one recorded call under a candidate policy, with the offline path `rules test` uses (normalise,
route, classify, decide), and remembering the answer for identical records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from ..paths import split_upstream
from ..policy.cases import evaluate_all
from ..policy.compile import Policy
from .evidence import missing_evidence

# Why a call could not be replayed. `no_decision`: refused before any rule decided (unauthenticated,
# bad_request...); `request_error`: the replayed request is refused before deciding under the new rules.
NO_DECISION = "no_decision"
NO_CAPTURE = "no_capture"
AGENT_GONE = "agent_gone"
UPSTREAM_GONE = "upstream_gone"
INSUFFICIENT = "insufficient_evidence"
REQUEST_ERROR = "request_error"
REASONS = (NO_CAPTURE, INSUFFICIENT, AGENT_GONE, UPSTREAM_GONE, REQUEST_ERROR, NO_DECISION)
OK = "ok"

NOT_JSON = "\0 not JSON"  # a body the capture recorded as unparseable: reading request.json fails again
CACHE_LIMIT = 200_000  # distinct records remembered; past it the cache starts over (memory stays bounded)


class Verdict(NamedTuple):
    status: str  # OK, or one of REASONS
    decision: str | None
    rule: str | None
    note: str | None = None


class Redecider:
    """Decides capture records under one policy; identical records (by canonical bytes) are decided once."""

    __slots__ = ("_cache", "policy")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._cache: dict[tuple[str, str], Verdict] = {}

    def verdict(self, agent: str, capture: Mapping[str, Any]) -> Verdict:
        # As str: orjson's bytes keep ~2 KiB of spare capacity each, which a large cache would hold on to.
        key = (agent, orjson.dumps(capture, option=orjson.OPT_SORT_KEYS).decode())
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            found = self._cache[key] = self.decide(agent, capture)
        return found

    def decide(self, agent: str, capture: Mapping[str, Any]) -> Verdict:
        policy = self.policy
        agent_policy = policy.agents.get(agent)
        if agent_policy is None:
            return Verdict(AGENT_GONE, None, None, f"agent {agent!r} is not in the rules")
        path = str(capture.get("path") or "/")
        name, _ = split_upstream(path)
        if path.startswith("/") and name not in policy.upstreams:
            return Verdict(UPSTREAM_GONE, None, None, f"upstream {name!r} is not in the rules")
        query = capture.get("query")
        request: dict[str, Any] = {"method": capture.get("method") or "GET",
                                   "path": f"{path}?{query}" if query else path,
                                   "headers": capture.get("headers") or {}}
        if capture.get("json_invalid"):
            request["body"] = NOT_JSON
        elif capture.get("json") is not None:
            request["json"] = capture["json"]
        evaluation = evaluate_all(policy, agent, request)
        outcome = evaluation.outcome
        if outcome.decision == "error":
            kept = capture.get("kept")
            # The classifier needs the body's envelope; a record that kept none of it cannot be classified.
            blind = isinstance(kept, list) and "json" not in kept and "classifier" not in kept
            return Verdict(INSUFFICIENT if blind else REQUEST_ERROR, None, None,
                           f"{outcome.error}: {outcome.reason}")
        gap = missing_evidence(agent_policy, evaluation.decisions, capture)
        if gap is not None:
            return Verdict(INSUFFICIENT, None, None, gap)
        return Verdict(OK, outcome.decision, outcome.rule)
