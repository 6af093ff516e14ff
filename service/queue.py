"""Jobs in Redis: the job store, the only module that knows the Redis key names (and, with its worker-side
companion ``service.worker_session``, the only one that knows RQ).

A *job* is one request of a job-creating route (``kind``: generate, interpolate, likelihood). Its queue mechanics
are an RQ job (same id) on the queue ``settings.queue_name``, run by ``service.worker.run_job(job_id)``; its
user-facing state lives in our own keys, all expiring after the job TTL:

=====================================  =================================================================
``ddpm:job:{id}``                      hash: kind, status, model, request (JSON), num_images, num_inputs, total,
                                       step, t, num_frames, seeds (JSON), error (JSON), created_at/started_at/
                                       ended_at (epoch seconds), worker, attempt, owner (SHA-256 hex of the API key
                                       that submitted it; empty while keys are off)
``ddpm:job:{id}:input:{k}``            PNG bytes of input image k, fitted to the model (written with the job)
``ddpm:job:{id}:frames``               list of JSON ``{"index", "step", "t"}``, one per x0-hat frame
``ddpm:job:{id}:frame:{n}``            PNG bytes of frame n (a grid when the job has several images)
``ddpm:job:{id}:image:{i}``            PNG bytes of final image i
``ddpm:job:{id}:result``               JSON of a likelihood job's measurement (written with ``succeeded``)
``ddpm:job:{id}:animation:{fmt}``      the frames as an animated webp or gif, made on first request, kept as long
                                       as the job
``ddpm:job:{id}:events``               stream of ``{"event", "data"}``: queued, progress, frame, and one terminal
                                       event (succeeded|failed|canceled); entry ids are the SSE event ids
``ddpm:job:{id}:cancel``               present when a cancel was asked for
``ddpm:workers``                       sorted set: worker name -> last heartbeat (epoch seconds)
``ddpm:worker:{name}``                 JSON about a live worker (models, device), expiring with its heartbeat
``ddpm:reaper``                        short lock: one worker at a time reaps jobs of dead workers
``ddpm:ratelimit:{client}:{window}``   the API's count of a client's requests (or refused keys) in a one-minute
                                       window; ``client`` is an opaque id (a key digest prefix or an address)
=====================================  =================================================================

Two other modules keep keys of their own next to these, each documenting them: ``service.webhooks.outbox``
(``ddpm:webhook:{id}``, ``ddpm:webhooks:*``: webhook deliveries, fed from the events stream above) and
``service.idempotency`` (``ddpm:idempotency:*``: Idempotency-Key records).

Tests and tools name these keys through ``job_key``, ``worker_key``, ``WORKERS_KEY`` and ``ratelimit_key``, never
by writing them out.

RQ jobs are enqueued with ``Retry(max=max_retries)`` (default 1): the run after a worker died mid-job. The worker
side of RQ (``service.worker_session.WorkerSession``) claims jobs with RQ's own dequeue and execution records and
ends them through RQ's success, failure and cancel handling, so RQ's registries mean what RQ means by them.

Final images (or a likelihood job's result) and the ``succeeded`` status are written in one MULTI/EXEC
transaction, so a crash while writing never leaves a job that says ``succeeded`` without them. Admission is one
WATCH/MULTI transaction too: the queue-length check and the enqueue (RQ's ``enqueue_call(pipeline=...)``) commit
together or not at all, so concurrent submitters never push the queue past its bound. Every state change is one
atomic ``_transition`` from an expected state (``service.job_state`` draws them), so a late writer never
overwrites a state another process reached first.

"Cancel" is one thing here: a user *asks* for it (``cancel``, ``cancel_requested``); the state it leads to is
``canceled`` (``mark_canceled`` moves a running job there, ``cancel`` a queued one at once).

Every Redis error, from our calls or from inside RQ's, surfaces as ``StoreUnavailable`` (``StoreFull`` when Redis
is out of memory or past the API's high-water mark): ``service.store_errors``, re-exported here. The API's store
has a ``CircuitBreaker``: calls fail fast for a moment after one timed out, so requests queued behind a hung Redis
do not each wait out their own timeout.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis import Redis

from service.job_state import TERMINAL_STATES, JobState
from service.settings import Settings
from service.store_errors import (
    CircuitBreaker,
    MemorySample,
    StoreFull,
    StoreUnavailable,
    store_error,
    translate_errors,
)

__all__ = [
    "REAPER_KEY",
    "TERMINAL_STATES",
    "WORKERS_KEY",
    "WORKER_LEASE_SECONDS",
    "CircuitBreaker",
    "Event",
    "JobState",
    "JobStore",
    "QueueFull",
    "StoreFull",
    "StoreUnavailable",
    "connect",
    "is_valid_job_id",
    "job_key",
    "new_job_id",
    "ratelimit_key",
    "store_error",
    "worker_key",
]

RUN_JOB_FUNCTION = "service.worker.run_job"
WORKERS_KEY = "ddpm:workers"
REAPER_KEY = "ddpm:reaper"
# The default of the setting ``worker_lease_seconds``, for callers without settings at hand; the worker, ``ddpm up``
# and the API pass the configured value.
WORKER_LEASE_SECONDS: int = Settings.model_fields["worker_lease_seconds"].default
_JOB_ID_LEN = 32  # 128 random bits, hex: unguessable


class QueueFull(Exception):
    """Too many jobs waiting; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, length: int, retry_after: int):
        self.length, self.retry_after = length, retry_after
        super().__init__(f"the queue holds {length} jobs; retry in {retry_after} s")


