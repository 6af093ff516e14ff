"""The states of a job, as users see them: no Redis, no RQ, no torch, so any process may import it.

    queued ──> running ──> succeeded
      │  ^        │
      │  └────────┤        (handed back: the worker stopped, or died and the job has a retry left)
      │           ├──> failed
      └───────────┴──> canceled
    (a queued job may also fail: its worker died while taking it and no retry is left)

``service.queue`` stores them and makes every transition atomic; RQ's own job statuses (``rq.job.JobStatus``)
are RQ's bookkeeping of the same job and are never shown to users.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TERMINAL_STATES", "JobState"]


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})
