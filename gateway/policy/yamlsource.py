"""YAML with locations: every value keeps its file, line and column, `${VAR}` is expanded as it is read,
and typed reads of those values record a `RuleError` instead of raising, so one load reports every problem.

A plain (unquoted) scalar is typed after expansion, as if the value had been written there
(`tokens: ${DAILY_TOKENS:-200000}` is an integer); quote it to keep it a string.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar, cast

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from gateway.policy.spec import Loc, RuleError

Scalar = str | int | float | bool | None
T = TypeVar("T")

ROOT = "(root)"  # the path printed for an error about a whole file
_MAX_NODES = 100_000  # aliases can expand a small file into a huge tree ("billion laughs")
_VAR = re.compile(r"\$\{([^}]*)\}")
_VAR_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_UNIT_SECONDS = MappingProxyType({"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0})
_TYPED_TAGS = frozenset(
    {"tag:yaml.org,2002:null", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
)


@dataclass(frozen=True, slots=True)
class Node:
    """One YAML value: a scalar, a tuple of nodes (list) or a dict of nodes (mapping), with where it was written."""

    value: Scalar | tuple[Node, ...] | dict[str, Node]
    loc: Loc
    path: str  # e.g. `allow[2].verbs`; "" for the document itself
    key_locs: dict[str, Loc] = field(default_factory=dict)  # mappings: where each key was written


def child_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def did_you_mean(word: str, options: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, tuple) else "a mapping"


def parse_duration(text: str | int | float) -> float:
    """Seconds in `text`: a plain number of seconds, or units like `500ms`, `30s`, `15m`, `2h`, `1d`, `1h30m`."""
    if isinstance(text, bool):
        raise ValueError("a boolean is not a duration")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        spec = text.strip()
        if _PLAIN_NUMBER.fullmatch(spec):
            seconds = float(spec)
        elif _DURATION.fullmatch(spec):
            seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(spec))
        else:
            raise ValueError(f"bad duration '{text}'; use e.g. 30s, 15m, 2h, 1d or 500ms")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"bad duration '{text}'; must be a finite number of seconds, not negative")
    return seconds


class _Invalid(Exception):
    """A document that composed but cannot be turned into a tree (recursive or oversized aliases)."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class Reader:
    """Collects every error of one load, and reads typed values out of nodes."""

    def __init__(self) -> None:
        self.errors: list[RuleError] = []

    def mark(self) -> int:
        return len(self.errors)

    def failed_since(self, mark: int) -> bool:
        return len(self.errors) > mark

    def error(self, loc: Loc, code: str, path: str, message: str) -> None:
        # A value whose ${VAR} is unset already has its error; what it expanded to says nothing more.
        if any(e.code == "unset_variable" and (e.file, e.line, e.col) == (loc.file, loc.line, loc.col)
               for e in self.errors[-3:]):
            return
        self.errors.append(RuleError(loc.file, loc.line, loc.col, code, path or ROOT, message))

    def bad_value(self, node: Node, message: str) -> None:
        self.error(node.loc, "bad_value", node.path, message)

    def bad_type(self, node: Node, expected: str) -> None:
        hint = ""
        if expected == "a string" and isinstance(node.value, int | float):
            hint = "; quote it to make it a string"
        self.error(node.loc, "bad_type", node.path, f"expected {expected}, got {describe(node.value)}{hint}")

    # -- parsing -------------------------------------------------------------------------------------------

    def read(self, root: Path, rel: str, env: Mapping[str, str]) -> tuple[bytes | None, Node | None]:
        """Read and parse `root/rel`: its raw bytes (None if unreadable) and its tree (None if it does not parse)."""
        file = str(root / rel)
        try:
            raw = (root / rel).read_bytes()
        except FileNotFoundError:
            self.error(Loc(file, 1, 1), "missing_file", "", "file not found; a rules directory needs one")
            return None, None
        except OSError as exc:
            self.error(Loc(file, 1, 1), "missing_file", "", f"cannot read: {exc.strerror}")
            return None, None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            self.error(Loc(file, line, col), "yaml_error", "", "not valid UTF-8")
            return raw, None
        return raw, self.parse(text, file, env)

    def parse(self, text: str, file: str, env: Mapping[str, str]) -> Node | None:
        """Parse one document into a located tree; None (with a `yaml_error`) when it does not parse."""
        try:
            loader = yaml.SafeLoader(text)  # checks for unprintable characters right away
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            self.error(Loc(file, line, col), "yaml_error", "", f"unacceptable character #x{exc.character:04x}")
            return None
        try:
            root = loader.get_single_node()
            if root is None:
                return Node(None, Loc(file, 1, 1), "")
            return _Builder(self, loader, file, env).build(root, "", frozenset())
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
            message = exc.problem or str(exc)
            if exc.context:
                message = f"{message} ({exc.context})"
            self.error(Loc(file, line, col), "yaml_error", "", message)
        except _Invalid as exc:
            self.error(exc.loc, "yaml_error", "", exc.message)
        finally:
            loader.dispose()
        return None

    # -- typed reads: on a wrong value they record an error and return `default` ------------------------------

    def fields(self, node: Node, required: Sequence[str], optional: Sequence[str]) -> dict[str, Node] | None:
        """A mapping's entries, with unknown keys and missing required keys reported; null optionals dropped."""
        if not isinstance(node.value, dict):
            self.bad_type(node, "a mapping")
            return None
        known = (*required, *optional)
        for key, loc in node.key_locs.items():
            if key not in known:
                hint = did_you_mean(key, known) or "unknown key; expected one of: " + ", ".join(known)
                self.error(loc, "unknown_key", child_path(node.path, key), hint)
        for key in required:
            if key not in node.value:
                self.error(node.loc, "missing_key", child_path(node.path, key), f"missing required key '{key}'")
        return {k: v for k, v in node.value.items() if k in required or (k in known and v.value is not None)}

    def text(self, node: Node | None, default: T, *, empty: bool = False) -> str | T:
        if node is None:
            return default
        if not isinstance(node.value, str):
            self.bad_type(node, "a string")
            return default
        if not node.value and not empty:
            self.bad_value(node, "must not be empty")
            return default
        return node.value

    def choice(self, node: Node | None, options: Sequence[str], what: str, default: T) -> str | T:
        value = self.text(node, None)
        if node is None or value is None:
            return default
        if value not in options:
            hint = did_you_mean(value, options) or "expected one of: " + ", ".join(options)
            self.bad_value(node, f"unknown {what} '{value}'; {hint}")
            return default
        return value

    def flag(self, node: Node | None, default: bool) -> bool:
        if node is None:
            return default
        if not isinstance(node.value, bool):
            self.bad_type(node, "true or false")
            return default
        return node.value

    def count(self, node: Node | None, default: T) -> int | T:
        """A positive integer (a boolean is not an integer)."""
        if node is None:
            return default
        if isinstance(node.value, bool) or not isinstance(node.value, int):
            self.bad_type(node, "an integer")
            return default
        if node.value <= 0:
            self.bad_value(node, f"must be greater than 0, got {node.value}")
            return default
        return node.value

    def number(self, node: Node | None, default: T) -> float | T:
        """A finite number; range checks are the caller's."""
        if node is None:
            return default
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            self.bad_type(node, "a number")
            return default
        if not math.isfinite(node.value):
            self.bad_value(node, "must be a finite number")
            return default
        return float(node.value)

    def items(self, node: Node | None) -> tuple[Node, ...]:
        if node is None:
            return ()
        if not isinstance(node.value, tuple):
            self.bad_type(node, "a list")
            return ()
        return node.value

    def strings(self, node: Node | None, default: T) -> tuple[str, ...] | T:
        """A non-empty list of non-empty strings."""
        if node is None:
            return default
        if not isinstance(node.value, tuple):
            self.bad_type(node, "a list of strings")
            return default
        if not node.value:
            self.bad_value(node, "must not be empty")
            return default
        mark = self.mark()
        values = tuple(self.text(item, "") for item in node.value)
        return default if self.failed_since(mark) else values

    def duration(self, node: Node | None, default: T) -> float | T:
        """A positive duration (`parse_duration`)."""
        if node is None:
            return default
        if isinstance(node.value, bool) or not isinstance(node.value, str | int | float):
            self.bad_type(node, "a duration")
            return default
        try:
            seconds = parse_duration(node.value)
        except ValueError as exc:
            self.bad_value(node, str(exc))
            return default
        if seconds <= 0:
            self.bad_value(node, "must be greater than 0")
            return default
        return seconds

    def one_of(self, node: Node, fields: Mapping[str, Node], one: str, other: str, what: str) -> None:
        """Exactly one of two keys (a budget counts tokens or usd, a rate limit requests or tokens)."""
        if one in fields and other in fields:
            path = fields[other].path
            self.error(node.key_locs[other], "bad_value", path, f"{what} counts either {one} or {other}, not both")
        elif one not in fields and other not in fields:
            self.error(node.loc, "missing_key", node.path, f"{what} needs '{one}' or '{other}'")


