"""The worker's side of RQ: registering a worker, claiming jobs, leases, and ending each job in RQ's records.

RQ's own ``SimpleWorker`` runs one job per ``perform_job``; our worker batches many, so ``WorkerSession`` drives
RQ's steps itself (the undocumented ones through ``service.rq_internals``, which a test holds against the
installed RQ) and keeps every record meaning what RQ means by it. Its verbs are RQ's bookkeeping only:
``claim``, ``renew``, then one end per claim -- ``record_finished``, ``record_failed``, ``record_canceled``,
``hand_back`` or ``forget`` -- and the housekeeping ``maintain`` and ``reap_abandoned``. A job's user-facing state
is ``service.queue.JobStore``'s, written by the worker before it records the end here.

The lease (``lease_seconds``, the setting ``worker_lease_seconds``): a claimed job's execution in RQ's started
registry expires after it unless ``renew`` extends it; a worker that died stops renewing, and any live worker's
``reap_abandoned`` then retries the job (or fails it when no retry is left) within about one lease.

This module knows RQ and the store's API; it does not know the engine, torch or HTTP.
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from service import rq_internals
from service.queue import REAPER_KEY, WORKER_LEASE_SECONDS, JobStore, connect
from service.store_errors import StoreUnavailable, translate_errors

__all__ = ["Claim", "WorkerSession"]


@dataclass
class Claim:
    """A job a worker took from the queue: RQ's job, queue and execution records, kept until the job ends."""

    job_id: str
    job: Any
    queue: Any
    execution: Any
    claimed_at: float
    timeout: int


