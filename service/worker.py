"""``ddpm worker``: a resident-model generation worker that batches the jobs it runs.

Start-up loads every served checkpoint once (CUDA when present), prepares it with the inference options
(``--precision``, ``--channels-last``, ``--compile``, ``--cuda-graphs``; defaults from
``model.inference.default_options`` for the device), warms it up, registers with RQ and starts a heartbeat
thread and the metrics/health server. The main thread is the *denoising thread*:

    loop:  admit queued jobs while the batch has room (block briefly only when idle)
           engine.tick()       one U-Net forward for all active jobs + one Redis round-trip (progress, cancels)

The engine reports to ``service.store_sink.StoreSink``, which runs everything slow or blocking that is not the
forward (PNG encoding, frame and result writes, RQ bookkeeping of finished jobs) on ``service.lanes.Lanes``, in
order per job. The worker process never forks (CUDA cannot be re-initialised in a forked child): it drives RQ
through ``service.worker_session.WorkerSession``.

One setting times liveness, ``worker_lease_seconds`` (``--lease-seconds``, default 15): the worker's heartbeat
lives that long and is sent every third of it, each claimed job's lease is that long and renewed with the
heartbeat, and a stopping worker's last writes wait that long for an unavailable store.

Store errors (``StoreUnavailable``: Redis unreachable, timed out, full, read-only, loading) never stop the
worker: the loop backs off and resumes, keeping its models and its running jobs; each write on a lane is retried
by ``StoreWriter`` until Redis takes it, so no frame or result is dropped; a claimed job whose start could not be
written is started on a later turn. Waiting for Redis at start-up, too.

Stopping (SIGTERM/SIGINT): no new jobs; active jobs keep stepping for up to ``--stop-grace`` seconds, then the
rest are handed back to the front of the queue (status ``queued`` again); a second signal hands back at once.
Every job's writes are drained before exit (given up one lease after the loop ends if Redis stays away: by then
the job's lease has run out and another worker retries it), so none is half-written; the exit status is 0.

This module adapts the engine to Redis; it knows no HTTP routes beyond its own /metrics and /healthz.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from model.images import from_uint8
from model.inference import InferenceOptions, default_options
from service import metrics
from service.engine import Engine, JobRejected, JobSpec, ServedModel, TickStats
from service.job_state import JobState
from service.lanes import Lanes
from service.queue import JobStore, StoreUnavailable, connect
from service.settings import Settings, describe_validation_error, get_settings, settings_from_args
from service.store_sink import StoreSink, StoreWriter
from service.worker_session import WorkerSession

__all__ = ["Worker", "configure_parser", "main", "run_job"]

log = logging.getLogger(__name__)

LOOP_STALL_SECONDS = 120.0  # /healthz fails when the loop has not come round for this long


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def inference_options(settings: Settings, device: torch.device) -> InferenceOptions:
    """The device's default options (``model.inference.default_options``) with what the settings set."""
    options = default_options(device, settings.max_batch_size)
    chosen: dict[str, Any] = {name: getattr(settings, name) for name in ("channels_last", "compile", "cuda_graphs")
                              if getattr(settings, name) is not None}
    if settings.precision != "auto":
        chosen["precision"] = settings.precision
    return replace(options, **chosen).for_device(device)


def input_pictures(pngs: Sequence[bytes | None]) -> torch.Tensor | None:
    """A job's stored input pictures (PNG, fitted to the model by the API) as (N, C, H, W) in [-1, 1] on the
    8-bit grid, as ``model.images.load_image`` reads a file; None without any. ``JobRejected`` if one expired or
    cannot be read."""
    if not pngs:
        return None
    rows = []
    for k, png in enumerate(pngs):
        if png is None:
            raise JobRejected("input_expired", f"input image {k} of the job is no longer stored; submit it again")
        try:
            with Image.open(io.BytesIO(png), formats=("PNG",)) as img:
                arr = np.asarray(img)
        except (OSError, ValueError) as exc:
            raise JobRejected("invalid_request", f"input image {k} cannot be read ({exc})") from None
        rows.append(from_uint8(arr[:, :, None] if arr.ndim == 2 else arr))
    return torch.cat(rows)


