"""The HTTP API (FastAPI): ``create_app(settings)`` puts the parts together; ``ddpm serve`` (``service.serve``)
runs it. Each part is a module of its own:

    service.app_state   what the app holds (settings, keys, catalogue, limits, the job stores), opened in the
                        lifespan, never at import time
    service.deps        the typed dependencies routes take those through, and the key and rate-limit checks
    service.routes      the routes, one router per resource (operations, jobs, info, health, page)
    service.sse         the event stream of a job
    service.web         the error shape and handlers, client identity, body limits, request metrics
    service.openapi     the finished OpenAPI document; service.apidocs: /docs and /redoc, served locally

The API never loads a model: it reads checkpoint metadata (T, image size) to resolve requests, and the worker
does the sampling. It is ready (``/readyz``) when its store answers; whether a worker serves the default model is
reported beside it, never as an outage: jobs are accepted and wait in the queue. The error codes and the
statuses they come with are listed in ``service.web``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import apidocs, openapi
from service.app_state import ApiState
from service.deps import rate_limit, require_key
from service.idempotency import HEADER as IDEMPOTENCY_HEADER
from service.idempotency import REPLAYED_HEADER
from service.routes import health, info, jobs, operations, page
from service.settings import Settings, get_settings
from service.sse import StreamOptions
from service.web import (
    ApiError,
    BodyLimitMiddleware,
    ClientAddressMiddleware,
    MetricsMiddleware,
    TrustedProxies,
    install_error_handlers,
    responses,
)

__all__ = ["ApiError", "create_app"]

DESCRIPTION = ("Generate images with DDPM checkpoints and watch x0-hat frames as they denoise; reconstruct, vary "
               "and interpolate pictures; measure their likelihood.\n\nErrors: `{\"error\": {\"code\", "
               "\"message\"}}`.")


def create_app(settings: Settings | None = None, *, sse_keepalive_s: float = 15.0, sse_block_ms: int = 1000
               ) -> FastAPI:
    """The API for ``settings`` (default: ``get_settings()``); ``sse_keepalive_s`` and ``sse_block_ms`` say how
    event streams wait (``service.sse.StreamOptions``). Redis is connected in the lifespan."""
    settings = settings or get_settings()
    state = ApiState(settings, StreamOptions(keepalive_s=sse_keepalive_s, block_ms=sse_block_ms))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.open()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="DDPM generation service", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  generate_unique_id_function=openapi.operation_id,
                  openapi_url=None, docs_url=None, redoc_url=None)  # added by apidocs.install, behind the key
    app.state.api = state  # the one thing the app keeps; routes take its parts through service.deps
    # Without keys the routes are open and the OpenAPI document declares no security.
    protected: list[Any] = [Depends(require_key)] if state.keys.enabled else []
    protected.append(Depends(rate_limit))  # a no-op unless rate_limit_per_minute is set
    for router in (operations.router, jobs.router, info.router):
        app.include_router(router, dependencies=protected, responses=responses(401, 403, 429))
    app.include_router(health.router)
    page.mount_static(app)
    apidocs.install(app, dependencies=protected)  # /openapi.json, /docs, /redoc behind the key; assets local
    app.include_router(page.router)
    install_error_handlers(app, state.limits)
    openapi.install(app, state.limits, list(settings.checkpoints))
    _add_middleware(app, settings)
    return app


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    """Request metrics, CORS (when origins are set) and body limits inside; the client's address outermost."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       routes=dict.fromkeys(operations.UPLOAD_ROUTES, settings.max_upload_bytes))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "Last-Event-ID",
                                          IDEMPOTENCY_HEADER],
                           expose_headers=["Location", "Retry-After", REPLAYED_HEADER])
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(ClientAddressMiddleware, trusted=TrustedProxies(settings.trusted_proxies))  # outermost
