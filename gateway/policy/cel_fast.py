"""A strict subset of CEL compiled to Python closures: the per-request fast path of rule conditions.

The closures decide only the cases whose CEL answer is certain (same-typed scalars, null equality) and raise
`Fallback` for any other, so the caller evaluates those with the CEL library: the two never answer differently.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Path = tuple[str, ...]
Values = Sequence[Any]  # the condition's path values, in the order of its `paths`
FastProgram = Callable[[Values], bool]
_Fn = Callable[[Values], Any]
Scalar = int | float | str | bool | None

_ROOTS = frozenset({"agent", "action", "request"})
# CEL's reserved words cannot name a field; the library rejects them, and so does the subset.
_RESERVED = frozenset({
    "as", "break", "const", "continue", "else", "false", "for", "function", "if", "import", "in", "let", "loop",
    "namespace", "null", "package", "return", "true", "var", "void", "while"})
_INT64 = (-(2**63), 2**63 - 1)
_TOKEN = re.compile(r"""[ \t\n\r\f]*(?:
    (?P<double>(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+))
  | (?P<int>0|[1-9][0-9]*)
  | (?P<string>"[^"\\\n\r]*"|'[^'\\\n\r]*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>==|!=|<=|>=|&&|\|\||[<>!()\[\],.-])
)""", re.VERBOSE)
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_RELATIONS = frozenset({"==", "!=", "<", "<=", ">", ">=", "in"})
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_MIRROR = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
# Same-typed operands on which Python's operators give CEL's answers (NaN never gets here: see `_program`).
_ORDERED = frozenset({int, float, str})
_EQUATABLE = _ORDERED | {bool, type(None)}


class Fallback(Exception):
    """The fast path cannot be sure of the library's answer: the caller evaluates with the library."""


class _Unsupported(Exception):
    """The source is outside the subset: the condition has no fast path."""


@dataclass(frozen=True, slots=True)
class Lit:
    value: Scalar


@dataclass(frozen=True, slots=True)
class Ref:
    path: Path


@dataclass(frozen=True, slots=True)
class Has:
    path: Path


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class Logic:
    op: str  # "&&" or "||"
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class In:
    left: Node
    items: tuple[Scalar, ...]


Node = Lit | Ref | Has | Not | Logic | Compare | In


def compile_fast(source: str, paths: tuple[Path, ...], missing: object) -> FastProgram | None:
    """The condition as closures over its path values (`missing` for an absent one), or None outside the subset.

    The closures' paths must be exactly `paths`: the library is given (and converts) every one of them."""
    try:
        tree = parse(source)
        if set(_paths(tree)) != set(paths):
            return None
        return _program(_boolean(tree, {p: i for i, p in enumerate(paths)}, missing), missing)
    except _Unsupported:
        return None


def parse(source: str) -> Node:
    """The subset's syntax tree of `source`; raises `_Unsupported` for anything outside the subset."""
    return _Parser(_tokens(source)).expression()


