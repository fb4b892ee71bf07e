"""replay: backtest a candidate rule set against recorded traces; which calls would it decide differently?

Each call's trace keeps a redacted capture of its request (`gateway.capture`); replay re-decides it under the
new rules with the gateway's own classify and decide code and counts what flips, per agent and per rule.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from ..policy.cases import PlaceholderEnv
from ..policy.compile import compile_policy
from ..policy.load import load_rules
from ..policy.spec import RuleSetInvalid
from .report import FORMATS, render
from .tally import tally

__all__ = ["FORMATS", "main", "render", "tally"]


def main(rules: str, traces: Sequence[str], fmt: str = "table", examples: int = 3, agent: str | None = None,
         env: Mapping[str, str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`agent-gateway replay`: 0 with the report printed, 2 when the rules or a trace file cannot be read."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        # Replay never forwards, so an unset upstream secret in the rules is only a placeholder.
        policy = compile_policy(load_rules(rules, PlaceholderEnv(env or {})))
    except RuleSetInvalid as invalid:
        for error in invalid.errors:
            print(error, file=err)
        print(f"agent-gateway replay: {len(invalid.errors)} error(s) in {rules}", file=err)
        return 2
    try:
        report = tally(policy, traces, rules, examples, agent)
    except OSError as exc:
        print(f"agent-gateway replay: cannot read {exc.filename}: {exc.strerror}", file=err)
        return 2
    out.write(render(report, fmt))
    return 0
