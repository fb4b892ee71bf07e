"""CEL rule conditions: compiled once at load; evaluated per request on only the values they read.

The CEL library converts its whole input on every call (a large chat body costs ~100 us), so each
condition records the `agent.*`, `action.*` and `request.*` paths it references and is given a context
holding just those. The same values are the decision's evidence. Conditions in the subset `cel_fast` compiles
are decided by Python closures, falling back to the library where they cannot be sure of its answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cel

from .cel_fast import Fallback, FastProgram, compile_fast

ROOTS = ("agent", "action", "request")
_ROOT = re.compile(r"(?<![\w.])(agent|action|request)\b")
_MEMBER = re.compile(r"\s*\.\s*([A-Za-z_]\w*)")
_MISSING: Any = object()

Path = tuple[str, ...]


class ConditionError(Exception):
    """A condition that does not compile; the message is the CEL library's."""


def referenced_paths(source: str) -> tuple[Path, ...]:
    """Field paths below the roots, e.g. `request.json.amount`; a method call ends a path."""
    found: set[Path] = set()
    for match in _ROOT.finditer(source):
        path = [match.group(1)]
        pos = match.end()
        while member := _MEMBER.match(source, pos):
            after = source[member.end():].lstrip()
            if after.startswith("("):  # `x.startsWith(...)`: a method, not a field
                break
            path.append(member.group(1))
            pos = member.end()
        found.add(tuple(path))
    # A path whose prefix is also referenced is covered by the prefix's whole value.
    paths = sorted(found, key=len)
    kept: list[Path] = []
    for p in paths:
        if not any(p[: len(k)] == k for k in kept):
            kept.append(p)
    return tuple(sorted(kept))


@dataclass(frozen=True, slots=True)
class Condition:
    source: str
    program: Any  # cel.Program
    paths: tuple[Path, ...]
    fast: FastProgram | None = field(default=None, compare=False)  # None: the library decides every call
    keys: tuple[str, ...] = field(init=False, repr=False, compare=False)  # the evidence keys of `paths`

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(".".join(path) for path in self.paths))

    @property
    def needs_json(self) -> bool:
        return any(p[:2] == ("request", "json") or p == ("request",) for p in self.paths)

    def evaluate(self, resolve: Callable[[Path], Any]) -> tuple[bool | Exception, dict[str, Any]]:
        """Run the condition; returns (True/False, or the error it raised) and the evidence it read."""
        evidence: dict[str, Any] = {}
        values: list[Any] = []
        for path, key in zip(self.paths, self.keys):  # noqa: B905 (hot; built together)
            value = resolve(path)
            values.append(value)
            evidence[key] = None if value is _MISSING else value
        if self.fast is not None:
            try:
                return self.fast(values), evidence
            except Fallback:
                pass
        # The library is handed a nested dict built only now: the fast path, when it decides, never needs it.
        context: dict[str, Any] = {}
        for path, value in zip(self.paths, values, strict=True):
            _place(context, path, value)
        try:
            result = self.program.execute(context)
        except Exception as exc:  # the CEL library raises KeyError/TypeError/RuntimeError/ValueError
            return exc, evidence
        if not isinstance(result, bool):
            return TypeError(f"condition returned {type(result).__name__}, not a bool"), evidence
        return result, evidence


def compile_condition(source: str) -> Condition:
    try:
        program = cel.compile(source)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ConditionError(" ".join(str(exc).split())) from exc
    unknown = sorted(set(program.variables()) - set(ROOTS) - _bound_names(source))
    if unknown:
        raise ConditionError(f"unknown variable {unknown[0]!r}: conditions see only agent, action and request")
    paths = referenced_paths(source)
    return Condition(source, program, paths, compile_fast(source, paths, _MISSING))


def _bound_names(source: str) -> set[str]:
    """Names bound by comprehension macros (`x` in `list.exists(x, ...)`), which are not free variables."""
    return set(re.findall(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,", source))


def walk(value: Any, keys: tuple[str, ...]) -> Any:
    """Follow keys through nested mappings. A field of a non-mapping is missing (so reading it is an error),
    never the non-mapping itself: `request.json.amount` of a body `5` must not read as 5."""
    for key in keys:
        if not isinstance(value, Mapping):
            return _MISSING
        value = value.get(key, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _place(context: dict[str, Any], path: Path, value: Any) -> None:
    """Put `value` at `path`, creating parents, so a missing leaf reads as absent (`has()` is false)."""
    node = context
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = node[key] = {}
        node = nxt
    if value is not _MISSING:
        node[path[-1]] = value


MISSING = _MISSING