def _tokens(source: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None or match.lastgroup is None:
            if source[pos:].strip(" \t\n\r\f"):
                raise _Unsupported(source[pos:])
            break
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        pos = match.end()
    return tokens


class _Parser:
    """Recursive descent with CEL's precedence: `||` < `&&` < relations < unary; no relation chains."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def expression(self) -> Node:
        node = self._or()
        if self.pos != len(self.tokens):
            raise _Unsupported(self.tokens[self.pos][1])
        return node

    def _peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def _take(self, kind: str | None = None, text: str | None = None) -> str:
        if self.pos >= len(self.tokens):
            raise _Unsupported("end of source")
        got_kind, got_text = self.tokens[self.pos]
        if (kind is not None and got_kind != kind) or (text is not None and got_text != text):
            raise _Unsupported(got_text)
        self.pos += 1
        return got_text

    def _or(self) -> Node:
        node = self._and()
        while self._peek() == "||":
            self.pos += 1
            node = Logic("||", node, self._and())
        return node

    def _and(self) -> Node:
        node = self._relation()
        while self._peek() == "&&":
            self.pos += 1
            node = Logic("&&", node, self._relation())
        return node

    def _relation(self) -> Node:
        left = self._unary()
        op = self._peek()
        if op not in _RELATIONS:
            return left
        self.pos += 1
        if op == "in":
            return In(left, self._list())
        return Compare(op, left, self._unary())

    def _unary(self) -> Node:
        if self._peek() == "!":
            self.pos += 1
            return Not(self._unary())
        if self._peek() == "-":  # only a negative number literal: no arithmetic
            self.pos += 1
            return Lit(self._number(negative=True))
        return self._primary()

    def _primary(self) -> Node:
        kind, text = self.tokens[self.pos] if self.pos < len(self.tokens) else ("", "")
        if kind in ("int", "double"):
            return Lit(self._number(negative=False))
        if kind == "string":
            self.pos += 1
            return Lit(text[1:-1])
        if text == "(":
            self.pos += 1
            node = self._or()
            self._take(text=")")
            return node
        if kind != "name":
            raise _Unsupported(text or "end of source")
        self.pos += 1
        literal = {"true": True, "false": False, "null": None}
        if text in literal:
            return Lit(literal[text])
        if text == "has":
            self._take(text="(")
            path = self._path(self._take("name"))
            self._take(text=")")
            if len(path) < 2:  # `has()` takes a field selection
                raise _Unsupported(text)
            return Has(path)
        return Ref(self._path(text))

    def _path(self, root: str) -> Path:
        if root not in _ROOTS:
            raise _Unsupported(root)
        path = [root]
        while self._peek() == ".":
            self.pos += 1
            name = self._take("name")
            if name in _RESERVED:
                raise _Unsupported(name)
            path.append(name)
        if self._peek() in ("(", "["):  # a method call or an index
            raise _Unsupported(self._peek())
        return tuple(path)

    def _number(self, negative: bool) -> int | float:
        kind, text = self.tokens[self.pos] if self.pos < len(self.tokens) else ("", "")
        self.pos += 1
        if kind == "int":
            value = -int(text) if negative else int(text)
            if not _INT64[0] <= value <= _INT64[1]:
                raise _Unsupported(text)
            return value
        if kind == "double":
            number = -float(text) if negative else float(text)
            if number != number or number in (float("inf"), float("-inf")):
                raise _Unsupported(text)
            return number
        raise _Unsupported(text or "end of source")

    def _list(self) -> tuple[Scalar, ...]:
        """A list literal of literals of one type (`in` against mixed types is the library's)."""
        self._take(text="[")
        items: list[Scalar] = []
        while self._peek() != "]":
            if items:
                self._take(text=",")
            node = self._unary()
            if not isinstance(node, Lit):
                raise _Unsupported("list element")
            items.append(node.value)
        self.pos += 1
        if len({type(item) for item in items}) > 1:
            raise _Unsupported("mixed list")
        return tuple(items)


def _paths(node: Node) -> list[Path]:
    if isinstance(node, (Ref, Has)):
        return [node.path]
    if isinstance(node, Not):
        return _paths(node.operand)
    if isinstance(node, (Logic, Compare)):
        return _paths(node.left) + _paths(node.right)
    if isinstance(node, In):
        return _paths(node.left)
    return []


def _program(root: _Fn, missing: object) -> FastProgram:
    low, high = _INT64

    def program(values: Values) -> bool:
        # Every value must be one the library converts to the CEL value Python's operators model: it converts
        # the whole context before evaluating, so one it would reject falls back even where it goes unread.
        for value in values:
            kind = type(value)
            if kind is str:
                if not value.isascii() and _SURROGATE.search(value):  # a lone surrogate fails conversion
                    raise Fallback
            elif kind is int:
                if not low <= value <= high:  # beyond int64 the library changes the value's type
                    raise Fallback
            elif kind is float:
                if value != value:  # NaN: CEL's ordering of it is an error, not False
                    raise Fallback
            elif kind is not bool and value is not None and value is not missing:
                raise Fallback
        result: bool = root(values)
        return result
    return program


def _boolean(node: Node, index: dict[Path, int], missing: object) -> _Fn:
    """A closure returning a bool: a path whose value is not a bool falls back (CEL's `&&`, `!` error on it)."""
    if isinstance(node, Lit):
        if type(node.value) is not bool:
            raise _Unsupported("non-bool literal as a condition")
        constant = node.value
        return lambda values: constant
    if isinstance(node, Ref):
        at = index[node.path]

        def ref(values: Values) -> bool:
            value = values[at]
            if type(value) is bool:
                return value
            raise Fallback
        return ref
    if isinstance(node, Has):
        at = index[node.path]
        return lambda values: values[at] is not missing
    if isinstance(node, Not):
        operand = _boolean(node.operand, index, missing)
        return lambda values: not operand(values)
    if isinstance(node, Logic):
        # CEL's `false && x` is false and `true || x` is true whatever x is (even an error), so short-circuiting
        # is exact; a left operand that falls back makes the whole condition fall back.
        left, right = _boolean(node.left, index, missing), _boolean(node.right, index, missing)
        if node.op == "&&":
            return lambda values: left(values) and right(values)
        return lambda values: left(values) or right(values)
    if isinstance(node, In):
        return _membership(node, index, missing)
    return _comparison(node, index, missing)


def _value(node: Node, index: dict[Path, int], missing: object) -> _Fn:
    """A closure returning the operand's value: a scalar, a bool, or `missing`."""
    if isinstance(node, Lit):
        constant = node.value
        return lambda values: constant
    if isinstance(node, Ref):
        return operator.itemgetter(index[node.path])
    return _boolean(node, index, missing)


def _membership(node: In, index: dict[Path, int], missing: object) -> _Fn:
    left = _value(node.left, index, missing)
    if not node.items:
        def empty(values: Values) -> bool:
            if left(values) is missing:
                raise Fallback
            return False
        return empty
    kind, members = type(node.items[0]), frozenset(node.items)

    def member(values: Values) -> bool:
        value = left(values)
        if type(value) is kind:  # `type(..) is`: True is not the int 1 in CEL
            return value in members
        raise Fallback
    return member


def _comparison(node: Compare, index: dict[Path, int], missing: object) -> _Fn:
    op, equality = node.op, node.op in ("==", "!=")
    if isinstance(node.left, Ref) and isinstance(node.right, Lit):
        return _against_literal(op, index[node.left.path], node.right.value, missing)
    if isinstance(node.left, Lit) and isinstance(node.right, Ref):
        return _against_literal(_MIRROR[op], index[node.right.path], node.left.value, missing)
    left, right, compare = _value(node.left, index, missing), _value(node.right, index, missing), _OPS[op]

    def generic(values: Values) -> bool:
        a, b = left(values), right(values)
        kind = type(a)
        if kind is type(b) and (kind in _ORDERED or (equality and kind in _EQUATABLE)):
            return compare(a, b)
        if equality and (a is None) != (b is None) and a is not missing and b is not missing:
            return op == "!="  # null against any other (admissible) value: unequal
        raise Fallback
    return generic


def _against_literal(op: str, at: int, constant: Scalar, missing: object) -> _Fn:
    """`path <op> literal`, the common shape, without a call per operand."""
    kind, compare, equality = type(constant), _OPS[op], op in ("==", "!=")
    if not equality and kind not in _ORDERED:
        raise _Unsupported(f"ordering of {kind.__name__}")
    if constant is None:
        def null(values: Values) -> bool:
            value = values[at]
            if value is missing:
                raise Fallback
            return (value is None) == (op == "==")
        return null

    def literal(values: Values) -> bool:
        value = values[at]
        if type(value) is kind:
            return compare(value, constant)
        if equality and value is None:
            return op == "!="
        raise Fallback
    return literal
