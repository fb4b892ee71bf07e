"""Golden policy cases: request -> expected decision, run offline with the live gateway's own code.

A case file is YAML: `cases: [{name, agent, request: {method, path, headers?, json? | body?}, expect: {decision,
rule?, error?}}]`. `decision` is allow, deny, hold or error (the request itself is refused, e.g. bad_request).
A case file that cannot be read is reported as an error of that file; the other files still run.
"""

from __future__ import annotations

import time
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
from ..models import Action, Decision
from ..paths import normalise, split_upstream
from .compile import Policy, compile_policy
from .decide import decide_each
from .junit import CaseReport, write_junit
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
    shadow: tuple[str, ...] = ()  # staged (shadow or warn) rules that matched without deciding


class PlaceholderEnv(dict[str, str]):
    """Offline runs never forward, so an unset ${VAR} (an upstream secret, say) reads as a placeholder."""

    def get(self, key: str, default: Any = None) -> str:
        return super().get(key) or f"<unset:{key}>"


@dataclass(frozen=True)
class Evaluation:
    """An outcome and, when the policy decided, each action's decision (JSON-RPC batches: one per element)."""

    outcome: Outcome
    decisions: tuple[tuple[Decision, Action], ...] = ()


def evaluate(policy: Policy, agent: str, request: Mapping[str, Any]) -> Outcome:
    """What the gateway would decide for this request from this agent, before any upstream I/O."""
    return evaluate_all(policy, agent, request).outcome


def evaluate_all(policy: Policy, agent: str, request: Mapping[str, Any]) -> Evaluation:
    """`evaluate`, keeping every action's decision (replay checks what the deciding rules read)."""
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
        (decision, _), decisions = decide_each(policy, policy.agents[agent], classified.actions, incoming)
    except GatewayError as error:
        return Evaluation(Outcome("error", error.rule, error.type, error.message))
    error_type = {"deny": "policy_denied"}.get(decision.outcome)
    staged = tuple(s["rule"] for s in (*decision.shadow, *decision.warnings))
    return Evaluation(Outcome(decision.outcome, decision.rule, error_type, decision.reason, staged),
                      tuple(decisions))


class CaseFileError(Exception):
    """A case file that cannot be read or is not a list of cases."""


def case_files(path: Path) -> list[Path]:
    return sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")]) if path.is_dir() else [path]


def load_cases(path: Path) -> Iterator[Case]:
    for file in case_files(path):
        yield from load_case_file(file)


def load_case_file(file: Path) -> list[Case]:
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CaseFileError(f"{file}: cannot read cases: {exc}") from exc
    items = data.get("cases", []) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise CaseFileError(f"{file}: expected a mapping with `cases:`, a list of cases")
    cases = []
    for i, item in enumerate(items):
        source = f"{file}#cases[{i}]"
        missing = [k for k in ("agent", "request", "expect") if not isinstance(item, dict) or k not in item]
        if missing:
            raise CaseFileError(f"{source}: a case needs " + ", ".join(f"'{k}'" for k in missing))
        if not isinstance(item["request"], dict) or not isinstance(item["expect"], dict):
            raise CaseFileError(f"{source}: 'request' and 'expect' must be mappings")
        cases.append(Case(name=str(item.get("name", f"case {i}")), agent=str(item["agent"]),
                          request=item["request"], expect=item["expect"], source=source))
    return cases


def mismatches(case: Case, outcome: Outcome) -> list[str]:
    wrong = []
    for key in ("decision", "rule", "error"):
        if key in case.expect and case.expect[key] != getattr(outcome, key):
            wrong.append(f"{key}: expected {case.expect[key]!r}, got {getattr(outcome, key)!r}")
    if "shadow" in case.expect and sorted(case.expect["shadow"]) != sorted(outcome.shadow):
        wrong.append(f"shadow: expected {sorted(case.expect['shadow'])!r}, got {sorted(outcome.shadow)!r}")
    return wrong


def explain(case: Case, outcome: Outcome, wrong: Sequence[str]) -> list[str]:
    """A failed case, readably: what was wrong, the request, what was expected, what the gateway said and why."""
    expected = ", ".join(f"{k} {case.expect[k]}" for k in ("decision", "rule", "error", "shadow") if k in case.expect)
    got = f"decision {outcome.decision}"
    got += f", rule {outcome.rule}" if outcome.rule else ""
    got += f", error {outcome.error}" if outcome.error else ""
    got += f", shadow {list(outcome.shadow)}" if outcome.shadow else ""
    return [*wrong, f"request:  {case.agent} {_request_line(case.request)}", f"expected: {expected or 'nothing'}",
            f"got:      {got}", f"reason:   {outcome.reason or '(none given)'}"]


def _request_line(request: Mapping[str, Any]) -> str:
    line = f"{str(request.get('method', 'GET')).upper()} {request.get('path', '/')}"
    body = orjson.dumps(request["json"]).decode() if "json" in request else str(request.get("body", ""))
    if body:
        line += " " + (body if len(body) <= 160 else body[:157] + "...")
    return line


def run_case_files(directory: str, case_paths: Sequence[str], env: Mapping[str, str],
                   out: TextIO, junit: str | Path | None = None) -> int:
    """`agent-gateway rules test`: print one line per case (and a JUnit XML report to `junit`); 0 when all pass,
    1 otherwise."""
    policy = compile_policy(load_rules(directory, PlaceholderEnv(env)))
    paths = [Path(p) for p in case_paths] or [Path(directory) / "tests"]
    reports: list[CaseReport] = []
    for file in (f for path in paths for f in case_files(path)):
        try:
            cases = load_case_file(file)
        except CaseFileError as exc:
            out.write(f"ERR  {exc}\n")
            reports.append(CaseReport(str(file), "(case file)", 0.0, error=str(exc), details=str(exc)))
            continue
        for case in cases:
            started = time.perf_counter()
            outcome = evaluate(policy, case.agent, case.request)
            wrong = mismatches(case, outcome)
            seconds = time.perf_counter() - started
            if wrong:
                lines = explain(case, outcome, wrong)
                out.write(f"FAIL {case.source}: {case.name}\n" + "".join(f"     {line}\n" for line in lines))
                details = "\n".join([f"{case.source}: {case.name}", *lines])
                reports.append(CaseReport(str(file), case.name, seconds, failure="; ".join(wrong), details=details))
            else:
                out.write(f"ok   {case.source}: {case.name}\n")
                reports.append(CaseReport(str(file), case.name, seconds))
    passed = sum(r.failure is None and r.error is None for r in reports)
    failed = len(reports) - passed
    out.write(f"{passed} passed, {failed} failed\n")
    if junit is not None:
        write_junit(junit, reports)
    return 1 if failed or not passed else 0


def write_load_failure(junit: str | Path, directory: str, errors: Sequence[object]) -> None:
    """The JUnit report of a run whose rules did not load: one errored testcase listing every rule error."""
    text = "\n".join(str(e) for e in errors)
    message = f"{len(errors)} error(s) in {directory}"
    write_junit(junit, [CaseReport(directory, "load rules", 0.0, error=message, details=text)])