def new_job_id() -> str:
    return secrets.token_hex(_JOB_ID_LEN // 2)


def is_valid_job_id(job_id: str) -> bool:
    """Only ids we could have made: 32 lowercase hex characters. Anything else never reaches Redis."""
    return len(job_id) == _JOB_ID_LEN and all(c in "0123456789abcdef" for c in job_id)


def connect(url: str, *, timeout: float = 1.0, connect_timeout: float | None = None) -> Redis:
    """A Redis client that fails fast (``connect_timeout`` seconds to connect, default ``timeout``; ``timeout``
    per command) and returns bytes. ``url`` is a plain Redis URL or a Sentinel one (``service.redis_url``): every
    client of the service is made here."""
    from service.redis_url import client_from_url

    return client_from_url(url, socket_connect_timeout=timeout if connect_timeout is None else connect_timeout,
                           socket_timeout=timeout, health_check_interval=10, retry_on_timeout=False)


def job_key(job_id: str, *parts: str | int) -> str:
    """The key of a job's record, or with ``parts`` of one of its other keys: ``job_key(id, "frame", 3)`` is
    ``ddpm:job:{id}:frame:3`` (the table above)."""
    return ":".join(["ddpm", "job", job_id, *map(str, parts)])


def worker_key(name: str) -> str:
    """The key of a live worker's info, expiring with its heartbeat."""
    return f"ddpm:worker:{name}"


def ratelimit_key(client: str, window: int) -> str:
    """The key counting ``client``'s requests in the one-minute ``window`` (epoch minutes)."""
    return f"ddpm:ratelimit:{client}:{window}"


_guarded = threading.local()  # .active: this thread is inside a JobStore call that holds the breaker


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


@dataclass
class Event:
    id: str
    event: str
    data: dict[str, Any]


class JobStore:
    """Reads and writes jobs (their keys in the module docstring).

    - The API: ``submit`` (admission), ``get``, ``frames``/``frame_png``, ``image_png``, ``result``, ``inputs``,
      ``events``, ``animation``/``keep_animation``, ``queue_position``, ``cancel``, ``cancel_requested``,
      ``live_workers``, ``count_request`` (rate limits), ``has_room``, ``ping``, ``queue_length``,
      ``running_count``.
    - A worker: ``start``, ``progress``/``sync_progress`` (progress and cancel checks of a tick in one
      round-trip), ``add_frame``, then one end: ``succeed``, ``fail``, ``mark_canceled`` or ``requeued`` (handed
      back); ``heartbeat``/``worker_gone`` for its own liveness.

    Each state change is a ``_transition`` from the state it expects (False when the job was elsewhere).
    """

    def __init__(self, client: Redis, *, queue_name: str = "ddpm", ttl_seconds: int = 86400,
                 job_timeout_seconds: int = 3600, stream_maxlen: int = 2000, max_retries: int = 1,
                 high_water: float | None = None, breaker: CircuitBreaker | None = None):
        self.redis: Any = client  # redis-py's stubs type replies too loosely to help here
        self.queue_name = queue_name
        self.ttl = ttl_seconds
        self.job_timeout = job_timeout_seconds
        self.stream_maxlen = stream_maxlen
        self.max_retries = max_retries  # runs after the first when a worker dies mid-job (RQ's Retry)
        self.high_water = high_water  # refuse new jobs once used_memory / maxmemory reaches this (None: never)
        self.breaker = breaker
        self._memory = MemorySample()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Translate Redis errors (``StoreUnavailable``) and keep the circuit breaker informed (by the
        outermost guard of a thread: methods may call each other)."""
        if self.breaker is None or getattr(_guarded, "active", False):
            with translate_errors():
                yield
            return
        self.breaker.before()
        _guarded.active = True
        error: StoreUnavailable | None = None
        try:
            with translate_errors():
                yield
        except StoreUnavailable as exc:
            error = exc
            raise
        finally:
            _guarded.active = False
            self.breaker.after(error)

    # ---- RQ -----------------------------------------------------------------------------------------------
    def rq_queue(self) -> Any:
        from rq import Queue

        return Queue(self.queue_name, connection=self.redis)

    def ping(self) -> None:
        with self._guard():
            self.redis.ping()

    def queue_length(self) -> int:
        with self._guard():
            return int(self.rq_queue().count)

    def running_count(self) -> int:
        """Jobs a worker has claimed and not ended (RQ's started registry, read without its cleanup)."""
        with self._guard():
            return int(self.rq_queue().started_job_registry.get_job_count(cleanup=False))

    def queue_position(self, job_id: str) -> int | None:
        """0-based position among queued jobs, or None when not queued."""
        with self._guard():
            pos = self.rq_queue().get_job_position(job_id)
        return None if pos is None else int(pos)

    # ---- API side ------------------------------------------------------------------------------------------
    def submit(self, request: dict[str, Any], model: str, *, num_images: int, total_steps: int,
               seeds: Sequence[int], max_queue_length: int, retry_after: int = 5, owner: str | None = None,
               job_id: str | None = None, kind: str = "generate", inputs: Sequence[bytes] = ()) -> str:
        """Create the job record, its ``queued`` event and the RQ job, in one transaction with the check that the
        queue has room (WATCH on RQ's queue list: a concurrent enqueue makes this one re-check). ``owner``: the
        submitting API key's digest (hex), kept on the record. ``job_id``: an id the caller drew beforehand with
        ``new_job_id`` (an idempotent request reserves it first). ``kind``: the route that made it; ``inputs``: its
        input images (PNG), stored with it. Raises ``QueueFull``, or ``StoreFull`` when the store is past its
        high-water mark."""
        if job_id is not None and not is_valid_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        job_id, queue = job_id or new_job_id(), self.rq_queue()
        with self._guard():
            self._check_room()
            queue.get_redis_server_version()  # RQ reads it while enqueueing; a WATCHed pipeline must not
            with self.redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(queue.key)
                        length = int(pipe.llen(queue.key))
                        if length >= max_queue_length:
                            raise QueueFull(length, retry_after)
                        pipe.multi()
                        self._queue_job(pipe, queue, job_id, request, model, num_images, total_steps, seeds,
                                        owner, kind, inputs)
                        pipe.execute()
                        return job_id
                    except redis.WatchError:
                        continue

    def _queue_job(self, pipe: Any, queue: Any, job_id: str, request: dict[str, Any], model: str,
                   num_images: int, total_steps: int, seeds: Sequence[int], owner: str | None, kind: str,
                   inputs: Sequence[bytes]) -> None:
        from rq import Retry

        pipe.hset(job_key(job_id), mapping={
            "kind": kind, "status": JobState.QUEUED.value, "model": model, "request": json.dumps(request),
            "num_images": num_images, "num_inputs": len(inputs), "total": total_steps, "step": 0, "t": -1,
            "num_frames": 0, "seeds": json.dumps(list(seeds)), "created_at": time.time(), "attempt": 0,
            "owner": owner or "",
        })
        pipe.expire(job_key(job_id), self.ttl)
        for k, png in enumerate(inputs):
            pipe.set(job_key(job_id, "input", k), png, ex=self.ttl)
        self._add_event(pipe, job_id, "queued", {"status": "queued"})
        queue.enqueue_call(RUN_JOB_FUNCTION, args=(job_id,), job_id=job_id, timeout=self.job_timeout,
                           result_ttl=self.ttl, failure_ttl=self.ttl, ttl=self.ttl, description=f"{kind} {model}",
                           retry=Retry(max=self.max_retries) if self.max_retries > 0 else None, pipeline=pipe)

    def _check_room(self) -> None:
        """``StoreFull`` once ``used_memory / maxmemory`` reaches ``high_water`` (sampled at most once a second:
        every submit asks, one INFO a second answers; no maxmemory, no limit)."""
        if self.high_water is None:
            return
        used = self._memory.fraction(self.redis)
        if used is not None and used >= self.high_water:
            raise StoreFull(f"the job store is {used:.0%} full (new jobs are refused from {self.high_water:.0%}, "
                            "so running jobs can finish); finished jobs expire and make room")

    def has_room(self) -> bool:
        """Whether the store is below the high-water mark (always, without one): optional writes, such as
        caches, are only made then."""
        try:
            with self._guard():
                self._check_room()
        except StoreFull:
            return False
        return True

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record, parsed; None if unknown or expired."""
        with self._guard():
            raw = self.redis.hgetall(job_key(job_id))
        if not raw:
            return None
        rec = {_text(k): _text(v) for k, v in raw.items()}
        out: dict[str, Any] = {"id": job_id, "kind": rec.get("kind") or "generate", "status": rec.get("status"),
                               "model": rec.get("model"), "worker": rec.get("worker"),
                               "owner": rec.get("owner") or None}
        for name in ("request", "seeds", "error"):
            out[name] = json.loads(rec[name]) if rec.get(name) else None  # type: ignore[arg-type]
        for name in ("num_images", "num_inputs", "total", "step", "t", "num_frames", "attempt"):
            out[name] = int(rec.get(name) or 0)  # type: ignore[arg-type]
        for name in ("created_at", "started_at", "ended_at"):
            out[name] = float(rec[name]) if rec.get(name) else None  # type: ignore[arg-type]
        return out

    def frames(self, job_id: str, since: int = -1) -> list[dict[str, Any]]:
        """Frame descriptors with ``index > since``, in order."""
        with self._guard():
            raw = self.redis.lrange(job_key(job_id, "frames"), max(since + 1, 0), -1)
        return [json.loads(r) for r in raw]

    def frame_png(self, job_id: str, index: int) -> bytes | None:
        with self._guard():
            return self.redis.get(job_key(job_id, "frame", index))  # type: ignore[return-value]

    def image_png(self, job_id: str, index: int) -> bytes | None:
        with self._guard():
            return self.redis.get(job_key(job_id, "image", index))  # type: ignore[return-value]

    def inputs(self, job_id: str, count: int) -> list[bytes | None]:
        """The job's ``count`` input images (PNG), None for any that expired."""
        if count <= 0:
            return []
        with self._guard():
            return list(self.redis.mget([job_key(job_id, "input", k) for k in range(count)]))

    def result(self, job_id: str) -> dict[str, Any] | None:
        """A succeeded likelihood job's result, None for any other job (or once expired)."""
        with self._guard():
            raw = self.redis.get(job_key(job_id, "result"))
        return None if raw is None else json.loads(raw)  # type: ignore[no-any-return]

    def animation(self, job_id: str, fmt: str) -> bytes | None:
        with self._guard():
            return self.redis.get(job_key(job_id, "animation", fmt))  # type: ignore[return-value]

    def keep_animation(self, job_id: str, fmt: str, data: bytes) -> None:
        """Cache a finished job's animation for as long as the job lives (its record's remaining TTL); not at
        all if the job is gone meanwhile."""
        with self._guard():
            left_ms = int(self.redis.pttl(job_key(job_id)))
            if left_ms > 0:
                self.redis.set(job_key(job_id, "animation", fmt), data, px=left_ms, nx=True)

    def events(self, job_id: str, last_id: str = "0", block_ms: int | None = None, count: int = 100
               ) -> list[Event]:
        """Events after ``last_id`` (``"0"`` = from the start); waits up to ``block_ms`` when there are none."""
        with self._guard():
            res = self.redis.xread({job_key(job_id, "events"): last_id}, count=count, block=block_ms)
        out: list[Event] = []
        for _stream, entries in res or []:
            for entry_id, fields in entries:
                f = {_text(k): _text(v) for k, v in fields.items()}
                out.append(Event(_text(entry_id) or "", f.get("event") or "", json.loads(f.get("data") or "{}")))
        return out

    def cancel(self, job_id: str) -> JobState | None:
        """Ask for cancellation. A queued job is canceled at once (it never starts); a running one stops at its
        worker's next step check. Returns the state after the call (None if the job is unknown)."""
        with self._guard():
            status = _text(self.redis.hget(job_key(job_id), "status"))
            if status is None:
                return None
            state = JobState(status)
            if state in TERMINAL_STATES:
                return state
            self.redis.set(job_key(job_id, "cancel"), 1, ex=self.ttl)
            if state is JobState.QUEUED:
                self.rq_queue().remove(job_id)
                if self._transition(job_id, JobState.QUEUED, JobState.CANCELED, {"ended_at": time.time()},
                                    "canceled", {"status": "canceled"}):
                    return JobState.CANCELED
                return JobState(_text(self.redis.hget(job_key(job_id), "status")) or "canceled")
            return state

    def live_workers(self, max_age_seconds: float = WORKER_LEASE_SECONDS) -> list[dict[str, Any]]:
        """Workers whose heartbeat is younger than ``max_age_seconds`` (the setting ``worker_lease_seconds``),
        with their info."""
        with self._guard():
            names = self.redis.zrangebyscore(WORKERS_KEY, time.time() - max_age_seconds, "+inf")
            infos = [self.redis.get(worker_key(_text(n) or "")) for n in names]
        return [json.loads(i) for i in infos if i]

    # ---- worker side ---------------------------------------------------------------------------------------
    def start(self, job_id: str, worker: str) -> dict[str, Any] | None:
        """Mark a queued (or retried) job running. Returns its record, or None if it was canceled/finished."""
        with self._guard():
            if self.redis.exists(job_key(job_id, "cancel")):
                self._transition(job_id, JobState.QUEUED, JobState.CANCELED, {"ended_at": time.time()},
                                 "canceled", {"status": "canceled"})
                return None
            status = _text(self.redis.hget(job_key(job_id), "status"))
            if status is None or JobState(status) in TERMINAL_STATES:
                return None
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(job_key(job_id), mapping={"status": JobState.RUNNING.value, "started_at": time.time(),
                                           "worker": worker, "step": 0, "num_frames": 0})
            pipe.hincrby(job_key(job_id), "attempt", 1)
            pipe.delete(job_key(job_id, "frames"))
            self._add_event(pipe, job_id, "running", {"status": "running", "worker": worker})
            pipe.execute()
        return self.get(job_id)

    def progress(self, job_id: str, step: int, total: int, t: int) -> None:
        with self._guard():
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(job_key(job_id), mapping={"step": step, "total": total, "t": t})
            self._add_event(pipe, job_id, "progress", {"step": step, "total": total, "t": t})
            pipe.execute()

    def add_frame(self, job_id: str, step: int, t: int, png: bytes) -> int:
        """Store an x0-hat frame; returns its index."""
        with self._guard():
            index = int(self.redis.hincrby(job_key(job_id), "num_frames", 1)) - 1
            meta = {"index": index, "step": step, "t": t}
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(job_key(job_id, "frame", index), png, ex=self.ttl)
            pipe.rpush(job_key(job_id, "frames"), json.dumps(meta))
            pipe.expire(job_key(job_id, "frames"), self.ttl)
            self._add_event(pipe, job_id, "frame", meta)
            pipe.execute()
        return index

    def succeed(self, job_id: str, images: Sequence[bytes], result: dict[str, Any] | None = None) -> bool:
        """Store the final images (or a likelihood job's ``result``) and the ``succeeded`` state in one
        transaction (only from ``running``)."""
        extra = {"ended_at": time.time()}
        with self._guard():
            return self._transition(job_id, JobState.RUNNING, JobState.SUCCEEDED, extra, "succeeded",
                                    {"status": "succeeded", "num_images": len(images)}, images=images,
                                    result=None if result is None else json.dumps(result, separators=(",", ":")))

    def fail(self, job_id: str, code: str, message: str) -> bool:
        err = {"code": code, "message": message}
        with self._guard():
            for src in (JobState.RUNNING, JobState.QUEUED):
                if self._transition(job_id, src, JobState.FAILED,
                                     {"ended_at": time.time(), "error": json.dumps(err)},
                                     "failed", {"status": "failed", "error": err}):
                    return True
        return False

    def mark_canceled(self, job_id: str) -> bool:
        with self._guard():
            return self._transition(job_id, JobState.RUNNING, JobState.CANCELED, {"ended_at": time.time()},
                                    "canceled", {"status": "canceled"})

    def requeued(self, job_id: str, reason: str) -> bool:
        """A running job handed back (worker stopping or died): back to ``queued`` for a retry."""
        with self._guard():
            return self._transition(job_id, JobState.RUNNING, JobState.QUEUED, {"step": 0},
                                    "queued", {"status": "queued", "reason": reason})

    def cancel_requested(self, job_id: str) -> bool:
        with self._guard():
            return bool(self.redis.exists(job_key(job_id, "cancel")))

    def heartbeat(self, worker: str, info: dict[str, Any], ttl_seconds: int = WORKER_LEASE_SECONDS) -> None:
        """Say ``worker`` is alive, with its ``info``, for ``ttl_seconds`` (the setting ``worker_lease_seconds``)."""
        with self._guard():
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(worker_key(worker), json.dumps(info), ex=ttl_seconds)
            pipe.zadd(WORKERS_KEY, {worker: time.time()})
            pipe.zremrangebyscore(WORKERS_KEY, "-inf", time.time() - 3600)
            pipe.execute()

    def worker_gone(self, worker: str) -> None:
        with self._guard():
            self.redis.delete(worker_key(worker))
            self.redis.zrem(WORKERS_KEY, worker)

    def count_request(self, client: str, window_seconds: int = 60) -> tuple[int, int]:
        """Count one request of ``client`` (an opaque id, never a secret) in the current fixed window:
        returns (requests in this window so far, seconds until the window ends)."""
        window = int(time.time()) // window_seconds
        key = ratelimit_key(client, window)
        with self._guard():
            pipe = self.redis.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, window_seconds + 1)
            count, _ = pipe.execute()
        return int(count), max(1, (window + 1) * window_seconds - int(time.time()))

    def sync_progress(self, progress: Sequence[tuple[str, int, int, int]], active: Sequence[str]) -> set[str]:
        """The worker's once-per-step call, one round-trip: write ``(job_id, step, total, t)`` progress records
        and return which of the ``active`` job ids have a cancel request."""
        with self._guard():
            pipe = self.redis.pipeline(transaction=False)
            for job_id, step, total, t in progress:
                pipe.hset(job_key(job_id), mapping={"step": step, "total": total, "t": t})
                self._add_event(pipe, job_id, "progress", {"step": step, "total": total, "t": t})
            for job_id in active:
                pipe.exists(job_key(job_id, "cancel"))
            replies = pipe.execute()
        flags = replies[len(replies) - len(active):] if active else []
        return {job_id for job_id, flag in zip(active, flags, strict=True) if flag}

    # ---- internals -----------------------------------------------------------------------------------------
    def _add_event(self, pipe: Any, job_id: str, event: str, data: dict[str, Any]) -> None:
        pipe.xadd(job_key(job_id, "events"), {"event": event, "data": json.dumps(data)},
                  maxlen=self.stream_maxlen, approximate=True)
        pipe.expire(job_key(job_id, "events"), self.ttl)

    def _transition(self, job_id: str, src: JobState, dst: JobState, fields: dict[str, Any], event: str,
                    data: dict[str, Any], images: Sequence[bytes] = (), result: str | None = None) -> bool:
        """Atomically move a job from ``src`` to ``dst`` (WATCH/MULTI): False if it was not in ``src``."""
        key = job_key(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if _text(pipe.hget(key, "status")) != src.value:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    for i, png in enumerate(images):
                        pipe.set(job_key(job_id, "image", i), png, ex=self.ttl)
                    if result is not None:
                        pipe.set(job_key(job_id, "result"), result, ex=self.ttl)
                    pipe.hset(key, mapping={"status": dst.value, **fields})
                    self._add_event(pipe, job_id, event, data)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue
