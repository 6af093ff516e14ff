"""The HTTP API (FastAPI): the routes that read and cancel jobs, the service routes, and the app factory.
``ddpm serve`` runs it. The job-creating routes are ``service.creation``'s; with ``service.web`` (the error shape
and handlers, auth, middleware) these are the only places errors become HTTP status codes.

``create_app(settings)`` wires routes, middleware (client address, body-size limits, CORS, request metrics) and
error handlers; the Redis client and the checkpoint metadata are opened in the app's lifespan, never at import
time. Routes
talk to Redis only through ``service.queue.JobStore``; sync routes run in FastAPI's thread pool and the SSE
stream reads Redis in worker threads, so nothing blocks the event loop. The API never loads a model: it reads
checkpoint metadata (T, image size) to resolve requests, and the worker does the sampling.

With API keys on, a job belongs to the key that submitted it: another key gets 404 for every route of the job;
admin keys see all. The API is ready (``/readyz``) when its store answers; whether a worker serves the default
model is reported beside it (``/readyz``, ``/models``, the ``ddpm_live_workers`` gauge), never an outage: jobs
are accepted and wait in the queue.

Every error has the shape ``{"error": {"code", "message"}}``:

    400/422 invalid_request   401 unauthorized   403 forbidden   404 not_found   408 request_timeout   410 expired
    413 body_too_large | image_too_large   429 queue_full | rate_limited | too_many_streams (Retry-After)
    503 store_unavailable | store_full | model_unavailable
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from service import apidocs, metrics, openapi
from service.animation import MEDIA_TYPES, AnimationFormat, animate
from service.catalog import WORKER_MAX_AGE_SECONDS, ModelCatalog, live_workers_per_model
from service.creation import UPLOAD_ROUTES, creating
from service.deps import Store, Who, not_found, visible_job
from service.http_server import server_config
from service.idempotency import HEADER as IDEMPOTENCY_HEADER
from service.idempotency import REPLAYED_HEADER
from service.openapi import ANIMATION, EVENT_STREAM, PNG, PROMETHEUS_TEXT
from service.queue import TERMINAL_STATES, CircuitBreaker, JobState, JobStore, StoreFull, StoreUnavailable, connect
from service.schemas import JobView, Limits, ModelsView, ReadyView, RequestInvalid
from service.settings import Settings, describe_validation_error, get_settings
from service.views import job_view
from service.web import (
    ApiError,
    ApiKeys,
    BodyLimitMiddleware,
    Caller,
    ClientAddressMiddleware,
    MetricsMiddleware,
    RefusedKeys,
    TrustedProxies,
    client_id,
    install_error_handlers,
    rate_limit,
    require_key,
    responses,
)
from service.webhooks import WebhookPolicy

__all__ = ["ApiError", "configure_parser", "create_app", "main"]

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"


# ---- job views ---------------------------------------------------------------------------------------------
def _get_job(store: JobStore, job_id: str, who: Caller) -> dict[str, Any]:
    """The job record, if it exists and ``who`` may see it; else 404 (the same answer: another key's job is
    indistinguishable from an unknown one)."""
    job = visible_job(store, job_id, who)
    if job is None:
        raise not_found(job_id, store.ttl)
    return job


def _png(data: bytes | None, what: str) -> Response:
    if data is None:
        raise ApiError(410, "expired", f"{what} has expired")
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


# ---- routes ------------------------------------------------------------------------------------------------
jobs = APIRouter(tags=["jobs"])
info = APIRouter(tags=["service"])
health = APIRouter(tags=["health"])


@jobs.get("/jobs/{job_id}", response_model=JobView, response_model_exclude_none=False,
          responses=responses(404, 422, 503))
def get_job(job_id: str, store: Store, who: Who,
            since: Annotated[int, Query(ge=-1, le=10**9, description="only frames with index > since")] = -1,
            inline: Annotated[bool, Query(description="add base64 PNG data to frames and images")] = False
            ) -> JobView:
    """A job's status, progress, queue position, frames so far and (once succeeded) its images."""
    return job_view(store, _get_job(store, job_id, who), since, inline)


@jobs.get("/jobs/{job_id}/frames/{index}.png", response_class=Response,
          responses={**PNG, **responses(404, 410, 422, 503)})
def frame_png(job_id: str, index: int, store: Store, who: Who) -> Response:
    """The x0-hat frame ``index`` (a grid of all the job's images)."""
    job = _get_job(store, job_id, who)
    if not 0 <= index < job["num_frames"]:
        raise ApiError(404, "not_found", f"job {job_id} has {job['num_frames']} frames so far (0-based)")
    return _png(store.frame_png(job_id, index), f"frame {index} of job {job_id}")


@jobs.get("/jobs/{job_id}/images/{index}.png", response_class=Response,
          responses={**PNG, **responses(404, 410, 422, 503)})
def image_png(job_id: str, index: int, store: Store, who: Who) -> Response:
    """Final image ``index`` of a succeeded job."""
    job = _get_job(store, job_id, who)
    if job["kind"] == "likelihood":
        raise ApiError(404, "not_found", f"job {job_id} measured a likelihood: it has no images (its result is in "
                                         "GET /jobs/{id})")
    if job["status"] != JobState.SUCCEEDED:
        raise ApiError(404, "not_found", f"job {job_id} is {job['status']}: images exist once it has succeeded")
    if not 0 <= index < job["num_images"]:
        raise ApiError(404, "not_found", f"job {job_id} has images 0..{job['num_images'] - 1}")
    return _png(store.image_png(job_id, index), f"image {index} of job {job_id}")


def _animation(store: JobStore, job_id: str, who: Caller, fmt: AnimationFormat) -> Response:
    """The job's frames as an animated ``fmt`` image, made on the first request once the job has ended and then
    served from the store for as long as the job lives (best effort: not kept while the store is past its
    high-water mark, so caches never take the room kept for admitted jobs)."""
    job = _get_job(store, job_id, who)
    if job["status"] not in TERMINAL_STATES:
        raise ApiError(404, "not_found", f"job {job_id} is {job['status']}: its animation is made once it has "
                                         "ended (its frames so far: GET /jobs/{id})")
    if job["num_frames"] == 0:
        raise ApiError(404, "not_found", f"job {job_id} has no frames to animate")
    data = store.animation(job_id, fmt)
    if data is None:
        frames = [store.frame_png(job_id, i) for i in range(job["num_frames"])]
        if any(f is None for f in frames):
            raise ApiError(410, "expired", f"frames of job {job_id} have expired")
        data = animate([f for f in frames if f is not None], fmt)
        try:
            if store.has_room():
                store.keep_animation(job_id, fmt, data)
        except StoreFull:  # Redis refused the write: serve it anyway, uncached
            log.warning("animation of job %s not cached: the store is full", job_id)
    return Response(data, media_type=MEDIA_TYPES[fmt], headers={"Cache-Control": "private, max-age=3600"})


@jobs.get("/jobs/{job_id}/animation.webp", response_class=Response,
          responses={**ANIMATION["webp"], **responses(404, 410, 422, 503)})
def animation_webp(job_id: str, store: Store, who: Who) -> Response:
    """The job's x0-hat frames as an animated WebP (lossless, looping; the last frame held), once the job has
    ended."""
    return _animation(store, job_id, who, "webp")


@jobs.get("/jobs/{job_id}/animation.gif", response_class=Response,
          responses={**ANIMATION["gif"], **responses(404, 410, 422, 503)})
def animation_gif(job_id: str, store: Store, who: Who) -> Response:
    """The job's x0-hat frames as an animated GIF (256 colours per frame, looping; the last frame held), once the
    job has ended."""
    return _animation(store, job_id, who, "gif")


@jobs.delete("/jobs/{job_id}", response_model=JobView,
             response_description="the job now: canceled if it was queued, as it was if it had already finished",
             responses={202: {"model": JobView, "description": "the job is running: cancel_requested is true and "
                                                               "it stops within one denoising step"},
                        **responses(404, 503)})
