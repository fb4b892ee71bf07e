"""capture: the redacted request record a call's trace keeps, so `replay` can re-decide it under other rules.

A `Capturer` is compiled once per agent from its `capture:` spec and the fields its conditions read; `record`
then copies only those fields (plus what the classifiers need) out of each request, redacting credentials,
secret-looking keys and values, and the agent's `sensitive` paths. `record["kept"]` lists what was kept, so
replay can tell a field the request did not have from one the record did not keep.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from .errors import GatewayError
from .incoming import CREDENTIAL_HEADERS, Incoming
from .policy.conditions import Condition, Path
from .policy.reads import header_names, json_paths, referenced_json_paths
from .policy.spec import CaptureSpec

if TYPE_CHECKING:
    from .policy.compile import AgentPolicy

__all__ = ["REDACTED", "Capturer", "capture_record", "referenced_json_paths", "secret_key", "secret_value"]

REDACTED = "<redacted>"
TRUNCATED = "<truncated>"

# Body fields the classifiers read: kept in every mode but `none` (`kept` then lists "classifier").
# OpenAI/Anthropic: the model, streaming and the output cap; never the prompt.
LLM_FIELDS: tuple[Path, ...] = (("model",), ("stream",), ("max_tokens",), ("max_completion_tokens",),
                                ("max_output_tokens",))
# MCP JSON-RPC: the envelope and what names the tool/resource/prompt. `result`/`error` only mark a client's
# reply to the server (their content is redacted).
MCP_FIELDS: tuple[Path, ...] = (("jsonrpc",), ("method",), ("id",), ("params", "name"), ("params", "uri"))
MCP_MARKERS = ("result", "error")
CLASSIFIER_FIELDS: frozenset[Path] = frozenset((*LLM_FIELDS, *MCP_FIELDS))
# What `action.estimated_tokens` is computed from: a condition reading it needs the prompt itself.
PROMPT_FIELDS: tuple[Path, ...] = (("messages",), ("prompt",), ("input",), ("instructions",), ("system",))

_SECRET_WORDS = frozenset({"password", "passwd", "secret", "secrets", "token", "apikey", "authorization", "auth",
                           "credential", "credentials", "ssn", "cvv", "cookie"})
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("card", "number")})
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_WORD = re.compile(r"[a-z0-9]+")
# Values that are credentials whatever their key: JWTs, bearer/basic credentials, well-known API key shapes.
_SECRET_VALUE = re.compile(r"(?:eyJ[\w-]{6,}\.[\w-]{6,}\.|(?:bearer|basic)\s+\S|(?:sk|rk|pk)-[\w-]{16,}"
                           r"|gh[pousr]_\w{20,}|github_pat_|xox[abprs]-|AKIA[0-9A-Z]{16})", re.IGNORECASE)
_MAX_DEPTH = 64
_KEY_CACHE_LIMIT = 4096
_MISSING: Any = object()


def secret_key(key: str) -> bool:
    """`access_token`, `apiKey`, `X-Api-Key`, `client_secret`...; not `max_tokens` or `author`."""
    words = _WORD.findall(_CAMEL.sub(r"\1_\2", key).lower())
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in pairwise(words))


def secret_value(value: str) -> bool:
    return _SECRET_VALUE.match(value) is not None


_NO_HEADERS: Mapping[str, str] = {}


class _Node:
    """One key of the projection tree: keep its whole value, redact it, or descend into `wanted` children."""

    __slots__ = ("children", "keep", "redact", "wanted")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.keep = False
        self.redact = False
        self.wanted: tuple[tuple[str, _Node], ...] = ()

    def add(self, path: Path) -> _Node:
        node = self
        for key in path:
            node = node.children.setdefault(key, _Node())
        return node

    def seal(self) -> bool:
        """Fix `wanted` (children on the way to something kept); returns whether this node is wanted."""
        for key, child in self.children.items():
            if secret_key(key):
                child.redact = True
        self.wanted = tuple((k, c) for k, c in self.children.items() if c.seal())
        return self.keep or bool(self.wanted)


class Capturer:
    """One agent's capture plan, compiled once; `record` runs once per decided call."""

    __slots__ = ("_headers", "_kept", "_kept_no_body", "_key_cache", "_mode", "_root", "_sensitive_headers",
                 "_sensitive_query", "_wants_body")

    def __init__(self, capture: CaptureSpec, referenced: frozenset[Path] = frozenset(),
                 headers: frozenset[str] | None = frozenset()) -> None:
        """`referenced`: body paths the agent's conditions read; `headers`: header names they read (None: all)."""
        self._key_cache: dict[str, bool] = {}
        root = _Node()
        mode = capture.json
        kept_json: list[str]
        paths: frozenset[Path] = frozenset()
        if mode == "referenced":
            paths = referenced
        elif mode not in ("all", "none"):
            paths = frozenset(_dotted(p) for p in mode)
        if mode == "none":
            kept_json = []
        elif mode == "all" or () in paths:
            root.keep = True
            kept_json = ["json"]
        else:
            for path in (*LLM_FIELDS, *MCP_FIELDS, *sorted(paths)):
                root.add(path).keep = True
            for marker in MCP_MARKERS:
                node = root.add((marker,))
                node.keep = node.redact = True
            kept_json = ["classifier", *sorted("json." + ".".join(p) for p in paths)]
        self._sensitive_headers: frozenset[str] = frozenset()
        self._sensitive_query: frozenset[str] = frozenset()
        for dotted in capture.sensitive:
            where, path = _sensitive_target(dotted)
            if where == "headers":
                self._sensitive_headers |= {path[0].lower()}
            elif where == "query":
                self._sensitive_query |= {path[0]}
            else:
                root.add(path).redact = True
        root.seal()
        self._root = root
        self._mode = mode
        self._wants_body = mode != "none" and (mode != "referenced" or bool(paths))
        self._headers = None if headers is None else tuple(sorted(h.lower() for h in headers))
        kept_headers = ["headers"] if headers is None else [f"headers.{h}" for h in sorted(headers)]
        self._kept = (*kept_json, *kept_headers)
        self._kept_no_body = tuple(kept_headers)

    @classmethod
    def from_conditions(cls, capture: CaptureSpec, conditions: Iterable[Condition]) -> Capturer:
        """Built at policy compile time from the agent's compiled conditions."""
        listed = tuple(conditions)
        return cls(capture, json_paths(listed), header_names(listed))

    @classmethod
    def for_agent(cls, agent: AgentPolicy) -> Capturer:
        return cls.from_conditions(agent.spec.capture,
                                   (r.condition for r in agent.rules.values() if r.condition is not None))

    def record_incoming(self, path: str, incoming: Incoming) -> dict[str, Any]:
        """The record of a request as the pipeline holds it (`path`: the full normalised path). Never raises:
        a body that is not JSON is recorded as such, and one no one parsed and nothing needs is left alone."""
        # The rules' view of the headers is built only if some are recorded (none, when no condition reads one).
        headers = incoming.rule_headers() if self._headers != () else _NO_HEADERS
        if self._mode == "none" or (not self._wants_body and not incoming.json_parsed()):
            return self._build(incoming.method, path, incoming.query, headers, None, self._kept_no_body)
        try:
            body = incoming.json()
        except GatewayError:
            record = self._build(incoming.method, path, incoming.query, headers, None, self._kept)
            record["json_invalid"] = True
            return record
        return self.record(incoming.method, path, incoming.query, headers, body)

    def record(self, method: str, path: str, query: str, headers: Mapping[str, str], body_json: Any) -> dict[str, Any]:
        """`{method, path, query, headers, json, kept}`; `path` is the full normalised path, upstream included."""
        return self._build(method, path, query, headers, body_json, self._kept)

    def _build(self, method: str, path: str, query: str, headers: Mapping[str, str], body: Any,
               kept: tuple[str, ...]) -> dict[str, Any]:
        return {"method": method, "path": path, "query": self._query(query) if query else "",
                "headers": self._pick_headers(headers), "json": self._json(body), "kept": list(kept)}

    def _json(self, body: Any) -> Any:
        if body is None or self._mode == "none":
            return None
        root = self._root
        if root.keep:
            return self._scrub(body, root, 0)
        if isinstance(body, dict):
            return self._project(root, body, 0)
        if isinstance(body, list):  # a JSON-RPC batch: each element as its own request
            return [self._project(root, e, 0) if isinstance(e, dict) else None for e in body]
        return None

    def _project(self, node: _Node, value: dict[str, Any], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, child in node.wanted:
            item = value.get(key, _MISSING)
            if item is _MISSING:
                continue
            if child.redact:
                out[key] = REDACTED
            elif child.keep:
                out[key] = self._scrub(item, child, depth + 1)
            elif isinstance(item, dict):
                out[key] = self._project(child, item, depth + 1)
            elif isinstance(item, list):
                out[key] = [self._project(child, e, depth + 2) if isinstance(e, dict) else None for e in item]
            # A scalar where the path goes on: the path is absent, and so is the scalar.
        return out

    def _scrub(self, value: Any, node: _Node | None, depth: int) -> Any:
        """`value` with secrets redacted, copied only where something changed."""
        if isinstance(value, str):
            return REDACTED if _SECRET_VALUE.match(value) else value
        if depth > _MAX_DEPTH:
            return TRUNCATED if isinstance(value, dict | list) else value
        if isinstance(value, dict):
            children = node.children if node is not None else {}
            out: dict[str, Any] | None = None
            for key, item in value.items():
                child = children.get(key)
                if (child is not None and child.redact) or self._secret_key(key):
                    new: Any = REDACTED
                elif isinstance(item, str | dict | list):
                    new = self._scrub(item, child, depth + 1)
                else:
                    continue
                if new is not item:
                    if out is None:
                        out = dict(value)
                    out[key] = new
            return value if out is None else out
        if isinstance(value, list):
            copied: list[Any] | None = None
            for i, item in enumerate(value):
                if isinstance(item, str | dict | list):
                    new = self._scrub(item, node, depth + 1)
                    if new is not item:
                        if copied is None:
                            copied = list(value)
                        copied[i] = new
            return value if copied is None else copied
        return value

    def _secret_key(self, key: str) -> bool:
        found = self._key_cache.get(key)
        if found is None:
            if len(self._key_cache) >= _KEY_CACHE_LIMIT:
                self._key_cache.clear()
            found = self._key_cache[key] = secret_key(key)
        return found

    def _pick_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        if self._headers == ():
            return {}
        if self._headers is not None:
            picked = ((name, headers.get(name)) for name in self._headers)
        else:
            picked = ((name.lower(), value) for name, value in headers.items())
        out: dict[str, str] = {}
        for name, value in picked:
            if value is None or name in CREDENTIAL_HEADERS or name in out:
                continue
            secret = name in self._sensitive_headers or self._secret_key(name) or secret_value(value)
            out[name] = REDACTED if secret else value
        return out

    def _query(self, query: str) -> str:
        parts = query.split("&")
        changed = False
        for i, part in enumerate(parts):
            name, _, value = part.partition("=")
            if not value:
                continue
            key = unquote_plus(name) if "%" in name or "+" in name else name
            if (key in self._sensitive_query or self._secret_key(key)
                    or secret_value(unquote_plus(value) if "%" in value or "+" in value else value)):
                parts[i] = f"{name}=%3Credacted%3E"
                changed = True
        return "&".join(parts) if changed else query


def capture_record(capture: CaptureSpec, referenced: frozenset[Path], method: str, path: str, query: str,
                   headers: Mapping[str, str], body_json: Any, *,
                   header_names: frozenset[str] | None = frozenset()) -> dict[str, Any]:
    """One-off form of `Capturer(...).record(...)`; the gateway compiles a `Capturer` per agent instead."""
    return Capturer(capture, referenced, header_names).record(method, path, query, headers, body_json)


def _dotted(text: str) -> Path:
    parts = tuple(p for p in text.split(".") if p)
    return parts[2:] if parts[:2] == ("request", "json") else parts


def _sensitive_target(text: str) -> tuple[str, Path]:
    """`amount` or `request.json.amount` (body), `request.headers.x-tenant`, `request.query.account`."""
    parts = tuple(p for p in text.split(".") if p)
    if parts[:1] == ("request",) and len(parts) >= 3 and parts[1] in ("headers", "query"):
        return parts[1], (".".join(parts[2:]),)
    return "json", _dotted(text)
