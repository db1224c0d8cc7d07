"""/docs (Swagger UI) and /redoc served with their scripts and styles from this server, so they work offline.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, which leaves them blank on a machine without internet
access. The bundles come from the `fastapi-offline` package (MIT; it ships Swagger UI, Apache-2.0, and ReDoc,
MIT, unchanged); only its files are used, mounted under STATIC_PREFIX, and the pages are FastAPI's own
`get_swagger_ui_html` / `get_redoc_html` pointed at them.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_PREFIX", "ASSETS", "static_dir", "install_docs"]

STATIC_PREFIX = "/static/docs"
# The files the two pages load, by role.
ASSETS = {"swagger_js": "swagger-ui-bundle.js", "swagger_css": "swagger-ui.css",
          "redoc_js": "redoc.standalone.js", "favicon": "favicon.png"}


def static_dir() -> Path:
    """The folder holding the bundles (inside the installed fastapi-offline package)."""
    try:
        folder = Path(str(files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        raise RuntimeError("the API serves /docs and /redoc from the fastapi-offline package, which is not installed: "
                           "pip install fastapi-offline (it is part of s3search[service])") from None
    missing = [name for name in ASSETS.values() if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline at {folder} lacks {', '.join(missing)}: reinstall s3search[service]")
    return folder


def install_docs(app: FastAPI) -> None:
    """Add /docs, its OAuth2 redirect page, /redoc and the static files; call on an app made with
    docs_url=None, redoc_url=None."""
    app.mount(STATIC_PREFIX, StaticFiles(directory=static_dir()), name="docs-static")
    url = {role: f"{STATIC_PREFIX}/{name}" for role, name in ASSETS.items()}
    oauth2_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url=url["swagger_js"], swagger_css_url=url["swagger_css"],
                                   swagger_favicon_url=url["favicon"], oauth2_redirect_url=oauth2_redirect)

    @app.get(oauth2_redirect, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url=url["redoc_js"], redoc_favicon_url=url["favicon"],
                              with_google_fonts=False)
