"""read_body: the whole request body, bounded, whether it arrived with the headers or after them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import rawhttp

from gateway.errors import GatewayError
from gateway.http_server import AgentServer, Request, Response
from gateway.pipeline import read_body

LIMIT = 1024
GUARD = 5.0
BODY = b'{"amount": 12, "note": "\xe2\x82\xac\r\n"}'


@contextlib.asynccontextmanager
async def reading(limit: int = LIMIT) -> AsyncIterator[tuple[int, asyncio.Event, list[bytes | GatewayError]]]:
    """A server whose handler reads each body with read_body and records what it got; its port, and an event set
    when the handler starts (the request's head is in)."""
    started = asyncio.Event()
    got: list[bytes | GatewayError] = []

    async def handler(request: Request) -> Response:
        started.set()
        try:
            got.append(await read_body(request))
        except GatewayError as exc:
            got.append(exc)
        return Response(200)

    def unparsed(message: str) -> Response:
        raise AssertionError(message)

    server = AgentServer(handler, unparsed, limit)
    try:
        yield await server.start("127.0.0.1", 0), started, got
    finally:
        await server.close(0)


def head(framing: str, length: int) -> bytes:
    header = f"Content-Length: {length}" if framing == "length" else "Transfer-Encoding: chunked"
    return f"POST /erp/payments HTTP/1.1\r\nHost: a\r\n{header}\r\nConnection: close\r\n\r\n".encode()


def framed(framing: str, body: bytes) -> bytes:
    return body if framing == "length" else rawhttp.chunked(body, 5)


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_read_body_takes_a_body_that_arrived_with_the_headers(framing: str) -> None:
    async with reading() as (port, _, got):
        response = await rawhttp.exchange(f"http://127.0.0.1:{port}", head(framing, len(BODY)) + framed(framing, BODY))
        assert response.status == 200
        assert got == [BODY]


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_read_body_awaits_a_body_arriving_after_the_headers(framing: str) -> None:
    async with reading() as (port, started, got):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(GUARD):
                writer.write(head(framing, len(BODY)))
                await started.wait()  # the handler is in read_body with no byte of the body yet
                data = framed(framing, BODY)
                writer.write(data[:7])
                writer.write(data[7:])
                response = await rawhttp.read_response(reader)
        finally:
            writer.close()
            await writer.wait_closed()
        assert response.status == 200
        assert got == [BODY]


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_read_body_refuses_a_body_over_the_limit_as_payload_too_large(framing: str) -> None:
    body = b"x" * (LIMIT + 1)
    async with reading() as (port, _, got):
        # Declared over the limit, the body is never needed: send only the head then.
        data = head(framing, len(body)) + (framed(framing, body) if framing == "chunked" else b"")
        await rawhttp.exchange(f"http://127.0.0.1:{port}", data)
        (refused,) = got
        assert isinstance(refused, GatewayError) and refused.type == "payload_too_large"
        assert str(LIMIT) in refused.message
