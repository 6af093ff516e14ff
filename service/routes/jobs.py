"""The routes of one job: its view, its PNGs and animations, its event stream, and cancelling it.

    GET    /jobs/{id}                   status, progress, queue position, frames so far, images or result
    GET    /jobs/{id}/frames/{n}.png    the x0-hat frame n (a grid of all the job's images)
    GET    /jobs/{id}/images/{i}.png    final image i of a succeeded job
    GET    /jobs/{id}/animation.webp    the frames as an animation, once the job has ended (and .gif)
    GET    /jobs/{id}/events            Server-Sent Events (``service.sse``)
    DELETE /jobs/{id}                   cancel

With API keys on, a job belongs to the key that submitted it: another key gets 404 for every route of the job
(``service.deps.visible_job``); admin keys see all. The routes are sync (FastAPI's thread pool) but for the event
stream, which reads the store in worker threads: nothing blocks the event loop.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from service.animation import MEDIA_TYPES, AnimationFormat, animate
from service.auth import Caller
from service.deps import EventStore, Store, Streams, StreamThreads, StreamTiming, Who, not_found, visible_job
from service.openapi import ANIMATION, EVENT_STREAM, PNG
from service.queue import TERMINAL_STATES, JobState, JobStore, StoreFull
from service.schemas import JobView
from service.sse import CountedStream, event_stream, parse_event_id
from service.views import job_view
from service.web import ApiError, client_id, responses

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"])
_CACHED = {"Cache-Control": "private, max-age=3600"}


def _job(store: JobStore, job_id: str, who: Caller) -> dict[str, Any]:
    """The job record, if it exists and ``who`` may see it; else 404 (the same answer: another key's job is
    indistinguishable from an unknown one)."""
    job = visible_job(store, job_id, who)
    if job is None:
        raise not_found(job_id, store.ttl)
    return job


def _png(data: bytes | None, what: str) -> Response:
    if data is None:
        raise ApiError(410, "expired", f"{what} has expired")
    return Response(data, media_type="image/png", headers=_CACHED)


@router.get("/jobs/{job_id}", response_model=JobView, response_model_exclude_none=False,
            responses=responses(404, 422, 503))
def get_job(job_id: str, store: Store, who: Who,
            since: Annotated[int, Query(ge=-1, le=10**9, description="only frames with index > since")] = -1,
            inline: Annotated[bool, Query(description="add base64 PNG data to frames and images")] = False
            ) -> JobView:
    """A job's status, progress, queue position, frames so far and (once succeeded) its images."""
    return job_view(store, _job(store, job_id, who), since, inline)


@router.get("/jobs/{job_id}/frames/{index}.png", response_class=Response,
            responses={**PNG, **responses(404, 410, 422, 503)})
def frame_png(job_id: str, index: int, store: Store, who: Who) -> Response:
    """The x0-hat frame ``index`` (a grid of all the job's images)."""
    job = _job(store, job_id, who)
    if not 0 <= index < job["num_frames"]:
        raise ApiError(404, "not_found", f"job {job_id} has {job['num_frames']} frames so far (0-based)")
    return _png(store.frame_png(job_id, index), f"frame {index} of job {job_id}")


@router.get("/jobs/{job_id}/images/{index}.png", response_class=Response,
            responses={**PNG, **responses(404, 410, 422, 503)})
def image_png(job_id: str, index: int, store: Store, who: Who) -> Response:
    """Final image ``index`` of a succeeded job."""
    job = _job(store, job_id, who)
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
    job = _job(store, job_id, who)
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
    return Response(data, media_type=MEDIA_TYPES[fmt], headers=_CACHED)


@router.get("/jobs/{job_id}/animation.webp", response_class=Response,
            responses={**ANIMATION["webp"], **responses(404, 410, 422, 503)})
def animation_webp(job_id: str, store: Store, who: Who) -> Response:
    """The job's x0-hat frames as an animated WebP (lossless, looping; the last frame held), once the job has
    ended."""
    return _animation(store, job_id, who, "webp")


@router.get("/jobs/{job_id}/animation.gif", response_class=Response,
            responses={**ANIMATION["gif"], **responses(404, 410, 422, 503)})
def animation_gif(job_id: str, store: Store, who: Who) -> Response:
    """The job's x0-hat frames as an animated GIF (256 colours per frame, looping; the last frame held), once the
    job has ended."""
    return _animation(store, job_id, who, "gif")


@router.delete("/jobs/{job_id}", response_model=JobView,
               response_description="the job now: canceled if it was queued, as it was if it had already finished",
               responses={202: {"model": JobView, "description": "the job is running: cancel_requested is true "
                                                                 "and it stops within one denoising step"},
                          **responses(404, 503)})
def cancel_job(job_id: str, store: Store, response: Response, who: Who) -> JobView:
    """Cancel: a queued job never starts (200, canceled); a running one stops within one denoising step
    (202, ``cancel_requested``). A finished job is left as it is (200)."""
    job = _job(store, job_id, who)
    state = store.cancel(job_id)
    if state is None:
        raise not_found(job_id, store.ttl)
    if state not in TERMINAL_STATES:
        response.status_code = 202
    return job_view(store, _job(store, job["id"], who), since=-1, inline=False)


_LAST_EVENT_ID = ("replay the events after this one: an event id of this stream (<ms>-<seq>); leave it out to "
                  "replay from the start, anything else is 422")


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={**EVENT_STREAM, **responses(404, 422, 429, 503)})
async def job_events(
    job_id: str, request: Request, who: Who, store: Store, events: EventStore, streams: Streams,
    timing: StreamTiming, threads: StreamThreads,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", description=_LAST_EVENT_ID)] = None,
    last_event_id: Annotated[str | None, Query(description=_LAST_EVENT_ID + " (for clients that cannot set the "
                                                                             "header; the header wins)")] = None,
) -> StreamingResponse:
    """Server-Sent Events of a job. Each event's id is its Redis stream id; reconnecting with
    ``Last-Event-ID`` replays what was missed (an id that is not an event id is 422). The stream closes after the
    terminal event. A client may hold ``DDPM_MAX_SSE_PER_CLIENT`` streams at a time (429 beyond)."""
    last_id = (parse_event_id(last_event_id_header, "Last-Event-ID") if last_event_id_header
               else parse_event_id(last_event_id, "last_event_id")) or "0"
    await anyio.to_thread.run_sync(_job, store, job_id, who)  # 404 / 503 before the stream starts
    release = streams.take(client_id(request))
    return CountedStream(event_stream(request, events, job_id, last_id, timing, threads), release)
