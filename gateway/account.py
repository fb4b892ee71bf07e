"""account: read the real token usage out of a response as it streams past, and price it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .policy.spec import PriceSpec

# A JSON body is copied aside (up to this size) while it streams to the agent, to read `usage` at the end.
MAX_JSON_COPY = 8 * 2**20


@dataclass(slots=True)
class Usage:
    input: int = 0
    output: int = 0

    def merge(self, usage: Mapping[str, Any]) -> None:
        # OpenAI chat uses prompt/completion; Responses and Anthropic use input/output. Anthropic streams
        # report input in message_start and output in message_delta, so keep the largest of each.
        for key in ("prompt_tokens", "input_tokens"):
            value = usage.get(key)
            if isinstance(value, int):
                self.input = max(self.input, value)
        for key in ("completion_tokens", "output_tokens"):
            value = usage.get(key)
            if isinstance(value, int):
                self.output = max(self.output, value)


def _usage_in(obj: Any) -> Mapping[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    for holder in (obj, obj.get("message"), obj.get("response")):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            usage: Mapping[str, Any] = holder["usage"]
            return usage
    return None


class UsageMeter:
    """Fed every response chunk; finds `usage` in a JSON body or in SSE `data:` events."""

    def __init__(self, content_type: str) -> None:
        content_type = content_type.strip().lower()  # media types are case-insensitive (RFC 9110 8.3.1)
        self.sse = content_type.startswith("text/event-stream")
        self.json = content_type.startswith("application/json")
        self.usage: Usage | None = None
        self._line = b""  # SSE: the unfinished last line
        self._buffer = bytearray()  # JSON: the body so far
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        if self.sse:
            data = self._line + chunk if self._line else chunk
            end = data.rfind(b"\n") + 1  # the complete lines end here; the rest waits for the next chunk
            self._line = data[end:]
            # Only the complete lines that mention usage are looked at (most chunks have none).
            at = data.find(b'"usage"', 0, end)
            while at != -1:
                start = data.rfind(b"\n", 0, at) + 1
                stop = data.index(b"\n", at)
                if data.startswith(b"data:", start):
                    self._take(data[start + 5:stop])
                at = data.find(b'"usage"', stop, end)
        elif self.json and not self._overflow:
            self._buffer += chunk
            if len(self._buffer) > MAX_JSON_COPY:
                self._overflow = True
                self._buffer = bytearray()

    def finish(self) -> Usage | None:
        if self.sse and self._line.startswith(b"data:"):
            self._take(self._line[5:])
        elif self.json and self._buffer:
            self._take(bytes(self._buffer))
        self._line = b""
        self._buffer = bytearray()
        return self.usage

    def _take(self, data: bytes | bytearray) -> None:
        try:
            usage = _usage_in(orjson.loads(data))
        except orjson.JSONDecodeError:
            return
        if usage is not None:
            if self.usage is None:
                self.usage = Usage()
            self.usage.merge(usage)


def cost_usd(prices: Mapping[str, PriceSpec], model: str | None, usage: Usage) -> float | None:
    price = prices.get(model or "")
    if price is None:
        return None
    return round((usage.input * price.input_per_mtok + usage.output * price.output_per_mtok) / 1e6, 8)


# An SSE event ends at a blank line, and SSE lines may end in CRLF, LF or CR (sse-starlette, behind many
# OpenAI-compatible servers, sends CRLF).
_EVENT_END = re.compile(rb"(\r\n\r\n|\n\n|\r\r)")
_WHOLE_EVENTS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class UsageChunkFilter:
    """Drops the usage-only SSE event (`choices: []` with `usage`) from an OpenAI stream: the gateway asked
    for it to settle budgets, and passes it on only if the agent asked for it itself. Events are passed on
    whole, as soon as each is complete."""

    def __init__(self) -> None:
        self._buffer = b""  # an unfinished event

    def feed(self, chunk: bytes) -> bytes:
        if self._buffer:
            data = self._buffer + chunk
            at = data.find(b'"usage"')
        else:
            data = chunk
            at = chunk.find(b'"usage"')
            if at == -1 and chunk.endswith(_WHOLE_EVENTS):
                return chunk  # whole events only, none of them usage: passed on as they are, unsplit
        if b"\r" in data:
            return self._split(data)
        # LF only: events are found around where usage is mentioned, not by splitting them all, and the bytes
        # between usage-only events pass on as they are.
        whole = _event_start(data, len(data))
        self._buffer = data[whole:]
        if not -1 < at < whole:
            return data[:whole]
        kept: list[bytes] = []
        done = 0
        while at != -1:
            start = _event_start(data, at)
            end = data.index(b"\n\n", at) + 2
            if _usage_only(data[start:end - 2]):
                kept.append(data[done:start])
                done = end
            at = data.find(b'"usage"', end, whole)
        kept.append(data[done:whole])
        return b"".join(kept)

    def _split(self, data: bytes) -> bytes:
        parts = _EVENT_END.split(data)  # event, separator, event, separator, ..., the incomplete rest
        self._buffer = parts[-1]
        if len(parts) == 1:
            return b""
        events = zip(parts[0:-1:2], parts[1::2], strict=True)
        return b"".join(event + end for event, end in events if b'"usage"' not in event or not _usage_only(event))

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return b"" if _usage_only(rest) else rest


def _event_start(data: bytes, at: int) -> int:
    """Where the event holding `at` starts, in data with LF line ends only (`at` on no line end, or at the end).

    Events end at "\n\n" taken from the left, as the pattern splits them: in a run of line ends, pairs from
    the run's start end events, and an odd one left over begins the next event.
    """
    pair = data.rfind(b"\n\n", 0, at)
    if pair == -1:
        return 0
    run = pair
    while run and data[run - 1] == 0x0A:
        run -= 1
    return run + (pair + 2 - run) // 2 * 2


def _usage_only(event: bytes) -> bool:
    for line in event.splitlines():
        if line.startswith(b"data:") and b'"usage"' in line:
            try:
                data = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return False
            return isinstance(data, dict) and data.get("choices") == [] and data.get("usage") is not None
    return False
