"""classify: each upstream kind's request -> Action mapping, against the example upstreams and hand-built specs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.classify import Classified, classify
from gateway.classify.http import compile_routes
from gateway.classify.llm import CHARS_PER_TOKEN, output_cap, prompt_tokens
from gateway.classify.mcp import RpcInfo
from gateway.errors import GatewayError
from gateway.incoming import Incoming
from gateway.models import Action
from gateway.policy.load import load_rules
from gateway.policy.spec import Loc, RouteSpec, UpstreamSpec

ENV = {"OPENAI_API_KEY": "k1", "ANTHROPIC_API_KEY": "k2", "ERP_TOKEN": "k3", "CRM_MCP_TOKEN": "k4"}
UPSTREAMS: Mapping[str, UpstreamSpec] = load_rules("rules", ENV).upstreams
LOC = Loc("test", 1, 1)


def incoming(method: str, path: str, body: Any = None, *, raw: bytes | None = None, query: str = "",
             headers: Mapping[str, str] | None = None) -> Incoming:
    data = raw if raw is not None else (b"" if body is None else orjson.dumps(body))
    return Incoming(method, path, query, CIMultiDictProxy(CIMultiDict(headers or {})), data)


def run(upstream: str | UpstreamSpec, request: Incoming) -> Classified:
    spec = UPSTREAMS[upstream] if isinstance(upstream, str) else upstream
    routes = compile_routes(spec.routes) if spec.kind == "http" else None
    return classify(spec, routes, request)


def one(upstream: str | UpstreamSpec, method: str, path: str, body: Any = None, **kw: Any) -> Action:
    result = run(upstream, incoming(method, path, body, **kw))
    assert len(result.actions) == 1
    return result.actions[0]


def refused(upstream: str | UpstreamSpec, method: str, path: str, body: Any = None, **kw: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        run(upstream, incoming(method, path, body, **kw))
    assert caught.value.type == "bad_request"
    return caught.value


def http_spec(*routes: tuple[str, str, str, str | None]) -> UpstreamSpec:
    return UpstreamSpec(
        name="tool", kind="http", url="http://tool.internal", credential=None, prices={},
        routes=tuple(RouteSpec(m, p, v, r, LOC) for m, p, v, r in routes), tools=(),
        connect_timeout=5.0, read_timeout=5.0, loc=LOC,
    )


# -- the estimate ------------------------------------------------------------------------------------------------


def test_prompt_tokens_are_a_quarter_of_the_characters_plus_one() -> None:
    assert CHARS_PER_TOKEN == 4
    assert [prompt_tokens(n) for n in (0, 3, 4, 40, 41)] == [1, 1, 2, 11, 11]


@pytest.mark.parametrize("max_output", [None, "100", 1.5, True, -50])
def test_output_cap_ignores_non_int_or_negative_values(max_output: Any) -> None:
    assert output_cap(max_output) is None


def test_output_cap_keeps_a_usable_value() -> None:
    assert (output_cap(0), output_cap(100)) == (0, 100)


# -- openai ------------------------------------------------------------------------------------------------------


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello world!"}]}  # 4 + 12 = 16 chars


def test_openai_chat_completions_is_chat_on_the_model() -> None:
    action = one("openai", "POST", "/chat/completions", {**CHAT, "max_tokens": 50})
    assert action == Action(upstream="openai", kind="openai", verb="chat", resource="gpt-4o-mini",
                            model="gpt-4o-mini", stream=False, input_tokens=16 // 4 + 1, max_output=50,
                            json={**CHAT, "max_tokens": 50})


def test_openai_chat_prefers_max_completion_tokens_over_max_tokens() -> None:
    action = one("openai", "POST", "/chat/completions", {**CHAT, "max_tokens": 50, "max_completion_tokens": 7})
    assert action.estimated_tokens == 5 + 7


def test_openai_chat_without_max_tokens_estimates_prompt_only() -> None:
    assert one("openai", "POST", "/chat/completions", CHAT).estimated_tokens == 5


def test_openai_chat_counts_text_in_nested_content_parts() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 100}]}],
            "max_tokens": 1}
    # "user" (4) + "text" (4) + 100 characters = 108 -> 27 + 1 + 1
    assert one("openai", "POST", "/chat/completions", body).estimated_tokens == 29


def test_openai_chat_stream_flag_is_read() -> None:
    action = one("openai", "POST", "/chat/completions", {**CHAT, "stream": True})
    assert action.stream is True


def test_openai_chat_trailing_slash_is_still_chat() -> None:
    assert one("openai", "POST", "/chat/completions/", CHAT).verb == "chat"


def test_openai_legacy_completions_counts_prompt() -> None:
    action = one("openai", "POST", "/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x" * 40})
    assert (action.verb, action.resource, action.estimated_tokens) == ("chat", "gpt-3.5-turbo-instruct", 11)


def test_openai_responses_counts_input_instructions_and_max_output_tokens() -> None:
    body = {"model": "gpt-4o", "input": "x" * 20, "instructions": "y" * 20, "max_output_tokens": 30,
            "max_tokens": 999, "stream": True}
    action = one("openai", "POST", "/responses", body)
    assert (action.verb, action.resource, action.model, action.stream) == ("chat", "gpt-4o", "gpt-4o", True)
    assert action.estimated_tokens == 40 // 4 + 1 + 30


def test_openai_embeddings_is_embed_without_output_tokens() -> None:
    body = {"model": "text-embedding-3-small", "input": ["a" * 10, "b" * 10], "max_tokens": 500}
    action = one("openai", "POST", "/embeddings", body)
    assert action == Action(upstream="openai", kind="openai", verb="embed", resource="text-embedding-3-small",
                            model="text-embedding-3-small", input_tokens=6, max_output=0, json=body)


@pytest.mark.parametrize(("method", "path"), [("GET", "/models"), ("GET", "/models/gpt-4o"), ("HEAD", "/models"),
                                              ("GET", "/models/")])
def test_openai_models_is_read_on_models(method: str, path: str) -> None:
    action = one("openai", method, path)
    assert (action.verb, action.resource, action.model, action.json) == ("read", "models", None, None)


@pytest.mark.parametrize(
    ("method", "path", "verb", "resource"),
    [
        ("POST", "/files", "create", "files"),
        ("GET", "/files/file-1/content", "read", "files"),
        ("DELETE", "/models/ft:gpt-4o:me", "delete", "models"),
        ("POST", "/Chat/Completions", "create", "chat"),
        ("GET", "/chat/completions", "read", "chat"),
        ("HEAD", "/batches", "read", "batches"),
        ("PATCH", "/assistants/a1", "update", "assistants"),
        ("PROPFIND", "/x", "propfind", "x"),
        ("GET", "/", "read", "/"),
    ],
)
def test_openai_unknown_path_gets_default_verb_and_first_segment(method: str, path: str, verb: str,
                                                                resource: str) -> None:
    action = one("openai", method, path, raw=b"{}" if method == "POST" else b"")
    assert (action.kind, action.verb, action.resource, action.model) == ("openai", verb, resource, None)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"model": "", "messages": []},
        {"model": 4, "messages": []},
        {"model": None, "messages": []},
        {"model": "gpt-4o", "stream": "true"},
        {"model": "gpt-4o", "stream": 1},
        ["not", "an", "object"],
        "gpt-4o",
    ],
)
def test_openai_chat_with_bad_body_is_bad_request(body: Any) -> None:
    refused("openai", "POST", "/chat/completions", body)


def test_openai_chat_with_malformed_json_is_bad_request() -> None:
    error = refused("openai", "POST", "/chat/completions", raw=b'{"model": "gpt-4o",')
    assert "not valid JSON" in error.message


def test_openai_chat_with_empty_body_is_bad_request() -> None:
    refused("openai", "POST", "/chat/completions", raw=b"")


def test_openai_embeddings_without_model_is_bad_request() -> None:
    refused("openai", "POST", "/embeddings", {"input": "x"})


# -- anthropic ---------------------------------------------------------------------------------------------------


MESSAGES = {"model": "claude-haiku-4-5", "system": "s" * 8, "max_tokens": 100,
            "messages": [{"role": "user", "content": "c" * 28}]}  # 8 + 4 + 28 = 40 chars


@pytest.mark.parametrize("path", ["/v1/messages", "/messages", "/v1/messages/"])
def test_anthropic_messages_is_chat_with_and_without_v1(path: str) -> None:
    action = one("anthropic", "POST", path, MESSAGES)
    assert action == Action(upstream="anthropic", kind="anthropic", verb="chat", resource="claude-haiku-4-5",
                            model="claude-haiku-4-5", stream=False, input_tokens=40 // 4 + 1, max_output=100,
                            json=MESSAGES)


def test_anthropic_messages_system_as_blocks_is_counted() -> None:
    body = {**MESSAGES, "system": [{"type": "text", "text": "s" * 4}]}  # "text" + 4 chars = 8
    assert one("anthropic", "POST", "/v1/messages", body).estimated_tokens == 111


def test_anthropic_messages_stream_flag_is_read() -> None:
    assert one("anthropic", "POST", "/v1/messages", {**MESSAGES, "stream": True}).stream is True


@pytest.mark.parametrize("path", ["/v1/messages/count_tokens", "/messages/count_tokens"])
def test_anthropic_count_tokens_is_read_on_the_model(path: str) -> None:
    action = one("anthropic", "POST", path, MESSAGES)
    assert (action.verb, action.resource, action.model, action.estimated_tokens) == (
        "read", "claude-haiku-4-5", "claude-haiku-4-5", 0)


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("GET", "/models"),
                                              ("GET", "/v1/models/claude-haiku-4-5"), ("HEAD", "/v1/models")])
def test_anthropic_models_is_read_on_models(method: str, path: str) -> None:
    action = one("anthropic", method, path)
    assert (action.kind, action.verb, action.resource) == ("anthropic", "read", "models")


def test_anthropic_messages_without_model_is_bad_request() -> None:
    refused("anthropic", "POST", "/v1/messages", {"messages": [], "max_tokens": 1})


def test_anthropic_messages_with_array_body_is_bad_request() -> None:
    refused("anthropic", "POST", "/v1/messages", [MESSAGES])


@pytest.mark.parametrize(("method", "path", "verb", "resource"), [
    ("POST", "/v1/files", "create", "files"),
    ("POST", "/files", "create", "files"),
    ("DELETE", "/v1/files/file_1", "delete", "files"),
    ("POST", "/v1/messages/batches", "create", "messages"),
    ("GET", "/v1/messages", "read", "messages"),
])
def test_anthropic_unknown_path_resource_is_the_same_with_and_without_v1(method: str, path: str, verb: str,
                                                                         resource: str) -> None:
    # A deny rule on `resources: [files]` must not be dodged by calling `/v1/files` instead of `/files`.
    action = one("anthropic", method, path, raw=b"{}" if method == "POST" else b"")
    assert (action.kind, action.verb, action.resource) == ("anthropic", verb, resource)


# -- http --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "verb", "resource"),
    [
        ("GET", "/vendors", "read", "vendors"),
        ("GET", "/vendors/", "read", "vendors"),
        ("GET", "/vendors/42", "read", "vendors"),
        ("GET", "/vendors/42/", "read", "vendors"),
        ("DELETE", "/vendors/42", "delete", "vendors"),
        ("POST", "/payments", "create", "payments"),
        ("GET", "/admin/export", "export", "admin"),
        ("GET", "/admin/export/all/csv", "export", "admin"),
        ("GET", "/admin/", "export", "admin"),
    ],
)
def test_http_route_table_maps_method_and_path(method: str, path: str, verb: str, resource: str) -> None:
    action = one("erp", method, path)
    assert action == Action(upstream="erp", kind="http", verb=verb, resource=resource)


def test_http_star_matches_exactly_one_segment() -> None:
    # `/vendors/*` does not cover `/vendors/42/bank`: it falls back to DELETE's default verb.
    action = one("erp", "DELETE", "/vendors/42/bank")
    assert (action.verb, action.resource) == ("delete", "vendors")
    action = one("erp", "GET", "/vendors/42/bank")
    assert (action.verb, action.resource) == ("read", "vendors")
    spec = http_spec(("POST", "/vendors/*", "approve", "vendors"))
    assert one(spec, "POST", "/vendors/42").verb == "approve"
    assert one(spec, "POST", "/vendors/42/bank").verb == "create"
    assert one(spec, "POST", "/vendors/").verb == "create"


def test_http_double_star_covers_the_prefix_itself() -> None:
    # `/admin/**` is everything under /admin, /admin included, so the export cannot be reached as a plain read.
    action = one("erp", "GET", "/admin")
    assert (action.verb, action.resource) == ("export", "admin")


def test_http_double_star_does_not_match_a_longer_first_segment() -> None:
    action = one("erp", "GET", "/administrators")
    assert (action.verb, action.resource) == ("read", "administrators")


@pytest.mark.parametrize(("method", "path", "verb"), [("GET", "/VENDORS/42", "read"),
                                                      ("POST", "/PAYMENTS", "create"),
                                                      ("POST", "/Payments/", "create"),
                                                      ("GET", "/Admin/Export", "export"),
                                                      ("DELETE", "/Vendors/7", "delete")])
def test_http_routes_match_case_insensitively(method: str, path: str, verb: str) -> None:
    action = one("erp", method, path)
    assert action.verb == verb
    assert action.resource in ("vendors", "payments", "admin")


@pytest.mark.parametrize(("path", "verb"), [("/vendors/42", "read"), ("/admin/x", "export")])
def test_http_head_is_classified_as_get(path: str, verb: str) -> None:
    assert one("erp", "HEAD", path) == one("erp", "GET", path)
    assert one("erp", "HEAD", path).verb == verb


@pytest.mark.parametrize(
    ("method", "verb"),
    [("GET", "read"), ("HEAD", "read"), ("OPTIONS", "read"), ("POST", "create"), ("PUT", "update"),
     ("PATCH", "update"), ("DELETE", "delete"), ("PURGE", "purge")],
)
def test_http_unmatched_request_gets_method_default_verb(method: str, verb: str) -> None:
    action = one("erp", method, "/Invoices/2024/7")
    assert action == Action(upstream="erp", kind="http", verb=verb, resource="invoices")


def test_http_unmatched_method_on_a_routed_path_gets_default_verb() -> None:
    action = one("erp", "PUT", "/payments")
    assert (action.verb, action.resource) == ("update", "payments")


def test_http_unmatched_root_path_resource_is_slash() -> None:
    assert one("erp", "GET", "/").resource == "/"


def test_http_route_without_resource_uses_lowercased_first_segment() -> None:
    spec = http_spec(("GET", "/Reports/*", "report", None))
    assert one(spec, "GET", "/REPORTS/q1") == Action(upstream="tool", kind="http", verb="report", resource="reports")


def test_http_route_with_any_method_matches_every_method() -> None:
    spec = http_spec(("*", "/rpc", "invoke", "rpc"))
    for method in ("GET", "POST", "DELETE"):
        assert one(spec, method, "/rpc").verb == "invoke"


def test_http_first_matching_route_wins() -> None:
    spec = http_spec(("GET", "/files/secret", "secret", "secrets"), ("GET", "/files/**", "read", "files"))
    assert one(spec, "GET", "/files/secret").verb == "secret"
    assert one(spec, "GET", "/files/other").verb == "read"


def test_http_route_matches_encoded_segment_as_one_segment() -> None:
    assert one("erp", "GET", "/vendors/a%20b").verb == "read"
    assert one("erp", "DELETE", "/vendors/a%3Fb").verb == "delete"


# -- mcp ---------------------------------------------------------------------------------------------------------


def rpc(method: str, params: Any = None, msg_id: Any = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    if msg_id is not None:
        message["id"] = msg_id
    return message


def call(name: str, arguments: Any = None, msg_id: Any = 1) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name}
    if arguments is not None:
        params["arguments"] = arguments
    return rpc("tools/call", params, msg_id)


def test_mcp_listed_tool_maps_to_its_verb_and_resource() -> None:
    message = call("lookup_account", {"account_id": "A-1"})
    result = run("crm-tools", incoming("POST", "/mcp", message))
    assert result.actions == (Action(upstream="crm-tools", kind="mcp", verb="read", resource="accounts",
                                     tool="lookup_account", attributes={"arguments": {"account_id": "A-1"}},
                                     json=message),)
    assert result.rpc == RpcInfo(batch=False, ids=(1,), tools_list_ids=())


@pytest.mark.parametrize(("name", "verb", "resource"), [("send_email", "send", "email"),
                                                        ("delete_account", "delete", "accounts")])
def test_mcp_other_listed_tools(name: str, verb: str, resource: str) -> None:
    action = one("crm-tools", "POST", "/mcp", call(name, {"to": "a@example.com"}))
    assert (action.verb, action.resource, action.tool, action.plumbing) == (verb, resource, name, False)


def test_mcp_unlisted_tool_is_call_on_its_name() -> None:
    action = one("crm-tools", "POST", "/mcp", call("export_everything"))
    assert (action.verb, action.resource, action.tool) == ("call", "export_everything", "export_everything")
    assert action.attributes == {"arguments": {}}


@pytest.mark.parametrize("name", ["send_email ", " send_email", "Send_Email", "SEND_EMAIL", "send_email\u200b",
                                  "send-email", "send_emai1"])
def test_mcp_look_alike_tool_name_is_unlisted(name: str) -> None:
    action = one("crm-tools", "POST", "/mcp", call(name))
    assert (action.verb, action.resource, action.tool) == ("call", name, name)


@pytest.mark.parametrize("method", ["initialize", "ping", "tools/list", "resources/list", "prompts/list",
                                    "resources/templates/list"])
def test_mcp_plumbing_methods_are_plumbing(method: str) -> None:
    message = rpc(method, {})
    action = one("crm-tools", "POST", "/mcp", message)
    assert action == Action(upstream="crm-tools", kind="mcp", verb=method, plumbing=True, json=message)


@pytest.mark.parametrize("method", ["notifications/initialized", "notifications/cancelled",
                                    "notifications/roots/list_changed"])
def test_mcp_notifications_are_plumbing_without_id(method: str) -> None:
    result = run("crm-tools", incoming("POST", "/mcp", rpc(method, msg_id=None)))
    assert [(a.verb, a.plumbing) for a in result.actions] == [(method, True)]
    assert result.rpc == RpcInfo(batch=False, ids=(None,), tools_list_ids=())


@pytest.mark.parametrize("message", [{"jsonrpc": "2.0", "id": "s-1", "result": {"roots": []}},
                                     {"jsonrpc": "2.0", "id": "s-1", "error": {"code": -1, "message": "no"}}])
def test_mcp_client_response_to_server_is_plumbing(message: dict[str, Any]) -> None:
    result = run("crm-tools", incoming("POST", "/mcp", message))
    assert [(a.verb, a.plumbing, a.tool) for a in result.actions] == [("respond", True, None)]
    assert result.rpc is not None and result.rpc.ids == ("s-1",)


def test_mcp_resources_read_and_prompts_get_are_reads() -> None:
    assert one("crm-tools", "POST", "/mcp", rpc("resources/read", {"uri": "crm://accounts/1"})).resource == (
        "crm://accounts/1")
    action = one("crm-tools", "POST", "/mcp", rpc("prompts/get", {"name": "summary"}))
    assert (action.verb, action.resource, action.plumbing) == ("read", "summary", False)


def test_mcp_other_method_is_call_on_the_method() -> None:
    action = one("crm-tools", "POST", "/mcp", rpc("completion/complete", {}))
    assert (action.verb, action.resource, action.plumbing) == ("call", "completion/complete", False)


def test_mcp_tools_list_is_not_plumbing_when_called_as_a_tool() -> None:
    action = one("crm-tools", "POST", "/mcp", call("tools/list"))
    assert (action.verb, action.plumbing, action.tool) == ("call", False, "tools/list")


def test_mcp_batch_is_classified_element_by_element() -> None:
    batch = [call("lookup_account", {"id": 1}, msg_id=1), rpc("tools/list", {}, msg_id="t"),
             rpc("notifications/initialized", msg_id=None), call("send_email", {"to": "x"}, msg_id=3),
             rpc("tools/list", msg_id=None)]
    result = run("crm-tools", incoming("POST", "/mcp", batch))
    assert [(a.verb, a.resource, a.tool, a.plumbing) for a in result.actions] == [
        ("read", "accounts", "lookup_account", False),
        ("tools/list", None, None, True),
        ("notifications/initialized", None, None, True),
        ("send", "email", "send_email", False),
        ("tools/list", None, None, True),
    ]
    assert [a.json for a in result.actions] == batch
    assert result.rpc == RpcInfo(batch=True, ids=(1, "t", None, 3, None), tools_list_ids=("t",))


def test_mcp_single_element_batch_is_still_a_batch() -> None:
    result = run("crm-tools", incoming("POST", "/mcp", [rpc("tools/list", msg_id=9)]))
    assert result.rpc == RpcInfo(batch=True, ids=(9,), tools_list_ids=(9,))


@pytest.mark.parametrize(("method", "verb"), [("GET", "http/get"), ("DELETE", "http/delete")])
def test_mcp_get_and_delete_are_session_plumbing(method: str, verb: str) -> None:
    result = run("crm-tools", incoming(method, "/mcp"))
    assert result.actions == (Action(upstream="crm-tools", kind="mcp", verb=verb, plumbing=True),)
    assert result.rpc is None


@pytest.mark.parametrize("method", ["PUT", "PATCH", "HEAD", "OPTIONS"])
def test_mcp_other_http_methods_are_bad_request(method: str) -> None:
    refused("crm-tools", method, "/mcp", rpc("ping"))


@pytest.mark.parametrize(
    "body",
    [
        [],
        None,
        "ping",
        42,
        {"method": "ping", "id": 1},
        {"jsonrpc": "1.0", "method": "ping", "id": 1},
        {"jsonrpc": 2.0, "method": "ping", "id": 1},
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "method": 5, "id": 1},
        {"jsonrpc": "2.0", "method": None, "id": 1, "params": {}},
        {"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": ["lookup_account"]},
        {"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": None},
        {"jsonrpc": "2.0", "method": "tools/call", "id": 1},
        {"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": {"name": ""}},
        {"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": {"name": 7}},
        {"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": {"name": "x", "arguments": [1]}},
        {"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": {"name": "x", "arguments": "{}"}},
        [{"jsonrpc": "2.0", "method": "ping", "id": 1}, "garbage"],
        [{"jsonrpc": "2.0", "method": "ping", "id": 1}, {"jsonrpc": "2.0", "id": 2}],
        [[{"jsonrpc": "2.0", "method": "ping", "id": 1}]],
    ],
)
def test_mcp_invalid_jsonrpc_is_bad_request(body: Any) -> None:
    raw = b"" if body is None else orjson.dumps(body)
    refused("crm-tools", "POST", "/mcp", raw=raw)


@pytest.mark.parametrize("msg_id", [None, True, False, {"a": 1}, [1]])
@pytest.mark.parametrize("method", ["tools/list", "tools/call", "ping"])
def test_mcp_request_with_null_or_non_scalar_id_is_bad_request(method: str, msg_id: Any) -> None:
    # A `tools/list` with `"id": null` would be answered with no id the gateway knows to filter.
    message = {"jsonrpc": "2.0", "method": method, "id": msg_id, "params": {"name": "lookup_account"}}
    error = refused("crm-tools", "POST", "/mcp", message)
    assert "'id'" in error.message
    refused("crm-tools", "POST", "/mcp", [rpc("ping", msg_id=1), message])


@pytest.mark.parametrize("msg_id", ["abc", "", 0, -7, 2**53, 1.5])
def test_mcp_request_with_string_or_number_id_is_accepted(msg_id: Any) -> None:
    result = run("crm-tools", incoming("POST", "/mcp", rpc("tools/list", msg_id=msg_id)))
    assert result.rpc == RpcInfo(batch=False, ids=(msg_id,), tools_list_ids=(msg_id,))


def test_mcp_unparseable_body_is_bad_request() -> None:
    refused("crm-tools", "POST", "/mcp", raw=b'{"jsonrpc": "2.0", "method": "tools/call"')


def test_mcp_batch_with_one_bad_tool_call_refuses_the_whole_batch() -> None:
    batch = [call("lookup_account", msg_id=1), {"jsonrpc": "2.0", "method": "tools/call", "id": 2, "params": {}}]
    error = refused("crm-tools", "POST", "/mcp", batch)
    assert "name" in error.message
