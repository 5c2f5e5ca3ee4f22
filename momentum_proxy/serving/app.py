"""`mproxy serve`: an HTTP API (FastAPI) and a web page over a saved index.

`create_app(index_dir)` returns the ASGI app, so the service can be mounted in another application. Errors are
JSON `{"error": "one line"}`: 400 bad or corrupt image, 401 missing token, 404 unknown id, 413 over the upload or
pixel limit, 422 bad parameters, 503 the index store cannot be reached (a Milvus server; later requests try
again); a failure inside is logged and answered 500 without details.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import subprocess
import time
import urllib.request
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from momentum_proxy.errors import UserError
from momentum_proxy.paths import check_index
from momentum_proxy.perf import freeze_gc, share_heap, single_thread_blas
from momentum_proxy.retrieval.rerank import DEFAULTS, Rerank
from momentum_proxy.retrieval.store import StoreUnavailable, recall_text
from momentum_proxy.retrieval.stores import writer_lock
from momentum_proxy.serving.searcher import MAX_K, BadImage, ImageTooLarge, ItemNotFound, Searcher

log = logging.getLogger("momentum_proxy.serving.app")
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
TOKEN_ENV = "MPROXY_TOKEN"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10)


class SearchParams(BaseModel):
    """A search: exactly one of `embedding`, `id` (or an uploaded image), plus k and min_score, and optionally a
    re-ranking (`rerank`: a method; `rerank_k`, ...: its parameters; see `request_rerank`)."""

    model_config = ConfigDict(extra="forbid")
    embedding: list[float] | None = None
    id: int | None = None
    k: int = Field(10, ge=1, le=MAX_K)
    min_score: float | None = Field(None, ge=-1, le=1)
    rerank: str | None = None
    rerank_k: int | None = None
    rerank_alpha: float | None = None
    rerank_k2: int | None = None
    rerank_lambda: float | None = None
    rerank_keep: int | None = None

    @model_validator(mode="after")
    def one_query(self):
        if (self.embedding is not None) + (self.id is not None) > 1:
            raise ValueError("give one query: an image, an embedding or an id")
        return self


RERANK_FIELDS = {
    "rerank_k": "k",
    "rerank_alpha": "alpha",
    "rerank_k2": "k2",
    "rerank_lambda": "lam",
    "rerank_keep": "keep",
}


def request_rerank(params: SearchParams, default: Rerank) -> Rerank | None:
    """The re-ranking a search asks for (None: the server's `default`): `rerank` names the method (default: the
    server's) and `rerank_*` its parameters; the others are the server's for its own method, else the method's
    defaults."""
    given = {
        name: getattr(params, field) for field, name in RERANK_FIELDS.items() if getattr(params, field) is not None
    }
    if params.rerank is None and not given:
        return None
    method = params.rerank or default.method
    base = {name: getattr(default, name) for name in (*DEFAULTS[method], "keep")} if method == default.method else {}
    return Rerank(method, **{**base, **given})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def one_line(exc: ValidationError | RequestValidationError) -> str:
    """Pydantic errors as one line: `k: Input should be less than or equal to 1000; ...`."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form"))
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts) or "invalid request"


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status_code=status)


