"""cel_fast: the CEL subset compiled to closures answers exactly as the library does, and falls back otherwise."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from gateway.policy.cel_fast import Fallback, Values
from gateway.policy.conditions import MISSING, Condition, Path, compile_condition, walk

TYPICAL = [
    'request.json.model in ["gpt-4o-mini"] && request.json.max_tokens <= 4096',
    "request.json.amount <= 5000",
    'action.resource == "payments" || !has(request.json.vendor)',
    "request.json.amount > 100 && request.json.currency != 'EUR'",
    "request.json.vendor == null || (request.json.amount >= 0.5 && request.json.stream == false)",
    "!(request.json.model in ['a', 'b']) && agent.mode == 'enforce'",
    "request.json.stream",
    "-5 < request.json.delta && request.json.delta < 1e3",
    "true",
]

OUTSIDE = [
    'request.json.model.startsWith("gpt")',
    "size(request.json.messages) > 2",
    "request.json.amount + 1 <= 5000",
    "request.json.amount * 2 <= 5000",
    "(request.json.amount > 1 ? true : false)",
    '"a\\nb" == request.json.memo',
    'r"abc" == request.json.memo',
    'b"abc" == request.json.memo',
    '"""abc""" == request.json.memo',
    "1u == request.json.amount",
    "0x10 == request.json.amount",
    "007 == request.json.amount",
    "request.json.amount == .5",
    '{"a": 1} == request.json.meta',
    "request.json.tags[0] == 'x'",
    "request.json.tags.exists(t, t == 'x')",
    "'x' in request.json.tags",
    "request.json.amount in [1, 'x']",
    "request.json.amount in [1, 2.0]",
    "request.json.amount in [request.json.limit]",
    "request.json.amount < 1 < 2",
    "request.json.flag < true",
    "request.json.flag >= null",
    "request.json.amount == 1 // a comment",
    "int(request.json.amount) == 1",
    "request.json.amount == -(5)",
    "request.json == null && request.json.amount == 1",  # the paths overlap: only `request.json` is given
    'action.resource == "request"',  # the literal reads as a path to `referenced_paths`
    "1",
    "request.json.items == []",
]


@pytest.mark.parametrize("source", TYPICAL)
def test_fast_path_compiled_for_typical_shapes(source: str) -> None:
    assert compile_condition(source).fast is not None


@pytest.mark.parametrize("source", OUTSIDE)
def test_fast_path_absent_outside_subset(source: str) -> None:
    assert compile_condition(source).fast is None


@dataclass
class RecordingProgram:
    """Stands in for the library's program: records each context and answers `answer`."""

    answer: Any = True
    contexts: list[dict[str, Any]] = field(default_factory=list)

    def execute(self, context: dict[str, Any]) -> Any:
        self.contexts.append(context)
        return self.answer


def resolver(root: dict[str, Any]) -> Callable[[Path], Any]:
    return lambda path: walk(root, path)


def test_fast_path_decides_without_library() -> None:
    condition = compile_condition(TYPICAL[0])
    program = RecordingProgram(answer="not consulted")
    fast = replace(condition, program=program)
    body = {"model": "gpt-4o-mini", "max_tokens": 4096, "messages": [{"role": "user", "content": "hi"}]}
    result, evidence = fast.evaluate(resolver({"request": {"json": body}}))
    assert result is True
    assert evidence == {"request.json.max_tokens": 4096, "request.json.model": "gpt-4o-mini"}
    assert program.contexts == []
    result, _ = fast.evaluate(resolver({"request": {"json": {**body, "max_tokens": 4097}}}))
    assert result is False
    assert program.contexts == []


@pytest.mark.parametrize(("body", "context"), [
    ({"model": "gpt-4o-mini"}, {"request": {"json": {"model": "gpt-4o-mini"}}}),  # a missing field: an error
    ({"model": "gpt-4o-mini", "max_tokens": True}, None),  # a bool is not an int in CEL
    ({"model": "gpt-4o-mini", "max_tokens": 4096.0}, None),  # an int against a double: the library's call
    ({"model": "gpt-4o-mini", "max_tokens": 2**63}, None),  # beyond int64
    ({"model": "gpt-4o-mini\ud800", "max_tokens": 1}, None),  # a string the library cannot convert
    ({"model": ["gpt-4o-mini"], "max_tokens": 1}, None),
])
def test_fast_path_falls_back_to_library(body: dict[str, Any], context: dict[str, Any] | None) -> None:
    program = RecordingProgram(answer=False)
    condition = replace(compile_condition(TYPICAL[0]), program=program)
    result, evidence = condition.evaluate(resolver({"request": {"json": body}}))
    assert result is False
    assert program.contexts == [context or {"request": {"json": body}}]
    assert evidence == {f"request.json.{k}": body.get(k) for k in ("max_tokens", "model")}


