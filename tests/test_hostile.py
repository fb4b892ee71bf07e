"""Hostile agents over real sockets: bad credentials, path tricks, smuggled methods, malformed and oversized
bodies, hop-by-hop games and failing upstreams. Each refusal has its exact type, status and API shape, never
reaches an upstream, and leaves a trace event."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import rawhttp
from aiohttp import web
from conftest import SECRET, Stack, start_stack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gateway.demo.fakes import Recorded
from gateway.tokens import issue_token

TRACE_HEADER = "x-agent-gateway-trace-id"
ERP_KEY = "Bearer erp-upstream-token"
DELETE_DENIED = ("policy_denied", "invoice-bot.yaml#deny[0]", "The invoice bot never deletes ERP records")
EXPORT_DENIED = ("policy_denied", "ops-bot.yaml#deny[0]", "Bulk exports are never automated")
CHALLENGE = 'Bearer realm="agent-gateway"'


# --- helpers ------------------------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def small_stack() -> AsyncIterator[Stack]:
    s = await start_stack(max_body=1024)
    yield s
    await s.gateway.close()
    await s.fakes.close()


def forwarded(stack: Stack) -> list[Recorded]:
    """Every request any fake upstream has seen."""
    fakes = stack.fakes
    return [r for fake in (fakes.openai, fakes.anthropic, fakes.mcp, fakes.http_tool) for r in fake.recorder.requests]


async def traced(stack: Stack, trace_id: str) -> dict[str, Any]:
    return await stack.trace.wait_for(lambda e: e["trace_id"] == trace_id, limit=5)


def error_body(type_: str, message: str, trace_id: str, rule: str | None = None) -> dict[str, Any]:
    body = {"type": type_, "message": message, "trace_id": trace_id}
    if rule is not None:
        body["rule"] = rule
    return body


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_jwt(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT assembled by hand, so pyjwt's own refusals (alg none, a PEM as HMAC key) cannot get in the way."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def agent_claims(sub: str = "invoice-bot", **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "aud": "agent-gateway", "iat": now, "exp": now + 600, **overrides}


async def assert_unauthenticated(stack: Stack, response: aiohttp.ClientResponse, message: str) -> None:
    body = await response.json()
    trace_id = response.headers[TRACE_HEADER]
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert body == {"error": error_body("unauthenticated", message, trace_id)}
    assert forwarded(stack) == []
    event = await traced(stack, trace_id)
    assert (event["error"], event["status"], event.get("agent"), event.get("decision")) == (
        "unauthenticated", 401, None, None)


# --- credentials ----------------------------------------------------------------------------------------------

TOKENS: dict[str, tuple[Callable[[], str], str]] = {
    "forged_signature": (lambda: issue_token("invoice-bot", b"an-attacker-secret-0123456789abcdef"),
                         "token signature is invalid"),
    "expired": (lambda: issue_token("invoice-bot", SECRET, ttl=60, now=time.time() - 3600), "token expired"),
    "no_exp": (lambda: jwt.encode({k: v for k, v in agent_claims().items() if k != "exp"}, SECRET, "HS256"),
               "token has no 'exp' claim"),
    "wrong_audience": (lambda: issue_token("invoice-bot", SECRET, audience="some-other-service"),
                       "token audience must include 'agent-gateway'"),
    "admin_audience": (lambda: issue_token("alice", SECRET, audience="agent-gateway-admin", extra={"role": "admin"}),
                       "token audience must include 'agent-gateway'"),
    "alg_none": (lambda: hand_made_jwt({"alg": "none", "typ": "JWT"}, agent_claims(), None),
                 "algorithm 'none' is not allowed"),
    "alg_none_capitalised": (lambda: hand_made_jwt({"alg": "None", "typ": "JWT"}, agent_claims(), None),
                             "algorithm 'none' is not allowed"),
    "agent_not_in_rules": (lambda: issue_token("ghost-bot", SECRET), "agent 'ghost-bot' is not in the rules"),
    "not_a_jwt": (lambda: "sk-not-a-jwt-at-all", "token is not a well-formed JWT"),
}


@pytest.mark.parametrize("case", list(TOKENS))
async def test_bad_token_is_unauthenticated_when_bearer(stack: Stack, http: aiohttp.ClientSession,
                                                        case: str) -> None:
    make, message = TOKENS[case]
    async with http.get(f"{stack.url}/erp/vendors", headers={"Authorization": f"Bearer {make()}"}) as response:
        await assert_unauthenticated(stack, response, message)


@pytest.mark.parametrize("case", ["forged_signature", "alg_none", "agent_not_in_rules"])
async def test_bad_token_is_unauthenticated_when_x_api_key(stack: Stack, http: aiohttp.ClientSession,
                                                           case: str) -> None:
    make, message = TOKENS[case]
    async with http.get(f"{stack.url}/erp/vendors", headers={"x-api-key": make()}) as response:
        await assert_unauthenticated(stack, response, message)


async def test_conflicting_credentials_are_unauthenticated_when_both_valid(
        stack: Stack, http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": f"Bearer {stack.token('support-bot')}", "x-api-key": stack.token("invoice-bot")}
    async with http.get(f"{stack.url}/erp/vendors", headers=headers) as response:
        await assert_unauthenticated(
            stack, response, "conflicting credentials: Authorization and x-api-key carry different tokens")


@pytest.mark.parametrize("param", ["api_key", "token", "access_token", "jwt"])
async def test_credential_is_unauthenticated_when_only_in_query(stack: Stack, http: aiohttp.ClientSession,
                                                                param: str) -> None:
    url = f"{stack.url}/erp/vendors?{param}={stack.token('invoice-bot')}"
    async with http.get(url) as response:
        await assert_unauthenticated(
            stack, response, "no credential: send 'Authorization: Bearer <agent JWT>' or 'x-api-key'")


@pytest.mark.parametrize("case", ["no_credential", "forged_signature", "expired"])
async def test_mcp_unauthenticated_is_http_401_not_jsonrpc(stack: Stack, http: aiohttp.ClientSession,
                                                           case: str) -> None:
    headers = {} if case == "no_credential" else {"Authorization": f"Bearer {TOKENS[case][0]()}"}
    message = ("no credential: send 'Authorization: Bearer <agent JWT>' or 'x-api-key'" if case == "no_credential"
               else TOKENS[case][1])
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": "lookup_account", "arguments": {"account_id": "a-1"}}}
    async with http.post(f"{stack.url}/crm-tools/mcp", json=rpc, headers=headers) as response:
        await assert_unauthenticated(stack, response, message)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def jwks_stack(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> AsyncIterator[Stack]:
    """A gateway that trusts both the HS256 secret and an RSA key from a JWKS file."""
    jwk = {**json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "rsa-1", "use": "sig"}
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    s = await start_stack(jwks_file=str(jwks))
    yield s
    await s.gateway.close()
    await s.fakes.close()


@pytest.mark.parametrize("header", [{"alg": "HS256", "typ": "JWT"}, {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}],
                         ids=["no_kid", "rsa_kid"])
async def test_hs256_signed_with_rsa_public_pem_is_unauthenticated(
        jwks_stack: Stack, http: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey, header: dict[str, Any]) -> None:
    public_pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    confused = hand_made_jwt(header, agent_claims(), public_pem)
    async with http.get(f"{jwks_stack.url}/erp/vendors", headers={"Authorization": f"Bearer {confused}"}) as response:
        await assert_unauthenticated(jwks_stack, response, "token signature is invalid")


async def test_rs256_from_jwks_is_accepted_when_key_confusion_is_refused(
        jwks_stack: Stack, http: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey) -> None:
    # The control for the key-confusion case: the same stack does accept the RSA key for RS256.
    token = jwt.encode(agent_claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    async with http.get(f"{jwks_stack.url}/erp/vendors", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
    assert [(r.method, r.path) for r in forwarded(jwks_stack)] == [("GET", "/vendors")]


# --- path tricks, over raw sockets (client libraries normalise paths before sending) ----------------------------

DELETE_TRICKS = {
    "plain": "/erp/vendors/v1",
    "encoded_dot_dot": "/erp/vendors/%2e%2e/vendors/v1",
    "literal_dot_dot": "/erp/vendors/../vendors/v1",
    "double_slash": "/erp//vendors/v1",
    "encoded_slash": "/erp/%2Fvendors/v1",
    "encoded_slash_inside_segment": "/erp/vendors%2Fv1",
    "upper_case": "/erp/VENDORS/v1",
    "dot_segment": "/erp/./vendors/v1",
    "encoded_dot_segment": "/erp/%2e/vendors/v1",
    "double_encoded_dot_dot": "/erp/vendors/%252e%252e/v1",
    "trailing_slash": "/erp/vendors/v1/",
    "invalid_percent_escape": "/erp/vendors/%zz",
}
NORMALISED = {
    "upper_case": "/erp/VENDORS/v1",
    "double_encoded_dot_dot": "/erp/vendors/%252e%252e/v1",
    "trailing_slash": "/erp/vendors/v1/",
    "invalid_percent_escape": "/erp/vendors/%25zz",
}
BAD_PATHS = {
    "climb_above_root": ("/erp/%2e%2e/%2e%2e/x", "request path climbs above the root with '..'"),
    "climb_from_root": ("/%2e%2e/erp/vendors/v1", "request path climbs above the root with '..'"),
    "literal_climb": ("/erp/../../x", "request path climbs above the root with '..'"),
    "backslash": ("/erp\\vendors\\v1", "request path contains a backslash or a control character"),
    "encoded_backslash": ("/erp/vendors%5cv1", "request path contains a backslash or a control character"),
    "encoded_nul": ("/erp/vendors/v1%00", "request path contains a backslash or a control character"),
    "encoded_newline": ("/erp/vendors/v1%0d%0aX-Injected:%201",
                        "request path contains a backslash or a control character"),
    "encoded_tab": ("/erp/vendors/v1%09", "request path contains a backslash or a control character"),
    "invalid_utf8": ("/erp/vendors/%ff", "request path is not valid UTF-8 after percent-decoding"),
    "absolute_form": ("http://erp.internal/vendors/v1", "request path must start with '/'"),
}


async def raw(stack: Stack, method: str, target: str, token: str | None,
              headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> rawhttp.RawResponse:
    auth = [("Authorization", f"Bearer {token}")] if token else []
    return await rawhttp.request(stack.url, method, target, auth + (headers or []), body)


@pytest.mark.parametrize("case", list(DELETE_TRICKS))
async def test_delete_trick_is_denied_by_the_delete_rule(stack: Stack, case: str) -> None:
    response = await raw(stack, "DELETE", DELETE_TRICKS[case], stack.token("invoice-bot"))
    trace_id = response.headers[TRACE_HEADER]
    error, rule, reason = DELETE_DENIED
    assert response.status == 403
    assert response.json() == {"error": error_body(error, reason, trace_id, rule)}
    assert forwarded(stack) == []
    event = await traced(stack, trace_id)
    expected = ("invoice-bot", "erp", "delete", "vendors", "deny", rule, "policy_denied", 403,
                NORMALISED.get(case, "/erp/vendors/v1"))
    assert tuple(event[k] for k in ("agent", "upstream", "verb", "resource", "decision", "rule", "error", "status",
                                    "path")) == expected


@pytest.mark.parametrize("target", ["/erp/vendors/%2e%2e/admin/export", "/erp/vendors/..%2Fadmin%2Fexport",
                                    "/erp/ADMIN/EXPORT", "/erp//admin/./export", "/erp/%61dmin/export"])
async def test_export_trick_is_denied_by_the_export_rule(stack: Stack, target: str) -> None:
    # ops-bot may read the ERP but never export: a read-looking path that lands on /admin/** is an export.
    response = await raw(stack, "GET", target, stack.token("ops-bot"))
    trace_id = response.headers[TRACE_HEADER]
    error, rule, reason = EXPORT_DENIED
    assert response.status == 403
    assert response.json() == {"error": error_body(error, reason, trace_id, rule)}
    assert forwarded(stack) == []
    event = await traced(stack, trace_id)
    assert (event["agent"], event["verb"], event["resource"], event["decision"], event["rule"], event["error"]) == (
        "ops-bot", "export", "admin", "deny", rule, "policy_denied")


@pytest.mark.parametrize("case", list(BAD_PATHS))
async def test_bad_path_is_bad_request(stack: Stack, case: str) -> None:
    target, message = BAD_PATHS[case]
    response = await raw(stack, "DELETE", target, stack.token("invoice-bot"))
    trace_id = response.headers[TRACE_HEADER]
    assert response.status == 400
    assert response.json() == {"error": error_body("bad_request", message, trace_id)}
    assert forwarded(stack) == []
    event = await traced(stack, trace_id)
    # The trace names who tried, and the path exactly as it was sent.
    assert (event["agent"], event["path"], event["error"], event["status"], event.get("decision")) == (
        "invoice-bot", target, "bad_request", 400, None)


async def test_bad_path_is_unauthenticated_without_credential(stack: Stack) -> None:
    # Identity first: a caller without a credential is told only that.
    response = await raw(stack, "DELETE", "/erp/%2e%2e/%2e%2e/x", None)
    trace_id = response.headers[TRACE_HEADER]
    assert response.status == 401
    assert response.json() == {"error": error_body(
        "unauthenticated", "no credential: send 'Authorization: Bearer <agent JWT>' or 'x-api-key'", trace_id)}
    assert forwarded(stack) == []
    event = await traced(stack, trace_id)
    assert (event["error"], event["status"], event["path"]) == ("unauthenticated", 401, "/erp/%2e%2e/%2e%2e/x")


@pytest.mark.parametrize("target", ["/erp/vendors/v1\x01", "/erp/vendors/v1\x7f", "/erp/ven dors/v1"])
async def test_raw_control_character_in_path_is_refused_before_the_gateway(stack: Stack, target: str) -> None:
    # aiohttp's HTTP parser rejects these request lines itself (plain text, no trace) before the pipeline runs.
    response = await raw(stack, "DELETE", target, stack.token("invoice-bot"))
    assert response.status == 400
    assert forwarded(stack) == []


async def test_allowed_path_is_forwarded_exactly_as_classified(stack: Stack) -> None:
    response = await raw(stack, "GET", "/erp//vendors/./v-100?fields=name&x=%2e%2e", stack.token("invoice-bot"))
    trace_id = response.headers[TRACE_HEADER]
    assert response.status == 200
    assert response.json() == {"id": "v-100", "name": "Acme Supplies", "status": "verified"}
    assert [(r.method, r.path, r.query) for r in forwarded(stack)] == [("GET", "/vendors/v-100",
                                                                        "fields=name&x=%2e%2e")]
    event = await traced(stack, trace_id)
    assert (event["path"], event["verb"], event["resource"], event["decision"], event["rule"], event["status"]) == (
        "/erp/vendors/v-100", "read", "vendors", "allow", "invoice-bot.yaml#allow[1]", 200)


async def test_encoded_slash_is_forwarded_as_a_real_slash(stack: Stack) -> None:
    response = await raw(stack, "GET", "/erp/vendors%2Fv-200", stack.token("invoice-bot"))
    assert response.status == 200
    assert [r.path for r in forwarded(stack)] == ["/vendors/v-200"]


# --- method override ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override",
                                    "x-http-method-override"])
@pytest.mark.parametrize("target", ["/erp/vendors/v1", "/erp/payments"])
async def test_method_override_header_is_bad_request(stack: Stack, http: aiohttp.ClientSession, header: str,
                                                     target: str) -> None:
    # /erp/payments with this body is allowed for invoice-bot, so only the override header refuses it.
    headers = {"Authorization": f"Bearer {stack.token('invoice-bot')}", header: "DELETE"}
    async with http.post(f"{stack.url}{target}", json={"amount": 5}, headers=headers) as response:
        body = await response.json()
        trace_id = response.headers[TRACE_HEADER]
        assert response.status == 400
    assert body == {"error": error_body("bad_request", f"method-override header {header.lower()!r} is refused",
                                        trace_id)}
    assert forwarded(stack) == []
    event = await traced(stack, trace_id)
    assert (event["agent"], event["upstream"], event["error"], event["status"], event.get("decision")) == (
        "invoice-bot", "erp", "bad_request", 400, None)


# --- malformed bodies ---------------------------------------------------------------------------------------


async def post_raw_json(stack: Stack, http: aiohttp.ClientSession, agent: str, path: str,
                        body: bytes) -> tuple[int, Any, str]:
    headers = {"Authorization": f"Bearer {stack.token(agent)}", "Content-Type": "application/json"}
    async with http.post(f"{stack.url}{path}", data=body, headers=headers) as response:
        return response.status, await response.json(), response.headers[TRACE_HEADER]


def split_message(error: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The error with its message checked against `prefix` and removed (parser detail follows the prefix)."""
    assert error["message"].startswith(prefix), error["message"]
    return {k: v for k, v in error.items() if k != "message"}


