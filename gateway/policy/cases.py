"""Golden policy cases: request -> expected decision, run offline with the live gateway's own code.

A case file is YAML: `cases: [{name, agent, request: {method, path, headers?, json? | body?}, expect: {decision,
rule?, error?}}]`. `decision` is allow, deny, hold or error (the request itself is refused, e.g. bad_request).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from ..classify import classify
from ..errors import GatewayError
from ..incoming import Incoming
from ..paths import normalise, split_upstream
from .compile import Policy, compile_policy
from .decide import decide_each
from .load import load_rules


@dataclass(frozen=True)
class Case:
    name: str
    agent: str
    request: Mapping[str, Any]
    expect: Mapping[str, Any]
    source: str


@dataclass(frozen=True)
class Outcome:
    decision: str  # allow | deny | hold | error
    rule: str | None
    error: str | None
    reason: str


class PlaceholderEnv(dict[str, str]):
    """Offline runs never forward, so an unset ${VAR} (an upstream secret, say) reads as a placeholder."""

    def get(self, key: str, default: Any = None) -> str:
        return super().get(key) or f"<unset:{key}>"


def evaluate(policy: Policy, agent: str, request: Mapping[str, Any]) -> Outcome:
    """What the gateway would decide for this request from this agent, before any upstream I/O."""
    try:
        raw_path, _, query = str(request.get("path", "/")).partition("?")
        path = normalise(raw_path)
        name, subpath = split_upstream(path)
        upstream = policy.upstreams.get(name)
        if upstream is None:
            raise GatewayError("bad_request", f"unknown upstream {name!r}")
        if agent not in policy.agents:
            raise GatewayError("unauthenticated", f"agent {agent!r} is not in the rules")
        body = orjson.dumps(request["json"]) if "json" in request else str(request.get("body", "")).encode()
        headers = CIMultiDictProxy(CIMultiDict({str(k): str(v) for k, v in (request.get("headers") or {}).items()}))
        incoming = Incoming(str(request.get("method", "GET")).upper(), subpath, query, headers, body)
        classified = classify(upstream.spec, upstream.routes, incoming)
        (decision, _), _ = decide_each(policy, policy.agents[agent], classified.actions, incoming)
    except GatewayError as error:
        return Outcome("error", error.rule, error.type, error.message)
    error_type = {"deny": "policy_denied"}.get(decision.outcome)
    return Outcome(decision.outcome, decision.rule, error_type, decision.reason)


def load_cases(path: Path) -> Iterator[Case]:
    files = sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")]) if path.is_dir() else [path]
    for file in files:
        data = yaml.safe_load(file.read_text()) or {}
        for i, item in enumerate(data.get("cases", [])):
            yield Case(name=str(item.get("name", f"case {i}")), agent=str(item["agent"]),
                       request=item["request"], expect=item["expect"], source=f"{file}#cases[{i}]")


def mismatches(case: Case, outcome: Outcome) -> list[str]:
    wrong = []
    for key in ("decision", "rule", "error"):
        if key in case.expect and case.expect[key] != getattr(outcome, key):
            wrong.append(f"{key}: expected {case.expect[key]!r}, got {getattr(outcome, key)!r}")
    return wrong


def run_case_files(directory: str, case_paths: Sequence[str], env: Mapping[str, str],
                   out: TextIO) -> int:
    """`agent-gateway rules test`: print one line per case; 0 when all pass, 1 otherwise."""
    policy = compile_policy(load_rules(directory, PlaceholderEnv(env)))
    paths = [Path(p) for p in case_paths] or [Path(directory) / "tests"]
    passed = failed = 0
    for path in paths:
        for case in load_cases(path):
            wrong = mismatches(case, evaluate(policy, case.agent, case.request))
            if wrong:
                failed += 1
                out.write(f"FAIL {case.source}: {case.name}\n" + "".join(f"     {w}\n" for w in wrong))
            else:
                passed += 1
                out.write(f"ok   {case.source}: {case.name}\n")
    out.write(f"{passed} passed, {failed} failed\n")
    return 1 if failed or not passed else 0
