"""The one place an error becomes a response, in the calling API's own error shape."""

from __future__ import annotations

from typing import Any

import orjson

from .classify.mcp import RpcInfo
from .errors import GatewayError
from .http_server import Response

# JSON-RPC codes: -32600 invalid request, -32700 parse error; -32000.. for server-defined errors.
_RPC_CODES = {"bad_request": -32600, "payload_too_large": -32600, "policy_denied": -32001,
              "approval_denied": -32001, "approval_timeout": -32001, "agent_paused": -32001,
              "rate_limited": -32002, "budget_exceeded": -32002, "upstream_error": -32003,
              "upstream_timeout": -32003, "store_unavailable": -32004}


def _body(error: GatewayError, trace_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {"type": error.type, "message": error.message, "trace_id": trace_id}
    if error.rule is not None:
        body["rule"] = error.rule
    if error.detail is not None:
        body["detail"] = error.detail
    return body


def _rpc_error(error: GatewayError, trace_id: str, msg_id: Any) -> dict[str, Any]:
    code = -32700 if error.type == "bad_request" and "not valid JSON" in error.message else _RPC_CODES.get(
        error.type, -32000)
    return {"jsonrpc": "2.0", "id": msg_id,
            "error": {"code": code, "message": error.message, "data": _body(error, trace_id)}}


def error_response(kind: str | None, error: GatewayError, trace_id: str, rpc: RpcInfo | None = None,
                   element_errors: dict[int, GatewayError] | None = None) -> Response:
    """`kind` is the upstream kind (None when the upstream is unknown: the OpenAI-style shape is used).

    For an MCP batch, every element gets an answer: its own error if it was refused, else `error`.
    """
    headers = {"Content-Type": "application/json", "x-agent-gateway-trace-id": trace_id, **error.headers}
    if kind == "anthropic":
        payload: Any = {"type": "error", "error": _body(error, trace_id)}
    elif kind == "mcp" and error.type != "unauthenticated":
        if rpc is None:
            payload = _rpc_error(error, trace_id, None)
        else:
            errs = element_errors or {}
            answers = [_rpc_error(errs.get(i, error), trace_id, msg_id)
                       for i, msg_id in enumerate(rpc.ids) if msg_id is not None]
            if not answers:  # notifications only: JSON-RPC has nothing to answer, HTTP still must
                return Response(error.status, orjson.dumps({"error": _body(error, trace_id)}), headers)
            payload = answers if rpc.batch else answers[0]
        return Response(200, orjson.dumps(payload), headers)
    else:
        payload = {"error": _body(error, trace_id)}
    if error.type == "unauthenticated":
        headers.setdefault("WWW-Authenticate", 'Bearer realm="agent-gateway"')
    return Response(error.status, orjson.dumps(payload), headers)
