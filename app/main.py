"""The web application: `create_app()` wires settings, database, security and the routers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import faults
from app.db import Database
from app.errors import UserError
from app.queue import QueueError
from app.services.datasets import hub, sweep_orphan_datasets, sweep_stale_uploads
from app.services.inference_client import openai_error
from app.settings import Settings
from app.web.body_limit import BodyLimitMiddleware
from app.web.routes import (
    adapters,
    api_docs,
    auth,
    dashboard,
    datasets,
    evaluations,
    jobs,
    models,
    openai_api,
    playground,
    system,
)
from app.web.security import SECURITY_HEADERS, SecurityMiddleware
from app.web.sse import JobStreams
from app.web.templating import STATIC_DIR, render

log = logging.getLogger("tuneboard")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.ensure_dirs()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        freeze_startup_objects()
        settling = asyncio.create_task(settle_hub_imports(app.state.db, settings))
        yield
        settling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await settling
        await app.state.job_streams.close()

    app = FastAPI(
        lifespan=lifespan,
        title="Tuneboard",
        version="0.1.0",
        docs_url=None,  # served by routes/api_docs.py from vendored Swagger UI (no CDN, CSP-safe)
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.settings = settings
    app.state.db = Database(settings.resolved_database_url, settings.database_busy_timeout_seconds)
    app.state.job_streams = JobStreams(
        app.state.db, settings.sse_poll_seconds, settings.sse_keepalive_seconds
    )
    sweep_stale_uploads(settings)  # temp files of uploads a killed server left behind
    sweep_orphan_datasets(app.state.db, settings)  # and dataset folders it was ingesting

    for router in (
        adapters.router,
        api_docs.router,
        auth.router,
        dashboard.router,
        datasets.router,
        evaluations.router,
        jobs.router,
        models.router,
        openai_api.router,
        playground.router,
        system.router,
    ):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(SecurityMiddleware, settings=settings)  # outermost: refusals come first
    _install_error_handlers(app)
    return app


async def settle_hub_imports(db: Database, settings: Settings) -> None:
    """Every few seconds, ingest the Hub imports a worker has downloaded (and those a dead web
    process left ingesting), so an import becomes a dataset whether or not anyone looks at it."""
    while True:
        await asyncio.sleep(settings.hub_import_settle_seconds)
        try:
            await asyncio.to_thread(hub.settle_waiting, db, settings)
        except Exception:  # a database hiccup must not end the task; the next round retries
            log.exception("settling Hub imports failed")


def freeze_startup_objects() -> None:
    """Move what importing and building the app allocated out of the garbage collector's reach.

    Those objects (FastAPI, pydantic, SQLAlchemy, Jinja2 and this app: most of the heap) live as
    long as the process, yet every full collection walked all of them: with 50 live job pages a
    full pass paused the server 150-300 ms (bench/web.py with gc callbacks), the page-latency
    tail. Done once per process (tests build many apps)."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


def _wants_json(request: Request) -> bool:
    path = request.url.path
    return (
        path.startswith(("/api", "/v1", "/healthz"))
        or "text/html" not in request.headers.get("accept", "")
        or request.headers.get("hx-request") == "true"
    )


def error_response(request: Request, status: int, code: str, message: str, hint: str) -> Response:
    if _wants_json(request):
        return JSONResponse(
            {"error": {"code": code, "message": message, "hint": hint}}, status_code=status
        )
    return render(
        request, "error.html", status_code=status, status=status, message=message, hint=hint
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> Response:
        return error_response(request, exc.status_code, exc.code, exc.message, exc.hint)

    @app.exception_handler(QueueError)
    async def queue_error(request: Request, exc: QueueError) -> Response:
        status = 404 if exc.code == "not_found" else 409 if exc.code == "conflict" else 400
        return error_response(request, status, exc.code, exc.message, exc.hint)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            # "Field max_seq_len: Input should be ...": a sentence, whatever the field's name.
            problems.append(
                f"Field {where}: {err.get('msg', 'invalid')}" if where else err.get("msg")
            )
        message = "; ".join(str(p) for p in problems[:10]) or "Invalid request."
        hint = "Fix the fields named above and send it again."
        if request.url.path.startswith("/v1/"):
            # OpenAI's clients expect its error shape, and 400 for a bad parameter.
            error = UserError(message, hint, code="invalid")
            return JSONResponse(openai_error(error), status_code=400)
        return error_response(request, 422, "invalid", message, hint)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        hints = {
            400: "Send the body as JSON of the documented shape (numbers under 4,300 digits).",
            404: "Check the address.",
            405: "This address does not accept that method.",
        }
        return error_response(
            request,
            exc.status_code,
            f"http_{exc.status_code}",
            str(exc.detail),
            hints.get(exc.status_code, ""),
        )

    @app.exception_handler(DBAPIError)
    @app.exception_handler(OSError)
    async def machine_fault(request: Request, exc: Exception) -> Response:
        fault = faults.classify(exc, request.app.state.settings)
        if fault is None:
            return internal_error(request, exc)
        log.warning("%s %s: %s", request.method, request.url.path, fault.message)
        return error_response(request, fault.status_code, fault.code, fault.message, fault.hint)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        response = internal_error(request, exc)
        # Starlette runs this handler outside every middleware (ServerErrorMiddleware is the
        # outermost layer), so SecurityMiddleware never sees this response: add its headers here.
        for name, value in SECURITY_HEADERS:
            response.headers[name.decode()] = value.decode()
        return response


def internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        request,
        500,
        "internal",
        "Something went wrong on the server; it has been logged.",
        "Try again; if it persists, look at the server's log.",
    )