OPENAI_BAD = {
    "not_json": (b'{"model": "gpt-4o-mini", "messages": [', "request body is not valid JSON: "),
    "not_an_object": (b'[{"model": "gpt-4o-mini", "messages": []}]', "request body must be a JSON object"),
    "model_not_a_string": (b'{"model": 4, "messages": []}', "'model' must be a non-empty string"),
    "model_missing": (b'{"messages": []}', "'model' must be a non-empty string"),
    "stream_not_a_bool": (b'{"model": "gpt-4o-mini", "messages": [], "stream": "yes"}',
                          "'stream' must be a boolean"),
    "trailing_garbage": (b'{"model": "gpt-4o-mini", "messages": []} {}', "request body is not valid JSON: "),
}


@pytest.mark.parametrize("case", list(OPENAI_BAD))
async def test_openai_malformed_body_is_bad_request(stack: Stack, http: aiohttp.ClientSession, case: str) -> None:
    body, prefix = OPENAI_BAD[case]
    status, answer, trace_id = await post_raw_json(stack, http, "invoice-bot", "/openai/chat/completions", body)
    assert status == 400
    assert list(answer) == ["error"]
    assert split_message(answer["error"], prefix) == {"type": "bad_request", "trace_id": trace_id}
    assert forwarded(stack) == []
    event = await traced(stack, trace_id)
    assert (event["agent"], event["upstream"], event["error"], event["status"]) == (
        "invoice-bot", "openai", "bad_request", 400)


