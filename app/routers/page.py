"""``GET /``: the browser page (``app/static/``): pick an image, type labels, see the answer and where it exited.

Plain HTML, CSS and JavaScript served as files: nothing to build, nothing loaded from another origin. The page and
its assets are public (app/auth.py); the page sends the API key the user types with each API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
STATIC_URL = "/static"
DOCS_ASSETS_URL = f"{STATIC_URL}/docs"  # Swagger UI / ReDoc files from fastapi-offline, mounted before STATIC_URL

# The browser enforces what the page promises: every script, style, image and API call comes from this origin
# (blob: and data: are the user's own image, previewed locally), and no other site may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    """The classification page."""
    return FileResponse(
        STATIC_DIR / "index.html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
    )
