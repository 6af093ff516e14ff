"""The private redis-server and the job store against it."""

from __future__ import annotations

from service.queue import JobState, JobStore, connect, is_valid_job_id


def test_job_lifecycle_and_events(redis_url: str) -> None:
    store = JobStore(connect(redis_url))
    job_id = store.submit({"num_images": 2}, "tiny", num_images=2, total_steps=10, seeds=[1, 2],
                          max_queue_length=10)
    assert is_valid_job_id(job_id)
    assert store.get(job_id)["status"] == JobState.QUEUED
    assert store.queue_position(job_id) == 0
    assert store.start(job_id, "w1")["status"] == JobState.RUNNING
    store.progress(job_id, 1, 10, 35)
    assert store.add_frame(job_id, 1, 35, b"frame0") == 0
    assert store.succeed(job_id, [b"img0", b"img1"])
    assert store.image_png(job_id, 1) == b"img1" and store.frame_png(job_id, 0) == b"frame0"
    events = [e.event for e in store.events(job_id)]
    assert events == ["queued", "running", "progress", "frame", "succeeded"]
    # A finished job cannot be failed or succeeded again.
    assert not store.fail(job_id, "x", "y") and store.get(job_id)["status"] == JobState.SUCCEEDED


def test_cancel_of_a_queued_job_means_it_never_starts(redis_url: str) -> None:
    store = JobStore(connect(redis_url))
    job_id = store.submit({}, "tiny", num_images=1, total_steps=10, seeds=[0], max_queue_length=10)
    assert store.cancel(job_id) == JobState.CANCELED
    assert store.start(job_id, "w1") is None
    assert store.queue_length() == 0
