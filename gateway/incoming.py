"""The agent's request as the gateway read it: bytes, normalised path, and JSON parsed at most once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from multidict import CIMultiDictProxy

from .errors import bad_request

# Headers that carry the agent's credential: never shown to rules, never forwarded, never traced.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "proxy-authorization", "cookie"})

_UNPARSED: Any = object()


class Incoming:
    """One request after routing: `path` is the normalised path below the upstream, `body` the full bytes."""

    __slots__ = ("_headers_view", "_json", "body", "headers", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: str, headers: CIMultiDictProxy[str], body: bytes
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self._json: Any = _UNPARSED
        self._headers_view: dict[str, str] | None = None

    def json(self) -> Any:
        """The body parsed as JSON (None when empty), parsed once; malformed JSON is `bad_request`."""
        if self._json is _UNPARSED:
            if not self.body.strip():
                self._json = None
            else:
                try:
                    self._json = orjson.loads(self.body)
                except orjson.JSONDecodeError as exc:
                    raise bad_request(f"request body is not valid JSON: {exc.msg} at {exc.pos}") from exc
        return self._json

    def json_parsed(self) -> bool:
        """Whether `json()` has run already (so reading it again costs nothing)."""
        return self._json is not _UNPARSED

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object, or `bad_request` naming what was wrong."""
        value = self.json()
        if not isinstance(value, dict):
            raise bad_request("request body must be a JSON object")
        return value

    def rule_headers(self) -> Mapping[str, str]:
        """Headers as rules see them: lower-cased names, credentials removed (first value wins)."""
        if self._headers_view is None:
            view: dict[str, str] = {}
            for name, value in self.headers.items():
                key = name.lower()
                if key not in CREDENTIAL_HEADERS and key not in view:
                    view[key] = value
            self._headers_view = view
        return self._headers_view
