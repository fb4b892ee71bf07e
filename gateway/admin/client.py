"""A small client for the admin API (docs/admin-api.md), used by the command line.

aiohttp's errors are translated here: the caller sees `AdminApiError` (the server said no) or
`AdminUnreachable` (nothing answered), never a transport exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
# A stream has no end; the server's keep-alive comment every 15 s keeps a read from going quiet for longer than this.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
MAX_EVENT = 16 * 2**20  # one trace event's line; events with recorded bodies can be large


class AdminApiError(Exception):
    """The admin API answered with an error: its status, error type and message."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


class AdminUnreachable(Exception):
    """Nothing answered at the admin URL (refused, timed out, or the connection broke)."""

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"cannot reach the admin API at {url} ({cause})")
        self.url = url


class AdminClient:
    """`async with AdminClient(url, token) as admin: await admin.approvals()`."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        self._session = aiohttp.ClientSession(headers=self._headers)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use AdminClient in 'async with'")
        return self._session

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      body: dict[str, Any] | None = None) -> Any:
        """One call; the decoded JSON answer, or AdminApiError / AdminUnreachable."""
        try:
            async with self.session.request(method, self.url + path, params=params, json=body,
                                            timeout=REQUEST_TIMEOUT) as response:
                data = await response.read()
                if response.status >= 400:
                    raise _api_error(response.status, data)
        except aiohttp.InvalidURL as exc:
            raise AdminUnreachable(self.url, "not a valid URL") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdminUnreachable(self.url, _cause(exc)) from exc
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise AdminApiError(response.status, "bad_response", "the admin API answered with invalid JSON") from exc

    async def approvals(self, status: str | None = None, agent: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("status", status), ("agent", agent)) if v}
        answer = await self.request("GET", "/approvals", params=params)
        approvals: list[dict[str, Any]] = answer["approvals"]
        return approvals

    async def decide(self, approval_id: str, verdict: str, reason: str, category: str | None = None,
                     remember: str | None = None) -> dict[str, Any]:
        """`verdict` is `approve` or `deny`; the answer is the decided approval."""
        body: dict[str, Any] = {"reason": reason}
        if category is not None:
            body["category"] = category
        if remember is not None:
            body["remember"] = remember
        answer: dict[str, Any] = await self.request("POST", f"/approvals/{_segment(approval_id)}/{verdict}",
                                                    body=body)
        return answer

    async def set_paused(self, agent: str, paused: bool, reason: str | None) -> dict[str, Any]:
        """Pause or resume an agent; the answer is its card."""
        body = {"reason": reason} if reason is not None else {}
        action = "pause" if paused else "resume"
        answer: dict[str, Any] = await self.request("POST", f"/agents/{_segment(agent)}/{action}", body=body)
        return answer

    async def traces(self, agent: str | None = None, decision: str | None = None) -> AsyncIterator[bytes]:
        """Each trace event's JSON from `GET /traces/stream`, as it is written, until the server ends the stream."""
        params = {k: v for k, v in (("agent", agent), ("decision", decision)) if v}
        try:
            async with self.session.get(self.url + "/traces/stream", params=params,
                                        timeout=STREAM_TIMEOUT) as response:
                if response.status >= 400:
                    raise _api_error(response.status, await response.read())
                data: list[bytes] = []
                while raw := await response.content.readline(max_line_length=MAX_EVENT):
                    line = raw.rstrip(b"\r\n")
                    if line.startswith(b"data:"):
                        data.append(line[5:].removeprefix(b" "))
                    elif not line and data:  # a blank line ends an event
                        yield b"\n".join(data)
                        data = []
        except aiohttp.InvalidURL as exc:
            raise AdminUnreachable(self.url, "not a valid URL") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdminUnreachable(self.url, _cause(exc)) from exc


def _segment(value: str) -> str:
    return quote(value, safe="")


def _cause(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection refused" if isinstance(exc.os_error, ConnectionRefusedError) else str(exc.os_error)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _api_error(status: int, data: bytes) -> AdminApiError:
    """The server's own error message when it sent one (`{"error": {"type", "message"}}`), else its text."""
    try:
        error = orjson.loads(data)["error"]
        return AdminApiError(status, str(error["type"]), str(error["message"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return AdminApiError(status, "http_error", data.decode(errors="replace").strip() or f"HTTP {status}")
