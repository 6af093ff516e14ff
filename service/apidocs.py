"""The interactive API documentation, served entirely by this service: ``/docs`` (Swagger UI) and ``/redoc``
(ReDoc), both reading ``/openapi.json``.

FastAPI's own pages load their JavaScript and CSS from a CDN, so they are blank on a machine without internet
access. Here the assets come from the ``fastapi-offline`` package (pinned in pyproject.toml; it bundles the
Swagger UI and ReDoc builds, and this module uses only its files) and are served under ``/docs/assets``. Swagger
UI's online validator badge is off (it would call validator.swagger.io), ReDoc gets no Google Fonts link, and
both pages carry a Content-Security-Policy that lets them load and call nothing but this service (ReDoc's
"API docs by Redocly" footer would otherwise fetch its logo from cdn.redoc.ly).
``tests/service/test_docs_pages.py`` opens both pages in headless Chromium with every other host unreachable.

This module knows the pages and their assets; the document itself is ``service.openapi``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_URL", "CSP", "assets_dir", "install"]

ASSETS_URL = "/docs/assets"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
# Inline script and styles: FastAPI's page templates start Swagger UI inline; both UIs inject styles. ReDoc
# runs its search in a worker made from a blob: URL.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
       "frame-ancestors 'self'; base-uri 'self'; form-action 'self'")


def assets_dir() -> Path:
    """The folder of the bundled Swagger UI and ReDoc files; an error naming the missing ones if a release of
    ``fastapi-offline`` moved them."""
    folder = Path(str(resources.files("fastapi_offline") / "static"))
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline no longer ships {', '.join(missing)} in {folder}: pin the version "
                           "in pyproject.toml that does")
    return folder


def install(app: FastAPI, *, dependencies: Sequence[Any] = (), openapi_url: str = "/openapi.json",
            docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add ``/openapi.json``, the two pages and their assets to ``app`` (created with ``openapi_url=None,
    docs_url=None, redoc_url=None``). ``dependencies`` guard the document and the pages (the API key when keys
    are on); the assets are the public Swagger UI and ReDoc builds and need none."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    docs = APIRouter(include_in_schema=False, dependencies=list(dependencies))

    @docs.get(openapi_url)
    def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @docs.get(docs_url)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None})
        page.headers["Content-Security-Policy"] = CSP
        return page

    @docs.get(redoc_url)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False)
        page.headers["Content-Security-Policy"] = CSP
        return page

    app.include_router(docs)
