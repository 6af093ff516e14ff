"""The worker as users meet it: a real ``ddpm worker`` process, a real redis-server, jobs submitted as the API
submits them (``JobStore.submit``), results read back as the API reads them."""

from __future__ import annotations

import io
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rq import Queue

from service.queue import TERMINAL_STATES, JobState, JobStore, connect, worker_key
from tests.service.conftest import WorkerProcess

StartWorker = Callable[..., WorkerProcess]


def request(**overrides: Any) -> dict[str, Any]:
    req = {"num_images": 2, "seed": 7, "steps": 8, "sampler": "ddpm", "eta": 0.0, "variance": "fixedlarge",
           "preview_every": 3, "model": "tiny"}
    req.update(overrides)
    return req


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(connect(redis_url, timeout=5.0))


def submit(store: JobStore, **overrides: Any) -> str:
    req = request(**overrides)
    return store.submit(req, "tiny", num_images=req["num_images"], total_steps=req["steps"], seeds=[req["seed"]],
                        max_queue_length=100)


def wait_for(store: JobStore, job_id: str, states: frozenset[JobState] | set[JobState] = TERMINAL_STATES,
             timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rec = store.get(job_id)
        assert rec is not None
        if JobState(rec["status"]) in states:
            return rec
        assert time.monotonic() < deadline, f"job stuck in {rec['status']}: {rec}"
        time.sleep(0.02)


def images(store: JobStore, job_id: str, n: int) -> list[bytes]:
    out = [store.image_png(job_id, i) for i in range(n)]
    assert all(out)
    return out  # type: ignore[return-value]


def rq_registries(store: JobStore) -> dict[str, list[str]]:
    q = Queue(store.queue_name, connection=store.redis)
    return {"queued": q.get_job_ids(), "started": q.started_job_registry.get_job_ids(),
            "finished": q.finished_job_registry.get_job_ids(), "failed": q.failed_job_registry.get_job_ids(),
            "canceled": q.canceled_job_registry.get_job_ids()}


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for RQ's records, written right after the job's own state."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_job_runs_to_succeeded_with_ordered_frames_and_final_pngs(worker_process: StartWorker,
                                                                 store: JobStore) -> None:
    worker_process()
    job_id = submit(store, num_images=3, steps=8, preview_every=3)
    rec = wait_for(store, job_id)
    assert rec["status"] == "succeeded", rec
    assert (rec["step"], rec["total"], rec["t"]) == (8, 8, 0)

    frames = store.frames(job_id)
    assert [f["index"] for f in frames] == list(range(len(frames)))
    assert [f["step"] for f in frames] == [1, 4, 7, 8]  # every 3 steps from the first, and the last
    grid = Image.open(io.BytesIO(store.frame_png(job_id, 0) or b""))
    assert grid.size == (2 + 2 * 10, 2 + 2 * 10)  # 3 images of 8x8 as a 2x2 grid with 2-pixel padding

    for png in images(store, job_id, 3):
        img = Image.open(io.BytesIO(png))
        assert (img.size, img.mode) == ((8, 8), "RGB")

    events = [e.event for e in store.events(job_id)]
    assert events[:2] == ["queued", "running"] and events[-1] == "succeeded"
    assert events.count("frame") == 4
    eventually(lambda: job_id in rq_registries(store)["finished"])


def test_same_seed_same_images_and_image_i_independent_of_num_images(worker_process: StartWorker,
                                                                     store: JobStore) -> None:
    worker_process()
    a = submit(store, num_images=2, seed=11)
    b = submit(store, num_images=2, seed=11)
    c = submit(store, num_images=1, seed=11)
    d = submit(store, num_images=1, seed=12)
    for job_id in (a, b, c, d):
        assert wait_for(store, job_id)["status"] == "succeeded"
    assert images(store, a, 2) == images(store, b, 2)
    assert images(store, c, 1)[0] == images(store, a, 2)[0]
    assert images(store, d, 1)[0] != images(store, c, 1)[0]
    alone = submit(store, num_images=1, seed=11)  # c ran batched with a, b and d; this one runs by itself
    assert wait_for(store, alone)["status"] == "succeeded"
    assert images(store, alone, 1) == images(store, c, 1)


def test_cancel_of_a_running_job_stops_it_between_steps(worker_process: StartWorker, store: JobStore) -> None:
    worker_process()
    job_id = submit(store, num_images=64, steps=40, preview_every=0)
    wait_for(store, job_id, {JobState.RUNNING})
    while not any(e.event == "progress" for e in store.events(job_id)):
        time.sleep(0.01)
    assert store.cancel(job_id) is JobState.RUNNING
    rec = wait_for(store, job_id)
    assert rec["status"] == "canceled"
    assert rec["step"] < 40
    assert store.image_png(job_id, 0) is None
    assert [e.event for e in store.events(job_id)][-1] == "canceled"
    eventually(lambda: job_id in rq_registries(store)["canceled"])
    assert job_id not in rq_registries(store)["started"]


