"""forward: header hygiene both ways, the injected credential, trace context, and the routing rule's URL."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import GatewayError
from gateway.forward import HOP_BY_HOP, request_head, request_target, response_headers, upstream_headers
from gateway.policy.spec import CredentialSpec, Loc, UpstreamSpec
from gateway.upstream_client import Origin

LOC = Loc("test", 1, 1)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def spec(url: str = "https://api.openai.com/v1", header: str | None = "Authorization",
         value: str = "Bearer sk-upstream") -> UpstreamSpec:
    credential = CredentialSpec(header, value) if header is not None else None
    return UpstreamSpec(name="up", kind="openai", url=url, credential=credential, prices={}, routes=(), tools=(),
                        connect_timeout=5.0, read_timeout=5.0, loc=LOC)


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def names(out: CIMultiDict[str]) -> set[str]:
    return {name.lower() for name in out}


# -- upstream_headers --------------------------------------------------------------------------------------------


def test_upstream_headers_drop_hop_by_hop() -> None:
    given = headers(("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
                    ("Trailer", "X-Checksum"), ("Transfer-Encoding", "chunked"), ("Upgrade", "websocket"),
                    ("Proxy-Connection", "keep-alive"), ("Proxy-Authenticate", "Basic"),
                    ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("Content-Type", "application/json"))
    out = upstream_headers(given, spec(), TRACEPARENT)
    assert names(out) == {"content-type", "accept-encoding", "traceparent", "authorization"}
    assert not names(out) & HOP_BY_HOP


def test_upstream_headers_drop_headers_named_in_connection() -> None:
    given = headers(("Connection", "close, X-Hop-One"), ("connection", " x-hop-two ,,"), ("X-Hop-One", "1"),
                    ("X-HOP-TWO", "2"), ("X-Kept", "3"))
    out = upstream_headers(given, spec(), TRACEPARENT)
    assert "x-hop-one" not in names(out) and "x-hop-two" not in names(out)
    assert out.getall("X-Kept") == ["3"]


@pytest.mark.parametrize("credential", ["Authorization", "X-Api-Key", "Cookie", "Proxy-Authorization",
                                        "authorization", "COOKIE"])
def test_upstream_headers_drop_the_agents_credentials(credential: str) -> None:
    out = upstream_headers(headers((credential, "agent-secret"), ("Accept", "*/*")), spec(header=None), TRACEPARENT)
    assert "agent-secret" not in out.values()
    assert credential.lower() not in names(out)
    assert out["Accept"] == "*/*"


def test_upstream_headers_drop_host_content_length_and_gateway_owned() -> None:
    given = headers(("Host", "127.0.0.1:8080"), ("Content-Length", "12"), ("Accept-Encoding", "gzip, br"),
                    ("Expect", "100-continue"), ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
                    ("tracestate", "vendor=x"), ("X-Request-Id", "r1"))
    out = upstream_headers(given, spec(), TRACEPARENT)
    assert names(out) == {"x-request-id", "accept-encoding", "traceparent", "authorization"}
    assert out.getall("Accept-Encoding") == ["identity"]
    assert out.getall("traceparent") == [TRACEPARENT]


def test_upstream_headers_inject_the_upstream_credential_once() -> None:
    out = upstream_headers(headers(("Authorization", "Bearer agent-jwt")), spec(), TRACEPARENT)
    assert out.getall("Authorization") == ["Bearer sk-upstream"]


def test_upstream_headers_drop_the_agents_copy_of_a_custom_credential_header() -> None:
    given = headers(("X-Erp-Token", "forged"), ("x-erp-token", "forged-2"), ("X-Other", "ok"))
    out = upstream_headers(given, spec(header="X-ERP-Token", value="real-token"), TRACEPARENT)
    assert out.getall("x-erp-token") == ["real-token"]
    assert out.getall("X-Other") == ["ok"]


def test_upstream_headers_api_key_credential_replaces_the_agents() -> None:
    given = headers(("x-api-key", "agent-jwt"), ("anthropic-version", "2023-06-01"))
    out = upstream_headers(given, spec(header="x-api-key", value="sk-ant-upstream"), TRACEPARENT)
    assert out.getall("x-api-key") == ["sk-ant-upstream"]
    assert out.getall("anthropic-version") == ["2023-06-01"]
    assert "authorization" not in names(out)


@pytest.mark.parametrize("named", ["authorization", "Authorization, traceparent, accept-encoding",
                                   "x-erp-token", "X-ERP-TOKEN"])
def test_upstream_headers_connection_cannot_remove_what_the_gateway_sets(named: str) -> None:
    given = headers(("Connection", named), ("Authorization", "Bearer agent"))
    out = upstream_headers(given, spec(header="Authorization"), TRACEPARENT)
    assert out.getall("Authorization") == ["Bearer sk-upstream"]
    assert out.getall("traceparent") == [TRACEPARENT]
    assert out.getall("Accept-Encoding") == ["identity"]
    custom = upstream_headers(headers(("Connection", named)), spec(header="X-Erp-Token", value="t"), TRACEPARENT)
    assert custom.getall("X-Erp-Token") == ["t"]


def test_upstream_headers_without_credential_inject_none() -> None:
    out = upstream_headers(headers(("Authorization", "Bearer agent")), spec(header=None), TRACEPARENT)
    assert names(out) == {"accept-encoding", "traceparent"}


def test_upstream_headers_keep_other_headers_and_repeated_values_in_order() -> None:
    given = headers(("Content-Type", "application/json"), ("X-Tag", "a"), ("User-Agent", "OpenAI/Python"),
                    ("X-Tag", "b"), ("OpenAI-Beta", "assistants=v2"))
    out = upstream_headers(given, spec(), TRACEPARENT)
    assert out.getall("X-Tag") == ["a", "b"]
    assert out["User-Agent"] == "OpenAI/Python"
    assert out["OpenAI-Beta"] == "assistants=v2"
    assert out["Content-Type"] == "application/json"


def test_upstream_headers_set_traceparent() -> None:
    out = upstream_headers(headers(), spec(), TRACEPARENT)
    assert out.getall("traceparent") == [TRACEPARENT]


def test_upstream_headers_do_not_change_the_input() -> None:
    given = headers(("Authorization", "Bearer agent"), ("Connection", "x-a"), ("X-A", "1"))
    upstream_headers(given, spec(), TRACEPARENT)
    assert list(given.items()) == [("Authorization", "Bearer agent"), ("Connection", "x-a"), ("X-A", "1")]


# -- response_headers --------------------------------------------------------------------------------------------


def test_response_headers_drop_hop_by_hop_and_framing() -> None:
    given = headers(("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"),
                    ("Upgrade", "h2c"), ("Trailer", "x"), ("Proxy-Authenticate", "Basic"), ("Content-Length", "10"),
                    ("Server", "upstream/1.0"), ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
                    ("Content-Type", "text/event-stream"), ("x-request-id", "req_1"), ("Retry-After", "3"))
    out = response_headers(given)
    assert list(out.items()) == [("Content-Type", "text/event-stream"), ("x-request-id", "req_1"),
                                 ("Retry-After", "3")]


def test_response_headers_drop_headers_named_in_connection() -> None:
    given = headers(("Connection", "X-Internal-Route, x-debug"), ("X-Internal-Route", "node-7"),
                    ("X-Debug", "on"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"))
    out = response_headers(given)
    assert list(out.items()) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


# -- the upstream URL: origin and request target ----------------------------------------------------------------


def url(base: str, path: str, query: str = "") -> str:
    """The URL a request goes to, as scheme://Host-header + request target."""
    origin = Origin.of(base)
    return f"{'https' if origin.tls else 'http'}://{origin.host_header}{request_target(origin, path, query)}"


