"""Classifier for Anthropic upstreams: messages (verb `chat`), token counting, models."""

from __future__ import annotations

from ..incoming import Incoming
from ..models import Action
from .http import default_action
from .llm import model_of, output_cap, prompt_tokens, stream_of, text_size


def classify(upstream: str, request: Incoming) -> Action:
    # The SDK calls `/v1/messages`; an upstream url of `https://api.anthropic.com` keeps that prefix.
    path = request.path.rstrip("/")
    if path.startswith("/v1/"):
        path = path[3:]
    if request.method == "POST" and path == "/messages":
        body = request.json_object()
        model = model_of(body)
        prompt = text_size(body.get("messages")) + text_size(body.get("system"))
        return Action(upstream=upstream, kind="anthropic", verb="chat", resource=model, model=model,
                      stream=stream_of(body), input_tokens=prompt_tokens(prompt),
                      max_output=output_cap(body.get("max_tokens")),
                      json=body)
    if request.method == "POST" and path == "/messages/count_tokens":
        body = request.json_object()
        model = model_of(body)
        return Action(upstream=upstream, kind="anthropic", verb="read", resource=model, model=model,
                      json=body)
    if request.method in ("GET", "HEAD") and (path == "/models" or path.startswith("/models/")):
        return Action(upstream=upstream, kind="anthropic", verb="read", resource="models")
    return default_action(upstream, "anthropic", request, path)  # `/v1/files` and `/files` alike
