"""The worker's sink at its own level: PNG encoding, writes retried until the store takes them, and a job's end
written to the store before RQ's records, against a real redis-server (no worker process, no engine)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch
from PIL import Image
from rq import Queue

from service import store_sink
from service.engine import StepProgress
from service.lanes import Lanes
from service.queue import JobState, JobStore, StoreUnavailable, connect
from service.store_sink import StoreSink, StoreWriter, encode_frame, encode_images
from service.worker_session import WorkerSession


def test_frames_are_grids_and_final_images_one_png_each() -> None:
    x = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    assert Image.open(io.BytesIO(encode_frame(x))).size == (22, 22)  # 2x2 grid, 2-pixel padding
    assert Image.open(io.BytesIO(encode_frame(x[:1]))).size == (8, 8)
    pngs = encode_images(x)
    assert len(pngs) == 4 and all(Image.open(io.BytesIO(p)).size == (8, 8) for p in pngs)


def test_a_write_is_retried_with_backoff_until_the_store_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(store_sink.time, "sleep", waits.append)
    replies = iter([StoreUnavailable("down"), StoreUnavailable("down"), StoreUnavailable("loading"), "stored"])

    def write() -> str:
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    assert StoreWriter()(write, "storing a frame") == "stored"
    assert waits == [0.5, 1.0, 2.0]


def test_a_stopping_worker_gives_a_write_up_once_its_grace_has_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_sink.time, "sleep", lambda _s: None)
    writer = StoreWriter()
    writer.give_up_at = store_sink.time.monotonic() - 1

    def never() -> None:
        raise StoreUnavailable("down")

    with pytest.raises(StoreUnavailable):
        writer(never, "storing the results")


@pytest.fixture
def running(redis_url: str) -> Iterator[tuple[StoreSink, JobStore, str]]:
    """A sink on a real store and RQ session, and a job claimed and started as the worker starts one."""
    store = JobStore(connect(redis_url, timeout=5.0))
    session = WorkerSession(redis_url, store, "sink-test", lease_seconds=10)
    session.register()
    job_id = store.submit({"num_images": 2}, "tiny", num_images=2, total_steps=3, seeds=[1], max_queue_length=10)
    assert session.claim(None) is not None and store.start(job_id, "sink-test") is not None
    lanes = Lanes(threads=2)
    sink = StoreSink(store, lanes, session)
    sink.began(job_id, "tiny")
    yield sink, store, job_id
    lanes.close()
    session.unregister()


def _rq(store: JobStore) -> Queue:
    return Queue(store.queue_name, connection=store.redis)


def test_frames_then_images_and_succeeded_then_rqs_record(running: tuple[StoreSink, JobStore, str]) -> None:
    sink, store, job_id = running
    x = torch.zeros(2, 3, 8, 8)
    sink.frame(job_id, 1, 30, x)
    sink.frame(job_id, 3, 0, x)
    sink.succeeded(job_id, x, StepProgress(job_id, 3, 3, 0))
    assert sink.lanes.drain(job_id, timeout=30)
    job = store.get(job_id)
    assert job is not None and job["status"] == "succeeded" and (job["step"], job["t"]) == (3, 0)
    assert [f["step"] for f in store.frames(job_id)] == [1, 3]
    assert store.image_png(job_id, 1) is not None
    assert [e.event for e in store.events(job_id)][-1] == "succeeded"
    assert _rq(store).finished_job_registry.get_job_ids() == [job_id]


def test_a_cancel_that_lands_before_the_results_wins(running: tuple[StoreSink, JobStore, str]) -> None:
    sink, store, job_id = running
    assert store.cancel(job_id) is JobState.RUNNING and store.mark_canceled(job_id)  # between its last step and now
    sink.succeeded(job_id, torch.zeros(2, 3, 8, 8), StepProgress(job_id, 3, 3, 0))
    assert sink.lanes.drain(job_id, timeout=30)
    job = store.get(job_id)
    assert job is not None and job["status"] == "canceled" and store.image_png(job_id, 0) is None
    assert _rq(store).canceled_job_registry.get_job_ids() == [job_id]


def test_results_of_a_job_that_is_no_longer_ours_are_dropped(running: tuple[StoreSink, JobStore, str]) -> None:
    sink, store, job_id = running
    assert store.requeued(job_id, "its lease ran out")  # another worker will run it
    sink.succeeded(job_id, torch.zeros(2, 3, 8, 8), StepProgress(job_id, 3, 3, 0))
    assert sink.lanes.drain(job_id, timeout=30)
    job = store.get(job_id)
    assert job is not None and job["status"] == "queued" and store.image_png(job_id, 0) is None
    assert job_id not in sink.session.claims  # type: ignore[union-attr]
    assert _rq(store).finished_job_registry.get_job_ids() == []


def test_the_sink_keeps_nothing_of_a_job_once_it_has_ended(running: tuple[StoreSink, JobStore, str]) -> None:
    """A worker runs for months: whatever the sink records per job must go when the job ends."""
    sink, store, job_id = running
    sink.frame(job_id, 1, 30, torch.zeros(2, 3, 8, 8))
    sink.succeeded(job_id, torch.zeros(2, 3, 8, 8), StepProgress(job_id, 3, 3, 0))
    assert sink.lanes.drain(job_id, timeout=30)
    assert store.get(job_id)["status"] == "succeeded"  # type: ignore[index]
    held = {name: value for name, value in vars(sink).items()
            if isinstance(value, (dict, set, list)) and job_id in value}
    assert not held, f"the sink still holds the ended job in {sorted(held)}"