class _Builder:
    """Turns composed PyYAML nodes into located `Node`s, expanding `${VAR}` in every string."""

    def __init__(self, reader: Reader, loader: yaml.SafeLoader, file: str, env: Mapping[str, str]) -> None:
        self.reader = reader
        self.loader = loader
        self.file = file
        self.env = env
        self.seen = 0

    def build(self, node: yaml.Node, path: str, ancestors: frozenset[int]) -> Node:
        loc = Loc(self.file, node.start_mark.line + 1, node.start_mark.column + 1)
        self.seen += 1
        if self.seen > _MAX_NODES:
            raise _Invalid(loc, f"document has more than {_MAX_NODES} values (aliases expanding too far?)")
        if isinstance(node, ScalarNode):
            return Node(self.scalar(node, loc, path), loc, path)
        if id(node) in ancestors:
            raise _Invalid(loc, "recursive alias")
        inner = ancestors | {id(node)}
        if isinstance(node, SequenceNode):
            items = tuple(self.build(item, child_path(path, i), inner) for i, item in enumerate(node.value))
            return Node(items, loc, path)
        assert isinstance(node, MappingNode)
        return self.mapping(node, loc, path, inner)

    def mapping(self, node: MappingNode, loc: Loc, path: str, ancestors: frozenset[int]) -> Node:
        written: dict[str, Loc] = {}
        for key_node, _ in node.value:
            key_loc = Loc(self.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, ScalarNode):
                raise _Invalid(key_loc, "mapping keys must be plain strings")
            key = str(key_node.value)
            if key in written:
                first = written[key]
                self.reader.error(
                    key_loc, "duplicate_key", child_path(path, key), f"key already set at line {first.line}"
                )
            written[key] = key_loc
        self.loader.flatten_mapping(node)  # `<<: *defaults` merges; keys written here come last and win
        values: dict[str, Node] = {}
        key_locs: dict[str, Loc] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            values[key] = self.build(value_node, child_path(path, key), ancestors)
            key_locs[key] = Loc(self.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return Node(values, loc, path, key_locs)

    def scalar(self, node: ScalarNode, loc: Loc, path: str) -> Scalar:
        if node.tag in _TYPED_TAGS:
            return self.construct(node)
        text = str(node.value)
        if "${" not in text:
            return text
        expanded = _VAR.sub(lambda match: self.variable(match, loc, path), text)
        if node.style is None and expanded != text:
            tag = self.loader.resolve(ScalarNode, expanded, (True, False))  # type: ignore[no-untyped-call]
            if tag in _TYPED_TAGS:
                return self.construct(ScalarNode(tag, expanded, node.start_mark, node.end_mark))
        return expanded

    def construct(self, node: ScalarNode) -> Scalar:
        try:
            return cast(Scalar, self.loader.construct_object(node))
        except (ValueError, KeyError) as exc:  # e.g. `!!int abc`, `!!bool maybe`
            loc = Loc(self.file, node.start_mark.line + 1, node.start_mark.column + 1)
            raise _Invalid(loc, f"not a valid {node.tag.rsplit(':', 1)[-1]}: {node.value!r}") from exc

    def variable(self, match: re.Match[str], loc: Loc, path: str) -> str:
        body = _VAR_BODY.fullmatch(match.group(1))
        if body is None:
            self.reader.error(
                loc,
                "bad_value",
                path,
                f"bad variable reference '{match.group(0)}'; use ${{NAME}} or ${{NAME:-default}}",
            )
            return match.group(0)
        name, default = body.group(1), body.group(2)
        if default is not None:  # membership, not .get(): an env mapping may answer .get() with a placeholder
            return (self.env[name] if name in self.env else "") or default  # noqa: SIM401
        value = self.env.get(name)
        if value is None:
            self.reader.error(loc, "unset_variable", path, f"${{{name}}} is not set")
            return ""
        return value
