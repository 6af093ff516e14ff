"""Every Prometheus metric of the service, defined once, each family in the registry of the process that owns it.

Two processes export metrics and each exports only its own families, so an alert on a family never fires on a
process that cannot move it (an API pod has no model to load; a worker has no queue to sample):

    API_REGISTRY     GET /metrics of ``ddpm serve``: HTTP requests, jobs submitted, queue depth
    WORKER_REGISTRY  the worker's metrics port: jobs run and finished, denoising steps, images, model, errors

Both also carry the standard ``process_*`` and ``python_*`` families of their own process. Names follow the
Prometheus conventions (``ddpm_`` prefix, base units in the name: ``_seconds``; counters end in ``_total``;
help texts say what is counted); ``promtool check metrics`` accepts both expositions (tested). Buckets fit
diffusion runs: a job waits and runs for seconds to minutes, a denoising step takes milliseconds to seconds.
This module knows no HTTP server and no Redis: ``service.api`` and ``service.worker`` serve ``exposition()``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

__all__ = [
    "API_REGISTRY",
    "CONTENT_TYPE",
    "DISPATCHER_REGISTRY",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_DURATION",
    "IMAGES_GENERATED",
    "JOBS_FINISHED",
    "JOBS_OUTSTANDING",
    "JOBS_SUBMITTED",
    "JOB_QUEUE_WAIT",
    "JOB_RUN_DURATION",
    "LIVE_WORKERS",
    "QUEUE_DEPTH",
    "STEP_BATCH_SIZE",
    "STEP_DURATION",
    "WEBHOOK_ATTEMPTS",
    "WEBHOOK_DELIVERIES",
    "WORKER_ACTIVE_JOBS",
    "WORKER_ERRORS",
    "WORKER_MODEL_LOADED",
    "WORKER_REGISTRY",
    "exposition",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the Prometheus text format
# No `<name>_created` gauge beside every counter and histogram: in the text format each is a family of its own
# that dashboards never use and that doubles the series count.
disable_created_metrics()
_JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (serve it with ``CONTENT_TYPE``)."""
    return generate_latest(registry)


# ---- the API process ---------------------------------------------------------------------------------------
API_REGISTRY = _registry()
HTTP_REQUEST_DURATION = Histogram(
    "ddpm_http_request_duration_seconds", "Time to answer an HTTP request, by method, route template and status.",
    ["method", "route", "status"], buckets=_HTTP_BUCKETS, registry=API_REGISTRY)
HTTP_REQUESTS = Counter("ddpm_http_requests_total", "HTTP requests answered, by method, route template and status.",
                        ["method", "route", "status"], registry=API_REGISTRY)
JOBS_SUBMITTED = Counter("ddpm_jobs_submitted_total", "Jobs accepted, by model and kind (generate, interpolate, "
                         "likelihood: the route that made them).", ["model", "kind"], registry=API_REGISTRY)
QUEUE_DEPTH = Gauge("ddpm_queue_depth", "Jobs waiting in the queue, sampled when /metrics is scraped.",
                    registry=API_REGISTRY)
JOBS_OUTSTANDING = Gauge("ddpm_jobs_outstanding", "Jobs waiting in the queue or running on a worker, sampled when "
                         "/metrics is scraped; the worker autoscaler (k8s/keda) sizes the workers by it.",
                         registry=API_REGISTRY)
LIVE_WORKERS = Gauge("ddpm_live_workers", "Workers with a recent heartbeat serving each configured model, sampled "
                     "when /metrics is scraped; 0 for the default model: jobs are accepted but wait.", ["model"],
                     registry=API_REGISTRY)

# ---- the worker process ------------------------------------------------------------------------------------
WORKER_REGISTRY = _registry()
JOBS_FINISHED = Counter("ddpm_jobs_finished_total", "Jobs this worker brought to a terminal state, by model, kind "
                        "and state.", ["model", "kind", "status"], registry=WORKER_REGISTRY)
JOB_QUEUE_WAIT = Histogram("ddpm_job_queue_wait_seconds", "Time from a job's submission to this worker starting "
                           "it, by model.", ["model"], buckets=_JOB_BUCKETS, registry=WORKER_REGISTRY)
JOB_RUN_DURATION = Histogram("ddpm_job_run_duration_seconds", "Time from this worker starting a job to its end, "
                             "by model, kind and terminal state.", ["model", "kind", "status"], buckets=_JOB_BUCKETS,
                             registry=WORKER_REGISTRY)
STEP_DURATION = Histogram("ddpm_denoising_step_duration_seconds",
                          "Wall time of one denoising step (one U-Net forward over the batch, plus updates).",
                          ["model"], buckets=_STEP_BUCKETS, registry=WORKER_REGISTRY)
STEP_BATCH_SIZE = Histogram("ddpm_denoising_step_batch_images", "Images in one U-Net forward pass, by model.",
                            ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=WORKER_REGISTRY)
IMAGES_GENERATED = Counter("ddpm_images_generated_total", "Final images this worker produced, by model.", ["model"],
                           registry=WORKER_REGISTRY)
WORKER_ACTIVE_JOBS = Gauge("ddpm_worker_active_jobs", "Jobs this worker is running now.", registry=WORKER_REGISTRY)
WORKER_MODEL_LOADED = Gauge("ddpm_worker_model_loaded", "1 when this worker's checkpoints are loaded, else 0.",
                            registry=WORKER_REGISTRY)
WORKER_ERRORS = Counter("ddpm_worker_errors_total", "Errors in this worker, by kind (redis, heartbeat, background, "
                        "job_<code>).", ["kind"], registry=WORKER_REGISTRY)

# ---- webhooks: the dispatcher's (service/webhooks/dispatcher.py) ----------------------------------------------
# A worker runs the dispatcher as its child and counts what it relays in its own /metrics (WORKER_REGISTRY); a
# `ddpm webhooks` process on its own serves the same two families with its process families (DISPATCHER_REGISTRY).
WEBHOOK_ATTEMPTS = Counter("ddpm_webhook_delivery_attempts_total",
                           "Webhook POST attempts by event and result (2xx, 3xx, 4xx, 5xx, timeout, connect_error, "
                           "dns_error, refused, expired).", ["event", "result"], registry=WORKER_REGISTRY)
WEBHOOK_DELIVERIES = Counter("ddpm_webhook_deliveries_total",
                             "Webhook deliveries that ended, by event and outcome (delivered, failed: given up).",
                             ["event", "outcome"], registry=WORKER_REGISTRY)
DISPATCHER_REGISTRY = _registry()
DISPATCHER_REGISTRY.register(WEBHOOK_ATTEMPTS)
DISPATCHER_REGISTRY.register(WEBHOOK_DELIVERIES)
