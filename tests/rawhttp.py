"""HTTP/1.1 over a bare socket, for requests a client library would tidy up (odd paths, chunked bodies)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import orjson
from multidict import CIMultiDict
from yarl import URL


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def head(method: str, target: str, url: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    """A request line and headers, written exactly as given (plus Host and `Connection: close`)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {URL(url).raw_authority}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if not any(name.lower() == "connection" for name, _ in headers or []):
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def exchange(url: str, data: bytes, limit: float = 10.0) -> RawResponse:
    """Send `data` as is to the server at `url` and read one response, until the server closes."""
    parsed = URL(url)
    assert parsed.host is not None and parsed.port is not None
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    try:
        async with asyncio.timeout(limit):
            writer.write(data)
            await writer.drain()
            return await read_response(reader)
    finally:
        writer.close()
        # The server may reset a connection whose body it did not read.
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def request(url: str, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                  body: bytes = b"") -> RawResponse:
    """One request with a fixed-length body (Content-Length added when there is a body)."""
    all_headers = list(headers or [])
    if body:
        all_headers.append(("Content-Length", str(len(body))))
    return await exchange(url, head(method, target, url, all_headers) + body)


def chunked(body: bytes, size: int) -> bytes:
    """`body` in Transfer-Encoding: chunked framing, `size` bytes a chunk, with the final empty chunk."""
    out = bytearray()
    for start in range(0, len(body), size):
        piece = body[start:start + size]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


async def read_response(reader: asyncio.StreamReader, bodiless: bool = False) -> RawResponse:
    """One response from `reader`: its body framed by length, chunked or by the server closing. `bodiless` for an
    answer to HEAD (1xx, 204 and 304 answers have no body anyway)."""
    status_line = (await reader.readline()).decode("latin-1")
    if not status_line:
        raise ConnectionError("the server closed the connection without answering")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1."):  # e.g. body bytes a server wrote where none belonged
        raise ValueError(f"not a status line: {status_line!r}")
    status = int(rest.split(" ", 1)[0])
    headers: CIMultiDict[str] = CIMultiDict()
    while (line := (await reader.readline()).decode("latin-1").rstrip("\r\n")):
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    if bodiless or status < 200 or status in (204, 304):
        body = b""
    elif "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    elif headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.read()
    return RawResponse(status, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readline()).strip():  # trailers
                pass
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)