@pytest.mark.parametrize(("body", "prefix"), [(b"{not json", "request body is not valid JSON: "),
                                              (b'"a string"', "request body must be a JSON object"),
                                              (b'{"model": ["claude-haiku-4-5"], "messages": []}',
                                               "'model' must be a non-empty string")])
async def test_anthropic_malformed_body_is_bad_request_in_anthropic_shape(
        stack: Stack, http: aiohttp.ClientSession, body: bytes, prefix: str) -> None:
    status, answer, trace_id = await post_raw_json(stack, http, "support-bot", "/anthropic/v1/messages", body)
    assert status == 400
    assert list(answer) == ["type", "error"]
    assert answer["type"] == "error"
    assert split_message(answer["error"], prefix) == {"type": "bad_request", "trace_id": trace_id}
    assert forwarded(stack) == []
    event = await traced(stack, trace_id)
    assert (event["agent"], event["upstream"], event["error"]) == ("support-bot", "anthropic", "bad_request")


MCP_BAD = {
    "not_json": (b'{"jsonrpc": "2.0", "id": 1, "method": ', -32700, "request body is not valid JSON: "),
    "missing_jsonrpc": (b'{"id": 1, "method": "tools/list"}', -32600,
                        'each JSON-RPC message must be an object with "jsonrpc": "2.0"'),
    "wrong_jsonrpc_version": (b'{"jsonrpc": "1.0", "id": 1, "method": "tools/list"}', -32600,
                              'each JSON-RPC message must be an object with "jsonrpc": "2.0"'),
    "params_not_object": (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ["lookup_account"]}',
                          -32600, "JSON-RPC 'params' of tools/call must be an object"),
    "method_not_string": (b'{"jsonrpc": "2.0", "id": 1, "method": 7}', -32600, "JSON-RPC 'method' must be a string"),
    "empty_batch": (b"[]", -32600, "a JSON-RPC batch must not be empty"),
    "batch_with_non_object": (b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}, 5]', -32600,
                              'each JSON-RPC message must be an object with "jsonrpc": "2.0"'),
    "scalar_body": (b"5", -32600, 'each JSON-RPC message must be an object with "jsonrpc": "2.0"'),
    "tool_name_not_string": (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 1}}', -32600,
                             "tools/call needs a string 'name'"),
}


