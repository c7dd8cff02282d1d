"""The playground page: static HTML, JS and CSS shipped in the package, served with strict headers.

::

    GET  /                  the page (its Content-Security-Policy lets it load only its own files)
    GET  /static/{name}     app.js, style.css

The files are read once, by ``Playground.load``, onto ``app.state.playground``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()


@dataclass(frozen=True)
class Playground:
    """The page and its assets, as bytes."""

    page: bytes
    assets: dict[str, bytes]

    @classmethod
    def load(cls) -> Playground:
        static = resources.files("tinygpt.serve") / "static"
        return cls((static / "index.html").read_bytes(),
                   {name: (static / name).read_bytes() for name in STATIC_FILES})


@router.get("/")
async def page(request: Request) -> Response:
    playground: Playground = request.app.state.playground
    return Response(playground.page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/static/{name}")
async def asset(name: str, request: Request) -> Response:
    assets = request.app.state.playground.assets
    if name not in assets:
        raise StarletteHTTPException(404)
    return Response(assets[name], media_type=STATIC_FILES[name] + "; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})
