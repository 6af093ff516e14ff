"""What the API's routes share: the app's job store, its settings, the caller, and a job the caller may see.

``Store``, ``Who`` and ``AppSettings`` are ``Annotated`` dependencies; ``visible_job`` is the one owner rule of every
job route (another key's job answers exactly as an unknown id: 404). This module knows FastAPI's request and the
job store; it defines no routes.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from service.queue import JobStore, is_valid_job_id
from service.settings import Settings
from service.web import ApiError, Caller, caller

__all__ = ["AppSettings", "Store", "Who", "not_found", "visible_job"]


def _store(request: Request) -> JobStore:
    return request.app.state.store  # type: ignore[no-any-return]


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


Store = Annotated[JobStore, Depends(_store)]
Who = Annotated[Caller, Depends(caller)]
AppSettings = Annotated[Settings, Depends(_settings)]


def not_found(job_id: str, ttl: int) -> ApiError:
    return ApiError(404, "not_found", f"no job {job_id}: the id is unknown or the job expired (jobs and their "
                                      f"frames and images are kept {ttl} s); expired jobs answer 404, not 410")


def visible_job(store: JobStore, job_id: str, who: Caller) -> dict[str, Any] | None:
    """The job record, if it exists and ``who`` may see it; else None (another key's job is indistinguishable
    from an unknown one). An id we could not have made never reaches Redis."""
    if not is_valid_job_id(job_id):
        return None
    job = store.get(job_id)
    if job is None or not who.may_see(job.get("owner")):
        return None
    return job
