"""What the service serves and how it fares: ``GET /models`` (the checkpoints, their metadata and live workers)
and ``GET /metrics`` (Prometheus, with the queue and the workers sampled at scrape time). Both sit behind the
API key when keys are on; the probes are ``service.routes.health``'s.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import Response

from service import metrics
from service.deps import Catalog, Store
from service.openapi import PROMETHEUS_TEXT
from service.queue import StoreUnavailable
from service.schemas import ModelsView

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter(tags=["service"])


@router.get("/models", response_model=ModelsView)
def list_models(store: Store, catalog: Catalog) -> ModelsView:
    """The checkpoints this service serves, with their metadata and how many live workers serve each; the first
    is the default."""
    try:
        workers: dict[str, int] | None = catalog.live_workers(store)
    except StoreUnavailable:
        workers = None
    return ModelsView(default=catalog.default, models=catalog.info(workers))


@router.get("/metrics", response_class=Response, responses=PROMETHEUS_TEXT)
def prometheus_metrics(store: Store, catalog: Catalog) -> Response:
    """Prometheus metrics of the API process (queue depth, outstanding jobs and live workers per model sampled
    now)."""
    try:
        queued = store.queue_length()
        metrics.QUEUE_DEPTH.set(queued)
        metrics.JOBS_OUTSTANDING.set(queued + store.running_count())
        for model, count in catalog.live_workers(store).items():
            metrics.LIVE_WORKERS.labels(model).set(count)
    except StoreUnavailable:
        log.warning("queue depth and workers not sampled: redis unavailable")
    return Response(metrics.exposition(metrics.API_REGISTRY), media_type=metrics.CONTENT_TYPE)