class BodyLimit:
    """ASGI middleware: requests with a body over `limit` bytes get 413 (by Content-Length or while read)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error(413, f"request body over the limit of {self.limit:,} bytes")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over the limit of {self.limit:,} bytes")
            return message

        await self.app(scope, limited, send)


class Metrics:
    """Prometheus request counts and latency histograms (own registry: several apps may live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mproxy_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mproxy_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "mproxy_embed_batch_size",
            "queries embedded together",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.items = Gauge("mproxy_index_items", "live items in the index", registry=self.registry)

    def middleware(self, app):
        async def asgi(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            start, status = time.perf_counter(), [500]

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                self.requests.labels(scope["method"], route, str(status[0])).inc()
                self.latency.labels(scope["method"], route).observe(time.perf_counter() - start)

        return asgi


def create_app(
    index_dir: str | Path | None = None,
    *,
    searcher: Searcher | None = None,
    run_dir=None,
    device: str = "auto",
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
    cors_origins: list[str] = (),
    max_batch: int = 32,
    batch_wait_ms: float = 50.0,
    runtime: str = "torch",
    model_processes: int | str = 0,
    tta: str | None = None,
    rerank: Rerank | None = None,
    mmap: bool = False,
) -> FastAPI:
    """The service over the index in `index_dir` (or an open `searcher`), embedding with `runtime` (torch | onnx)
    and `tta` (None: the index's own), re-ranking searches that ask for none with `rerank`; `mmap` maps a faiss ivf
    or ivfpq index's lists from its file instead of reading them.
    With `token`, writes need the header `Authorization: Bearer TOKEN`; `cors_origins` turns CORS on for those
    origins."""
    metrics = Metrics()
    if searcher is None:
        extra = {} if max_pixels is None else {"max_pixels": max_pixels}
        searcher = Searcher(
            index_dir,
            run_dir=run_dir,
            device=device,
            max_batch=max_batch,
            runtime=runtime,
            batch_wait_ms=batch_wait_ms,
            on_batch=metrics.batch.observe,
            model_processes=model_processes,
            tta=tta,
            rerank=rerank,
            mmap=mmap,
            **extra,
        )

    @asynccontextmanager
    async def lifespan(app):
        yield
        searcher.close()

    app = FastAPIOffline(
        title="mproxy serve",
        description="Fine-grained image retrieval over a saved index",
        version="1",
        lifespan=lifespan,
    )  # /docs and /redoc with their scripts served here
    app.state.searcher = searcher
    register_errors(app)
    app.add_route("/", lambda request: HTMLResponse(page()), include_in_schema=False)
    add_routes(app, searcher, metrics, writer_check(token))
    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(metrics.middleware)
    return app


def page() -> str:
    return resources.files("momentum_proxy").joinpath("serving/web/index.html").read_text()


def writer_check(token: str | None):
    """A dependency refusing writes without the token (when there is one)."""

    def check(authorization: str | None = Header(None, description="Bearer TOKEN (when the server has one)")):
        if token is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                401,
                "this server needs the write token: Authorization: Bearer TOKEN",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def register_errors(app: FastAPI) -> None:
    """Every error as JSON with one line; no traceback reaches a client."""
    statuses = {BadImage: 400, ImageTooLarge: 413, ItemNotFound: 404, StoreUnavailable: 503}

    @app.exception_handler(UserError)
    async def user_error(request, exc: UserError):
        return error(next((s for t, s in statuses.items() if isinstance(exc, t)), 422), str(exc))

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and those of the routing (404, 405)
    async def http_error(request, exc: StarletteHTTPException):
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error(422, one_line(exc))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, "internal error (see the server log)")


SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchParams.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "k": {"type": "integer", "default": 10},
                        "min_score": {"type": "number"},
                        "rerank": {"type": "string"},
                        **{
                            field: {
                                "type": "integer" if field in ("rerank_k", "rerank_k2", "rerank_keep") else "number"
                            }
                            for field in RERANK_FIELDS
                        },
                    },
                }
            },
        },
    }
}


async def read_search(request: Request) -> tuple[SearchParams, bytes | None]:
    """The search's parameters and uploaded image, from a JSON body or a multipart form."""
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form() as form:  # closes the uploads' spooled files
                image = form.get("image")
                if not hasattr(image, "read"):
                    raise HTTPException(422, "the form needs an image file in the field 'image'")
                fields = {
                    k: v for k, v in form.items() if k in ("k", "min_score", "rerank", *RERANK_FIELDS) and v != ""
                }
                return SearchParams.model_validate(fields), await image.read()
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise HTTPException(422, "the body must be JSON (or a multipart form with an image)") from None
        if not isinstance(body, dict):
            raise HTTPException(422, 'the body must be a JSON object such as {"id": 3, "k": 10}')
        params = SearchParams.model_validate(body)
    except ValidationError as e:
        raise HTTPException(422, one_line(e)) from None
    if params.embedding is None and params.id is None:
        raise HTTPException(422, "give one query: an image, an embedding or an id")
    return params, None


