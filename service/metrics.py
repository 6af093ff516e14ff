"""Every Prometheus metric of the service, defined once (names per Prometheus conventions: base units, _total).

The API process exposes its registry at ``GET /metrics``; the worker serves its own on its metrics port. Both
processes import this module; each only moves the metrics that belong to it. Buckets fit diffusion runs:
a job waits and runs for seconds to minutes, a denoising step takes milliseconds to seconds.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
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
    "WORKER_ACTIVE_JOBS",
    "WORKER_ERRORS",
    "WORKER_MODEL_LOADED",
]

_JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# ---- API ---------------------------------------------------------------------------------------------------
HTTP_REQUEST_DURATION = Histogram(
    "ddpm_http_request_duration_seconds", "HTTP request latency by route template.",
    ["method", "route", "status"], buckets=_HTTP_BUCKETS)
HTTP_REQUESTS = Counter("ddpm_http_requests_total", "HTTP requests by route and status code.",
                        ["method", "route", "status"])
JOBS_SUBMITTED = Counter("ddpm_jobs_submitted_total", "Jobs accepted by POST /generate.", ["model"])
QUEUE_DEPTH = Gauge("ddpm_queue_depth", "Jobs waiting in the queue (sampled at scrape time).")
JOBS_OUTSTANDING = Gauge("ddpm_jobs_outstanding", "Jobs waiting in the queue or running on a worker (sampled at "
                         "scrape time); the worker autoscaler (k8s/keda) sizes the workers by it.")
LIVE_WORKERS = Gauge("ddpm_live_workers", "Workers with a recent heartbeat serving each configured model (sampled at "
                     "scrape time); 0 for the default model: jobs are accepted but wait.", ["model"])

# ---- worker ------------------------------------------------------------------------------------------------
JOBS_FINISHED = Counter("ddpm_jobs_finished_total", "Jobs that reached a terminal state.", ["model", "status"])
JOB_QUEUE_WAIT = Histogram("ddpm_job_queue_wait_seconds", "Time from submission to a worker starting the job.",
                           ["model"], buckets=_JOB_BUCKETS)
JOB_RUN_DURATION = Histogram("ddpm_job_run_duration_seconds", "Time from a worker starting a job to its end.",
                             ["model", "status"], buckets=_JOB_BUCKETS)
STEP_DURATION = Histogram("ddpm_denoising_step_duration_seconds",
                          "Wall time of one denoising step (one U-Net forward over the batch, plus updates).",
                          ["model"], buckets=_STEP_BUCKETS)
STEP_BATCH_SIZE = Histogram("ddpm_denoising_step_batch_images", "Images in one U-Net forward pass.", ["model"],
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
IMAGES_GENERATED = Counter("ddpm_images_generated_total", "Final images produced.", ["model"])
WORKER_ACTIVE_JOBS = Gauge("ddpm_worker_active_jobs", "Jobs this worker is running now.")
WORKER_MODEL_LOADED = Gauge("ddpm_worker_model_loaded", "1 when the worker's checkpoints are loaded.")
WORKER_ERRORS = Counter("ddpm_worker_errors_total", "Errors in the worker by kind.", ["kind"])