def test_a_request_the_model_cannot_serve_fails_with_a_message(worker_process: StartWorker,
                                                                store: JobStore) -> None:
    worker_process()
    bad = submit(store, steps=100)  # the tiny model has T=40
    rec = wait_for(store, bad)
    assert rec["status"] == "failed"
    assert rec["error"]["code"] == "invalid_request"
    assert "1..40" in rec["error"]["message"]
    eventually(lambda: bad in rq_registries(store)["failed"])
    unknown = submit(store, model="nope")
    err = wait_for(store, unknown)["error"]
    assert err["code"] == "model_unavailable" and "tiny" in err["message"]
    assert wait_for(store, submit(store))["status"] == "succeeded"  # the worker carries on


def test_healthz_metrics_and_heartbeat(worker_process: StartWorker, store: JobStore) -> None:
    worker = worker_process("--max-batch-size", "12")
    assert http_get(worker.metrics_port, "/healthz") == (200, b'{"status":"ok"}')
    [info] = store.live_workers()
    assert info["name"] == worker.name and info["models"] == ["tiny"]
    assert info["device"] == "cpu" and info["max_batch_size"] == 12
    assert wait_for(store, submit(store, num_images=2))["status"] == "succeeded"
    time.sleep(0.3)  # the metrics of the job's end are written right after its state
    status, body = http_get(worker.metrics_port, "/metrics")
    text = body.decode()
    assert status == 200
    assert "ddpm_worker_model_loaded 1.0" in text
    assert 'ddpm_jobs_finished_total{kind="generate",model="tiny",status="succeeded"} 1.0' in text
    assert 'ddpm_images_generated_total{model="tiny"} 2.0' in text
    assert 'ddpm_denoising_step_duration_seconds_count{model="tiny"} 8.0' in text
    assert http_get(worker.metrics_port, "/nope")[0] == 404


def _likelihood_job(store: JobStore, model: str, pictures: int) -> str:
    """A likelihood job as the API submits it: its fitted pictures stored with it."""
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(pictures):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    req = {"num_images": pictures, "seed": 3, "steps": 1000, "variance": "fixedlarge", "preview_every": 100,
           "rd_points": 5, "model": model}
    return store.submit(req, model, num_images=pictures, total_steps=1000, seeds=[3] * pictures,
                        max_queue_length=100, kind="likelihood", inputs=pngs)


def test_sigterm_hands_running_jobs_back_and_another_worker_finishes_them(worker_process: StartWorker,
                                                                          store: JobStore, tmp_path: Path) -> None:
    from tests.chaos.processes import write_long_checkpoint

    long = ("--checkpoint", f"long={write_long_checkpoint(tmp_path / 'long.safetensors')}")  # T=1000
    first = worker_process("--stop-grace", "0", *long)
    job_id = submit(store, num_images=2, steps=40, preview_every=0)
    measured = _likelihood_job(store, "long", 2)  # 1000 terms: surely running at the signal
    wait_for(store, job_id, {JobState.RUNNING})
    wait_for(store, measured, {JobState.RUNNING})
    first.signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    for handed in (job_id, measured):
        rec = store.get(handed)
        assert rec is not None and rec["status"] == "queued"
        queued_events = [e.data for e in store.events(handed) if e.event == "queued"]
        assert len(queued_events) == 2 and "reason" in queued_events[-1]
    assert sorted(rq_registries(store)["queued"]) == sorted([job_id, measured])
    assert store.live_workers() == []

    worker_process(*long)
    rec = wait_for(store, job_id)
    assert rec["status"] == "succeeded" and rec["attempt"] == 2
    assert len(images(store, job_id, 2)) == 2
    rec = wait_for(store, measured)  # its pictures were kept for the retry
    assert rec["status"] == "succeeded" and rec["attempt"] == 2 and rec["kind"] == "likelihood"
    result = store.result(measured)
    assert result is not None and len(result["bits_per_dim"]) == 2 and len(result["terms"][0]) == 1001


def test_sigterm_lets_a_short_running_job_finish(worker_process: StartWorker, store: JobStore) -> None:
    worker = worker_process("--stop-grace", "30")
    job_id = submit(store, num_images=4, steps=40)
    wait_for(store, job_id, {JobState.RUNNING})
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0
    rec = store.get(job_id)
    assert rec is not None and rec["status"] == "succeeded"
    eventually(lambda: job_id in rq_registries(store)["finished"])


