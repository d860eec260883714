"""Routes of the web dashboard: `/` and `/ui` redirect to `/ui/`, which serves the page and its assets.

Rules this module enforces:

- only the files shipped in `static/` are served, by exact name from a fixed table read at
  import time: no path from the request ever reaches the filesystem, so no traversal is possible;
- everything the page needs comes from the controller itself (no CDN, no external fonts), and a
  Content-Security-Policy says so to the browser: scripts, styles and API calls from this origin
  only, no inline script, no framing;
- assets are revalidated on each load (`no-cache` + ETag), so an upgraded controller never runs
  an old script against a new API.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from fleet.controller.api.deps import PUBLIC
from fleet.core.errors import NotFoundError

STATIC_DIR = Path(__file__).resolve().parent / "static"
UI_PREFIX = "/ui/"

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# The page builds its DOM and SVG from API JSON with createElement/textContent; nothing needs
# inline script, eval or third-party origins, so the browser may refuse them all.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


def _load_assets(directory: Path) -> dict[str, _Asset]:
    """Every servable file by name; read once, since the files are part of the installed package."""
    assets: dict[str, _Asset] = {}
    if not directory.is_dir():
        return assets
    for path in sorted(directory.iterdir()):
        media_type = _MEDIA_TYPES.get(path.suffix)
        if media_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        assets[path.name] = _Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return assets


_ASSETS = _load_assets(STATIC_DIR)

router = APIRouter(include_in_schema=False)


def _serve(request: Request, name: str) -> Response:
    asset = _ASSETS.get(name)
    if asset is None:
        if name == "index.html":
            raise NotFoundError(
                f"the dashboard's files are missing from {STATIC_DIR}; reinstall edge-fleet "
                "(its package data includes controller/web/static)"
            )
        raise NotFoundError(f"no dashboard asset named {name!r}")
    headers = {
        "ETag": asset.etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if asset.media_type.startswith("text/html"):
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        headers["X-Frame-Options"] = "DENY"
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/", dependencies=[PUBLIC])
def root() -> RedirectResponse:
    return RedirectResponse(UI_PREFIX, status_code=307)


@router.get("/ui", dependencies=[PUBLIC])
def ui_no_slash() -> RedirectResponse:
    # Relative asset URLs in the page resolve against /ui/, so the slash matters.
    return RedirectResponse(UI_PREFIX, status_code=307)


@router.get(UI_PREFIX, dependencies=[PUBLIC])
def index(request: Request) -> Response:
    return _serve(request, "index.html")


@router.get(UI_PREFIX + "{name}", dependencies=[PUBLIC])
def asset(name: str, request: Request) -> Response:
    return _serve(request, name)


__all__ = ["CONTENT_SECURITY_POLICY", "STATIC_DIR", "UI_PREFIX", "router"]
