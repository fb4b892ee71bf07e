"""Classifier for OpenAI-compatible upstreams: chat completions, responses, embeddings, models."""

from __future__ import annotations

from ..incoming import Incoming
from ..models import Action
from .http import default_action
from .llm import model_of, output_cap, prompt_tokens, stream_of, text_size


def classify(upstream: str, request: Incoming) -> Action:
    path = request.path.rstrip("/")
    if request.method == "POST" and path in ("/chat/completions", "/completions", "/responses"):
        body = request.json_object()
        model = model_of(body)
        if path == "/responses":
            prompt = text_size(body.get("input")) + text_size(body.get("instructions"))
            max_out = body.get("max_output_tokens")
        else:
            prompt = text_size(body.get("messages")) + text_size(body.get("prompt"))
            max_out = body.get("max_completion_tokens", body.get("max_tokens"))
        return Action(upstream=upstream, kind="openai", verb="chat", resource=model, model=model,
                      stream=stream_of(body), input_tokens=prompt_tokens(prompt), max_output=output_cap(max_out),
                      json=body)
    if request.method == "POST" and path == "/embeddings":
        body = request.json_object()
        model = model_of(body)
        return Action(upstream=upstream, kind="openai", verb="embed", resource=model, model=model,
                      input_tokens=prompt_tokens(text_size(body.get("input"))), max_output=0, json=body)
    if request.method in ("GET", "HEAD") and (path == "/models" or path.startswith("/models/")):
        return Action(upstream=upstream, kind="openai", verb="read", resource="models")
    action = default_action(upstream, "openai", request)
    return action