@pytest.mark.parametrize("case", list(MCP_BAD))
async def test_mcp_malformed_body_is_jsonrpc_error_with_http_200(stack: Stack, http: aiohttp.ClientSession,
                                                                 case: str) -> None:
    body, code, prefix = MCP_BAD[case]
    status, answer, trace_id = await post_raw_json(stack, http, "support-bot", "/crm-tools/mcp", body)
    assert status == 200
    assert (answer["jsonrpc"], answer["id"], answer["error"]["code"]) == ("2.0", None, code)
    assert answer["error"]["message"] == answer["error"]["data"]["message"]
    assert split_message(answer["error"]["data"], prefix) == {"type": "bad_request", "trace_id": trace_id}
    assert forwarded(stack) == []
    event = await traced(stack, trace_id)
    assert (event["agent"], event["upstream"], event["error"]) == ("support-bot", "crm-tools", "bad_request")


# --- oversized bodies ---------------------------------------------------------------------------------------

TOO_LARGE = "request body is over the 1024-byte limit"


def payment(size: int) -> bytes:
    """A JSON payment body of exactly `size` bytes."""
    body = b'{"amount": 5, "memo": "'
    return body + b"x" * (size - len(body) - 2) + b'"}'


async def test_body_at_the_limit_is_forwarded(small_stack: Stack) -> None:
    response = await raw(small_stack, "POST", "/erp/payments", small_stack.token("invoice-bot"),
                         [("Content-Type", "application/json")], payment(1024))
    assert response.status == 201
    assert [len(r.body) for r in forwarded(small_stack)] == [1024]


