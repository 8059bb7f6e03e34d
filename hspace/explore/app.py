"""The explorer's web app: one static page and its JSON endpoints (Starlette), served by uvicorn.

Endpoints (all JSON unless noted; errors are ``{"error": message}`` with status 400 for a bad
field or an unknown one (the message names it and the accepted fields), 404 for a missing thing,
409 for a damaged catalog, 413 for an upload over the limit, 415 for a body of the wrong type):

- ``GET /``: the page (``static/index.html``, plain HTML + JS, no build step)
- ``GET /api/catalog``: catalog URL, loaded model, models with versions and refs
- ``GET /api/version?model=&ref=``: a version's sampler, directions (kind, units, provenance,
  grade, preview, effect row), effect columns
- ``GET /api/preview/{model}/{version}/previews/{name}.png``: a preview strip (PNG, verified)
- ``GET /api/diff?model=&a=&b=``: cosine per direction between two versions
- ``POST /api/render``: ``{client, seq, model, version, seeds | image, edits, units, mode,
  steps, sampler, preempt}`` -> ``{seq, images}`` or ``{seq, superseded: true}`` (latest request
  wins)
- ``POST /api/preempt``: ``{client, seq}`` (slider released): cancel the render in progress if it
  only holds that client's requests older than ``seq``
- ``POST /api/invert?model=&ref=``: body = image file bytes -> ``{image, psnr, original,
  reconstruction}``
- ``POST /api/swap``: ``{model, version, seeds_a, seeds_b, sampler, steps}`` -> ``{a, b, swapped}``
- ``GET /api/stats``: render queue counters (requests rendered, dropped, batches)

POST bodies of the JSON endpoints must be ``Content-Type: application/json``; uploads
``application/octet-stream`` or ``image/*``, read in chunks and refused (413) as soon as they pass
:data:`~hspace.explore.explorer.MAX_UPLOAD_BYTES`, with or without a Content-Length. Who may ask at
all (Host names, origins, the access token) is :mod:`hspace.explore.guard`'s job.

Model work runs on the :class:`~hspace.explore.render_queue.RenderQueue` worker; catalog reads
run in Starlette's thread pool, so a slow storage backend never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from hspace.explore.explorer import MAX_UPLOAD_BYTES, PREEMPT_FIELDS, SWAP_FIELDS, Explorer, check_fields
from hspace.explore.guard import AccessPolicy, RequestGuard
from hspace.explore.render_queue import SUPERSEDED, RenderQueue

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable

STATIC_DIR = Path(__file__).parent / "static"

__all__ = ["PayloadTooLarge", "UnsupportedMediaType", "create_app", "bind_socket", "serve"]

#: Content types the upload endpoint takes (the page sends application/octet-stream).
UPLOAD_TYPES = ("application/octet-stream", "image/")


class UnsupportedMediaType(ValueError):
    """A request body of a type the endpoint does not take (415)."""


class PayloadTooLarge(ValueError):
    """A request body over the endpoint's limit (413)."""


def _error_status(error: BaseException) -> int | None:
    """HTTP status for an expected error (bad request, missing thing, damaged catalog), None for a bug."""
    if isinstance(error, UnsupportedMediaType):
        return 415
    if isinstance(error, PayloadTooLarge):
        return 413
    catalog = sys.modules.get("hspace.catalog")
    if catalog is not None and isinstance(error, catalog.CatalogError):
        return 409
    if isinstance(error, (FileNotFoundError, KeyError)):
        return 404
    if isinstance(error, ValueError):
        return 400
    return None


def _json_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as error:
            status = _error_status(error)
            if status is None:
                raise
            return JSONResponse({"error": str(error) or type(error).__name__}, status_code=status)

    return wrapped


def _param(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise ValueError(f"query parameter {name!r} is required")
    return value


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _json_body(request: Request) -> dict[str, Any]:
    """The JSON object of a POST body sent as ``application/json`` (415 otherwise: a browser sends
    other types, such as text/plain, from any site without asking the server first)."""
    if _media_type(request) != "application/json":
        raise UnsupportedMediaType(
            f"the request body must be Content-Type: application/json, got {_media_type(request) or 'none'}"
        )
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    return body


def _client_seq(body: dict[str, Any]) -> tuple[str, int]:
    """The page's id and the request's sequence number (latest wins per page)."""
    client, seq = body.get("client"), body.get("seq")
    if not isinstance(client, str) or not client or isinstance(seq, bool) or not isinstance(seq, int):
        raise ValueError("render requests need a client id (string) and a sequence number (int)")
    return client, seq


def _explorer(request: Request) -> Explorer:
    return request.app.state.explorer


def _queue(request: Request) -> RenderQueue:
    return request.app.state.queue


async def _on_worker(request: Request, fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.wrap_future(_queue(request).run(fn, *args))


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})


