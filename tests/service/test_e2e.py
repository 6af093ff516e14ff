"""The whole service with real parts: redis-server, the API over HTTP, and a real ``ddpm worker`` process
sampling with the tiny checkpoint (8x8 RGB, T=40).

The tests share one worker and one API (``shared_stack``: starting a worker costs seconds)."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import time
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import ApiServer, WorkerProcess

TERMINAL = ("succeeded", "failed", "canceled")


def _submit(api: ApiServer, **body: Any) -> str:
    r = httpx.post(f"{api.url}/generate", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _wait(api: ApiServer, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := httpx.get(f"{api.url}/jobs/{job_id}").json())["status"] not in TERMINAL:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def _pixels(api: ApiServer, url: str) -> np.ndarray:
    r = httpx.get(api.url + url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content)))


def test_generate_poll_frames_in_order_then_images(shared_stack: tuple[ApiServer, WorkerProcess]) -> None:
    api_server = shared_stack[0]
    assert httpx.get(f"{api_server.url}/readyz").json() == {"status": "ready", "worker": "serving",
                                                           "message": "a worker serves the default model"}
    job_id = _submit(api_server, num_images=2, steps=10, preview_every=3, seed=11)
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while True:  # poll as an app would: only the frames after the last one seen
        since = frames[-1]["index"] if frames else -1
        job = httpx.get(f"{api_server.url}/jobs/{job_id}", params={"since": since}).json()
        frames += job["frames"]
        if job["status"] in TERMINAL:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["step"] == job["progress"]["total"] == 10
    assert [f["index"] for f in frames] == list(range(len(frames)))
    assert [f["step"] for f in frames] == [1, 4, 7, 10]  # steps done: every 3rd step and the last
    ts = [f["t"] for f in frames]
    assert ts == sorted(ts, reverse=True) and ts[-1] == 0
    grid = _pixels(api_server, frames[0]["url"])
    assert grid.ndim == 3 and grid.shape[1] > 8  # a frame shows both images side by side
    for image in job["images"]:
        assert _pixels(api_server, image["url"]).shape == (8, 8, 3) and image["seed"] == 11
    assert job["created_at"] <= job["started_at"] <= job["ended_at"]


def test_same_seed_same_images_whatever_the_batch(shared_stack: tuple[ApiServer, WorkerProcess]) -> None:
    api_server = shared_stack[0]
    a = _wait(api_server, _submit(api_server, num_images=2, steps=8, seed=5))
    b = _wait(api_server, _submit(api_server, num_images=3, steps=8, seed=5))
    c = _wait(api_server, _submit(api_server, num_images=1, steps=8, seed=6))
    images_a = [_pixels(api_server, im["url"]) for im in a["images"]]
    images_b = [_pixels(api_server, im["url"]) for im in b["images"]]
    assert len(images_b) == 3
    for x, y in zip(images_a, images_b[:2], strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(images_a[0], images_a[1])  # images of one job differ
    assert not np.array_equal(images_a[0], _pixels(api_server, c["images"][0]["url"]))


def _sse(api: ApiServer, job_id: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    events, current = [], {}
    with httpx.stream("GET", f"{api.url}/jobs/{job_id}/events", headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
            elif not line.startswith((":", "retry:")):  # comments; the reconnection delay (on the first event)
                key, _, value = line.partition(": ")
                current[key] = json.loads(value) if key == "data" else value
    return events


def test_sse_streams_a_real_job_and_replays(shared_stack: tuple[ApiServer, WorkerProcess]) -> None:
    api_server = shared_stack[0]
    job_id = _submit(api_server, num_images=1, steps=12, preview_every=4, seed=1)
    events = _sse(api_server, job_id)
    names = [e["event"] for e in events]
    assert names[0] == "queued" and names[1] == "running" and names[-1] == "succeeded"
    assert names.count("frame") == 4 and "progress" in names  # steps 0, 4, 8 and the last (11)
    steps = [e["data"]["step"] for e in events if e["event"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 12
    assert [e["data"]["index"] for e in events if e["event"] == "frame"] == [0, 1, 2, 3]
    middle = len(events) // 2
    assert _sse(api_server, job_id, {"Last-Event-ID": events[middle]["id"]}) == events[middle + 1:]


def test_cancel_a_queued_job_it_never_starts(shared_stack: tuple[ApiServer, WorkerProcess]) -> None:
    api_server, worker = shared_stack
    worker.signal(signal.SIGSTOP)  # the worker is busy elsewhere: the job waits in the queue
    try:
        queued = _submit(api_server, num_images=1, steps=5)
        assert httpx.get(f"{api_server.url}/jobs/{queued}").json()["status"] == "queued"
        assert httpx.delete(f"{api_server.url}/jobs/{queued}").json()["status"] == "canceled"
    finally:
        worker.signal(signal.SIGCONT)
    done = _wait(api_server, _submit(api_server, num_images=1, steps=5))
    assert done["status"] == "succeeded"
    job = httpx.get(f"{api_server.url}/jobs/{queued}").json()
    assert job["status"] == "canceled" and job["started_at"] is None and job["frames"] == []


def test_cancel_a_running_job_stops_it(shared_stack: tuple[ApiServer, WorkerProcess]) -> None:
    api_server = shared_stack[0]
    job_id = _submit(api_server, num_images=16, steps=40, preview_every=1)
    with httpx.stream("GET", f"{api_server.url}/jobs/{job_id}/events", timeout=60) as r:
        for line in r.iter_lines():
            if line == "event: progress":  # it is running: cancel now
                assert httpx.delete(f"{api_server.url}/jobs/{job_id}").status_code in (200, 202)
                break
    job = _wait(api_server, job_id)
    assert job["status"] == "canceled" and job["images"] == []
    assert job["progress"]["step"] < 40
    assert httpx.get(f"{api_server.url}/jobs/{job_id}/images/0.png").status_code == 404


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move_in_the_api_and_the_worker(shared_stack: tuple[ApiServer, WorkerProcess]) -> None:
    api_server, worker = shared_stack
    worker_url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    before = httpx.get(worker_url).text
    _wait(api_server, _submit(api_server, num_images=2, steps=4))
    after = httpx.get(worker_url).text
    images = "ddpm_images_generated_total"
    assert _sample(after, images, model="tiny") == _sample(before, images, model="tiny") + 2
    assert _sample(after, "ddpm_denoising_step_duration_seconds_count") > _sample(
        before, "ddpm_denoising_step_duration_seconds_count")
    api_metrics = httpx.get(f"{api_server.url}/metrics").text
    assert _sample(api_metrics, "ddpm_jobs_submitted_total", model="tiny") >= 1
    assert _sample(api_metrics, "ddpm_queue_depth") == 0


API_FAMILIES = {"ddpm_http_requests_total", "ddpm_http_request_duration_seconds", "ddpm_jobs_submitted_total",
                "ddpm_queue_depth", "ddpm_live_workers", "ddpm_jobs_outstanding"}
WORKER_FAMILIES = {"ddpm_jobs_finished_total", "ddpm_job_queue_wait_seconds", "ddpm_job_run_duration_seconds",
                   "ddpm_denoising_step_duration_seconds", "ddpm_denoising_step_batch_images",
                   "ddpm_images_generated_total", "ddpm_worker_active_jobs", "ddpm_worker_model_loaded",
                   "ddpm_worker_errors_total", "ddpm_webhook_delivery_attempts_total", "ddpm_webhook_deliveries_total"}


def _families(exposition: str) -> set[str]:
    """The families an exposition declares (``# TYPE name kind``), as Prometheus would ingest them."""
    return {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")}


def test_each_process_exports_only_its_own_metrics_and_promtool_accepts_them(
        shared_stack: tuple[ApiServer, WorkerProcess]) -> None:
    api_server, worker = shared_stack
    _wait(api_server, _submit(api_server, num_images=1, steps=2))  # every family has moved at least once
    api = httpx.get(f"{api_server.url}/metrics")
    work = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")
    api_families, worker_families = _families(api.text), _families(work.text)
    assert {f for f in api_families if f.startswith("ddpm_")} == API_FAMILIES
    assert {f for f in worker_families if f.startswith("ddpm_")} == WORKER_FAMILIES
    assert "process_resident_memory_bytes" in api_families & worker_families  # each of its own process
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for name, response in (("API", api), ("worker", work)):
        assert response.headers["content-type"].startswith("text/plain")
        check = subprocess.run([promtool, "check", "metrics"], input=response.content, capture_output=True,
                               timeout=60)
        assert check.returncode == 0, f"{name} /metrics: {check.stdout.decode()}{check.stderr.decode()}"
