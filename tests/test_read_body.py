"""read_body: the whole request body, bounded, whether it arrived with the headers or after them."""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from aiohttp import streams
from aiohttp.test_utils import make_mocked_request

from gateway.errors import GatewayError
from gateway.pipeline import read_body


def request_with(stream: streams.StreamReader, length: int | None) -> object:
    headers = {"Content-Length": str(length)} if length is not None else {"Transfer-Encoding": "chunked"}
    return make_mocked_request("POST", "/erp/payments", headers=headers, payload=stream)


def new_stream() -> streams.StreamReader:
    return streams.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())


@pytest.mark.parametrize("length", [11, None])
async def test_a_body_that_arrived_with_the_headers_is_taken_whole(length: int | None) -> None:
    stream = new_stream()
    for piece in (b"hello", b" ", b"world"):
        stream.feed_data(piece)
    stream.feed_eof()
    assert await read_body(request_with(stream, length), 1024) == b"hello world"  # type: ignore[arg-type]
    assert stream.at_eof()


@pytest.mark.parametrize("length", [11, None])
async def test_a_body_arriving_after_the_headers_is_awaited_piece_by_piece(length: int | None) -> None:
    stream = new_stream()
    stream.feed_data(b"hel")
    reading = asyncio.ensure_future(read_body(request_with(stream, length), 1024))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # one loop step: the reader takes what is there and waits for more
    assert not reading.done()
    stream.feed_data(b"lo world")
    await asyncio.sleep(0)
    assert not reading.done()  # no end of body yet
    stream.feed_eof()
    assert await reading == b"hello world"


@pytest.mark.parametrize("arrived_whole", [True, False])
async def test_a_body_over_the_limit_is_refused_either_way(arrived_whole: bool) -> None:
    stream = new_stream()
    stream.feed_data(b"x" * 1025)
    if arrived_whole:
        stream.feed_eof()
    with pytest.raises(GatewayError) as refused:
        await read_body(request_with(stream, None), 1024)  # type: ignore[arg-type]
    assert refused.value.type == "payload_too_large"