@pytest.mark.parametrize("size", [1025, 64 * 1024])
async def test_content_length_body_over_limit_is_payload_too_large(small_stack: Stack, size: int) -> None:
    response = await raw(small_stack, "POST", "/erp/payments", small_stack.token("invoice-bot"),
                         [("Content-Type", "application/json")], payment(size))
    trace_id = response.headers[TRACE_HEADER]
    assert response.status == 413
    assert response.json() == {"error": error_body("payload_too_large", TOO_LARGE, trace_id)}
    assert forwarded(small_stack) == []
    event = await traced(small_stack, trace_id)
    assert (event["agent"], event["upstream"], event["error"], event["status"]) == (
        "invoice-bot", "erp", "payload_too_large", 413)


@pytest.mark.parametrize("size", [1025, 64 * 1024])
async def test_chunked_body_over_limit_is_payload_too_large(small_stack: Stack, size: int) -> None:
    url = small_stack.url
    head = rawhttp.head("POST", "/erp/payments", url, [
        ("Authorization", f"Bearer {small_stack.token('invoice-bot')}"), ("Content-Type", "application/json"),
        ("Transfer-Encoding", "chunked")])
    response = await rawhttp.exchange(url, head + rawhttp.chunked(payment(size), 300))
    trace_id = response.headers[TRACE_HEADER]
    assert response.status == 413
    assert response.json() == {"error": error_body("payload_too_large", TOO_LARGE, trace_id)}
    assert forwarded(small_stack) == []
    event = await traced(small_stack, trace_id)
    assert (event["agent"], event["upstream"], event["error"], event["status"]) == (
        "invoice-bot", "erp", "payload_too_large", 413)


