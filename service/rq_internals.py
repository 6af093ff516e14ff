"""The parts of RQ that our worker drives beyond RQ's documented API, in one place, and a check of them.

RQ's own workers run one job per ``perform_job``; ``service.worker_session`` runs many jobs at once in one
process, so it calls the steps of RQ's worker loop itself (dequeue, execution records, heartbeats, the success
and failure handling, maintenance). Most of those steps are public methods that RQ does not document; two are
private, and are only called through the functions below:

- ``record_success`` calls ``Worker._finalize_success``: RQ's path for a job that returned (the result, the
  finished registry, the end of its execution), which RQ offers no public entry to;
- ``record_failure`` sets ``Job._status`` before RQ's ``handle_job_failure``, as RQ's own failure path does.

``USED`` lists every undocumented RQ name the worker side relies on, with the parameters it passes; ``missing()``
checks them against the installed RQ. ``tests/service/test_rq_internals.py`` asserts it finds nothing, so an RQ
release that renames or reshapes one fails that test by name rather than a job in production. ``pyproject.toml``
pins RQ to the releases that test passed with.

This module knows RQ's internals and nothing of jobs' user-facing state (``service.queue``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

__all__ = ["MIN_WORKER_TTL", "USED", "leased_worker", "missing", "record_failure", "record_success"]

# RQ derives its dequeue timeout as ``worker_ttl - 15`` (at least 1): a worker TTL below 16 s changes nothing of
# ours (we pass our own timeout to ``dequeue_any``), but RQ's tools would show a zero timeout.
MIN_WORKER_TTL = 16

# (module, attribute path, parameters we pass by name) -- an attribute path "Job()._status" is looked up on an
# instance (made without touching Redis), since RQ sets it in ``__init__``.
USED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("rq.worker", "SimpleWorker.__init__", ("queues", "name", "connection", "worker_ttl", "default_result_ttl",
                                            "maintenance_interval")),
    ("rq.worker", "SimpleWorker._finalize_success", ("job", "queue", "execution", "return_value")),
    ("rq.worker", "SimpleWorker.handle_execution_ended", ("job", "queue", "heartbeat_ttl")),
    ("rq.worker", "SimpleWorker.handle_job_failure", ("job", "queue", "exc_string", "execution")),
    ("rq.worker", "SimpleWorker.get_heartbeat_ttl", ("job", "working_time")),
    ("rq.worker", "SimpleWorker.prepare_execution", ("job",)),
    ("rq.worker", "SimpleWorker.prepare_job_execution", ("job", "remove_from_intermediate_queue")),
    ("rq.worker", "SimpleWorker.cleanup_execution", ("job", "pipeline", "execution")),
    ("rq.worker", "SimpleWorker.heartbeat", ("timeout", "pipeline")),
    ("rq.worker", "SimpleWorker.register_birth", ()),
    ("rq.worker", "SimpleWorker.register_death", ()),
    ("rq.worker", "SimpleWorker.set_state", ("state",)),
    ("rq.worker", "SimpleWorker.should_run_maintenance_tasks", ()),
    ("rq.queue", "Queue.dequeue_any", ("queues", "timeout", "connection", "job_class", "serializer")),
    ("rq.queue", "Queue.enqueue_call", ("func", "args", "job_id", "timeout", "result_ttl", "failure_ttl", "ttl",
                                        "description", "retry", "pipeline")),
    ("rq.queue", "Queue.enqueue_job", ("job", "pipeline", "at_front")),
    ("rq.queue", "Queue.get_redis_server_version", ()),
    ("rq.queue", "Queue.get_job_position", ("job_or_id",)),
    ("rq.queue", "Queue.remove", ("job_or_id",)),
    ("rq.queue", "Queue.registry_cleaning_key", ()),
    ("rq.queue", "Queue.release_maintenance_lock", ()),
    ("rq.queue", "Queue.intermediate_queue", ()),
    ("rq.intermediate_queue", "IntermediateQueue.get_job_ids", ()),
    ("rq.intermediate_queue", "IntermediateQueue.cleanup", ("worker", "queue")),
    ("rq.registry", "StartedJobRegistry.get_expired_job_ids", ()),
    ("rq.registry", "StartedJobRegistry.get_job_count", ("cleanup",)),
    ("rq.executions", "Execution.heartbeat", ("started_job_registry", "ttl", "pipeline")),
    ("rq.job", "Job.heartbeat", ("timestamp", "ttl", "pipeline", "xx")),
    ("rq.job", "Job.cancel", ()),
    ("rq.job", "Job.started_job_registry", ()),
    ("rq.job", "Job.failure_callback_timeout", ()),
    ("rq.job", "Job()._status", ()),
    ("rq.job", "Job().retries_left", ()),
    ("rq.job", "Job().started_at", ()),
    ("rq.worker_registration", "clean_worker_registry", ("queue",)),
)


def _look_up(module: str, path: str) -> Any:
    owner: Any = importlib.import_module(module)
    for part in path.split("."):
        if part.endswith("()"):  # an instance of this class, made offline
            from redis import Redis

            owner = getattr(owner, part[:-2])(connection=Redis())  # a client object only: nothing is sent
        else:
            owner = inspect.getattr_static(owner, part) if inspect.isclass(owner) else getattr(owner, part)
    return owner


def missing() -> list[str]:
    """What of ``USED`` the installed RQ lacks: ``"rq.x.Y.z: ..."`` per missing name or parameter; [] if none."""
    problems = []
    for module, path, params in USED:
        where = f"{module}.{path}"
        try:
            found = _look_up(module, path)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{where}: not found ({exc})")
            continue
        func: Any = found.__func__ if isinstance(found, classmethod | staticmethod) else found
        if isinstance(func, property):
            func = func.fget
        if not params:
            continue
        try:
            names = set(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            problems.append(f"{where}: not callable")
            continue
        absent = [p for p in params if p not in names]
        if absent:
            problems.append(f"{where}: no parameter {', '.join(absent)}")
    return problems


def leased_worker(queue_name: str, name: str, connection: Any, *, lease_seconds: int, result_ttl: int,
                  maintenance_seconds: int) -> Any:
    """RQ's non-forking worker whose jobs' heartbeat TTL (their lease in RQ's started registry) is
    ``lease_seconds``, where RQ's default is the job timeout + 60 s: far too long to notice a dead worker."""
    from rq.worker import SimpleWorker

    class LeasedWorker(SimpleWorker):
        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            return lease_seconds

    return LeasedWorker([queue_name], name=name, connection=connection,
                        worker_ttl=max(lease_seconds, MIN_WORKER_TTL), default_result_ttl=result_ttl,
                        maintenance_interval=maintenance_seconds)


def record_success(worker: Any, job: Any, queue: Any, execution: Any, result: Any) -> None:
    """RQ's path for a job that returned ``result``: kept as its result, the job in the finished registry, its
    execution ended (``Worker._finalize_success``)."""
    worker._finalize_success(job, queue, execution, result)


def record_failure(worker: Any, job: Any, queue: Any, execution: Any, message: str) -> None:
    """RQ's path for a job that raised: retried if it has retries left, else in the failed registry with
    ``message`` as its exception text; its execution ended. The job's cached status is set first, as RQ's own
    ``_finalize_failure`` does."""
    from rq.job import JobStatus

    job._status = JobStatus.FAILED
    worker.handle_execution_ended(job, queue, job.failure_callback_timeout)
    worker.handle_job_failure(job, queue, exc_string=message, execution=execution)
