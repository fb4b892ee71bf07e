"""Which request fields an agent's conditions read: body paths and header names. Capture keeps exactly these
(plus what the classifiers need); replay checks a record holds them before trusting a decision made on it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .conditions import Condition, Path

if TYPE_CHECKING:
    from .compile import AgentPolicy

_HEADER_READ = re.compile(r"(?<![\w.])request\s*\.\s*headers\b")
_HEADER_INDEX = re.compile(r"(?<![\w.])request\s*\.\s*headers\s*\[\s*(['\"])([^'\"]*)\1\s*\]")


def json_paths(conditions: Iterable[Condition]) -> frozenset[Path]:
    """Body paths (below `request.json`, per JSON-RPC element) the conditions read; `()` is the whole body.
    `action.attributes.arguments.*` is an MCP tool call's `params.arguments.*`."""
    found: set[Path] = set()
    for condition in conditions:
        for path in condition.paths:
            if path[:2] == ("request", "json"):
                found.add(path[2:])
            elif path == ("request",):
                found.add(())
            elif path[:3] == ("action", "attributes", "arguments"):
                found.add(("params", "arguments", *path[3:]))
            elif path in (("action",), ("action", "attributes")):
                found.add(("params", "arguments"))
    return frozenset(found)


def header_reads(condition: Condition) -> frozenset[str] | None:
    """Header names a condition reads (lower-cased), or None when it reads the headers as a whole
    (`"x" in request.headers`, `request.headers.map(...)`)."""
    names: set[str] = set()
    for path in condition.paths:
        if path == ("request",):
            return None
        if path[:2] == ("request", "headers"):
            if len(path) > 2:
                names.add(path[2].lower())
                continue
            # `request.headers["x-tenant"]` reads one header, though its path stops at `request.headers`.
            indexed = [m.group(2).lower() for m in _HEADER_INDEX.finditer(condition.source)]
            if len(indexed) != len(_HEADER_READ.findall(condition.source)):
                return None
            names.update(indexed)
    return frozenset(names)


def header_names(conditions: Iterable[Condition]) -> frozenset[str] | None:
    names: set[str] = set()
    for condition in conditions:
        read = header_reads(condition)
        if read is None:
            return None
        names |= read
    return frozenset(names)


def referenced_json_paths(agent: AgentPolicy) -> frozenset[Path]:
    """The body paths the agent's compiled conditions read, e.g. ("amount",), ("params", "arguments", "to")."""
    return json_paths(r.condition for r in agent.rules.values() if r.condition is not None)
