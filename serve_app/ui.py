"""The web page: static files in ``serve_app/static`` (HTML, CSS, ES modules; no build step).

The ingress serves ``index.html`` at ``/`` and ``/ui``, every other file under ``/ui/<path>``,
and the page's settings at ``/ui/settings.json``. The page links its files relatively
(``ui/app.js``), so it works under any Serve ``route_prefix``. Front-end libraries are
vendored under ``static/vendor/`` (see their VENDORED.json); nothing is loaded from a CDN, and
the Content-Security-Policy of the page only allows its own origin.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX_FILE = "index.html"

#: File suffix -> Content-Type. A suffix not listed is not served (404), so stray files stay private.
CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

#: The browser may load scripts, styles, images and data from this origin only (plus blob:/data:
#: URLs the page makes itself from API responses, which carry the API key header).
#: 'wasm-unsafe-eval' lets model-viewer compile its bundled WebAssembly (no JS eval).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' blob: data:; connect-src 'self' blob: data:; media-src 'self' blob:; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
)

#: Vendored files never change under one name (their version is in VENDORED.json); the page's own may.
VENDOR_CACHE = "public, max-age=86400"
PAGE_CACHE = "no-cache"

#: Default ports of the monitoring UIs, on the host the page was loaded from.
RAY_DASHBOARD_PORT = 8265
GRAFANA_PORT = 3000


def static_file(rel: str) -> tuple[Path, str] | None:
    """``(path, content_type)`` of ``static/<rel>``, or None when it is absent or not servable.

    ``rel`` is a URL path below ``/ui/``; absolute paths, ``..`` and hidden names are refused
    (None), as are suffixes outside :data:`CONTENT_TYPES`.
    """
    parts = PurePosixPath(rel or INDEX_FILE).parts
    if not parts or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p for p in parts) or rel.startswith("/"):
        return None
    path = STATIC_DIR.joinpath(*parts)
    content_type = CONTENT_TYPES.get(path.suffix.lower())
    if content_type is None or not path.is_file() or STATIC_DIR not in path.resolve().parents:
        return None
    return path, content_type


def headers_for(rel: str, content_type: str) -> dict[str, str]:
    """Cache and security headers of one static file."""
    headers = {
        "Cache-Control": VENDOR_CACHE if rel.startswith("vendor/") else PAGE_CACHE,
        "X-Content-Type-Options": "nosniff",
    }
    if content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        headers["Referrer-Policy"] = "no-referrer"
    return headers


def page_settings(
    *,
    models: list[str],
    default_preset: str,
    max_upload_bytes: int,
    dashboard_url: str | None,
    grafana_url: str | None,
    version: str,
) -> dict:
    """What the page needs to know about this deployment (GET /ui/settings.json).

    A monitoring URL of None means "the default port on the page's own host"; the page fills
    it in, because only the browser knows the host name it used.
    """
    return {
        "version": version,
        "models": list(models),
        "default_preset": default_preset,
        "max_upload_bytes": max_upload_bytes,
        "dashboard_url": dashboard_url,
        "dashboard_port": RAY_DASHBOARD_PORT,
        # Ray reads the browser-facing Grafana address from RAY_GRAFANA_IFRAME_HOST too.
        "grafana_url": grafana_url or os.environ.get("RAY_GRAFANA_IFRAME_HOST") or None,
        "grafana_port": GRAFANA_PORT,
    }
