"""The routes that create jobs, one per operation of the paper, all on the same queue, worker and job record:

    POST /generate      samples; with ``init_image``, reconstructions and variations of a picture
    POST /interpolate   the interpolants of two pictures at a timestep, one per lambda
    POST /likelihood    the variational bound of pictures in bits/dim, every term, the rate-distortion curve

Each route resolves its request against the server's limits and the chosen model (``service.resolve``), checks
its webhook, fits its input pictures to the model (``service.inputs``: uploads and references to the caller's
finished jobs), then queues the job once per ``Idempotency-Key`` (``service.idempotency``). The routes are
sync: FastAPI runs them in its thread pool, so decoding pictures never blocks the event loop. Their bodies may
carry pictures, so they take ``DDPM_MAX_UPLOAD_BYTES`` (``UPLOAD_ROUTES``); every other route keeps
``DDPM_MAX_BODY_BYTES``. All three go through ``JobCreation.create``, the one way a job is made. This module
knows the request schemas and the store; errors become HTTP statuses in ``service.web``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Response

from service import metrics
from service.auth import Caller
from service.deps import AppSettings, Catalog, RequestLimits, Store, Webhooks, Who, visible_job
from service.idempotency import Idempotency
from service.inputs import FittedInput, InputImages
from service.openapi import LOCATION
from service.queue import JobState, JobStore
from service.resolve import Resolved, resolve_generate, resolve_interpolate, resolve_likelihood
from service.schemas import (
    GenerateAccepted,
    GenerateRequest,
    ImageRef,
    InterpolateRequest,
    JobRequest,
    JobStatus,
    LikelihoodRequest,
    Limits,
    RequestInvalid,
)
from service.web import ApiError, responses
from service.webhooks import requested_subscription
from service.webhooks.outbox import Outbox

__all__ = ["UPLOAD_ROUTES", "JobCreation", "router"]

UPLOAD_ROUTES = ("/generate", "/interpolate", "/likelihood")
R = TypeVar("R", bound=JobRequest)
Resolver = Callable[[R, Limits, dict[str, dict[str, Any]], str], Resolved]

router = APIRouter(tags=["jobs"])
_ANSWERS: dict[int | str, dict[str, Any]] = {
    202: {"headers": LOCATION},
    200: {"model": GenerateAccepted, "headers": LOCATION,
          "description": "an Idempotency-Key replay: the job the first request with this key created"},
    **responses(400, 409, 413, 422, 503),
}


def _accepted(job_id: str, status: JobStatus) -> GenerateAccepted:
    return GenerateAccepted(id=job_id, status=status, status_url=f"/jobs/{job_id}", events_url=f"/jobs/{job_id}/events")


def _reader(store: JobStore, who: Caller) -> Callable[[ImageRef, str], bytes]:
    """Reads a finished job's image for a reference, with the owner rule of every job route: another key's
    job is refused exactly as an unknown one."""

    def read(ref: ImageRef, field: str) -> bytes:
        job = visible_job(store, ref.job, who)
        if job is None:
            raise RequestInvalid(f"{field}.job", f"no job {ref.job}: the id is unknown or the job expired")
        if job["kind"] == "likelihood":
            raise RequestInvalid(f"{field}.job", f"job {ref.job} measured a likelihood: it has no images")
        if job["status"] != JobState.SUCCEEDED:
            raise RequestInvalid(f"{field}.job", f"job {ref.job} is {job['status']}: its images exist once it has "
                                                 "succeeded")
        if not 0 <= ref.index < job["num_images"]:
            raise RequestInvalid(f"{field}.index", f"job {ref.job} has images 0..{job['num_images'] - 1} (got "
                                                   f"{ref.index})")
        png = store.image_png(ref.job, ref.index)
        if png is None:
            raise RequestInvalid(field, f"image {ref.index} of job {ref.job} has expired")
        return png

    return read


def _fit(resolved: Resolved, meta: dict[str, Any], limits: Limits, store: JobStore, who: Caller
         ) -> list[FittedInput]:
    if not resolved.inputs:
        return []
    pictures = InputImages(int(meta["image_size"]), int(meta["channels"]), limits.max_input_pixels,
                           _reader(store, who))
    return [pictures.one(item, name) for name, item in resolved.inputs]


class JobCreation:
    """What making a job takes (FastAPI builds one per request from the app's dependencies); ``create`` is the
    one way a job is made: resolve, check the webhook, fit the pictures, queue (once per Idempotency-Key)."""

    def __init__(self, response: Response, store: Store, who: Who, idempotency: Idempotency, catalog: Catalog,
                 limits: RequestLimits, settings: AppSettings, webhooks: Webhooks):
        self.response, self.store, self.who, self.idempotency = response, store, who, idempotency
        self.catalog, self.limits, self.settings, self.webhooks = catalog, limits, settings, webhooks

    def create(self, body: R, resolve: Resolver[R]) -> GenerateAccepted:
        store, catalog = self.store, self.catalog
        models = catalog.available()
        name = catalog.default if body.model is None else body.model
        if name in catalog.files and name not in models:
            raise ApiError(503, "model_unavailable", f"model {name!r} is configured but its checkpoint cannot be "
                                                     "read by the API yet; see GET /models")
        resolved = resolve(body, self.limits, models, catalog.default)
        hook = requested_subscription(body.webhook, body.webhook_events_filter, self.webhooks)
        fitted = _fit(resolved, models[resolved.model], self.limits, store, self.who)
        if fitted:
            resolved = resolved.with_sources([f.source for f in fitted])

        def create(job_id: str) -> GenerateAccepted:
            if hook is not None:  # before the job exists: no event of it can be missed
                Outbox(store.redis).subscribe(job_id, hook.url, hook.events, store.ttl, time.time())
            try:
                store.submit(resolved.request, resolved.model, num_images=resolved.num_images,
                             total_steps=resolved.total_steps, seeds=[resolved.seed] * resolved.num_images,
                             max_queue_length=self.settings.max_queue_length, owner=self.who.key, job_id=job_id,
                             kind=resolved.kind, inputs=[f.png for f in fitted])
            except BaseException:
                if hook is not None:
                    Outbox(store.redis).discard(job_id)
                raise
            metrics.JOBS_SUBMITTED.labels(resolved.model, resolved.kind).inc()
            return _accepted(job_id, "queued")

        def existing(job_id: str) -> GenerateAccepted | None:
            job = store.get(job_id)
            return None if job is None else _accepted(job_id, job["status"])

        accepted = self.idempotency.run(body, create, existing)
        self.response.headers["Location"] = accepted.status_url
        return accepted


Creation = Annotated[JobCreation, Depends()]


@router.post("/generate", status_code=202, response_model=GenerateAccepted, response_description="queued",
             responses=_ANSWERS)
def generate(body: GenerateRequest, creation: Creation) -> GenerateAccepted:
    """Queue a generation job; poll ``status_url``, stream ``events_url``, or name a ``webhook``. With
    ``init_image`` (and ``start_t``) its images are reconstructions or variations of that picture. With an
    ``Idempotency-Key`` a retried request returns the job the first one created (200) instead of a new one."""
    return creation.create(body, resolve_generate)


@router.post("/interpolate", status_code=202, response_model=GenerateAccepted, response_description="queued",
             responses=_ANSWERS)
def interpolate(body: InterpolateRequest, creation: Creation) -> GenerateAccepted:
    """Queue an interpolation job: both pictures are encoded at ``t`` and (1 - lambda) x_t + lambda x'_t is
    decoded for each lambda; the job's images are the interpolants in ``lambdas`` order."""
    return creation.create(body, resolve_interpolate)


@router.post("/likelihood", status_code=202, response_model=GenerateAccepted, response_description="queued",
             responses=_ANSWERS)
def likelihood(body: LikelihoodRequest, creation: Creation) -> GenerateAccepted:
    """Queue a likelihood job: the variational bound of each picture in bits/dim, every term, and the
    rate-distortion curve, in the job's ``result`` once it has succeeded. Progress counts the T terms; a frame is
    x0-hat at that t (what a receiver of the progressive code sees)."""
    return creation.create(body, resolve_likelihood)
