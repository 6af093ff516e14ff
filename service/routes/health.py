"""The probes, open to everyone (no API key) and saying nothing about the deployment (no worker names, hosts or
devices): ``/healthz`` (the process answers) and ``/readyz`` (its job store answers; whether a worker serves the
default model is said beside it, never as unreadiness: without one, jobs wait in the queue).
"""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import AppSettings, Catalog, Store
from service.schemas import ReadyView
from service.web import responses

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyView, responses=responses(503))
def readyz(store: Store, catalog: Catalog, settings: AppSettings) -> ReadyView:
    """Ready when the job store (Redis) answers: the API can take, queue and show jobs. Whether a live worker
    serves the default model is said beside it (``worker``), not as unreadiness: without one, jobs wait in the
    queue. Needs no key and says nothing more (no worker names, hosts or devices)."""
    store.ping()
    if catalog.live_workers(store, [catalog.default])[catalog.default]:
        return ReadyView(status="ready", worker="serving", message="a worker serves the default model")
    return ReadyView(status="ready", worker="none",
                     message=f"no worker has served the default model in the last {settings.worker_lease_seconds} "
                             "s; jobs are accepted and wait in the queue until one does")
