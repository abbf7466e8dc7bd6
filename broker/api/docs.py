"""``/docs``: Swagger UI for the OpenAPI document, from assets the broker serves itself.

The Swagger UI files come from the npm package ``swagger-ui-dist`` (pinned in
``web/package.json``), copied by ``make web`` into the dashboard's git-ignored
``static/vendor/swagger-ui/``: no CDN, so nothing is loaded from a third party.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from broker.errors import BrokerError

ASSETS = Path(__file__).resolve().parent.parent / "dashboard" / "static" / "vendor" / "swagger-ui"
PREFIX = "/docs/assets"


class DocsUnavailable(BrokerError):
    status, code, title = 503, "docs_unavailable", "API documentation assets are not installed"


def install(app: FastAPI) -> None:
    """Serve ``/docs`` (the app must be created with ``docs_url=None, redoc_url=None``)."""
    if ASSETS.is_dir():
        app.mount(PREFIX, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if not (ASSETS / "swagger-ui-bundle.js").is_file():
            raise DocsUnavailable("The Swagger UI assets are missing; run `make web` (npm) to install them. "
                                  "The OpenAPI document itself is at /openapi.json.")
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} – API",
            swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js", swagger_css_url=f"{PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{PREFIX}/favicon-32x32.png", oauth2_redirect_url=None)
