"""The engine's sink in the worker: a job's frames, progress and end written to the store, and RQ told.

``StoreSink`` is what ``service.engine.Engine`` reports to (the ``EngineSink`` protocol). It answers the engine's
one synchronous call, ``sync`` (progress of the tick and the cancel check, one Redis round-trip), at once; every
other call becomes tasks on the job's lane (``service.lanes``): PNG encoding, the frame or terminal write to the
store (``service.queue.JobStore``), then RQ's record of the job's end (``service.worker_session``). The user-facing
state is always written first, so RQ's records never say a job ended that users still see running.

``StoreWriter`` retries each of those writes until the store takes it: a store that is down, full or read-only is
waited out, never a reason to drop a frame or a result.

This module knows the store, RQ's session, tensors and PNG; it does not know how the engine batches or HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from model.images import png_bytes
from service import metrics
from service.engine import Measurement, StepProgress
from service.job_state import JobState
from service.lanes import Lanes
from service.queue import JobStore
from service.store_errors import StoreUnavailable
from service.worker_session import WorkerSession

__all__ = ["StoreSink", "StoreWriter", "encode_frame", "encode_images"]

log = logging.getLogger(__name__)
Written = TypeVar("Written")  # what a store write returns


def encode_frame(x0_hat: torch.Tensor) -> bytes:
    """One preview frame: the x0-hat of all of a job's images (B, C, H, W) in [-1, 1], a grid when B > 1."""
    return png_bytes(x0_hat.detach().cpu())


def encode_images(images: torch.Tensor) -> list[bytes]:
    """Final images (B, C, H, W) in [-1, 1] -> one PNG each."""
    images = images.detach().cpu()
    return [png_bytes(images[i]) for i in range(images.shape[0])]


class StoreWriter:
    """Runs a store write until it succeeds: a store that is down, full or read-only is waited out (backoff
    0.5 s doubling to 5 s, logged), never a reason to drop a frame or a result. Once ``give_up_at`` (monotonic
    seconds) is set and passed (the worker is stopping and its grace for the store is over), the write raises
    ``StoreUnavailable`` instead: the job is then left to its lease (another worker retries it or fails it)."""

    def __init__(self) -> None:
        self.give_up_at: float | None = None

    def __call__(self, fn: Callable[[], Written], what: str) -> Written:
        backoff, tries = 0.5, 0
        while True:
            try:
                return fn()
            except StoreUnavailable as exc:
                tries += 1
                metrics.WORKER_ERRORS.labels("redis").inc()
                if self.give_up_at is not None and time.monotonic() >= self.give_up_at:
                    log.error("gave up %s after %d tries (%s): the job's lease will expire and another worker "
                              "will retry or fail it", what, tries, exc)
                    raise
                if tries == 1 or tries % 10 == 0:
                    log.warning("store unavailable while %s (%s; try %d); retrying", what, exc, tries)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