async def test_chunked_body_at_the_limit_is_forwarded(small_stack: Stack) -> None:
    url = small_stack.url
    head = rawhttp.head("POST", "/erp/payments", url, [
        ("Authorization", f"Bearer {small_stack.token('invoice-bot')}"), ("Content-Type", "application/json"),
        ("Transfer-Encoding", "chunked")])
    response = await rawhttp.exchange(url, head + rawhttp.chunked(payment(1024), 300))
    assert response.status == 201
    assert [r.body for r in forwarded(small_stack)] == [payment(1024)]


async def test_mcp_body_over_limit_is_jsonrpc_payload_too_large(small_stack: Stack,
                                                                http: aiohttp.ClientSession) -> None:
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": "lookup_account", "arguments": {"account_id": "a" * 2000}}}
    status, answer, trace_id = await post_raw_json(small_stack, http, "support-bot", "/crm-tools/mcp",
                                                   json.dumps(rpc).encode())
    assert status == 200
    assert answer == {"jsonrpc": "2.0", "id": None, "error": {
        "code": -32600, "message": TOO_LARGE, "data": error_body("payload_too_large", TOO_LARGE, trace_id)}}
    assert forwarded(small_stack) == []
    event = await traced(small_stack, trace_id)
    assert event["error"] == "payload_too_large"


