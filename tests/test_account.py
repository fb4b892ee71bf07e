"""account: usage read from JSON bodies and SSE streams however they are chunked, and priced."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import orjson
import pytest

from gateway.account import MAX_JSON_COPY, Usage, UsageChunkFilter, UsageMeter, cost_usd
from gateway.policy.spec import PriceSpec


def chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted(cuts):
        yield data[start:cut]
        start = cut
    yield data[start:]


def meter_of(content_type: str, parts: Iterator[bytes] | list[bytes]) -> Usage | None:
    meter = UsageMeter(content_type)
    for part in parts:
        meter.feed(part)
    return meter.finish()


def sse(*events: object, event_names: list[str] | None = None, newline: bytes = b"\n") -> bytes:
    out = b""
    for i, payload in enumerate(events):
        if event_names is not None:
            out += b"event: " + event_names[i].encode() + newline
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        out += b"data: " + data + newline + newline
    return out


OPENAI_JSON = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46},
})


def openai_chunk(content: str | None, usage: dict[str, int] | None = None) -> dict[str, object]:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices, "usage": usage}


OPENAI_SSE = sse(openai_chunk("Hel"), openai_chunk("lo"), openai_chunk("!"),
                 openai_chunk(None, {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}),
                 b"[DONE]")

ANTHROPIC_SSE = sse(
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                          "model": "claude-haiku-4-5",
                                          "usage": {"input_tokens": 25, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
    {"type": "message_stop"},
    event_names=["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                 "message_delta", "message_stop"],
)

RESPONSES_SSE = sse(
    {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "usage": None}},
    {"type": "response.output_text.delta", "delta": "Hi"},
    {"type": "response.completed", "response": {"id": "resp_1", "status": "completed",
                                                "usage": {"input_tokens": 40, "output_tokens": 7,
                                                          "total_tokens": 47}}},
    event_names=["response.created", "response.output_text.delta", "response.completed"],
)


# -- JSON --------------------------------------------------------------------------------------------------------


def test_usage_from_openai_json() -> None:
    assert meter_of("application/json", [OPENAI_JSON]) == Usage(input=12, output=34)


def test_usage_from_json_split_into_chunks() -> None:
    assert meter_of("application/json; charset=utf-8", chunks(OPENAI_JSON, [1, 50, 51, 120])) == Usage(12, 34)
    assert meter_of("application/json", [bytes([b]) for b in OPENAI_JSON]) == Usage(12, 34)


def test_usage_from_anthropic_and_responses_json() -> None:
    message = orjson.dumps({"type": "message", "usage": {"input_tokens": 5, "output_tokens": 6}})
    assert meter_of("application/json", [message]) == Usage(5, 6)
    response = orjson.dumps({"object": "response", "usage": {"input_tokens": 7, "output_tokens": 8}})
    assert meter_of("application/json", [response]) == Usage(7, 8)


def test_usage_none_without_usage_in_json() -> None:
    assert meter_of("application/json", [orjson.dumps({"object": "list", "data": []})]) is None
    assert meter_of("application/json", [orjson.dumps({"usage": None})]) is None
    assert meter_of("application/json", [b"[1, 2]"]) is None


def test_usage_none_for_empty_or_malformed_json() -> None:
    assert meter_of("application/json", []) is None
    assert meter_of("application/json", [b'{"usage": {"prompt_tokens": 1']) is None


def test_usage_ignores_non_integer_counts() -> None:
    body = orjson.dumps({"usage": {"prompt_tokens": "12", "completion_tokens": 3.5, "output_tokens": 4}})
    assert meter_of("application/json", [body]) == Usage(0, 4)


def test_usage_none_for_other_content_types() -> None:
    assert meter_of("text/plain", [OPENAI_JSON]) is None
    assert meter_of("", [OPENAI_JSON]) is None
    assert meter_of("application/octet-stream", [OPENAI_SSE]) is None


def test_usage_content_type_is_case_insensitive() -> None:
    assert meter_of("Application/JSON; charset=UTF-8", [OPENAI_JSON]) == Usage(12, 34)
    assert meter_of("Text/Event-Stream", [OPENAI_SSE]) == Usage(9, 3)


def test_oversized_json_copy_stops_and_gives_no_usage() -> None:
    padding = b"x" * MAX_JSON_COPY
    body = b'{"pad": "' + padding + b'", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    meter = UsageMeter("application/json")
    for part in chunks(body, [MAX_JSON_COPY // 2, MAX_JSON_COPY + 5]):
        meter.feed(part)
        assert len(meter._buffer) <= MAX_JSON_COPY
    assert meter.finish() is None


def test_json_just_under_the_copy_limit_is_read() -> None:
    head = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "pad": "'
    body = head + b"x" * (MAX_JSON_COPY - len(head) - 2) + b'"}'
    assert len(body) == MAX_JSON_COPY
    assert meter_of("application/json", [body]) == Usage(1, 2)


# -- SSE ---------------------------------------------------------------------------------------------------------


def test_usage_from_openai_sse_final_chunk() -> None:
    assert meter_of("text/event-stream", [OPENAI_SSE]) == Usage(input=9, output=3)


def test_usage_from_openai_sse_fed_byte_by_byte() -> None:
    assert meter_of("text/event-stream; charset=utf-8", [bytes([b]) for b in OPENAI_SSE]) == Usage(9, 3)


@pytest.mark.parametrize("seed", range(20))
def test_usage_from_openai_sse_split_at_random_boundaries(seed: int) -> None:
    rng = random.Random(seed)
    cuts = rng.sample(range(1, len(OPENAI_SSE)), rng.randint(1, 30))
    assert meter_of("text/event-stream", chunks(OPENAI_SSE, cuts)) == Usage(9, 3)


def test_usage_from_openai_sse_split_inside_the_usage_key() -> None:
    at = OPENAI_SSE.index(b'"usage":{"prompt')
    for cut in range(at - 1, at + 12):
        assert meter_of("text/event-stream", chunks(OPENAI_SSE, [cut])) == Usage(9, 3), cut


def test_usage_from_sse_with_crlf_line_endings() -> None:
    body = sse(openai_chunk("a"), openai_chunk(None, {"prompt_tokens": 4, "completion_tokens": 5}), b"[DONE]",
               newline=b"\r\n")
    assert meter_of("text/event-stream", chunks(body, [len(body) // 2])) == Usage(4, 5)


def test_usage_from_sse_last_event_without_trailing_newline() -> None:
    body = b"data: " + orjson.dumps(openai_chunk(None, {"prompt_tokens": 2, "completion_tokens": 1}))
    assert meter_of("text/event-stream", [body[:10], body[10:]]) == Usage(2, 1)


def test_usage_from_anthropic_sse_start_and_delta() -> None:
    assert meter_of("text/event-stream", [ANTHROPIC_SSE]) == Usage(input=25, output=15)
    assert meter_of("text/event-stream", [bytes([b]) for b in ANTHROPIC_SSE]) == Usage(25, 15)


def test_usage_from_responses_api_stream_completed_event() -> None:
    assert meter_of("text/event-stream", [RESPONSES_SSE]) == Usage(input=40, output=7)
    cuts = list(range(7, len(RESPONSES_SSE), 13))
    assert meter_of("text/event-stream", chunks(RESPONSES_SSE, cuts)) == Usage(40, 7)


def test_usage_none_for_sse_without_usage() -> None:
    body = sse(openai_chunk("a"), openai_chunk("b"), b"[DONE]")
    assert meter_of("text/event-stream", [body]) is None
    assert meter_of("text/event-stream", [sse({"usage": None}, b"[DONE]")]) is None
    assert meter_of("text/event-stream", []) is None


def test_usage_ignores_usage_outside_data_lines() -> None:
    body = b': comment "usage": {"prompt_tokens": 5}\nevent: "usage"\n\n' + sse(openai_chunk("a"))
    assert meter_of("text/event-stream", [body]) is None


def test_usage_skips_malformed_sse_data_and_keeps_going() -> None:
    body = b'data: {"usage": {"prompt_tokens": \n\n' + sse(
        openai_chunk(None, {"prompt_tokens": 6, "completion_tokens": 2}))
    assert meter_of("text/event-stream", [body]) == Usage(6, 2)


# -- cost --------------------------------------------------------------------------------------------------------


PRICES = {"gpt-4o-mini": PriceSpec(input_per_mtok=0.15, output_per_mtok=0.60),
          "claude-sonnet-4-5": PriceSpec(input_per_mtok=3.0, output_per_mtok=15.0),
          "free": PriceSpec(input_per_mtok=0.0, output_per_mtok=0.0)}


def test_cost_usd_prices_input_and_output_per_million() -> None:
    assert cost_usd(PRICES, "gpt-4o-mini", Usage(1000, 500)) == pytest.approx(0.00045, abs=1e-12)
    assert cost_usd(PRICES, "claude-sonnet-4-5", Usage(1_000_000, 1_000_000)) == pytest.approx(18.0)
    assert cost_usd(PRICES, "claude-sonnet-4-5", Usage(0, 0)) == 0.0
    assert cost_usd(PRICES, "free", Usage(10**9, 10**9)) == 0.0


def test_cost_usd_rounds_to_eight_places() -> None:
    assert cost_usd(PRICES, "gpt-4o-mini", Usage(1, 0)) == 0.00000015
    assert cost_usd(PRICES, "gpt-4o-mini", Usage(1, 1)) == 0.00000075
    assert cost_usd({"m": PriceSpec(0.000001, 0)}, "m", Usage(1, 0)) == 0.0


def test_cost_usd_none_for_unpriced_or_missing_model() -> None:
    assert cost_usd(PRICES, "gpt-5", Usage(1, 1)) is None
    assert cost_usd(PRICES, None, Usage(1, 1)) is None
    assert cost_usd({}, "gpt-4o-mini", Usage(1, 1)) is None


# -- the usage-event filter -------------------------------------------------------------------------------------

WITHOUT_USAGE = sse(openai_chunk("Hel"), openai_chunk("lo"), openai_chunk("!"), b"[DONE]")


def filtered(parts: Iterator[bytes] | list[bytes]) -> bytes:
    hider = UsageChunkFilter()
    return b"".join(hider.feed(part) for part in parts) + hider.flush()


def test_filter_drops_only_the_usage_only_event() -> None:
    assert filtered([OPENAI_SSE]) == WITHOUT_USAGE


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_filter_gives_the_same_bytes_however_the_stream_is_split(newline: bytes) -> None:
    stream = sse(openai_chunk("Hel"), openai_chunk(None, {"prompt_tokens": 9, "completion_tokens": 3}), b"[DONE]",
                 newline=newline)
    expected = sse(openai_chunk("Hel"), b"[DONE]", newline=newline)
    for cut in range(len(stream) + 1):
        assert filtered(chunks(stream, [cut])) == expected, cut
    rng = random.Random(7)
    for _ in range(50):
        assert filtered(chunks(stream, rng.sample(range(len(stream)), 6))) == expected


def test_filter_passes_whole_events_without_usage_on_at_once() -> None:
    hider = UsageChunkFilter()
    first = sse(openai_chunk("Hel"))
    assert hider.feed(first) == first
    assert hider.feed(first[:10]) == b""  # an unfinished event waits for its end
    assert hider.feed(first[10:]) == first


def test_filter_keeps_an_event_that_mentions_usage_with_choices() -> None:
    event = sse(openai_chunk("x", {"prompt_tokens": 1, "completion_tokens": 1}))
    assert filtered([event]) == event


# -- the filter and the meter against plain statements of their rules, over random streams ------------------------


def usage_only(event: bytes) -> bool:
    """An event whose first data line mentioning usage is a JSON object with `choices: []` and a usage."""
    for line in event.splitlines():
        if line.startswith(b"data:") and b'"usage"' in line:
            try:
                data = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return False
            return isinstance(data, dict) and data.get("choices") == [] and data.get("usage") is not None
    return False


def reference_filtered(parts: list[bytes]) -> bytes:
    """Events end where the pattern finds a blank line, from the left; usage-only ones are dropped. A part of
    whole events without usage, with nothing pending before it, goes on as it is."""
    pending, out = b"", []
    for part in parts:
        if not pending and b'"usage"' not in part and part.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")):
            out.append(part)
            continue
        pieces = re.split(rb"(\r\n\r\n|\n\n|\r\r)", pending + part)
        pending = pieces.pop()
        out += [event + end for event, end in zip(pieces[::2], pieces[1::2], strict=True) if not usage_only(event)]
    return b"".join(out) + (b"" if usage_only(pending) else pending)


def random_stream(rng: random.Random) -> tuple[bytes, Usage | None]:
    """Events of every kind the filter and meter tell apart, with line ends of one style or of several, and
    runs of blank lines; and the usage the meter must find in them."""
    style = rng.choice(["lf", "crlf", "mixed"])
    found: Usage | None = None
    out = b""
    for _ in range(rng.randint(1, 12)):
        kind = rng.choice(["content", "usage_only", "usage_with_choices", "comment", "named", "malformed", "done"])
        tokens = {"prompt_tokens": rng.randint(1, 99), "completion_tokens": rng.randint(1, 99)}
        if kind == "content":
            lines = [b"data: " + orjson.dumps(openai_chunk("x" * rng.randint(0, 40)))]
        elif kind == "usage_only":
            lines = [b"data: " + orjson.dumps(openai_chunk(None, tokens))]
        elif kind == "usage_with_choices":
            lines = [b"data: " + orjson.dumps(openai_chunk("y", tokens))]
        elif kind == "comment":
            lines = [b': "usage" in a comment']
        elif kind == "named":
            lines = [b"event: usage", b"data: " + orjson.dumps(openai_chunk(None, tokens))]
        elif kind == "malformed":
            lines = [b'data: {"usage": {"prompt_tokens": 3']
        else:
            lines = [b"data: [DONE]"]
        if kind in ("usage_only", "usage_with_choices", "named"):
            found = found or Usage()
            found.merge(tokens)
        newline = {"lf": b"\n", "crlf": b"\r\n", "mixed": rng.choice([b"\n", b"\r\n"])}[style]
        out += b"".join(line + newline for line in lines)
        out += newline * rng.choice([1, 1, 1, 2, 3]) if style != "mixed" else rng.choice([b"\n", b"\r\n", b"\r"])
    return out, found


@pytest.mark.parametrize("seed", range(40))
def test_filter_matches_its_rule_on_random_streams_however_split(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        stream, _ = random_stream(rng)
        cuts = rng.sample(range(len(stream) + 1), rng.randint(0, min(8, len(stream))))
        parts = list(chunks(stream, cuts))
        assert filtered(parts) == reference_filtered(parts), (stream, cuts)


@pytest.mark.parametrize("seed", range(40))
def test_usage_from_random_streams_whole_or_split(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        stream, expected = random_stream(rng)
        if b"\r" in stream.replace(b"\r\n", b""):
            continue  # lines ending in a bare CR are not read for usage
        cuts = rng.sample(range(len(stream) + 1), rng.randint(0, min(8, len(stream))))
        assert meter_of("text/event-stream", [stream]) == expected, stream
        assert meter_of("text/event-stream", chunks(stream, cuts)) == expected, (stream, cuts)


def test_filter_keeps_the_bytes_between_hidden_events_as_they_are() -> None:
    usage = sse(openai_chunk(None, {"prompt_tokens": 1, "completion_tokens": 2}))
    stream = sse(openai_chunk("a")) + b"\n" + usage + sse(openai_chunk("b")) + usage + b"\n\n" + sse(b"[DONE]")
    # The odd line end after the first event begins the usage event, and goes with it.
    assert filtered([stream]) == sse(openai_chunk("a")) + sse(openai_chunk("b")) + b"\n\n" + sse(b"[DONE]")
    assert filtered([stream]) == reference_filtered([stream])