def test_fast_path_compiled_for_int64_bounds() -> None:
    assert compile_condition("request.json.a == -9223372036854775808").fast is not None
    assert compile_condition("request.json.a == 9223372036854775807").fast is not None


# --- Differential: generated conditions against generated inputs, fast path against the library alone.

PATHS: list[Path] = [("request", "json", "a"), ("request", "json", "b"), ("request", "json", "n", "x"),
                     ("action", "resource"), ("agent", "mode")]
LITERALS: list[tuple[str, Any]] = [
    ("0", 0), ("1", 1), ("-1", -1), ("- 7", -7), ("4096", 4096), ("9223372036854775807", 2**63 - 1),
    ("-9223372036854775808", -(2**63)), ("0.0", 0.0), ("-0.0", -0.0), ("1.0", 1.0), ("1.5", 1.5),
    ("1e3", 1000.0), ("2.5E-3", 0.0025), ("4096.0", 4096.0), ('""', ""), ("''", ""), ('"a"', "a"), ("'a'", "a"),
    ('"gpt-4o-mini"', "gpt-4o-mini"), ("'é'", "é"), ('"z"', "z"), ("'\U0001f600'", "\U0001f600"),
    ('"a b"', "a b"), ("true", True), ("false", False), ("null", None),
]
SCALARS = [value for _, value in LITERALS]
KINDS = [int, float, str, bool, type(None)]
ODD_VALUES: list[Any] = [
    2**63, -(2**63) - 1, 2**64, 2**70, True, False, float("nan"), float("inf"), float("-inf"), "\ud800", "A",
    {"x": 1}, {}, [1, "a"], [], 1000, 0.1,
]
OPS = ["==", "!=", "<", "<=", ">", ">="]


class Generator:
    """Random conditions and inputs over PATHS. Each round gives every path a type that its literals and values
    mostly have, so that many cases are well-typed enough for the fast path to decide."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.kinds: dict[Path, type] = {}

    def new_round(self) -> None:
        self.kinds = {path: self.rng.choice(KINDS) for path in PATHS}

    def condition(self, depth: int) -> str:
        rng = self.rng
        roll = rng.random()
        if depth > 0 and roll < 0.35:
            return f"{self.condition(depth - 1)} {rng.choice(['&&', '||'])} {self.condition(depth - 1)}"
        if depth > 0 and roll < 0.45:
            return f"!({self.condition(depth - 1)})"
        if depth > 0 and roll < 0.5:
            return f"({self.condition(depth - 1)})"
        roll = rng.random()
        if roll < 0.55:
            return self._comparison(depth)
        if roll < 0.75:
            return f"{self._operand(depth)} in {self._list(self._kind())}"
        if roll < 0.88:
            return f"has({self._path(rng.choice(PATHS))})"
        if roll < 0.95:
            return self._path(rng.choice(PATHS))
        return rng.choice(["true", "false"])

    def input(self) -> dict[str, Any]:
        rng = self.rng
        root: dict[str, Any] = {"request": {"json": {}}, "action": {}, "agent": {}}
        for path in PATHS:
            roll = rng.random()
            if roll < 0.15:
                continue  # missing
            if roll < 0.7:
                value = self._value(self.kinds[path])
            else:
                value = rng.choice(SCALARS) if roll < 0.85 else rng.choice(ODD_VALUES)
            node = root
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        roll = rng.random()
        if roll < 0.03:
            root["request"]["json"] = [1, 2]  # a body that is not an object: every field of it is missing
        elif roll < 0.06:
            root["request"]["json"]["n"] = 5  # a field below a scalar is missing, never the scalar
        return root

    def _comparison(self, depth: int) -> str:
        rng = self.rng
        path = rng.choice(PATHS)
        roll = rng.random()
        if roll < 0.6:
            left, right = self._path(path), self._literal(self.kinds[path] if rng.random() < 0.8 else None)
        elif roll < 0.75:
            left, right = self._path(path), self._path(rng.choice(PATHS))
        else:
            left, right = self._operand(depth), self._operand(depth)
        if rng.random() < 0.3:
            left, right = right, left
        return f"{left} {rng.choice(OPS)} {right}"

    def _operand(self, depth: int) -> str:
        roll = self.rng.random()
        if roll < 0.6:
            return self._path(self.rng.choice(PATHS))
        if roll < 0.93 or depth <= 0:
            return self._literal(None)
        return f"({self.condition(depth - 1)})"

    def _kind(self) -> type | None:
        """The type of the left operand's path, mostly: the `in` operand is picked after its list."""
        return self.rng.choice(KINDS) if self.rng.random() < 0.8 else None

    def _list(self, kind: type | None) -> str:
        roll = self.rng.random()
        if roll < 0.1:
            items: list[str] = []
        elif roll < 0.85:  # one type: the fast path's lists
            items = [self._literal(kind) for _ in range(self.rng.randint(1, 4))]
        else:
            items = [self._literal(None) for _ in range(self.rng.randint(2, 4))]
        return "[" + ", ".join(items) + "]"

    def _literal(self, kind: type | None) -> str:
        return self.rng.choice([text for text, value in LITERALS if kind is None or type(value) is kind])

    def _value(self, kind: type) -> Any:
        return self.rng.choice([value for value in SCALARS if type(value) is kind])

    def _path(self, path: Path) -> str:
        return (" . " if self.rng.random() < 0.05 else ".").join(path)