class StoreSink:
    """The engine's sink: progress and cancel checks in one round-trip; everything else on the job's lane, each
    write retried by ``writer`` until the store takes it."""

    def __init__(self, store: JobStore, lanes: Lanes, session: WorkerSession | None = None,
                 writer: StoreWriter | None = None):
        self.store, self.lanes, self.session = store, lanes, session
        self.write = writer or StoreWriter()
        # job id -> (model, kind, monotonic start), for the metrics of its end; the only per-job state kept here,
        # dropped when the job ends, so a worker that runs for months holds nothing of the jobs it finished
        self._running: dict[str, tuple[str, str, float]] = {}

    def began(self, job_id: str, model: str, kind: str = "generate") -> None:
        self._running[job_id] = (model, kind, time.monotonic())

    def _finished(self, job_id: str, status: str, images: int = 0) -> None:
        model, kind, started = self._running.pop(job_id, ("unknown", "generate", time.monotonic()))
        metrics.JOBS_FINISHED.labels(model, kind, status).inc()
        metrics.JOB_RUN_DURATION.labels(model, kind, status).observe(time.monotonic() - started)
        if images:
            metrics.IMAGES_GENERATED.labels(model).inc(images)

    def _session(self, call: Callable[[WorkerSession], None], what: str) -> None:
        session = self.session
        if session is not None:
            self.write(lambda: call(session), what)

    def sync(self, progress: Sequence[StepProgress], active: Sequence[str]) -> set[str]:
        return self.store.sync_progress([(p.job_id, p.step, p.total, p.t) for p in progress], active)

    def frame(self, job_id: str, step: int, t: int, x0_hat: torch.Tensor) -> None:
        x = x0_hat.detach().cpu()  # the one host<->device copy of a step, on preview steps only

        def task() -> None:
            png = encode_frame(x)
            self.write(lambda: self.store.add_frame(job_id, step, t, png), f"storing a frame of job {job_id}")

        self.lanes.submit(job_id, task)

    def succeeded(self, job_id: str, images: torch.Tensor, last: StepProgress) -> None:
        x = images.detach().cpu()
        self.lanes.submit(job_id, lambda: self._succeed(job_id, last, encode_images(x), None))

    def measured(self, job_id: str, measurement: Measurement, last: StepProgress) -> None:
        self.lanes.submit(job_id, lambda: self._succeed(job_id, last, [], measurement.as_dict()))

    def _succeed(self, job_id: str, last: StepProgress, pngs: list[bytes], result: dict[str, Any] | None) -> None:
        """On the job's lane: its last progress, then its images or result with ``succeeded`` in one write."""
        self.write(lambda: self.store.progress(job_id, last.step, last.total, last.t),
                   f"writing the progress of job {job_id}")
        if self.write(lambda: self.store.succeed(job_id, pngs, result), f"storing the results of job {job_id}"):
            self._finished(job_id, JobState.SUCCEEDED.value, len(pngs))
            self._session(lambda s: s.record_finished(job_id, {"status": "succeeded", "images": len(pngs)}),
                          f"recording job {job_id} as finished")
            return
        status = self.write(lambda: (self.store.get(job_id) or {}).get("status"), f"reading job {job_id}")
        if status == JobState.CANCELED:  # canceled between its last step and now: the cancel wins
            self._finished(job_id, JobState.CANCELED.value)
            self._session(lambda s: s.record_canceled(job_id), f"recording job {job_id} as canceled")
        else:  # no longer ours (e.g. requeued after its lease ran out during a long store outage)
            log.warning("job %s is %s, no longer running here: its results are dropped", job_id, status)
            self._running.pop(job_id, None)
            if self.session is not None:
                self.session.forget(job_id)

    def canceled(self, job_id: str) -> None:
        def task() -> None:
            self.write(lambda: self.store.mark_canceled(job_id), f"marking job {job_id} canceled")
            self._finished(job_id, JobState.CANCELED.value)
            self._session(lambda s: s.record_canceled(job_id), f"recording job {job_id} as canceled")

        self.lanes.submit(job_id, task)

    def failed(self, job_id: str, code: str, message: str) -> None:
        metrics.WORKER_ERRORS.labels(f"job_{code}").inc()

        def task() -> None:
            self.write(lambda: self.store.fail(job_id, code, message), f"recording the failure of job {job_id}")
            self._finished(job_id, JobState.FAILED.value)
            self._session(lambda s: s.record_failed(job_id, f"{code}: {message}"), f"recording job {job_id} as failed")

        self.lanes.submit(job_id, task)

    def handed_back(self, job_id: str, reason: str) -> None:
        def task() -> None:
            self._running.pop(job_id, None)
            self.write(lambda: self.store.requeued(job_id, reason), f"handing job {job_id} back")
            self._session(lambda s: s.hand_back(job_id), f"putting job {job_id} back in the queue")

        self.lanes.submit(job_id, task)