async def catalog(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(_explorer(request).overview))


async def version(request: Request) -> Response:
    # on the worker: the slider range of a unit direction without sigma may need one sample
    model, ref = _param(request, "model"), _param(request, "ref")
    return JSONResponse(await _on_worker(request, _explorer(request).version_info, model, ref))


async def preview(request: Request) -> Response:
    p = request.path_params
    relpath = f"previews/{p['name']}"
    data = await run_in_threadpool(_explorer(request).preview, p["model"], p["version"], relpath)
    return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=86400, immutable"})


async def diff(request: Request) -> Response:
    model, a, b = _param(request, "model"), _param(request, "a"), _param(request, "b")
    return JSONResponse(await run_in_threadpool(_explorer(request).diff, model, a, b))


async def render(request: Request) -> Response:
    body = await _json_body(request)
    client, seq = _client_seq(body)
    key, job = await run_in_threadpool(_explorer(request).render_job, body)
    preempt = body.get("preempt") is True
    result = await asyncio.wrap_future(_queue(request).submit(client, seq, key, job, preempt=preempt))
    if result is SUPERSEDED:
        return JSONResponse({"seq": seq, "superseded": True})
    return JSONResponse({"seq": seq, **result})


async def preempt(request: Request) -> Response:
    body = check_fields(await _json_body(request), PREEMPT_FIELDS, "preempt request")
    client, seq = _client_seq(body)
    return JSONResponse({"cancelled": _queue(request).preempt(client, seq)})


async def read_upload(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk; PayloadTooLarge as soon as it passes ``limit`` bytes
    (at once when Content-Length says so), so a chunked upload without a length is never held
    whole in memory."""
    media = _media_type(request)
    if not media.startswith(UPLOAD_TYPES):
        raise UnsupportedMediaType(
            f"upload: Content-Type must be application/octet-stream or image/*, got {media or 'none'}"
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"upload: {length} bytes is more than the {limit} allowed")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"upload: more than the {limit} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)


async def invert(request: Request) -> Response:
    model, ref = _param(request, "model"), _param(request, "ref")
    data = await read_upload(request, request.app.state.max_upload_bytes)
    return JSONResponse(await _on_worker(request, _explorer(request).invert, model, ref, data))


async def swap(request: Request) -> Response:
    body = check_fields(await _json_body(request), SWAP_FIELDS, "swap request")  # before the queue
    return JSONResponse(await _on_worker(request, _explorer(request).swap, body))


async def stats(request: Request) -> Response:
    return JSONResponse(_queue(request).stats.as_dict())


ROUTES = [
    Route("/", index),
    Route("/api/catalog", _json_errors(catalog)),
    Route("/api/version", _json_errors(version)),
    Route("/api/preview/{model}/{version}/previews/{name}", _json_errors(preview)),
    Route("/api/diff", _json_errors(diff)),
    Route("/api/render", _json_errors(render), methods=["POST"]),
    Route("/api/preempt", _json_errors(preempt), methods=["POST"]),
    Route("/api/invert", _json_errors(invert), methods=["POST"]),
    Route("/api/swap", _json_errors(swap), methods=["POST"]),
    Route("/api/stats", stats),
]


def create_app(
    explorer: Explorer,
    queue: RenderQueue | None = None,
    *,
    policy: AccessPolicy | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> Starlette:
    """The Starlette app over an :class:`Explorer` behind a :class:`~hspace.explore.guard.RequestGuard`
    (default policy: loopback names on any port, no token); makes (and on shutdown closes) its
    render queue."""
    queue = queue or RenderQueue(explorer.render_batch)
    policy = policy or AccessPolicy()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        queue.close()

    app = Starlette(routes=ROUTES, lifespan=lifespan, middleware=[Middleware(RequestGuard, policy=policy)])
    app.state.explorer, app.state.queue, app.state.policy = explorer, queue, policy
    app.state.max_upload_bytes = int(max_upload_bytes)
    return app


def bind_socket(host: str = "127.0.0.1", port: int = 8765) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); IPv6 when ``host`` is."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(app: Starlette, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve ``app`` on an already bound socket with uvicorn until interrupted."""
    # proxy_headers off: nothing in front of the explorer is trusted to rewrite the client or scheme
    config = uvicorn.Config(
        app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2, proxy_headers=False
    )
    uvicorn.Server(config).run(sockets=[sock])
