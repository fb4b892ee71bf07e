"""forward: send exactly the classified request upstream with the upstream's credential; stream back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import GatewayError
from .incoming import CREDENTIAL_HEADERS
from .policy.spec import UpstreamSpec

# RFC 9110 7.6.1 hop-by-hop headers, plus the legacy Proxy-Connection; those named in Connection join them.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
# Set by the gateway itself (or by aiohttp from the body), never copied from the agent.
_GATEWAY_SET = frozenset({"host", "content-length", "traceparent", "tracestate", "accept-encoding", "expect"})
# Stripped from the upstream's answer: the gateway recomputes framing. Content-Encoding stays: bytes pass
# through undecoded, so an upstream that compresses despite `identity` still sends a labelled body.
_RESPONSE_DROP = frozenset({"content-length", "server", "date"})


def _named_in_connection(headers: CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("connection", []):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def upstream_headers(headers: CIMultiDictProxy[str], upstream: UpstreamSpec, traceparent: str) -> CIMultiDict[str]:
    """The agent's headers less hop-by-hop, credentials and gateway-owned ones; then the gateway's own.

    Headers the gateway sets are added after filtering, so `Connection: authorization` from an agent
    can drop the agent's own header but never the injected upstream credential.
    """
    drop = HOP_BY_HOP | _named_in_connection(headers) | CREDENTIAL_HEADERS | _GATEWAY_SET
    if upstream.credential is not None:
        drop = drop | {upstream.credential.header.lower()}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    # Identity encoding: usage is read from the bytes as they pass, and the agent gets them unchanged.
    out["Accept-Encoding"] = "identity"
    out["traceparent"] = traceparent
    if upstream.credential is not None:
        out[upstream.credential.header] = upstream.credential.value
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | _named_in_connection(headers) | _RESPONSE_DROP
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


def target_url(upstream: UpstreamSpec, path: str, query: str) -> URL:
    """The routing rule: the path below the upstream and the raw query, appended to the upstream's url."""
    raw = upstream.url + (path if path != "/" or not upstream.url.endswith("/") else "")
    if query:
        raw += "?" + query
    return URL(raw, encoded=True)


async def send(
    session: aiohttp.ClientSession, upstream: UpstreamSpec, method: str, url: URL,
    headers: CIMultiDict[str], body: bytes,
) -> aiohttp.ClientResponse:
    """Open the upstream response (headers read, body not); foreign errors become gateway errors."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout,
                                    sock_read=upstream.read_timeout)
    try:
        return await session.request(method, url, headers=headers, data=body or None, allow_redirects=False,
                                     timeout=timeout, auto_decompress=False)
    except TimeoutError as exc:
        raise GatewayError("upstream_timeout", f"upstream {upstream.name!r} did not answer in time") from exc
    except aiohttp.ClientError as exc:
        raise GatewayError("upstream_error", f"upstream {upstream.name!r} failed: {type(exc).__name__}") from exc


async def pump(
    upstream_response: aiohttp.ClientResponse, upstream: UpstreamSpec, write: Callable[[bytes], Awaitable[None]],
    observe: Callable[[bytes], None],
) -> None:
    """Copy the body chunk by chunk as it arrives (SSE events are not held back); each chunk is observed."""
    try:
        async for chunk in upstream_response.content.iter_any():
            observe(chunk)
            await write(chunk)
    except TimeoutError as exc:
        raise GatewayError("upstream_timeout", f"upstream {upstream.name!r} stalled mid-response") from exc
    except aiohttp.ClientPayloadError as exc:
        raise GatewayError("upstream_error", f"upstream {upstream.name!r} broke off its response") from exc


async def read_small(upstream_response: aiohttp.ClientResponse, upstream: UpstreamSpec) -> bytes:
    """The whole body of a small answer whose length is known; foreign errors become gateway errors."""
    try:
        return await upstream_response.read()
    except TimeoutError as exc:
        raise GatewayError("upstream_timeout", f"upstream {upstream.name!r} stalled mid-response") from exc
    except aiohttp.ClientPayloadError as exc:
        raise GatewayError("upstream_error", f"upstream {upstream.name!r} broke off its response") from exc