def job_spec(job_id: str, record: Mapping[str, Any], pngs: Sequence[bytes | None]) -> JobSpec:
    """What the engine runs for a started job: its stored request and its input pictures."""
    return JobSpec.from_request(job_id, record["model"] or "", record["request"] or {}, kind=record["kind"],
                                inputs=input_pictures(pngs))


class Worker:
    """One worker process: models, engine, RQ session, heartbeat thread, metrics server, signals."""

    def __init__(self, settings: Settings, *, name: str | None = None, device: str | None = None,
                 batch_invariant: bool | None = None, stop_grace: float = 10.0):
        self.settings = settings
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.device = pick_device(device or settings.device)
        self.batch_invariant = self.device.type == "cpu" if batch_invariant is None else batch_invariant
        self.options = inference_options(settings, self.device)
        self.stop_grace = stop_grace
        self.lease = settings.worker_lease_seconds
        self.beat_every = self.lease / 3
        self.store = JobStore(connect(settings.redis_url, timeout=5.0), queue_name=settings.queue_name,
                              ttl_seconds=settings.job_ttl_seconds, job_timeout_seconds=settings.job_timeout_seconds)
        self.session = WorkerSession(settings.redis_url, self.store, self.name, lease_seconds=self.lease)
        self.lanes = Lanes(threads=2, on_error=lambda exc: metrics.WORKER_ERRORS.labels("background").inc())
        self.writer = StoreWriter()
        self.sink = StoreSink(self.store, self.lanes, self.session, self.writer)
        self._unstarted: list[str] = []  # claimed jobs whose start could not be written yet (store unavailable)
        self.models: dict[str, ServedModel] = {}
        self.engine: Engine | None = None
        self.loop_alive_at = 0.0
        self._stop_at: float | None = None
        self._force_stop = False
        self._done = threading.Event()

    # ---- start-up --------------------------------------------------------------------------------------------
    def load(self) -> None:
        for name, path in self.settings.checkpoints.items():
            log.info("loading model %s from %s on %s (%s)", name, path, self.device, self.options.describe())
            model = ServedModel.load(name, path, self.device, batch_invariant=self.batch_invariant,
                                     options=self.options)
            model.eps_fn.warm_up()
            self.models[name] = model
        self.engine = Engine(self.models, self.sink, max_batch_size=self.settings.max_batch_size)
        metrics.WORKER_MODEL_LOADED.set(1)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "models": list(self.models), "device": str(self.device),
                "max_batch_size": self.settings.max_batch_size, "pid": os.getpid(),
                "inference": {name: getattr(self.options, name)
                              for name in ("precision", "channels_last", "compile", "cuda_graphs")}}

    def healthy(self) -> bool:
        return bool(self.models) and time.monotonic() - self.loop_alive_at < LOOP_STALL_SECONDS

    # ---- signals ---------------------------------------------------------------------------------------------
    def request_stop(self, signum: int, frame: FrameType | None = None) -> None:
        if self._stop_at is None:
            log.info("signal %d: taking no new jobs; finishing active ones for up to %.0f s", signum,
                     self.stop_grace)
            self._stop_at = time.monotonic()
        else:
            log.info("signal %d again: handing active jobs back now", signum)
            self._force_stop = True

    def _stopping_now(self) -> bool:
        if self._stop_at is None:
            return False
        return self._force_stop or time.monotonic() - self._stop_at >= self.stop_grace

    # ---- the denoising thread ------------------------------------------------------------------------------
    def run(self) -> int:
        assert self.engine is not None, "call load() first"
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        if not self._register():
            return 0
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        webhooks = self._start_webhooks()
        try:
            self._loop(self.engine)
        finally:
            self.writer.give_up_at = time.monotonic() + self.lease
            handed = self.engine.hand_back_all("the worker stopped before finishing it; it will run again")
            for job_id in self._unstarted:  # claimed, never started: back to the queue as they were
                self._on_lane(job_id, self.session.hand_back, "putting job {} back in the queue")
            if handed or self._unstarted:
                log.info("handed back %d job(s): %s", len(handed) + len(self._unstarted),
                         ", ".join([*handed, *self._unstarted]))
            self.lanes.close()
            if webhooks is not None:
                webhooks.stop()
            self._done.set()
            beat.join(timeout=self.beat_every + 1)
            self._goodbye()
        return 0

    def _start_webhooks(self) -> Any:
        """The webhook dispatcher, a child process (``service.webhooks.process``): it shares no thread and no GIL
        with the denoising loop. None when ``webhook_concurrency`` is 0 or no signing secret is set."""
        if self.settings.webhook_concurrency <= 0 or not self.settings.webhook_secret:
            return None
        from service.webhooks.process import DispatcherProcess

        return DispatcherProcess(self.settings, self.settings.webhook_concurrency)

    def _register(self) -> bool:
        """Register with RQ, waiting for the store as long as it takes (False: stopped while waiting)."""
        backoff = 0.5
        while True:
            try:
                self.session.register()
                return True
            except StoreUnavailable as exc:
                metrics.WORKER_ERRORS.labels("redis").inc()
                log.warning("store unavailable at start-up (%s); retrying in %.1f s", exc, backoff)
            if self._stop_at is not None:
                return False
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _loop(self, engine: Engine) -> None:
        backoff = 0.5
        while True:
            self.loop_alive_at = time.monotonic()
            if self._stop_at is not None and (engine.idle or self._stopping_now()):
                return
            try:
                if self._stop_at is None:
                    self._admit(engine)
                if not engine.idle:
                    self._expire_overdue(engine)
                    self._observe(engine.tick())
                metrics.WORKER_ACTIVE_JOBS.set(len(engine.job_ids))
                backoff = 0.5
            except StoreUnavailable as exc:  # running jobs stay in the engine; their writes wait on their lanes
                metrics.WORKER_ERRORS.labels("redis").inc()
                log.warning("store unavailable (%s); retrying in %.1f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _admit(self, engine: Engine) -> None:
        """Claim queued jobs while the batch has room: wait up to 1 s for one when idle, never when busy. A
        claimed job whose start the store refused is started first, on the next turn."""
        while self._unstarted:
            self._begin(engine, self._unstarted[0])
            self._unstarted.pop(0)
        while engine.has_room() and self._stop_at is None:
            claim = self.session.claim(1 if engine.idle else None)
            if claim is None:
                return
            self._unstarted.append(claim.job_id)
            self._begin(engine, claim.job_id)
            self._unstarted.remove(claim.job_id)

    def _begin(self, engine: Engine, job_id: str) -> None:
        # A store error here (e.g. a Redis failover between claiming and starting) propagates: the claim stays in
        # ``_unstarted`` with its lease renewed, and the start is tried again on the next turn.
        # The input pictures are read before the start is written, so an error reading them never starts it twice.
        queued = self.store.get(job_id)
        pngs = self.store.inputs(job_id, queued["num_inputs"]) if queued else []
        record = self.store.start(job_id, self.name)
        if record is None:  # canceled while queued, or already finished
            self._on_lane(job_id, self.session.record_canceled, "recording job {} as canceled")
            return
        if record.get("created_at") and record.get("started_at"):
            metrics.JOB_QUEUE_WAIT.labels(record["model"]).observe(record["started_at"] - record["created_at"])
        self.sink.began(job_id, record["model"] or "unknown", record["kind"])
        try:
            engine.add(job_spec(job_id, record, pngs))
        except JobRejected as exc:
            log.info("job %s rejected: %s", job_id, exc)
            self.sink.failed(job_id, exc.code, exc.message)
        except Exception as exc:  # e.g. out of memory while drawing x_T: this job fails, the worker goes on
            log.exception("job %s could not start", job_id)
            self.sink.failed(job_id, "internal", f"the job could not start ({type(exc).__name__}: {exc}); "
                                                 "try again, with fewer images if this persists")

    def _on_lane(self, job_id: str, call: Callable[[str], None], what: str) -> None:
        """``call(job_id)`` on the job's lane, retried until the store takes it."""
        self.lanes.submit(job_id, lambda: self.writer(lambda: call(job_id), what.format(job_id)))

    def _expire_overdue(self, engine: Engine) -> None:
        now = time.time()
        for job_id, claim in list(self.session.claims.items()):
            if now - claim.claimed_at > claim.timeout and engine.remove(job_id) is not None:
                self.sink.failed(job_id, "timeout", f"the job ran longer than the {claim.timeout} s limit; "
                                                    "ask for fewer images or steps")

    def _observe(self, stats: TickStats) -> None:
        for model, (images, _seconds) in stats.per_model.items():
            metrics.STEP_DURATION.labels(model).observe(stats.total_s)
            metrics.STEP_BATCH_SIZE.labels(model).observe(images)

    # ---- liveness --------------------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        """Every few seconds: heartbeat, lease renewal, then reaping other workers' expired leases. After the
        store was unavailable, reaping waits one lease: every worker's renewal failed too, so leases that ran
        out during the outage belong to live workers until they have had a turn to renew them."""
        store_back_at = -float("inf")  # monotonic time the store last came back after failing
        failing = False
        while not self._done.is_set():
            try:
                self.store.heartbeat(self.name, self.info(), ttl_seconds=self.lease)
                self.session.renew()
                if failing:
                    failing, store_back_at = False, time.monotonic()
                    log.info("store available again")
                if time.monotonic() - store_back_at >= self.lease:
                    self.session.reap_abandoned()
                self.session.maintain()
            except StoreUnavailable as exc:
                metrics.WORKER_ERRORS.labels("redis").inc()
                if not failing:
                    log.warning("heartbeat failed: %s", exc)
                failing = True
            except Exception:
                metrics.WORKER_ERRORS.labels("heartbeat").inc()
                log.exception("heartbeat failed")
            self._done.wait(self.beat_every)

    def _goodbye(self) -> None:
        try:
            self.store.worker_gone(self.name)
            self.session.unregister()
        except StoreUnavailable as exc:
            log.warning("could not unregister (Redis unavailable: %s)", exc)
        metrics.WORKER_MODEL_LOADED.set(0)


# ---- /metrics and /healthz ---------------------------------------------------------------------------------
def serve_metrics(worker: Worker, host: str, port: int) -> ThreadingHTTPServer:
    """Start the worker's HTTP server in a daemon thread: GET /metrics (Prometheus), GET /healthz."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.CONTENT_TYPE, metrics.exposition(metrics.WORKER_REGISTRY))
            elif path == "/healthz":
                ok = worker.healthy()
                body = b'{"status":"ok"}' if ok else b'{"status":"starting or stalled"}'
                self._send(200 if ok else 503, "application/json", body)
            else:
                self._send(404, "application/json", b'{"error":{"code":"not_found","message":"no such path"}}')

        def _send(self, status: int, ctype: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics server: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


# ---- RQ's job function ---------------------------------------------------------------------------------------
def _standalone_models(settings: Settings) -> Mapping[str, ServedModel]:
    """The served models for ``settings``, loaded once per process for the checkpoints, device and options they
    name (other settings load them anew)."""
    device = pick_device(settings.device)
    return _models(tuple(settings.checkpoints.items()), device, inference_options(settings, device))


@lru_cache(maxsize=1)
def _models(checkpoints: tuple[tuple[str, str], ...], device: torch.device, options: InferenceOptions
            ) -> Mapping[str, ServedModel]:
    return {name: ServedModel.load(name, path, device, batch_invariant=device.type == "cpu", options=options)
            for name, path in checkpoints}


def run_job(job_id: str) -> dict[str, Any]:
    """The function every queued RQ job names. ``ddpm worker`` never calls it (it batches jobs itself and
    completes them through RQ's records); a plain RQ ``SimpleWorker`` on our queue does, and gets the same job
    run alone in-process, with models loaded once from the settings. Raises when the job fails."""
    settings = get_settings()
    store = JobStore(connect(settings.redis_url, timeout=5.0), queue_name=settings.queue_name,
                     ttl_seconds=settings.job_ttl_seconds)
    lanes = Lanes(threads=2)
    sink = StoreSink(store, lanes)
    engine = Engine(_standalone_models(settings), sink, max_batch_size=settings.max_batch_size)
    record = store.start(job_id, f"rq-{os.getpid()}")
    if record is None:
        return {"status": "canceled"}
    sink.began(job_id, record["model"] or "unknown", record["kind"])
    try:
        engine.add(job_spec(job_id, record, store.inputs(job_id, record["num_inputs"])))
    except JobRejected as exc:
        sink.failed(job_id, exc.code, exc.message)
    while not engine.idle:
        engine.tick()
    lanes.close()
    job = store.get(job_id) or {}  # its state as users see it: written to the store before lanes.close() returned
    status = job.get("status") or JobState.FAILED.value
    if status == JobState.FAILED:
        raise RuntimeError(job.get("error") or "the job failed")
    return {"status": status}


# ---- CLI ---------------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (env DDPM_REDIS_URL)")
    parser.add_argument("--checkpoint", action="append", metavar="NAME=FILE",
                        help="a checkpoint to serve; repeatable, the first is the default (env DDPM_CHECKPOINTS)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the U-Net runs (env DDPM_DEVICE)")
    parser.add_argument("--metrics-port", type=int,
                        help="port of /metrics and /healthz, 0 disables (env DDPM_WORKER_METRICS_PORT; 9100)")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics server")
    parser.add_argument("--max-batch-size", type=int,
                        help="most images in one U-Net forward, across jobs (env DDPM_MAX_BATCH_SIZE)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="U-Net precision: bf16 autocast or fp32 (env DDPM_PRECISION; auto: bf16 on CUDA "
                             "and on CPUs with bf16 instructions)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="NHWC memory layout for the U-Net (env DDPM_CHANNELS_LAST; default: on for CUDA)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the U-Net at start (env DDPM_COMPILE; default: off)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="CUDA graphs per power-of-two batch bucket, CUDA only "
                             "(env DDPM_CUDA_GRAPHS; default: off)")
    parser.add_argument("--name", help="worker name (default: host-pid)")
    parser.add_argument("--batch-invariant", choices=("auto", "on", "off"), default="auto",
                        help="pad lone images so results never depend on the batch (auto: on for CPU)")
    parser.add_argument("--stop-grace", type=float, default=10.0,
                        help="seconds to keep running active jobs after SIGTERM before handing them back")
    parser.add_argument("--lease-seconds", type=int,
                        help="a worker not heard from for this long is gone: its jobs are retried or failed "
                             "(env DDPM_WORKER_LEASE_SECONDS; 15)")
    parser.add_argument("--webhook-concurrency", type=int,
                        help="webhook deliveries in flight in this worker, 0: none (env DDPM_WEBHOOK_CONCURRENCY; 8)")


# flag (argparse destination) -> the setting it overrides (``service.settings.settings_from_args``)
SETTINGS_FLAGS = {"redis_url": "redis_url", "checkpoint": "checkpoints", "device": "device",
                  "metrics_port": "worker_metrics_port", "max_batch_size": "max_batch_size", "precision": "precision",
                  "channels_last": "channels_last", "compile": "compile", "cuda_graphs": "cuda_graphs",
                  "webhook_concurrency": "webhook_concurrency", "lease_seconds": "worker_lease_seconds"}


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args, SETTINGS_FLAGS)
    except ValidationError as exc:
        print(f"ddpm worker: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    invariant = {"auto": None, "on": True, "off": False}[args.batch_invariant]
    worker = Worker(settings, name=args.name, batch_invariant=invariant, stop_grace=args.stop_grace)
    server = None
    if settings.worker_metrics_port:
        try:
            server = serve_metrics(worker, args.metrics_host, settings.worker_metrics_port)
        except OSError as exc:
            log.error("cannot listen on %s:%d for /metrics and /healthz (%s); pass --metrics-port (0: off)",
                      args.metrics_host, settings.worker_metrics_port, exc.strerror or exc)
            return 2
    try:
        worker.load()
    except Exception as exc:
        log.error("could not load the models: %s", exc)
        return 1
    log.info("worker %s ready on %s: models %s, max batch %d images, batch-invariant %s, inference %s",
             worker.name, worker.device, list(worker.models), settings.max_batch_size, worker.batch_invariant,
             worker.options.describe())
    try:
        return worker.run()
    finally:
        if server is not None:
            server.shutdown()
