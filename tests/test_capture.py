"""capture: what a call's trace keeps of its request, per `capture:` mode, and what it never keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from recorded import SUPPORT_BOT, policy_of, tool, write_rules

from gateway.capture import (
    REDACTED,
    Capturer,
    capture_record,
    referenced_json_paths,
    secret_key,
)
from gateway.incoming import Incoming
from gateway.policy.conditions import compile_condition
from gateway.policy.reads import header_names
from gateway.policy.spec import CaptureSpec

REFERENCED = CaptureSpec()
CHAT = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 300, "temperature": 0.1,
        "messages": [{"role": "user", "content": "my card is 4111 1111 1111 1111"}]}


def record(spec: CaptureSpec = REFERENCED, referenced: frozenset[tuple[str, ...]] = frozenset(),
           body: Any = None, *, method: str = "POST", path: str = "/erp/payments", query: str = "",
           headers: dict[str, str] | None = None, names: frozenset[str] | None = frozenset()) -> dict[str, Any]:
    return capture_record(spec, referenced, method, path, query, headers or {}, body, header_names=names)


def test_referenced_keeps_only_the_fields_conditions_read() -> None:
    body = {"vendor": "v-1", "amount": 2500, "memo": "march", "bank": {"iban": "DE00", "bic": "X"}}
    out = record(referenced=frozenset({("amount",), ("bank", "bic")}), body=body)
    assert out == {"method": "POST", "path": "/erp/payments", "query": "", "headers": {},
                   "json": {"amount": 2500, "bank": {"bic": "X"}},
                   "kept": ["classifier", "json.amount", "json.bank.bic"]}


def test_referenced_openai_body_keeps_classifier_fields_but_not_the_prompt() -> None:
    out = record(body=CHAT, path="/openai/chat/completions")
    assert out["json"] == {"model": "gpt-4o-mini", "stream": True, "max_tokens": 300}
    responses = {"model": "gpt-4o", "max_output_tokens": 9, "input": "secret plans", "instructions": "be terse"}
    assert record(body=responses)["json"] == {"model": "gpt-4o", "max_output_tokens": 9}


def test_kept_fields_come_in_the_capture_plan_s_order_whichever_side_is_smaller() -> None:
    """A body with fewer keys than the plan wants is walked by its own keys; the record reads the same."""
    small = {"max_tokens": 300, "messages": [], "model": "gpt-4o-mini"}  # 3 keys; the plan wants 11 at the top
    assert list(record(body=small)["json"].items()) == [("model", "gpt-4o-mini"), ("max_tokens", 300)]
    many = {f"extra{i}": i for i in range(20)} | {"stream": False, "model": "m", "id": 7}
    assert list(record(body=many)["json"].items()) == [("model", "m"), ("stream", False), ("id", 7)]


def test_referenced_mcp_body_keeps_the_envelope_and_the_read_arguments() -> None:
    call = tool("send_email", 7, to="jane@customer.io", body="refund", attachment="...")
    out = record(referenced=frozenset({("params", "arguments", "to")}), body=call, path="/crm-tools/mcp")
    assert out["json"] == {"jsonrpc": "2.0", "method": "tools/call", "id": 7,
                           "params": {"name": "send_email", "arguments": {"to": "jane@customer.io"}}}
    batch = record(body=[call, {"jsonrpc": "2.0", "id": 2, "result": {"content": "private"}}, 3])
    assert batch["json"] == [{"jsonrpc": "2.0", "method": "tools/call", "id": 7, "params": {"name": "send_email"}},
                             {"jsonrpc": "2.0", "id": 2, "result": REDACTED}, None]
    read = record(body={"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": {"uri": "crm://a/1"}})
    assert read["json"]["params"] == {"uri": "crm://a/1"}


def test_all_keeps_the_whole_body_with_secrets_redacted() -> None:
    body = {"amount": 5, "auth": {"user": "u"}, "nested": [{"Api-Key": "k", "note": "n"}], "client_secret": "s"}
    out = record(CaptureSpec(json="all"), body=body)
    assert out["json"] == {"amount": 5, "auth": REDACTED, "nested": [{"Api-Key": REDACTED, "note": "n"}],
                           "client_secret": REDACTED}
    assert out["kept"] == ["json"]
    assert body["client_secret"] == "s"  # the request itself is untouched


def test_all_shares_unchanged_subtrees_instead_of_copying_them() -> None:
    out = record(CaptureSpec(json="all"), body=CHAT)
    assert out["json"] is CHAT
    assert record(CaptureSpec(json="all"), body={**CHAT, "token": "t"})["json"]["messages"] is CHAT["messages"]


def test_none_keeps_no_body_at_all() -> None:
    out = record(CaptureSpec(json="none"), frozenset({("amount",)}), body=CHAT)
    assert out["json"] is None
    assert out["kept"] == []


def test_a_list_keeps_the_listed_paths_and_the_classifier_fields() -> None:
    spec = CaptureSpec(json=("vendor", "request.json.bank.iban"))
    out = record(spec, body={"vendor": "v-1", "amount": 1, "model": "m", "bank": {"iban": "DE00", "bic": "X"}})
    assert out["json"] == {"model": "m", "vendor": "v-1", "bank": {"iban": "DE00"}}
    assert out["kept"] == ["classifier", "json.bank.iban", "json.vendor"]


@pytest.mark.parametrize("spec", [REFERENCED, CaptureSpec(json="all")], ids=["referenced", "all"])
def test_secret_keys_are_redacted_even_when_a_rule_reads_them(spec: CaptureSpec) -> None:
    body = {"amount": 3, "password": "hunter2", "creds": {"accessToken": "abc", "ok": 1}}
    out = record(spec, frozenset({("password",), ("creds",), ("amount",)}), body)
    assert out["json"]["password"] == REDACTED
    assert out["json"]["creds"] == {"accessToken": REDACTED, "ok": 1}
    assert out["json"]["amount"] == 3


def test_sensitive_paths_are_redacted_in_the_body_headers_and_query() -> None:
    spec = CaptureSpec(json="all", sensitive=("params.arguments.body", "request.json.vendor",
                                              "request.headers.x-customer", "request.query.account"))
    out = record(spec, body=[tool("send_email", to="a@b.c", body="private"), {"vendor": "v-1"}],
                 query="account=42&page=2", headers={"x-customer": "c-9", "x-trace": "t"}, names=None)
    assert out["json"][0]["params"]["arguments"] == {"to": "a@b.c", "body": REDACTED}
    assert out["json"][1] == {"vendor": REDACTED}
    assert out["headers"] == {"x-customer": REDACTED, "x-trace": "t"}
    assert out["query"] == "account=%3Credacted%3E&page=2"


def test_sensitive_path_on_a_referenced_field_is_redacted() -> None:
    out = record(CaptureSpec(sensitive=("amount",)), frozenset({("amount",), ("vendor",)}),
                 {"amount": 10, "vendor": "v"})
    assert out["json"] == {"amount": REDACTED, "vendor": "v"}


def test_query_parameters_that_look_secret_are_redacted() -> None:
    query = "page=2&access_token=abc&api%5Fkey=k&sig=eyJhbGciOiJI.eyJzdWIiOiJ4.sig&q=Bearer%20x&plain=&x"
    assert record(query=query)["query"] == ("page=2&access_token=%3Credacted%3E&api%5Fkey=%3Credacted%3E"
                                            "&sig=%3Credacted%3E&q=%3Credacted%3E&plain=&x")
    assert record(query="page=2")["query"] == "page=2"


def test_headers_are_only_the_referenced_ones_and_never_credentials() -> None:
    headers = {"x-tenant": "acme", "x-other": "o", "authorization": "Bearer a", "x-api-key": "k",
               "cookie": "c", "x-auth-token": "t", "x-forwarded": "sk-abcdefghijklmnopqrstuvwx"}
    assert record(headers=headers, names=frozenset({"x-tenant", "authorization"}))["headers"] == {"x-tenant": "acme"}
    everything = record(headers=headers, names=None)
    assert everything["headers"] == {"x-tenant": "acme", "x-other": "o", "x-auth-token": REDACTED,
                                     "x-forwarded": REDACTED}
    assert everything["kept"][-1] == "headers"


@pytest.mark.parametrize("body", [None, 5, "text", True, [], [1, "a", None], {"a": [1, {"token": 2}]},
                                  {"amount": [1, 2]}, {"amount": {"nested": {"deep": 1}}}])
@pytest.mark.parametrize("mode", ["referenced", "all", "none"])
def test_odd_bodies_never_raise(body: Any, mode: str) -> None:
    out = record(CaptureSpec(json=mode), frozenset({("amount",), ("a", "b")}), body)
    assert set(out) == {"method", "path", "query", "headers", "json", "kept"}


def test_deeply_nested_bodies_are_truncated_not_fatal() -> None:
    body: Any = "leaf"
    for _ in range(500):
        body = {"k": [body]}
    out = record(CaptureSpec(json="all"), body=body)
    assert "<truncated>" in str(out["json"])


@pytest.mark.parametrize(("key", "secret"), [
    ("password", True), ("access_token", True), ("apiKey", True), ("X-Api-Key", True), ("client_secret", True),
    ("Authorization", True), ("ssn", True), ("card_number", True), ("CardNumber", True), ("cvv", True),
    ("private_key", True), ("APIKEY", True), ("credentials", True),
    ("max_tokens", False), ("total_tokens", False), ("author", False), ("model", False), ("amount", False),
    ("key", False), ("card", False),
])
def test_secret_looking_keys(key: str, secret: bool) -> None:
    assert secret_key(key) is secret


def test_referenced_paths_come_from_the_compiled_conditions(tmp_path: Path) -> None:
    policy = policy_of(write_rules(tmp_path))
    assert referenced_json_paths(policy.agents["invoice-bot"]) == {("model",), ("amount",)}
    assert referenced_json_paths(policy.agents["support-bot"]) == {("params", "arguments", "to")}
    support = SUPPORT_BOT + (
        "  - {upstream: crm-tools, verbs: [read], when: 'request.json.params.arguments.limit > 5'}\n")

    policy = policy_of(write_rules(tmp_path, support_bot=support))
    assert referenced_json_paths(policy.agents["support-bot"]) == {("params", "arguments", "to"),
                                                                   ("params", "arguments", "limit")}


def test_header_names_read_by_member_or_index_else_all() -> None:
    conditions = [compile_condition('request.headers["X-Tenant"] == "a"'),
                  compile_condition("request.headers.x_env == 'prod'")]
    assert header_names(conditions) == frozenset({"x-tenant", "x_env"})
    assert header_names([compile_condition('"x-tenant" in request.headers')]) is None
    assert header_names([compile_condition("request.method == 'GET'")]) == frozenset()


def incoming(body: bytes, method: str = "POST") -> Incoming:
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json", "Authorization": "Bearer x"}))
    return Incoming(method, "/payments", "", headers, body)


def test_record_incoming_marks_a_body_that_is_not_json() -> None:
    capturer = Capturer(REFERENCED, frozenset({("amount",)}))
    out = capturer.record_incoming("/erp/payments", incoming(b"amount=5"))
    assert out["json"] is None
    assert out["json_invalid"] is True


def test_record_incoming_parses_nothing_the_capture_does_not_need() -> None:
    request = incoming(b'{"amount": 5}')
    out = Capturer(REFERENCED).record_incoming("/erp/payments", request)
    assert not request.json_parsed()
    assert (out["json"], out["kept"]) == (None, [])  # nothing kept, so replay knows the body is unknown
    out = Capturer(REFERENCED, frozenset({("amount",)})).record_incoming("/erp/payments", request)
    assert out["json"] == {"amount": 5}
    assert out["headers"] == {}