class WorkerSession:
    """A non-forking worker's use of RQ, for a worker that runs several jobs at once in one process (module doc).

    The worker is registered (birth, death, heartbeat); a claimed job is ``started`` with an execution in the
    started registry for as long as it runs, its lease renewed by ``renew``; it ends through RQ's own success
    handling (finished registry, result), failure handling (failed registry, retries when allowed), cancellation
    (canceled registry), or is handed back to the front of the queue.

    ``maintenance_seconds``: RQ's housekeeping every 30 s rather than RQ's 10 min, so a job stranded in RQ's
    intermediate queue (a worker died, or Redis failed over, between taking it and starting it) is retried about
    1.5 min later, not 10-20 min.
    """

    def __init__(self, redis_url: str, store: JobStore, name: str, *, lease_seconds: int = WORKER_LEASE_SECONDS,
                 maintenance_seconds: int = 30):
        self.store = store
        self.lease = int(lease_seconds)
        self.name = name
        self.maintenance_seconds = maintenance_seconds
        self._client = connect(redis_url, timeout=10.0, connect_timeout=2.0)
        self._rq: Any = None  # RQ's worker, made by register(): making one talks to Redis (CLIENT SETNAME)
        self._lock = threading.Lock()
        self.claims: dict[str, Claim] = {}

    @property
    def rq_worker(self) -> Any:
        """RQ's worker object behind this session (None before ``register``), for RQ's tools and tests."""
        return self._rq

    def register(self) -> None:
        """Register with RQ (birth, state ``idle``); raises ``StoreUnavailable`` until Redis answers."""
        with translate_errors():
            if self._rq is None:
                self._rq = rq_internals.leased_worker(
                    self.store.queue_name, self.name, self._client, lease_seconds=self.lease,
                    result_ttl=self.store.ttl, maintenance_seconds=self.maintenance_seconds)
            try:
                self._rq.register_birth()
            except ValueError:  # our name is still registered: a previous run of this container that died
                self._rq.register_death()
                self._rq.register_birth()
            self._rq.set_state("idle")

    def unregister(self) -> None:
        with translate_errors():
            self._rq.register_death()

    def claim(self, block_seconds: int | None) -> Claim | None:
        """Take the next queued job (waiting up to ``block_seconds``; None: don't wait) and mark it started."""
        from rq.exceptions import DequeueTimeout

        rq = self._rq
        with translate_errors():
            try:
                found = rq.queue_class.dequeue_any(rq.queues, block_seconds, connection=rq.connection,
                                                   job_class=rq.job_class, serializer=rq.serializer)
            except DequeueTimeout:
                return None
            if found is None:
                return None
            job, queue = found
            execution = rq.prepare_execution(job)
            rq.prepare_job_execution(job, remove_from_intermediate_queue=True)
        claim = Claim(job.id, job, queue, execution, time.time(), int(job.timeout or self.store.job_timeout))
        with self._lock:
            self.claims[job.id] = claim
        return claim

    def renew(self) -> None:
        """Extend the worker's and every claimed job's lease by ``lease_seconds`` (call every few seconds)."""
        from rq.utils import now

        with self._lock:
            claims = list(self.claims.values())
        with translate_errors(), self._rq.connection.pipeline() as pipe:
            self._rq.heartbeat(self.lease + 60, pipeline=pipe)
            for c in claims:
                c.execution.heartbeat(c.job.started_job_registry, self.lease, pipeline=pipe)
                c.job.heartbeat(now(), self.lease, pipeline=pipe, xx=True)
            pipe.execute()

    def _claimed(self, job_id: str) -> Claim | None:
        with self._lock:
            return self.claims.get(job_id)

    def _release(self, job_id: str) -> None:
        """Forget a claim once RQ's records of its end are written (a failed write keeps it, so the caller's
        retry finds it again and its lease keeps being renewed meanwhile)."""
        with self._lock:
            self.claims.pop(job_id, None)
            idle = not self.claims
        if idle:
            with suppress(StoreUnavailable), translate_errors():
                self._rq.set_state("idle")  # only what RQ's tools show about the worker

    def forget(self, job_id: str) -> None:
        """Drop a claim without writing RQ's records: the job is no longer this worker's (its lease ran out and
        it was requeued or failed meanwhile)."""
        self._release(job_id)

    def record_finished(self, job_id: str, result: dict[str, Any]) -> None:
        """The job succeeded: RQ's success path (finished registry, ``result`` kept for the job TTL)."""
        claim = self._claimed(job_id)
        if claim is None:
            return
        with translate_errors():
            rq_internals.record_success(self._rq, claim.job, claim.queue, claim.execution, result)
        self._release(job_id)

    def record_failed(self, job_id: str, message: str, *, retry: bool = False) -> None:
        """The job failed: RQ's failure path (failed registry). ``retry``: use one of its retries, if any."""
        claim = self._claimed(job_id)
        if claim is None:
            return
        if not retry:
            claim.job.retries_left = 0  # a request the model can't serve fails the same way every time
        with translate_errors():
            rq_internals.record_failure(self._rq, claim.job, claim.queue, claim.execution, message)
        self._release(job_id)

    def record_canceled(self, job_id: str) -> None:
        """The job ended ``canceled``: its execution ends and RQ's job moves to the canceled registry."""
        from rq.exceptions import InvalidJobOperation

        claim = self._claimed(job_id)
        if claim is None:
            return
        with translate_errors():
            with self._rq.connection.pipeline() as pipe:
                self._rq.cleanup_execution(claim.job, pipe, claim.execution)
                pipe.execute()
            with suppress(InvalidJobOperation):
                claim.job.cancel()
        self._release(job_id)

    def hand_back(self, job_id: str) -> None:
        """Put a claimed job back at the front of the queue (worker stopping), without using a retry: the
        enqueue and the end of its execution in one transaction, so a retry after an error never queues it
        twice."""
        claim = self._claimed(job_id)
        if claim is None:
            return
        with translate_errors():
            claim.job.started_at = None
            claim.queue.get_redis_server_version()  # read outside the transaction
            with self._rq.connection.pipeline() as pipe:
                claim.queue.enqueue_job(claim.job, pipeline=pipe, at_front=True)
                self._rq.cleanup_execution(claim.job, pipe, claim.execution)
                pipe.execute()
        self._release(job_id)

    def maintain(self) -> None:
        """RQ's periodic housekeeping, every ``maintenance_seconds`` and by one worker at a time (RQ's lock):
        expired entries of the finished/failed/canceled registries, dead workers, and job ids stranded in RQ's
        intermediate queue by a worker that died, or lost its Redis to a failover, between dequeuing and starting
        them (after a minute RQ retries those, or fails them when no retry is left; their user-facing state
        follows)."""
        from rq import worker_registration
        from rq.job import JobStatus
        from rq.utils import now

        rq = self._rq
        if not rq.should_run_maintenance_tasks:
            return
        queue = rq.queues[0]
        with translate_errors():
            # RQ's own lock (acquire_maintenance_lock) lives 15 minutes: one left behind by a failover between
            # taking and releasing it would stop this for that long. Ours expires before the next run is due.
            ttl = max(int(rq.maintenance_interval) - 1, 1)
            if rq.connection.set(queue.registry_cleaning_key, self.name, nx=True, ex=ttl):
                try:
                    for registry in (queue.finished_job_registry, queue.failed_job_registry,
                                     queue.canceled_job_registry):
                        registry.cleanup()
                    worker_registration.clean_worker_registry(queue)
                    stranded = [j for j in queue.intermediate_queue.get_job_ids() if j not in self.claims]
                    queue.intermediate_queue.cleanup(rq, queue)
                    for job_id in stranded:
                        job = queue.fetch_job(job_id)
                        if job is not None and job.get_status() == JobStatus.FAILED:
                            self.store.fail(job_id, "worker_lost", "the worker that took this job stopped before "
                                                                   "starting it; submit the request again")
                finally:
                    queue.release_maintenance_lock()
            rq.last_cleaned_at = now()

    def reap_abandoned(self) -> list[str]:
        """Jobs whose worker stopped renewing its lease: RQ retries them (if they have retries left) or moves
        them to the failed registry; their user-facing state is moved first, so a worker that picks up the
        retry finds the job ``queued``. Returns the job ids handled."""
        from rq.job import JobStatus

        with translate_errors():
            queue = self._rq.queues[0]
            registry = queue.started_job_registry
            expired = [j for j in registry.get_expired_job_ids() if j not in self.claims]
            if not expired or not self.store.redis.set(REAPER_KEY, self.name, nx=True, ex=self.lease):
                return []  # nothing to do, or another worker is on it
            for job_id in expired:
                rq_job = queue.fetch_job(job_id)
                if rq_job is None or rq_job.get_status(refresh=False) != JobStatus.STARTED:
                    continue  # RQ leaves these alone too
                if rq_job.retries_left:
                    self.store.requeued(job_id, "its worker stopped responding; it will run again")
                else:
                    self.store.fail(job_id, "worker_lost", "the worker running this job stopped responding and "
                                                           "its retries are used up; submit the request again")
            registry.cleanup()
        return expired
