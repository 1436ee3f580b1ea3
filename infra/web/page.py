"""The browser page: the playground and the operator console, served at `/` from `static/`.

The page is static files (HTML, CSS, ES modules; nothing to build) that use only the public
API, as any client does: the forms are made from the OpenAPI document's request models, the key
travels as `Authorization: Bearer` (kept in the tab's sessionStorage, never in a URL), jobs are
followed through `stream/{id}` read with fetch (EventSource cannot send the header), falling back
to polling `fetch`.

- `GET /` answers `static/index.html`; `GET /static/<file>` the other files. Both carry a strict
  Content-Security-Policy: scripts, styles, fonts and connections from this origin only, no inline
  script or style, no plugins, no framing, no `<base>`; images (and media) from this origin,
  `data:` and `blob:` URLs, plus the origins of the S3 bucket outputs go to when there is one
  (its public URL, its endpoint and the bucket's virtual host, for presigned `temp` links), read
  from the storage as it is at each request of the page.
- `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`, and `Cache-Control:
  no-cache` (the browser revalidates, so a new release's files are picked up at once).
- None of it is in the OpenAPI document: it is not part of the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

if TYPE_CHECKING:
    from infra.runtime import Runtime

STATIC = Path(__file__).resolve().parent / "static"
ASSETS_ROUTE = "/static"
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def content_security_policy(image_origins: list[str] = ()) -> str:
    images = " ".join(["'self'", "data:", "blob:", *image_origins])
    return "; ".join([
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        f"img-src {images}",
        f"media-src {images}",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])


def storage_origins(described: dict) -> list[str]:
    """The origins output links can have, from a storage's `describe()` (no secrets in it): none for
    local files (served by this app), else the bucket's public URL, endpoint and virtual host."""
    origins = []
    endpoint = urlparse(str(described.get("endpoint_url") or ""))
    for url in (urlparse(str(described.get("public_url") or "")), endpoint):
        if url.scheme in ("http", "https") and url.netloc:
            origins.append(f"{url.scheme}://{url.netloc}")
    bucket = described.get("bucket")
    if bucket and described.get("addressing_style") == "virtual" and endpoint.scheme in ("http", "https"):
        origins.append(f"{endpoint.scheme}://{bucket}.{endpoint.netloc}")
    return list(dict.fromkeys(origins))


class _Assets(StaticFiles):
    """The page's files, with its headers."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update({**COMMON_HEADERS, "Content-Security-Policy": content_security_policy()})
        return response


def add_page(app: FastAPI, runtime: Runtime) -> None:
    """`/` and `/static/...` on `app` (see the module docstring)."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page():
        policy = content_security_policy(storage_origins(runtime.storage.describe()))
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={**COMMON_HEADERS, "Content-Security-Policy": policy})

    app.mount(ASSETS_ROUTE, _Assets(directory=STATIC), name="static")