# --- unknown upstream ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "name"), [("/nope/x", "nope"), ("/", ""), ("/ERP/vendors", "ERP")])
async def test_unknown_upstream_is_bad_request_with_token(stack: Stack, http: aiohttp.ClientSession, path: str,
                                                          name: str) -> None:
    headers = {"Authorization": f"Bearer {stack.token('invoice-bot')}"}
    async with http.get(f"{stack.url}{path}", headers=headers) as response:
        body = await response.json()
        trace_id = response.headers[TRACE_HEADER]
        assert response.status == 400
    message = f"unknown upstream {name!r}: the first path segment must name an upstream"
    assert body == {"error": error_body("bad_request", message, trace_id)}
    assert forwarded(stack) == []
    event = await traced(stack, trace_id)
    assert (event["agent"], event.get("upstream"), event["error"], event["status"]) == (
        "invoice-bot", None, "bad_request", 400)


async def test_unknown_upstream_is_unauthenticated_without_token(stack: Stack, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{stack.url}/nope/x") as response:
        await assert_unauthenticated(
            stack, response, "no credential: send 'Authorization: Bearer <agent JWT>' or 'x-api-key'")


# --- hop-by-hop headers -------------------------------------------------------------------------------------


async def test_hop_by_hop_request_headers_are_not_forwarded(stack: Stack) -> None:
    response = await raw(stack, "GET", "/erp/vendors", stack.token("invoice-bot"), [
        ("Connection", "close, x-secret-thing"), ("X-Secret-Thing", "1"), ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"), ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("Proxy-Connection", "keep-alive"), ("Trailer", "x-late"), ("X-Kept", "yes")])
    assert response.status == 200
    [seen] = forwarded(stack)
    for name in ("x-secret-thing", "keep-alive", "te", "upgrade", "proxy-authorization", "proxy-connection",
                 "trailer"):
        assert name not in seen.headers, name
    assert "x-secret-thing" not in seen.headers.get("connection", "")
    assert seen.headers["x-kept"] == "yes"
    assert seen.headers["authorization"] == ERP_KEY


async def test_connection_header_cannot_remove_gateway_set_headers(stack: Stack) -> None:
    token = stack.token("invoice-bot")
    response = await raw(stack, "POST", "/erp/payments", token, [
        ("Connection", "close, authorization, traceparent, content-length, x-api-key"),
        ("x-api-key", token), ("Content-Type", "application/json")], b'{"amount": 5}')
    assert response.status == 201
    [seen] = forwarded(stack)
    assert seen.headers["authorization"] == ERP_KEY
    assert seen.headers["traceparent"].split("-")[1] == response.headers[TRACE_HEADER]
    assert seen.body == b'{"amount": 5}'
    assert all(token not in value for value in seen.headers.values())


class LocalUpstream:
    """A tiny upstream under the test's control: each path's handler, and every request it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1)
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.raw_path))
        if request.path == "/hop":
            return web.Response(text="ok", headers={"Connection": "x-internal", "X-Internal": "secret",
                                                   "Keep-Alive": "timeout=5", "Proxy-Authenticate": "Basic",
                                                   "X-Public": "visible"})
        if request.path == "/redirect":
            return web.Response(status=302, headers={"Location": f"{self.url}/landing"})
        if request.path == "/never":
            await self.release.wait()
        return web.Response(text="landed")

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        self.release.set()
        await self.runner.cleanup()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_local_rules(root: Path, upstreams: dict[str, str]) -> Path:
    """A rules dir with one http upstream per entry (name -> url and options) and an agent `tester` on each."""
    (root / "agents").mkdir(parents=True)
    lines = ["upstreams:"]
    for name, spec in upstreams.items():
        lines.append(f"  {name}: {{kind: http, {spec}}}")
    (root / "upstreams.yaml").write_text("\n".join(lines) + "\n")
    allow = "".join(f"  - {{upstream: {name}, verbs: [read, create]}}\n" for name in upstreams)
    (root / "agents" / "tester.yaml").write_text(f"agent: tester\nallow:\n{allow}")
    return root


@pytest.fixture
async def local() -> AsyncIterator[LocalUpstream]:
    upstream = LocalUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest.fixture
async def local_stack(tmp_path: Path, local: LocalUpstream) -> AsyncIterator[Stack]:
    rules = write_local_rules(tmp_path / "rules", {
        "local": f"url: '{local.url}', read_timeout: 1s",
        "closed": f"url: 'http://127.0.0.1:{closed_port()}', connect_timeout: 2s",
    })
    s = await start_stack(rules)
    yield s
    await s.gateway.close()
    await s.fakes.close()


async def test_hop_by_hop_response_headers_are_not_returned(local_stack: Stack, local: LocalUpstream,
                                                            http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": f"Bearer {local_stack.token('tester')}"}
    async with http.get(f"{local_stack.url}/local/hop", headers=headers) as response:
        assert response.status == 200
        assert await response.text() == "ok"
        returned = response.headers
        assert "X-Internal" not in returned
        assert "Keep-Alive" not in returned
        assert "Proxy-Authenticate" not in returned
        assert "x-internal" not in returned.get("Connection", "")
        assert returned["X-Public"] == "visible"
    assert local.seen == [("GET", "/hop")]


async def test_upstream_redirect_is_returned_not_followed(local_stack: Stack, local: LocalUpstream,
                                                          http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": f"Bearer {local_stack.token('tester')}"}
    async with http.get(f"{local_stack.url}/local/redirect", headers=headers, allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == f"{local.url}/landing"
    assert local.seen == [("GET", "/redirect")]
    event = await local_stack.trace.wait_for(lambda e: e.get("upstream") == "local", limit=5)
    assert (event["status"], event["decision"], event.get("error")) == (302, "allow", None)


# --- upstream failures --------------------------------------------------------------------------------------


async def test_closed_upstream_port_is_upstream_error(local_stack: Stack, http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": f"Bearer {local_stack.token('tester')}"}
    async with http.get(f"{local_stack.url}/closed/things", headers=headers) as response:
        body = await response.json()
        trace_id = response.headers[TRACE_HEADER]
        assert response.status == 502
    message = "upstream 'closed' failed: cannot connect (connection refused)"
    assert body == {"error": error_body("upstream_error", message, trace_id)}
    event = await traced(local_stack, trace_id)
    assert (event["agent"], event["upstream"], event["decision"], event["error"], event["status"]) == (
        "tester", "closed", "allow", "upstream_error", 502)


async def test_silent_upstream_is_upstream_timeout(local_stack: Stack, local: LocalUpstream,
                                                   http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": f"Bearer {local_stack.token('tester')}"}
    started = time.perf_counter()
    async with http.get(f"{local_stack.url}/local/never", headers=headers) as response:
        body = await response.json()
        trace_id = response.headers[TRACE_HEADER]
        assert response.status == 504
    assert 1.0 <= time.perf_counter() - started < 10
    message = "upstream 'local' did not answer in time"
    assert body == {"error": error_body("upstream_timeout", message, trace_id)}
    assert local.seen == [("GET", "/never")]
    event = await traced(local_stack, trace_id)
    assert (event["agent"], event["upstream"], event["decision"], event["error"], event["status"]) == (
        "tester", "local", "allow", "upstream_timeout", 504)
