"""The explorer's web app: one static page and its JSON endpoints (Starlette), served by uvicorn.

Endpoints (all JSON unless noted; errors are ``{"error": message}`` with status 400 or 404):

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
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from hspace.explore.explorer import MAX_UPLOAD_BYTES, Explorer
from hspace.explore.render_queue import SUPERSEDED, RenderQueue

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable

STATIC_DIR = Path(__file__).parent / "static"

__all__ = ["create_app", "bind_socket", "serve"]


def _error_status(error: BaseException) -> int | None:
    """HTTP status for an expected error (bad request, missing thing, damaged catalog), None for a bug."""
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


async def _json_body(request: Request) -> dict[str, Any]:
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
    client, seq = _client_seq(await _json_body(request))
    return JSONResponse({"cancelled": _queue(request).preempt(client, seq)})


async def invert(request: Request) -> Response:
    model, ref = _param(request, "model"), _param(request, "ref")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_UPLOAD_BYTES:
        raise ValueError(f"upload: {length} bytes is more than the {MAX_UPLOAD_BYTES} allowed")
    data = await request.body()
    return JSONResponse(await _on_worker(request, _explorer(request).invert, model, ref, data))


async def swap(request: Request) -> Response:
    return JSONResponse(await _on_worker(request, _explorer(request).swap, await _json_body(request)))


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


def create_app(explorer: Explorer, queue: RenderQueue | None = None) -> Starlette:
    """The Starlette app over an :class:`Explorer`; makes (and on shutdown closes) its render queue."""
    queue = queue or RenderQueue(explorer.render_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        queue.close()

    app = Starlette(routes=ROUTES, lifespan=lifespan)
    app.state.explorer, app.state.queue = explorer, queue
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
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