def cancel_job(job_id: str, store: Store, response: Response, who: Who) -> JobView:
    """Cancel: a queued job never starts (200, canceled); a running one stops within one denoising step
    (202, ``cancel_requested``). A finished job is left as it is (200)."""
    job = _get_job(store, job_id, who)
    state = store.cancel(job_id)
    if state is None:
        raise not_found(job_id, store.ttl)
    if state not in TERMINAL_STATES:
        response.status_code = 202
    return job_view(store, _get_job(store, job["id"], who), since=-1, inline=False)


SSE_RETRY_MS = 1000  # how long an EventSource waits before it reconnects (sent with the first event)


def _sse(event_id: str, event: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _event_stream(request: Request, job_id: str, last_id: str) -> AsyncIterator[str]:
    """Events after ``last_id`` as SSE, then the new ones as they come; ends after the terminal event. The
    ``retry:`` field rides on the first event: alone in a block, SSE client libraries surface it as an empty
    event."""
    state = request.app.state
    store: JobStore = state.event_store
    retry = f"retry: {SSE_RETRY_MS}\n"
    quiet_since = time.monotonic()
    while not await request.is_disconnected():
        read = partial(store.events, job_id, last_id, block_ms=state.sse_block_ms)
        try:
            events = await anyio.to_thread.run_sync(read, limiter=state.sse_limiter)
        except StoreUnavailable:
            yield ": job store unavailable; reconnect with Last-Event-ID\n\n"
            return
        for ev in events:
            if ev.event == "frame":
                ev.data["url"] = f"/jobs/{job_id}/frames/{ev.data['index']}.png"
            yield retry + _sse(ev.id, ev.event, ev.data)
            retry, last_id, quiet_since = "", ev.id, time.monotonic()
            if ev.event in TERMINAL_STATES:
                return
        if not events:
            try:
                job = await anyio.to_thread.run_sync(store.get, job_id, limiter=state.sse_limiter)
            except StoreUnavailable:
                yield ": job store unavailable; reconnect with Last-Event-ID\n\n"
                return
            if job is None or job["status"] in TERMINAL_STATES:
                return  # expired, or the terminal event was already sent before this connection
            if time.monotonic() - quiet_since >= state.sse_keepalive_s:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()


_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_STREAM_ID_MAX = 2**64 - 1  # each half of a Redis stream id is an unsigned 64-bit integer


def _event_id(value: str | None, field: str) -> str | None:
    """``value`` if it is an event id this API could have sent (``<ms>-<seq>``, both below 2^64), None when
    absent or empty; anything else raises ``RequestInvalid`` naming ``field`` (never a silent replay from the
    start, never an id Redis would refuse)."""
    if not value:
        return None
    match = _EVENT_ID.fullmatch(value)
    if match is None or max(int(match[1]), int(match[2])) > _STREAM_ID_MAX:
        raise RequestInvalid(field, f"must be the id of an event of this stream, <ms>-<seq> with two integers "
                                    f"below 2^64 (got {value[:48]!r}); leave it out to replay from the start")
    return value


class _CountedStream(StreamingResponse):
    """An SSE response that gives its client's stream slot back however it ends (finished, client gone,
    error), even if the body never started."""

    def __init__(self, body: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _take_stream_slot(request: Request) -> Callable[[], None]:
    """One of the client's ``max_sse_per_client`` SSE slots (429 ``too_many_streams`` when all are in use);
    returns the function that gives it back (idempotent). Runs on the event loop: no lock needed."""
    open_now: dict[str, int] = request.app.state.sse_open
    who, limit = client_id(request), request.app.state.settings.max_sse_per_client
    if open_now.get(who, 0) >= limit:
        raise ApiError(429, "too_many_streams", f"at most {limit} event streams per client at a time; close one "
                                                "or poll GET /jobs/{id}", headers={"Retry-After": "1"})
    open_now[who] = open_now.get(who, 0) + 1
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            open_now[who] -= 1
            if open_now[who] <= 0:
                del open_now[who]

    return release


_LAST_EVENT_ID = ("replay the events after this one: an event id of this stream (<ms>-<seq>); leave it out to "
                  "replay from the start, anything else is 422")


@jobs.get("/jobs/{job_id}/events", response_class=StreamingResponse,
          responses={**EVENT_STREAM, **responses(404, 422, 429, 503)})
async def job_events(
    job_id: str, request: Request, who: Who,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", description=_LAST_EVENT_ID)] = None,
    last_event_id: Annotated[str | None, Query(description=_LAST_EVENT_ID + " (for clients that cannot set the "
                                                                             "header; the header wins)")] = None,
) -> StreamingResponse:
    """Server-Sent Events of a job. Each event's id is its Redis stream id; reconnecting with
    ``Last-Event-ID`` replays what was missed (an id that is not an event id is 422). The stream closes after the
    terminal event. A client may hold ``DDPM_MAX_SSE_PER_CLIENT`` streams at a time (429 beyond)."""
    store: JobStore = request.app.state.store
    last_id = (_event_id(last_event_id_header, "Last-Event-ID") if last_event_id_header
               else _event_id(last_event_id, "last_event_id")) or "0"
    await anyio.to_thread.run_sync(_get_job, store, job_id, who)  # 404 / 503 before the stream starts
    release = _take_stream_slot(request)
    return _CountedStream(_event_stream(request, job_id, last_id), release)


@info.get("/models", response_model=ModelsView)
def list_models(request: Request, store: Store) -> ModelsView:
    """The checkpoints this service serves, with their metadata and how many live workers serve each; the first
    is the default."""
    catalog: ModelCatalog = request.app.state.catalog
    try:
        workers: dict[str, int] | None = live_workers_per_model(store, list(catalog.files))
    except StoreUnavailable:
        workers = None
    return ModelsView(default=catalog.default, models=catalog.info(workers))


@info.get("/metrics", response_class=Response, responses=PROMETHEUS_TEXT)
def prometheus_metrics(request: Request, store: Store) -> Response:
    """Prometheus metrics of the API process (queue depth, outstanding jobs and live workers per model sampled
    now)."""
    try:
        queued = store.queue_length()
        metrics.QUEUE_DEPTH.set(queued)
        metrics.JOBS_OUTSTANDING.set(queued + store.running_count())
        for model, count in live_workers_per_model(store, list(request.app.state.catalog.files)).items():
            metrics.LIVE_WORKERS.labels(model).set(count)
    except StoreUnavailable:
        log.warning("queue depth and workers not sampled: redis unavailable")
    return Response(metrics.exposition(metrics.API_REGISTRY), media_type=metrics.CONTENT_TYPE)


@health.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (no dependencies checked)."""
    return {"status": "ok"}


@health.get("/readyz", response_model=ReadyView, responses=responses(503))
def readyz(request: Request, store: Store) -> ReadyView:
    """Ready when the job store (Redis) answers: the API can take, queue and show jobs. Whether a live worker
    serves the default model is said beside it (``worker``), not as unreadiness: without one, jobs wait in the
    queue. Needs no key and says nothing more (no worker names, hosts or devices)."""
    store.ping()
    default = request.app.state.catalog.default
    if live_workers_per_model(store, [default])[default]:
        return ReadyView(status="ready", worker="serving", message="a worker serves the default model")
    return ReadyView(status="ready", worker="none",
                     message=f"no worker has served the default model in the last {WORKER_MAX_AGE_SECONDS:.0f} s; "
                             "jobs are accepted and wait in the queue until one does")


# ---- the app -----------------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, *, sse_keepalive_s: float = 15.0, sse_block_ms: int = 1000
               ) -> FastAPI:
    """The API for ``settings`` (default: ``get_settings()``). Redis is connected in the lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        kw = {"queue_name": settings.queue_name, "ttl_seconds": settings.job_ttl_seconds,
              "job_timeout_seconds": settings.job_timeout_seconds}
        timeout = settings.store_timeout_seconds  # a hung Redis costs a request this long, then fails fast
        app.state.store = JobStore(connect(settings.redis_url, timeout=timeout), high_water=settings.store_high_water,
                                   breaker=CircuitBreaker(open_seconds=timeout), **kw)  # type: ignore[arg-type]
        # SSE reads block up to sse_block_ms, so they get their own client and thread limiter.
        app.state.event_store = JobStore(connect(settings.redis_url, timeout=sse_block_ms / 1000 + 2.0),
                                         **kw)  # type: ignore[arg-type]
        app.state.sse_limiter = anyio.CapacityLimiter(256)
        app.state.catalog.refresh()
        log.info("API serving models %s, redis %s", list(settings.checkpoints), settings.redis_url)
        try:
            yield
        finally:
            app.state.store.redis.close()
            app.state.event_store.redis.close()

    app = FastAPI(title="DDPM generation service", version="0.1.0", lifespan=lifespan,
                  generate_unique_id_function=openapi.operation_id,
                  openapi_url=None, docs_url=None, redoc_url=None,  # added by apidocs.install, behind the key
                  description="Generate images with DDPM checkpoints and watch x0-hat frames as they denoise; "
                              "reconstruct, vary and interpolate pictures; measure their likelihood.\n\n"
                              "Errors: `{\"error\": {\"code\", \"message\"}}`.")
    app.state.keys = ApiKeys(settings.api_keys, settings.admin_api_keys)  # the app keeps the keys' digests only
    app.state.refused_keys = RefusedKeys(settings.auth_failures_per_minute)
    app.state.settings = settings.model_copy(update={"api_keys": [], "admin_api_keys": [], "webhook_secret": []})
    app.state.webhook_policy = WebhookPolicy.from_settings(settings)  # whether secrets are set, not the secrets
    app.state.catalog = ModelCatalog(settings.checkpoints)
    app.state.limits = Limits(settings.max_num_images, settings.max_steps, settings.max_image_steps,
                              settings.max_frames_per_job, settings.max_input_pixels)
    app.state.sse_open = {}  # client id -> SSE streams open now (this process)
    app.state.sse_keepalive_s, app.state.sse_block_ms = sse_keepalive_s, sse_block_ms
    # Without keys the routes are open and the OpenAPI schema declares no security.
    protected = [Depends(require_key)] if app.state.keys.enabled else []
    protected.append(Depends(rate_limit))  # a no-op unless rate_limit_per_minute is set
    app.include_router(creating, dependencies=protected, responses=responses(401, 403, 429))
    app.include_router(jobs, dependencies=protected, responses=responses(401, 403, 429))
    app.include_router(info, dependencies=protected, responses=responses(401, 403, 429))
    app.include_router(health)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # /openapi.json, /docs and /redoc behind the same key as the API; their assets served from here, never a CDN
    apidocs.install(app, dependencies=protected)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    install_error_handlers(app)
    openapi.install(app, app.state.limits, list(settings.checkpoints))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       routes=dict.fromkeys(UPLOAD_ROUTES, settings.max_upload_bytes))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "Last-Event-ID",
                                          IDEMPOTENCY_HEADER],
                           expose_headers=["Location", "Retry-After", REPLAYED_HEADER])
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(ClientAddressMiddleware, trusted=TrustedProxies(settings.trusted_proxies))  # outermost
    return app


# ---- `ddpm serve` ------------------------------------------------------------------------------------------
def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``ddpm serve`` and ``ddpm up`` (each overrides its DDPM_* environment variable)."""
    parser.add_argument("--host", help="address to listen on (DDPM_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="API port (DDPM_PORT; default 8000)")
    parser.add_argument("--redis-url", help="redis://host:port/db (DDPM_REDIS_URL)")
    parser.add_argument("--checkpoint", action="append", metavar="NAME=FILE",
                        help="a model to serve; repeatable, the first is the default (DDPM_CHECKPOINTS)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    overrides: dict[str, Any] = {}
    for flag, field in (("host", "host"), ("port", "port"), ("redis_url", "redis_url"),
                        ("checkpoint", "checkpoints")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_common_flags(parser)


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"ddpm serve: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level)
    config = server_config(create_app(settings), settings)
    del settings  # holds the plain API keys; the app has their digests
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 3  # 3: could not start (e.g. the port is taken), as uvicorn.run exits
