"""The FastAPI application of ``taemi serve``: :func:`create_app`.

Routes (README, "Serving: taemi serve"):

- ``POST /v1/predict``: multipart, field ``file`` (repeatable: one batch); the clips'
  intensities, modalities, transcript, timings and cross-attention weights in time;
- ``GET /v1/health``: status, queue length, requests served, fusion batch sizes formed
  (open even with a token: it tells nothing about the model or the data);
- ``GET /v1/model``: the run, its features and its training metrics;
- ``GET /`` (the page, ``static/index.html``) and ``GET /static/...``;
- ``GET /openapi.json``. The interactive ``/docs`` and ``/redoc`` pages are disabled:
  they load their scripts from a CDN, which a machine without network cannot reach.

Every error is ``{"error": {"status", "code", "message"}}``, FastAPI's own validation and
routing errors included.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from taemi.serve.errors import ApiError, error_body
from taemi.serve.schemas import ErrorResponse, PredictResponse
from taemi.serve.service import ServeSettings, Service
from taemi.serve.uploads import FIELD, receive_uploads

__all__ = ["STATIC_DIR", "create_app"]

log = logging.getLogger(__name__)

#: The page's files (index.html, app.js, style.css).
STATIC_DIR = Path(__file__).parent / "static"

_ERRORS = {
    401: {"model": ErrorResponse, "description": "token missing or wrong"},
    413: {"model": ErrorResponse, "description": "upload over --max-upload-mb"},
    422: {"model": ErrorResponse, "description": "not media, empty, or no field 'file'"},
    503: {"model": ErrorResponse, "description": "queue full (Retry-After)"},
}

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "media files (video or audio); several = one batch",
                        }
                    },
                    "required": [FIELD],
                }
            }
        },
    }
}


def create_app(
    settings: ServeSettings | None = None,
    *,
    service: Service | None = None,
    static_dir: str | Path | None = None,
) -> FastAPI:
    """The app over ``service`` (made from ``settings`` when not given: the run and its
    encoders are loaded here, once). A service made here is closed when the app shuts
    down; one passed in belongs to the caller."""
    from taemi import __version__

    if service is None:
        if settings is None:
            raise ValueError("create_app needs settings or a service")
        service, own = Service(settings), True
    else:
        own = False
    static = Path(static_dir) if static_dir is not None else STATIC_DIR

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if own:
            service.close()

    app = FastAPI(
        title="taemi serve",
        version=__version__,
        description="Six emotion intensities per clip from its transcript, voice and face "
        "(TAEMI). Errors: {'error': {'status', 'code', 'message'}}.",
        docs_url=None,  # its assets come from a CDN: no network here
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    _install_error_handlers(app)

    def check_token(request: Request) -> None:
        token = service.settings.token
        if token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode("utf-8"), token.encode("utf-8")
        ):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong token: send the header 'Authorization: Bearer <token>' "
                "(the token given to taemi serve --token or TAEMI_SERVE_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/v1/health", summary="status, queue length, requests served, batch sizes")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/model", summary="the run, its features, its training metrics", responses=_ERRORS)
    async def model(request: Request) -> dict[str, Any]:
        check_token(request)
        return service.model_info()

    @app.post(
        "/v1/predict",
        summary="intensities of uploaded media files (multipart field 'file', repeatable)",
        response_model=None,
        responses={200: {"model": PredictResponse}, **_ERRORS},
        openapi_extra=_PREDICT_BODY,
    )
    async def predict(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        check_token(request)
        service.admit()  # 503 when full, before the body is read
        ok, job, folder = False, None, None
        try:
            # private (mode 0700), a fresh name per request; removed in `finally`
            folder = Path(tempfile.mkdtemp(prefix="taemi-serve-", dir=service.settings.tmp_root))
            uploads = await receive_uploads(
                request.headers,
                request.stream(),
                folder,
                max_bytes=service.settings.max_upload_bytes,
            )
            upload_seconds = time.perf_counter() - t0
            job = asyncio.wrap_future(service.submit_extraction(uploads, folder))
            try:
                extracted = await asyncio.shield(job)  # a client gone does not stop the thread
            except Exception as e:
                log.exception("the extraction of a request failed")
                message = f"{type(e).__name__}: {e}".replace(str(folder), "<upload folder>")
                raise ApiError(
                    500, "extraction_error", f"the extraction of this request failed: {message}"
                ) from None
            futures = [asyncio.wrap_future(service.submit_fusion(c)) for c in extracted.clips]
            fused = await asyncio.gather(*futures, return_exceptions=True)
            timings = {"upload": upload_seconds, **extracted.timings}
            clips, failures = [], list(extracted.failures)
            for c, out in zip(extracted.clips, fused):
                if isinstance(out, BaseException):
                    log.error("fusion failed for %s: %r", c.upload.clip_id, out)
                    failures.append(
                        service.failure_record(c.upload, 500, "fusion_failed", f"{out!r}")
                    )
                    continue
                try:
                    clips.append(service.clip_json(c, out, timings))
                except ApiError as e:  # its message names the file: not twice
                    message = e.message.removeprefix(f"{c.upload.filename}: ")
                    failures.append(service.failure_record(c.upload, e.status, e.code, message))
            total = time.perf_counter() - t0
            for c in clips:
                c["timings"]["total"] = total
            failures.sort(key=lambda f: f["index"])
            failures = [{k: v for k, v in f.items() if k != "index"} for f in failures]
            if not clips:
                raise _all_failed(failures)
            ok = True
            return JSONResponse(
                {
                    "run": service.run_name,
                    "emotions": list(service.emotions),
                    "clips": clips,
                    "failures": failures,
                }
            )
        finally:
            service.release(ok, time.perf_counter() - t0)
            if folder is not None:
                _remove_when_done(folder, job)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        index = static / "index.html"
        if not index.is_file():
            raise ApiError(404, "not_found", f"the page is not installed ({index} is missing)")
        return FileResponse(index)

    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")
    else:
        log.warning("%s is missing: GET / and /static/ are not served", static)
    return app


def _all_failed(failures: list[dict[str, Any]]) -> ApiError:
    """Every file failed: one error; 422 when every failure was the files' (else the worst)."""
    statuses = {f["status"] for f in failures}
    status = 422 if statuses == {422} else max(statuses)
    code = failures[0]["code"] if len(failures) == 1 else "all_failed"
    message = "; ".join(f["error"] for f in failures)
    if len(failures) > 1:
        message = f"all {len(failures)} files failed: {message}"
    return ApiError(status, code, message)


def _remove(folder: Path) -> None:
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("cannot remove the request folder %s: %s", folder, e)


def _remove_when_done(folder: Path, job: asyncio.Future | None) -> None:
    """Delete the request's folder now, or when its extraction thread ends (a request
    cancelled while extracting: the thread still writes there)."""
    if job is None or job.done():
        _remove(folder)
    else:
        job.add_done_callback(lambda _: _remove(folder))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}"
            for err in e.errors()
        ]
        body = error_body(422, "invalid_request", "; ".join(parts) or "invalid request")
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(e.status_code, f"http_{e.status_code}")
        return JSONResponse(
            error_body(e.status_code, code, str(e.detail)),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        log.error("internal error: %r", e, exc_info=e)
        return JSONResponse(
            error_body(500, "internal_error", f"{type(e).__name__}: {e}"), status_code=500
        )
