"""Filter MCP `tools/list` answers down to the tools the calling agent may call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson


def _filter_message(message: Any, ids: tuple[Any, ...], keep: Callable[[str], bool]) -> Any:
    if isinstance(message, dict) and message.get("id") in ids and isinstance(message.get("result"), dict):
        tools = message["result"].get("tools")
        if isinstance(tools, list):
            message["result"]["tools"] = [t for t in tools if isinstance(t, dict) and keep(str(t.get("name")))]
    return message


def _filter_json(data: bytes, ids: tuple[Any, ...], keep: Callable[[str], bool]) -> bytes:
    payload = orjson.loads(data)
    if isinstance(payload, list):
        payload = [_filter_message(m, ids, keep) for m in payload]
    else:
        payload = _filter_message(payload, ids, keep)
    return orjson.dumps(payload)


def filter_tools(body: bytes, content_type: str, ids: tuple[Any, ...], keep: Callable[[str], bool]) -> bytes:
    """Rewrite a JSON or SSE (`data:` lines) JSON-RPC answer; other events pass unchanged.

    Raises orjson.JSONDecodeError on a JSON body that does not parse: the caller fails closed.
    """
    if not content_type.strip().lower().startswith("text/event-stream"):  # media types ignore case
        return _filter_json(body, ids, keep)
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip():
            line = b"data: " + _filter_json(line[5:], ids, keep)
        out.append(line)
    return b"\n".join(out)