@dataclass
class Tally:
    decided: int = 0
    fallen_back: int = 0
    outcomes: set[Any] = field(default_factory=set)


def _counting(fast: Callable[[Values], bool], tally: Tally) -> Callable[[Values], bool]:
    def counted(values: Values) -> bool:
        try:
            result = fast(values)
        except Fallback:
            tally.fallen_back += 1
            raise
        tally.decided += 1
        tally.outcomes.add(result)
        return result
    return counted


def _same(fast: tuple[bool | Exception, dict[str, Any]], library: tuple[bool | Exception, dict[str, Any]]) -> bool:
    (got, got_evidence), (want, want_evidence) = fast, library
    if list(got_evidence.items()) != list(want_evidence.items()):
        return False
    if isinstance(want, Exception):
        return type(got) is type(want) and str(got) == str(want)
    return got is want


def test_fast_path_matches_library_on_generated_conditions() -> None:
    generate = Generator(seed=20240611)
    tally = Tally()
    compiled = cases = 0
    for _ in range(700):
        generate.new_round()
        source = generate.condition(depth=generate.rng.randint(0, 3))
        condition = compile_condition(source)
        library = replace(condition, fast=None)
        if condition.fast is not None:
            compiled += 1
            condition = replace(condition, fast=_counting(condition.fast, tally))
        for _ in range(20):
            root = generate.input()
            fast_answer, library_answer = condition.evaluate(resolver(root)), library.evaluate(resolver(root))
            assert _same(fast_answer, library_answer), (source, root, fast_answer, library_answer)
            cases += 1
    # The comparison means something only if both paths were taken often, with both answers.
    assert cases == 14_000
    assert compiled > 500
    assert tally.decided > 4_000
    assert tally.fallen_back > 4_000
    assert tally.outcomes == {True, False}


def test_fast_path_matches_library_on_typical_shapes() -> None:
    rng = random.Random(7)
    fields = ["model", "max_tokens", "amount", "vendor", "currency", "stream", "delta"]
    values: list[Any] = [*SCALARS, "gpt-4o-mini", "b", "EUR", 5000, 5001, 100, 0.5, 0.4, 2**63, True, MISSING]
    for source in TYPICAL:
        condition = compile_condition(source)
        library = replace(condition, fast=None)
        for _ in range(300):
            body = {f: v for f in fields if (v := rng.choice(values)) is not MISSING}
            root = {"request": {"json": body}, "action": {"resource": rng.choice(["payments", "refunds", 1])},
                    "agent": {"mode": rng.choice(["enforce", "audit"])}}
            fast_answer, library_answer = condition.evaluate(resolver(root)), library.evaluate(resolver(root))
            assert _same(fast_answer, library_answer), (source, root, fast_answer, library_answer)


def test_condition_without_fast_path_keeps_library_only() -> None:
    condition = Condition("request.json.a == 1", RecordingProgram(answer=True), (("request", "json", "a"),))
    assert condition.fast is None
    assert condition.evaluate(resolver({"request": {"json": {"a": 1}}})) == (True, {"request.json.a": 1})