def test_target_appends_the_path_below_the_upstream() -> None:
    assert url("https://api.openai.com/v1", "/chat/completions") == "https://api.openai.com/v1/chat/completions"
    assert url("http://erp.internal:9000", "/vendors/42") == "http://erp.internal:9000/vendors/42"


def test_target_root_path_keeps_one_slash() -> None:
    assert url("https://api.openai.com/v1", "/") == "https://api.openai.com/v1/"
    assert url("https://api.openai.com/v1/", "/") == "https://api.openai.com/v1/"
    assert url("http://erp.internal:9000", "/") == "http://erp.internal:9000/"


def test_target_of_a_url_with_a_trailing_slash_has_no_double_slash() -> None:
    assert url("https://api.openai.com/v1/", "/chat/completions") == "https://api.openai.com/v1/chat/completions"


def test_target_keeps_the_query_raw() -> None:
    assert (url("http://erp.internal", "/vendors", "q=a+b&x=%2F%3F&x=2&empty=&flag")
            == "http://erp.internal/vendors?q=a+b&x=%2F%3F&x=2&empty=&flag")


def test_target_keeps_the_normalised_path_encoding() -> None:
    assert (request_target(Origin.of("http://erp.internal"), "/vendors/a%20b/%C3%BC/%3F/%252e", "")
            == "/vendors/a%20b/%C3%BC/%3F/%252e")


def test_target_keeps_trailing_slash() -> None:
    assert url("https://api.openai.com/v1", "/models/") == "https://api.openai.com/v1/models/"


def test_target_for_anthropic_without_v1_in_the_url() -> None:
    assert url("https://api.anthropic.com", "/v1/messages", "beta=true") == "https://api.anthropic.com/v1/messages?beta=true"


@pytest.mark.parametrize(("base", "host", "port", "tls", "header"), [
    ("https://api.openai.com/v1", "api.openai.com", 443, True, "api.openai.com"),
    ("http://erp.internal", "erp.internal", 80, False, "erp.internal"),
    ("http://127.0.0.1:9000/x", "127.0.0.1", 9000, False, "127.0.0.1:9000"),
    ("https://[::1]:8443", "::1", 8443, True, "[::1]:8443"),
    ("https://host:443", "host", 443, True, "host"),
])
def test_origin_of_a_url(base: str, host: str, port: int, tls: bool, header: str) -> None:
    origin = Origin.of(base)
    assert (origin.host, origin.port, origin.tls, origin.host_header) == (host, port, tls, header)


# -- the request head --------------------------------------------------------------------------------------------


def test_request_head_is_the_request_line_host_headers_and_length() -> None:
    head = request_head("POST", "/v1/chat?x=1", "api.openai.com", CIMultiDict([("X-A", "1"), ("X-A", "2")]), 12)
    assert head == (b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: api.openai.com\r\nX-A: 1\r\nX-A: 2\r\n"
                    b"Content-Length: 12\r\n\r\n")


def test_request_head_without_a_body_has_no_length() -> None:
    assert request_head("GET", "/", "h", CIMultiDict(), None) == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\0b"])
def test_request_head_refuses_a_value_that_would_split_the_head(value: str) -> None:
    with pytest.raises(GatewayError) as caught:
        request_head("GET", "/", "h", CIMultiDict([("X-Token", value)]), None)
    assert caught.value.type == "bad_request"
    with pytest.raises(GatewayError):
        request_head("GET", "/x" + value, "h", CIMultiDict(), None)


def test_response_headers_keep_content_encoding_of_undecoded_body():
    upstream = CIMultiDictProxy(CIMultiDict({"Content-Encoding": "gzip", "Content-Length": "20"}))
    assert dict(response_headers(upstream)) == {"Content-Encoding": "gzip"}
