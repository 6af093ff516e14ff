"""The job store and the worker's RQ session at their own level, against a real redis-server: every state change
and what it refuses, atomic admission, events, cancel, hand-back, reaping, and RQ's records of each end. Keys are
named through ``service.queue``'s helpers, never written out here."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from rq import Queue

from service.queue import (
    WORKER_LEASE_SECONDS,
    JobState,
    JobStore,
    QueueFull,
    connect,
    is_valid_job_id,
    job_key,
    new_job_id,
    worker_key,
)
from service.worker_session import WorkerSession


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(connect(redis_url, timeout=5.0), ttl_seconds=600)


@pytest.fixture
def session(redis_url: str, store: JobStore) -> Iterator[WorkerSession]:
    """A registered worker session with a short lease."""
    session = WorkerSession(redis_url, store, "session-test", lease_seconds=1)
    session.register()
    yield session
    session.unregister()


def submit(store: JobStore, *, max_queue_length: int = 100, **kw: Any) -> str:
    return store.submit({"num_images": 2, "steps": 10}, "tiny", num_images=2, total_steps=10, seeds=[1, 2],
                        max_queue_length=max_queue_length, **kw)


def events(store: JobStore, job_id: str) -> list[str]:
    return [e.event for e in store.events(job_id)]


def rq(store: JobStore) -> Queue:
    return Queue(store.queue_name, connection=store.redis)


def registries(store: JobStore) -> dict[str, list[str]]:
    q = rq(store)
    return {"queued": q.get_job_ids(), "started": q.started_job_registry.get_job_ids(),
            "finished": q.finished_job_registry.get_job_ids(), "failed": q.failed_job_registry.get_job_ids(),
            "canceled": q.canceled_job_registry.get_job_ids()}


# ---- the job store -------------------------------------------------------------------------------------------
def test_a_job_runs_from_queued_to_succeeded_with_its_events(store: JobStore) -> None:
    job_id = submit(store)
    assert is_valid_job_id(job_id)
    assert store.get(job_id)["status"] == JobState.QUEUED  # type: ignore[index]
    assert store.queue_position(job_id) == 0 and store.queue_length() == 1
    assert 0 < store.redis.ttl(job_key(job_id)) <= 600
    assert store.start(job_id, "w1")["status"] == JobState.RUNNING  # type: ignore[index]
    store.progress(job_id, 1, 10, 35)
    assert store.add_frame(job_id, 1, 35, b"frame0") == 0 and store.add_frame(job_id, 5, 20, b"frame1") == 1
    assert [f["index"] for f in store.frames(job_id, since=0)] == [1]
    assert store.succeed(job_id, [b"img0", b"img1"])
    assert store.image_png(job_id, 1) == b"img1" and store.frame_png(job_id, 0) == b"frame0"
    job = store.get(job_id)
    assert job is not None and (job["step"], job["t"], job["num_frames"], job["attempt"]) == (1, 35, 2, 1)
    assert job["worker"] == "w1" and job["ended_at"] >= job["started_at"] >= job["created_at"]
    assert events(store, job_id) == ["queued", "running", "progress", "frame", "frame", "succeeded"]


def test_each_state_change_happens_only_from_the_state_it_expects(store: JobStore) -> None:
    job_id = submit(store)
    assert not store.succeed(job_id, [b"img"]) and not store.mark_canceled(job_id)  # not running yet
    assert not store.requeued(job_id, "never ran")
    store.start(job_id, "w1")
    assert store.succeed(job_id, [b"img"])
    for late in (lambda: store.fail(job_id, "x", "y"), lambda: store.succeed(job_id, [b"other"]),
                 lambda: store.mark_canceled(job_id), lambda: store.requeued(job_id, "late")):
        assert not late()
    assert store.get(job_id)["status"] == "succeeded" and store.image_png(job_id, 0) == b"img"  # type: ignore[index]
    assert store.start(job_id, "w2") is None  # a finished job never starts again


def test_a_queued_job_can_fail_when_its_worker_died_taking_it(store: JobStore) -> None:
    job_id = submit(store)
    assert store.fail(job_id, "worker_lost", "submit it again")
    job = store.get(job_id)
    assert job is not None and job["status"] == "failed" and job["error"]["code"] == "worker_lost"


def test_a_retried_job_starts_afresh(store: JobStore) -> None:
    job_id = submit(store)
    store.start(job_id, "w1")
    store.add_frame(job_id, 1, 35, b"frame0")
    assert store.requeued(job_id, "the worker stopped")
    job = store.start(job_id, "w2")
    assert job is not None and (job["attempt"], job["num_frames"], job["worker"]) == (2, 0, "w2")
    assert store.frames(job_id) == []
    assert events(store, job_id) == ["queued", "running", "frame", "queued", "running"]


def test_cancel_of_a_queued_job_means_it_never_starts(store: JobStore, session: WorkerSession) -> None:
    job_id = submit(store)
    assert store.cancel(job_id) is JobState.CANCELED
    assert store.queue_length() == 0 and session.claim(None) is None  # gone from RQ's queue: no worker takes it
    assert store.start(job_id, "w1") is None
    job = store.get(job_id)
    assert job is not None and job["status"] == "canceled" and job["started_at"] is None
    assert events(store, job_id) == ["queued", "canceled"]
    assert store.cancel(job_id) is JobState.CANCELED  # asking again changes nothing


def test_cancel_of_a_running_job_is_a_request_its_worker_sees_at_its_next_step(store: JobStore) -> None:
    job_id, other = submit(store), submit(store)
    store.start(job_id, "w1")
    store.start(other, "w1")
    assert not store.cancel_requested(job_id)
    assert store.cancel(job_id) is JobState.RUNNING and store.cancel_requested(job_id)
    assert store.get(job_id)["status"] == "running"  # type: ignore[index]
    assert store.sync_progress([(job_id, 2, 10, 30), (other, 2, 10, 30)], [job_id, other]) == {job_id}
    assert store.mark_canceled(job_id)
    assert events(store, job_id)[-2:] == ["progress", "canceled"]
    assert store.cancel(job_id) is JobState.CANCELED
    assert store.cancel(new_job_id()) is None  # unknown


def test_admission_is_atomic_under_concurrent_submitters(redis_url: str, store: JobStore) -> None:
    accepted: list[str] = []
    refused: list[QueueFull] = []

    def submitter() -> None:
        own = JobStore(connect(redis_url, timeout=5.0))  # a client each, as API processes have
        for _ in range(5):
            try:
                accepted.append(submit(own, max_queue_length=12))
            except QueueFull as exc:
                refused.append(exc)

    threads = [threading.Thread(target=submitter) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(accepted) == 12 and len(refused) == 18 and store.queue_length() == 12
    assert sorted(rq(store).get_job_ids()) == sorted(accepted)
    assert all(exc.length == 12 for exc in refused)


def test_a_job_keeps_its_input_pictures_and_a_likelihood_result(store: JobStore) -> None:
    job_id = submit(store, kind="likelihood", inputs=[b"png0", b"png1"])
    job = store.get(job_id)
    assert job is not None and (job["kind"], job["num_inputs"]) == ("likelihood", 2)
    assert store.inputs(job_id, 2) == [b"png0", b"png1"]
    store.redis.delete(job_key(job_id, "input", 1))  # as if it expired
    assert store.inputs(job_id, 2) == [b"png0", None]
    store.start(job_id, "w1")
    assert store.succeed(job_id, [], {"bits_per_dim": [3.5]})
    assert store.result(job_id) == {"bits_per_dim": [3.5]}


def test_events_wait_for_new_ones_and_resume_after_an_id(store: JobStore) -> None:
    job_id = submit(store)
    first = store.events(job_id)
    assert [e.event for e in first] == ["queued"] and first[0].data == {"status": "queued"}
    start = time.monotonic()
    assert store.events(job_id, first[-1].id, block_ms=300) == []
    assert time.monotonic() - start >= 0.25
    store.start(job_id, "w1")
    assert [e.event for e in store.events(job_id, first[-1].id)] == ["running"]


def test_an_animation_is_kept_as_long_as_its_job_and_never_for_a_gone_one(store: JobStore) -> None:
    job_id = submit(store)
    store.keep_animation(job_id, "webp", b"anim")
    assert store.animation(job_id, "webp") == b"anim"
    assert 0 < store.redis.pttl(job_key(job_id, "animation", "webp")) <= store.redis.pttl(job_key(job_id))
    gone = new_job_id()
    store.keep_animation(gone, "webp", b"anim")
    assert store.animation(gone, "webp") is None


def test_workers_are_live_for_one_lease_after_their_heartbeat(store: JobStore) -> None:
    store.heartbeat("w1", {"name": "w1", "models": ["tiny"]}, ttl_seconds=7)
    assert 0 < store.redis.ttl(worker_key("w1")) <= 7
    store.heartbeat("w2", {"name": "w2", "models": []})
    assert 7 < store.redis.ttl(worker_key("w2")) <= WORKER_LEASE_SECONDS  # the setting's default
    assert [w["name"] for w in store.live_workers(5)] == ["w1", "w2"]
    time.sleep(1.1)
    assert store.live_workers(1) == [] and len(store.live_workers()) == 2
    store.worker_gone("w1")
    assert [w["name"] for w in store.live_workers()] == ["w2"] and not store.redis.exists(worker_key("w1"))


def test_requests_are_counted_per_client_and_window(store: JobStore) -> None:
    assert [store.count_request("a")[0] for _ in range(3)] == [1, 2, 3]
    count, retry_after = store.count_request("b")
    assert count == 1 and 1 <= retry_after <= 60


# ---- the worker's RQ session ---------------------------------------------------------------------------------
def test_a_claimed_job_is_started_in_rq_with_a_lease_renewed_by_the_session(store: JobStore,
                                                                             session: WorkerSession) -> None:
    job_id = submit(store)
    claim = session.claim(None)
    assert claim is not None and claim.job_id == job_id and job_id in session.claims
    assert registries(store)["started"] == [job_id] and registries(store)["queued"] == []
    assert rq(store).fetch_job(job_id).get_status() == "started"  # type: ignore[union-attr]
    assert store.get(job_id)["status"] == "queued"  # type: ignore[index]  # its user-facing start is the store's
    time.sleep(1.2)  # past the 1 s lease...
    session.renew()  # ...renewed: it is no longer expired
    assert rq(store).started_job_registry.get_expired_job_ids() == []


def test_rqs_records_say_how_each_claim_ended(store: JobStore, session: WorkerSession) -> None:
    ids = [submit(store) for _ in range(4)]
    for _ in ids:
        assert session.claim(None) is not None
    ok, bad, canceled, handed = ids
    session.record_finished(ok, {"status": "succeeded", "images": 2})
    session.record_failed(bad, "invalid_request: steps")  # not retried: it would fail the same way
    session.record_canceled(canceled)
    session.hand_back(handed)
    assert session.claims == {}
    records = registries(store)
    assert (records["finished"], records["failed"], records["canceled"]) == ([ok], [bad], [canceled])
    assert records["queued"] == [handed] and records["started"] == []
    q = rq(store)
    assert q.fetch_job(ok).return_value() == {"status": "succeeded", "images": 2}  # type: ignore[union-attr]
    assert "invalid_request" in (q.fetch_job(bad).latest_result().exc_string or "")  # type: ignore[union-attr]
    assert q.fetch_job(handed).retries_left == 1  # type: ignore[union-attr]  # handing back uses no retry
    session.record_finished(ok, {})  # no longer claimed: nothing happens
    assert registries(store)["finished"] == [ok]


def test_a_failure_may_use_a_retry(store: JobStore, session: WorkerSession) -> None:
    job_id = submit(store)
    session.claim(None)
    session.record_failed(job_id, "internal: out of memory", retry=True)
    job = rq(store).fetch_job(job_id)
    assert job is not None and job.retries_left == 0 and job.get_status() == "queued"
    assert registries(store)["queued"] == [job_id]


def test_hand_back_puts_a_job_at_the_front_of_the_queue(store: JobStore, session: WorkerSession) -> None:
    first = submit(store)
    assert session.claim(None) is not None
    later = submit(store)
    store.start(first, "session-test")
    assert store.requeued(first, "the worker is stopping")
    session.hand_back(first)
    assert registries(store)["queued"] == [first, later] and store.queue_position(first) == 0
    assert store.get(first)["status"] == "queued"  # type: ignore[index]


@pytest.mark.parametrize("retries", [1, 0])
def test_a_dead_workers_job_is_reaped_by_a_live_one(redis_url: str, store: JobStore, session: WorkerSession,
                                                    retries: int) -> None:
    store.max_retries = retries
    job_id = submit(store)
    assert session.claim(None) is not None
    store.start(job_id, "session-test")
    assert session.reap_abandoned() == []  # its own claims are never reaped
    session.claims.clear()  # the session "dies": no renewal, no record of its end
    rescuer = WorkerSession(redis_url, store, "rescuer", lease_seconds=1)
    rescuer.register()
    try:
        assert rescuer.reap_abandoned() == []  # the lease has not run out yet
        time.sleep(1.2)
        assert rescuer.reap_abandoned() == [job_id]
        job, rq_job = store.get(job_id), rq(store).fetch_job(job_id)
        assert job is not None and rq_job is not None
        if retries:
            assert job["status"] == "queued" and rq_job.get_status() == "queued"
            assert "stopped responding" in store.events(job_id)[-1].data["reason"]
            claim = rescuer.claim(None)
            assert claim is not None and claim.job_id == job_id
            assert store.start(job_id, "rescuer")["attempt"] == 2  # type: ignore[index]
        else:
            assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
            assert rq_job.get_status() == "failed" and registries(store)["failed"] == [job_id]
    finally:
        rescuer.unregister()
