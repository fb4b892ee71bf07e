"""What the OpenAI and Anthropic classifiers share: reading the model and estimating tokens."""

from __future__ import annotations

from typing import Any

from ..errors import bad_request

# A rough, cheap prompt estimate (~4 characters a token); budgets reconcile with the real usage later.
CHARS_PER_TOKEN = 4


def model_of(body: dict[str, Any], required: bool = True) -> str | None:
    model = body.get("model")
    if model is None and not required:
        return None
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string")
    return model


def stream_of(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean")
    return stream


def text_size(value: Any) -> int:
    """Characters of text in a prompt structure (strings anywhere inside lists and objects)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_size(v) for v in value)
    if isinstance(value, dict):
        return sum(text_size(v) for v in value.values())
    return 0


def prompt_tokens(prompt_chars: int) -> int:
    return prompt_chars // CHARS_PER_TOKEN + 1


def output_cap(value: Any) -> int | None:
    """The request's output-token cap, when it sets a usable one."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
