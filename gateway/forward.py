"""forward: send exactly the classified request upstream with the upstream's credential; stream back."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from multidict import CIMultiDict, CIMultiDictProxy

from .errors import GatewayError
from .incoming import CREDENTIAL_HEADERS
from .policy.compile import Upstream
from .policy.spec import UpstreamSpec
from .upstream_client import Origin, UpstreamClosed, UpstreamConnectFailed, UpstreamPool, UpstreamResponse

# RFC 9110 7.6.1 hop-by-hop headers, plus the legacy Proxy-Connection; those named in Connection join them.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
# Set by the gateway itself (or by aiohttp from the body), never copied from the agent.
_GATEWAY_SET = frozenset({"host", "content-length", "traceparent", "tracestate", "accept-encoding", "expect"})
# Stripped from the upstream's answer: the gateway recomputes framing. Content-Encoding stays: bytes pass
# through undecoded, so an upstream that compresses despite `identity` still sends a labelled body.
_RESPONSE_DROP = frozenset({"content-length", "server", "date"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with a Content-Length even when empty


Headers = CIMultiDict[str] | CIMultiDictProxy[str]


def _named_in_connection(headers: Headers) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


@functools.cache
def _request_drop(credential_header: str | None) -> frozenset[str]:
    drop = HOP_BY_HOP | CREDENTIAL_HEADERS | _GATEWAY_SET
    return drop | {credential_header.lower()} if credential_header is not None else drop


def upstream_headers(headers: Headers, upstream: UpstreamSpec, traceparent: str) -> CIMultiDict[str]:
    """The agent's headers less hop-by-hop, credentials and gateway-owned ones; then the gateway's own.

    Headers the gateway sets are added after filtering, so `Connection: authorization` from an agent
    can drop the agent's own header but never the injected upstream credential.
    """
    credential = upstream.credential
    drop = _request_drop(credential.header if credential is not None else None)
    if "connection" in headers:
        drop = drop | _named_in_connection(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    # Identity encoding: usage is read from the bytes as they pass, and the agent gets them unchanged.
    out["Accept-Encoding"] = "identity"
    out["traceparent"] = traceparent
    if credential is not None:
        out[credential.header] = credential.value
    return out


_RESPONSE_DROP_ALL = HOP_BY_HOP | _RESPONSE_DROP


def response_headers(headers: Headers) -> CIMultiDict[str]:
    drop = _RESPONSE_DROP_ALL | _named_in_connection(headers) if "connection" in headers else _RESPONSE_DROP_ALL
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


def request_target(origin: Origin, path: str, query: str) -> str:
    """The routing rule: the path below the upstream and the raw query, appended to the upstream's url path."""
    target = origin.base_path + path  # the normalised path always starts with "/"
    return target + "?" + query if query else target


def request_head(method: str, target: str, host: str, headers: CIMultiDict[str], length: int | None) -> bytes:
    """The request line and headers, as sent upstream. No value can smuggle a second header or request."""
    lines = [f"{method} {target} HTTP/1.1\r\n", f"Host: {host}\r\n"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}\r\n")
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    lines.append("\r\n")
    head = "".join(lines)
    # aiohttp's server refuses CR, LF and NUL in what agents send; a credential from the rules or the path is
    # checked here, once, on the whole head: exactly one CRLF per line, and no bare CR or LF anywhere.
    if head.count("\n") != len(lines) or head.count("\r") != len(lines) or "\0" in head:
        raise GatewayError("bad_request", "a header or the path holds a line break or NUL")
    return head.encode("utf-8", "surrogateescape")


async def send(pool: UpstreamPool, upstream: Upstream, method: str, target: str, headers: CIMultiDict[str],
               body: bytes) -> UpstreamResponse:
    """Open the upstream response (headers read, body not); foreign errors become gateway errors."""
    spec = upstream.spec
    length = len(body) if body or method in _BODY_METHODS else None
    head = request_head(method, target, upstream.origin.host_header, headers, length)
    try:
        return await pool.request(upstream.origin, spec.tls, method, head, body, spec.connect_timeout,
                                  spec.read_timeout)
    except TimeoutError as exc:
        raise GatewayError("upstream_timeout", f"upstream {spec.name!r} did not answer in time") from exc
    except UpstreamConnectFailed as exc:
        raise GatewayError("upstream_error", f"upstream {spec.name!r} failed: cannot connect ({exc})") from exc
    except UpstreamClosed as exc:
        raise GatewayError("upstream_error", f"upstream {spec.name!r} failed: {exc}") from exc


@contextlib.contextmanager
def reading_body(upstream: UpstreamSpec) -> Iterator[None]:
    """The upstream's failures while its body is read, as gateway errors."""
    try:
        yield
    except TimeoutError as exc:
        raise GatewayError("upstream_timeout", f"upstream {upstream.name!r} stalled mid-response") from exc
    except UpstreamClosed as exc:
        raise GatewayError("upstream_error", f"upstream {upstream.name!r} broke off its response") from exc


async def read_small(upstream_response: UpstreamResponse, upstream: UpstreamSpec) -> bytes:
    """The whole body of a small answer whose length is known; foreign errors become gateway errors."""
    with reading_body(upstream):
        return await upstream_response.read()
