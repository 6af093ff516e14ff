"""The job record as ``GET /jobs/{id}`` returns it, built from the job store: the API answers with it and the
webhook dispatcher POSTs it, so a receiver gets exactly what a poller gets.

This module knows the store's read methods and the response schemas; it does not know HTTP routes or errors.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from service.queue import JobState, JobStore
from service.schemas import FrameView, ImageView, JobView, LikelihoodResult, Progress, WebhookView
from service.webhooks.outbox import webhook_view

__all__ = ["job_view"]


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _base64_png(png: bytes | None) -> str | None:
    return None if png is None else base64.b64encode(png).decode()


def _queue_position(store: JobStore, job_id: str) -> int | None:
    """1 = the next job a worker takes."""
    position = store.queue_position(job_id)
    return None if position is None else position + 1


def job_view(store: JobStore, job: dict[str, Any], since: int = -1, inline: bool = False) -> JobView:
    """``job`` (a record from ``store.get``) with its frames after ``since``, its images once succeeded (base64
    PNG data with ``inline``; a likelihood job has none, its ``result`` instead) and its webhook deliveries."""
    job_id, status = job["id"], JobState(job["status"])
    frames = [FrameView(index=f["index"], step=f["step"], t=f["t"], url=f"/jobs/{job_id}/frames/{f['index']}.png",
                        data=_base64_png(store.frame_png(job_id, f["index"])) if inline else None)
              for f in store.frames(job_id, since)]
    images, result = [], None
    if status is JobState.SUCCEEDED and job["kind"] == "likelihood":
        measured = store.result(job_id)
        result = None if measured is None else LikelihoodResult.model_validate(measured)
    elif status is JobState.SUCCEEDED:
        seeds = job["seeds"] or [None] * job["num_images"]
        images = [ImageView(index=i, seed=seeds[i], url=f"/jobs/{job_id}/images/{i}.png",
                            data=_base64_png(store.image_png(job_id, i)) if inline else None)
                  for i in range(job["num_images"])]
    webhook = webhook_view(store.redis, job_id)
    return JobView(
        id=job_id, kind=job["kind"], status=status.value, model=job["model"], request=job["request"],
        progress=Progress(step=job["step"], total=job["total"], t=job["t"] if job["t"] >= 0 else None),
        queue_position=_queue_position(store, job_id) if status is JobState.QUEUED else None,
        frames=frames, images=images, result=result, error=job["error"],
        cancel_requested=status is JobState.RUNNING and store.cancel_requested(job_id), attempt=job["attempt"],
        created_at=_utc(job["created_at"]), started_at=_utc(job["started_at"]), ended_at=_utc(job["ended_at"]),
        webhook=None if webhook is None else WebhookView.model_validate(webhook))
