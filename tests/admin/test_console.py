"""The web console's files: public, typed, uncached, free of secrets; the admin API behind it stays closed."""

from __future__ import annotations

import re

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, SECRET, UPSTREAM_KEYS, Stack
from rawhttp import request as raw_request

from gateway.admin.console import STATIC

FILES = sorted(p.name for p in STATIC.iterdir() if p.is_file())
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


def test_console_ships_its_files() -> None:
    assert {"index.html", "app.js", "api.js", "dom.js", "approvals.js", "traces.js", "agents.js",
            "console.css", "favicon.svg"} <= set(FILES)


@pytest.mark.parametrize("name", FILES)
async def test_console_file_served_without_token(stack: Stack, name: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{stack.admin_url}/console/{name}") as resp:
        body = await resp.read()
        assert resp.status == 200, body
        assert resp.content_type == TYPES[name[name.rindex("."):]]
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert body == (STATIC / name).read_bytes()


async def test_console_index_served_at_its_folder(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{stack.admin_url}/console/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.charset == "utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert await resp.read() == (STATIC / "index.html").read_bytes()


@pytest.mark.parametrize("path", ["/", "/console"])
async def test_root_redirects_to_console(stack: Stack, path: str) -> None:
    async with (aiohttp.ClientSession() as http,
                http.get(f"{stack.admin_url}{path}", allow_redirects=False) as resp):
        assert resp.status == 302
        assert resp.headers["Location"] == "/console/"


@pytest.mark.parametrize("name", ["nope.js", ".gitignore", "console.py", "index.html.bak"])
async def test_console_unknown_file_not_found(stack: Stack, name: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{stack.admin_url}/console/{name}") as resp:
        assert resp.status == 404


@pytest.mark.parametrize("path", ["/approvals", "/approvals?status=pending", "/agents/invoice-bot/usage",
                                  "/approvals/x/approve"])
async def test_api_refuses_without_token(stack: Stack, path: str) -> None:
    method = "POST" if path.endswith("/approve") else "GET"
    async with aiohttp.ClientSession() as http, http.request(method, f"{stack.admin_url}{path}") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "unauthenticated"


@pytest.mark.parametrize("target", ["/console/../approvals", "/console/%2e%2e/approvals",
                                    "/console/..%2fapprovals", "/console/..%5capprovals",
                                    "/console/..%2f..%2fpyproject.toml", "/console/%2e%2e%2fauth.py"])
async def test_console_prefix_opens_nothing_else(stack: Stack, target: str) -> None:
    """The public `/console/` prefix must not reach an API route or a file outside the static folder."""
    resp = await raw_request(stack.admin_url, "GET", target)
    assert resp.status in (400, 404), (resp.status, resp.body[:200])
    assert b'"approvals"' not in resp.body and b"[project]" not in resp.body and b"import" not in resp.body


async def test_api_still_answers_with_token(stack: Stack) -> None:
    async with (aiohttp.ClientSession(headers=stack.admin_headers) as http,
                http.get(f"{stack.admin_url}/approvals", params={"status": "pending"}) as resp):
        assert resp.status == 200
        assert (await resp.json()) == {"approvals": []}


@pytest.mark.parametrize("name", FILES)
def test_console_file_holds_no_secret(name: str) -> None:
    text = (STATIC / name).read_text()
    for secret in [ADMIN_TOKEN, SECRET.decode(), *UPSTREAM_KEYS.values()]:
        assert secret not in text
    assert not re.search(r"Bearer\s+[A-Za-z0-9._-]{8,}", text), "a literal bearer token"
    assert not re.search(r"eyJ[A-Za-z0-9_-]{10,}\.", text), "a literal JWT"


def test_console_html_runs_no_inline_code() -> None:
    """Every script is a file (the CSP forbids inline code); no inline handlers, no inline styles."""
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="app.js">']
    assert re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S) == [""]
    assert re.search(r"\son[a-z]+\s*=", html) is None
    assert "<style" not in html and "style=" not in html


@pytest.mark.parametrize("name", [n for n in FILES if n.endswith(".js")])
def test_console_script_builds_dom_without_markup(name: str) -> None:
    """Server text (reasons, evidence) is untrusted: it must only ever become text nodes."""
    code = (STATIC / name).read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in code, sink