def test_a_short_job_behind_a_long_one_finishes_first(worker_process: StartWorker, store: JobStore) -> None:
    worker_process("--max-batch-size", "16")
    long_job = submit(store, num_images=4, steps=40, preview_every=0)
    short_job = submit(store, num_images=1, steps=4, preview_every=0)
    long_rec, short_rec = wait_for(store, long_job), wait_for(store, short_job)
    assert long_rec["status"] == short_rec["status"] == "succeeded"
    assert short_rec["ended_at"] < long_rec["ended_at"]
    assert short_rec["started_at"] < long_rec["ended_at"]  # it ran alongside, not after


def test_rq_records_say_what_happened(worker_process: StartWorker, store: JobStore) -> None:
    worker_process()
    ok, bad = submit(store), submit(store, steps=100)
    wait_for(store, ok), wait_for(store, bad)
    eventually(lambda: rq_registries(store)["started"] == [])
    q = Queue(store.queue_name, connection=store.redis)
    ok_job, bad_job = q.fetch_job(ok), q.fetch_job(bad)
    assert ok_job is not None and bad_job is not None
    assert ok_job.get_status() == "finished" and ok_job.return_value() == {"status": "succeeded", "images": 2}
    assert bad_job.get_status() == "failed"
    result = bad_job.latest_result()
    assert result is not None and "invalid_request" in (result.exc_string or "")
    assert set(rq_registries(store)["finished"]) == {ok}


def test_a_job_whose_worker_dies_is_retried_by_another_within_seconds(worker_process: StartWorker,
                                                                       store: JobStore) -> None:
    doomed = worker_process("--lease-seconds", "3")
    assert 0 < store.redis.ttl(worker_key(doomed.name)) <= 3  # its heartbeat lives one lease, too
    job_id = submit(store, num_images=4, steps=40, preview_every=0)
    assert wait_for(store, job_id, {JobState.RUNNING})["worker"] == doomed.name
    doomed.signal(signal.SIGKILL)
    doomed.proc.wait(10)
    rescuer = worker_process("--lease-seconds", "3")
    rec = wait_for(store, job_id, timeout=60)
    assert rec["status"] == "succeeded" and rec["worker"] == rescuer.name and rec["attempt"] == 2
    reasons = [e.data.get("reason", "") for e in store.events(job_id) if e.event == "queued"]
    assert "stopped responding" in reasons[-1]
    q = Queue(store.queue_name, connection=store.redis)
    rq_job = q.fetch_job(job_id)
    assert rq_job is not None and rq_job.get_status() == "finished" and rq_job.retries_left == 0


def test_a_plain_rq_simple_worker_runs_a_job_through_run_job(redis_url: str, tiny_checkpoint: Path,
                                                             store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The function RQ's job record names works on its own: RQ's non-forking worker runs it in-process."""
    from rq.worker import SimpleWorker

    from service.settings import get_settings

    monkeypatch.setenv("DDPM_REDIS_URL", redis_url)
    monkeypatch.setenv("DDPM_CHECKPOINTS", f"tiny={tiny_checkpoint}")
    get_settings.cache_clear()  # the settings' documented cache: read the environment above
    try:
        job_id = submit(store, num_images=2, steps=5)
        SimpleWorker([store.queue_name], connection=store.redis).work(burst=True)
    finally:
        get_settings.cache_clear()
    rec = store.get(job_id)
    assert rec is not None and rec["status"] == "succeeded" and len(images(store, job_id, 2)) == 2
    rq_job = Queue(store.queue_name, connection=store.redis).fetch_job(job_id)
    assert rq_job is not None and rq_job.return_value() == {"status": "succeeded"}


def test_the_worker_rides_out_a_redis_restart(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Redis goes away and comes back (same port, persisted data): the worker resumes without a restart."""
    from service.redis_server import RedisServer, free_port

    port = free_port()
    server = RedisServer(port=port, data_dir=tmp_path / "redis", appendonly=True).start()
    worker = WorkerProcess([sys.executable, "-m", "service.cli", "worker", "--redis-url", server.url, "--checkpoint",
                            f"tiny={tiny_checkpoint}", "--device", "cpu", "--metrics-port", "0", "--name", "phoenix"],
                           0, "phoenix", tmp_path / "phoenix.log")
    try:
        worker.wait_ready(server.url)
        server.stop()
        time.sleep(2.0)
        assert worker.proc.poll() is None, worker.log()
        server.start()
        store = JobStore(connect(server.url, timeout=5.0))
        rec = wait_for(store, submit(store), timeout=60)
        assert rec["status"] == "succeeded" and rec["worker"] == "phoenix"
        eventually(lambda: [w["name"] for w in store.live_workers()] == ["phoenix"])
    finally:
        assert worker.stop() == 0, worker.log()
        server.cleanup()