def add_routes(app: FastAPI, searcher: Searcher, metrics: Metrics, can_write) -> None:
    @app.post("/search", openapi_extra=SEARCH_BODY, summary="the k nearest indexed images of a query")
    async def search(request: Request):
        start = time.perf_counter()
        params, image = await read_search(request)
        query = (
            image
            if image is not None
            else (params.id if params.id is not None else np.asarray(params.embedding, np.float32))
        )
        result = await searcher.asearch(
            query, params.k, min_score=params.min_score, rerank=request_rerank(params, searcher.rerank)
        )
        result["timing_ms"]["total"] = 1000 * (time.perf_counter() - start)
        return JSONResponse(result)  # plain JSON types already: FastAPI's encoder pass is skipped

    @app.get("/items/{item_id}", summary="an item's metadata")
    async def item(item_id: int):
        return searcher.item(item_id)

    @app.get("/items/{item_id}/image", summary="an item's image file", response_class=FileResponse)
    async def item_image(item_id: int):
        return FileResponse(searcher.image_path(item_id))

    @app.post(
        "/items",
        dependencies=[Depends(can_write)],
        summary="add images (embedded, then saved under their file names; an image already indexed is not added again)",
    )
    async def add_items(images: list[UploadFile] = File(...), class_name: str | None = Form(None)):
        data = [await f.read() for f in images]
        added = await run_in_threadpool(searcher.add, data, class_name or None, [f.filename for f in images])
        metrics.items.set(len(searcher.index))
        return {"items": added, "total": len(searcher.index)}

    @app.delete("/items/{item_id}", dependencies=[Depends(can_write)], summary="remove an item")
    async def delete_item(item_id: int):
        await run_in_threadpool(searcher.remove, item_id)
        metrics.items.set(len(searcher.index))
        return {"deleted": item_id, "total": len(searcher.index)}

    @app.get("/health")
    async def health():
        return {"status": "ok", "items": len(searcher.index)}

    @app.get("/stats")
    async def stats():
        return searcher.stats()

    @app.get("/metrics", response_class=Response)
    async def prometheus():
        metrics.items.set(len(searcher.index))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def serve(
    index_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, **options
) -> None:
    """Run the service with uvicorn; refuse to listen beyond loopback without a write token."""
    import uvicorn  # extra: [serve]; only needed to run the app here (create_app's app can be mounted elsewhere)

    if not is_loopback(host) and not token:
        raise UserError(
            f"refusing to serve on {host} without a write token: pass --token or set {TOKEN_ENV} (or bind 127.0.0.1)"
        )
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0-65535, got {port}")
    check_index(index_dir)
    with writer_lock(index_dir, "mproxy serve"):  # adds and removes write it
        share_heap()  # before the batcher thread starts: it runs the model
        single_thread_blas()  # a search multiplies one query by the index: threads only wait for each other
        app = create_app(index_dir, token=token, **options)
        freeze_gc()
        index = app.state.searcher.index
        mapped = ", memory-mapped" if options.get("mmap") else ""
        print(
            f"serving {index_dir} ({len(index)} items; {index.kind} index{mapped}, "
            f"{recall_text(index.recall_info(), len(index))}) on http://{host}:{port}/",
            flush=True,
        )
        uvicorn.run(app, host=host, port=port, log_level="warning")


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    """Wait until the server `proc`, started at `url`, answers GET /health.

    Raises RuntimeError, ending with the tail of the server's `log`, when `proc` exits first or (then killed)
    after `timeout` seconds.
    """
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}{_tail(log)}")
        try:
            no_proxy.open(f"{url}/health", timeout=2).close()
            return
        except OSError:  # not listening yet, an error status, or too slow to answer
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout:g} s{_tail(log)}")


def _tail(log: Path | None) -> str:
    return f": {log.read_text(errors='replace')[-2000:]}" if log else ""
