"""Classifier for MCP upstreams (streamable HTTP, JSON-RPC 2.0): each message, batch elements included."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import bad_request
from ..incoming import Incoming
from ..models import Action
from ..policy.spec import UpstreamSpec

# Session plumbing: allowed for any agent holding some grant on the upstream (DESIGN.md classify).
PLUMBING = frozenset({"initialize", "ping", "tools/list", "resources/list", "resources/templates/list",
                      "prompts/list"})


@dataclass(frozen=True, slots=True)
class RpcInfo:
    """What the gateway must remember about a JSON-RPC body to answer for it or filter the reply."""

    batch: bool
    ids: tuple[Any, ...]  # the id of each element (None for notifications)
    tools_list_ids: tuple[Any, ...]  # ids of `tools/list` requests, whose results are filtered


def _element(upstream: UpstreamSpec, message: Any) -> tuple[Action, Any]:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise bad_request("each JSON-RPC message must be an object with \"jsonrpc\": \"2.0\"")
    msg_id = message.get("id")
    method = message.get("method")

    def act(verb: str, **fields: Any) -> Action:
        return Action(upstream=upstream.name, kind="mcp", verb=verb, json=message, **fields)

    if method is None:
        if "result" in message or "error" in message:  # the client answering a server request
            return act("respond", plumbing=True), msg_id
        raise bad_request("JSON-RPC message has neither 'method' nor 'result'")
    if not isinstance(method, str):
        raise bad_request("JSON-RPC 'method' must be a string")
    # MCP forbids null ids; a `tools/list` with `"id": null` would otherwise be answered unfiltered.
    if "id" in message and (not isinstance(msg_id, str | int | float) or isinstance(msg_id, bool)):
        raise bad_request("JSON-RPC request 'id' must be a string or a number")
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise bad_request(f"JSON-RPC 'params' of {method} must be an object")
    if method in PLUMBING or method.startswith("notifications/"):
        return act(method, plumbing=True), msg_id
    if method == "tools/call":
        name = params.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("tools/call needs a string 'name'")
        arguments = params.get("arguments", {})
        if not isinstance(arguments, dict):
            raise bad_request("tools/call 'arguments' must be an object")
        verb, resource = tool_action(upstream, name)
        return act(verb, resource=resource, tool=name, attributes={"arguments": arguments}), msg_id
    if method == "resources/read":
        return act("read", resource=str(params.get("uri", ""))), msg_id
    if method == "prompts/get":
        return act("read", resource=str(params.get("name", ""))), msg_id
    return act("call", resource=method), msg_id


def tool_action(upstream: UpstreamSpec, name: str) -> tuple[str, str]:
    """A tool's verb and resource from the upstream's tool table; unlisted tools: `call` on the name.
    Names match exactly, so a look-alike (`send_email ` or `Send_Email`) is a different, unlisted tool."""
    for tool in upstream.tools:
        if tool.name == name:
            return tool.verb, tool.resource or name
    return "call", name


def classify(upstream: UpstreamSpec, request: Incoming) -> tuple[tuple[Action, ...], RpcInfo | None]:
    if request.method in ("GET", "DELETE"):  # the server-event stream and session end: plumbing
        return (Action(upstream=upstream.name, kind="mcp", verb=f"http/{request.method.lower()}",
                       plumbing=True),), None
    if request.method != "POST":
        raise bad_request(f"MCP endpoints take POST, GET or DELETE, not {request.method}")
    body = request.json()
    batch = isinstance(body, list)
    messages = body if batch else [body]
    if batch and not messages:
        raise bad_request("a JSON-RPC batch must not be empty")
    actions: list[Action] = []
    ids: list[Any] = []
    tools_list: list[Any] = []
    for message in messages:
        action, msg_id = _element(upstream, message)
        actions.append(action)
        ids.append(msg_id)
        if action.verb == "tools/list" and msg_id is not None:
            tools_list.append(msg_id)
    return tuple(actions), RpcInfo(batch, tuple(ids), tuple(tools_list))
