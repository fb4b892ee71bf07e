"""The web console: its static files under `/console/`, and `/` sent there. The files hold no secret."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"

# A fixed table rather than `mimetypes`, which reads the host's /etc/mime.types: module scripts must be served
# as JavaScript everywhere, or the browser refuses to run them.
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

# Scripts and styles come from the console's own files only: even if some server text slipped into the DOM as
# markup, it could not run. `connect-src 'self'` keeps the token from being sent anywhere but this admin port.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
}


def _file(name: str) -> web.FileResponse:
    """One file straight from the static folder: no sub-folders, no dot files, only the known types."""
    path = STATIC / name
    content_type = CONTENT_TYPES.get(path.suffix)
    if "/" in name or "\\" in name or name.startswith(".") or content_type is None or not path.is_file():
        raise web.HTTPNotFound(text="no such console file")
    response = web.FileResponse(path, headers=HEADERS)
    response.content_type = content_type
    response.charset = "utf-8"
    return response


async def index(request: web.Request) -> web.FileResponse:
    return _file("index.html")


async def asset(request: web.Request) -> web.FileResponse:
    return _file(request.match_info["file"])


async def to_console(request: web.Request) -> web.Response:
    raise web.HTTPFound("/console/")


def add_console(app: web.Application) -> None:
    """Serve the console on `app` (the admin application). Call before the app starts (the router freezes)."""
    app.router.add_get("/", to_console)
    app.router.add_get("/console", to_console)
    app.router.add_get("/console/", index)
    app.router.add_get("/console/{file}", asset)
